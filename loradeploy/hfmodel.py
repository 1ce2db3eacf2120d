"""What we know about a base model folder and a LoRA adapter folder, read from headers only."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, MergeError
from .tools.safetensors_io import DTYPE_BYTES, numel, read_header, tensor_table

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "qwen.tiktoken")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- base model

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
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"base model {path} has no config.json", hint="point base_model at a Hugging Face model folder")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise InputError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not list(path.glob("*.safetensors")):
        pickles = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise InputError(f"base model {path} has only pickle weights ({pickles[0]}); loradeploy never unpickles",
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

    def scale(self, module: str) -> float:
        c = self.config
        r = int(c.get("r", 8))
        alpha = float(c.get("lora_alpha", r))
        for pat, val in (c.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pat})$", module):
                r = int(val)
                break
        for pat, val in (c.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pat})$", module):
                alpha = float(val)
                break
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r


def load_adapter_info(path: Path) -> AdapterInfo:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"adapter folder {path} not found", hint="run the fetch stage or fix models.<name>.adapter")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise InputError(f"adapter {path} has no adapter_config.json", hint="save the adapter with peft's save_pretrained")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise InputError(f"{cfg_file} is not valid JSON: {exc}") from None
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        pickles = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise InputError(f"adapter {path} holds pickle weights ({pickles[0]}); loradeploy refuses to unpickle them",
                             hint="re-save the adapter with save_pretrained(safe_serialization=True)")
        raise InputError(f"adapter {path} has no adapter_model.safetensors")
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


def _same_base(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        s = s.rstrip("/").lower()
        return s.rsplit("/", 1)[-1]
    return bool(a) and norm(a) == norm(b)


def check_adapter_against_base(adapter: AdapterInfo, base: BaseModelInfo, configured_base: str,
                               *, allow_mismatch: bool) -> list[str]:
    """Raise MergeError when the adapter cannot apply to this base; return warnings otherwise."""
    warnings: list[str] = []
    named = adapter.base_name
    if named and not (_same_base(named, configured_base) or _same_base(named, str(base.path))):
        msg = f"adapter was trained on {named!r} but the configured base is {configured_base!r}"
        if not allow_mismatch:
            raise MergeError(msg, hint="fix models.<name>.base_model, or set merge.allow_base_mismatch: true "
                                       "if it is the same model under another name")
        warnings.append(msg)
    for module, pair in sorted(adapter.pairs.items()):
        wkey = f"{module}.weight"
        if wkey not in base.tensors:
            raise MergeError(f"adapter targets {module}, which the base model {base.path.name} does not have",
                             hint="the adapter was trained for another architecture or base")
        shape = base.tensors[wkey][1]["shape"]
        if len(shape) != 2:
            raise MergeError(f"adapter targets {module} whose weight is {len(shape)}-D; only Linear/Embedding merge")
        r_a, r_b = pair.a_shape[0], pair.b_shape[-1]
        if pair.embedding:
            want_a, want_b = [r_a, shape[0]], [shape[1], r_b]
        else:
            fan = bool(adapter.config.get("fan_in_fan_out"))
            out_f, in_f = (shape[1], shape[0]) if fan else (shape[0], shape[1])
            want_a, want_b = [r_a, in_f], [out_f, r_b]
        if list(pair.a_shape) != want_a or list(pair.b_shape) != want_b or r_a != r_b:
            raise MergeError(
                f"adapter shape mismatch at {module}: lora_A {pair.a_shape} / lora_B {pair.b_shape} do not fit the "
                f"base weight {shape}", hint="the adapter was trained for another base model (different size)")
    for tname, key in adapter.full_tensors.items():
        bshape = base.tensors.get(tname, (None, {"shape": None}))[1]["shape"]
        ashape = adapter.header[key]["shape"]
        if bshape is None:
            if tname == "lm_head.weight" and base.config.get("tie_word_embeddings"):
                continue
            raise MergeError(f"adapter replaces {tname}, which the base model does not have")
        if list(bshape) != list(ashape):
            raise MergeError(f"adapter shape mismatch at {tname}: {ashape} vs base {bshape}",
                             hint="the adapter was trained for another base (or with a resized vocabulary)")
    return warnings
