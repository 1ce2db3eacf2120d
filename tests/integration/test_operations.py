"""Operations: three models in one run, notifications on a forced failure, logs, cleanup."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loradeploy.config import config_from_dict
from loradeploy.pipeline import run_pipeline
from tests.fixtures.receivers import free_port


def three_model_cfg(tmp: Path, base: Path, adapter: Path, stages, **sections) -> tuple[dict, Path]:
    ports = [free_port() for _ in range(3)]
    data = {
        "models": {name: {"base_model": str(base), "adapter": str(adapter), "port": port,
                          "system_prompt": f"You are {name.capitalize()}."}
                   for name, port in zip(("majora", "nayru", "veran"), ports)},
        "quantization": {"formats": ["Q8_0"]},
        "deployment": {"models_dir": str(tmp / "models"), "llamacpp": {"n_ctx": 256, "startup_timeout_s": 120}},
        "health_check": {"test_prompts": ["Repeat these words:\napple river stone"], "max_tokens": 16, "min_free_disk_gb": 0.1,
                         "min_free_memory_gb": 0.1},
        "pipeline": {"stages": list(stages), "work_dir": str(tmp / "work"), "state_dir": str(tmp / "state")},
        "logging": {"log_dir": str(tmp / "logs")},
        "performance": {"min_free_disk_gb": 0.1, "parallel_downloads": 3},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    path = tmp / "deployment_config.yaml"
    path.write_text(yaml.safe_dump(data))
    return data, path


@pytest.mark.slow
def test_three_models_one_run_three_servers(llama_pair, tmp_path):
    from loradeploy.serving import serve_status, serve_stop
    base, adapter = llama_pair
    data, path = three_model_cfg(tmp_path, base, adapter,
                                 ["fetch", "merge", "convert", "quantize", "deploy", "health"])
    cfg = config_from_dict(data, base_dir=tmp_path)
    try:
        res = run_pipeline(cfg, [])
        assert res.ok, json.dumps(res.to_dict(), indent=1)[:3000]
        assert set(res.models) == {"majora", "nayru", "veran"}
        rows = {r["model"]: r for r in serve_status(cfg)}
        assert {rows[m]["state"] for m in rows} == {"running"}
        assert sorted(rows[m]["port"] for m in rows) == sorted(m["port"] for m in data["models"].values())
        for m, spec in data["models"].items():
            with socket.create_connection(("127.0.0.1", spec["port"]), timeout=5):
                pass
        # one summary for the whole run, naming all three models
        summary = (tmp_path / "logs" / "pipeline_summary.log").read_text()
        assert summary.count("== run") == 1
        assert all(m in summary for m in ("majora", "nayru", "veran"))
        # per-model, per-stage logs
        for m in ("majora", "nayru", "veran"):
            assert (tmp_path / "logs" / m / "quantize.log").exists()
        r = subprocess.run([sys.executable, "-m", "loradeploy.cli", "status", "-c", str(path), "--json"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert {m: st["models"][m]["server"]["state"] for m in st["models"]} == \
            {"majora": "running", "nayru": "running", "veran": "running"}
    finally:
        serve_stop(cfg)


def test_forced_failure_notifies_each_channel_once(llama_pair, tmp_path, http_receiver, smtp_plain):
    _, adapter = llama_pair
    data = {
        "models": {"majora": {"base_model": str(tmp_path / "missing-base"), "adapter": str(adapter), "port": 5000}},
        "pipeline": {"stages": ["fetch", "merge", "convert"], "work_dir": str(tmp_path / "work"),
                     "state_dir": str(tmp_path / "state")},
        "logging": {"log_dir": str(tmp_path / "logs")},
        "notifications": {
            "enabled": True,
            "slack": {"webhook_url": http_receiver.url("/slack/T000/B000/SECRETSLACKTOKEN")},
            "discord": {"webhook_url": http_receiver.url("/discord/123/SECRETDISCORDTOKEN")},
            "email": {"smtp_host": "127.0.0.1", "smtp_port": smtp_plain.port, "security": "none",
                      "from_addr": "ld@example.com", "to_addrs": ["team@example.com"]},
        },
    }
    path = tmp_path / "deployment_config.yaml"
    path.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "loradeploy.cli", "run", "-c", str(path), "--model", "majora"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    reqs = http_receiver.wait_for(4)
    slack = [q.json() for q in reqs if q.path.startswith("/slack")]
    discord = [q.json() for q in reqs if q.path.startswith("/discord")]

    def failures(payloads):
        return [p for p in payloads if "majora: merge failed" in json.dumps(p)]

    assert len(slack) == 2 and len(discord) == 2          # stage_failed + run_finished
    assert len(failures(slack)) == 1 and len(failures(discord)) == 1
    assert "base model folder" in json.dumps(slack[0])
    mails = smtp_plain.wait_for(2)
    assert len(mails) == 2
    subjects = [m.message["Subject"] for m in mails]
    assert sum("majora: merge failed" in s for s in subjects) == 1, subjects
    # secrets never reach the logs
    logs = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*.log"))
    assert "SECRETSLACKTOKEN" not in logs and "SECRETDISCORDTOKEN" not in logs


def test_logs_command_and_clean_dry_run(llama_pair, tmp_path):
    base, adapter = llama_pair
    data, path = three_model_cfg(tmp_path, base, adapter, ["fetch"])
    cfg = config_from_dict(data, base_dir=tmp_path)
    assert run_pipeline(cfg, ["majora"]).ok
    r = subprocess.run([sys.executable, "-m", "loradeploy.cli", "logs", "-c", str(path), "--model", "majora",
                        "--stage", "fetch"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "fetch" in r.stdout
    r = subprocess.run([sys.executable, "-m", "loradeploy.cli", "logs", "-c", str(path), "--model", "nayru",
                        "--stage", "merge"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no merge log for nayru" in r.stderr
    stale = tmp_path / "work" / "majora" / "gguf" / ".x.gguf.9999999.loradeploy-tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"x" * 1000)
    r = subprocess.run([sys.executable, "-m", "loradeploy.cli", "clean", "-c", str(path), "--dry-run", "--json"],
                       capture_output=True, text=True, timeout=60)
    items = json.loads(r.stdout)["items"]
    assert [i["path"] for i in items] == [str(stale)] and items[0]["size"] == 1000
    assert stale.exists()
