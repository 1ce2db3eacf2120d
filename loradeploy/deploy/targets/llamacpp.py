"""The embedded target: a llama.cpp server on the model's port (its own, or in adapter mode the shared
server of its base)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ... import serving
from ...serving.launch import settings_hash
from ...serving.proxying import conf_is_current
from ...serving.shared import switch_adapter
from ...serving.switch import switch

if TYPE_CHECKING:
    from ...config import Config
    from ..versions import Version


def serve_version(cfg: "Config", model: str, v: "Version",
                  progress: Optional[Callable[[str, float, float], None]] = None) -> dict:
    """Make the model's port serve version ``v``: its own server (merged), or its adapter on the
    shared server of its base (adapter mode)."""
    if v.mode == "adapter":
        return switch_adapter(cfg, model, lora=v.path, lora_sha=v.sha256, version=v.version, fmt=v.format,
                              base=Path(v.base_path), base_sha=v.base_sha256, progress=progress)
    return switch(cfg, model, gguf=v.path, version=v.version, fmt=v.format, sha256=v.sha256, progress=progress)


class LlamaCppTarget:
    name = "llamacpp"

    def deploy(self, cfg: "Config", model: str, version: "Version",
               progress: Callable[[str, float, float], None] | None = None) -> dict:
        return serve_version(cfg, model, version, progress=progress)

    def check(self, cfg: "Config", model: str, sha256: str) -> tuple[bool, str]:
        entry = serving.registry_entry(cfg, model)
        state, why = serving.model_state(cfg, model, entry or {})
        if state != "running":
            return False, f"server {state} ({why})"
        if entry.get("sha256") != sha256:
            return False, "the server runs another GGUF"
        if entry.get("settings_hash") != settings_hash(cfg, model):
            return False, "server settings changed"
        if not conf_is_current(cfg, model):
            return False, "the port's api key or limits changed"
        return True, "serving"
