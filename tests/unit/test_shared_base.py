"""Adapter mode's shared base files: made once per base, reused only while they are the recorded bytes."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from loradeploy.lora import shared_base


@dataclass
class Result:
    artifacts: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def make_file(folder, calls, name="base-q4_k_m.gguf", data=b"quantized bytes"):
    def make():
        from loradeploy.state import Artifact
        calls.append(threading.get_ident())
        p = folder / name
        p.write_bytes(data)
        return Result([Artifact.of(p, "gguf", "Q4_K_M")], {"formats": ["Q4_K_M"]})
    return make


def test_second_model_reuses_the_first_ones_files(tmp_path):
    calls: list = []
    log = logging.getLogger("test")
    a = shared_base.once(tmp_path, "quantize", {"source": "x"}, "majora", make_file(tmp_path, calls), Result, log)
    b = shared_base.once(tmp_path, "quantize", {"source": "x"}, "nayru", make_file(tmp_path, calls), Result, log)
    assert len(calls) == 1
    assert b.info["base_from"] == "majora" and "base_from" not in a.info
    assert [x.sha256 for x in b.artifacts] == [x.sha256 for x in a.artifacts]
    # other inputs (another source GGUF, other formats): made again
    shared_base.once(tmp_path, "quantize", {"source": "y"}, "veran", make_file(tmp_path, calls), Result, log)
    assert len(calls) == 2


def test_a_changed_or_missing_file_is_never_reused(tmp_path):
    calls: list = []
    log = logging.getLogger("test")
    shared_base.once(tmp_path, "quantize", {"k": 1}, "majora", make_file(tmp_path, calls), Result, log)
    f = tmp_path / "base-q4_k_m.gguf"
    f.write_bytes(b"quantized bytez")  # same size, other bytes, new mtime
    assert shared_base.recall(tmp_path, "quantize", shared_base_key({"k": 1})) is None
    shared_base.once(tmp_path, "quantize", {"k": 1}, "nayru", make_file(tmp_path, calls), Result, log)
    assert len(calls) == 2
    f.unlink()
    shared_base.once(tmp_path, "quantize", {"k": 1}, "veran", make_file(tmp_path, calls), Result, log)
    assert len(calls) == 3
    # touched but identical bytes: the sha256 says it is still the recorded file
    os.utime(f, ns=(1, 1))
    shared_base.once(tmp_path, "quantize", {"k": 1}, "zelda", make_file(tmp_path, calls), Result, log)
    assert len(calls) == 3


def test_models_making_one_base_at_once_take_turns(tmp_path):
    calls: list = []
    log = logging.getLogger("test")
    threads = [threading.Thread(target=shared_base.once, args=(tmp_path, "convert", {"k": 2}, f"m{i}",
                                                                 make_file(tmp_path, calls), Result, log))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def shared_base_key(inputs):
    from loradeploy.state import inputs_hash
    return inputs_hash(inputs)
