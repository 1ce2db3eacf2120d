"""The sample set: one JSON object per line, each a prompt or a conversation, optionally a reference."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import InputError

_SAMPLE_KEYS = {"id", "prompt", "messages", "reference", "expected_contains", "tags", "models", "meta"}
_ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Sample:
    id: str
    messages: tuple[dict, ...]
    reference: Optional[str] = None
    expected_contains: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    models: tuple[str, ...] = ()   # empty: every model
    line: int = 0

    def applies_to(self, model: str) -> bool:
        return not self.models or model in self.models

    def to_dict(self) -> dict:
        return {"id": self.id, "messages": list(self.messages), "reference": self.reference,
                "expected_contains": list(self.expected_contains), "tags": list(self.tags),
                "models": list(self.models), "line": self.line}


def _str_list(value: Any, key: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InputError(f"{where}: {key} must be a string or a list of strings")


def _parse_sample(obj: Any, where: str, lineno: int) -> Sample:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _SAMPLE_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}",
                         hint=f"known keys: {', '.join(sorted(_SAMPLE_KEYS))}")
    sid = obj.get("id")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)) or str(sid).strip() == "":
        raise InputError(f"{where}: every sample needs an id (a non-empty string)")
    has_prompt, has_msgs = obj.get("prompt") is not None, obj.get("messages") is not None
    if has_prompt == has_msgs:
        raise InputError(f"{where}: give exactly one of prompt or messages")
    if has_prompt:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise InputError(f"{where}: prompt must be a non-empty string")
        messages: tuple[dict, ...] = ({"role": "user", "content": obj["prompt"]},)
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(msgs):
            if (not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str)):
                raise InputError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, "
                                 f"\"content\": string}}")
            out.append({"role": m["role"], "content": m["content"]})
        messages = tuple(out)
    ref = obj.get("reference")
    if ref is not None and not isinstance(ref, str):
        raise InputError(f"{where}: reference must be a string")
    return Sample(str(sid), messages, ref, _str_list(obj.get("expected_contains"), "expected_contains", where),
                  _str_list(obj.get("tags"), "tags", where), _str_list(obj.get("models"), "models", where),
                  lineno)


def parse_samples(text: str, source: str = "samples") -> list[Sample]:
    """Parse JSONL text: one sample per non-blank line. Errors name ``source:line``."""
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})",
                             hint="each line must be one JSON object") from None
        s = _parse_sample(obj, where, lineno)
        if s.id in seen:
            raise InputError(f"{where}: duplicate sample id {s.id!r} (first on line {seen[s.id]})")
        seen[s.id] = lineno
        samples.append(s)
    if not samples:
        raise InputError(f"{source} has no samples",
                         hint='write one JSON object per line, e.g. {"id": "q1", "prompt": "...", "reference": "..."}')
    return samples


def load_samples(path: Path | str) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"sample file {path} not found", hint="set evaluation.samples or pass --samples FILE")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read sample file {path}: {exc}") from None
    return parse_samples(text, str(path))


def with_system_prompt(messages: Sequence[dict], prompt: Optional[str]) -> list[dict]:
    """The deployed server's rule: a conversation without a system message gets the model's."""
    msgs = list(messages)
    if prompt and not any(m.get("role") in ("system", "developer") for m in msgs):
        msgs.insert(0, {"role": "system", "content": prompt})
    return msgs
