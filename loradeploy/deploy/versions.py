"""Deployed versions on disk: the live one, timestamped backups, retention and rollback.

Layout (models_dir = deployment.models_dir, backups = deployment.backups_dir or models_dir/backups):

    models_dir/<model>/<version>/<model>_<version>-<format>.gguf + version.json
    models_dir/<model>/current -> <version>          (atomic symlink: the live version)
    models_dir/<model>/history.jsonl                 (one line per deploy / rollback)
    backups/<model>/<version>@<UTC timestamp>/...    (versions that were replaced)

A deploy places the new version next to the live one, switches every target to it, then moves
the replaced version into backups; rollback moves a backup back and does the same switch. The
GGUF is hard-linked from the pipeline's work folder when it can be (no extra disk), else copied.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import DeployError
from ..fsutil import atomic_output, atomic_symlink, atomic_write_text, remove_path

if TYPE_CHECKING:
    from ..config import Config

META = "version.json"
CURRENT = "current"


@dataclass
class Version:
    model: str
    version: str           # unique id: the configured version, or it plus a timestamp suffix
    base_version: str      # the configured version it came from
    format: str
    sha256: str
    file: str              # GGUF file name inside ``dir``
    deployed_at: float
    dir: Path = field(default=Path("."), compare=False)
    backed_up_at: Optional[float] = None
    # adapter mode: ``file`` is the LoRA GGUF, served on this base GGUF (shared by every adapter on it)
    mode: str = "merged"
    base_path: Optional[str] = None
    base_sha256: Optional[str] = None

    @property
    def path(self) -> Path:
        return self.dir / self.file

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("dir")
        return d


def _stamp(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f"{int(t * 1000) % 1000:03d}Z"


def model_dir(cfg: "Config", model: str) -> Path:
    return Path(cfg.deployment.models_dir) / model


def backups_dir(cfg: "Config", model: str) -> Path:
    root = cfg.deployment.backups_dir or Path(cfg.deployment.models_dir) / "backups"
    return Path(root) / model


def _load(d: Path) -> Version | None:
    try:
        data = json.loads((d / META).read_text())
        return Version(dir=d, **{k: data[k] for k in ("model", "version", "base_version", "format", "sha256",
                                                         "file", "deployed_at")},
                       backed_up_at=data.get("backed_up_at"), mode=data.get("mode", "merged"),
                       base_path=data.get("base_path"), base_sha256=data.get("base_sha256"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_meta(v: Version, d: Path) -> None:
    # atomic: a torn version.json would hide a backup from rollback
    atomic_write_text(d / META, json.dumps(v.meta(), indent=2))


def live_version(cfg: "Config", model: str) -> Version | None:
    link = model_dir(cfg, model) / CURRENT
    if not link.is_symlink():
        return None
    v = _load(model_dir(cfg, model) / os.readlink(link))
    return v if v is not None and v.path.is_file() and (v.base_path is None or Path(v.base_path).is_file()) else None


def backups(cfg: "Config", model: str) -> list[Version]:
    """Backed-up versions, newest first; folders without a readable version.json are skipped."""
    root = backups_dir(cfg, model)
    if not root.is_dir():
        return []
    found = [v for d in root.iterdir() if d.is_dir() and (v := _load(d)) is not None and v.path.is_file()]
    return sorted(found, key=lambda v: (v.backed_up_at or 0, v.dir.name), reverse=True)


def choose_id(cfg: "Config", model: str, base_version: str, sha256: str, base_sha256: Optional[str] = None) -> str:
    """The configured version name, unless that name already stands for other bytes: then the
    name plus a UTC timestamp. The same name and bytes as a known version reuse its id."""
    known = [v for v in [live_version(cfg, model), *backups(cfg, model),
                         _load(model_dir(cfg, model) / base_version)] if v is not None]
    for v in known:
        if v.base_version == base_version and v.sha256 == sha256 and v.base_sha256 == base_sha256:
            return v.version
    if any(v.version == base_version for v in known):
        return f"{base_version}-{_stamp()}"
    return base_version


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def place_base(cfg: "Config", src: Path, sha256: str, fmt: str) -> Path:
    """Adapter mode's base GGUF under models_dir/_bases/<sha256[:16]>/ (once per base, whatever
    the number of adapters on it), so cleaning the work folder never pulls it from under a server."""
    dst = Path(cfg.deployment.models_dir) / "_bases" / sha256[:16] / f"base-{fmt.lower()}.gguf"
    if dst.is_file():
        return dst
    try:
        with atomic_output(dst) as tmp:
            _link_or_copy(Path(src), tmp)
    except OSError as exc:
        raise DeployError(f"cannot place base {Path(src).name} in {dst.parent}: {exc.strerror or exc}",
                          hint="check deployment.models_dir is writable and has space") from None
    return dst


def place(cfg: "Config", model: str, src: Path, *, version: str, base_version: str, fmt: str,
          sha256: str, base: Optional[tuple[Path, str]] = None) -> Version:
    """Put ``src`` into models_dir/<model>/<version>/ (reused when it already holds these bytes).
    ``base`` (path, sha256): adapter mode, ``src`` is the LoRA GGUF applied to that base."""
    d = model_dir(cfg, model) / version
    existing = _load(d)
    base_sha = base[1] if base else None
    if existing is not None and existing.sha256 == sha256 and existing.path.is_file() and \
            existing.base_sha256 == base_sha:
        return existing
    extra = {}
    if base:
        extra = {"mode": "adapter", "base_path": str(place_base(cfg, base[0], base[1], fmt)), "base_sha256": base_sha}
    name = f"{model}_{version}-{'lora-on-' if base else ''}{fmt.lower()}.gguf"
    v = Version(model, version, base_version, fmt, sha256, name, time.time(), d, **extra)
    try:
        with atomic_output(d, is_dir=True) as tmp:
            _link_or_copy(Path(src), tmp / v.file)
            _write_meta(v, tmp)
    except OSError as exc:
        raise DeployError(f"cannot place {Path(src).name} in {d}: {exc.strerror or exc}",
                          hint="check deployment.models_dir is writable and has space") from None
    return v


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:  # another filesystem: copy then delete
        shutil.move(str(src), str(dst))


def to_backup(cfg: "Config", v: Version) -> Version:
    root = backups_dir(cfg, v.model)
    dest = root / f"{v.version}@{_stamp()}"
    while dest.exists():
        dest = root / f"{v.version}@{_stamp()}"
    _move(v.dir, dest)
    moved = Version(**{**v.meta(), "backed_up_at": time.time()}, dir=dest)
    _write_meta(moved, dest)
    return moved


def prune(cfg: "Config", model: str) -> list[str]:
    removed = []
    for old in backups(cfg, model)[cfg.deployment.keep_backups:]:
        remove_path(old.dir)
        removed.append(old.dir.name)
    return removed


def _history(cfg: "Config", model: str, event: dict) -> None:
    path = model_dir(cfg, model) / "history.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"at": time.time(), **event}) + "\n")


def commit(cfg: "Config", model: str, new: Version, *, event: str = "deploy") -> dict:
    """Make ``new`` live; the version it replaces goes to backups; old backups beyond retention go."""
    prev = live_version(cfg, model)
    atomic_symlink(new.version, model_dir(cfg, model) / CURRENT)
    backup = None
    if prev is not None and prev.version != new.version:
        backup = to_backup(cfg, prev)
    pruned = prune(cfg, model)
    _history(cfg, model, {"event": event, "version": new.version, "sha256": new.sha256, "format": new.format,
                          "previous": prev.version if prev else None})
    return {"previous": prev.version if prev else None, "backup": str(backup.dir) if backup else None,
            "pruned_backups": pruned}


def discard(cfg: "Config", v: Version) -> None:
    """Remove a placed version that never went live (its deploy failed)."""
    live = live_version(cfg, v.model)
    if live is None or live.dir != v.dir:
        remove_path(v.dir)


def find_backup(cfg: "Config", model: str, to_version: str | None) -> Version:
    found = backups(cfg, model)
    if to_version:
        found = [b for b in found if b.version == to_version or b.base_version == to_version]
    if not found:
        what = f"version {to_version} of model {model}" if to_version else f"model {model}"
        have = ", ".join(sorted({b.version for b in backups(cfg, model)})) or "none"
        raise DeployError(f"no backup of {what} to roll back to (backups: {have})",
                          hint="deploy a new version first; deployment.keep_backups controls how many are kept")
    return found[0]


def restore(cfg: "Config", b: Version, target: Path) -> Version:
    """Move backup ``b`` back under the model's folder as ``target`` (not yet live)."""
    _move(b.dir, target)
    restored = Version(**{**b.meta(), "backed_up_at": None}, dir=target)
    _write_meta(restored, target)
    return restored


def unrestore(b: Version, target: Path) -> None:
    """Undo restore() after a failed switch: the backup goes back where it was."""
    _move(target, b.dir)
    _write_meta(b, b.dir)
