"""What a GGUF check found (fields and problems, JSON-able) and how `loradeploy inspect` shows it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_PROBLEMS = 50


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "message": self.message}


@dataclass
class GGUFReport:
    path: str
    size: int = 0
    version: int | None = None
    architecture: str | None = None
    name: str | None = None
    file_type: int | None = None
    file_type_name: str | None = None
    quant: str | None = None
    tensor_count: int | None = None
    kv_count: int | None = None
    parameter_count: int = 0
    quant_mix: dict[str, dict[str, int]] = field(default_factory=dict)
    bits_per_weight: float | None = None
    chat_template_present: bool = False
    context_length: int | None = None
    alignment: int | None = None
    data_offset: int | None = None
    sha256: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "problems"}
        data["quant_mix"] = {k: dict(v) for k, v in self.quant_mix.items()}
        data["ok"] = self.ok
        data["problems"] = [p.to_dict() for p in self.problems]
        return data


class ProblemList:
    def __init__(self, report: GGUFReport):
        self.report = report
        self.dropped = 0

    def add(self, severity: str, code: str, message: str) -> None:
        if len(self.report.problems) >= MAX_PROBLEMS:
            self.dropped += 1
            return
        self.report.problems.append(Problem(severity, code, message))

    def error(self, code: str, message: str) -> None:
        self.add("error", code, message)

    def warning(self, code: str, message: str) -> None:
        self.add("warning", code, message)

    def finish(self) -> None:
        if self.dropped:
            # Listed even past the cap, so a capped list never reads as complete.
            self.report.problems.append(
                Problem("warning", "more_problems", f"{self.dropped} more problem(s) not listed"))


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def render_report(report: GGUFReport):
    """A rich renderable for `loradeploy inspect`."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    status = Text("OK", style="bold green") if report.ok else Text("INVALID", style="bold red")
    info = Table(show_header=False, box=None, pad_edge=False)
    info.add_column(style="bold")
    info.add_column()
    ft = f"{report.file_type} ({report.file_type_name})" if report.file_type is not None else "-"
    rows = [
        ("file", report.path), ("status", status),
        ("size", f"{_human_bytes(report.size)} ({report.size} bytes)"),
        ("version", report.version), ("architecture", report.architecture), ("name", report.name),
        ("file type", ft), ("quant", report.quant), ("tensors", report.tensor_count),
        ("key/values", report.kv_count), ("parameters", f"{report.parameter_count:,}"),
        ("bits/weight", report.bits_per_weight), ("context length", report.context_length),
        ("chat template", "yes" if report.chat_template_present else "no"),
        ("alignment", report.alignment),
    ]
    if report.sha256:
        rows.append(("sha256", report.sha256))
    for label, value in rows:
        info.add_row(label, value if isinstance(value, Text) else ("-" if value is None else str(value)))
    parts: list[Any] = [info]
    if report.quant_mix:
        mix = Table(title="tensor types")
        for col in ("type", "tensors", "params", "bytes"):
            mix.add_column(col, justify="left" if col == "type" else "right")
        for tname, entry in report.quant_mix.items():
            mix.add_row(tname, str(entry["tensors"]), f"{entry['params']:,}", _human_bytes(entry["bytes"]))
        parts.append(mix)
    if report.problems:
        probs = Table(title="problems")
        probs.add_column("severity")
        probs.add_column("code")
        probs.add_column("message", overflow="fold")
        for p in report.problems:
            style = "red" if p.severity == "error" else "yellow"
            probs.add_row(Text(p.severity, style=style), p.code, p.message)
        parts.append(probs)
    return Group(*parts)
