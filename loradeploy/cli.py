"""Thin CLI: each command parses, calls one library function, renders through console.py and returns
its exit code. ``main`` is the one boundary: every exception becomes one line and an exit code here."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import click

from . import console
from .errors import ConfigError, GGUFError, InputError, LoradeployError, ResourceError
from .stagespec import SPEC, SPECS, STAGES

DEFAULT_CONFIG = "deployment_config.yaml"

# The one table from error type to exit code (README "Exit codes"): the first type the error is an
# instance of wins, so subclasses stand before their bases. 1 is also what any other exception gets.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 2),
    (InputError, 2),
    (GGUFError, 2),
    (ResourceError, 3),
    (LoradeployError, 1),
)
EXIT_INTERRUPTED = 130

# The CLI prints Config.warnings itself; without this, logging's last-resort handler would print them twice.
logging.getLogger("loradeploy.config").addHandler(logging.NullHandler())


def exit_code_for(exc: BaseException) -> int:
    return next((code for cls, code in EXIT_CODES if isinstance(exc, cls)), 1)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, LoradeployError):
        return exc.one_line()
    if isinstance(exc, click.ClickException):
        where = getattr(getattr(exc, "ctx", None), "command_path", None)
        return exc.format_message() + (f" (see `{where} --help`)" if where else "")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _exit_for(exc: BaseException) -> int:
    """Render ``exc`` (one line; the traceback only with LORADEPLOY_DEBUG=1) and say the exit code."""
    if isinstance(exc, SystemExit):  # click's own exit on a broken pipe, or a library that exits anyway
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if isinstance(exc, (KeyboardInterrupt, click.Abort)):
        console.interrupted()
        return EXIT_INTERRUPTED
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", None)
    if no_args is not None and isinstance(exc, no_args):
        exc.show()  # a bare `loradeploy` prints the help, as click does
        return exc.exit_code
    if os.environ.get("LORADEPLOY_DEBUG") == "1":
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    console.error_line(_one_line(exc))
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    return exit_code_for(exc)


class _Boundary(click.Group):
    """The group whose ``main`` catches everything; commands return an exit code (None is 0) or raise."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except BaseException as exc:  # noqa: BLE001 — this is the boundary
            code = _exit_for(exc)
        if standalone_mode:
            sys.exit(code)
        return code


def _load(config: str):
    from .config import load_config
    cfg = load_config(config)
    console.warnings(cfg.warnings)
    return cfg


config_opt = click.option("-c", "--config", default=DEFAULT_CONFIG, show_default=True, help="YAML config file")
json_opt = click.option("--json", "as_json", is_flag=True, help="print one JSON object")


