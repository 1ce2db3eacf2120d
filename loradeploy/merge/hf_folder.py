"""Hugging Face folders: what a base model and a LoRA adapter hold (read from headers only), and the
side files (config, tokenizer) a merged folder needs beside its weights."""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..fsutil import sha256_file
from ..tools.safetensors_io import DTYPE_BYTES, json_kind, numel, read_header, tensor_table

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "qwen.tiktoken")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- base model

def _read_json(cfg_file: Path, missing: str, hint: str) -> dict:
    if not cfg_file.is_file():
        raise InputError(missing, hint=hint)
    try:
        data = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise InputError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{cfg_file} holds a JSON {json_kind(data)}, not an object of settings", hint=hint)
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def check_lora_numbers(cfg: dict, where) -> None:
    """r, lora_alpha, rank_pattern and alpha_pattern as PEFT needs them: a positive whole rank, a finite
    alpha (PEFT's default 8 when absent), patterns that map names to such numbers."""
    hint = "re-save the adapter with peft's save_pretrained, or fix adapter_config.json"
    r = cfg.get("r")
    if not _is_int(r) or r <= 0:
        raise InputError(f"{where}: r = {r!r} is not a positive rank (adapter_config.json)", hint=hint)
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        raise InputError(f"{where}: lora_alpha = {cfg['lora_alpha']!r} is not a number (adapter_config.json)",
                         hint=hint)
    for key, ok, what in (("rank_pattern", lambda v: _is_int(v) and v > 0, "a positive rank"),
                          ("alpha_pattern", _is_number, "a number")):
        pat = {} if cfg.get(key) is None else cfg[key]
        if not isinstance(pat, dict):
            raise InputError(f"{where}: {key} is a JSON {json_kind(pat)}, not an object (adapter_config.json)",
                             hint=hint)
        bad = next(((k, v) for k, v in pat.items() if not ok(v)), None)
        if bad:
            raise InputError(f"{where}: {key}[{bad[0]!r}] = {bad[1]!r} is not {what} (adapter_config.json)", hint=hint)


def _first_pickle(folder: Path) -> str | None:
    """Named in the error, so the person sees which file we refused to unpickle."""
    return next((f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES), None)


@dataclass
class BaseModelInfo:
    path: Path
    config: dict
    tensors: dict[str, tuple[Path, dict]]

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config.get("model_type", "?")

    @property
    def param_count(self) -> int:
        return sum(numel(i["shape"]) for _, i in self.tensors.values())

    @property
    def weight_bytes(self) -> int:
        return sum(numel(i["shape"]) * DTYPE_BYTES.get(i["dtype"], 2) for _, i in self.tensors.values())

    @property
    def dtype(self) -> str:
        counts: dict[str, int] = {}
        for _, i in self.tensors.values():
            counts[i["dtype"]] = counts.get(i["dtype"], 0) + numel(i["shape"])
        return max(counts, key=counts.get) if counts else "F16"

    @property
    def largest_tensor_bytes(self) -> int:
        return max((numel(i["shape"]) * 4 for _, i in self.tensors.values()), default=0)


def resolve_base(base_model: str) -> Path:
    """A local folder, or a hub id looked up in the local Hugging Face cache (never downloaded)."""
    p = Path(base_model).expanduser()
    if p.is_dir():
        return p
    if p.is_absolute() or base_model.startswith((".", "~")) or base_model.count("/") != 1:
        raise InputError(f"base model folder {base_model} not found",
                         hint="set models.<name>.base_model to a local Hugging Face folder or a cached hub id")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(base_model, local_files_only=True))
    except Exception:
        raise InputError(f"base model {base_model} is neither a local folder nor in the local Hugging Face cache",
                         hint=f"run `huggingface-cli download {base_model}` once, or point base_model at a folder"
                         ) from None


def load_base_info(path: Path) -> BaseModelInfo:
    path = Path(path)
    config = _read_json(path / "config.json", f"base model {path} has no config.json",
                        "point base_model at a Hugging Face model folder")
    if not list(path.glob("*.safetensors")):
        pickle = _first_pickle(path)
        if pickle:
            raise InputError(f"base model {path} has only pickle weights ({pickle}); loradeploy never unpickles",
                             hint="convert it to safetensors once (transformers save_pretrained(safe_serialization=True))")
        raise InputError(f"base model {path} has no *.safetensors weights")
    return BaseModelInfo(path, config, tensor_table(path))


# ----------------------------------------------------------------------------- adapter

