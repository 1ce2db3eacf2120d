"""Calibration tokens: the exact id sequences the reference and every GGUF read.

Default: the model's evaluation samples rendered through its chat template with the references as
assistant turns (the text the fine-tune was made for, ending in its end-of-turn token), plus a
little built-in general text (so a GGUF that broke ordinary language shows too). ``verify.calibration``
replaces both: a ``.jsonl`` file of ``{"text": ...}`` lines and/or conversations (``prompt`` or
``messages``, optional ``reference``), or any other file read as plain text. Everything is tokenized
once by the Hugging Face tokenizer; llama.cpp is fed these ids, never its own tokenization.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError
from ..evaluation.samples import load_samples, with_system_prompt

GENERAL_SHARE = 0.15   # of the token budget, at most, for the built-in general text

GENERAL_TEXT = """\
The river rises in the hills to the north and reaches the sea after a journey of some two hundred
kilometres. For most of its length it runs slowly through farmland, and in dry summers the water
level falls far enough that children can cross it on foot. The town at its mouth grew around a
harbour that was busy long before the railway arrived; today most of the boats there carry
tourists rather than fish.

To make a simple loaf of bread, mix flour, water, salt and a little yeast, then knead the dough
until it feels smooth and springs back when pressed. Leave it covered in a warm place for an hour
or two, shape it, let it rise again, and bake it in a hot oven until the crust is brown and the
loaf sounds hollow when tapped underneath.

A computer program is a list of instructions. Each step is simple, but together they can sort a
million names, draw a map, or answer a question. When a program behaves unexpectedly, the usual
first move is to make the problem smaller: find the shortest input that still fails, and read
what the program actually does with it, one step at a time.

In the winter of that year the weather turned cold early. Snow closed the mountain roads in
November, and the village spent three weeks cut off from the valley. People shared what they had;
the baker kept his oven going through the night, and the school stayed open because it was the
warmest building in the place.
"""


@dataclass(frozen=True)
class Conversation:
    """A prompt (system + user turns) and, when known, the answer the fine-tune should give."""

    messages: tuple[dict, ...]
    reference: Optional[str] = None


@dataclass
class Calibration:
    sequences: list[list[int]]                          # token ids, each <= max_seq_len
    kinds: list[str]                                    # "chat" | "text", per sequence
    conversations: list[Conversation] = field(default_factory=list)
    source: str = ""
    # (sequence, position, token): where an assistant turn ends; the row before predicts that token
    turn_ends: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def n_positions(self) -> int:
        """Scored positions: each sequence's tokens but the last predict the one after them."""
        return sum(len(s) - 1 for s in self.sequences)

    @property
    def longest(self) -> int:
        return max((len(s) for s in self.sequences), default=0)

    def add(self, ids: list[int], kind: str, *, max_seq_len: int, up_to: int, ends: Sequence[int] = ()) -> None:
        """Append ``ids`` in sequences of at most ``max_seq_len`` while the set holds under ``up_to`` tokens
        (the last one cut to fit; a piece of one token is dropped). ``ends``: indexes in ``ids`` of
        end-of-turn tokens, kept where a token before them in the same piece can predict them."""
        used = self.n_tokens
        for start in range(0, len(ids), max_seq_len):
            piece = ids[start:start + max_seq_len][: max(0, up_to - used)]
            if len(piece) > 1:
                self.turn_ends += [(len(self.sequences), e - start, ids[e]) for e in ends
                                   if 1 <= e - start < len(piece)]
                self.sequences.append(piece)
                self.kinds.append(kind)
                used += len(piece)

    def digest(self) -> str:
        h = hashlib.sha256()
        for s in self.sequences:
            h.update(json.dumps(s, separators=(",", ":")).encode())
        return h.hexdigest()


