"""A process record keeps naming its process when the wall clock is stepped (NTP, VM resume): psutil's
create_time moves with the clock, /proc's start ticks do not. Found when every demo server became
'not alive' (and so unstoppable) after this VM's clock jumped 7 s."""
from __future__ import annotations

import sys

from loradeploy.tools import proc


def _sleeper(tmp_path):
    return proc.spawn([sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / "s.log")


def test_record_survives_a_clock_step_and_stop_still_stops(tmp_path):
    child = _sleeper(tmp_path)
    rec = child.as_record()
    assert rec["start_ticks"] == proc.start_ticks(child.pid) is not None
    stepped = {**rec, "create_time": rec["create_time"] - 7.0}  # what the record looks like after a +7 s step
    assert proc.alive(stepped)
    proc.stop(stepped, grace=5)
    assert not proc.alive(rec)


def test_another_process_on_the_same_pid_is_not_ours(tmp_path):
    child = _sleeper(tmp_path)
    try:
        rec = child.as_record()
        assert not proc.alive({**rec, "start_ticks": rec["start_ticks"] - 1})
        # records written before start_ticks existed: the wall-clock start time still decides
        old = {"pid": rec["pid"], "create_time": rec["create_time"]}
        assert proc.alive(old) and not proc.alive({**old, "create_time": rec["create_time"] - 7.0})
    finally:
        proc.stop(child, grace=5)
