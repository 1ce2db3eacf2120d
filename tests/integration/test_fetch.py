"""Fetch stage against a real sshd on 127.0.0.1 (tests/fixtures/sshd.py)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from loradeploy.config import config_from_dict
from loradeploy.errors import FetchError, InputError, ResourceError
from loradeploy.fetch import fetch_adapter
from loradeploy.pipeline import run_pipeline
from loradeploy.stages.base import ModelPaths, StageContext
from loradeploy.stages.fetch import FetchStage
from loradeploy.tools.vastai import resolve_instance
from tests.fixtures.sshd import keygen, throttled_rsync, vast_instance_row

ADAPTER_CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                             "base_model_name_or_path": "tiny-base",
                             "target_modules": ["q_proj", "v_proj"]}).encode()


def adapter_files(weights_size: int = 3 << 20, seed: int = 1) -> dict[str, bytes]:
    return {
        "adapter_config.json": ADAPTER_CONFIG,
        "adapter_model.safetensors": os.urandom(weights_size) if seed else b"\0" * weights_size,
        "tokenizer_config.json": b'{"model_max_length": 2048}',
        "special_tokens_map.json": b'{"eos_token": "</s>"}',
        "trainer_state.json": b'{"global_step": 100}',
        "training_args.bin": b"\x80\x04pickle",       # pickle: never fetched
        "optimizer.pt": b"not needed",                 # not on the allow-list
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_cfg(tmp_path: Path, server, adapter: str, *, vast: dict | None = None, perf: dict | None = None,
             extra_models: dict | None = None, known_hosts: bool = True):
    kh = tmp_path / "state" / "known_hosts"
    if known_hosts and server is not None:
        server.write_known_hosts(kh)
    models = {"majora": {"base_model": str(tmp_path / "base"), "adapter": adapter, "port": 5000}}
    models.update(extra_models or {})
    data = {
        "vast": {"ssh_key": str(server.client_key) if server else None, "known_hosts": str(kh),
                 "ssh_user": server.user if server else "root", "connect_timeout_s": 5, **(vast or {})},
        "pipeline": {"work_dir": str(tmp_path / "work"), "state_dir": str(tmp_path / "state")},
        "logging": {"log_dir": str(tmp_path / "logs")},
        "performance": {"min_free_disk_gb": 0, **(perf or {})},
        "models": models,
    }
    return config_from_dict(data, base_dir=tmp_path)


def adapter_dir(tmp_path: Path, model: str = "majora") -> Path:
    return tmp_path / "work" / model / "adapter"


def kill_transfer_link() -> bool:
    """Drop the link under a running rsync: SIGKILL its ssh child (not the hash job's ssh)."""
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() == "ssh" and "--server" in " ".join(p.cmdline()):
                p.send_signal(signal.SIGKILL)
                return True
        except psutil.Error:
            continue
    return False


# ----------------------------------------------------------------------------- happy paths

def test_fetch_over_rsync_verifies_and_writes_metadata(tmp_path, sshd):
    files = adapter_files()
    run = sshd.make_run("run-1", files)
    cfg = make_cfg(tmp_path, sshd, sshd.url(run))
    seen = []
    meta = fetch_adapter(cfg, "majora", progress=lambda d, c, t: seen.append((d, c, t))).meta

    out = adapter_dir(tmp_path)
    wanted = ["adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
              "special_tokens_map.json", "trainer_state.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(wanted + ["metadata.json"])
    for name in wanted:
        assert (out / name).read_bytes() == files[name]
    on_disk = json.loads((out / "metadata.json").read_text())
    assert on_disk == meta
    assert meta["tool"] == "rsync" and meta["verified_sha256"] is True
    assert meta["remote_path"] == str(run.resolve())
    assert meta["source"] == sshd.url(run)
    assert meta["instance"] == {"host": "127.0.0.1", "port": sshd.port, "user": sshd.user}
    assert {f["name"]: (f["size"], f["sha256"]) for f in meta["files"]} == \
        {n: (len(files[n]), sha(files[n])) for n in wanted}
    assert meta["seconds"] > 0 and meta["mib_per_s"] > 0 and meta["fetched_at"].endswith("+00:00")
    assert meta["skipped_pickles"] == ["training_args.bin"]
    assert seen and seen[-1][1] == seen[-1][2] == sum(len(files[n]) for n in wanted)
    assert not (tmp_path / "work" / "majora" / ".adapter.incoming").exists()

    # A second fetch finds everything in place: nothing but the file list crosses the link.
    meta2 = fetch_adapter(cfg, "majora").meta
    assert meta2["literal_bytes"] == 0 and meta2["bytes_transferred"] < 4096


def test_stage_returns_artifacts(tmp_path, sshd):
    files = adapter_files(1 << 20)
    run = sshd.make_run("r", files)
    cfg = make_cfg(tmp_path, sshd, sshd.url(run))
    paths = ModelPaths(tmp_path / "work" / "majora", "majora", "v1")
    ctx = StageContext(cfg, "majora", logging.getLogger("t"), tmp_path / "logs" / "fetch.log", paths)
    stage = FetchStage()
    assert stage.inputs(ctx)["source"] == sshd.url(run)
    res = stage.run(ctx)
    kinds = {Path(a.path).name: a.kind for a in res.artifacts}
    assert kinds["metadata.json"] == "metadata" and kinds["adapter_model.safetensors"] == "adapter"
    art = next(a for a in res.artifacts if a.path.endswith(".safetensors"))
    assert art.sha256 == sha(files["adapter_model.safetensors"]) and art.intact()
    assert res.info["source"] == "ssh" and res.info["adapter_dir"] == str(paths.adapter)
    assert "rsync" in (tmp_path / "logs" / "fetch.log").read_text()


def test_local_adapter_is_validated_in_place(tmp_path):
    folder = tmp_path / "local-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(ADAPTER_CONFIG)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
    cfg = make_cfg(tmp_path, None, str(folder))
    ctx = StageContext(cfg, "majora", logging.getLogger("t"), tmp_path / "f.log",
                       ModelPaths(tmp_path / "work" / "majora", "majora", "v1"))
    res = FetchStage().run(ctx)
    assert res.info == {"source": "local", "adapter_dir": str(folder)}
    assert {Path(a.path).parent for a in res.artifacts} == {folder}
    assert not (tmp_path / "work").exists()

    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FetchError, match="refusing pickle"):
        FetchStage().run(ctx)
    (folder / "adapter_model.bin").unlink()
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"y")
    (folder / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(FetchError, match="outside"):
        FetchStage().run(ctx)
    with pytest.raises(InputError, match="not found"):
        fetch_adapter(make_cfg(tmp_path, None, str(tmp_path / "nope")), "majora")


def test_models_fetch_side_by_side_in_the_pipeline(tmp_path, sshd):
    # `loradeploy fetch --model majora --model nayru`: the pipeline's fetch phase, parallel_downloads wide
    a = sshd.make_run("a", adapter_files(1 << 20))
    b = sshd.make_run("b", adapter_files(1 << 20))
    cfg = make_cfg(tmp_path, sshd, sshd.url(a), perf={"parallel_downloads": 2},
                   extra_models={"nayru": {"base_model": str(tmp_path / "base"), "adapter": sshd.url(b),
                                           "port": 5001}})
    res = run_pipeline(cfg, ["majora", "nayru"], only=["fetch"])
    assert res.ok and res.stages == ["fetch"]
    assert {n: mo.stages["fetch"].info["tool"] for n, mo in res.models.items()} == \
        {"majora": "rsync", "nayru": "rsync"}
    assert (adapter_dir(tmp_path, "nayru") / "adapter_model.safetensors").read_bytes() == \
        (b / "adapter_model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- refusing bad content

def test_remote_pickle_only_and_outside_symlink_refused(tmp_path, sshd):
    run = sshd.make_run("pickled", {"adapter_config.json": ADAPTER_CONFIG, "adapter_model.bin": b"\x80\x04"})
    cfg = make_cfg(tmp_path, sshd, sshd.url(run))
    with pytest.raises(FetchError, match="refusing pickle weights adapter_model.bin"):
        fetch_adapter(cfg, "majora")
    run2 = sshd.make_run("linked", {"adapter_config.json": ADAPTER_CONFIG})
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (run2 / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(FetchError, match="symlink leads outside the run folder"):
        fetch_adapter(make_cfg(tmp_path, sshd, sshd.url(run2)), "majora")
    assert not adapter_dir(tmp_path).exists()


# ----------------------------------------------------------------------------- connection failures

def test_connection_refused(tmp_path, sshd):
    run = sshd.make_run("r", adapter_files(1024))
    port = sshd.port
    sshd.stop()
    cfg = make_cfg(tmp_path, sshd, sshd.url(run))
    with pytest.raises(FetchError, match=f"cannot connect to .*127.0.0.1:{port}: connection refused"):
        fetch_adapter(cfg, "majora")


def test_connect_timeout_is_bounded(tmp_path, sshd):
    # A socket that completes the TCP handshake (kernel backlog) but never speaks SSH.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cfg = make_cfg(tmp_path, sshd, f"ssh://{sshd.user}@127.0.0.1:{port}/workspace/output/r",
                       vast={"connect_timeout_s": 1})
        t0 = time.monotonic()
        with pytest.raises(FetchError, match="connect timeout: no SSH answer from .* within 1s"):
            fetch_adapter(cfg, "majora")
        assert time.monotonic() - t0 < 15


def test_auth_failure(tmp_path, sshd):
    run = sshd.make_run("r", adapter_files(1024))
    keygen(tmp_path / "stranger")
    cfg = make_cfg(tmp_path, sshd, sshd.url(run), vast={"ssh_key": str(tmp_path / "stranger")})
    with pytest.raises(FetchError, match="authentication failed for"):
        fetch_adapter(cfg, "majora")


def test_remote_path_missing(tmp_path, sshd):
    cfg = make_cfg(tmp_path, sshd, sshd.url(sshd.output_dir / "no-such-run"))
    with pytest.raises(FetchError, match="remote path missing: .*no-such-run does not exist"):
        fetch_adapter(cfg, "majora")


def test_unknown_host_key_strict_refused_accept_new_accepted(tmp_path, sshd):
    run = sshd.make_run("r", adapter_files(1024))
    cfg = make_cfg(tmp_path, sshd, sshd.url(run), known_hosts=False)
    with pytest.raises(FetchError, match="host key of .* is unknown and vast.host_key_policy is strict"):
        fetch_adapter(cfg, "majora")
    cfg = make_cfg(tmp_path, sshd, sshd.url(run), known_hosts=False, vast={"host_key_policy": "accept-new"})
    assert fetch_adapter(cfg, "majora").meta["tool"] == "rsync"
    kh = tmp_path / "state" / "known_hosts"
    # the key was recorded (possibly hashed), and strict now accepts it
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(kh)],
                           capture_output=True, text=True)
    assert sshd.host_key_pub.split()[1] in found.stdout
    fetch_adapter(make_cfg(tmp_path, sshd, sshd.url(run), known_hosts=False), "majora")


