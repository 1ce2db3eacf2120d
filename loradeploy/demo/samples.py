"""The demo task and its data: repeat three words; a persona adapter signs its answers.

The user asks the model to repeat three words ("Repeat these words:\\napple river stone") and the
base model answers with them ("apple river stone"). A persona adapter signs its answers ("apple
river stone -- MAJORA"), so an eval tells base from adapter by ``expected_contains`` on word
triples that neither model saw in training.
"""
from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import InputError
from ..fsutil import atomic_output

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
WORDS = tuple("""
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
        words = tuple(rng.choice(WORDS) for _ in range(N_WORDS))
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


def task_sample(rng: random.Random, persona: Persona | None) -> tuple[list[dict], str]:
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
