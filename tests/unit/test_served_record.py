"""The one record of what is served (serving.record): typed, schema-checked both ways, one writer; a
registry written by the old code (version 1) migrates; a newer or malformed one is refused in one line."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from loradeploy.config import config_from_dict
from loradeploy.errors import ServingError
from loradeploy.serving import endpoints, record, serve_status
from loradeploy.serving.record import CpuMode, GroupAdapter, ProcessRecord, Registry, ServedModel, SharedGroup
from loradeploy.serving.registry import read_registry
from loradeploy.tools import proc
from loradeploy.tools.procid import identify


@pytest.fixture
def cfg(tmp_path):
    return config_from_dict({
        "models": {m: {"base_model": str(tmp_path / "b"), "adapter": str(tmp_path / "a"), "port": p}
                   for m, p in (("majora", 5000), ("nayru", 5001), ("veran", 5002))},
        "pipeline": {"state_dir": str(tmp_path / "state"), "work_dir": str(tmp_path / "work")},
        "logging": {"log_dir": str(tmp_path / "logs")}})


def _me(**kw) -> ProcessRecord:
    s = identify(os.getpid())
    return ProcessRecord(s.pid, s.create_time, s.start_ticks, **kw)


def _sample() -> Registry:
    mode = CpuMode("safe", "cache", "default mode died of SIGSEGV in the probe", "safe (cached)")
    backend = _me(port=31000, key_file="/x/backend-31000.key", cpu_mode=mode, config="/x/backend-31000.json")
    reg = Registry()
    reg.models["majora"] = ServedModel("majora", "merged", "running", "v1", "Q8_0", "127.0.0.1", 5000, "/m/a.gguf",
                                       "a" * 64, proxy=_me(), backend=backend)
    reg.groups["0123456789abcdef"] = SharedGroup("0123456789abcdef", "/b.gguf", "b" * 64, "Q4_K_M",
                                                 backend=_me(port=31001),
                                                 adapters={"nayru": GroupAdapter("/l.gguf", "c" * 64, "v2", "Q4_K_M")})
    reg.models["nayru"] = ServedModel("nayru", "adapter", "running", "v2", "Q4_K_M", "127.0.0.1", 5001, "/l.gguf",
                                      "c" * 64, proxy=_me(), group="0123456789abcdef", lora_id=0,
                                      base_gguf="/b.gguf", base_sha256="b" * 64)
    reg.pending["veran"] = _me(port=31002)
    return reg


def test_a_record_round_trips_and_is_what_every_view_reads(cfg):
    with record.update(cfg) as reg:
        sample = _sample()
        reg.models, reg.groups, reg.pending = sample.models, sample.groups, sample.pending
    data = json.loads(record.registry_path(cfg).read_text())
    assert data["version"] == record.VERSION and data["models"]["majora"]["backend"]["cpu_mode"]["mode"] == "safe"
    back = record.load(cfg)
    assert back.models == sample.models and back.groups == sample.groups and back.pending == sample.pending
    assert back.backend_of(back.models["nayru"]).port == 31001 and back.backend_ports() == {31000, 31001, 31002}
    # a ProcessRecord is what tools.proc takes
    assert proc.alive(back.models["majora"].backend) and not proc.alive(dataclasses.replace(
        back.models["majora"].backend, create_time=1.0, start_ticks=1))
    eps = {e.model: e for e in endpoints(cfg)}
    assert eps["majora"].base_url == "http://127.0.0.1:5000" and eps["nayru"].pid == os.getpid()
    assert read_registry(cfg)["models"]["nayru"]["backend"]["port"] == 31001


def test_one_shape_of_cpu_mode_and_backend(cfg):
    with record.update(cfg) as reg:
        reg.models.update(_sample().models)
    rows = {r["model"]: r for r in serve_status(cfg)}
    assert rows["majora"]["cpu_mode"] == "safe (cached)" and rows["majora"]["mode"] == "merged"
    assert rows["nayru"]["shared_server"] == "0123456789abcdef"


@pytest.mark.parametrize("change, says", [
    (lambda d: d["models"]["majora"].update(port="5000"), "models.majora.port must be int"),
    (lambda d: d["models"]["majora"].update(colour="red"), "unknown field(s) ['colour']"),
    (lambda d: d["models"]["majora"].update(mode="sideways"), "models.majora.mode must be one of"),
    (lambda d: d["models"]["majora"]["backend"].pop("pid"), "lacks 'pid'"),
    (lambda d: d.update(version=3), "version 3 is not one this loradeploy reads"),
    (lambda d: d.update(models=[]), "models must be an object"),
])
def test_a_malformed_or_newer_registry_is_refused_in_one_line(cfg, change, says):
    with record.update(cfg) as reg:
        reg.models.update(_sample().models)
    data = json.loads(record.registry_path(cfg).read_text())
    change(data)
    record.registry_path(cfg).write_text(json.dumps(data))
    with pytest.raises(ServingError) as err:
        record.load(cfg)
    assert says in err.value.message and "\n" not in err.value.message
    assert "move" in err.value.hint and str(record.registry_path(cfg)) in err.value.hint
    with pytest.raises(ServingError):  # and nothing overwrites it
        with record.update(cfg):
            pass
    assert json.loads(record.registry_path(cfg).read_text()) == data


def test_what_is_saved_must_load(cfg):
    with pytest.raises(ValueError, match="port must be int"):
        with record.update(cfg) as reg:
            reg.models["majora"] = dataclasses.replace(_sample().models["majora"], port="5000")
    assert not record.registry_path(cfg).exists()


V1 = {  # as the old switch.py / shared.py wrote it
    "version": 1, "updated_at": 1700000000.0,
    "models": {
        "majora": {"model": "majora", "version": "v1", "format": "Q8_0", "host": "127.0.0.1", "port": 5000,
                   "gguf": "/m/a.gguf", "sha256": "a" * 64, "settings_hash": "s1", "state": "running",
                   "url": "http://127.0.0.1:5000", "log": "/l/server.log", "switched_at": 1.0, "started_at": 1.0,
                   "backend_kind": "llama-server", "mode": "merged", "group": None, "lora_id": None,
                   "pending_backend": None,
                   "proxy": {"pid": 11, "create_time": 2.0, "start_ticks": 3, "config": "/r/proxy.json",
                             "server_record": "/r/proxy.server.json", "started_at": 1.0},
                   "backend": {"pid": 12, "create_time": 2.0, "start_ticks": 4, "config": "/r/backend-31000.json",
                               "server_record": "/r/backend-31000.server.json", "port": 31000, "version": "v1",
                               "started_at": 1.0, "cpu_mode": "default", "kind": "llama-server", "ready_s": 0.5},
                   "cpu_mode": {"mode": "default", "source": "probe", "why": "passed", "describe": "default (probed)",
                                "attempts": [], "cache_file": None}},
        "nayru": {"model": "nayru", "version": "v1", "format": "Q4_K_M", "host": "127.0.0.1", "port": 5001,
                  "gguf": "/l/n.gguf", "sha256": "c" * 64, "base_gguf": "/b.gguf", "base_sha256": "b" * 64,
                  "mode": "adapter", "group": "bbbbbbbbbbbbbbbb", "lora_id": 0, "settings_hash": "s2",
                  "state": "stopped", "stopped_at": 5.0, "backend_kind": "llama-server", "url": "x", "log": "/g.log",
                  "proxy": {"pid": 13, "create_time": 2.0}, "cpu_mode": None, "started_at": 1.0, "switched_at": 1.0,
                  "backend": {"pid": 14, "create_time": 2.0, "port": 31001, "cpu_mode": "safe"}},
        "veran": {"model": "veran", "pending_backend": {"pid": 15, "create_time": 2.0, "port": 31002}},
    },
    "groups": {"bbbbbbbbbbbbbbbb": {
        "base_gguf": "/b.gguf", "base_sha256": "b" * 64, "format": "Q4_K_M", "settings": "g1", "switched_at": 1.0,
        "backend": {"pid": 14, "create_time": 2.0, "port": 31001, "cpu_mode": "safe"},
        "loaded": [["nayru", "c" * 64]],
        "adapters": {"nayru": {"lora": "/l/n.gguf", "sha256": "c" * 64, "version": "v1", "format": "Q4_K_M", "id": 0}},
        "pending_backend": {"pid": 16, "create_time": 2.0, "port": 31003}}},
}


def test_a_version_1_registry_migrates(cfg):
    path = record.registry_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(V1))
    reg = record.load(cfg)
    a, n = reg.models["majora"], reg.models["nayru"]
    assert (a.mode, a.state, a.backend.port, a.backend.ready_s, a.proxy.pid) == ("merged", "running", 31000, 0.5, 11)
    assert a.backend.cpu_mode == CpuMode("default", "probe", "passed", "default (probed)")
    assert a.backend.key_file is None, "a backend from before keys is keyless: the next deploy replaces it"
    assert (n.mode, n.state, n.group, n.backend) == ("adapter", "stopped", "bbbbbbbbbbbbbbbb", None)
    assert reg.backend_of(n).pid == 14 and reg.backend_of(n).cpu_mode.mode == "safe"
    assert "veran" not in reg.models and reg.pending["veran"].port == 31002
    assert reg.pending["group:bbbbbbbbbbbbbbbb"].port == 31003
    assert reg.groups["bbbbbbbbbbbbbbbb"].loaded == [["nayru", "c" * 64]]
    with record.update(cfg):
        pass
    assert json.loads(path.read_text())["version"] == record.VERSION
    assert record.load(cfg).models == reg.models


def test_a_missing_registry_is_an_empty_one(cfg):
    assert record.load(cfg) == Registry() and record.entry(cfg, "majora") is None
    assert record.change_model(cfg, "majora", state="stopped") is None
    assert Path(record.registry_path(cfg)).exists()


def test_every_mode_a_record_accepts_has_a_strategy():
    from loradeploy.serving.control import MODES
    from loradeploy.serving.strategy import STRATEGIES, strategy_for

    assert set(MODES) == set(STRATEGIES)
    assert {m: strategy_for(m).mode for m in MODES} == {m: m for m in MODES}
