"""macOS (the user's platform) cannot run here: each Linux-only call has a fallback, and each test
below takes that fallback on Linux by taking the Linux thing away — sys.platform, os.fdatasync,
/proc, GNU stat, a new rsync, apt-get — and checks what the Mac path does instead. The one that
needs real processes (a server dying with its supervisor without prctl) is in
tests/integration/test_macos_fallbacks_live.py."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loradeploy.errors import FetchError, MergeError
from loradeploy.tools import proc, procid

OLD_RSYNC = "rsync  version 2.6.9  protocol version 29\nCopyright (C) 1996-2006 by Andrew Tridgell, Wayne Davison, and others.\n"
OPENRSYNC = "openrsync: protocol version 29\nrsync version 2.6.9 compatible\n"
NEW_RSYNC = ("rsync  version 3.2.7  protocol version 31\nCapabilities:\n    64-bit files\n"
             "Compress list:\n    zstd lz4 zlibx zlib none\n")


def fake_tool(folder: Path, name: str, stdout: str = "", rc: int = 0, log: Path | None = None) -> Path:
    """An executable ``name`` in ``folder`` that prints ``stdout`` (and records its arguments)."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    record = f'echo "$@" >> "{log}"\n' if log else ""
    quoted = stdout.replace("'", "'\\''")
    p.write_text(f"#!/bin/sh\n{record}printf '%s' '{quoted}'\nexit {rc}\n")   # builtins only
    p.chmod(0o755)
    return p


# ----------------------------------------------------------------------------- process start times

def test_without_proc_a_record_is_named_by_create_time(tmp_path, monkeypatch):
    monkeypatch.setattr(procid, "PROC_ROOT", str(tmp_path / "no-proc"))
    child = proc.spawn([sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / "s.log")
    try:
        rec = child.as_record()
        assert rec["start_ticks"] is None and rec["create_time"] > 0
        assert proc.alive(rec)
        assert not proc.alive({**rec, "create_time": rec["create_time"] - 7.0})   # another process's start
        # a record written on Linux (ticks) read where /proc is missing: the create_time decides
        assert proc.alive({**rec, "start_ticks": 12345})
        proc.stop(rec, grace=5)
        assert not proc.alive(rec)
    finally:
        proc.stop(child, grace=1)


# ----------------------------------------------------------------------------- fsync

def test_datasync_without_fdatasync_uses_fsync(tmp_path, monkeypatch):
    from loradeploy import fsutil

    calls = []
    monkeypatch.delattr(os, "fdatasync", raising=False)
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    with open(tmp_path / "f", "wb") as f:
        fsutil.datasync(f.fileno())
        assert calls == [f.fileno()]


def test_full_sync_uses_f_fullfsync_and_falls_back_to_fsync(tmp_path, monkeypatch):
    from loradeploy import fsutil

    fsyncs, fcntls = [], []
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd))
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)   # macOS's value

    def fake_fcntl(fd, op, *a):
        fcntls.append(op)
        if refuse:
            raise OSError(45, "Operation not supported")   # as some network filesystems answer

    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    with open(tmp_path / "f", "wb") as f:
        refuse = False
        fsutil.full_sync(f.fileno())
        assert fcntls == [51] and fsyncs == []
        refuse = True
        fsutil.full_sync(f.fileno())
        assert fsyncs == [f.fileno()]
    monkeypatch.delattr(fcntl, "F_FULLFSYNC")
    fsyncs.clear()
    fsutil.atomic_write_text(tmp_path / "g", "x")      # Linux: plain fsync for the file (and its folder)
    assert fsyncs and (tmp_path / "g").read_text() == "x"


