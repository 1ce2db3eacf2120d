"""Helpers for the CLI tests: invoke through the real boundary, check one-line errors and JSON output."""
from __future__ import annotations

import json

from click.testing import CliRunner, Result

from loradeploy.cli import main


def config_data(tmp_path) -> dict:
    return {
        "models": {"majora": {"base_model": str(tmp_path / "no-base"), "adapter": str(tmp_path / "no-adapter"),
                              "port": 5000},
                   "nayru": {"base_model": str(tmp_path / "no-base"), "adapter": str(tmp_path / "no-adapter2"),
                             "port": 5001}},
        "pipeline": {"work_dir": str(tmp_path / "work"), "state_dir": str(tmp_path / "state")},
        "logging": {"log_dir": str(tmp_path / "logs")},
        "deployment": {"models_dir": str(tmp_path / "models")},
        "evaluation": {"output_dir": str(tmp_path / "reports"), "samples": str(tmp_path / "samples.jsonl")},
    }


def invoke(*args: str, **kw) -> Result:
    return CliRunner().invoke(main, list(args), **kw)


def error_line(r: Result) -> str:
    """The whole of stderr must be one line, `error: ...`, and no traceback."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), r.stderr
    return lines[0]


def one_json(r: Result):
    """stdout is exactly one JSON document (json.loads refuses anything after it)."""
    return json.loads(r.stdout)