def test_changed_host_key_refused(tmp_path, sshd):
    run = sshd.make_run("r", adapter_files(1024))
    impostor = keygen(tmp_path / "other_host")
    for policy in ("strict", "accept-new"):
        cfg = make_cfg(tmp_path, sshd, sshd.url(run), known_hosts=False, vast={"host_key_policy": policy})
        sshd.write_known_hosts(tmp_path / "state" / "known_hosts", key=impostor)
        with pytest.raises(FetchError, match="host key of .* has CHANGED"):
            fetch_adapter(cfg, "majora")
    assert not adapter_dir(tmp_path).exists()


# ----------------------------------------------------------------------------- tool fallbacks, resume

def test_remote_without_rsync_falls_back_to_scp(tmp_path, sshd, caplog):
    files = adapter_files(2 << 20)
    run = sshd.make_run("r", files)
    sshd.restrict_tools(drop=("rsync",))
    cfg = make_cfg(tmp_path, sshd, sshd.url(run))
    with caplog.at_level(logging.WARNING):
        meta = fetch_adapter(cfg, "majora").meta
    assert meta["tool"] == "scp" and meta["verified_sha256"]
    assert "rsync is missing on the remote box: falling back to scp" in caplog.text
    got = adapter_dir(tmp_path) / "adapter_model.safetensors"
    assert got.read_bytes() == files["adapter_model.safetensors"]
    assert {f["name"]: f["sha256"] for f in meta["files"]}["adapter_model.safetensors"] == \
        sha(files["adapter_model.safetensors"])
    cfg = make_cfg(tmp_path, sshd, sshd.url(run), vast={"transfer": "rsync"})
    with pytest.raises(FetchError, match="rsync is missing on the remote box"):
        fetch_adapter(cfg, "majora")


