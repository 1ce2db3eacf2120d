"""The llama.cpp CPU mode, decided once per machine, used by every llama.cpp user.

On some machines that advertise AMX, llama.cpp's default CPU mode (its extra weight buffer types:
AMX and repacked layouts) kills the process — SIGILL on some hosts, SIGSEGV on others. Rather than
recognise one crash signature after the fact, a child process probes the default mode before first
use (load a tiny K-quant/Q8_0 model, evaluate a prompt, generate); if it dies of anything, fails or
hangs, the safe mode (no extra buffer types) is probed the same way. The verdict is cached in the
user cache under a key of CPU model and flags, kernel and llama.cpp version, so it is paid once.

Deploy's servers, evaluation's temporary servers and in-process loads (quantize, logits, tests,
bench) all ask ``decide()``; a server launched in a mode gets ``server_settings(mode)``.
``LORADEPLOY_LLAMA_CPU_MODE=default|safe`` overrides the probe.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import LlamaRuntimeError, ProcError
from ..fsutil import atomic_write_text, exclusive_lock

PROBE_VERSION = 1           # bump when the probe model or procedure changes: old verdicts are re-probed
DEFAULT_TIMEOUT_S = 120.0   # per mode; a cold import of llama_cpp on a loaded 2-core box takes seconds
MODE_ENV = "LORADEPLOY_LLAMA_CPU_MODE"
CACHE_ENV = "LORADEPLOY_CACHE_DIR"


@dataclass(frozen=True)
class Attempt:
    mode: str
    ok: bool
    how: str          # "generated 4 tokens in 0.8 s" | "killed by SIGSEGV" | "hung past 120 s" | ...
    seconds: float


@dataclass(frozen=True)
class Mode:
    """The verdict: ``name`` is "default" or "safe"; ``source`` says where it came from."""

    name: str
    source: str                       # "probe" | "cache" | "env" | "platform"
    why: str
    attempts: tuple[Attempt, ...] = ()
    decided_at: float = 0.0
    cache_file: Optional[str] = None
    fingerprint: dict = field(default_factory=dict, compare=False)

    @property
    def extra_bufts(self) -> bool:
        return self.name == "default"

    def describe(self) -> str:
        """One truthful line for logs and reports."""
        if self.source == "env":
            return f"{self.name} (set by {MODE_ENV})"
        if self.source == "platform":
            return f"{self.name} ({self.why})"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.decided_at)) if self.decided_at else "?"
        origin = "probed now" if self.source == "probe" else f"cached verdict of {when}"
        return f"{self.name} ({origin}: {self.why})"

    def as_dict(self) -> dict:
        return {"mode": self.name, "source": self.source, "why": self.why, "describe": self.describe(),
                "attempts": [asdict(a) for a in self.attempts], "cache_file": self.cache_file}


# ----------------------------------------------------------------------------- the machine

def _darwin_cpu() -> str:
    """macOS has no /proc/cpuinfo: the CPU's name from sysctl ("Apple M2 Pro")."""
    from ..tools.proc import run

    try:
        cp = run(["sysctl", "-n", "machdep.cpu.brand_string"], timeout=10, check=False)
    except ProcError:
        return ""
    return cp.stdout.strip() if cp.returncode == 0 else ""


def _cpuinfo() -> tuple[str, str]:
    if sys.platform == "darwin":   # no flags to hash: the key is the CPU's name and platform.machine()
        return _darwin_cpu() or platform.machine(), ""
    model, flags = platform.processor() or platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = " ".join(sorted(val.split()))
    return model, flags


def llama_cpp_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def _machine() -> tuple:
    model, flags = _cpuinfo()
    return (("cpu", model), ("flags_sha256", hashlib.sha256(flags.encode()).hexdigest()[:16]),
            ("amx", tuple(sorted(f for f in flags.split() if f.startswith("amx")))),
            ("kernel", platform.release()), ("arch", platform.machine()),
            ("llama_cpp_python", llama_cpp_version()), ("probe", PROBE_VERSION))


