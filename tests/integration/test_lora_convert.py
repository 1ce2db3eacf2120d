"""Adapter mode end to end on the tiny Llama: the trained PEFT adapter converted by llama.cpp's own
convert_lora_to_gguf.py, applied at run time by llama.cpp on the base's F16 GGUF, must give PEFT's
next-token distributions; and an rsLoRA adapter, which the script alone converts at the wrong scale,
must match PEFT after our alpha fix.

Measured on this machine (3 sequences, 31 positions, vocab 2048; F16 base and adapter vs PEFT in float32):
  base GGUF vs HF base              mean KLD 6e-8,  top-1 |logprob diff| 0.0017
  LoRA GGUF vs PEFT                 mean KLD 3e-7,  top-1 0.0021  (all-vocab max 0.012)
  rsLoRA GGUF (fixed) vs PEFT       mean KLD 1.9e-6, top-1 0.0125 (all-vocab max 0.018)
  base GGUF without LoRA vs PEFT    mean KLD 1.45   (the adapter matters)
  rsLoRA, script alone, vs PEFT     mean KLD 3.35   (the fix matters)
Tolerances: mean KLD < 1e-4 and top-1 |logprob diff| < 0.05, far above the first and far below the rest.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loradeploy.errors import InputError
from loradeploy.gguf import validate_gguf
from loradeploy.llamacpp import runtime
from loradeploy.lora import check_adapter, convert_adapter, lora_gguf_info
from loradeploy.lora.convert import converter_script, run_converter
from loradeploy.tools.converter import write_gguf

pytestmark = pytest.mark.slow

KLD_MAX = 1e-4
TOP1_MAX = 0.05
TEXTS = ["Hello, who are you?", "Tell me about the weather today.",
         "The quick brown fox jumps over the lazy dog and then"]


@pytest.fixture(scope="module")
def work(llama_pair, tmp_path_factory):
    """Base F16 GGUF, the plain adapter's GGUF, an rsLoRA copy of the adapter and its GGUF (fixed)."""
    base_dir, adapter_dir = llama_pair
    d = tmp_path_factory.mktemp("lora-convert")
    write_gguf(base_dir, d / "base.gguf", outtype="f16", model_name="base")
    info = convert_adapter(adapter_dir, base_dir, d / "out" / "lora.gguf", log_path=d / "convert.log")
    rs_dir = d / "adapter-rslora"
    shutil.copytree(adapter_dir, rs_dir)
    cfg = json.loads((rs_dir / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (rs_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    rs_info = convert_adapter(rs_dir, base_dir, d / "out" / "lora-rslora.gguf", log_path=d / "convert.log")
    return {"d": d, "base_dir": base_dir, "adapter_dir": adapter_dir, "rs_dir": rs_dir, "info": info,
            "rs_info": rs_info}


@pytest.fixture(scope="module")
def sequences(llama_pair):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(llama_pair[0]))
    return [tok(t)["input_ids"] for t in TEXTS]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def peft_logprobs(base_dir: Path, adapter_dir: Path | None, seqs) -> list[np.ndarray]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return [_log_softmax(model(torch.tensor([s])).logits[0].numpy()) for s in seqs]


def llama_logprobs(base_gguf: Path, lora: Path | None, seqs) -> list[np.ndarray]:
    kw = {"lora_path": str(lora)} if lora is not None else {}
    llm = runtime.load(base_gguf, n_ctx=128, logits_all=True, n_threads=2, seed=0, **kw)
    try:
        out = []
        for s in seqs:
            llm.reset()
            llm.eval(s)
            out.append(_log_softmax(np.array(llm.scores[: len(s)])))
        return out
    finally:
        llm.close()


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """Mean KL(ref || got) over positions, and the largest |logprob diff| at ref's top token."""
    kld = float(np.mean(np.concatenate([(np.exp(p) * (p - q)).sum(-1) for p, q in zip(ref, got)])))
    top1 = max(float(np.abs(np.take_along_axis(p - q, p.argmax(-1)[:, None], -1)).max()) for p, q in zip(ref, got))
    return {"kld": kld, "top1": top1}


def test_metadata_and_return_value(work):
    info, plan = work["info"], check_adapter(work["adapter_dir"], work["base_dir"])
    out = work["d"] / "out" / "lora.gguf"
    assert info["rank"] == 8 and info["alpha"] == 16 and info["alpha_written"] == 16 and not info["use_rslora"]
    assert info["scale"] == 2.0 and info["n_tensors"] == plan.n_tensors == 28
    assert info["size"] == out.stat().st_size and len(info["sha256"]) == 64
    assert Path(info["converter"]) == converter_script() and info["seconds"] > 0
    meta = lora_gguf_info(out)
    assert (meta["general_type"], meta["adapter_type"], meta["general_architecture"]) == ("adapter", "lora", "llama")
    assert meta["alpha"] == 16.0 and meta["ranks"] == [8] and meta["tensor_types"] == ["F16"]
    assert validate_gguf(out).ok
    # atomic: nothing but the two finished files in the output folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["lora-rslora.gguf", "lora.gguf"]


def test_adapter_gguf_matches_peft(work, sequences):
    ref = peft_logprobs(work["base_dir"], work["adapter_dir"], sequences)
    with_lora = compare(ref, llama_logprobs(work["d"] / "base.gguf", work["d"] / "out" / "lora.gguf", sequences))
    without = compare(ref, llama_logprobs(work["d"] / "base.gguf", None, sequences))
    print(f"LoRA GGUF vs PEFT: {with_lora}; base GGUF alone vs PEFT: {without}")
    assert with_lora["kld"] < KLD_MAX and with_lora["top1"] < TOP1_MAX
    assert without["kld"] > 100 * KLD_MAX   # the adapter changes the output, so the check above can fail


def test_rslora_alpha_fix(work, sequences):
    rs = work["rs_info"]
    assert rs["use_rslora"] and rs["scale"] == pytest.approx(16 / math.sqrt(8))
    assert rs["alpha_written"] == pytest.approx(16 * math.sqrt(8), rel=1e-6)   # llama.cpp: alpha / 8 == 16/sqrt(8)
    # llama.cpp's script alone on the same folder: lora_alpha as is, use_rslora ignored
    plain = work["d"] / "rslora-script-alone.gguf"
    run_converter(work["rs_dir"], work["base_dir"], plain, log_path=work["d"] / "convert.log")
    assert lora_gguf_info(plain)["alpha"] == 16.0
    ref = peft_logprobs(work["base_dir"], work["rs_dir"], sequences)
    fixed = compare(ref, llama_logprobs(work["d"] / "base.gguf", work["d"] / "out" / "lora-rslora.gguf", sequences))
    unfixed = compare(ref, llama_logprobs(work["d"] / "base.gguf", plain, sequences))
    print(f"rsLoRA fixed vs PEFT: {fixed}; script alone vs PEFT: {unfixed}")
    assert fixed["kld"] < KLD_MAX and fixed["top1"] < TOP1_MAX
    assert unfixed["kld"] > 100 * KLD_MAX
    # the user's folder is untouched: the fix went into a staged copy
    assert json.loads((work["rs_dir"] / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_refused_before_the_converter_runs(work, tmp_path):
    bad = tmp_path / "dora"
    shutil.copytree(work["adapter_dir"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    log = tmp_path / "convert.log"
    with pytest.raises(InputError, match="DoRA"):
        convert_adapter(bad, work["base_dir"], tmp_path / "dora.gguf", log_path=log)
    assert not (tmp_path / "dora.gguf").exists() and not log.exists()