def test_fetch_watcher_hashes_and_syncs_without_fdatasync(tmp_path, monkeypatch):
    from loradeploy.fetch import watcher as w

    monkeypatch.delattr(os, "fdatasync", raising=False)
    monkeypatch.setattr(w, "SYNC_EVERY", 1)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    data = os.urandom(100_000)
    temp = tmp_path / ".adapter_model.safetensors.Ab12Cd"      # rsync's temp name
    temp.write_bytes(data)
    watch = w.Watcher(tmp_path, {"adapter_model.safetensors": len(data)}, lambda n: None, mode="rsync")
    watch._poll()
    os.replace(temp, tmp_path / "adapter_model.safetensors")
    watch._poll()
    assert synced, "the write-back went through os.fsync"
    assert watch.digest_for(tmp_path / "adapter_model.safetensors", "adapter_model.safetensors") == \
        hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- rsync

@pytest.fixture
def no_homebrew(monkeypatch, tmp_path):
    from loradeploy.tools import ssh_transfer

    monkeypatch.setattr(ssh_transfer, "HOMEBREW_RSYNC", (str(tmp_path / "brew" / "rsync"),))
    return tmp_path / "brew"


@pytest.mark.parametrize("banner, why", [(OLD_RSYNC, "version 2.6.9"), (OPENRSYNC, "openrsync")])
def test_macos_system_rsync_is_refused_and_homebrews_preferred(tmp_path, monkeypatch, no_homebrew, banner, why):
    from loradeploy.tools.ssh_transfer import local_rsync, parse_rsync_version

    assert parse_rsync_version(banner.splitlines())[0] == (2, 6, 9)
    system = fake_tool(tmp_path / "bin", "rsync", banner)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    found = local_rsync()
    assert found.path is None and found.rejected == (f"{system} ({why})",)
    brew = fake_tool(no_homebrew, "rsync", NEW_RSYNC)
    found = local_rsync()
    assert found.path == str(brew) and found.version == (3, 2, 7) and "zstd" in found.compress


def _listing(version=(3, 2, 7)):
    from loradeploy.tools.ssh_remote import RemoteListing

    return RemoteListing(run_dir="/r", rsync_version=version, rsync_compress=frozenset({"zstd"}))


def _cfg(tmp_path, transfer="auto"):
    from loradeploy.config import config_from_dict

    return config_from_dict({"vast": {"transfer": transfer},
                             "models": {"m": {"base_model": str(tmp_path), "adapter": "ssh://u@h/r", "port": 5000}}},
                            base_dir=tmp_path)


def test_old_local_rsync_falls_back_to_scp_or_refuses_when_rsync_is_required(tmp_path, monkeypatch, no_homebrew,
                                                                              caplog):
    from loradeploy.fetch.transfer import choose_tool
    from loradeploy.tools.ssh import SshTarget

    fake_tool(tmp_path / "bin", "rsync", OPENRSYNC)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    t, log = SshTarget("10.0.0.1"), logging.getLogger("t")
    with caplog.at_level(logging.WARNING):
        how = choose_tool(_cfg(tmp_path), _listing(), log, tmp_path / "f.log", t)
    assert how == {"tool": "scp", "zstd": False, "rsync": None}
    assert "rsync >= 3 is missing on this machine" in caplog.text and "openrsync" in caplog.text
    with pytest.raises(FetchError, match=r"rsync >= 3 is missing.*vast.transfer is rsync") as exc:
        choose_tool(_cfg(tmp_path, "rsync"), _listing(), log, tmp_path / "f.log", t)
    assert "vast.transfer: auto" in exc.value.hint
    # Homebrew's rsync appears: it is the one the transfer runs
    brew = fake_tool(no_homebrew, "rsync", NEW_RSYNC)
    how = choose_tool(_cfg(tmp_path), _listing(), log, tmp_path / "f.log", t)
    assert how == {"tool": "rsync", "zstd": True, "rsync": str(brew)}
    from loradeploy.tools.ssh_transfer import rsync_argv

    assert rsync_argv(t, "/r", tmp_path / "ff", tmp_path, compress=False, io_timeout=60, rsync=how["rsync"])[0] == str(brew)


