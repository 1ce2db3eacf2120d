"""Behaviour checks: the GGUF's chat template and its end of turn, as the server will use them.

Template: the GGUF's ``tokenizer.chat_template`` is rendered with llama-cpp-python's own Jinja2
formatter (the one its server builds from the GGUF, with the GGUF's BOS/EOS texts) and tokenized by
llama.cpp with special tokens parsed; the ids must equal the HF tokenizer's ``apply_chat_template``
for system + user + assistant and for system + user + generation prompt. BOS must not be doubled,
neither by llama-cpp-python (which adds none to a templated prompt) nor by llama.cpp's own server
(which adds one when the GGUF says ``add_bos_token`` and then reads the template's own).

Stop: a few calibration prompts are generated greedily by the reference, which must end its turn
within the budget; each GGUF, through ``create_chat_completion`` (the server's code path), must
finish with ``stop`` on the same token the reference ended with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from .calibration import Conversation, chat_ids

STOP_MARGIN = 16       # extra tokens a GGUF may take over the reference's answer length
FALLBACK_USER = "Hello! Please introduce yourself in one sentence."
FALLBACK_ANSWER = "Hello, I am a helpful assistant."


@dataclass
class Generation:
    messages: tuple[dict, ...]
    n_tokens: int                    # generated, the end-of-turn token included
    finish_reason: str               # "stop" | "length"
    stop_token: Optional[int]
    text: str

    def to_dict(self) -> dict:
        return {"finish_reason": self.finish_reason, "stop_token": self.stop_token, "n_tokens": self.n_tokens,
                "text": self.text[:200]}


@dataclass
class TemplateCase:
    name: str
    messages: tuple[dict, ...]
    add_generation_prompt: bool
    hf_ids: list[int]


@dataclass
class Verdict:
    ok: bool
    problems: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, **self.details}


def stop_conversations(convs: Sequence[Conversation], n: int, system_prompt: str = "") -> list[Conversation]:
    """The ``n`` prompts with the shortest references: a short answer makes a cheap, decisive test.
    Plain-text calibration has no prompts: a generic one then still shows whether the turn ends."""
    if not convs and n:
        sys_msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        convs = [Conversation(tuple(sys_msgs + [{"role": "user", "content": FALLBACK_USER}]))]
    ranked = sorted(convs, key=lambda c: (c.reference is None, len(c.reference or "")))
    return ranked[:n]


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


def reference_generations(model, tok, convs: list[Conversation], eos: list[int], budget: int,
                          device: str) -> list[Generation]:
    """Greedy answers of the reference (torch) to each prompt, and the token each one ended on."""
    import torch

    out = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    for c in convs:
        ids = chat_ids(tok, c.messages, add_generation_prompt=True)
        inp = torch.tensor([ids], device=device)
        gen = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=budget,
                             do_sample=False, eos_token_id=eos or None, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
        new = gen[0, len(ids):].tolist()
        stopped = bool(new) and new[-1] in eos
        out.append(Generation(c.messages, len(new), "stop" if stopped else "length", new[-1] if stopped else None,
                              tok.decode(new, skip_special_tokens=True)))
    return out


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


def check_stop(llm, gens: Sequence[Generation]) -> Verdict:
    """Greedy chat completions on the GGUF finish with ``stop`` on the reference's end-of-turn token."""
    if not gens:
        return Verdict(True, [], {"cases": [], "note": "no calibration prompt to generate from"})
    problems, rows = [], []
    for i, g in enumerate(gens):
        if g.finish_reason != "stop":
            problems.append(f"prompt {i}: the reference itself did not end its turn within {g.n_tokens} tokens")
            rows.append({"reference": g.to_dict()})
            continue
        resp = llm.create_chat_completion(messages=[dict(m) for m in g.messages], temperature=0.0,
                                          max_tokens=g.n_tokens + STOP_MARGIN, repeat_penalty=1.0, seed=0)
        choice = resp["choices"][0]
        finish = choice.get("finish_reason")
        # greedy: the token that ended the answer is the argmax after the last evaluated one
        last = int(llm.scores[llm.n_tokens - 1].argmax()) if llm.n_tokens else None
        row = {"reference": g.to_dict(), "finish_reason": finish, "stop_token": last,
               "text": (choice.get("message") or {}).get("content", "")[:200]}
        if finish != "stop":
            problems.append(f"prompt {i}: generation did not stop within {g.n_tokens + STOP_MARGIN} tokens "
                            f"(finish_reason {finish}); the reference ended after {g.n_tokens}")
        elif last != g.stop_token:
            problems.append(f"prompt {i}: stopped on token {last} "
                            f"({_special_text(llm, last) if last is not None else '?'!r}), the fine-tune ends its "
                            f"turn with {g.stop_token} ({_special_text(llm, g.stop_token)!r})")
        rows.append(row)
    return Verdict(not problems, problems, {"cases": rows})
