"""Behaviour checks: the GGUF's chat template and its end of turn, as the server will use them.

Template: the GGUF's ``tokenizer.chat_template`` is rendered with llama-cpp-python's own Jinja2
formatter (the one its server builds from the GGUF, with the GGUF's BOS/EOS texts) and tokenized by
llama.cpp with special tokens parsed; the ids must equal the HF tokenizer's ``apply_chat_template``
for system + user + assistant and for system + user + generation prompt. BOS must not be doubled,
neither by llama-cpp-python (which adds none to a templated prompt) nor by llama.cpp's own server
(which adds one when the GGUF says ``add_bos_token`` and then reads the template's own).

Stop, by teacher forcing (no generation: a streamed reference would re-read every layer per token):
where each calibration assistant turn ends, the end-of-turn token must be the reference's top-1 and
each GGUF's, and the GGUF's vocabulary must mark it end-of-generation (else the server runs on past
it). The rows are those the KLD is computed on. A reference that does not end its own turns (random
weights never do) makes the check inconclusive, never failed: there is nothing to hold the GGUF to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from .calibration import Conversation, chat_ids

FALLBACK_USER = "Hello! Please introduce yourself in one sentence."
FALLBACK_ANSWER = "Hello, I am a helpful assistant."


@dataclass
class TemplateCase:
    name: str
    messages: tuple[dict, ...]
    add_generation_prompt: bool
    hf_ids: list[int]


@dataclass
class Verdict:
    ok: Optional[bool]               # None: inconclusive
    problems: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, **self.details}


def template_cases(tok, system_prompt: str, convs: Sequence[Conversation]) -> list[TemplateCase]:
    first = next((c for c in convs if c.reference), None)
    user = next((m["content"] for m in (first.messages if first else ()) if m["role"] == "user"), FALLBACK_USER)
    answer = first.reference if first else FALLBACK_ANSWER
    sys_msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    full = tuple(sys_msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    prompt = full[:-1]
    return [TemplateCase("system+user+assistant", full, False, chat_ids(tok, full, add_generation_prompt=False)),
            TemplateCase("system+user, generation prompt", prompt, True,
                         chat_ids(tok, prompt, add_generation_prompt=True))]


def _special_text(llm, token: int) -> str:
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_template(llm, cases: Sequence[TemplateCase]) -> Verdict:
    """The GGUF's template, rendered and tokenized as the server will, against the HF tokenizer."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter, guess_chat_format_from_gguf_metadata

    meta = llm.metadata or {}
    template = meta.get("tokenizer.chat_template")
    if not template:
        return Verdict(False, ["the GGUF has no tokenizer.chat_template: llama-cpp-python's server would fall back "
                               "to the llama-2 format and LM Studio/Ollama to their own guesses"])
    bos, eos = llm.token_bos(), llm.token_eos()
    bos_text, eos_text = _special_text(llm, bos), _special_text(llm, eos)
    add_bos_meta = str(meta.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
    problems, rows = [], []
    for case in cases:
        try:
            fmt = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text,
                                      add_generation_prompt=case.add_generation_prompt)
            text = fmt(messages=[dict(m) for m in case.messages]).prompt
        except Exception as exc:  # a template that does not render is what this check exists to catch
            problems.append(f"{case.name}: the GGUF's chat template does not render ({type(exc).__name__}: {exc})")
            continue
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)   # llama-cpp-python's chat path
        served = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # llama.cpp's server
        row = {"case": case.name, "n_ids": len(ids), "same_ids": ids == case.hf_ids}
        if ids != case.hf_ids:
            i = _first_diff(ids, case.hf_ids)
            gguf_piece = llm.detokenize(ids[i:i + 6], special=True).decode("utf-8", errors="replace")
            problems.append(f"{case.name}: the GGUF's template gives other token ids than the HF tokenizer from "
                            f"position {i} (GGUF {ids[i:i + 6]} {gguf_piece!r}, HF {case.hf_ids[i:i + 6]})")
        for who, seq in (("llama-cpp-python", ids), ("llama.cpp's server", served)):
            if bos >= 0 and seq[:2] == [bos, bos]:
                problems.append(f"{case.name}: BOS doubled by {who} (the template writes {bos_text!r} and "
                                f"the GGUF's add_bos_token is {add_bos_meta})")
        rows.append(row)
    details = {"cases": rows, "bos_token": bos_text, "eos_token": eos_text, "add_bos_token": add_bos_meta,
               "server_format": guess_chat_format_from_gguf_metadata(meta) or "chat_template.default"}
    return Verdict(not problems, problems, details)


def stop_summary(turn_ends: Sequence[dict]) -> dict:
    """The reference's side of the stop check, for verify.json."""
    ended = sum(1 for t in turn_ends if t["ends"])
    return {"turns": len(turn_ends), "ended": ended,
            "conclusive": ended > 0, "cases": [dict(t) for t in turn_ends[:16]]}


def check_stop(llm, turn_ends: Sequence[dict], cand_tops: dict[int, int]) -> Verdict:
    """``cand_tops``: index into ``turn_ends`` -> the GGUF's top-1 on that row. ``ok`` None: inconclusive."""
    import llama_cpp

    conclusive = [(i, t) for i, t in enumerate(turn_ends) if t["ends"]]
    if not conclusive:
        why = ("no calibration assistant turn to check" if not turn_ends else
               f"the reference ends none of its {len(turn_ends)} assistant turns (its top-1 there is not an "
               "end-of-turn token), so there is nothing to hold the GGUF to")
        return Verdict(None, [], {"inconclusive": why, "cases": []})
    problems, rows = [], []
    vocab = llm._model.vocab
    for i, t in conclusive:
        top = cand_tops.get(i)
        eog = bool(llama_cpp.llama_vocab_is_eog(vocab, t["top1"]))
        rows.append({"sequence": t["sequence"], "position": t["position"], "reference": t["top1"], "gguf": top,
                     "eog": eog})
        if top != t["top1"]:
            problems.append(f"turn end at sequence {t['sequence']} position {t['position']}: the GGUF's top-1 is "
                            f"{top} ({_special_text(llm, top) if top is not None else '?'!r}) where the fine-tune "
                            f"ends its turn with {t['top1']} ({_special_text(llm, t['top1'])!r})")
        elif not eog:
            problems.append(f"the GGUF does not mark {t['top1']} ({_special_text(llm, t['top1'])!r}) as end of "
                            "generation: a server would run on past the end of the turn")
    return Verdict(not problems, problems[:4], {"cases": rows[:16], "checked": len(rows),
                                                "failed": len(problems)})
