"""Every on-disk location loradeploy uses, in one place: work folders, records, logs, servers."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class ModelPaths:
    """A model's work folder: the fetched adapter, the merged folder, its GGUFs."""

    work: Path
    model: str
    version: str
    # adapter mode: the base's GGUFs (F16 and each quant) are shared by every model on that base
    shared_base: Optional[Path] = None

    @classmethod
    def of(cls, cfg: "Config", model: str) -> "ModelPaths":
        shared = None
        if cfg.mode_for(model) == "adapter":
            shared = shared_base_dir(Path(cfg.pipeline.work_dir), cfg.models[model].base_model)
        return cls(Path(cfg.pipeline.work_dir) / model, model, cfg.models[model].version, shared)

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
        """The model's GGUF of ``fmt``; in adapter mode the shared base's."""
        if self.shared_base is not None:
            return self.shared_base / f"base-{fmt.lower()}.gguf"
        return self.gguf_dir / f"{self.model}_{self.version}-{fmt.lower()}.gguf"

    @property
    def lora(self) -> Path:
        """Adapter mode: the model's adapter as a LoRA GGUF (llama.cpp's convert_lora_to_gguf.py)."""
        return self.gguf_dir / f"{self.model}_{self.version}-lora-f16.gguf"


def shared_base_dir(work_dir: Path, base_model: str) -> Path:
    """Adapter mode: work_dir/_bases/<id>/, one folder per base model (by its configured name)."""
    return Path(work_dir) / "_bases" / hashlib.sha256(base_model.encode()).hexdigest()[:12]


def record_path(state_dir: Path, model: str) -> Path:
    """The model's run record."""
    return Path(state_dir) / "runs" / f"{model}.json"


def stage_log_path(log_dir: Path, model: str, stage: str) -> Path:
    return Path(log_dir) / model / f"{stage}.log"


def server_log_path(cfg: "Config", model: str) -> Path:
    return Path(cfg.logging.log_dir) / model / "server.log"


def group_dir(cfg: "Config", key: str) -> Path:
    """Config, log and lock of the shared llama-server of one base (adapter mode; key: serving.shared)."""
    return Path(cfg.pipeline.state_dir) / "servers" / f"_base-{key}"


def servers_dir(cfg: "Config", model: str) -> Path:
    """Config files, control file and exit records of a model's server processes."""
    return Path(cfg.pipeline.state_dir) / "servers" / model
