"""The ``verify`` section: the fidelity gate between quantize and deploy.

Thresholds are per llama.cpp type; what is written here overrides the defaults in
``loradeploy.verify.gate`` one format at a time (so ``max_kld: {Q4_K_M: 0.05}`` keeps every other
default).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator

from .base import QuantName, RelPath, _Section, _quant_name


def _per_format(v: Optional[dict]) -> Optional[dict]:
    if v is None:
        return None
    return {_quant_name(k): float(x) for k, x in v.items()}


class VerifyConfig(_Section):
    calibration: Optional[RelPath] = Field(
        None, description="text or JSONL calibration file; default: the evaluation samples (references as "
                          "assistant turns) plus a little built-in general text")
    max_tokens: Union[Literal["auto"], int] = Field(
        "auto", description="calibration tokens scored per GGUF; auto: 2048 up to ~1.5B parameters, fewer above "
                            "(a 7B: 512), so the float32 reference takes minutes on a few cores")
    max_seq_len: int = Field(512, ge=16, le=32768, description="longest calibration sequence (longer text is split)")
    formats: Optional[list[QuantName]] = Field(None, description="GGUFs to verify; default every one produced, "
                                                                 "the F16/BF16 one only while under a quarter of the "
                                                                 "memory budget (the served format is always verified)")
    max_kld: dict[str, float] = Field(default_factory=dict, description="mean KLD limit per format")
    min_top1: Union[float, dict[str, float], None] = Field(
        None, description="top-1 agreement floor (0..1): one number for every format, or per format")
    max_noise_to_signal: float = Field(0.25, gt=0, description="KLD(candidate) / KLD(reference||base) limit")
    on_fail: Literal["block", "warn", "fallback"] = Field(
        "block", description="a failed format: stop the deploy, deploy it anyway with a warning, or serve the "
                             "smallest format that passes; a failed template/stop check always blocks")
    behaviour: bool = Field(True, description="check the chat template, BOS and stopping on end-of-turn")
    # accepted for configs written before the stop check was teacher-forced (it now reads where every calibration
    # assistant turn ends, in the scoring pass, and generates nothing): no effect
    stop_prompts: int = Field(3, ge=0, le=32, description="no effect (the stop check generates nothing now)")
    max_new_tokens: int = Field(128, ge=4, le=4096, description="no effect (the stop check generates nothing now)")
    reference: Literal["auto", "streamed", "memory"] = Field(
        "auto", description="how the PEFT reference runs: streamed (one decoder layer at a time in float32 from "
                            "the safetensors), memory (peft, whole model: 16-bit on CUDA, float32 otherwise); auto: "
                            "memory on CUDA, else streamed, or memory when the architecture cannot stream and fits")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="reference model device (cuda: 16-bit; auto never picks mps: float32 on the CPU)")
    threads: int = Field(0, ge=0, description="llama.cpp / torch threads; 0 = the CPU budget")

    _kld = field_validator("max_kld", mode="before")(classmethod(lambda cls, v: _per_format(v) if v else {}))

    @field_validator("max_kld")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not x > 0]
        if bad:
            raise ValueError(f"must be above 0 for {', '.join(bad)}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _tokens(cls, v):
        if v != "auto" and not 16 <= int(v) <= 1_000_000:
            raise ValueError("is auto or a number of tokens from 16 to 1000000")
        return v

    @field_validator("min_top1", mode="before")
    @classmethod
    def _top1(cls, v):
        vals = _per_format(v) if isinstance(v, dict) else v
        for x in (vals.values() if isinstance(vals, dict) else [] if vals is None else [vals]):
            if not 0 <= float(x) <= 1:
                raise ValueError("is a fraction: use a number from 0 to 1 (0.9 = 90 %)")
        return vals