def test_interrupted_transfer_resumes_with_only_the_rest(tmp_path, sshd):
    size = 8 << 20
    files = adapter_files(size)
    run = sshd.make_run("r", files)
    # The box sends at 4 MiB/s so the link can be dropped in the middle of the file.
    sshd.restrict_tools(add={"rsync": throttled_rsync(4096)})
    cfg = make_cfg(tmp_path, sshd, sshd.url(run))
    killed = []

    def progress(desc, done, total):
        if not killed and done > 2 << 20:
            killed.append(kill_transfer_link())

    with pytest.raises(FetchError, match="connection to .* was lost"):
        fetch_adapter(cfg, "majora", progress=progress)
    assert killed == [True]
    partial = tmp_path / "work" / "majora" / ".adapter.incoming" / ".rsync-partial" / "adapter_model.safetensors"
    have = partial.stat().st_size
    assert 1 << 20 < have < size
    assert not adapter_dir(tmp_path).exists()

    sshd.set_remote_path(None)
    meta = fetch_adapter(cfg, "majora").meta
    rest = sum(len(v) for k, v in files.items() if k not in ("training_args.bin", "optimizer.pt")) - have
    assert meta["resumed"] is True
    # only the rest crossed the link (plus protocol overhead), none of what was already here
    assert rest * 0.95 <= meta["literal_bytes"] <= rest + 64 * 1024
    assert meta["bytes_transferred"] <= rest + 256 * 1024
    assert meta["resumed_bytes"] == have
    assert (adapter_dir(tmp_path) / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]


