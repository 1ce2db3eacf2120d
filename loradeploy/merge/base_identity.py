"""Is the configured base the model the adapter was trained on? Decided by content, not folder name.

The adapter names its base (``base_model_name_or_path``): a hub id, an Unsloth alias of one, or a path
on the training box. When that name resolves here (a local folder, or the local Hugging Face cache,
aliases included) its config.json is compared with the configured base's, key by key. When it does
not, the adapter's own tensor shapes decide, and the name only says its family (a Llama adapter on
a Qwen base is refused even where the shapes happen to fit). A difference in size (hidden_size, layers, heads, vocabulary) is a different model and
is never waved through; a difference in name only is what merge.allow_base_mismatch is for.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# config keys that fix the shapes of the weights: a difference here is another model
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size")
# keys that name the architecture: a difference here may be a re-labelled copy
NAME_KEYS = ("architectures", "model_type")
# Unsloth (and other re-uploaders) publish the same weights under these suffixes
_ALIAS_SUFFIXES = ("-unsloth", "-bnb-4bit", "-bnb-8bit", "-4bit", "-8bit", "-bnb")
# model families a hub name may state; a base of another family is another model
# (a whole word of the name, so 'dolphin' is no phi)
_FAMILIES = ("llama", "qwen", "mistral", "mixtral", "gemma", "phi", "falcon", "olmo", "starcoder", "internlm",
             "baichuan", "bloom", "stablelm", "granite", "exaone", "deepseek", "cohere", "command")
SIZE_HINT = ("fix models.<name>.base_model to the model the adapter was trained on (merge.allow_base_mismatch "
             "does not cover a base of another size)")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Verdict:
    """``refuse``: a different model (never allowed); ``mismatch``: the names disagree and nothing shows
    the contents agree (merge.allow_base_mismatch may accept it); ``notes``: what was decided and why."""
    refuse: str | None = None
    mismatch: str | None = None
    notes: list[str] = field(default_factory=list)


def normalise(name: str) -> str:
    """A model's name without org, path, hub-cache prefix or re-upload suffixes, lower case:
    'unsloth/Qwen2.5-7B-unsloth-bnb-4bit' and '/models/Qwen2.5-7B' are both 'qwen2.5-7b'."""
    s = str(name).strip().rstrip("/").lower().rsplit("/", 1)[-1]
    if s.startswith("models--"):
        s = s.split("--")[-1]
    changed = True
    while changed:
        changed = False
        for suffix in _ALIAS_SUFFIXES:
            if s.endswith(suffix) and len(s) > len(suffix):
                s, changed = s[: -len(suffix)], True
    return s


def folder_name(path: Path) -> str:
    """The model name a folder stands for: a hub-cache snapshot is named by its repo, not its hash."""
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    return path.name


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloads (the same environment variables, in its order)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _snapshot(repo_dir: Path) -> Path | None:
    """The snapshot refs/main points at, else the newest one holding a config.json."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = repo_dir / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    snaps = [s for s in (repo_dir / "snapshots").glob("*") if (s / "config.json").is_file()]
    return max(snaps, key=lambda s: s.stat().st_mtime) if snaps else None


def find_named(name: str) -> Path | None:
    """The folder holding the config of the model ``name`` names, when it is here: a local folder, the
    hub cache's entry for that id, or a cached alias of it (same normalised name). Never downloads."""
    if not name:
        return None
    p = Path(name).expanduser()
    if p.is_absolute() or name.startswith("~"):
        return p if (p / "config.json").is_file() else None
    if name.count("/") > 1 or name.startswith("."):
        return None
    cache = hub_cache()
    exact = cache / ("models--" + name.replace("/", "--"))
    if "/" in name and exact.is_dir() and (snap := _snapshot(exact)) is not None:
        return snap
    want = normalise(name)
    for repo_dir in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        if normalise(repo_dir.name) == want and (snap := _snapshot(repo_dir)) is not None:
            return snap
    return None


def config_value(cfg: dict, key: str):
    """A config key, looked up in text_config for multimodal configs; num_key_value_heads defaults to
    num_attention_heads, as transformers defaults it."""
    for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        if key in c:
            return c[key]
    if key == "num_key_value_heads":
        return config_value(cfg, "num_attention_heads")
    return None


