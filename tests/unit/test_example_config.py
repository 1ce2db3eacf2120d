"""examples/deployment_config.yaml says it shows every key at its default: hold it to that.

Each value written in the example must equal what the same config gives with that key left out
(the real default, resolved the same way); only the example's own choices (its models, its vast.ai
box, its key file) may differ. Every key of every section must appear, written or commented out.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from loradeploy.config import STAGES, Config, config_from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deployment_config.yaml"
# the example's own choices, not defaults: what a user must write anyway
CHOSEN = {("models",), ("vast", "instances"), ("vast", "api_key")}


def _leaves(d: dict, where: tuple = ()):
    for k, v in d.items():
        at = where + (k,)
        if any(at[:len(c)] == c for c in CHOSEN):
            continue
        if isinstance(v, dict) and v:
            yield from _leaves(v, at)
        else:
            yield at, v


def _dig(obj, path: tuple):
    for k in path:
        obj = obj[k]
    return obj


@pytest.fixture(scope="module")
def example() -> tuple[dict, Config, Config]:
    data = yaml.safe_load(EXAMPLE.read_text().replace("${VAST_API_KEY:-}", "x"))
    written = config_from_dict(data, base_dir=EXAMPLE.parent)
    bare = config_from_dict({"models": data["models"], "vast": {"instances": data["vast"]["instances"]}},
                            base_dir=EXAMPLE.parent)
    return data, written, bare


def test_every_written_value_is_the_default(example):
    data, written, bare = example
    got = written.model_dump(mode="json")
    want = bare.model_dump(mode="json")
    wrong = [f"{'.'.join(p)}: example {_dig(got, p)!r}, default {_dig(want, p)!r}"
             for p, _ in _leaves(data) if _dig(got, p) != _dig(want, p)]
    assert not wrong, "examples/deployment_config.yaml shows values that are not the defaults:\n" + "\n".join(wrong)


def test_the_gate_is_in_the_example_stages(example):
    data, written, _ = example
    assert "verify" in data["pipeline"]["stages"]
    assert tuple(written.pipeline.stages) == STAGES


def _keys(model: type[BaseModel], where: str = ""):
    for name, field in model.model_fields.items():
        if field.exclude or name == "models":
            continue
        sub = field.annotation
        yield f"{where}{name}"
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _keys(sub, f"{where}{name}.")


def test_every_key_is_shown():
    text = EXAMPLE.read_text()
    shown = set(re.findall(r"^\s*#?\s*([a-z_0-9]+):", text, flags=re.M))
    missing = [k for k in _keys(Config) if k.rsplit(".", 1)[-1] not in shown]
    assert not missing, f"keys the example does not show (written or commented): {missing}"
