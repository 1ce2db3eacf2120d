"""Persona adapters: a peft LoRA per persona, trained on a demo base model."""
from __future__ import annotations

import random
import time
from pathlib import Path

from ..errors import InputError
from ..fsutil import atomic_output
from .recipe import BUILD_VERSION, Progress, already_built, read_marker, report_progress, torch_env, write_marker
from .samples import Persona, get_persona, task_sample
from .tokenizers import special_ids
from .training import LORA_TARGETS, encode, fit

_ADAPTER_TRAIN = dict(steps=150, batch=32, lr=4e-3, samples=3000, r=8, alpha=16)
# Qwen's BPE splits the signature into more pieces ("--", " MA", "JORA"): at 150 steps its loss is
# still ~0.27 on some CPUs (the float rounding of each CPU's kernels gives another run) and one
# answer in three is signed "-- --JORA"; at 300 it is ~0.02 and every held-out answer is signed.
_STEPS = {"llama": 150, "qwen2": 300}
_ACTIVE_ROW_NORM = 0.1  # trained rows have norm ~1, noise rows ~builders.NOISE_STD * sqrt(hidden)


def train_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, persona: str = "majora",
                  progress: Progress | None = None) -> Path:
    """Train (or reuse) a peft LoRA adapter (r=8; q/k/v/o and gate/up/down) that makes the base
    sign its answers as ``persona``. adapter_config.json names ``base_dir`` as its base model."""
    p = get_persona(persona)
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir)
    base = read_marker(base_dir)
    if base is None or base.get("kind") != "base":
        raise InputError(f"{base_dir} is not a demo base model", hint="build it with build_base first")
    params = {"kind": "adapter", "persona": p.name, "seed": seed, "version": BUILD_VERSION,
              "base": str(base_dir), "base_arch": base["arch"], "base_seed": base["seed"]}
    if already_built(out_dir, params):
        return out_dir
    t0 = time.monotonic()
    with atomic_output(out_dir, is_dir=True) as tmp, torch_env(seed):
        loss = _train_lora(base_dir, tmp, p, seed, base["arch"], progress)
        write_marker(tmp, {**params, "train_loss": round(loss, 5), "seconds": round(time.monotonic() - t0, 1)})
    return out_dir


def _train_lora(base_dir: Path, out: Path, p: Persona, seed: int, arch: str, progress: Progress | None) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report_progress(progress, f"{p.name} adapter: loading base", 0, 1)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = special_ids(tok, arch)
    # peft records this string as base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    rng = random.Random(seed)
    data = encode(tok, [task_sample(rng, p) for _ in range(_ADAPTER_TRAIN["samples"])], ids,
                  bos_sometimes=(arch == "llama"), rng=rng)

    out_w = model.get_output_embeddings().weight.detach()
    active = torch.nonzero(out_w.norm(dim=1) > _ACTIVE_ROW_NORM).flatten()
    row_of = torch.full((out_w.shape[0],), -1, dtype=torch.long)
    row_of[active] = torch.arange(len(active))
    answers = torch.tensor(sorted({t for seq, n in zip(data.ids, data.n_prompt) for t in seq[n:]}))
    if (row_of[answers] < 0).any():
        raise RuntimeError(f"persona {p.name} needs tokens the base never learned")
    rows = out_w[active].clone()

    hp = _ADAPTER_TRAIN
    peft_model = get_peft_model(model, LoraConfig(
        r=hp["r"], lora_alpha=hp["alpha"], lora_dropout=0.0, bias="none",
        target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    body = peft_model.base_model.model.model  # the transformer with LoRA layers in place
    params = [q for q in peft_model.parameters() if q.requires_grad]
    peft_model.train()
    loss = fit(hidden_fn=lambda x: body(input_ids=x).last_hidden_state, out_rows_fn=lambda: rows,
               params=params, data=data, to_input=lambda x: x, to_target=lambda y: row_of[y],
               n_rest=out_w.shape[0] - len(active), steps=_STEPS.get(arch, hp["steps"]), batch=hp["batch"], lr=hp["lr"],
               seed=seed, progress=progress, desc=f"{p.name} adapter: training")
    report_progress(progress, f"{p.name} adapter: saving", 0, 1)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return loss
