"""Counts kept as a dataclass of int fields: bumped by name, summed field by field, reported as a dict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Tally:
    """Base of a dataclass whose fields are all int counts (declared by the subclass, default 0)."""

    def bump(self, name: str, n: int = 1) -> None:
        setattr(self, name, getattr(self, name) + n)

    def add(self, other: Tally) -> None:
        for f in fields(self):
            self.bump(f.name, getattr(other, f.name))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
