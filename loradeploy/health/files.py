"""GGUF validity of the served file: structure and checksum, read through our own parser, never loaded."""
from __future__ import annotations

from pathlib import Path

from ..errors import LoradeployError
from ..gguf import validate_gguf
from .results import FAIL, PASS, SKIP, WARN, Check, EndpointLike


def file_checks(endpoint: EndpointLike) -> list[Check]:
    """file.exists, file.structure and file.sha256 of the endpoint's GGUF."""
    path = Path(endpoint.gguf_path) if endpoint.gguf_path else None
    if path is None:
        return [Check("file.exists", SKIP, "no GGUF path is known for this endpoint")]
    if not path.is_file():
        return [Check("file.exists", FAIL, f"{path} does not exist",
                      f"redeploy it (loradeploy run -m {endpoint.model} --from-stage deploy) "
                      "or roll back to a backup")]
    checks = [Check("file.exists", PASS, str(path), metrics={"size": path.stat().st_size})]
    expected = endpoint.sha256 or None
    try:
        report = validate_gguf(path, expected_sha256=expected)
    except LoradeployError as exc:  # a malformed sha256 in the record
        report = validate_gguf(path)
        checks.append(Check("file.sha256", FAIL, exc.one_line(), "re-run the deploy stage to re-record it"))
        expected = None
    problems = [p for p in report.errors if p.code != "sha256"]
    info = {"quant": report.quant, "architecture": report.architecture, "tensors": report.tensor_count,
            "parameters": report.parameter_count}
    if problems:
        listed = "; ".join(f"{p.code}: {p.message}" for p in problems[:3])
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        checks.append(Check("file.structure", FAIL, f"not a valid GGUF: {listed}{more}",
                            "the file is corrupt: re-run quantize and deploy, or roll back", info))
    elif report.warnings:
        checks.append(Check("file.structure", WARN, "; ".join(p.message for p in report.warnings[:3]),
                            f"inspect it: loradeploy inspect {path}", info))
    else:
        checks.append(Check("file.structure", PASS, f"valid GGUF v{report.version}, {report.architecture}, "
                                                   f"{report.quant}, {report.tensor_count} tensors", metrics=info))
    if expected is None:
        if not any(c.name == "file.sha256" for c in checks):
            checks.append(Check("file.sha256", SKIP, "no sha256 recorded for this deployment"))
    elif any(p.code == "sha256" for p in report.errors):
        checks.append(Check("file.sha256", FAIL, f"sha256 {report.sha256[:12]}... differs from the recorded "
                                                 f"{expected[:12]}...",
                            "the file changed after deploy: redeploy it or roll back to a backup",
                            {"sha256": report.sha256, "expected": expected}))
    else:
        checks.append(Check("file.sha256", PASS, "matches the run record", metrics={"sha256": report.sha256}))
    return checks
