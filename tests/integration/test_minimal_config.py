"""A config as a user writes it (models and formats, nothing else), run from another folder.

Every default path (work_dir, state_dir, log_dir, models_dir, the samples, the reports) must land
beside the config, whatever folder the command runs in, so the servers, their workers and
evaluation's own servers find them. Then a format whose file breaks is a down evaluation target:
the run says so (ok false, exit 1, the reason in --json) instead of reporting ok.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loradeploy.config import load_config
from loradeploy.demo.run import DEMO_MAX_KLD
from loradeploy.demo.samples import write_demo_eval_samples
from loradeploy.evaluation.servers import free_port
from tests.fixtures.servers import stop_model_servers

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FORMATS = ["Q4_K_M", "Q8_0"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", "from loradeploy.cli import main; main()", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def project(tmp_path, llama_pair):
    base, adapter = llama_pair
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    proj.mkdir()
    elsewhere.mkdir()
    write_demo_eval_samples(proj / "eval_samples.jsonl", persona="majora", n=6)
    data = {"models": {"majora": {"base_model": str(base), "adapter": str(adapter), "port": free_port()}},
            "quantization": {"formats": FORMATS},
            # the one key beyond models and formats: the 2-layer toy model's own KLD limits (demo/run.py)
            "verify": {"max_kld": DEMO_MAX_KLD}}
    (proj / "deployment_config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(proj / "deployment_config.yaml")
    yield proj, elsewhere, cfg
    stop_model_servers(cfg, "majora")


def test_minimal_config_from_another_folder_serves_and_evaluates_every_format(project):
    proj, elsewhere, cfg = project
    rel = os.path.relpath(proj / "deployment_config.yaml", elsewhere)
    r = cli("run", "-c", rel, "--json", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    out = json.loads(r.stdout)
    stages = out["models"]["majora"]["stages"]
    assert out["ok"] and not out["degraded"]
    assert all(stages[s]["status"] == "done" for s in ("verify", "deploy", "health", "evaluate")), stages
    # every default path resolved against the config's folder, none against the shell's
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    for d in ("work", ".loradeploy", "logs", "models", "reports"):
        assert (proj / d).is_dir(), d
    runs = json.loads((proj / ".loradeploy" / "runs" / "majora.json").read_text())
    paths = [a["path"] for st in runs["stages"].values() for a in st.get("artifacts", [])]
    assert paths and all(Path(p).is_absolute() for p in paths), paths
    report = json.loads((proj / "reports" / "majora" / "evaluation.json").read_text())
    by_fmt = {t["target"]["format"]: t["status"] for t in report["targets"]}
    assert all(by_fmt.get(f) == "ok" for f in FORMATS), by_fmt

    # status from a third folder sees the same records and the live server
    third = proj.parent / "third"
    third.mkdir()
    st = cli("status", "-c", str(proj / "deployment_config.yaml"), "--json", cwd=third)
    assert st.returncode == 0, st.stderr
    assert "majora" in st.stdout and cfg.models["majora"].port == json.loads(r.stdout)["models"]["majora"][
        "stages"]["deploy"].get("info", {}).get("port", cfg.models["majora"].port)

    # a quantized file that no server can load: its evaluation target is down, and the run says so
    q8 = next(Path(p) for p in paths if p.endswith("-q8_0.gguf"))
    q8.write_bytes(b"GGUF" + b"\0" * 64)
    ev = cli("run", "-c", rel, "--only", "evaluate", "--force", "--json", cwd=elsewhere)
    assert ev.returncode == 1, ev.stderr[-2000:]
    res = json.loads(ev.stdout)
    assert res["ok"] is False and res["degraded"] is True, json.dumps(res["models"]["majora"]["stages"])[:3000]
    evs = res["models"]["majora"]["stages"]["evaluate"]
    assert evs["status"] == "degraded"
    assert "Q8_0" in evs["error"].upper() and "down" in evs["error"], evs
    md = (proj / "reports" / "majora" / "evaluation.md").read_text()
    assert "down: " in md  # the report's row gives the reason
    # `loradeploy evaluate` on its own says the same by its exit code and JSON
    alone = cli("evaluate", "-c", rel, "--json", cwd=elsewhere)
    assert alone.returncode == 1, alone.stderr[-2000:]
    got = json.loads(alone.stdout)
    assert got["ok"] is False and any("Q8_0" in f.upper() for f in got["failures"]), got["failures"]
