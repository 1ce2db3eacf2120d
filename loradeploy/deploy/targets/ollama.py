"""Ollama: a Modelfile (FROM the GGUF, SYSTEM, TEMPLATE and stop tokens) and ``ollama create``.

The TEMPLATE is derived from the GGUF's own chat template. ChatML (``<|im_start|>role ...
<|im_end|>``), the format of the demo models and of Qwen2.5, maps to an Ollama template over
``.Messages``; Ollama adds the Modelfile's SYSTEM only to requests without a system message, the
same rule the embedded server applies. Other templates get no TEMPLATE line: Ollama then maps the
GGUF's template itself, and the info says so.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ...errors import DeployError, ProcError
from ...fsutil import atomic_write_text

if TYPE_CHECKING:
    from ...config import Config
    from ..versions import Version

CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


class _OllamaError(DeployError, ProcError):
    pass


def chat_template_info(path: Path) -> tuple[str | None, str | None]:
    """(chat template, end-of-sequence token text) from the GGUF's metadata."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    tmpl = r.get_field("tokenizer.chat_template")
    template = tmpl.contents() if tmpl is not None else None
    eos = None
    eos_id, tokens = r.get_field("tokenizer.ggml.eos_token_id"), r.get_field("tokenizer.ggml.tokens")
    if eos_id is not None and tokens is not None:
        try:
            eos = tokens.contents(int(eos_id.contents()))
        except (IndexError, ValueError, TypeError):
            eos = None
    return template, eos


def _quote(text: str) -> str:
    if '"""' in text:
        raise DeployError('the system prompt contains """, which an Ollama Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf: Path, system_prompt: str, template: str | None, eos: str | None) -> tuple[str, str]:
    """(Modelfile text, template kind)."""
    lines = [f"FROM {Path(gguf).resolve()}"]
    stops: list[str] = []
    kind = "gguf"
    if template and "<|im_start|>" in template and "<|im_end|>" in template:
        kind = "chatml"
        lines.append(f"TEMPLATE {_quote(CHATML_TEMPLATE)}")
        stops = ["<|im_start|>", "<|im_end|>"]
    if eos and eos not in stops:
        stops.append(eos)
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    if system_prompt:
        lines.append(f"SYSTEM {_quote(system_prompt)}")
    return "\n".join(lines) + "\n", kind


class OllamaTarget:
    name = "ollama"

    def _path(self, version: "Version") -> Path:
        return version.dir / "Modelfile"

    def deploy(self, cfg: "Config", model: str, version: "Version",
               progress: Callable[[str, float, float], None] | None = None) -> dict:
        template, eos = chat_template_info(version.path)
        text, kind = modelfile(version.path, cfg.models[model].system_prompt, template, eos)
        path = self._path(version)
        atomic_write_text(path, text)
        info = {"modelfile": str(path), "template": kind}
        if kind != "chatml":
            info["template_note"] = "no TEMPLATE written: Ollama maps the GGUF's chat template itself"
        exe = shutil.which("ollama") if cfg.deployment.ollama.use_cli else None
        if exe is None:
            info["note"] = f"Modelfile written; run `ollama create {model} -f {path}` (the ollama CLI is not on PATH)"
            return info
        from ...tools.proc import run

        run([exe, "create", model, "-f", str(path)], env={"OLLAMA_HOST": cfg.deployment.ollama.host},
            cwd=path.parent, timeout=3600, what="ollama create", error_cls=_OllamaError)
        info["created"] = model
        return info

    def check(self, cfg: "Config", model: str, sha256: str) -> tuple[bool, str]:
        from ..versions import live_version

        live = live_version(cfg, model)
        if live is None or live.sha256 != sha256:
            return False, "not the live version"
        return (True, "Modelfile in place") if self._path(live).is_file() else (False, "Modelfile missing")
