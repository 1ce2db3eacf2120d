"""The deploy library API: a GGUF becomes a new version live on every target (deploy_file, what the
deploy stage of `loradeploy run` / `loradeploy deploy` calls); rollback; serve start.

Built on serving/ (processes, ports, switch) and on versions + targets in this package.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from ..errors import DeployError, InputError
from ..fsutil import remove_path, sha256_file
from ..gguf import check_gguf
from ..serving import record
from ..serving.registry import model_names
from ..state import ModelLock
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

    The library entry of `loradeploy deploy` and `run` alike: the deploy stage calls it (after the
    verify gate) with the pipeline's model lock held. A failed target leaves the previous version
    serving and the new one discarded.
    """
    cfg.model(model)
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"GGUF {gguf} does not exist", hint="run the quantize stage or give an existing file")
    report = check_gguf(gguf)
    if base is not None:
        from ..lora import lora_gguf_info

        if lora_gguf_info(gguf).get("adapter_type") != "lora":
            raise InputError(f"model {model} is in adapter mode, and {gguf} is not a LoRA GGUF",
                             hint="give the LoRA GGUF (convert_lora_to_gguf.py output)")
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


def _recorded_version(m: "record.ServedModel") -> Optional[versions.Version]:
    """What the record says a model served, as a version (its files outlived the models folder)."""
    gguf = Path(m.gguf)
    if not gguf.is_file():
        return None
    return versions.Version(m.model, m.version, m.version, m.format, m.sha256, gguf.name, 0.0, gguf.parent,
                            mode=m.mode, base_path=m.base_gguf, base_sha256=m.base_sha256)


def serve_start(cfg: "Config", models: Optional[Sequence[str]] = None) -> list[dict]:
    """Start (or leave running) the server of each model's live deployed version."""
    out = []
    for name in model_names(cfg, models, registered=False):
        with ModelLock(cfg.pipeline.state_dir, name, purpose="serve start"):
            m = record.entry(cfg, name)
            live = versions.live_version(cfg, name) or (_recorded_version(m) if m else None)
            if live is None:
                raise DeployError(f"model {name} has no deployed version to serve",
                                  hint=f"run `loradeploy run --model {name}` or `loradeploy deploy --model {name}`")
            if m is not None and m.state == "stopped":
                record.change_model(cfg, name, state="starting")
            info = serve_version(cfg, name, live)
            out.append({"model": name, "version": live.version, **info})
    return out
