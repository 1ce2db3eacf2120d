"""`loradeploy logs`: tail and follow a model's logs."""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Iterator

from .config import STAGES, Config
from .errors import InputError


def log_file_for(cfg: Config, model: str, stage: str | None) -> Path:
    cfg.model(model)
    if stage is None:
        return Path(cfg.logging.log_dir) / "pipeline.log"
    if stage not in (*STAGES, "server"):
        raise InputError(f"unknown stage {stage!r}", hint=f"stages: {', '.join(STAGES)}, server")
    path = Path(cfg.logging.log_dir) / model / f"{stage}.log"
    if not path.exists():
        raise InputError(f"no {stage} log for {model} yet ({path})", hint="run the stage first")
    return path


def tail_lines(path: Path, n: int, *, model: str | None = None) -> str:
    if not path.exists():
        raise InputError(f"no log yet at {path}", hint="run the pipeline first")
    keep: deque[str] = deque(maxlen=n)
    with open(path, errors="replace") as f:
        for line in f:
            if model is None or f"loradeploy.{model}." in line or f" {model}" in line:
                keep.append(line)
    return "".join(keep)


def follow_file(path: Path, poll: float = 0.5) -> Iterator[str]:
    with open(path, errors="replace") as f:
        f.seek(0, 2)
        while True:
            chunk = f.read()
            if chunk:
                yield chunk
            else:
                time.sleep(poll)
