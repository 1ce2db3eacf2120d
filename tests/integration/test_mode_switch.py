"""A model that changes serving mode under load, on real servers: majora and nayru share one base server in
adapter mode; majora moves to merged mode (its own backend) and back, while both ports serve requests.
Each move leaves the other persona's port untouched, never fails a request, and stops what served the model
before (strategy.leave_previous: the shared server keeps nayru; majora's own backend goes)."""
from __future__ import annotations

from pathlib import Path

import pytest

from loradeploy.pipeline import run_pipeline
from loradeploy.serving import record
from loradeploy.tools import proc
from tests.fixtures.servers import stop_model_servers
from tests.integration.test_adapter_mode import Load, ask, info, make_cfg, signs
from tests.integration.test_deploy import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODELS = ("majora", "nayru")


def _cfg(tmp: Path, base: Path, adapters: dict, ports: dict, majora_mode: str):
    return make_cfg(tmp, (base, adapters), ports=ports, modes={"majora": majora_mode})


def _run(cfg) -> None:
    result = run_pipeline(cfg, [])
    assert result.ok, result.to_dict()


def test_a_model_moves_between_adapter_and_merged_mode_under_load(tmp_path):
    from tests.fixtures.models import _build

    built = {p: _build("llama", p) for p in MODELS}
    base, adapters = built["majora"][0], {p: a for p, (_, a) in built.items()}
    ports = {m: free_port() for m in MODELS}
    cfg = _cfg(tmp_path, base, adapters, ports, "adapter")
    loads: list[Load] = []
    try:
        _run(cfg)
        reg = record.load(cfg)
        key = reg.models["majora"].group
        assert key and reg.models["nayru"].group == key
        shared = reg.groups[key].backend
        assert signs(ask(ports["majora"])) == {"majora"} and signs(ask(ports["nayru"])) == {"nayru"}

        loads = [Load(ports[m]) for m in MODELS]
        for load in loads:
            load.start()
        merged_cfg = _cfg(tmp_path, base, adapters, ports, "merged")  # majora: adapter -> merged
        _run(merged_cfg)
        reg = record.load(merged_cfg)
        m = reg.models["majora"]
        assert m.mode == "merged" and m.group is None and proc.alive(m.backend), m
        assert info(ports["majora"])["mode"] == "merged"
        assert signs(ask(ports["majora"])) == {"majora"} and signs(ask(ports["nayru"])) == {"nayru"}
        group = reg.groups[reg.models["nayru"].group]
        # nayru's server was not restarted: majora's adapter stays loaded there at scale 0 (and in the group's
        # record of what that server holds) until the group's next switch; majora is no member any more
        assert group.backend.pid == shared.pid and proc.alive(shared) and "nayru" in group.adapters, group
        own = m.backend

        _run(cfg)  # majora: merged -> adapter again; its own backend is stopped once the port moved
        reg = record.load(cfg)
        assert reg.models["majora"].mode == "adapter" and reg.models["majora"].group
        assert not proc.alive(own), "majora's merged backend outlived the move back to adapter mode"
        assert info(ports["majora"])["mode"] == "adapter"
        assert signs(ask(ports["majora"])) == {"majora"} and signs(ask(ports["nayru"])) == {"nayru"}
        for load in loads:
            load.stop.set()
            load.join(120)
        for port, load in zip(ports.values(), loads):
            assert load.ok > 0 and not load.failures, (port, load.failures[:5])
            wrong = [s for _, s in load.signed if s and len(s) != 1]
            assert not wrong, (port, wrong[:5])
    finally:
        for load in loads:
            load.stop.set()
        for m in MODELS:
            stop_model_servers(cfg, m)
