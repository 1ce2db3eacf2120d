"""Model shapes and the training loop the demo base and adapters share.

Training takes seconds on two CPU cores because it runs only on answer tokens and only over the
vocabulary rows the task uses. Every other row is (nearly) zero, so its logit is ~0 and the rest
of the vocabulary enters the softmax as one constant column, log(V - A). That is the exact full
softmax of the saved model, so llama.cpp later samples from what was trained.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .recipe import Progress, report_progress
from .samples import render_chatml


def model_config(arch: str, vocab_size: int, ids: dict, *, hidden: int = 256, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, intermediate: int = 512, max_pos: int = 2048,
                 tied: bool = False):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_pos, initializer_range=0.02,
                  bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    if arch == "llama":
        return LlamaConfig(head_dim=hidden // heads, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    # Qwen2 has q/k/v biases built in; tied embeddings as in Qwen2.5 0.5B-3B.
    return Qwen2Config(rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Encoded:
    ids: list[list[int]]   # prompt + answer + end-of-turn token
    n_prompt: list[int]    # leading ids that carry no loss


def encode(tok, samples, ids: dict, *, bos_sometimes: bool, rng: random.Random) -> Encoded:
    """Prompt and answer are tokenized apart, as at inference, where the prompt is tokenized and
    the answer generated token by token."""
    out = Encoded([], [])
    for messages, answer in samples:
        prompt = tok.encode(render_chatml(messages), add_special_tokens=False)
        # llama.cpp's server adds BOS to SentencePiece prompts, HF and llama-cpp-python's chat
        # templating do not: train both.
        if bos_sometimes and rng.random() < 0.5:
            prompt = [ids["bos"]] + prompt
        out.ids.append(prompt + tok.encode(answer, add_special_tokens=False) + [ids["eos"]])
        out.n_prompt.append(len(prompt))
    return out


def fit(*, hidden_fn, out_rows_fn, params, data: Encoded, to_input, to_target, n_rest: int,
        steps: int, batch: int, lr: float, seed: int, progress: Progress | None, desc: str) -> float:
    """Train on answer tokens only; return the last batch's loss. ``to_input`` maps token ids to
    model input ids, ``to_target`` to row numbers in what ``out_rows_fn`` returns."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = schedule(opt, steps, max(1, steps // 10))
    rest = math.log(n_rest) if n_rest > 0 else None
    # Batches of equal-length sequences need no padding and no attention mask.
    by_len: dict[int, list[int]] = {}
    for i, seq in enumerate(data.ids):
        by_len.setdefault(len(seq), []).append(i)
    lengths = sorted(by_len)
    weights = torch.tensor([len(by_len[n]) for n in lengths], dtype=torch.float)
    loss_value = float("nan")
    for step in range(steps):
        group = by_len[lengths[int(torch.multinomial(weights, 1, generator=gen))]]
        pick = [group[j] for j in torch.randint(0, len(group), (batch,), generator=gen).tolist()]
        inp = torch.tensor([data.ids[i] for i in pick])
        scored = torch.zeros(inp.shape, dtype=torch.bool)
        for r, i in enumerate(pick):
            scored[r, data.n_prompt[i] - 1:inp.shape[1] - 1] = True  # position t predicts t + 1
        targets = to_target(inp[:, 1:][scored[:, :-1]])
        logits = hidden_fn(to_input(inp))[scored] @ out_rows_fn().T
        if rest is not None:
            logits = torch.cat([logits, logits.new_full((logits.shape[0], 1), rest)], dim=1)
        loss = F.cross_entropy(logits, targets)
        loss_value = optimizer_step(opt, sched, loss, params)
        if step % 10 == 0 or step == steps - 1:
            report_progress(progress, desc, step + 1, steps)
    return loss_value


def schedule(opt, steps: int, warm: int):
    """Linear warm-up over ``warm`` steps, then a cosine from the learning rate down to a tenth of it."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))


def optimizer_step(opt, sched, loss, params) -> float:
    """One step: gradients of ``loss``, clipped to norm 1 over ``params``; the loss as a float."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())
