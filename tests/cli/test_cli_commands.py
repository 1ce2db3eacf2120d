"""Every command through click's CliRunner: exit codes, one-line errors, `--json` shapes.

Nothing is deployed here, so the commands that need a served model are pinned on their error paths.
"""
from __future__ import annotations

import click
import pytest

from loradeploy.cli import main

from tests.cli.helpers import error_line, invoke, one_json


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


def test_every_command_has_help():
    names = list(_commands(main))
    assert {"run", "fetch", "merge", "convert", "quantize", "deploy", "status", "demo", "inspect", "health",
            "evaluate", "rollback", "logs", "clean", "config validate", "serve start", "serve stop",
            "serve status", "serve logs"} <= {" ".join(n) for n in names}
    for n in names:
        r = invoke(*n, "--help")
        assert r.exit_code == 0 and "Usage:" in r.stdout, (n, r.output)
    assert invoke("--version").exit_code == 0


def test_config_validate(cfg_path, tmp_path):
    r = invoke("config", "validate", "-c", cfg_path)
    assert r.exit_code == 0 and "majora (port 5000)" in r.stdout and r.stderr == ""
    data = one_json(invoke("config", "validate", "-c", cfg_path, "--json"))
    assert data["ok"] is True and set(data["models"]) == {"majora", "nayru"}
    assert data["models"]["majora"]["port"] == 5000
    r = invoke("config", "validate", "-c", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2 and "not found" in error_line(r)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {majora: {base_model: /b, adapter: /a, port: 5000}}\nmerge: {oops: 1}\n")
    r = invoke("config", "validate", "-c", str(bad), "--json")
    assert r.exit_code == 2 and "merge.oops: unknown key" in error_line(r) and r.stdout == ""


def test_run_argument_errors(cfg_path):
    r = invoke("run", "-c", cfg_path)
    assert r.exit_code == 2 and "--model (one of majora, nayru) or --all" in error_line(r)
    r = invoke("run", "-c", cfg_path, "-m", "majora", "--only", "polish")
    assert r.exit_code == 2 and "unknown stage 'polish'" in error_line(r)
    r = invoke("run", "-c", cfg_path, "-m", "zelda")
    assert r.exit_code == 2 and "unknown model 'zelda'" in error_line(r)
    r = invoke("run", "-c", cfg_path, "--gguf", "x.gguf")
    assert r.exit_code == 2 and "No such option" in error_line(r)


def test_run_dry_run_json(cfg_path):
    r = invoke("run", "-c", cfg_path, "--all", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    data = one_json(r)
    assert data["dry_run"] is True and data["stages"][0] == "fetch"
    assert set(data["models"]) == {"majora", "nayru"}
    fetch = data["models"]["majora"]["stages"]["fetch"]
    assert fetch["status"] == "planned" and {"seconds", "peak_rss_mib"} <= set(fetch)


@pytest.mark.parametrize("stage", ["fetch", "merge", "convert", "quantize", "deploy"])
def test_stage_command_fails_with_exit_1(cfg_path, stage):
    r = invoke(stage, "-c", cfg_path, "-m", "majora", "--json")
    assert r.exit_code == 1, r.output
    data = one_json(r)
    assert data["ok"] is False and data["stages"] == [stage]
    outcome = data["models"]["majora"]["stages"][stage]
    assert outcome["status"] in ("failed", "unavailable") and outcome["error"]
    assert data["models"]["majora"]["artifacts"] == []


def test_status_json(cfg_path):
    invoke("fetch", "-c", cfg_path, "-m", "majora")
    r = invoke("status", "-c", cfg_path, "--json")
    assert r.exit_code == 0, r.output
    data = one_json(r)
    assert set(data["models"]) == {"majora", "nayru"}
    assert data["models"]["majora"]["stages"]["fetch"]["status"] == "failed"


def test_inspect(tmp_path):
    r = invoke("inspect", str(tmp_path / "none.gguf"))
    assert r.exit_code == 2 and "not found" in error_line(r)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 8)
    r = invoke("inspect", str(junk), "--json")
    assert r.exit_code == 2
    data = one_json(r)
    assert data["path"] == str(junk) and data["size"] == junk.stat().st_size


def test_health_without_a_deployment_is_unhealthy(cfg_path):
    r = invoke("health", "-c", cfg_path, "-m", "majora", "--json")
    assert r.exit_code == 2, r.output
    data = one_json(r)
    assert data["status"] == "unhealthy" and data["exit_code"] == 2 and "majora" in data["models"]


@pytest.mark.parametrize("args,code,says", [
    (("serve", "start", "-m", "majora"), 1, "no deployed version"),
    (("rollback", "-m", "majora"), 1, "no backup of model majora"),
    (("rollback", "-m", "majora", "--json"), 1, "no backup of model majora"),
    (("evaluate", "-m", "majora", "--json"), None, ""),  # the evaluation package is being moved: any one line
])
def test_commands_that_need_a_deployed_model(cfg_path, args, code, says):
    r = invoke(*args, "-c", cfg_path)
    assert r.exit_code == code if code is not None else r.exit_code in (1, 2), r.output
    assert says in error_line(r)
    assert r.stdout == ""


def test_serve_stop_status_and_logs_with_nothing_deployed(cfg_path):
    r = invoke("serve", "stop", "-c", cfg_path)
    assert r.exit_code == 0 and one_json(r) == []
    r = invoke("serve", "status", "-c", cfg_path, "--json")
    assert r.exit_code == 0
    rows = one_json(r)
    assert {row["model"]: row["state"] for row in rows} == {"majora": "not deployed", "nayru": "not deployed"}
    r = invoke("serve", "logs", "-c", cfg_path, "-m", "majora")
    assert r.exit_code == 2 and "no server log" in error_line(r)


def test_logs(cfg_path):
    r = invoke("logs", "-c", cfg_path, "-m", "majora", "--stage", "merge")
    assert r.exit_code == 2 and "no merge log for majora" in error_line(r)
    invoke("fetch", "-c", cfg_path, "-m", "majora")
    r = invoke("logs", "-c", cfg_path, "-m", "majora", "--stage", "fetch")
    assert r.exit_code == 0 and "fetch failed" in r.stdout


def test_clean_dry_run_json(cfg_path):
    r = invoke("clean", "-c", cfg_path, "--dry-run", "--json")
    assert r.exit_code == 0 and one_json(r) == {"dry_run": True, "items": []}
    r = invoke("clean", "-c", cfg_path, "--dry-run")
    assert r.exit_code == 0 and "0 item(s)" in r.stdout


def test_demo_argument_error():
    r = invoke("demo", "--arch", "bogus")
    assert r.exit_code == 2 and "'bogus' is not one of" in error_line(r)
