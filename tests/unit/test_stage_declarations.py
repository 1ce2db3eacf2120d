"""Every stage is declared once (loradeploy/stagespec.py); every table of stages is derived from it.

Each derived table is checked against the declaration, and no other module may spell out a list of
stages (three or more stage names in one list, tuple, set or dict literal)."""
from __future__ import annotations

import ast
import typing
from pathlib import Path

import click

from loradeploy import stagespec
from loradeploy.stagespec import SPECS, STAGES

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "loradeploy"
DECLARATION = PKG / "stagespec.py"


def test_names_are_unique_and_in_order():
    assert STAGES == tuple(s.name for s in SPECS)
    assert len(set(STAGES)) == len(STAGES)
    assert dict(stagespec.SPEC) == {s.name: s for s in SPECS}


def test_config_stage_type_and_list():
    from loradeploy.config import STAGES as config_stages, Stage
    from loradeploy.config.sections import PipelineConfig
    assert config_stages is STAGES
    assert typing.get_args(Stage) == STAGES
    field = PipelineConfig.model_fields["stages"]
    assert typing.get_args(typing.get_args(field.annotation)[0]) == STAGES
    assert tuple(PipelineConfig().stages) == STAGES
    assert PipelineConfig(stages=list(reversed(STAGES))).stages == list(STAGES)


def test_phases_follow_the_declared_order():
    from loradeploy.pipeline import PHASES
    assert PHASES is stagespec.PHASES
    assert tuple(s for phase in PHASES for s in phase) == STAGES  # every stage once, phases contiguous
    for phase in PHASES:
        assert len({stagespec.SPEC[s].phase for s in phase}) == 1
    assert [stagespec.SPEC[p[0]].phase for p in PHASES] == list(dict.fromkeys(s.phase for s in SPECS))


def test_needs_point_backwards():
    from loradeploy.pipeline import NEEDS
    assert NEEDS is stagespec.NEEDS
    assert dict(NEEDS) == {s.name: s.needs for s in SPECS if s.needs}
    for s in SPECS:
        assert all(STAGES.index(up) < STAGES.index(s.name) for up in s.needs), s.name


def test_side_by_side_phases():
    assert [p for p in stagespec.PHASES if stagespec.side_by_side(p)] == \
        [p for p in stagespec.PHASES if any(stagespec.SPEC[s].side_by_side for s in p)] == [("fetch",)]


def test_heavy_set():
    from loradeploy.config.sections import RayConfig
    from loradeploy.executor import HEAVY
    assert HEAVY is stagespec.HEAVY == tuple(s.name for s in SPECS if s.heavy)
    assert typing.get_args(stagespec.HeavyStage) == HEAVY
    key = typing.get_args(RayConfig.model_fields["stage_resources"].annotation)[0]
    assert typing.get_args(key) == HEAVY
    # a heavy stage never shares a phase with a light one: the executor packs whole phases
    for phase in stagespec.PHASES:
        assert len({stagespec.SPEC[s].heavy for s in phase}) == 1, phase


def _defined_class(path: Path, cls_name: str) -> ast.ClassDef | None:
    return next((n for n in ast.parse(path.read_text()).body
                 if isinstance(n, ast.ClassDef) and n.name == cls_name), None)


def test_stage_registry_names_each_implementation():
    from loradeploy.stages import REGISTRY
    assert REGISTRY == {s.name: s.impl for s in SPECS} == dict(stagespec.IMPLS)
    for s in SPECS:
        mod, _, cls_name = s.impl.partition(":")
        path = ROOT.joinpath(*mod.split(".")).with_suffix(".py")
        cls = _defined_class(path, cls_name)
        assert cls is not None, s.impl
        names = [n.value.value for n in cls.body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "name" for t in n.targets)
                 and isinstance(n.value, ast.Constant)]
        assert names == [s.name], f"{s.impl}.name"


def test_cli_has_a_command_per_stage_with_the_declared_help():
    from loradeploy.cli import main
    for s in SPECS:
        cmd = main.commands.get(s.name)
        assert isinstance(cmd, click.Command), s.name
        assert cmd.help == s.help, s.name
    generic = [s.name for s in SPECS if s.command == "stage"]
    # the generated commands share one body: run just that stage through the pipeline
    assert len({main.commands[n].callback.__code__ for n in generic}) == 1
    assert generic == ["fetch", "merge", "convert", "quantize", "deploy"]


def test_cli_stage_command_runs_only_its_stage(monkeypatch):
    from click.testing import CliRunner

    from loradeploy import cli
    seen = {}

    class Result:
        ok, exit_code = True, 0

    def fake_run(cfg, models, *, as_json, **kw):
        seen.update(kw, models=models)
        return Result()

    monkeypatch.setattr(cli, "_load", lambda config: object())
    monkeypatch.setattr(cli, "_run", fake_run)
    r = CliRunner().invoke(cli.main, ["quantize", "-m", "majora", "--force"], standalone_mode=False)
    assert r.return_value == 0, r.output
    assert seen == {"only": ["quantize"], "force": True, "options": {}, "models": ["majora"]}
    r = CliRunner().invoke(cli.main, ["fetch", "--instance-id", "42"], standalone_mode=False)
    assert seen["only"] == ["fetch"] and seen["options"] == {"instance_id": "42"}


def _stage_lists(path: Path) -> list[tuple[int, list[str]]]:
    known = set(STAGES)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            elts = node.elts
        elif isinstance(node, ast.Dict):
            elts = [k for k in node.keys if k is not None]
        else:
            continue
        names = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in known}
        if len(names) >= 3:
            found.append((node.lineno, sorted(names)))
    return found


def test_the_scan_finds_a_restated_list(tmp_path):
    p = tmp_path / "m.py"
    p.write_text('HEAVY = ("merge", "convert", "quantize")\nX = {"fetch": 1, "merge": 2, "deploy": 3}\n'
                 'OK = ("convert", "quantize")\n')
    assert _stage_lists(p) == [(1, ["convert", "merge", "quantize"]), (2, ["deploy", "fetch", "merge"])]


def test_no_module_restates_the_stage_list():
    restated = {str(p.relative_to(ROOT)): found for p in sorted(PKG.rglob("*.py"))
                if p != DECLARATION and (found := _stage_lists(p))}
    assert restated == {}, "derive these from loradeploy.stagespec instead"