def test_remote_rsync_older_than_3_means_scp(tmp_path, monkeypatch, no_homebrew):
    from loradeploy.fetch.transfer import choose_tool
    from loradeploy.tools.ssh import SshTarget

    fake_tool(tmp_path / "bin", "rsync", NEW_RSYNC)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    how = choose_tool(_cfg(tmp_path), _listing((2, 6, 9)), logging.getLogger("t"), tmp_path / "f.log",
                      SshTarget("10.0.0.1"))
    assert how["tool"] == "scp"


def test_install_hints_name_homebrew_on_macos(monkeypatch):
    from loradeploy.tools.ssh import install_hint

    assert install_hint("rsync") == "apt-get install rsync"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert install_hint("rsync") == "brew install rsync"


# ----------------------------------------------------------------------------- remote scripts: BSD stat

BSD_STAT = f"""#!/bin/sh
# BSD stat: -f FORMAT, and no -c (GNU's)
for a; do case "$a" in -c) echo "stat: illegal option -- c" >&2; exit 1;; esac; done
n=; for a; do n=$a; done
exec "{sys.executable}" -c 'import os, sys; st = os.stat(sys.argv[1]); print(st.st_size, int(st.st_mtime))' "$n"
"""


def test_remote_scripts_list_and_hash_with_bsd_stat(tmp_path):
    from loradeploy.tools.ssh_remote import HASH_SCRIPT, PROBE_SCRIPT
    from loradeploy.tools.ssh import marked

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "adapter_config.json").write_text("{}")
    (run_dir / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    os.utime(run_dir / "adapter_model.safetensors", (1_700_000_000, 1_700_000_000))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "stat").write_text(BSD_STAT)
    (bindir / "stat").chmod(0o755)
    for tool in ("ls", "readlink", "sha256sum"):     # the box's other tools
        os.symlink(shutil.which(tool), bindir / tool)
    env = {"PATH": str(bindir)}
    names = ["adapter_config.json", "adapter_model.safetensors"]

    def sh(script, args):
        out = proc.run(["/bin/sh", "-s", "--", *args], env=env, input_bytes=script.encode(), timeout=30)
        return marked(out.stdout)

    listed = sh(PROBE_SCRIPT, ["", "", str(run_dir), *names])
    files = {rest.split(" ", 2)[2]: rest.split(" ", 2)[:2] for tag, rest in listed if tag == "F"}
    assert files["adapter_model.safetensors"] == ["1000", "1700000000"]
    hashed = [rest.split(" ") for tag, rest in sh(HASH_SCRIPT, [str(run_dir), *names]) if tag == "H"]
    row = next(r for r in hashed if r[-1] == "adapter_model.safetensors")
    assert row[0] == hashlib.sha256(b"w" * 1000).hexdigest() and row[1:5] == ["1000", "1700000000"] * 2


# ----------------------------------------------------------------------------- torch device

@pytest.mark.parametrize("cuda, mps", [(False, True), (True, True), (False, False)])
def test_pick_device_takes_mps_for_the_merge_only(monkeypatch, cuda, mps):
    import torch

    from loradeploy.merge.peft import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    want_merge = "cuda" if cuda else "mps" if mps else "cpu"
    assert pick_device("auto", auto_mps=True) == want_merge
    assert pick_device("auto") == ("cuda" if cuda else "cpu")       # the verify reference: CPU float32
    assert pick_device("cpu", auto_mps=True) == "cpu"
    if mps:
        assert pick_device("mps") == "mps"                              # asked for by name
    else:
        with pytest.raises(MergeError, match="no Apple GPU"):
            pick_device("mps")


def test_verify_reference_on_mps_stays_float32(monkeypatch):
    import torch

    from loradeploy.verify.reference import _device_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert _device_dtype("auto") == ("cpu", torch.float32)
    assert _device_dtype("mps") == ("mps", torch.float32)


# ----------------------------------------------------------------------------- llama.cpp