@dataclass
class LoraPair:
    module: str          # e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    a_shape: list[int]
    b_shape: list[int]
    embedding: bool = False


@dataclass
class AdapterInfo:
    path: Path
    config: dict
    weights: Path
    header: dict
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    full_tensors: dict[str, str] = field(default_factory=dict)   # base tensor name -> adapter key (modules_to_save)
    unknown: list[str] = field(default_factory=list)

    @property
    def base_name(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    @property
    def plain_lora(self) -> bool:
        """True when the stream merge can reproduce peft exactly."""
        c = self.config
        return (str(c.get("peft_type", "LORA")).upper() == "LORA" and not c.get("use_dora")
                and not self.unknown and not c.get("layer_replication") and not c.get("use_qalora")
                and not c.get("lora_bias"))

    def _pattern(self, key: str, module: str):
        return next((val for pat, val in (self.config.get(key) or {}).items()
                     if re.match(rf"(.*\.)?({pat})$", module)), None)

    def rank(self, module: str) -> int:
        """The r PEFT gives ``module``: its rank_pattern entry, else the config's r (checked at load)."""
        r = self._pattern("rank_pattern", module)
        return int(self.config["r"] if r is None else r)

    def scale(self, module: str) -> float:
        c = self.config
        r = self.rank(module)
        alpha = self._pattern("alpha_pattern", module)
        alpha = float(c.get("lora_alpha", 8) if alpha is None else alpha)   # 8: PEFT's default
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r


def load_adapter_info(path: Path) -> AdapterInfo:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"adapter folder {path} not found", hint="run the fetch stage or fix models.<name>.adapter")
    config = _read_json(path / "adapter_config.json", f"adapter {path} has no adapter_config.json",
                        "save the adapter with peft's save_pretrained")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        pickle = _first_pickle(path)
        if pickle:
            raise InputError(f"adapter {path} holds pickle weights ({pickle}); loradeploy refuses to unpickle them",
                             hint="re-save the adapter with save_pretrained(safe_serialization=True)")
        raise InputError(f"adapter {path} has no adapter_model.safetensors")
    if str(config.get("peft_type", "LORA")).upper() == "LORA":
        check_lora_numbers(config, f"adapter {path.name}")
    header = read_header(weights)
    info = AdapterInfo(path, config, weights, header)
    halves: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.match(r"^(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", name) or \
            re.match(r"^(.*)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$", name)
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)] = (key, meta["shape"])
            continue
        if ".lora_" in name or "lora_magnitude_vector" in name:
            info.unknown.append(key)
            continue
        base_name = name.replace(".modules_to_save.default", "")
        info.full_tensors[base_name] = key
    for module, h in halves.items():
        if "lora_A" in h and "lora_B" in h:
            info.pairs[module] = LoraPair(module, h["lora_A"][0], h["lora_B"][0], h["lora_A"][1], h["lora_B"][1])
        elif "lora_embedding_A" in h and "lora_embedding_B" in h:
            info.pairs[module] = LoraPair(module, h["lora_embedding_A"][0], h["lora_embedding_B"][0],
                                          h["lora_embedding_A"][1], h["lora_embedding_B"][1], embedding=True)
        else:
            raise InputError(f"adapter {path}: module {module} has only one LoRA half",
                             hint="the adapter file is incomplete; fetch or save it again")
    if not info.pairs and not info.full_tensors:
        raise InputError(f"adapter {path} contains no LoRA weights")
    return info


# ----------------------------------------------------------------------------- merged folder

# by name, so reading folders never needs torch; any other dtype is a bug upstream (KeyError)
_CONFIG_DTYPE = {"torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def copy_side_files(base_dir: Path, adapter_dir: Path | None, out_dir: Path, dtype) -> None:
    """config, generation config and tokenizer; the adapter's tokenizer files win (chat template edits)."""
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        src = Path(base_dir) / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
    if adapter_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(adapter_dir) / name
            if src.is_file():
                shutil.copy2(src, out_dir / name)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    name = _CONFIG_DTYPE[str(dtype)]
    for key in ("torch_dtype", "dtype"):
        if key in cfg or key == "torch_dtype":
            cfg[key] = name
    cfg_path.write_text(json.dumps(cfg, indent=2))


def folder_digest(folder: Path, known: dict[str, str] | None = None) -> str:
    """One digest over every file's name and sha256. ``known`` (relative name -> sha256) holds the
    digests taken while the files were written: only the rest (small side files) is read back."""
    known = known or {}
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        h.update(rel.encode())
        h.update((known.get(rel) or sha256_file(f)).encode())
    return h.hexdigest()
