"""Every on-disk location loradeploy uses, in one place: work folders, records, logs, servers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class ModelPaths:
    """A model's work folder: the fetched adapter, the merged folder, its GGUFs."""

    work: Path
    model: str
    version: str

    @classmethod
    def of(cls, cfg: "Config", model: str) -> "ModelPaths":
        return cls(Path(cfg.pipeline.work_dir) / model, model, cfg.models[model].version)

    @property
    def adapter(self) -> Path:
        return self.work / "adapter"

    @property
    def merged(self) -> Path:
        return self.work / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.work / "gguf"

    def gguf(self, fmt: str) -> Path:
        return self.gguf_dir / f"{self.model}_{self.version}-{fmt.lower()}.gguf"


def record_path(state_dir: Path, model: str) -> Path:
    """The model's run record."""
    return Path(state_dir) / "runs" / f"{model}.json"


def stage_log_path(log_dir: Path, model: str, stage: str) -> Path:
    return Path(log_dir) / model / f"{stage}.log"


def server_log_path(cfg: "Config", model: str) -> Path:
    return Path(cfg.logging.log_dir) / model / "server.log"


def servers_dir(cfg: "Config", model: str) -> Path:
    """Config files, control file and exit records of a model's server processes."""
    return Path(cfg.pipeline.state_dir) / "servers" / model
