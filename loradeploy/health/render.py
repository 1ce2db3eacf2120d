"""The health report as rich tables: one per model, one for the machine, then the verdict."""
from __future__ import annotations

from typing import Any, Sequence

from .check import HealthReport, exit_code
from .results import DEGRADED, FAIL, HEALTHY, PASS, SKIP, UNHEALTHY, WARN, Check, verdict

_STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim",
          HEALTHY: "bold green", DEGRADED: "bold yellow", UNHEALTHY: "bold red"}


def _table(title, checks: Sequence[Check]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    table.add_column("remedy", overflow="fold", style="dim")
    for c in checks:
        table.add_row(c.name, Text(c.status.upper(), style=_STYLE[c.status]), c.detail, c.remedy)
    return table


def render(report: HealthReport):
    """A rich renderable: one table per model, one for the machine, then the verdict."""
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = []
    for key, m in report.models.items():
        title = Text.assemble((key, "bold"), f" {m.version or ''} {m.format or ''} {m.base_url or ''} ",
                              (m.status.upper(), _STYLE[m.status]))
        parts.append(_table(title, m.checks))
    parts.append(_table(Text.assemble(("system ", "bold"), (verdict(report.system).upper(),
                                                             _STYLE[verdict(report.system)])), report.system))
    parts.append(Text.assemble("overall: ", (report.status.upper(), _STYLE[report.status]),
                               f" (exit code {exit_code(report)}, {report.seconds:.1f}s)"))
    return Group(*parts)
