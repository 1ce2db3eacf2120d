"""Rendering for the CLI: rich progress bars and tables. Only the CLI imports this."""
from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn)
from rich.table import Table

from .pipeline import PipelineResult, Reporter, StageOutcome

STATUS_STYLE = {"done": "green", "skipped": "cyan", "failed": "bold red", "unavailable": "yellow",
                "not_run": "dim", "planned": "magenta"}


class RichReporter(Reporter):
    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.bars = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[label]}"),
                                 TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True, disable=not enabled)
        self.tasks: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def stage_started(self, model: str, stage: str) -> None:
        with self.lock:
            key = (model, stage)
            if key not in self.tasks:
                self.tasks[key] = self.bars.add_task(stage, total=None, label=f"{model}/{stage}")

    def progress(self, model, stage, description, completed, total):
        with self.lock:
            key = (model, stage)
            if key not in self.tasks:
                self.tasks[key] = self.bars.add_task(description, total=None, label=f"{model}/{stage}")
            self.bars.update(self.tasks[key], description=description, completed=completed,
                                 total=total if total else None)

    def stage_finished(self, model: str, stage: str, outcome: StageOutcome) -> None:
        with self.lock:
            key = (model, stage)
            if key in self.tasks:
                self.bars.remove_task(self.tasks.pop(key))
        if not self.enabled:
            return
        style = STATUS_STYLE.get(outcome.status, "")
        extra = outcome.error or outcome.note or ""
        self.console.print(f"[{style}]{outcome.status:>9}[/] {model}/{stage} "
                           f"({outcome.seconds:.1f}s){' - ' + extra if extra else ''}")

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)


def summary_table(result: PipelineResult) -> Table:
    t = Table(title="loradeploy run" + (" (dry run)" if result.dry_run else ""), show_lines=False)
    for col, just in (("model", "left"), ("stage", "left"), ("status", "left"), ("seconds", "right"),
                      ("peak MiB", "right"), ("note", "left")):
        t.add_column(col, justify=just)
    for name, mo in result.models.items():
        for s, o in mo.stages.items():
            style = STATUS_STYLE.get(o.status, "")
            t.add_row(name, s, f"[{style}]{o.status}[/]", f"{o.seconds:.1f}", f"{o.peak_rss_mib:.0f}",
                      (o.error or o.note or "")[:120])
    return t


def artifacts_table(result: PipelineResult) -> Table:
    t = Table(title="artifacts")
    for col in ("model", "format", "size MiB", "path"):
        t.add_column(col)
    for name, mo in result.models.items():
        for a in mo.artifacts:
            t.add_row(name, a["format"] or "", f"{a['size'] / 2**20:.1f}", a["path"])
    return t
