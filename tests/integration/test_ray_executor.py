"""The Ray executor on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster).

Custom resources force placement: heavy stages ask for `build`, which only the worker nodes have
(one task each at a time, so three models must spread over them); the node-kill test's quantize
asks for `quant`, which only the node about to be killed has until its replacement joins.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from loradeploy.config import config_from_dict
from loradeploy.fsutil import TMP_MARK
from loradeploy.pipeline import run_pipeline

ray = pytest.importorskip("ray", reason="the Ray executor is an optional extra: pip install -e '.[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MODELS = ("majora", "nayru", "veran")
STAGES = ["fetch", "merge", "convert", "quantize"]
FORMATS = ["Q4_K_M", "Q8_0"]
GIB = 2**30


@pytest.fixture(scope="module")
def personas():
    """(base, {persona: adapter}) for the tiny Llama: three adapters on one base."""
    from tests.fixtures.models import _build
    pairs = {p: _build("llama", p) for p in MODELS}
    return pairs["majora"][0], {p: a for p, (_, a) in pairs.items()}


def make_cfg(tmp: Path, personas, *, models=MODELS, executor="ray", address=None, storage=True, perf=None,
             stages=STAGES, quant=None):
    base, adapters = personas
    performance = {"min_free_disk_gb": 0.1, "max_cpu_threads": 1, "executor": executor, **(perf or {})}
    if executor == "ray":
        ray_sec = performance.setdefault("ray", {})
        ray_sec.setdefault("address", address)
        if storage:
            ray_sec.setdefault("storage", str(tmp / "shared"))
    data = {
        "models": {m: {"base_model": str(base), "adapter": str(adapters[m]), "port": 5000 + i,
                       "system_prompt": f"You are {m.capitalize()}."} for i, m in enumerate(models)},
        "quantization": {"formats": FORMATS, **(quant or {})},
        "pipeline": {"stages": list(stages), "work_dir": str(tmp / "work"), "state_dir": str(tmp / "state")},
        "logging": {"log_dir": str(tmp / "logs")},
        "performance": performance,
    }
    if "verify" in stages:
        from loradeploy.demo import write_demo_eval_samples
        write_demo_eval_samples(tmp / "eval_samples.jsonl", persona="majora")
        data["evaluation"] = {"samples": str(tmp / "eval_samples.jsonl")}
    return config_from_dict(data, base_dir=tmp)


def digests(result) -> dict[str, dict[str, str]]:
    return {m: {a["format"]: a["sha256"] for a in mo.artifacts} for m, mo in result.models.items()}


@pytest.fixture(scope="module")
def reference(personas, tmp_path_factory):
    """The local executor's artifacts for the same plan: what every Ray run must reproduce."""
    tmp = tmp_path_factory.mktemp("local")
    res = run_pipeline(make_cfg(tmp, personas, executor="local"), [])
    assert res.ok, res.to_dict()
    return digests(res)


@pytest.fixture(scope="module")
def cluster():
    """A head (no `build`: the driver's node) and two workers that each fit one heavy task at a time."""
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "memory": 2 * GIB, "node_name": "head", "include_dashboard": False})
    workers = {name: c.add_node(num_cpus=1, memory=2 * GIB, resources={"build": 1}, node_name=name)
               for name in ("worker-a", "worker-b")}
    c.wait_for_nodes()
    yield c, workers
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def _no_partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TMP_MARK in p.name]


def test_three_models_across_nodes_match_local(cluster, personas, reference, tmp_path):
    c, _ = cluster
    build = {"build": 1}
    cfg = make_cfg(tmp_path, personas, address=c.address, stages=[*STAGES, "verify"],
                   perf={"ray": {"stage_resources": {s: build for s in ("merge", "convert", "quantize", "verify")}}})
    res = run_pipeline(cfg, [])
    assert res.ok, res.to_dict()
    assert digests(res) == reference
    out = res.to_dict()
    nodes = set()
    for m in MODELS:
        for s in ("merge", "convert", "quantize", "verify"):
            info = out["models"][m]["stages"][s]["info"]
            assert info["executor"] == "ray" and info["node"] in ("worker-a", "worker-b"), info
            assert info["ray"]["resources"] == build and info["ray"]["num_cpus"] == 1
            nodes.add(info["node_id"])
            assert res.models[m].stages[s].note.startswith("on worker-"), res.models[m].stages[s].note
        assert "executor" not in out["models"][m]["stages"]["fetch"].get("info", {})  # fetch stays here
    assert len(nodes) == 2  # packed onto both workers, never the head
    # artifacts on the storage; remote logs carried into the usual stage logs, nothing left behind
    for m in MODELS:
        assert all(Path(a["path"]).is_relative_to(tmp_path / "shared") for a in res.models[m].artifacts)
        log = (tmp_path / "logs" / m / "quantize.log").read_text()
        assert f"quantize of {m} on Ray node" in log and "quantize: done on this node" in log
        # verify ran on a node; the history it appends (what deploy's gate reads) reached the driver's state
        assert out["models"][m]["stages"]["verify"]["info"]["gate"]["verdict"]
        rows = (tmp_path / "state" / "verify" / f"{m}.history.jsonl").read_text().splitlines()
        assert len(rows) == 1 + len(FORMATS) and all(f'"model": "{m}"' in r for r in rows)  # F16 + each quant
    assert not list((tmp_path / "shared" / ".loradeploy-remote").rglob("*.history.jsonl"))
    assert not list((tmp_path / "shared" / ".loradeploy-remote" / "logs").rglob("*.log"))
    assert not _no_partials(tmp_path / "shared")
    # a restarted driver resumes by content: every stage is current
    again = run_pipeline(cfg, [])
    assert {s: o.status for s, o in again.models["majora"].stages.items()} == \
        {s: "skipped" for s in [*STAGES, "verify"]}


