"""What each served port bounds, from the config (``deployment.llamacpp``): ``proxy_limits(cfg)``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .control import Limits

if TYPE_CHECKING:
    from ..config import Config

MIB = 1024 * 1024


def proxy_limits(cfg: "Config") -> Limits:
    s = cfg.deployment.llamacpp
    return Limits(max_body=int(s.max_body_mb * MIB), max_connections=s.max_connections,
                  head_timeout_s=float(s.head_timeout_s), body_timeout_s=float(s.body_timeout_s),
                  idle_timeout_s=float(s.idle_timeout_s), backend_timeout_s=float(s.backend_timeout_s))