@click.group(cls=_Boundary, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loradeploy")
def main() -> None:
    """LoRA adapter -> merged -> GGUF -> quantized -> served, checked and compared."""


def _run(cfg, models, *, as_json: bool, **kw):
    from .pipeline import run_pipeline
    console.quiet_ml_libraries()
    with console.RichReporter(enabled=not as_json) as rep:
        result = run_pipeline(cfg, models, reporter=rep, **kw)
    console.run_result(result, as_json)
    return result


def _chosen_models(cfg, models: tuple[str, ...], all_models: bool) -> list[str]:
    """No --model and no --all is fine only when the config has one model; [] means every enabled one."""
    if models or all_models:
        return list(models)
    if len(cfg.models) == 1:
        return list(cfg.models)
    raise click.UsageError(f"name --model (one of {', '.join(cfg.models)}) or --all")


@main.command()
@config_opt
@click.option("-m", "--model", "models", multiple=True, help="model name (repeatable)")
@click.option("--all", "all_models", is_flag=True, help="every enabled model in the config")
@click.option("--from-stage", metavar="STAGE", help=f"redo from this stage on ({', '.join(STAGES)})")
@click.option("--skip-stage", "skip", metavar="STAGE", multiple=True, help="skip this stage (repeatable)")
@click.option("--only", metavar="STAGE", multiple=True, help="run only this stage (repeatable)")
@click.option("--dry-run", is_flag=True, help="show what would run")
@click.option("--force", is_flag=True, help="redo every stage")
@click.option("--instance-id", help="vast.ai instance id to fetch from")
@json_opt
def run(config, models, all_models, from_stage, skip, only, dry_run, force, instance_id, as_json):
    """Run the pipeline for one or more models."""
    cfg = _load(config)
    result = _run(cfg, _chosen_models(cfg, models, all_models), as_json=as_json, from_stage=from_stage, skip=skip,
                  only=only, force=force, dry_run=dry_run,
                  options={"instance_id": instance_id} if instance_id else {})
    return 0 if result.ok or dry_run else result.exit_code


# Options a stage command has beyond -c/-m/--force/--json; each lands in the stage's ctx.options.
STAGE_OPTIONS = {"fetch": [click.option("--instance-id", help="vast.ai instance id")]}


def _stage_command(stage: str):
    """``loradeploy <stage>``: just that stage through the pipeline, its help from stagespec.SPECS."""
    def cmd(config, models, force, as_json, **extra):
        result = _run(_load(config), list(models), as_json=as_json, only=[stage], force=force,
                      options={k: v for k, v in extra.items() if v})
        return 0 if result.ok else result.exit_code
    for opt in reversed([config_opt, click.option("-m", "--model", "models", multiple=True),
                         click.option("--force", is_flag=True), json_opt, *STAGE_OPTIONS.get(stage, [])]):
        cmd = opt(cmd)
    return main.command(name=stage, help=SPEC[stage].help)(cmd)


for _spec in SPECS:
    if _spec.command == "stage":
        _stage_command(_spec.name)


@main.command()
@config_opt
@json_opt
def status(config, as_json):
    """Per model: stages, artifacts, and the servers that run."""
    from .status import collect_status, render_status
    data = collect_status(_load(config))
    if as_json:
        console.emit_json(data)
    else:
        console.show(render_status(data))


@main.command()
@click.option("--workdir", default="loradeploy-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["llama", "qwen2"]), default="llama", show_default=True)
@click.option("--port", type=int, default=None,
              help="first of the demo models' ports (default: 5000, 5050 on macOS, moved on while taken)")
@click.option("--force", is_flag=True, help="redo every stage (the built demo model is reused)")
@json_opt
def demo(workdir, arch, port, force, as_json):
    """Build a tiny base model + LoRA adapter locally and run every stage on it."""
    from .demo import prepare_demo
    console.quiet_ml_libraries()
    with console.spinner("building the demo model and adapter", enabled=not as_json):
        cfg = prepare_demo(workdir, arch=arch, port=port)
    if not as_json:
        console.note(f"demo config: {cfg.config_path}")
    result = _run(cfg, list(cfg.models), as_json=as_json, force=force)
    if not as_json and result.ok:
        from .serving import serve_status
        console.demo_done(cfg, result, serve_status(cfg))
    return 0 if result.ok else 1


@main.group()
def config():
    """Config helpers."""


@config.command("validate")
@config_opt
@json_opt
def config_validate(config, as_json):
    """Load and validate a config; print the models it defines."""
    console.config_ok(config, _load(config), as_json)


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@json_opt
def inspect(file, as_json):
    """Structural check and summary of a GGUF file (never loads it into llama.cpp)."""
    from .gguf import render_report, validate_gguf
    if not file.is_file():
        raise InputError(f"{file} not found")
    rep = validate_gguf(file)
    if as_json:
        console.emit_json(rep.to_dict())
    else:
        console.show(render_report(rep))
    return 0 if rep.ok else 2


@main.command(help=SPEC["health"].help)
@config_opt
@click.option("-m", "--model", "models", multiple=True)
@json_opt
def health(config, models, as_json):
    from .health import check_and_notify, exit_code, render
    rep = check_and_notify(_load(config), list(models) or None)
    if as_json:
        console.emit_json(rep.to_dict())
    else:
        console.show(render(rep))
    return exit_code(rep)


@main.command(help=SPEC["evaluate"].help)
@config_opt
@click.option("-m", "--model", "models", multiple=True)
@click.option("--samples", type=click.Path(path_type=Path))
@click.option("--formats", help="comma-separated formats, e.g. Q4_K_M,Q8_0")
@json_opt
def evaluate(config, models, samples, formats, as_json):
    from .evaluation.report import render
    from .evaluation.runner import evaluate as run_eval
    cfg = _load(config)
    fmts = [f.strip().upper() for f in formats.split(",")] if formats else None
    with console.RichReporter(enabled=not as_json) as rep:
        res = run_eval(cfg, list(models) or None, samples=samples, formats=fmts,
                       progress=lambda d, c, t: rep.progress("eval", "evaluate", d, c, t))
    if as_json:
        console.emit_json(res.to_dict())
    else:
        console.show(render(res))
    return 1 if res.failures() else 0  # a target down or failing requests is never reported as ok


@main.group()
def serve():
    """Start, stop and inspect the embedded llama.cpp servers."""


@serve.command("start")
@config_opt
@click.option("-m", "--model", "models", multiple=True)
def serve_start(config, models):
    from .deploy.service import serve_start as start
    console.emit_json(start(_load(config), list(models) or None))


@serve.command("stop")
@config_opt
@click.option("-m", "--model", "models", multiple=True)
def serve_stop(config, models):
    from .serving import serve_stop as stop
    console.emit_json(stop(_load(config), list(models) or None))


@serve.command("status")
@config_opt
@json_opt
def serve_status_cmd(config, as_json):
    from .serving import serve_status
    console.servers(serve_status(_load(config)), as_json)


@serve.command("logs")
@config_opt
@click.option("-m", "--model", required=True)
@click.option("-n", "--lines", default=50, show_default=True)
def serve_logs_cmd(config, model, lines):
    from .serving import serve_logs
    console.text(serve_logs(_load(config), model, lines=lines) + "\n")


@main.command()
@config_opt
@click.option("-m", "--model", required=True)
@click.option("--to", "to_version", help="version to bring back (default: the previous one)")
@json_opt
def rollback(config, model, to_version, as_json):
    """Bring back the previous (or a named) version and switch its server to it."""
    from .deploy.service import rollback as do_rollback
    console.rolled_back(model, do_rollback(_load(config), model, to_version=to_version), as_json)


@main.command()
@config_opt
@click.option("-m", "--model", required=True)
@click.option("--stage", help="one stage's log (default: pipeline.log lines of this model)")
@click.option("-f", "--follow", is_flag=True)
@click.option("-n", "--lines", default=100, show_default=True)
def logs(config, model, stage, follow, lines):
    """Show a model's logs."""
    from .logview import follow_file, log_file_for, tail_lines
    path = log_file_for(_load(config), model, stage)
    console.text(tail_lines(path, lines, model=None if stage else model))
    if follow:
        for chunk in follow_file(path):
            console.text(chunk)


@main.command()
@config_opt
@click.option("--dry-run", is_flag=True, help="list what would be removed")
@json_opt
def clean(config, dry_run, as_json):
    """Remove temporaries (merged folders, stale partial files); never live or backed-up models."""
    from .cleanup import clean as do_clean
    console.cleaned(do_clean(_load(config), dry_run=dry_run), dry_run, as_json)


# ----------------------------------------------------------------------------- verify

@main.command(name="verify", help=SPEC["verify"].help)
@config_opt
@click.option("-m", "--model", "models", multiple=True, help="model name (repeatable)")
@click.option("--all", "all_models", is_flag=True, help="every enabled model in the config")
@click.option("--force", is_flag=True, help="verify again even when nothing changed")
@json_opt
def verify_cmd(config, models, all_models, force, as_json):
    from .verify.report import gate_allows, render_file
    cfg = _load(config)
    result = _run(cfg, _chosen_models(cfg, models, all_models), as_json=as_json, only=["verify"], force=force)
    infos = [mo.stages["verify"].info for mo in result.models.values() if "verify" in mo.stages]
    if not as_json:
        for info in infos:
            if info.get("report"):
                console.show(render_file(info["report"]))
    return 0 if result.ok and all(gate_allows(i) for i in infos) else 1


if __name__ == "__main__":
    main()