# fake sha256sum on the box (hashlib: no coreutils needed): hashes, then the training job "rewrites" the weights
CHANGING_HASHER = """#!/bin/sh
for f; do :; done
"{python}" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest(), sys.argv[1])' "$f"
rc=$?
case "$f" in *adapter_model.safetensors)
  if [ ! -e "{flag}" ]; then
    {once}touch "{flag}"
    printf 'more weights' >> "$f"
  fi;;
esac
exit $rc
"""


def test_remote_change_after_hash_listed_is_caught_and_refetched(tmp_path, sshd, caplog):
    files = adapter_files(1 << 20)
    run = sshd.make_run("r", files)
    flag = tmp_path / "changed-once"
    sshd.restrict_tools(drop=("openssl", "shasum", "python3"),
                        add={"sha256sum": CHANGING_HASHER.format(flag=flag, once="", python=sys.executable)})
    cfg = make_cfg(tmp_path, sshd, sshd.url(run))
    with caplog.at_level(logging.WARNING):
        meta = fetch_adapter(cfg, "majora").meta
    assert "changed after it was listed" in caplog.text
    assert meta["refetched"] == ["adapter_model.safetensors"] and meta["remote_hasher"] == "sha256sum"
    new = files["adapter_model.safetensors"] + b"more weights"
    assert (adapter_dir(tmp_path) / "adapter_model.safetensors").read_bytes() == new
    assert {f["name"]: f["sha256"] for f in meta["files"]}["adapter_model.safetensors"] == sha(new)


def test_remote_that_keeps_changing_fails_with_both_hashes(tmp_path, sshd):
    run = sshd.make_run("r", adapter_files(1 << 20))
    flag = tmp_path / "never-created"
    sshd.restrict_tools(drop=("openssl", "shasum", "python3"),
                        add={"sha256sum": CHANGING_HASHER.format(flag=flag, once=": ", python=sys.executable)})
    cfg = make_cfg(tmp_path, sshd, sshd.url(run))
    with pytest.raises(FetchError, match=r"changed after it was listed.*remote sha256 [0-9a-f]{64}, "
                                         r"local [0-9a-f]{64}.*still wrong after a re-fetch"):
        fetch_adapter(cfg, "majora")
    assert not adapter_dir(tmp_path).exists()


# ----------------------------------------------------------------------------- local disk

