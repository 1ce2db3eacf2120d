"""What each served port bounds, from the config (``deployment.llamacpp``): ``proxy_limits(cfg)``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .control import Limits

if TYPE_CHECKING:
    from ..config import Config


def proxy_limits(cfg: "Config") -> Limits:
    return Limits()
