"""Serving memory told truly: anonymous memory apart from file pages (/proc, or psutil where there is no
/proc, as on macOS); a repacking llama-server reads its weights instead of mapping them twice; a server
whose estimate does not fit is refused before it starts."""
from __future__ import annotations

import mmap
import os
from types import SimpleNamespace

import pytest

from loradeploy.tools import procmem
from tests.fixtures.gguf_models import tiny_gguf_cache, tiny_ggufs  # noqa: F401  (fixtures)

MIB = 2**20


def _touch_mapped(path, size: int):
    path.write_bytes(os.urandom(size))
    f = open(path, "rb")
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    sum(m[i] for i in range(0, size, 4096))  # fault every page in: file pages in RSS, not anonymous
    return f, m


def test_file_pages_apart_from_anonymous(tmp_path):
    before = procmem.process_memory(os.getpid())
    f, m = _touch_mapped(tmp_path / "weights.bin", 64 * MIB)
    try:
        after = procmem.process_memory(os.getpid())
        assert before.source == after.source == "proc"
        assert after.file - before.file >= 60 * MIB
        assert abs((after.anon + after.file) - after.rss) <= 2 * MIB
        assert after.anon - before.anon < 32 * MIB
        tree = procmem.proc_tree_memory(os.getpid())
        assert tree.rss >= after.rss and abs(procmem.proc_tree_rss(os.getpid()) - tree.rss) < 4 * MIB
    finally:
        m.close()
        f.close()


def test_without_proc_psutil_stands_in(tmp_path, monkeypatch):
    """macOS has no /proc: USS is the private part, the rest of RSS the file-backed one."""
    monkeypatch.setattr(procmem, "PROC", tmp_path / "no-proc")
    f, m = _touch_mapped(tmp_path / "weights.bin", 32 * MIB)
    try:
        mem = procmem.proc_tree_memory(os.getpid())
        assert mem.source == "psutil" and mem.rss > 0 and 0 < mem.anon <= mem.rss
        assert mem.file == mem.rss - mem.anon and mem.file >= 28 * MIB
    finally:
        m.close()
        f.close()


def test_macos_footprint_is_the_private_part(tmp_path, monkeypatch):
    """On macOS (no /proc) libproc's physical footprint splits RSS; simulated here."""
    monkeypatch.setattr(procmem, "PROC", tmp_path / "no-proc")
    monkeypatch.setattr(procmem, "_darwin_footprint", lambda pid: 10 * MIB)
    mem = procmem.process_memory(os.getpid())
    assert mem.source == "psutil" and mem.anon == 10 * MIB and mem.file == mem.rss - 10 * MIB


def test_health_reports_anonymous_and_file_pages(tmp_path, monkeypatch):
    from loradeploy.health.system import process_check
    for proc in (procmem.PROC, tmp_path / "no-proc"):
        monkeypatch.setattr(procmem, "PROC", proc)
        c = process_check(SimpleNamespace(pid=os.getpid(), model="m"))
        assert "MiB anonymous + " in c.detail and "file pages" in c.detail, c.detail
        assert {"rss_mib", "anon_mib", "file_pages_mib"} <= set(c.metrics)


def _cfg(tmp_path, **llamacpp):
    from loradeploy.config import config_from_dict
    return config_from_dict({"deployment": {"llamacpp": llamacpp},
                             "models": {"m": {"base_model": str(tmp_path), "adapter": str(tmp_path), "port": 5000}}},
                            base_dir=tmp_path)


@pytest.mark.parametrize("mode, llamacpp, reads", [
    ("default", {}, True),                                   # repacked on the CPU: read once, not mapped twice
    ("safe", {}, False),                                     # --no-repack: mapped, each weight once
    ("default", {"n_gpu_layers": -1}, False),                # on a GPU: nothing repacked for the CPU
    ("default", {"extra_args": ["--load-mode", "mmap"]}, False),   # the user's own choice
])
def test_repacking_server_reads_its_weights(tmp_path, monkeypatch, mode, llamacpp, reads):
    from loradeploy.llamacpp import runtime, tools
    from loradeploy.serving.backends import llama_server_argv
    monkeypatch.setattr(tools, "tool", lambda name: tmp_path / name)
    argv = llama_server_argv(_cfg(tmp_path, **llamacpp), "m", tmp_path / "m.gguf", 8100, runtime.Mode(mode, "env", "t"))
    assert ("--load-mode" in argv and argv[argv.index("--load-mode") + 1] == "none") == reads
    assert ("--no-repack" in argv) == (mode == "safe")


def test_server_estimate_and_refusal(tiny_ggufs, tmp_path):
    from loradeploy.errors import ResourceError
    from loradeploy.llamacpp import runtime
    from loradeploy.memory_estimate import require
    from loradeploy.serving.backends import server_memory
    gguf = tiny_ggufs.path("v1", "Q8_0")
    size = gguf.stat().st_size
    mapped = server_memory(_cfg(tmp_path), "m", gguf, runtime.Mode("safe", "env", "t"))
    read = server_memory(_cfg(tmp_path), "m", gguf, runtime.Mode("default", "env", "t"))
    assert mapped.file == size and read.file == 0 and read.terms["weights"] == size
    # the weights once either way (read and repacked: through a staging buffer of the largest tensor)
    assert read.need - mapped.need == read.terms["read buffer"] < size
    with pytest.raises(ResourceError) as exc:
        require(read, 1 * MIB, key="performance.max_memory_gb")
    line = exc.value.one_line()
    assert "\n" not in line and line.startswith("llama-server for m needs ~") and "budget 0.0 GiB" in line
