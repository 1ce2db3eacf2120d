"""The two files a model's front proxy reads, as typed records with schema-checked load and save:

* ``ProxyConf`` (``proxy.json``): where the proxy listens, its control file, the hash of the clients'
  api key and its limits. Written by ``proxying`` when a proxy starts and whenever the key or limits
  change (then SIGHUP); the proxy re-reads it on SIGHUP, so a changed key reaches a running port.
* ``Control`` (``control.json``): what the port serves now, its backend's port and that backend's own
  secret key (only the proxy sends it; clients' Authorization never reaches a backend). Written by
  ``proxying.point_proxy`` only; re-read on SIGHUP.

Both are written 0600 (the backend key is a secret). A file that does not match the schema is refused
with ``ControlError`` naming the field: the proxy keeps what it had instead of routing on a guess."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..fsutil import atomic_output

MODES = ("merged", "adapter")


class ControlError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    """What one port bounds (deployment.llamacpp.proxy_* keys; the defaults are the proxy's own)."""
    max_body: int = 8 * 1024 * 1024          # bytes of one request body (413 over it)
    max_head: int = 64 * 1024                # bytes of the request line and headers (431 over it)
    max_headers: int = 100                   # header fields (431 over it)
    max_connections: int = 256               # open client connections (503 + close over it)
    head_timeout_s: float = 30.0             # from a connection's first byte (or the last response) to a whole head
    body_timeout_s: float = 60.0             # to read a whole request body
    idle_timeout_s: float = 60.0             # a keep-alive connection with no request
    backend_timeout_s: float = 600.0         # the backend's silence before a 504 (no byte for this long)


@dataclass(frozen=True)
class ProxyConf:
    alias: str
    host: str
    port: int
    control: str                              # path of the Control file
    api_key_sha256: Optional[str] = None      # clients must send Bearer KEY whose sha256 is this
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Control:
    backend_port: int
    version: str
    format: str
    sha256: str
    gguf: str
    mode: str = "merged"                      # one of MODES
    backend: str = "llama-server"             # the backend's kind (serving.backends.KINDS)
    backend_key: Optional[str] = None         # the backend's own --api-key; None only for a keyless legacy backend
    system_prompt: str = ""
    lora: Optional[list] = None               # adapter mode: [{"id": i, "scale": 1.0}], forced onto generation
    base_gguf: Optional[str] = None
    base_sha256: Optional[str] = None
    embeddings: bool = False
    switched_at: float = 0.0


def _check(cls, data: Any, where: str):
    """``cls(**data)`` with every field's type checked (ints, floats, strs, bools, nested Limits)."""
    if not isinstance(data, dict):
        raise ControlError(f"{where}: not a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ControlError(f"{where}: unknown field(s) {sorted(unknown)}")
    out = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ControlError(f"{where}: missing field {name!r}")
            continue
        v, t = data[name], str(f.type)
        if t == "Limits":
            v = _check(Limits, v, f"{where}.limits")
        elif v is None and t.startswith("Optional"):
            pass
        elif "int" in t and not (isinstance(v, int) and not isinstance(v, bool)):
            raise ControlError(f"{where}: {name} must be an integer, not {v!r}")
        elif "float" in t and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
            raise ControlError(f"{where}: {name} must be a number, not {v!r}")
        elif "str" in t and not isinstance(v, str):
            raise ControlError(f"{where}: {name} must be a string, not {v!r}")
        elif "bool" in t and not isinstance(v, bool):
            raise ControlError(f"{where}: {name} must be true or false, not {v!r}")
        elif "list" in t and not isinstance(v, list):
            raise ControlError(f"{where}: {name} must be a list, not {v!r}")
        out[name] = v
    obj = cls(**out)
    if isinstance(obj, Control) and obj.mode not in MODES:
        raise ControlError(f"{where}: mode must be one of {MODES}, not {obj.mode!r}")
    return obj


def _load(cls, path: Path | str):
    return load_hashed(cls, path)[0]


def load_hashed(cls, path: Path | str):
    """``(record, sha256 of the exact bytes it was read from)``: a reader reports which file it runs on."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ControlError(f"{path}: {exc}") from None
    return _check(cls, data, str(path)), hashlib.sha256(raw).hexdigest()


def _save(obj, path: Path | str) -> None:
    path = Path(path)
    with atomic_output(path) as tmp:  # 0600 before the rename: the backend key is never readable by others
        tmp.touch(mode=0o600)
        os.chmod(tmp, 0o600)
        tmp.write_text(json.dumps(dataclasses.asdict(obj), indent=2, sort_keys=True))


def load_control(path: Path | str) -> Control:
    return _load(Control, path)


def save_control(c: Control, path: Path | str) -> None:
    _save(c, path)


def load_proxy_conf(path: Path | str) -> ProxyConf:
    return _load(ProxyConf, path)


def save_proxy_conf(c: ProxyConf, path: Path | str) -> None:
    _save(c, path)