def load_tokenizer(base_dir: Path, adapter_dir: Optional[Path]):
    """The fine-tune's tokenizer: the adapter's when it ships one (chat template edits), as merge does."""
    from transformers import AutoTokenizer

    src = adapter_dir if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file() \
        and any((Path(adapter_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else base_dir
    return AutoTokenizer.from_pretrained(str(src))


def chat_ids(tok, messages: Sequence[dict], *, add_generation_prompt: bool) -> list[int]:
    """The HF tokenizer's own rendering of a conversation (apply_chat_template: no extra specials)."""
    if not getattr(tok, "chat_template", None):
        raise InputError("the model's tokenizer has no chat template",
                         hint="add chat_template to tokenizer_config.json of the base or the adapter")
    out = tok.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt,
                                  return_dict=False)
    return [int(i) for i in out]


def assistant_turn_ends(tok, messages: Sequence[dict], ids: list[int], eos: Sequence[int]) -> list[int]:
    """Indexes in ``ids`` (the rendered conversation) of the token that ends each assistant turn: the
    first end-of-turn id after the turn's prompt, as the template renders it for generation."""
    out = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or not eos:
            continue
        start = len(chat_ids(tok, messages[:k], add_generation_prompt=True))
        end = next((i for i in range(start, len(ids)) if ids[i] in eos), None)
        if end is not None:
            out.append(end)
    return out


def _read_file(path: Path) -> tuple[list[Conversation], list[str]]:
    if not path.is_file():
        raise InputError(f"verify.calibration file {path} not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() != ".jsonl":
        return [], [p for p in text.split("\n\n") if p.strip()]
    convs, texts = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object")
        if isinstance(obj.get("text"), str):
            texts.append(obj["text"])
            continue
        msgs = obj.get("messages") or ([{"role": "user", "content": obj["prompt"]}] if obj.get("prompt") else None)
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise InputError(f"{path}:{lineno}: give text, prompt or messages")
        ref = obj.get("reference")
        convs.append(Conversation(tuple({"role": m["role"], "content": m["content"]} for m in msgs),
                                  ref if isinstance(ref, str) else None))
    return convs, texts


def _from_samples(path: Path) -> list[Conversation]:
    return [Conversation(tuple(s.messages), s.reference) for s in load_samples(path)]


def build_calibration(tok, *, system_prompt: str, calibration: Optional[Path], samples: Optional[Path],
                      max_tokens, max_seq_len: int, eos: Sequence[int] = (),
                      base_dir: Optional[Path] = None) -> Calibration:
    """Render, tokenize and cap the calibration set (conversations first, general text after).
    ``max_tokens`` "auto" is sized by the base's parameter count (``base_dir``, else the tokenizer's folder)."""
    if max_tokens == "auto":
        max_tokens = auto_tokens(Path(base_dir or getattr(tok, "name_or_path", "") or "."))
    if calibration is not None:
        convs, texts = _read_file(Path(calibration))
        source = str(calibration)
    else:
        convs = _from_samples(Path(samples)) if samples is not None and Path(samples).is_file() else []
        texts = [p for p in GENERAL_TEXT.split("\n\n") if p.strip()]
        source = f"{samples} + built-in text" if convs else "built-in text"
    # the server's rule: a conversation without a system message gets the model's
    convs = [Conversation(tuple(with_system_prompt(c.messages, system_prompt)), c.reference) for c in convs]
    # conversations leave room for the general text (up to its share); text alone takes the whole budget
    text_budget = min(int(max_tokens * GENERAL_SHARE), _text_tokens(tok, texts)) if convs else max_tokens
    chat_budget = max_tokens - text_budget
    cal = Calibration([], [], conversations=[c for c in convs if c.messages and c.messages[-1]["role"] != "assistant"],
                      source=source)
    for c in convs:
        msgs = list(c.messages) + ([{"role": "assistant", "content": c.reference}] if c.reference else [])
        gen = msgs[-1]["role"] != "assistant"
        ids = chat_ids(tok, msgs, add_generation_prompt=gen)
        cal.add(ids, "chat", max_seq_len=max_seq_len, up_to=chat_budget,
                ends=assistant_turn_ends(tok, msgs, ids, eos))
        if cal.n_tokens >= chat_budget:
            break
    for t in texts:
        ids = tok(t, add_special_tokens=True).input_ids  # as plain text is read: BOS where the model wants it
        cal.add(list(ids), "text", max_seq_len=max_seq_len, up_to=max_tokens)
        if cal.n_tokens >= max_tokens:
            break
    if not cal.sequences:
        raise InputError(f"no calibration tokens from {source}",
                         hint="set verify.calibration to a text or JSONL file, or evaluation.samples")
    return cal


def auto_tokens(base_dir: Path) -> int:
    from ..merge.hf_folder import load_base_info
    from .memory import AUTO_TOKENS_MAX, token_budget

    try:
        return token_budget("auto", load_base_info(base_dir).param_count)
    except InputError:  # a tokenizer from the adapter's folder: no weights there to count
        return AUTO_TOKENS_MAX


def _text_tokens(tok, texts: list[str]) -> int:
    return sum(len(tok(t, add_special_tokens=True).input_ids) for t in texts)
