"""The demo base models: a tiny, briefly trained chat model per architecture (Llama, Qwen2)."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

from ..errors import InputError
from ..fsutil import atomic_output
from .recipe import ARCHS, BUILD_VERSION, Progress, already_built, report_progress, torch_env, write_marker
from .samples import IM_START, N_WORDS, WORDS, task_sample
from .tokenizers import special_ids, write_llama_tokenizer, write_qwen2_tokenizer
from .training import encode, fit, model_config

_BASE_TRAIN = dict(steps=250, batch=32, lr=5e-3, samples=6000)
NOISE_STD = 1e-3  # unused vocabulary rows: small enough that their logits stay ~0


def build_base(out_dir: Path, arch: str = "llama", *, seed: int = 0, progress: Progress | None = None) -> Path:
    """Build (or reuse) a tiny, briefly trained chat model in Hugging Face layout: config.json,
    generation_config.json, float16 model.safetensors, tokenizer files with a ChatML template."""
    if arch not in ARCHS:
        raise InputError(f"unknown demo architecture {arch!r}", hint=f"known: {', '.join(ARCHS)}")
    out_dir = Path(out_dir)
    params = {"kind": "base", "arch": arch, "seed": seed, "version": BUILD_VERSION}
    if already_built(out_dir, params):
        return out_dir
    t0 = time.monotonic()
    with atomic_output(out_dir, is_dir=True) as tmp, torch_env(seed):
        report_progress(progress, f"{arch} base: tokenizer", 0, 1)
        if arch == "llama":
            write_llama_tokenizer(tmp, seed)
        else:
            write_qwen2_tokenizer(tmp)
        loss = _train_base(tmp, arch, seed, progress)
        write_marker(tmp, {**params, "train_loss": round(loss, 5), "seconds": round(time.monotonic() - t0, 1)})
    return out_dir


def _train_base(d: Path, arch: str, seed: int, progress: Progress | None) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(d)
    split = [w for w in WORDS if len(tok.encode(w, add_special_tokens=False)) != 1
             or len(tok.encode(" " + w, add_special_tokens=False)) != 1]
    if split:
        raise RuntimeError(f"demo words split into several tokens: {split[:5]}")
    ids = special_ids(tok, arch)
    full_vocab = len(tok) if arch == "llama" else 151936  # Qwen2.5 pads its vocab to 151936
    rng = random.Random(seed)
    data = encode(tok, [task_sample(rng, None) for _ in range(_BASE_TRAIN["samples"])], ids,
                  bos_sometimes=(arch == "llama"), rng=rng)

    # Train with a vocabulary of just the tokens the task uses, then scatter those rows into the
    # full one. Tied while training: copying a token is then a matter of passing it on.
    active = sorted({ids["bos"], ids["eos"], ids["pad"], tok.convert_tokens_to_ids(IM_START)}
                    .union(*map(set, data.ids)))
    lookup = torch.zeros(full_vocab, dtype=torch.long)
    lookup[torch.tensor(active)] = torch.arange(len(active))
    small_ids = {k: int(lookup[ids[k]]) for k in ("bos", "eos", "pad")}
    small = AutoModelForCausalLM.from_config(model_config(arch, len(active), small_ids, tied=True),
                                             dtype=torch.float32)
    _init_copy_head(small, offset=N_WORDS + 4, seed=seed)  # words, <|im_end|> \n <|im_start|> assistant \n
    small.train()
    loss = fit(hidden_fn=lambda x: small.model(input_ids=x).last_hidden_state,
               out_rows_fn=lambda: small.get_output_embeddings().weight,
               params=list(small.parameters()), data=data,
               to_input=lambda x: lookup[x], to_target=lambda y: lookup[y],
               n_rest=full_vocab - len(active), steps=_BASE_TRAIN["steps"], batch=_BASE_TRAIN["batch"],
               lr=_BASE_TRAIN["lr"], seed=seed, progress=progress, desc=f"{arch} base: training")

    report_progress(progress, f"{arch} base: saving", 0, 1)
    full = AutoModelForCausalLM.from_config(model_config(arch, full_vocab, ids), dtype=torch.float32)
    state = {k: v for k, v in small.state_dict().items() if k != "lm_head.weight"}
    emb = torch.randn((full_vocab, full.config.hidden_size)) * NOISE_STD
    emb[torch.tensor(active)] = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = emb
    state["lm_head.weight"] = emb.clone()
    missing, unexpected = full.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"demo base weights do not fit: missing {missing}, unexpected {unexpected}")
    if full.config.tie_word_embeddings:
        full.tie_weights()
    full = full.to(torch.float16)
    full.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos_list"],
                                              pad_token_id=ids["pad"], do_sample=False)
    full.save_pretrained(d)
    return loss


def _init_copy_head(model, offset: int, seed: int) -> None:
    """Start layer 0's first KV group as a head that looks ``offset`` tokens back and passes that
    token on. It is the circuit the task needs; from random weights training takes ~1000 steps to
    find it and sometimes never does, from this start ~200 steps suffice. Training then adjusts
    every weight, this head's included."""
    import torch

    cfg = model.config
    hidden, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads  # query heads sharing KV head 0
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        shared = torch.randn(hidden, generator=gen)
        shared /= shared.norm()
        # a direction common to all tokens gives queries and keys a content-independent part
        emb += shared * emb.norm(dim=1).mean()
        normed = shared * math.sqrt(2.0 / hidden)  # its size after RMSNorm
        # RoPE rotates dims (i, i + hd/2) by position * theta_i; q = k * e^{-i offset theta} makes
        # the score sum_i cos((t - s - offset) * theta_i), largest where t - s == offset.
        inv = cfg.rope_parameters["rope_theta"] ** (-torch.arange(hd // 2, dtype=torch.float) * 2 / hd)
        q = torch.cat([torch.cos(offset * inv), -torch.sin(offset * inv)]) * 4.0
        k = torch.cat([torch.ones(hd // 2), torch.zeros(hd // 2)]) * 4.0
        attn.k_proj.weight[:hd] = torch.outer(k, normed)
        basis = torch.randn(hidden, hd, generator=gen)
        basis -= torch.outer(shared, shared @ basis)
        basis, _ = torch.linalg.qr(basis)  # token-specific subspace the head carries over
        attn.v_proj.weight[:hd] = basis.T
        for h in range(group):
            attn.q_proj.weight[h * hd:(h + 1) * hd] = torch.outer(q, normed)
            attn.o_proj.weight[:, h * hd:(h + 1) * hd] = basis * (8.0 / group)
