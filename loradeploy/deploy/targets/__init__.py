"""Deploy targets: name -> "module:Class", imported on use.

A target takes a placed version (versions.Version) live: ``deploy(cfg, model, version, progress=)``
returns a JSON-able info dict or raises DeployError / ResourceError; ``check(cfg, model, sha256)``
says whether it still serves those bytes (used to decide whether a deploy stage is current).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

from ...errors import ConfigError

if TYPE_CHECKING:
    from ...config import Config
    from ..versions import Version

REGISTRY: dict[str, str] = {
    "llamacpp": "loradeploy.deploy.targets.llamacpp:LlamaCppTarget",
    "lmstudio": "loradeploy.deploy.targets.lmstudio:LMStudioTarget",
    "ollama": "loradeploy.deploy.targets.ollama:OllamaTarget",
}
# The target that can fail a readiness probe goes first, so a failure leaves the others untouched.
ORDER = ("llamacpp", "lmstudio", "ollama")


def get(name: str):
    try:
        mod_name, _, cls_name = REGISTRY[name].partition(":")
    except KeyError:
        raise ConfigError(f"unknown deploy target {name!r}", hint=f"known targets: {', '.join(REGISTRY)}") from None
    return getattr(importlib.import_module(mod_name), cls_name)()


def ordered(names) -> list[str]:
    return sorted(dict.fromkeys(names), key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


def deploy_targets(cfg: "Config", model: str, version: "Version",
                   progress: Callable[[str, float, float], None] | None = None) -> dict[str, dict]:
    return {name: get(name).deploy(cfg, model, version, progress=progress)
            for name in ordered(cfg.deployment.targets)}


def check_targets(cfg: "Config", model: str, sha256: str) -> tuple[bool, str]:
    for name in ordered(cfg.deployment.targets):
        ok, why = get(name).check(cfg, model, sha256)
        if not ok:
            return False, f"{name}: {why}"
    return True, "every target serves the deployed GGUF"