def test_darwin_cpu_key_comes_from_sysctl_and_the_probe_is_skipped(tmp_path, monkeypatch):
    from loradeploy.llamacpp import runtime

    fake_tool(tmp_path / "bin", "sysctl", "Apple M2 Pro\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.delenv(runtime.MODE_ENV, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    runtime._machine.cache_clear()
    try:
        assert runtime._cpuinfo() == ("Apple M2 Pro", "")
        fp = runtime.fingerprint()
        assert fp["cpu"] == "Apple M2 Pro" and fp["amx"] == [] and fp["arch"]
        monkeypatch.setattr(runtime, "_decide_by_probe", lambda *a: pytest.fail("probed on macOS"))
        mode = runtime.decide(directory=tmp_path / "cache", refresh=True)
        assert (mode.name, mode.source) == ("default", "platform") and "macOS" in mode.describe()
        # a server that died of a signal in default mode still demotes the machine to safe, for good
        monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
        assert runtime.demote("killed by SIGBUS").name == "safe"
        runtime._DECIDED.clear()
        assert runtime.decide(directory=tmp_path / "cache").name == "safe"
    finally:
        runtime._machine.cache_clear()
        runtime._DECIDED.clear()


def test_metal_build_flags_on_darwin_only(monkeypatch):
    from loradeploy.llamacpp import build

    assert "-DGGML_METAL=ON" not in build.cmake_options()
    monkeypatch.setattr(sys, "platform", "darwin")
    opts = build.cmake_options()
    assert "-DGGML_METAL=ON" in opts and "-DGGML_METAL_EMBED_LIBRARY=ON" in opts
    assert "brew install cmake" in build._install_hint() and "xcode-select --install" in build._install_hint()


@pytest.mark.parametrize("layers, flag", [(0, "0"), (12, "12"), (-1, "all")])
def test_llama_server_always_gets_ngl(tmp_path, monkeypatch, layers, flag):
    """A Metal build offloads every layer when -ngl is left out: 0 must be written to mean the CPU."""
    from loradeploy.config import config_from_dict
    from loradeploy.llamacpp import runtime, tools
    from loradeploy.serving.backends import llama_server_argv

    monkeypatch.setattr(tools, "tool", lambda name: tmp_path / name)
    cfg = config_from_dict({"deployment": {"llamacpp": {"n_gpu_layers": layers}},
                            "models": {"m": {"base_model": str(tmp_path), "adapter": str(tmp_path), "port": 5000}}},
                           base_dir=tmp_path)
    argv = llama_server_argv(cfg, "m", tmp_path / "m.gguf", 8100, runtime.Mode("default", "env", "test"))
    assert argv[argv.index("-ngl") + 1] == flag


# ----------------------------------------------------------------------------- LM Studio

def _lms_cfg(tmp_path, **lmstudio):
    from loradeploy.config import config_from_dict

    return config_from_dict({"deployment": {"targets": ["lmstudio"], "lmstudio": lmstudio},
                             "models": {"m": {"base_model": str(tmp_path), "adapter": str(tmp_path), "port": 5000}}},
                            base_dir=tmp_path)


def test_lmstudio_home_pointer_settings_and_cli_in_its_bin(tmp_path, monkeypatch):
    from loradeploy.deploy.targets import lmstudio as lms

    home = Path.home()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    cfg = _lms_cfg(tmp_path)
    assert lms.lmstudio_home(cfg) == home / ".lmstudio" and lms.lms_cli(cfg) is None
    assert lms.model_folder(cfg, "m") == home / ".lmstudio" / "models" / "loradeploy" / "m"
    moved = tmp_path / "Volumes" / "ext" / "lmstudio"
    (home / ".lmstudio-home-pointer").write_text(f"{moved}\n")
    assert lms.lmstudio_home(cfg) == moved
    assert lms.preset_path(cfg, "m") == moved / "config-presets" / "m.preset.json"
    cli = fake_tool(moved / "bin", "lms")
    assert lms.lms_cli(cfg) == str(cli)
    (moved / "settings.json").write_text(json.dumps({"downloadsFolder": str(tmp_path / "models-elsewhere")}))
    assert lms.model_folder(cfg, "m") == tmp_path / "models-elsewhere" / "loradeploy" / "m"
    # a home written in the config wins over the pointer
    own = _lms_cfg(tmp_path, home=str(tmp_path / "mine"))
    assert lms.lmstudio_home(own) == tmp_path / "mine"
    assert lms.model_folder(own, "m") == tmp_path / "mine" / "models" / "loradeploy" / "m"


def test_lms_in_default_home_bin_is_used_when_not_on_path(tmp_path, monkeypatch):
    from loradeploy.deploy.targets import lmstudio as lms

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    cli = fake_tool(Path.home() / ".lmstudio" / "bin", "lms")
    assert lms.lms_cli(_lms_cfg(tmp_path)) == str(cli)
    assert lms.lms_cli(_lms_cfg(tmp_path, home=str(tmp_path / "other"))) == str(cli)


# ----------------------------------------------------------------------------- demo ports

def test_demo_ports_avoid_airplay_on_darwin_and_move_past_taken_ones(tmp_path):
    import socket

    from loradeploy.demo.run import DARWIN_DEMO_PORT, DEMO_PORT, PORT_STEP, demo_port

    first_free = demo_port(tmp_path / "a", platform="linux")
    assert first_free >= DEMO_PORT and (first_free - DEMO_PORT) % PORT_STEP == 0
    assert demo_port(tmp_path / "a", platform="darwin") >= DARWIN_DEMO_PORT
    with socket.socket() as holder:                     # AirPlay Receiver listens on *:5000
        holder.bind(("0.0.0.0", first_free + 1))
        holder.listen()
        assert demo_port(tmp_path / "a", platform="linux") > first_free
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deployment_config.yaml").write_text("models:\n  majora:\n    port: 6200\n")
    assert demo_port(tmp_path / "b", platform="darwin") == 6200   # a re-run keeps its servers' ports


# ----------------------------------------------------------------------------- Makefile sysdeps

MAKE = shutil.which("make")


def _sysdeps(tmp_path: Path, *, xcode: bool, rsync: str, cmake: bool, brew: bool):
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True)
    for tool in ("head", "grep", "ls"):
        os.symlink(shutil.which(tool), bindir / tool)
    fake_tool(bindir, "uname", "Darwin\n")
    fake_tool(bindir, "xcode-select", "/Library/Developer/CommandLineTools\n" if xcode else "", rc=0 if xcode else 2)
    fake_tool(bindir, "rsync", rsync)
    if cmake:
        fake_tool(bindir, "cmake")
    calls = tmp_path / "brew-calls"
    if brew:
        fake_tool(bindir, "brew", log=calls)
    root = Path(__file__).resolve().parents[2]
    cp = subprocess.run([MAKE, "-s", "-C", str(root), "sysdeps"], env={"PATH": str(bindir), "HOME": str(tmp_path)},
                        capture_output=True, text=True, timeout=60)
    return cp, (calls.read_text() if calls.exists() else "")


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_sysdeps_on_darwin(tmp_path):
    cp, _ = _sysdeps(tmp_path / "1", xcode=False, rsync=NEW_RSYNC, cmake=True, brew=True)
    assert cp.returncode != 0 and "xcode-select --install" in cp.stderr
    cp, _ = _sysdeps(tmp_path / "2", xcode=True, rsync=OPENRSYNC, cmake=False, brew=False)
    assert cp.returncode != 0 and "https://brew.sh" in cp.stderr and "cmake rsync" in cp.stderr
    cp, calls = _sysdeps(tmp_path / "3", xcode=True, rsync=OLD_RSYNC, cmake=False, brew=True)
    assert cp.returncode == 0 and calls.split() == ["install", "cmake", "rsync"]
    cp, calls = _sysdeps(tmp_path / "4", xcode=True, rsync=NEW_RSYNC, cmake=True, brew=True)
    assert cp.returncode == 0 and calls == "" and "apt-get" not in cp.stdout + cp.stderr
