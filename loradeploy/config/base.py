"""What every config section shares: the frozen base model, path and type validators, the type tables."""
from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, model_validator

from ..stagespec import STAGES, Stage  # noqa: F401  (declared once, in stagespec.SPECS)
from .tuned import is_tuned, parse_tuned

# llama.cpp quantization types by name (llama_ftype). Kept here so config validation needs no
# compiled library; tools/llama_quantize.py checks it against the linked llama.cpp at run time.
QUANT_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
    "MXFP4_MOE": 38,
}
# Types whose quality collapses without an importance matrix; llama.cpp refuses them without one.
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "Q2_K_S"}
# ggml tensor types accepted for --output-tensor-type / --token-embedding-type.
GGML_TENSOR_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                     "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}
CONVERT_TYPES = ("f16", "bf16", "f32", "q8_0")


def needs_imatrix(formats: Optional[list[str]]) -> list[str]:
    """The formats among ``formats`` that are only worth building with an importance matrix: every IQ
    type (llama.cpp's own advice; IQ2/IQ1 and Q2_K_S it refuses outright without one)."""
    return [f for f in formats or [] if f.startswith("IQ") or f in NEEDS_IMATRIX]


def imatrix_problem(formats: Optional[list[str]], imatrix: object) -> Optional[str]:
    """Why ``formats`` cannot be built without quantization.imatrix (None: they can, or one is set)."""
    need = needs_imatrix(formats)
    if not need or imatrix is not None:
        return None
    verb = "needs" if len(need) == 1 else "need"
    return (f"{', '.join(need)} {verb} an importance matrix: set quantization.imatrix: auto (computed from the "
            "calibration text) or a file, or use Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K or Q8_0")


NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _sections_from_data(cls, data: object) -> object:
        """A section left out (or written empty) is validated from ``{}`` like one written out, so its
        default paths resolve against the config's folder too; a ``default_factory`` would build it
        without the loader's context and leave them relative to whatever folder the process runs in."""
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        for name, field in cls.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, _Section) and filled.get(name) is None:
                filled[name] = {}
        return filled


def resolve_path(p: Path | None, info: ValidationInfo) -> Path | None:
    """``~`` expands; a relative path is taken against the config file's folder (the ``base_dir`` context)."""
    if p is None:
        return None
    p = Path(os.path.expanduser(str(p)))
    base = (info.context or {}).get("base_dir") if info.context else None
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return p


RelPath = Annotated[Path, AfterValidator(resolve_path)]


def _quant_name(v: str) -> str:
    if is_tuned(v):   # TUNED@Q4_K_M ... -> one file-safe label, TUNED-Q4_K_M
        return parse_tuned(v).label
    name = str(v).strip().upper()
    if name not in QUANT_TYPES:
        known = ", ".join(sorted(QUANT_TYPES))
        raise ValueError(f"unknown llama.cpp quantization type {v!r}; known: {known}, or TUNED@<format> (issue 20)")
    return name


QuantName = Annotated[str, AfterValidator(_quant_name)]


def tensor_type(v: Optional[str]) -> Optional[str]:
    if v is None:
        return None
    name = str(v).strip().upper()
    if name not in GGML_TENSOR_TYPES:
        raise ValueError(f"unknown ggml tensor type {v!r}; known: {', '.join(sorted(GGML_TENSOR_TYPES))}")
    return name
