"""The deploy library API: a GGUF becomes a new version live on every target; rollback; serve start.

Built on serving/ (processes, ports, switch) and on versions + targets in this package.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from ..errors import DeployError, InputError
from ..fsutil import remove_path, sha256_file
from ..gguf import check_gguf
from ..serving import registry_entry
from ..serving.registry import model_names, update_entry
from ..state import ModelLock, RunRecord
from . import versions
from .targets import deploy_targets
from .targets.llamacpp import serve_version

if TYPE_CHECKING:
    from ..config import Config

Progress = Callable[[str, float, float], None]


def deploy_file(cfg: "Config", model: str, gguf: Path, *, fmt: Optional[str] = None, sha256: Optional[str] = None,
                base: Optional[tuple[Path, str]] = None, progress: Optional[Progress] = None, log=None) -> dict:
    """Validate, place as a version, switch every target, then back up what it replaced.

    ``base`` (GGUF path, sha256): adapter mode; ``gguf`` is then the LoRA GGUF served on that base.

    The caller holds the model's lock (the pipeline's run lock, or deploy_model's own). A failed
    target leaves the previous version serving and the new one discarded.
    """
    cfg.model(model)
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"GGUF {gguf} does not exist", hint="run the quantize stage or give an existing file")
    report = check_gguf(gguf)
    if base is not None:
        report = check_gguf(base[0])  # the served format is the base's
    fmt = fmt or report.quant or report.file_type_name or "unknown"
    sha256 = sha256 or sha256_file(gguf)
    base_version = cfg.models[model].version
    version_id = versions.choose_id(cfg, model, base_version, sha256, base[1] if base else None)
    was_live = versions.live_version(cfg, model)
    version = versions.place(cfg, model, gguf, version=version_id, base_version=base_version, fmt=fmt, sha256=sha256,
                             base=base)
    if log:
        log.info("deploying %s %s (%s, sha256 %s) to %s", model, version.version, fmt, sha256[:12],
                 ", ".join(cfg.deployment.targets))
    try:
        results = deploy_targets(cfg, model, version, progress=progress)
    except BaseException:
        if was_live is None or was_live.dir != version.dir:
            versions.discard(cfg, version)
        raise
    info = versions.commit(cfg, model, version)
    if log:
        log.info("%s %s is live; previous %s backed up to %s", model, version.version, info["previous"],
                 info["backup"])
    return {"model": model, "version": version.version, "format": fmt, "sha256": sha256,
            "path": str(version.path), "targets": results, **info}


def recorded_gguf(cfg: "Config", model: str):
    """The served-format GGUF the model's last quantize (or convert) run recorded."""

    fmt = cfg.serve_format_for(model)
    rec = RunRecord.load(cfg.pipeline.state_dir, model)
    for stage in ("quantize", "convert"):
        art = next(iter(rec.artifacts(stage, "gguf", fmt)), None)
        if art is not None and Path(art.path).is_file():
            return art
    raise InputError(f"model {model} has no {fmt} GGUF from a quantize run",
                     hint=f"run `loradeploy run --model {model}` first")


def deploy_model(cfg: "Config", model: str, *, gguf: Path | str | None = None,
                 progress: Optional[Progress] = None) -> dict:
    """Library entry for `loradeploy deploy`: takes the model lock, then deploy_file."""
    cfg.model(model)
    with ModelLock(cfg.pipeline.state_dir, model, purpose="deploy"):
        if cfg.mode_for(model) == "adapter":
            return _deploy_adapter(cfg, model, gguf, progress)
        if gguf is not None:
            return deploy_file(cfg, model, Path(gguf), progress=progress)
        art = recorded_gguf(cfg, model)
        return deploy_file(cfg, model, Path(art.path), fmt=art.format, sha256=art.sha256 if art.intact() else None,
                           progress=progress)


def _deploy_adapter(cfg: "Config", model: str, lora: Path | str | None, progress: Optional[Progress]) -> dict:
    """Adapter mode: ``lora`` (default: the recorded LoRA GGUF) on the recorded quantized base."""
    from ..lora import lora_gguf_info

    base = recorded_gguf(cfg, model)
    if lora is None:
        rec = RunRecord.load(cfg.pipeline.state_dir, model)
        art = next((a for a in rec.artifacts("convert", "lora") if Path(a.path).is_file()), None)
        if art is None:
            raise InputError(f"model {model} is in adapter mode and has no LoRA GGUF from a convert run",
                             hint=f"run `loradeploy run --model {model}` first")
        lora, sha = Path(art.path), art.sha256 if art.intact() else None
    else:
        lora, sha = Path(lora), None
        if not lora.is_file() or lora_gguf_info(lora).get("adapter_type") != "lora":
            raise InputError(f"model {model} is in adapter mode, and {lora} is not a LoRA GGUF",
                             hint="give the LoRA GGUF (convert_lora_to_gguf.py output) or omit --gguf")
    base_sha = base.sha256 if base.intact() else sha256_file(Path(base.path))
    return deploy_file(cfg, model, lora, fmt=base.format, sha256=sha, base=(Path(base.path), base_sha),
                       progress=progress)


def rollback(cfg: "Config", model: str, to_version: str | None = None,
             progress: Optional[Progress] = None) -> dict:
    """Restore the newest backup (of ``to_version`` when given) and switch every target to it."""
    cfg.model(model)
    with ModelLock(cfg.pipeline.state_dir, model, purpose="rollback"):
        b = versions.find_backup(cfg, model, to_version)
        live = versions.live_version(cfg, model)
        if live is not None and live.sha256 == b.sha256:
            raise DeployError(f"model {model} already serves {b.version} (sha256 {b.sha256[:12]})",
                              hint="name another version with --to")
        check_gguf(b.path)
        target = versions.model_dir(cfg, model) / b.version
        if target.exists():
            if live is not None and live.dir == target:
                raise DeployError(f"version {b.version} of model {model} is live under other bytes")
            remove_path(target)  # leftover of a failed deploy
        restored = versions.restore(cfg, b, target)
        try:
            results = deploy_targets(cfg, model, restored, progress=progress)
        except BaseException:
            versions.unrestore(b, target)
            raise
        info = versions.commit(cfg, model, restored, event="rollback")
    return {"model": model, "version": restored.version, "format": restored.format, "sha256": restored.sha256,
            "path": str(restored.path), "targets": results, **info}


def serve_start(cfg: "Config", models: Optional[Sequence[str]] = None) -> list[dict]:
    """Start (or leave running) the server of each model's live deployed version."""
    out = []
    for name in model_names(cfg, models, registered=False):
        with ModelLock(cfg.pipeline.state_dir, name, purpose="serve start"):
            entry = registry_entry(cfg, name)
            live = versions.live_version(cfg, name)
            if live is None and entry and entry.get("gguf") and Path(entry["gguf"]).is_file():
                live = versions.Version(name, entry["version"], entry["version"], entry["format"], entry["sha256"],
                                        Path(entry["gguf"]).name, 0.0, Path(entry["gguf"]).parent,
                                        mode=entry.get("mode") or "merged", base_path=entry.get("base_gguf"),
                                        base_sha256=entry.get("base_sha256"))
            if live is None:
                raise DeployError(f"model {name} has no deployed version to serve",
                                  hint=f"run `loradeploy run --model {name}` or `loradeploy deploy --model {name}`")
            if entry and entry.get("state") == "stopped":
                update_entry(cfg, name, state="starting")
            info = serve_version(cfg, name, live)
            out.append({"model": name, "version": live.version, **info})
    return out
