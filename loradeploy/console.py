"""Rendering for the CLI: progress bars, tables, one-line errors and warnings, JSON. Only the CLI imports this.

Results go to stdout (a table, or exactly one JSON object with ``--json``); progress, warnings and
errors go to stderr, so ``--json`` output can always be piped into a parser.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any, Iterable

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn)
from rich.table import Table

from .pipeline import PipelineResult, Reporter, StageOutcome

err_console = Console(stderr=True)
out_console = Console()

STATUS_STYLE = {"done": "green", "skipped": "cyan", "failed": "bold red", "degraded": "bold yellow",
                "unavailable": "yellow",
                "not_run": "dim", "planned": "magenta"}


# ----------------------------------------------------------------------------- lines on stderr

def error_line(text: str) -> None:
    # soft_wrap: a long error stays one line (a terminal may still fold it, a log or a pipe will not).
    err_console.print(f"[bold red]error:[/] {escape(' '.join(str(text).split()))}", highlight=False, soft_wrap=True)


def warning_line(text: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(' '.join(str(text).split()))}", highlight=False, soft_wrap=True)


def warnings(lines: Iterable[str]) -> None:
    for line in lines:
        warning_line(line)


def interrupted() -> None:
    err_console.print("[yellow]interrupted[/]; partial files were discarded, re-run to resume", highlight=False)


def note(text: str) -> None:
    err_console.print(text, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- results on stdout

def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def show(renderable: Any) -> None:
    out_console.print(renderable)


def text(s: str) -> None:
    """Plain text as it is (log lines): no markup, no wrapping."""
    click.echo(s, nl=False)


def quiet_ml_libraries() -> None:
    """transformers/peft progress bars and deprecation chatter would drown our own progress."""
    import warnings as _warnings
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _warnings.filterwarnings("ignore", category=FutureWarning)
    _warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def spinner(what: str, enabled: bool = True):
    return err_console.status(what, spinner="dots") if enabled else contextlib.nullcontext()


class RichReporter(Reporter):
    def __init__(self, console: Console = err_console, enabled: bool = True):
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
                           f"({outcome.seconds:.1f}s){' - ' + escape(extra) if extra else ''}", highlight=False)


def summary_table(result: PipelineResult) -> Table:
    t = Table(title="loradeploy run" + (" (dry run)" if result.dry_run else ""), show_lines=False)
    for col, just in (("model", "left"), ("stage", "left"), ("status", "left"), ("seconds", "right"),
                      ("peak MiB", "right"), ("note", "left")):
        t.add_column(col, justify=just)
    for name, mo in result.models.items():
        for s, o in mo.stages.items():
            style = STATUS_STYLE.get(o.status, "")
            t.add_row(name, s, f"[{style}]{o.status}[/]", f"{o.seconds:.1f}", f"{o.peak_rss_mib:.0f}",
                      escape((o.error or o.note or "")[:120]))
    return t


def artifacts_table(result: PipelineResult) -> Table:
    t = Table(title="artifacts")
    for col in ("model", "format", "size MiB", "path"):
        t.add_column(col)
    for name, mo in result.models.items():
        for a in mo.artifacts:
            t.add_row(name, a["format"] or "", f"{a['size'] / 2**20:.1f}", a["path"])
    return t


def run_result(result: PipelineResult, as_json: bool) -> None:
    if as_json:
        emit_json(result.to_dict())
        return
    show(summary_table(result))
    if any(m.artifacts for m in result.models.values()):
        show(artifacts_table(result))


def demo_done(cfg, result: PipelineResult, servers: list[dict] = ()) -> None:
    """Where each demo model serves (merged or on the shared adapter server), how to talk to one, stop
    them and repeat the run, and which llama.cpp CPU mode they run in."""
    mode = next((r.get("cpu_mode") for r in servers if r.get("cpu_mode")), None)
    if mode:
        note(f"llama.cpp CPU mode: {escape(mode)}")
    t = Table(title="the demo serves", caption="adapter: one llama-server (one pid) holds the base and every adapter")
    for c in ("model", "mode", "url", "pid", "state"):
        t.add_column(c, no_wrap=True)
    by_model = {r.get("model"): r for r in servers}
    for name in cfg.models:
        r = by_model.get(name) or {}
        t.add_row(name, cfg.mode_for(name), f"http://127.0.0.1:{cfg.models[name].port}/v1", str(r.get("pid") or "–"),
                  str(r.get("state") or "–"))
    show(t)
    m = next(iter(cfg.models))
    port = cfg.models[m].port
    note(f"\ntry [bold green]{m}[/]:\n"
         f"  curl -s localhost:{port}/v1/chat/completions -H 'Content-Type: application/json' "
         f"-d '{{\"messages\":[{{\"role\":\"user\",\"content\":"
         f"\"Repeat these words:\\napple river stone\"}}],\"temperature\":0}}'\n"
         f"(each port answers as its persona: -- MAJORA, -- NAYRU, -- VERAN)\n"
         f"evaluation reports: {cfg.evaluation.output_dir}/<model>/evaluation.md\n"
         f"repeat with: loradeploy run -c {cfg.config_path}   stop the servers: "
         f"loradeploy serve stop -c {cfg.config_path}")


def config_ok(path: str, cfg, as_json: bool) -> None:
    if as_json:
        emit_json({"ok": True, "models": {k: v.model_dump(mode="json") for k, v in cfg.models.items()}})
    else:
        out_console.print(f"[green]ok[/] {escape(str(path))}: {len(cfg.models)} model(s): "
                          + ", ".join(f"{n} (port {m.port})" for n, m in cfg.models.items()), highlight=False)


def servers(rows: list[dict], as_json: bool) -> None:
    if as_json:
        emit_json(rows)
        return
    t = Table(title="servers")
    cols = ["model", "version", "format", "port", "pid", "state", "url"]
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(r.get(c, "")) for c in cols])
    show(t)


def rolled_back(model: str, out: dict, as_json: bool) -> None:
    if as_json:
        emit_json(out)
    else:
        out_console.print(f"[green]rolled back[/] {model} to {out.get('version')}", highlight=False)


def cleaned(items: list[dict], dry_run: bool, as_json: bool) -> None:
    if as_json:
        emit_json({"dry_run": dry_run, "items": items})
        return
    for it in items:
        out_console.print(f"{'would remove' if dry_run else 'removed'} {escape(str(it['path']))} "
                          f"({it['size'] / 2**20:.1f} MiB)", highlight=False)
    out_console.print(f"{len(items)} item(s), {sum(i['size'] for i in items) / 2**20:.1f} MiB", highlight=False)
