"""A small Llama pretrained on real text, and a real fine-tune of it: the model issue 20 asks for ("at least
4 layers, trained long enough on real text that its tensors differ in sensitivity"); the demo's models learn a
toy task in 2 layers, the bench models are random.

The text is Python's own standard library, on every machine this runs on: its modules' source (code,
comments, docstrings). One module in ``HELD_OUT`` (by a hash of its name) is kept out of all training; the
evaluation samples come from those.
- ``build_text_base``: SentencePiece (8192 pieces, ChatML specials) and a 4-layer Llama (hidden 512, FFN 1536,
  8 heads / 2 KV heads, untied output; ~20M parameters) pretrained on random 256-token windows of the
  source. One row in 16 is a ChatML conversation of the reverse task (docstring in, signature out), so the
  chat tokens are trained rows, as in a real base.
- ``train_text_adapter``: a peft LoRA (r 16, all linear layers) for the docstring task: a signature in, the
  first paragraph of its docstring out, loss on the answer only.
- ``write_text_samples``: that task on held-out modules, the docstring as reference (eval_samples.jsonl).
Training runs under bfloat16 autocast where the CPU has native bf16 (AMX, AVX512-BF16), else in float32; the
marker records which. Both builds are cached by marker like the demo's (this module's own digest).
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..fsutil import atomic_output
from .recipe import BUILD_VERSION, Progress, already_built, read_marker, report_progress, torch_env, write_marker
from .samples import IM_END, render_chatml
from .tokenizers import special_ids, write_llama_tokenizer
from .training import LORA_TARGETS, encode, model_config, optimizer_step, schedule

SHAPE = dict(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1536)
VOCAB = 8192
SEQ = 256
BASE_TRAIN = dict(steps=600, batch=16, lr=3e-3, warmup=40, weight_decay=0.1, chat_every=16)
ADAPTER_TRAIN = dict(steps=300, batch=16, lr=2e-3, r=16, alpha=32, max_len=256)
HELD_OUT = 8
SYSTEM = "You document Python code: given a signature, write the first paragraph of its docstring."
_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "idlelib",
         "turtledemo"}
RECIPE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def stdlib_modules() -> list[tuple[str, str]]:
    """(dotted name, source) of the standard library's own modules, tests and tools left out, by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if _SKIP & set(rel.parts):
            continue
        try:
            out.append((".".join(rel.with_suffix("").parts), f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    if len(out) < 100:
        raise InputError(f"only {len(out)} standard-library modules under {root}",
                         hint="the text model trains on Python's standard library source")
    return out


def held_out(module: str) -> bool:
    return zlib.crc32(module.encode()) % HELD_OUT == 0


@dataclass(frozen=True)
class DocPair:
    module: str
    kind: str          # function | class
    signature: str     # the def/class line(s), as written
    docstring: str     # its first paragraph

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": f"Write the docstring for this {self.kind} from {self.module}:\n"
                                            f"{self.signature}"}]


def doc_pairs(modules: list[tuple[str, str]]) -> list[DocPair]:
    out = []
    for name, text in modules:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            first = doc.split("\n\n")[0].strip() if doc else ""
            sig = "\n".join(lines[node.lineno - 1:node.body[0].lineno - 1]).strip()
            if 20 <= len(first) <= 400 and 0 < len(sig) <= 300:
                out.append(DocPair(name, "class" if isinstance(node, ast.ClassDef) else "function", sig, first))
    return out


def _threads(n: int):
    import torch

    torch.set_num_threads(max(1, n))


def _autocast():
    import torch

    bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), ("bfloat16" if bf16 else "float32")


def build_text_base(out_dir: Path, *, seed: int = 0, threads: int = 2, progress: Progress | None = None) -> Path:
    """Build (or reuse) the pretrained text base in Hugging Face layout (float16 safetensors, tokenizer)."""
    out_dir = Path(out_dir)
    params = {"kind": "text-base", "seed": seed, "recipe": RECIPE, "version": BUILD_VERSION, **SHAPE, **BASE_TRAIN,
              "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    if already_built(out_dir, params):
        return out_dir
    t0 = time.monotonic()
    mods = stdlib_modules()
    train = [(n, t) for n, t in mods if not held_out(n)]
    with atomic_output(out_dir, is_dir=True) as tmp, torch_env(seed):
        _threads(threads)
        report_progress(progress, "text base: tokenizer", 0, 1)
        rng = random.Random(seed)
        lines = [ln for _, t in train for ln in t.splitlines() if ln.strip()]
        write_llama_tokenizer(tmp, seed, vocab_size=VOCAB, lines=rng.sample(lines, min(len(lines), 60000)))
        loss, dtype, tokens = _pretrain(tmp, train, seed, progress)
        write_marker(tmp, {**params, "train_loss": round(loss, 4), "train_dtype": dtype, "corpus_tokens": tokens,
                           "modules": len(train), "seconds": round(time.monotonic() - t0, 1)})
    return out_dir


def _pretrain(d: Path, train: list[tuple[str, str]], seed: int, progress: Progress | None) -> tuple[float, str, int]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(d)
    ids = special_ids(tok, "llama")
    stream = []
    for _, text in train:
        stream += [ids["bos"], *tok.encode(text, add_special_tokens=False), tok.convert_tokens_to_ids("</s>")]
    chat = []
    for p in doc_pairs(train):   # the reverse task, so the ChatML tokens are trained rows
        msgs = [{"role": "user", "content": f"Which {p.kind} does this describe?\n{p.docstring}"}]
        chat += tok.encode(render_chatml(msgs) + p.signature + IM_END, add_special_tokens=False)
    stream, chat = torch.tensor(stream), torch.tensor(chat)
    hp = BASE_TRAIN
    model = AutoModelForCausalLM.from_config(model_config("llama", len(tok), ids, **SHAPE), dtype=torch.float32)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": rest, "weight_decay": 0}],
                            lr=hp["lr"], betas=(0.9, 0.95))
    steps = hp["steps"]
    sched = schedule(opt, steps, hp["warmup"])
    gen = torch.Generator().manual_seed(seed)
    cast, dtype = _autocast()
    model.train()
    loss_value = float("nan")
    n_chat = max(1, hp["batch"] // hp["chat_every"])
    for step in range(steps):
        at = torch.randint(0, len(stream) - SEQ - 1, (hp["batch"] - n_chat,), generator=gen).tolist()
        at_chat = torch.randint(0, len(chat) - SEQ - 1, (n_chat,), generator=gen).tolist()
        x = torch.stack([stream[i:i + SEQ + 1] for i in at] + [chat[i:i + SEQ + 1] for i in at_chat])
        with cast:
            logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss_value = optimizer_step(opt, sched, loss, list(model.parameters()))
        if step % 10 == 0 or step == steps - 1:
            report_progress(progress, f"text base: pretraining (loss {loss_value:.2f})", step + 1, steps)
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos_list"],
                                               pad_token_id=ids["pad"], do_sample=False)
    model.save_pretrained(d)
    return loss_value, dtype, len(stream)


