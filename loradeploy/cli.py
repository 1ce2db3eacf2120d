"""Thin CLI: parse, call one library function, render, map errors to one line and an exit code."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console

from .errors import LoradeployError

err_console = Console(stderr=True)
out_console = Console()
DEFAULT_CONFIG = "deployment_config.yaml"


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoradeployError as exc:
            if os.environ.get("LORADEPLOY_DEBUG") == "1":
                traceback.print_exc()
            err_console.print(f"[bold red]error:[/] {exc.one_line()}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]; partial files were discarded, re-run to resume")
            sys.exit(130)
    return wrapper


def _load(config: str):
    from .config import load_config
    return load_config(config)


config_opt = click.option("-c", "--config", default=DEFAULT_CONFIG, show_default=True, help="YAML config file")
json_opt = click.option("--json", "as_json", is_flag=True, help="print one JSON object")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loradeploy")
def main() -> None:
    """LoRA adapter -> merged -> GGUF -> quantized -> served, checked and compared."""


def _run(cfg, models, *, as_json: bool, **kw):
    _quiet_ml_libraries()
    from .console import RichReporter, artifacts_table, summary_table
    from .pipeline import run_pipeline
    with RichReporter(err_console, enabled=not as_json) as rep:
        result = run_pipeline(cfg, models, reporter=rep, **kw)
    if as_json:
        _emit_json(result.to_dict())
    else:
        out_console.print(summary_table(result))
        if any(m.artifacts for m in result.models.values()):
            out_console.print(artifacts_table(result))
    return result


@main.command()
@config_opt
@click.option("-m", "--model", "models", multiple=True, help="model name (repeatable)")
@click.option("--all", "all_models", is_flag=True, help="every enabled model in the config")
@click.option("--from-stage", help="redo from this stage on")
@click.option("--skip-stage", "skip", multiple=True, help="skip this stage (repeatable)")
@click.option("--only", multiple=True, help="run only this stage (repeatable)")
@click.option("--dry-run", is_flag=True, help="show what would run")
@click.option("--force", is_flag=True, help="redo every stage")
@click.option("--instance-id", help="vast.ai instance id to fetch from")
@json_opt
@handle_errors
def run(config, models, all_models, from_stage, skip, only, dry_run, force, instance_id, as_json):
    """Run the pipeline for one or more models."""
    cfg = _load(config)
    if not models and not all_models:
        if len(cfg.models) == 1:
            models = tuple(cfg.models)
        else:
            raise click.UsageError(f"name --model (one of {', '.join(cfg.models)}) or --all")
    result = _run(cfg, list(models), as_json=as_json, from_stage=from_stage, skip=skip, only=only,
                  force=force, dry_run=dry_run, options={"instance_id": instance_id} if instance_id else {})
    sys.exit(0 if result.ok or dry_run else 1)


def _stage_command(stage: str, doc: str):
    @main.command(name=stage, help=doc)
    @config_opt
    @click.option("-m", "--model", "models", multiple=True)
    @click.option("--force", is_flag=True)
    @json_opt
    @handle_errors
    def cmd(config, models, force, as_json, **extra):
        cfg = _load(config)
        result = _run(cfg, list(models), as_json=as_json, only=[stage], force=force,
                      options={k: v for k, v in extra.items() if v})
        sys.exit(0 if result.ok else 1)
    return cmd


fetch_cmd = _stage_command("fetch", "Pull the adapter from the training box (rsync over SSH, verified).")
fetch_cmd = click.option("--instance-id", help="vast.ai instance id")(fetch_cmd)
for _s, _d in (("merge", "Merge the LoRA adapter into its base model (16-bit)."),
               ("convert", "Convert the merged model to GGUF with llama.cpp's converter."),
               ("quantize", "Quantize the GGUF to every configured llama.cpp type."),
               ("deploy", "Deploy the primary GGUF to the configured targets.")):
    _stage_command(_s, _d)


@main.command()
@config_opt
@json_opt
@handle_errors
def status(config, as_json):
    """Per model: stages, artifacts, and the servers that run."""
    from .status import collect_status, render_status
    cfg = _load(config)
    data = collect_status(cfg)
    if as_json:
        _emit_json(data)
    else:
        out_console.print(render_status(data))


@main.command()
@click.option("--workdir", default="loradeploy-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["llama", "qwen2"]), default="llama", show_default=True)
@click.option("--port", default=5000, show_default=True, help="port the demo model is served on")
@click.option("--force", is_flag=True, help="redo every stage (the built demo model is reused)")
@json_opt
@handle_errors
def demo(workdir, arch, port, force, as_json):
    """Build a tiny base model + LoRA adapter locally and run every stage on it."""
    from .demo import prepare_demo
    _quiet_ml_libraries()
    with err_console.status("building the demo model and adapter", spinner="dots") if not as_json else contextlib.nullcontext():
        cfg = prepare_demo(workdir, arch=arch, port=port)
    if not as_json:
        err_console.print(f"demo config: {cfg.config_path}")
    result = _run(cfg, list(cfg.models), as_json=as_json, force=force)
    if not as_json and result.ok:
        m = next(iter(cfg.models))
        port = cfg.models[m].port
        err_console.print(f"\n[bold green]{m}[/] serves at http://127.0.0.1:{port}/v1 — try:\n"
                          f"  curl -s localhost:{port}/v1/chat/completions -H 'Content-Type: application/json' "
                          f"-d '{{\"messages\":[{{\"role\":\"user\",\"content\":"
                          f"\"Repeat these words:\\napple river stone\"}}],\"temperature\":0}}'\n"
                          f"evaluation report: {cfg.evaluation.output_dir / m / 'evaluation.md'}\n"
                          f"repeat with: loradeploy run -c {cfg.config_path}   stop the server: "
                          f"loradeploy serve stop -c {cfg.config_path}")
    sys.exit(0 if result.ok else 1)


def _quiet_ml_libraries() -> None:
    """transformers/peft progress bars and deprecation chatter would drown our own progress."""
    import warnings
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


@main.group()
def config():
    """Config helpers."""


@config.command("validate")
@config_opt
@json_opt
@handle_errors
def config_validate(config, as_json):
    """Load and validate a config; print the models it defines."""
    cfg = _load(config)
    if as_json:
        _emit_json({"ok": True, "models": {k: v.model_dump(mode="json") for k, v in cfg.models.items()}})
    else:
        out_console.print(f"[green]ok[/] {config}: {len(cfg.models)} model(s): "
                          + ", ".join(f"{n} (port {m.port})" for n, m in cfg.models.items()))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@json_opt
@handle_errors
def inspect(file, as_json):
    """Structural check and summary of a GGUF file (never loads it into llama.cpp)."""
    from .errors import InputError
    from .gguf_check import render_report, validate_gguf
    if not file.is_file():
        raise InputError(f"{file} not found")
    rep = validate_gguf(file)
    if as_json:
        _emit_json(rep.to_dict())
    else:
        out_console.print(render_report(rep))
    sys.exit(0 if rep.ok else 2)


@main.command()
@config_opt
@click.option("-m", "--model", "models", multiple=True)
@json_opt
@handle_errors
def health(config, models, as_json):
    """Check files, API, a real completion and the system: exit 0 healthy, 1 degraded, 2 unhealthy."""
    from .health import check_health, exit_code, render
    cfg = _load(config)
    rep = check_health(cfg, list(models) or None)
    if as_json:
        _emit_json(rep.to_dict())
    else:
        out_console.print(render(rep))
    if cfg.notifications.enabled:
        from .notify import Notifier
        n = Notifier(cfg.notifications)
        for m, st in rep.model_statuses().items():
            n.health(m, st, rep.problems(m))
    sys.exit(exit_code(rep))


@main.command()
@config_opt
@click.option("-m", "--model", "models", multiple=True)
@click.option("--samples", type=click.Path(path_type=Path))
@click.option("--formats", help="comma-separated formats, e.g. Q4_K_M,Q8_0")
@json_opt
@handle_errors
def evaluate(config, models, samples, formats, as_json):
    """Compare models and formats on eval_samples.jsonl -> JSON + Markdown + charts."""
    from .console import RichReporter
    from .evaluate import evaluate as run_eval, render
    cfg = _load(config)
    fmts = [f.strip().upper() for f in formats.split(",")] if formats else None
    with RichReporter(err_console, enabled=not as_json) as rep:
        res = run_eval(cfg, list(models) or None, samples=samples, formats=fmts,
                       progress=lambda d, c, t: rep.progress("eval", "evaluate", d, c, t))
    if as_json:
        _emit_json(res.to_dict())
    else:
        out_console.print(render(res))


@main.group()
def serve():
    """Start, stop and inspect the embedded llama.cpp servers."""


@serve.command("start")
@config_opt
@click.option("-m", "--model", "models", multiple=True)
@handle_errors
def serve_start(config, models):
    from .serve import serve_start as start
    out = start(_load(config), list(models) or None)
    _emit_json(out)


@serve.command("stop")
@config_opt
@click.option("-m", "--model", "models", multiple=True)
@handle_errors
def serve_stop(config, models):
    from .serve import serve_stop as stop
    _emit_json(stop(_load(config), list(models) or None))


@serve.command("status")
@config_opt
@json_opt
@handle_errors
def serve_status_cmd(config, as_json):
    from .serve import serve_status
    rows = serve_status(_load(config))
    if as_json:
        _emit_json(rows)
    else:
        from rich.table import Table
        t = Table(title="servers")
        cols = ["model", "version", "format", "port", "pid", "state", "url"]
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[str(r.get(c, "")) for c in cols])
        out_console.print(t)


@serve.command("logs")
@config_opt
@click.option("-m", "--model", required=True)
@click.option("-n", "--lines", default=50, show_default=True)
@handle_errors
def serve_logs_cmd(config, model, lines):
    from .serve import serve_logs
    click.echo(serve_logs(_load(config), model, lines=lines))


@main.command()
@config_opt
@click.option("-m", "--model", required=True)
@click.option("--to", "to_version", help="version to bring back (default: the previous one)")
@json_opt
@handle_errors
def rollback(config, model, to_version, as_json):
    """Bring back the previous (or a named) version and switch its server to it."""
    from .serve import rollback as do_rollback
    out = do_rollback(_load(config), model, to_version=to_version)
    if as_json:
        _emit_json(out)
    else:
        out_console.print(f"[green]rolled back[/] {model} to {out.get('version')}")


@main.command()
@config_opt
@click.option("-m", "--model", required=True)
@click.option("--stage", help="one stage's log (default: pipeline.log lines of this model)")
@click.option("-f", "--follow", is_flag=True)
@click.option("-n", "--lines", default=100, show_default=True)
@handle_errors
def logs(config, model, stage, follow, lines):
    """Show a model's logs."""
    from .logview import follow_file, tail_lines, log_file_for
    cfg = _load(config)
    path = log_file_for(cfg, model, stage)
    click.echo(tail_lines(path, lines, model=None if stage else model), nl=False)
    if follow:
        for chunk in follow_file(path):
            click.echo(chunk, nl=False)


@main.command()
@config_opt
@click.option("--dry-run", is_flag=True, help="list what would be removed")
@json_opt
@handle_errors
def clean(config, dry_run, as_json):
    """Remove temporaries (merged folders, stale partial files); never live or backed-up models."""
    from .cleanup import clean as do_clean
    items = do_clean(_load(config), dry_run=dry_run)
    if as_json:
        _emit_json({"dry_run": dry_run, "items": items})
    else:
        for it in items:
            out_console.print(f"{'would remove' if dry_run else 'removed'} {it['path']} ({it['size'] / 2**20:.1f} MiB)")
        out_console.print(f"{len(items)} item(s), {sum(i['size'] for i in items) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
