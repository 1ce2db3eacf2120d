"""How a model's port is served, as one interface with one implementation per serving mode:

* ``merged`` (serving.switch.MergedStrategy): the model's own backend holds its merged GGUF;
* ``adapter`` (serving.shared.AdapterStrategy): one llama-server per base holds every adapter on it, each
  port's proxy forcing its own ``lora`` selection.

The deploy target, serve start/stop and status take the strategy a model's mode names
(``strategy_for(mode)``) and never branch on the mode themselves. To add a serving mode: a class with
``mode``, ``switch``, ``stop`` and ``release``, registered in ``STRATEGIES`` (and in control.MODES, the
modes the records accept).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from ..errors import ConfigError
from ..paths import server_log_path
from ..tools import proc
from .launch import last_lines
from .proxying import serving_sha
from .record import Registry, ServedModel
from .registry import ended_how

if TYPE_CHECKING:
    from ..config import Config

Progress = Callable[[str, float, float], None]


@dataclass(frozen=True)
class Offer:
    """What a model's port is to serve: a version's GGUF (merged), or its LoRA GGUF on a base (adapter)."""
    version: str
    format: str
    gguf: Path
    sha256: str
    base_gguf: Optional[Path] = None
    base_sha256: Optional[str] = None


class Strategy(Protocol):
    mode: str

    def switch(self, cfg: "Config", model: str, offer: Offer, progress: Optional[Progress] = None) -> dict:
        """Serve ``offer`` on the model's port with no failed request; the caller holds the model lock."""

    def stop(self, cfg: "Config", model: str, m: ServedModel) -> dict:
        """Stop what serves ``model`` (its record stays, state stopped, for serve start)."""

    def release(self, cfg: "Config", model: str, m: ServedModel, keep_pid: int, ports: list[tuple[str, int]]) -> None:
        """``model`` moves to another strategy's backend (pid ``keep_pid``, already serving on ``ports``):
        what this strategy ran for it goes, once those ports have no request in flight to it."""


STRATEGIES: dict[str, str] = {
    "merged": "loradeploy.serving.switch:MergedStrategy",
    "adapter": "loradeploy.serving.shared:AdapterStrategy",
}


def strategy_for(mode: str) -> Strategy:
    try:
        mod, _, cls = STRATEGIES[mode].partition(":")
    except KeyError:
        raise ConfigError(f"unknown serving mode {mode!r}", hint=f"known modes: {', '.join(STRATEGIES)}") from None
    return getattr(importlib.import_module(mod), cls)()


def leave_previous(cfg: "Config", model: str, was: Optional[ServedModel], mode: str, group: Optional[str],
                   keep_pid: int, ports: list[tuple[str, int]]) -> None:
    """After a switch: what served ``model`` before under another strategy (or another shared group) goes."""
    if was is not None and (was.mode != mode or was.group != group):
        strategy_for(was.mode).release(cfg, model, was, keep_pid, ports)


def model_state(cfg: "Config", reg: Registry, model: str) -> tuple[str, str]:
    """(state, why): running | unreachable | dead | stopped | not deployed."""
    m = reg.models.get(model)
    if m is None:
        return "not deployed", "no server recorded for this model"
    if m.state == "stopped":
        return "stopped", "stopped by loradeploy serve stop"
    backend = reg.backend_of(m)
    proxy_ok, backend_ok = proc.alive(m.proxy), proc.alive(backend)
    if not proxy_ok or not backend_ok:
        gone = [n for n, ok in (("proxy", proxy_ok), ("server", backend_ok)) if not ok]
        why = f"{' and '.join(gone)} process gone"
        if not backend_ok and backend is not None:
            how = ended_how(backend)
            if how:
                why += f" (server {how} in CPU mode {backend.cpu_mode.mode if backend.cpu_mode else '?'})"
            why += f"; last log lines: {last_lines(Path(m.log or server_log_path(cfg, model)), 0)}"
        return "dead", why
    sha = serving_sha(cfg, m)
    if sha is None:
        return "unreachable", f"port {m.port} does not answer"
    if sha != m.sha256:
        return "unreachable", f"port {m.port} serves sha256 {sha[:12]}, not the recorded one"
    return "running", "serving the recorded GGUF"
