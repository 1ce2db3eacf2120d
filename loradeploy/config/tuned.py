"""How a tuned format is spelled (issue 20): ``TUNED@Q4_K_M`` (that stock format's file size),
``TUNED@4.8bpw``, ``TUNED@4.5GB`` / ``GiB`` / ``MB`` ...

The config accepts ``@`` or ``-`` between ``TUNED`` and the budget, and keeps one label everywhere after
load: ``TUNED-Q4_K_M``, ``TUNED-4.8BPW``, ``TUNED-4.5GB``. The label names files (``..-tuned-q4_k_m.gguf``),
versions and the rows of verify.json and the report, so it holds no ``@`` (Ollama reads ``name@digest``,
backups are ``version@stamp``) and no path separator.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "TUNED-"
# The stock formats a tuned format can be sized after: the quantize engine's (quantize.rules.FORMATS,
# tested equal), whose llama.cpp type rules make the recipe's base.
TUNABLE = ("Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_NUM = r"(\d+(?:\.\d+)?)"
_SPEC = re.compile(r"TUNED\s*[@-]\s*(.+)", re.I)


@dataclass(frozen=True)
class TunedSpec:
    label: str                 # TUNED-Q4_K_M, TUNED-4.8BPW, TUNED-4.5GB
    kind: str                  # "format" | "bpw" | "bytes"
    value: float | str | int   # the format, the bits per weight, the bytes


def is_tuned(name: object) -> bool:
    return isinstance(name, str) and name.strip().upper().startswith("TUNED")


def parse_tuned(spec: str) -> TunedSpec:
    """The budget ``spec`` names; ValueError (with the spellings that work) when it names none."""
    m = _SPEC.fullmatch(str(spec).strip())
    if not m:
        raise ValueError(f"{spec!r} is no tuned format: write TUNED@<format>, TUNED@<n>bpw or TUNED@<n>GB")
    what = m.group(1).strip()
    if what.upper() in TUNABLE:
        return TunedSpec(PREFIX + what.upper(), "format", what.upper())
    if b := re.fullmatch(_NUM + r"\s*bpw", what, re.I):
        bpw = float(b.group(1))
        if not 1.0 <= bpw <= 16.0:
            raise ValueError(f"{spec}: {bpw} bits per weight is outside 1..16")
        return TunedSpec(f"{PREFIX}{b.group(1)}BPW", "bpw", bpw)
    if s := re.fullmatch(_NUM + r"\s*([KMG]i?B|B)", what, re.I):
        n = int(float(s.group(1)) * UNITS[s.group(2).upper()])
        if n <= 0:
            raise ValueError(f"{spec}: the size must be above 0")
        return TunedSpec(f"{PREFIX}{s.group(1)}{s.group(2).upper()}", "bytes", n)
    raise ValueError(f"{spec}: {what!r} is neither a format a tuned file can be sized after ({', '.join(TUNABLE)}), "
                     "<n>bpw nor a size like 4.5GB")
