"""Bad adapters and hostile conditions through the CLI: each gives one line naming the problem and a
non-zero exit, never a traceback; a full disk exits 3 with nothing half-written; a killed run's
partial files are removed by the next run of that model, a live run's never.
(test_bad_inputs covers missing folders, pickles, shape mismatches, disk preflight, the converter.)"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from loradeploy.fsutil import TMP_MARK
from tests.cli.helpers import invoke
from tests.integration.test_fetch import small_fs  # noqa: F401 - a 6 MiB tmpfs (root), else the test skips
from tests.integration.test_pipeline import make_cfg

WEIGHTS = "adapter_model.safetensors"


def run_cli(tmp: Path, *extra: str):
    """`loradeploy run --json` on the config make_cfg wrote; (exit code, the majora stages, stdout+stderr)."""
    r = invoke("run", "-c", str(tmp / "deployment_config.yaml"), "--model", "majora", "--json", *extra)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    stages = json.loads(r.stdout)["models"]["majora"]["stages"]
    return r.exit_code, stages, out


def failed_line(tmp: Path, stage: str = "merge", *, code: int = 1) -> str:
    """The one-line error of ``stage`` (the only failure) when the configured run goes through the CLI."""
    exit_code, st, out = run_cli(tmp)
    assert exit_code == code, out
    assert st[stage]["status"] == "failed", st
    err = st[stage]["error"]
    assert "\n" not in err and "crashed" not in err, err
    return err


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_raw_safetensors(path: Path, header, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def setup(tmp: Path, base: Path, adapter: Path, stages=("fetch", "merge")):
    return make_cfg(tmp, base, adapter, stages=list(stages))


# ----------------------------------------------------------------------------- the weights file

@pytest.mark.parametrize("header, words", [
    ([1, 2, 3], ["safetensors header is a JSON list"]),
    ("just a string", ["safetensors header is a JSON string"]),
    ({"base_model.model.x.lora_A.weight": [0, 4]}, ["x.lora_A.weight", "is a JSON list, not an object"]),
    ({"base_model.model.x.lora_A.weight": {"dtype": "F32", "shape": [2, "a"], "data_offsets": [0, 8]}},
     ["no valid shape"]),
    ({"base_model.model.x.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}},
     ["holds 8 bytes", "needs 16"]),
])
def test_bad_safetensors_header(llama_pair, tmp_path, header, words):
    base, adapter = llama_pair
    bad = copy_adapter(adapter, tmp_path / "bad")
    write_raw_safetensors(bad / WEIGHTS, header, b"\0" * 16)
    setup(tmp_path, base, bad)
    err = failed_line(tmp_path)
    for w in words:
        assert w in err, err
    assert "safe_serialization=True" in err


# ----------------------------------------------------------------------------- adapter_config.json

def _with_config(adapter: Path, dst: Path, edit) -> Path:
    bad = copy_adapter(adapter, dst)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    new = edit(cfg)
    (bad / "adapter_config.json").write_text(json.dumps(cfg if new is None else new))
    return bad


@pytest.mark.parametrize("edit, words", [
    (lambda c: [], ["adapter_config.json holds a JSON list, not an object"]),
    (lambda c: "r=16", ["adapter_config.json holds a JSON string"]),
    (lambda c: c.pop("r") and None, ["r = None is not a positive rank"]),
    (lambda c: c.update(r="16"), ["r = '16' is not a positive rank"]),
    (lambda c: c.update(r=0), ["r = 0 is not a positive rank"]),
    (lambda c: c.update(r=-4), ["r = -4 is not a positive rank"]),
    (lambda c: c.update(r=2.5), ["r = 2.5 is not a positive rank"]),
    (lambda c: c.update(lora_alpha="sixteen"), ["lora_alpha = 'sixteen' is not a number"]),
    (lambda c: c.update(lora_alpha=None), ["lora_alpha = None is not a number"]),
    (lambda c: c.update(rank_pattern={"q_proj": "8"}), ["rank_pattern['q_proj'] = '8' is not a positive rank"]),
    (lambda c: c.update(rank_pattern=[]), ["rank_pattern is a JSON list"]),
    (lambda c: c.update(r=c["r"] * 2), ["in the weights but", "adapter_config.json"]),
])
def test_bad_adapter_config(llama_pair, tmp_path, edit, words):
    base, adapter = llama_pair
    setup(tmp_path, base, _with_config(adapter, tmp_path / "bad", edit))
    err = failed_line(tmp_path)
    for w in words:
        assert w in err, err
    assert not (tmp_path / "work" / "majora" / "merged").exists()


# ----------------------------------------------------------------------------- NaN / Inf in the weights

def _poisoned(adapter: Path, dst: Path, value: float, part: str) -> tuple[Path, str]:
    bad = copy_adapter(adapter, dst)
    w = load_file(str(bad / WEIGHTS))
    key = sorted(k for k in w if part in k)[-1]    # the last layer's: found before anything is written
    w[key] = w[key].clone()
    w[key].view(-1)[3] = value
    save_file(w, str(bad / WEIGHTS))
    return bad, key


@pytest.mark.parametrize("value, part, what", [(float("nan"), "lora_B", "NaN"), (float("inf"), "lora_A", "Inf")])
def test_non_finite_weights_named_at_merge(llama_pair, tmp_path, value, part, what):
    base, adapter = llama_pair
    bad, key = _poisoned(adapter, tmp_path / "bad", value, part)
    setup(tmp_path, base, bad)
    err = failed_line(tmp_path)
    assert f"adapter tensor {key} holds {what} (1 of" in err and "earlier checkpoint" in err, err
    assert "chat template" not in err
    assert not (tmp_path / "work" / "majora" / "merged").exists()
    assert not list((tmp_path / "work" / "majora").glob(f"*{TMP_MARK}"))


def test_non_finite_weights_named_on_the_fused_path(llama_pair, tmp_path):
    # merge + convert fused: the merge happens inside convert, and the check runs before the first tensor
    base, adapter = llama_pair
    bad, key = _poisoned(adapter, tmp_path / "bad", float("nan"), "lora_A")
    setup(tmp_path, base, bad, stages=("fetch", "merge", "convert"))
    err = failed_line(tmp_path, "convert")
    assert f"adapter tensor {key} holds NaN" in err, err
    gguf = tmp_path / "work" / "majora" / "gguf"
    assert not gguf.exists() or not list(gguf.iterdir()), "nothing half-written is left"


# ----------------------------------------------------------------------------- a full disk

def fill(disk: Path, leave: int) -> None:
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        left = max(0, free - leave)
        while left > 0:
            n = f.write(chunk[:min(left, len(chunk))])
            left -= n


def _no_partials(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if TMP_MARK in p.name or ".fused-" in p.name], list(folder.rglob("*"))


def _disk_cfg(tmp: Path, base: Path, adapter: Path, disk: Path, stages, monkeypatch) -> None:
    """work_dir on ``disk``; the disk preflight sees room (it would refuse this disk up front, see
    test_bad_inputs): here the disk fills while an output is written, as when something else takes
    the space during the run."""
    make_cfg(tmp, base, adapter, stages=list(stages), performance={"min_free_disk_gb": 0})
    cfg_file = tmp / "deployment_config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace(str(tmp / "work"), str(disk / "work")))
    monkeypatch.setattr("loradeploy.resources.free_bytes", lambda path: 2**50)


def test_disk_full_mid_convert_exits_3(llama_pair, tmp_path, monkeypatch, small_fs):
    base, adapter = llama_pair
    _disk_cfg(tmp_path, base, adapter, small_fs, ("fetch", "merge", "convert"), monkeypatch)
    code, st, out = run_cli(tmp_path, "--only", "fetch", "--only", "merge")   # fused: merge writes nothing
    assert code == 0 and st["merge"]["status"] == "done", out
    fill(small_fs, 256 * 1024)   # the F16 GGUF does not fit
    err = failed_line(tmp_path, "convert", code=3)
    assert err.startswith("no space left on the disk while writing ") and ".gguf" in err, err
    assert "partial file was removed" in err and "pipeline.work_dir" in err
    _no_partials(small_fs / "work")


def test_disk_full_mid_quantize_exits_3(llama_pair, tmp_path, monkeypatch, small_fs):
    base, adapter = llama_pair
    _disk_cfg(tmp_path, base, adapter, small_fs, ("fetch", "merge", "convert", "quantize"), monkeypatch)
    code, st, out = run_cli(tmp_path, "--only", "fetch", "--only", "merge", "--only", "convert")
    assert code == 0, out
    fill(small_fs, 64 * 1024)
    err = failed_line(tmp_path, "quantize", code=3)
    assert "no space left on the disk while writing" in err, err
    _no_partials(small_fs / "work")


def test_disk_full_is_simulated_where_no_tmpfs(llama_pair, tmp_path, monkeypatch):
    # the same mapping without mounting: the write itself raises ENOSPC at the file boundary
    from loradeploy import fsutil
    base, adapter = llama_pair
    setup(tmp_path, base, adapter, stages=("fetch", "merge"))
    real = fsutil.HashingWriter._put

    def put(self, data):
        if self.nbytes > 4096:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real(self, data)

    monkeypatch.setattr(fsutil.HashingWriter, "_put", put)
    err = failed_line(tmp_path, "merge", code=3)
    assert err.startswith("disk quota exceeded while writing ") and "merged" in err, err
    _no_partials(tmp_path / "work")


# ----------------------------------------------------------------------------- a killed run's partial files

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_run_removes_a_killed_runs_partials_not_a_live_ones(llama_pair, tmp_path):
    base, adapter = llama_pair
    setup(tmp_path, base, adapter, stages=("fetch",))
    gguf = tmp_path / "work" / "majora" / "gguf"
    gguf.mkdir(parents=True)
    dead = _dead_pid()
    stale_file = gguf / f".majora_v1-q4_k_m.gguf.{dead}{TMP_MARK}"
    stale_file.write_bytes(b"x" * 4096)
    stale_dir = tmp_path / "work" / "majora" / f".merged.{dead}{TMP_MARK}"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "model.safetensors").write_bytes(b"y" * 4096)
    fused = gguf / f".fused-abc.{dead}{TMP_MARK}"
    fused.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live_proc:
        try:
            live = gguf / f".majora_v1-q8_0.gguf.{live_proc.pid}{TMP_MARK}"
            live.write_bytes(b"z")
            code, st, out = run_cli(tmp_path)
            assert code == 0, out
            assert not stale_file.exists() and not stale_dir.exists() and not fused.exists()
            assert live.exists(), "a live writer's partial file is never removed"
            log = (tmp_path / "logs").rglob("*.log")
            assert any(str(stale_file) in p.read_text() for p in log)
        finally:
            live_proc.kill()
    # `clean` takes it once its writer is gone
    r = invoke("clean", "-c", str(tmp_path / "deployment_config.yaml"), "--json")
    assert r.exit_code == 0 and str(live) in r.stdout and not live.exists()
