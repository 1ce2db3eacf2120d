"""The embedded target: a llama.cpp server on the model's port, served by the strategy of the version's
mode (serving.strategy: its own server when merged, the shared server of its base in adapter mode)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ...serving import Offer, model_state, record, strategy_for
from ...serving.launch import settings_hash
from ...serving.proxying import conf_is_current

if TYPE_CHECKING:
    from ...config import Config
    from ..versions import Version


def serve_version(cfg: "Config", model: str, v: "Version",
                  progress: Optional[Callable[[str, float, float], None]] = None) -> dict:
    """Make the model's port serve version ``v`` (the caller holds the model's lock)."""
    offer = Offer(v.version, v.format, v.path, v.sha256, Path(v.base_path) if v.base_path else None, v.base_sha256)
    return strategy_for(v.mode).switch(cfg, model, offer, progress)


class LlamaCppTarget:
    name = "llamacpp"

    def deploy(self, cfg: "Config", model: str, version: "Version",
               progress: Callable[[str, float, float], None] | None = None) -> dict:
        return serve_version(cfg, model, version, progress=progress)

    def check(self, cfg: "Config", model: str, sha256: str) -> tuple[bool, str]:
        reg = record.load(cfg)
        state, why = model_state(cfg, reg, model)
        if state != "running":
            return False, f"server {state} ({why})"
        m = reg.models[model]
        if m.sha256 != sha256:
            return False, "the server runs another GGUF"
        if m.settings_hash != settings_hash(cfg, model):
            return False, "server settings changed"
        if not conf_is_current(cfg, model):
            return False, "the port's api key or limits changed"
        return True, "serving"
