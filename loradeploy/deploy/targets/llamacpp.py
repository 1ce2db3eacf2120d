"""The embedded target: llama-cpp-python's OpenAI-compatible server on the model's port."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ... import serving
from ...serving.launch import settings_hash

if TYPE_CHECKING:
    from ...config import Config
    from ..versions import Version


class LlamaCppTarget:
    name = "llamacpp"

    def deploy(self, cfg: "Config", model: str, version: "Version",
               progress: Callable[[str, float, float], None] | None = None) -> dict:
        return serving.switch.switch(cfg, model, gguf=version.path, version=version.version, fmt=version.format,
                            sha256=version.sha256, progress=progress)

    def check(self, cfg: "Config", model: str, sha256: str) -> tuple[bool, str]:
        entry = serving.registry_entry(cfg, model)
        state, why = serving.model_state(cfg, model, entry or {})
        if state != "running":
            return False, f"server {state} ({why})"
        if entry.get("sha256") != sha256:
            return False, "the server runs another GGUF"
        if entry.get("settings_hash") != settings_hash(cfg, model):
            return False, "server settings changed"
        return True, "serving"