def train_text_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, threads: int = 2,
                       progress: Progress | None = None) -> Path:
    """Train (or reuse) the docstring LoRA on ``base_dir`` (a ``build_text_base`` folder)."""
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir)
    base = read_marker(base_dir)
    if base is None or base.get("kind") != "text-base":
        raise InputError(f"{base_dir} is not a text base model", hint="build it with build_text_base first")
    params = {"kind": "text-adapter", "seed": seed, "recipe": RECIPE, "version": BUILD_VERSION, "base": str(base_dir), **ADAPTER_TRAIN}
    if already_built(out_dir, params):
        return out_dir
    t0 = time.monotonic()
    with atomic_output(out_dir, is_dir=True) as tmp, torch_env(seed):
        _threads(threads)
        loss, dtype, n = _train_lora(base_dir, tmp, seed, progress)
        write_marker(tmp, {**params, "train_loss": round(loss, 4), "train_dtype": dtype, "pairs": n,
                           "seconds": round(time.monotonic() - t0, 1)})
    return out_dir


def _train_lora(base_dir: Path, out: Path, seed: int, progress: Progress | None) -> tuple[float, str, int]:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hp = ADAPTER_TRAIN
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = special_ids(tok, "llama")
    rng = random.Random(seed)
    pairs = doc_pairs([(n, t) for n, t in stdlib_modules() if not held_out(n)])
    system = [{"role": "system", "content": SYSTEM}]
    data = encode(tok, [(system + p.messages(), p.docstring) for p in pairs], ids, bos_sometimes=True, rng=rng)
    keep = [i for i, s in enumerate(data.ids) if len(s) <= hp["max_len"]]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=hp["r"], lora_alpha=hp["alpha"], lora_dropout=0.0, bias="none",
                                                  target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    params = [q for q in peft_model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=0.0)
    steps = hp["steps"]
    sched = schedule(opt, steps, 20)
    gen = torch.Generator().manual_seed(seed)
    cast, dtype = _autocast()
    peft_model.train()
    loss_value = float("nan")
    for step in range(steps):
        pick = [keep[j] for j in torch.randint(0, len(keep), (hp["batch"],), generator=gen).tolist()]
        width = max(len(data.ids[i]) for i in pick)
        x = torch.full((len(pick), width), ids["pad"], dtype=torch.long)
        target = torch.full((len(pick), width), -100, dtype=torch.long)
        mask = torch.zeros((len(pick), width), dtype=torch.long)
        for r, i in enumerate(pick):
            seq, n = data.ids[i], data.n_prompt[i]
            x[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
            target[r, n - 1:len(seq) - 1] = torch.tensor(seq[n:])     # position t predicts t + 1
        with cast:
            logits = peft_model(input_ids=x, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        loss_value = optimizer_step(opt, sched, loss, params)
        if step % 10 == 0 or step == steps - 1:
            report_progress(progress, f"text adapter: training (loss {loss_value:.2f})", step + 1, steps)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return loss_value, dtype, len(keep)


def write_text_samples(path: Path, n: int = 48, *, seed: int = 1234) -> Path:
    """``n`` docstring tasks from the held-out modules, the docstring as reference (eval_samples.jsonl)."""
    pairs = doc_pairs([(m, t) for m, t in stdlib_modules() if held_out(m)])
    rng = random.Random(seed)
    picked = rng.sample(pairs, min(n, len(pairs)))
    lines = "".join(json.dumps({"id": f"doc-{k:03d}", "messages": p.messages(), "reference": p.docstring,
                                "tags": ["text-model", "heldout", f"module:{p.module}"]}) + "\n"
                    for k, p in enumerate(picked))
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(lines, encoding="utf-8")
    return path