def test_worker_killed_mid_quantize(cluster, personas, reference, tmp_path):
    """quantize can only start on `doomed` (the spare's one CPU is held by a placeholder actor); once it
    is writing there, `doomed` is killed outright and the spare freed: Ray retries the task there."""
    c, _ = cluster
    doomed = c.add_node(num_cpus=1, memory=2 * GIB, resources={"quant": 1}, node_name="doomed")
    c.add_node(num_cpus=1, memory=2 * GIB, resources={"quant": 1, "spare_slot": 1}, node_name="spare")
    c.wait_for_nodes()
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)  # the pipeline then shares this driver connection

    @ray.remote(num_cpus=1, resources={"spare_slot": 1})
    class Placeholder:
        def ready(self) -> bool:
            return True

    hold = Placeholder.remote()
    assert ray.get(hold.ready.remote(), timeout=120)
    # llama.cpp's quantizer (a child process per format, seconds each) leaves time to kill the node mid-write;
    # it writes the same bytes as loradeploy's engine, so the reference still holds
    cfg = make_cfg(tmp_path, personas, models=("majora",), address=c.address, quant={"engine": "llama.cpp"},
                   perf={"ray": {"max_retries": 2, "stage_resources": {"merge": {"build": 1},
                                                                       "convert": {"build": 1},
                                                                       "quantize": {"quant": 1}}}})
    gguf_dir = tmp_path / "shared" / "majora" / "gguf"
    killed: dict = {}

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if gguf_dir.is_dir() and any(TMP_MARK in p.name and "q4_k_m" in p.name for p in gguf_dir.iterdir()):
                c.remove_node(doomed, allow_graceful=False)
                killed["at"] = time.monotonic()
                ray.kill(hold)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run_pipeline(cfg, ["majora"])
    t.join(timeout=60)
    assert "at" in killed, "quantize never started on the doomed node"
    assert res.ok, res.to_dict()
    q = res.to_dict()["models"]["majora"]["stages"]["quantize"]["info"]
    assert q["node"] == "spare", q
    assert digests(res)["majora"] == reference["majora"]
    assert not _no_partials(tmp_path / "shared")
    log = (tmp_path / "logs" / "majora" / "quantize.log").read_text()
    assert log.count("quantize of majora on Ray node") == 2  # both attempts' logs reached the driver


def test_request_larger_than_any_node_fails_at_once(cluster, personas, tmp_path):
    c, _ = cluster
    cfg = make_cfg(tmp_path, personas, models=("majora",), address=c.address, perf={"max_memory_gb": 1000})
    t0 = time.monotonic()
    res = run_pipeline(cfg, ["majora"])
    took = time.monotonic() - t0
    merge = res.models["majora"].stages["merge"]
    assert merge.status == "failed" and took < 60, (merge, took)
    err = merge.error
    assert "merge of majora asks for" in err and "1000.00 GiB memory" in err, err
    assert "more than any node" in err and "largest:" in err and "GiB memory" in err, err
    assert "\n" not in err
    assert res.models["majora"].stages["quantize"].status == "not_run"


def test_config_rules():
    from loradeploy.errors import ConfigError
    base = {"models": {"m": {"base_model": "/nonexistent/base", "adapter": "/nonexistent/a", "port": 5000}}}
    with pytest.raises(ConfigError, match="ray.storage"):
        config_from_dict({**base, "performance": {"executor": "ray", "ray": {"address": "ray://head:10001"}}})
    cfg = config_from_dict({**base, "performance": {"executor": "ray", "ray": {"address": "127.0.0.1:6379"}}})
    assert not cfg.performance.ray.remote
    assert config_from_dict(base).performance.executor == "local"
