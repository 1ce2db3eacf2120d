"""A local adapter folder is used in place: checked, never copied."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import FetchError, InputError
from .plan import ALLOWED, PICKLE_WEIGHTS, REQUIRED


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def validate_local(folder: Path) -> list[Path]:
    """Check a local adapter folder in place; return the files the pipeline will read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"adapter folder {folder} not found", hint="check the model's adapter path")
    root = folder.resolve()
    files = []
    for name in ALLOWED:
        p = folder / name
        if p.is_symlink() and not _inside(p, root):
            raise FetchError(f"refusing {p}: symlink leads outside the adapter folder ({os.path.realpath(p)})")
        if p.exists():
            if not p.is_file():
                raise InputError(f"{p} is not a regular file")
            files.append(p)
    missing = [n for n in REQUIRED if not (folder / n).is_file()]
    if "adapter_model.safetensors" in missing and any((folder / b).exists() for b in PICKLE_WEIGHTS):
        raise FetchError(f"refusing pickle weights in {folder} (adapter_model.bin): they can run code when loaded",
                         hint="save the adapter with safe_serialization=True (adapter_model.safetensors)")
    if missing:
        raise InputError(f"adapter folder {folder} lacks {', '.join(missing)}")
    return files