def config_differences(theirs: dict, ours: dict, keys=SIZE_KEYS + NAME_KEYS) -> list[str]:
    """'hidden_size 1536 vs 3584' for each key both configs set to different values."""
    out = []
    for key in keys:
        a, b = config_value(theirs, key), config_value(ours, key)
        if a is not None and b is not None and a != b:
            show = (lambda v: ",".join(map(str, v)) if isinstance(v, list) else v)
            out.append(f"{key} {show(a)} vs {show(b)}")
    return out


def _read_config(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _named_family_mismatch(name: str, model_type) -> str | None:
    """The family a name states when it is not the base's (model_type 'qwen2_moe' is family 'qwen')."""
    ours = re.match(r"[a-z]*", str(model_type or "").lower()).group(0)
    n = normalise(name)
    if not ours or ours in n:
        return None
    return next((f for f in _FAMILIES if f in re.findall(r"[a-z]+", n)), None)


def layer_coverage(modules, adapter_cfg: dict, base_cfg: dict) -> str | None:
    """An adapter whose target_modules list (no layer selection) reaches layers 0..k-1 was trained on a
    k-layer model: the problem, when the base has another number of layers."""
    targets = adapter_cfg.get("target_modules")
    # only leaf names ('q_proj') reach every layer; full paths, regexes and layer selections pick some
    if not isinstance(targets, list) or any("." in str(t) for t in targets) \
            or adapter_cfg.get("layers_to_transform") is not None or adapter_cfg.get("exclude_modules"):
        return None
    layers = {int(m.group(1)) for mod in modules if (m := _LAYER.search(mod))}
    n = config_value(base_cfg, "num_hidden_layers")
    if not layers or not isinstance(n, int) or max(layers) + 1 == n:
        return None
    return f"num_hidden_layers {max(layers) + 1} vs {n} (the adapter covers {max(layers) + 1} layers)"


def compare(named: str, configured: str, base_path: Path, base_cfg: dict, *, modules=(),
            adapter_cfg: dict | None = None) -> Verdict:
    """Whether the adapter, trained on ``named``, belongs on the base configured as ``configured``
    (found at ``base_path``, whose config is ``base_cfg``); ``modules`` are the adapter's targets."""
    v = Verdict()
    shown = f"the configured base {configured!r}"
    cover = layer_coverage(modules, adapter_cfg or {}, base_cfg)
    if cover:
        v.refuse = f"the adapter was trained on a model of another size than {shown}: {cover}"
        return v
    if not named:
        v.notes.append("the adapter names no base model: its tensor shapes decide")
        return v
    names = {normalise(configured), normalise(folder_name(base_path))}
    same_name = normalise(named) in names
    ref = find_named(named)
    if ref is not None and ref.resolve() != Path(base_path).resolve() and (theirs := _read_config(ref)):
        where = "in the Hugging Face cache" if hub_cache() in ref.parents else f"at {ref}"
        sizes = config_differences(theirs, base_cfg, SIZE_KEYS)
        labels = config_differences(theirs, base_cfg, NAME_KEYS)
        if sizes:
            v.refuse = f"the adapter was trained on {named!r} (config {where}), a model of another size than {shown}: " \
                       + ", ".join(sizes + labels)
        elif labels and not same_name:
            v.mismatch = f"adapter was trained on {named!r} (config {where}) but {shown} differs in " + ", ".join(labels)
        else:
            v.notes.append(f"{shown} matches the config of {named!r} {where}")
        return v
    if same_name or ref is not None:
        return v
    other = _named_family_mismatch(named, config_value(base_cfg, "model_type"))
    if other:
        v.mismatch = (f"adapter was trained on {named!r} (a {other} model) but {shown} is "
                      f"{config_value(base_cfg, 'model_type')}")
    else:
        v.notes.append(f"the adapter names {named!r}, which is not here (no local folder, not in the Hugging Face "
                       f"cache): {shown} is accepted by its tensor shapes")
    return v


def dims_named(base_cfg: dict, pairs: list[tuple[int, int]]) -> str:
    """'hidden_size 1536 vs 3584' for each (adapter, base) dimension pair whose base value is a size
    key of the base's config; empty when none is."""
    out = []
    for ours, theirs in pairs:
        if ours == theirs:
            continue
        key = next((k for k in SIZE_KEYS if config_value(base_cfg, k) == theirs), None)
        if key and f"{key} {ours} vs {theirs}" not in out:
            out.append(f"{key} {ours} vs {theirs}")
    return ", ".join(out)
