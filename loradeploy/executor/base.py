"""What every executor shares: which stages are heavy, and what running one stage gives back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..stagespec import HEAVY  # noqa: F401  (re-exported: the executors' one question)
from ..errors import LoradeployError
from ..stages.base import StageResult


class ExecutorError(LoradeployError):
    """The executor could not run a stage (cluster unreachable, a task lost, an artifact not visible)."""


@dataclass
class Ran:
    """One stage run: its result, and, when it ran elsewhere, the memory it took there and a note."""

    result: StageResult
    peak_rss_mib: Optional[float] = None   # None: measure this process (the local executor)
    start_rss_mib: Optional[float] = None
    note: Optional[str] = None
