"""The one CLI boundary: the error table, one line per error, tracebacks only on request, warnings."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import yaml

import loradeploy.errors as errors
from loradeploy import cli
from loradeploy.errors import (ConfigError, GGUFError, InputError, LockError, LoradeployError, ResourceError,
                               StageUnavailable)

from tests.cli.helpers import config_data, error_line, invoke, one_json

CLI_SOURCE = Path(cli.__file__).read_text()


def _raising(exc: BaseException):
    def boom(*_a, **_k):
        raise exc
    return boom


@pytest.mark.parametrize("exc,code", [
    (ConfigError("bad key"), 2), (InputError("no such file"), 2), (GGUFError("torn header"), 2),
    (ResourceError("disk full"), 3), (LockError("held by pid 7"), 3), (StageUnavailable("not built"), 1),
    (LoradeployError("stage crashed"), 1), (PermissionError(13, "Permission denied", "/x"), 1),
    (OSError("disk on fire"), 1), (RuntimeError("a bug"), 1), (ValueError(), 1),
])
def test_error_table(cfg_path, monkeypatch, exc, code):
    monkeypatch.setattr("loradeploy.cleanup.clean", _raising(exc))
    r = invoke("clean", "-c", cfg_path, "--json")
    assert r.exit_code == code
    line = error_line(r)
    assert "Traceback" not in r.stderr and r.stdout == ""
    if isinstance(exc, LoradeployError):
        assert line == f"error: {exc.one_line()}"
    else:
        assert line.startswith(f"error: {type(exc).__name__}")


def test_traceback_only_with_debug(cfg_path, monkeypatch):
    monkeypatch.setattr("loradeploy.cleanup.clean", _raising(OSError("disk on fire")))
    r = invoke("clean", "-c", cfg_path, env={"LORADEPLOY_DEBUG": "1"})
    assert r.exit_code == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: OSError: disk on fire"


def test_interrupt_is_130(cfg_path, monkeypatch):
    monkeypatch.setattr("loradeploy.cleanup.clean", _raising(KeyboardInterrupt()))
    r = invoke("clean", "-c", cfg_path)
    assert r.exit_code == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr


def test_table_agrees_with_every_error_class():
    """errors.py still carries exit_code per class; the CLI's table must never disagree with it."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, LoradeployError)]
    assert len(classes) > 10
    for c in classes:
        assert cli.exit_code_for(c.__new__(c)) == c.exit_code, c.__name__


def test_no_exit_and_no_notification_outside_the_boundary():
    tree = ast.parse(CLI_SOURCE)
    exits = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "exit"
             and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    boundary = inspect.getsource(cli._Boundary.main)
    assert len(exits) == 1 and "sys.exit(code)" in boundary
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and "notify" in m for m in imported)  # notifications flow from the library only


def test_config_warnings_are_shown_once_and_json_stays_clean(tmp_path):
    data = config_data(tmp_path)
    data["notifications"] = {"enabled": False, "slack": {"webhook_url": "https://hooks.example.test/T/B/x"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    r = invoke("config", "validate", "-c", str(path), "--json")
    assert r.exit_code == 0 and one_json(r)["ok"] is True
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: notifications.enabled is false: slack configured")

