"""What every executor shares: which stages are heavy, and what running one stage gives back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config.sections import HEAVY_STAGES
from ..errors import LoradeployError
from ..stages.base import StageResult

# The stages worth sending to another machine: each needs gigabytes of RAM, many cores or a GPU.
# fetch, deploy, health and evaluate touch this machine's network, servers and ports: they stay here.
HEAVY = HEAVY_STAGES


class ExecutorError(LoradeployError):
    """The executor could not run a stage (cluster unreachable, a task lost, an artifact not visible)."""


@dataclass
class Ran:
    """One stage run: its result, and, when it ran elsewhere, the memory it took there and a note."""

    result: StageResult
    peak_rss_mib: Optional[float] = None   # None: measure this process (the local executor)
    start_rss_mib: Optional[float] = None
    note: Optional[str] = None