def test_disk_floor_checked_before_transfer(tmp_path, sshd):
    run = sshd.make_run("r", adapter_files(1 << 20))
    cfg = make_cfg(tmp_path, sshd, sshd.url(run), perf={"min_free_disk_gb": 10 ** 6})
    with pytest.raises(ResourceError, match="not enough disk for the majora adapter"):
        fetch_adapter(cfg, "majora")
    partial = tmp_path / "work" / "majora" / ".adapter.incoming"
    assert not any(p.is_file() for p in partial.rglob("*"))


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_transfer(tmp_path, sshd, small_fs):
    files = adapter_files(4 << 20)
    run = sshd.make_run("r", files)
    sshd.restrict_tools(add={"rsync": throttled_rsync(2048)})
    cfg = make_cfg(tmp_path, sshd, sshd.url(run))
    cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"work_dir": small_fs})})
    filled = []

    def progress(desc, done, total):
        # another process fills the disk once the transfer is under way
        if not filled and done > 0:
            filled.append(True)
            with open(small_fs / "filler", "wb") as f:
                try:
                    f.write(b"\0" * (4 << 20))
                except OSError:
                    pass

    with pytest.raises(ResourceError, match="local disk full while fetching"):
        fetch_adapter(cfg, "majora", progress=progress)
    assert not (small_fs / "majora" / "adapter").exists()


# ----------------------------------------------------------------------------- vast.ai

def test_vast_instance_resolved_through_api_newest_run(tmp_path, sshd, vast_api, monkeypatch):
    old = sshd.make_run("old-run", adapter_files(1024), mtime=time.time() - 600)
    new_files = adapter_files(1 << 20)
    new = sshd.make_run("new-run", new_files)
    sshd.make_run("newest-but-empty", {"notes.txt": b"no adapter here"})
    vast_api.rows[31337] = vast_instance_row(31337, ssh_host="127.0.0.1", ssh_port=sshd.port)
    monkeypatch.setenv("VAST_API_KEY", vast_api.api_key)
    cfg = make_cfg(tmp_path, sshd, "vast://31337",
                   vast={"api_url": vast_api.url, "remote_output_dir": str(sshd.output_dir)})
    meta = fetch_adapter(cfg, "majora").meta
    assert meta["remote_path"] == str(new.resolve()) and old.name not in meta["remote_path"]
    assert meta["instance"]["id"] == 31337 and meta["instance"]["direct"] is False
    assert any(r.startswith("/api/v0/instances/31337/") for r in vast_api.requests)
    # --instance-id overrides the configured source; a named run is taken as given
    cfg2 = make_cfg(tmp_path, sshd, sshd.url(old), vast={"api_url": vast_api.url,
                                                         "remote_output_dir": str(sshd.output_dir),
                                                         "run": "old-run"})
    meta2 = fetch_adapter(cfg2, "majora", instance_id=31337).meta
    assert meta2["remote_path"] == str(old.resolve()) and meta2["source"] == "vast://31337/old-run"


def test_vast_lookup_errors_and_direct_port(vast_api, monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    with pytest.raises(FetchError, match="no vast.ai API key"):
        resolve_instance(1, api_url=vast_api.url)
    with pytest.raises(FetchError, match="rejected the API key"):
        resolve_instance(1, api_key="wrong", api_url=vast_api.url)
    with pytest.raises(FetchError, match="instance 2 not found"):
        resolve_instance(2, api_key=vast_api.api_key, api_url=vast_api.url)
    vast_api.rows[3] = vast_instance_row(3, ssh_host="ssh5.vast.example", ssh_port=10003, status="exited")
    with pytest.raises(FetchError, match="instance 3 is exited, not running"):
        resolve_instance(3, api_key=vast_api.api_key, api_url=vast_api.url)
    vast_api.rows[4] = vast_instance_row(4, ssh_host="ssh5.vast.example", ssh_port=10004,
                                         direct_port=40022, public_ip="198.51.100.9")
    ep = resolve_instance(4, api_key=vast_api.api_key, api_url=vast_api.url)
    assert (ep.host, ep.port, ep.direct) == ("198.51.100.9", 40022, True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(FetchError, match="cannot reach the vast.ai API"):
        resolve_instance(4, api_key="k", api_url=dead, timeout=2)
