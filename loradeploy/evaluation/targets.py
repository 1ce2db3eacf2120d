"""What to evaluate: every deployed model, every other quantized format, and the base model when recorded."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..config import QUANT_TYPES, Config
from ..serving import endpoints
from ..state import RunRecord


@dataclass
class EvalTarget:
    """One row of the comparison: a model in one format, served at base_url or from gguf_path."""
    label: str
    model: str
    format: Optional[str] = None
    base_url: Optional[str] = None
    gguf_path: Optional[str] = None
    is_base: bool = False
    pid: Optional[int] = None
    n_ctx: Optional[int] = None
    live: bool = False                 # the deployed, serving version
    sha256: Optional[str] = None
    version: Optional[str] = None
    system_prompt: Optional[str] = None  # added to samples without a system message (as deploy does)
    lora_path: Optional[str] = None    # adapter mode: the LoRA GGUF applied to gguf_path
    mode: str = "merged"               # merged | adapter
    api_key: Optional[str] = field(default=None, repr=False)  # a hand-given URL's own key; never in a report

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("api_key")
        return out


def _base_gguf(record: RunRecord) -> Optional[str]:
    """A base-model GGUF recorded for this model (any stage's info, or an artifact)."""
    cands: list = []
    for stage in record.stages:
        cands.append(record.info(stage).get("base_gguf"))
        cands += [a.path for a in record.artifacts(stage, "base_gguf")]
    for c in cands:
        if c and Path(c).is_file():
            return str(c)
    return None


def _format_from_name(path: str) -> Optional[str]:
    m = re.search(r"-([a-z0-9_]+)\.gguf$", Path(path).name, re.I)
    return m.group(1).upper() if m and m.group(1).upper() in QUANT_TYPES else None


def build_targets(cfg: Config, models: Optional[Sequence[str]] = None,
                  formats: Optional[Sequence[str]] = None) -> tuple[list[EvalTarget], list[str]]:
    """Everything deployed plus every other quantized format, and the base model when recorded."""
    names = list(models) if models else [n for n, m in cfg.models.items() if m.enabled]
    for n in names:
        cfg.model(n)
    fmts = [f.strip().upper() for f in formats] if formats else (cfg.evaluation.formats or None)
    notes: list[str] = []
    live_eps = endpoints(cfg, names)
    n_ctx = cfg.deployment.llamacpp.n_ctx
    targets: list[EvalTarget] = []
    for name in names:
        order = cfg.formats_for(name)
        sp = cfg.models[name].system_prompt or None
        rows: list[EvalTarget] = []
        covered: set[Optional[str]] = set()
        mode = cfg.mode_for(name)
        tag = " (adapter)" if mode == "adapter" else ""
        for ep in (e for e in live_eps if e.model == name):
            if fmts and ep.format not in fmts:
                continue
            label = f"{name} {ep.format or 'live'}{tag}"
            rows.append(EvalTarget(label, name, ep.format, base_url=ep.base_url,
                                   gguf_path=str(ep.gguf_path) if ep.gguf_path else None, pid=ep.pid, n_ctx=n_ctx,
                                   live=True, sha256=ep.sha256, version=ep.version, system_prompt=sp, mode=mode))
            covered.add(ep.format)
        rec = RunRecord.load(cfg.pipeline.state_dir, name)
        lora = next(iter(rec.artifacts("convert", "lora")), None) if mode == "adapter" else None
        if mode == "adapter" and lora is None:
            notes.append(f"{name}: adapter mode, but no LoRA GGUF recorded; its quantized base is not evaluated")
        for a in rec.artifacts("quantize", "gguf") if mode == "merged" or lora else ():
            fmt = a.format
            if fmt in covered or (fmts and fmt not in fmts):
                continue
            if not Path(a.path).is_file():
                notes.append(f"{name} {fmt}: quantized file {a.path} is missing; skipped")
                continue
            rows.append(EvalTarget(f"{name} {fmt}{tag}", name, fmt, gguf_path=a.path, n_ctx=n_ctx,
                                   sha256=a.sha256, version=cfg.models[name].version, system_prompt=sp,
                                   lora_path=lora.path if lora else None, mode=mode))
            covered.add(fmt)
        if fmts:
            for f in fmts:
                if f not in covered:
                    notes.append(f"{name} {f}: neither deployed nor quantized; skipped")
        rows.sort(key=lambda t: (order.index(t.format) if t.format in order else len(order), t.label))
        if not rows:
            notes.append(f"{name}: nothing deployed or quantized to evaluate")
        if cfg.evaluation.include_base:
            base = _base_gguf(rec)
            if base:
                rows.append(EvalTarget(f"{name} base", name, _format_from_name(base), gguf_path=base,
                                       is_base=True, n_ctx=n_ctx, system_prompt=sp))
            else:
                notes.append(f"{name}: no base-model GGUF recorded, so the base reference row is skipped")
        targets += rows
    return targets, notes
