"""macOS's way for a supervised server to die with its supervisor, exercised on Linux: the
supervisor takes the non-prctl path (sys.platform patched to darwin inside it), is then killed
outright, and the server must die with it. Real processes, no mocks."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from loradeploy.tools import proc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="simulates macOS on Linux")

SUPERVISOR = """
import sys
import psutil  # imported before the patch: psutil picks its platform module at import
from loradeploy.tools import proc
sys.platform = "darwin"   # no prctl: the watchdog path macOS takes
sys.exit(proc.supervise([sys.executable, "-c", sys.argv[2]], record_path=sys.argv[1]))
"""


def _supervised(tmp_path: Path, server_code: str) -> tuple[proc.Spawned, Path]:
    record = tmp_path / "server.json"
    sup = proc.spawn([sys.executable, "-c", SUPERVISOR, str(record), server_code], log_path=tmp_path / "sup.log",
                     env={"PYTHONPATH": proc.package_pythonpath()})
    end = time.monotonic() + 30
    while not record.exists() and time.monotonic() < end:
        assert proc.alive(sup), (tmp_path / "sup.log").read_text()
        time.sleep(0.05)
    return sup, record


def _watchdogs(sup_pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(sup_pid).children():
        try:
            if any(a.endswith("deathwatch.py") for a in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _gone(rec: dict, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not proc.alive(rec):
            return True
        time.sleep(0.05)
    return False


def test_server_dies_when_its_supervisor_is_killed_without_prctl(tmp_path):
    sup, record = _supervised(tmp_path, "import time; time.sleep(300)")
    server = json.loads(record.read_text())
    try:
        assert proc.alive(server) and server["pid"] != sup.pid
        watchdogs = _watchdogs(sup.pid)
        assert len(watchdogs) == 1, "the non-Linux path starts one watchdog"
        # the watchdog has a session of its own: a signal to the supervisor's group misses it
        assert os.getsid(watchdogs[0].pid) == watchdogs[0].pid != os.getsid(sup.pid)
        os.kill(sup.pid, signal.SIGKILL)      # no handler runs, no "done" is written
        assert _gone(server), "the server outlived its SIGKILLed supervisor"
        assert _gone({"pid": watchdogs[0].pid, "create_time": watchdogs[0].create_time()})
    finally:
        proc.stop(server, grace=1)
        proc.stop(sup, grace=1)


def test_a_server_that_ends_by_itself_leaves_no_watchdog_and_its_status_is_kept(tmp_path):
    sup, record = _supervised(tmp_path, "import time, sys; time.sleep(1); sys.exit(3)")
    watchdogs = _watchdogs(sup.pid)
    end = time.monotonic() + 30
    while proc.exit_status(sup) is None and time.monotonic() < end:
        time.sleep(0.05)
    assert proc.exit_status(sup) == 3       # the supervisor returns the server's own status
    for w in watchdogs:
        assert _gone({"pid": w.pid, "create_time": w.create_time()}, 5)


def test_sigterm_to_the_supervisor_reaches_the_server_once_and_it_ends(tmp_path):
    mark, ready = tmp_path / "terms", tmp_path / "ready"
    code = ("import signal, sys, time\n"
            f"signal.signal(signal.SIGTERM, lambda *a: (open({str(mark)!r}, 'a').write('T'), sys.exit(7)))\n"
            f"open({str(ready)!r}, 'w').close()\n"
            "time.sleep(300)")
    sup, record = _supervised(tmp_path, code)
    server = json.loads(record.read_text())
    end = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < end:   # its handler is in place
        time.sleep(0.05)
    proc.stop(sup, grace=10)                  # SIGTERM to the supervisor's group, forwarded to the server
    assert not proc.alive(sup) and _gone(server, 5)
    assert mark.read_text() == "T"            # the server's own handler ran, once


def test_stop_kills_the_recorded_server_that_outlived_its_supervisor(tmp_path):
    """A supervisor gone (killed before any watchdog could act) and its server still running:
    stopping the supervisor's record stops the server named in its server_record."""
    server = proc.spawn([sys.executable, "-c", "import time; time.sleep(300)"], log_path=tmp_path / "srv.log")
    gone_sup = proc.spawn([sys.executable, "-c", "pass"], log_path=tmp_path / "sup.log")
    _gone(gone_sup.as_record())
    srec = tmp_path / "backend-1.server.json"
    srec.write_text(json.dumps(server.as_record()))
    try:
        proc.stop({**gone_sup.as_record(), "server_record": str(srec)}, grace=2)
        assert _gone(server.as_record(), 5)
    finally:
        proc.stop(server, grace=1)


def test_stop_leaves_alone_a_process_that_only_reuses_the_recorded_servers_pid(tmp_path):
    other = proc.spawn([sys.executable, "-c", "import time; time.sleep(300)"], log_path=tmp_path / "o.log")
    try:
        stale = {**other.as_record(), "start_ticks": other.start_ticks - 5, "create_time": other.create_time - 5}
        srec = tmp_path / "x.server.json"
        srec.write_text(json.dumps(stale))
        proc.stop({"pid": 0, "server_record": str(srec)}, grace=1)
        assert proc.alive(other)
    finally:
        proc.stop(other, grace=1)