def fingerprint() -> dict:
    """What the verdict depends on; read once per process (every server start asks for the mode)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in _machine()}


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loradeploy"


def _key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _verdict_path(directory: Path, fp: dict) -> Path:
    return Path(directory) / f"llamacpp-cpu-mode-{_key(fp)}.json"


# ----------------------------------------------------------------------------- probing

def probe_mode(mode: str, model_path: Path, *, timeout: float, log_path: Optional[Path] = None) -> Attempt:
    """Run one probe child; classify how it ended without caring which signal it was."""
    from ..tools.proc import describe_exit, package_pythonpath, run

    t0 = time.monotonic()
    try:
        cp = run([sys.executable, "-m", "loradeploy.llamacpp.probe", mode, str(model_path)],
                 env={"PYTHONPATH": package_pythonpath()}, timeout=timeout, check=False, log_path=log_path, what=f"llama.cpp {mode}-mode probe")
    except ProcError as exc:
        how = f"hung past {timeout:g} s" if "timed out" in exc.message else exc.message
        return Attempt(mode, False, how, round(time.monotonic() - t0, 2))
    seconds = round(time.monotonic() - t0, 2)
    ok_line = next((l for l in cp.stdout.splitlines() if l.startswith("PROBE_OK ")), None)
    if cp.returncode == 0 and ok_line:
        info = json.loads(ok_line[len("PROBE_OK "):])
        return Attempt(mode, True, f"generated {len(info['tokens'])} tokens in {info['total_s']:.2f} s", seconds)
    how = describe_exit(cp.returncode)
    if cp.returncode == 0:
        how = "exited without reporting a generated token"
    lines = [l.strip() for l in cp.stdout.splitlines() if l.strip() and not l.startswith("$ ")]
    if lines and cp.returncode > 0:
        how += f": {lines[-1][:200]}"
    return Attempt(mode, False, how, seconds)


def _decide_by_probe(fp: dict, directory: Path, timeout: float,
                     progress: Optional[Callable[[str], None]]) -> Mode:
    """Probe default, then safe; the first that works is the verdict (its cache_file: where decide saves it)."""
    model = directory / f"probe-model-v{PROBE_VERSION}.gguf"
    log_path = directory / "probe.log"
    attempts = []
    for mode in ("default", "safe"):
        if progress:
            progress(f"probing llama.cpp's {mode} CPU mode")
        attempt = probe_mode(mode, model, timeout=timeout, log_path=log_path)
        attempts.append(attempt)
        if attempt.ok:
            if mode == "default":
                why = f"default mode {attempt.how}"
            else:
                why = f"default mode {attempts[0].how} in the probe; safe mode {attempt.how}"
            return Mode(mode, "probe", why, tuple(attempts), time.time(), str(_verdict_path(directory, fp)), fp)
    tried = "; ".join(f"{a.mode} mode {a.how}" for a in attempts)
    raise LlamaRuntimeError(f"llama.cpp cannot run on this CPU ({fp['cpu']}): {tried}",
                            hint=f"see {log_path}; {MODE_ENV}=default|safe skips the probe")


def _from_cache(path: Path, fp: dict) -> Optional[Mode]:
    try:
        data = json.loads(path.read_text())
        if data.get("fingerprint") != fp or data.get("mode") not in ("default", "safe"):
            return None
        attempts = tuple(Attempt(**a) for a in data.get("attempts", []))
        return Mode(data["mode"], "cache", data["why"], attempts, float(data["decided_at"]), str(path), fp)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a missing or damaged verdict is simply probed again


def _save(path: Path, mode: Mode) -> None:
    atomic_write_text(path, json.dumps({"mode": mode.name, "why": mode.why, "decided_at": mode.decided_at,
                                        "attempts": [asdict(a) for a in mode.attempts],
                                        "fingerprint": mode.fingerprint}, indent=2))


_DECIDED: dict[str, Mode] = {}


def decide(*, refresh: bool = False, timeout: float = DEFAULT_TIMEOUT_S, directory: Optional[Path] = None,
           progress: Optional[Callable[[str], None]] = None) -> Mode:
    """The CPU mode for llama.cpp on this machine: from the environment, the cache, or a probe."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced:
        if forced not in ("default", "safe"):
            raise LlamaRuntimeError(f"{MODE_ENV}={forced!r} is not a mode", hint="use default or safe, or unset it")
        return Mode(forced, "env", f"set by {MODE_ENV}", decided_at=time.time())
    directory = Path(directory) if directory else cache_dir()
    fp = fingerprint()
    path = _verdict_path(directory, fp)
    memo = str(path)
    if not refresh and memo in _DECIDED:
        return _DECIDED[memo]
    # One probe per machine at a time: a second process waits, then reads the first one's verdict.
    with exclusive_lock(directory / "llamacpp-probe.lock"):
        mode = None if refresh else _from_cache(path, fp)
        if mode is None and sys.platform == "darwin":
            # The crashes the probe guards against come from x86 AMX buffer types, which no Mac has:
            # default mode, unprobed (a server that dies of a signal in it still demotes it to safe).
            mode = Mode("default", "platform", "macOS: no AMX buffer types to probe", (), time.time(), str(path), fp)
        elif mode is None:
            mode = _decide_by_probe(fp, directory, timeout, progress)
            _save(path, mode)
    _DECIDED[memo] = mode
    return mode


def demote(reason: str) -> Mode:
    """Make safe the machine's verdict after the default mode, though it passed the probe, killed a
    real server; later servers and loads start in safe mode without probing again."""
    if os.environ.get(MODE_ENV, "").strip():
        return decide()  # the user chose the mode: do not second-guess it
    current = decide()
    fp = fingerprint()
    path = _verdict_path(cache_dir(), fp)
    mode = Mode("safe", "probe", reason, current.attempts, time.time(), str(path), fp)
    _save(path, mode)
    _DECIDED[str(path)] = mode
    return mode


# ----------------------------------------------------------------------------- applying a mode

def apply_mode(extra_bufts: bool) -> None:
    """Make every later llama_cpp model load in this process use (or skip) the extra buffer types.

    llama-cpp-python has no switch for it, so its default model params are wrapped. Idempotent.
    """
    import llama_cpp.llama_cpp as C

    orig = getattr(C.llama_model_default_params, "_loradeploy_orig", C.llama_model_default_params)
    if extra_bufts:
        C.llama_model_default_params = orig
        return

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    params._loradeploy_orig = orig  # type: ignore[attr-defined]
    C.llama_model_default_params = params


def ensure_in_process(**kw) -> Mode:
    """Decide (probe if needed) and apply the mode to this process; call before loading a model."""
    mode = decide(**kw)
    apply_mode(mode.extra_bufts)
    return mode


def load(model_path: str | os.PathLike, **kwargs):
    """``llama_cpp.Llama(model_path, **kwargs)`` in the decided CPU mode."""
    ensure_in_process()
    import llama_cpp

    kwargs.setdefault("verbose", False)
    return llama_cpp.Llama(model_path=str(model_path), **kwargs)
