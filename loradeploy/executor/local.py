"""The local executor: every stage runs in this process, one model's heavy stages at a time."""
from __future__ import annotations

from ..config import Config
from ..stages.base import StageContext
from .base import Ran


class LocalExecutor:
    name = "local"

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg

    def run_config(self, cfg: Config) -> Config:
        return cfg

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def packs(self, phase: tuple[str, ...]) -> bool:
        """Models side by side in this phase? Never here: two merges on one machine compete for RAM."""
        return False

    def run(self, stage: str, obj, ctx: StageContext) -> Ran:
        return Ran(obj.run(ctx))
