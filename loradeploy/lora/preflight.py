"""Can llama.cpp apply this PEFT adapter at run time, and with which alpha?

llama.cpp scales every LoRA tensor pair by ``alpha / rank`` with one ``adapter.lora.alpha`` per
adapter file and ``rank`` read from each tensor (llama-adapter.h ``get_scale``: ``b->ne[0]``); an
alpha of 0 means "no alpha" there (scale 1). PEFT scales each module by ``alpha / r`` or, with
rsLoRA, ``alpha / sqrt(r)``, where rank_pattern / alpha_pattern may set r and alpha per module.
So an adapter fits when one alpha, divided by each module's rank, gives every module its PEFT
scale: ``alpha_to_write`` below. Everything the converter cannot express (DoRA, full weights,
LoRA on embeddings, new tokens) is refused here, from headers only, with what to do instead.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..merge.base_identity import SIZE_HINT, compare, dims_named
from ..merge.hf_folder import check_lora_numbers
from ..tools.safetensors_io import read_header, tensor_table

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLED = "adapter_model.bin"
PREFIX = "base_model.model."
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# PEFT LoRA options that change the forward pass beyond scale * B(A(x)) (PEFT 0.21's LoraConfig)
VARIANTS = ("use_qalora", "use_bdlora", "kasa_config", "monteclora_config", "arrow_config", "target_parameters")
MERGE_HINT = "deploy it merged instead (the merge stage handles it)"


@dataclass(frozen=True)
class LoraPlan:
    adapter_dir: Path
    base_dir: Path
    rank: int                       # the config's r (rank_pattern may set others: ``ranks``)
    alpha: float                    # the config's lora_alpha
    use_rslora: bool
    scale: float                    # PEFT's scale at ``rank``: alpha/r, or alpha/sqrt(r) with rsLoRA
    alpha_to_write: float           # adapter.lora.alpha such that llama.cpp's alpha/rank == PEFT's scale
    target_modules: tuple[str, ...]  # leaf names found in the weights (q_proj, ...)
    n_tensors: int                  # lora_A + lora_B tensors, the count the GGUF must carry
    adapter_files: tuple[str, ...]  # what the converter reads from the folder
    ranks: tuple[int, ...] = ()     # every rank in the weights, sorted

    @property
    def needs_rewrite(self) -> bool:
        """The converter writes the config's lora_alpha as is: a staged config is needed otherwise."""
        return self.use_rslora or not _same(self.alpha, self.alpha_to_write)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}", hint="re-save the adapter") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} is not a JSON object", hint="re-save the adapter")
    return data


def _check_config(cfg: dict, where: Path) -> None:
    peft_type = cfg.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise InputError(f"{where} is a {peft_type or 'non-PEFT'} adapter, not LoRA (peft_type)",
                         hint="llama.cpp applies LoRA adapters only; deploy it merged if the merge supports it")
    if cfg.get("use_dora"):
        raise InputError(f"{where} is a DoRA adapter (use_dora): llama.cpp cannot apply its magnitude vectors",
                         hint=MERGE_HINT)
    if cfg.get("modules_to_save"):
        raise InputError(f"{where} trains whole modules beside the LoRA (modules_to_save: "
                         f"{cfg['modules_to_save']}): llama.cpp adapters carry lora_A/lora_B pairs only",
                         hint=MERGE_HINT)
    if cfg.get("trainable_token_indices"):
        raise InputError(f"{where} trains token embeddings (trainable_token_indices): llama.cpp adapters "
                         "cannot carry token deltas", hint=MERGE_HINT)
    for key, why in (("fan_in_fan_out", "transposed (Conv1D) weights, which the converter does not transpose back"),
                     ("lora_bias", "a bias on lora_B, which llama.cpp adapters have no place for"),
                     ("layer_replication", "replicated layers, which llama.cpp cannot build from an adapter")):
        if cfg.get(key):
            raise InputError(f"{where} uses {key}: {why}", hint=MERGE_HINT)
    variants = [k for k in VARIANTS if cfg.get(k)]
    if variants:
        raise InputError(f"{where} uses {', '.join(variants)}: a LoRA variant whose forward pass llama.cpp "
                         "does not implement (it applies plain B·A·x only)", hint=MERGE_HINT)
    check_lora_numbers(cfg, where)
    if cfg.get("lora_alpha", 8) == 0:   # 8: PEFT's own default when the key is absent
        # PEFT then adds nothing; llama.cpp reads alpha 0 as "no alpha" and applies the adapter at scale 1
        raise InputError(f"{where}: lora_alpha is 0, so the adapter changes nothing under PEFT but llama.cpp "
                         "would apply it at full strength", hint="set the lora_alpha the adapter was trained with")


def _classify(name: str) -> str | None:
    """Why a tensor that is not a lora_A / lora_B weight cannot go into a llama.cpp adapter."""
    if ".lora_embedding_A" in name or ".lora_embedding_B" in name:
        return ("is LoRA on an embedding (lora_embedding_A/B): the converter reads it in mergekit's transposed "
                "layout, not PEFT's, so it would be applied wrong")
    if "trainable_tokens" in name or "token_adapter" in name:
        return "is a trainable-token delta: llama.cpp adapters cannot carry new or retrained token rows"
    if "lora_magnitude_vector" in name:
        return "is a DoRA magnitude vector: llama.cpp cannot apply DoRA"
    if ".lora_A.bias" in name or ".lora_B.bias" in name:
        return "is a LoRA bias (lora_bias): llama.cpp adapters have no place for it"
    if "modules_to_save" in name or name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
        return ("is a full weight (embeddings / lm_head / modules_to_save), typically from new tokens or "
                "retrained heads: llama.cpp adapters carry lora_A/lora_B pairs only")
    return "is not a lora_A/lora_B weight"


def _load_weights(adapter_dir: Path) -> tuple[Path, dict]:
    weights = adapter_dir / WEIGHTS
    if not weights.is_file():
        if (adapter_dir / PICKLED).is_file():
            raise InputError(f"{adapter_dir} has only pickled weights ({PICKLED}); loradeploy never unpickles",
                             hint="save the adapter with save_pretrained(safe_serialization=True)")
        raise InputError(f"{adapter_dir} has no {WEIGHTS}", hint="point at a PEFT adapter folder (save_pretrained)")
    header = read_header(weights)
    header.pop("__metadata__", None)
    if not header:
        raise InputError(f"{weights} holds no tensors", hint="re-save the adapter")
    return weights, header


def _pairs(header: dict, weights: Path) -> dict[str, dict[str, list[int]]]:
    """module -> {"A": shape, "B": shape}; refuses every tensor that is not half of a pair."""
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, info in sorted(header.items()):
        m = _PAIR.match(name)
        if m is None or ".lora_embedding_" in name:
            raise InputError(f"{weights.parent.name}: tensor {name} {_classify(name)}", hint=MERGE_HINT)
        module = m["module"].removeprefix(PREFIX)
        shape = list(info.get("shape", []))
        if len(shape) != 2:
            raise InputError(f"{weights.parent.name}: {name} is {len(shape)}-D, not a 2-D LoRA matrix",
                             hint="only LoRA on Linear layers can be applied by llama.cpp")
        pairs.setdefault(module, {})[m["ab"]] = shape
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise InputError(f"{weights.parent.name}: {module} has no lora_{missing} weight",
                             hint="the adapter file is incomplete; save it again")
        if ab["A"][0] != ab["B"][1]:
            raise InputError(f"{weights.parent.name}: {module} lora_A {ab['A']} and lora_B {ab['B']} "
                             "disagree on the rank", hint="the adapter file is damaged; save it again")
    return pairs


def _pattern(patterns: dict, module: str):
    """The value of the first rank_pattern / alpha_pattern key matching ``module``, as PEFT picks it."""
    if not patterns:
        return None
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:   # the same rule as PEFT's (.*\.)?(key)$ match
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), module)
    else:
        key = get_pattern_key(list(patterns), module)
    return patterns.get(key)


def _vocab_of(tokenizer_json: Path) -> tuple[int, list[str]]:
    """(1 + the highest token id, the added tokens' contents) of a tokenizer.json."""
    tok = _read_json(tokenizer_json, "tokenizer")
    vocab = (tok.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    added = [t for t in tok.get("added_tokens") or [] if isinstance(t, dict)]
    ids += [t.get("id", -1) for t in added]
    ints = [i for i in ids if isinstance(i, int)]
    return (max(ints) + 1 if ints else 0), [str(t.get("content")) for t in added]


def _check_tokens(adapter_dir: Path, base_dir: Path, base_cfg: dict) -> None:
    """New tokens need new embedding rows, which a llama.cpp adapter cannot carry: llama.cpp tokenizes
    with the base GGUF's vocabulary and embeds with the base's rows."""
    vocab_size = base_cfg.get("vocab_size") or (base_cfg.get("text_config") or {}).get("vocab_size")
    hint = "deploy it merged with the resized embeddings, or retrain without adding tokens"
    added_file = adapter_dir / "added_tokens.json"
    if added_file.is_file() and isinstance(vocab_size, int):
        added = _read_json(added_file, "added tokens")
        new = sorted((i, t) for t, i in added.items() if isinstance(i, int) and i >= vocab_size)
        if new:
            raise InputError(f"{adapter_dir.name} adds {len(new)} token(s) past the base vocabulary of "
                             f"{vocab_size} (added_tokens.json: {', '.join(t for _, t in new[:3])})", hint=hint)
    tok_file = adapter_dir / "tokenizer.json"
    if not tok_file.is_file():
        return
    n, added_names = _vocab_of(tok_file)
    if isinstance(vocab_size, int) and n > vocab_size:
        raise InputError(f"{adapter_dir.name}'s tokenizer has {n} tokens, more than the base's vocab_size "
                         f"{vocab_size}: the adapter was trained with new tokens", hint=hint)
    base_tok = base_dir / "tokenizer.json"
    if base_tok.is_file():
        n_base, base_added = _vocab_of(base_tok)
        if n > n_base:
            extra = [t for t in added_names if t not in set(base_added)][:3]
            raise InputError(f"{adapter_dir.name}'s tokenizer has {n} tokens, the base's {n_base}"
                             f"{' (new: ' + ', '.join(extra) + ')' if extra else ''}: llama.cpp would tokenize "
                             "with the base vocabulary and never produce them", hint=hint)


def _check_base(pairs: dict, base_dir: Path, base_cfg: dict) -> None:
    """Each targeted module exists in the base with the shape the pair implies (when the base has weights;
    the converter itself needs only the base's config)."""
    table = tensor_table(base_dir) if any(base_dir.glob("*.safetensors")) else {}
    if not table:
        return
    for module, ab in sorted(pairs.items()):
        info = table.get(f"{module}.weight")
        if info is None:
            tied = module.endswith("lm_head") and base_cfg.get("tie_word_embeddings")
            raise InputError(f"adapter targets {module}, which the base {base_dir.name} does not have"
                             f"{' (its lm_head is tied to the embeddings)' if tied else ''}",
                             hint=MERGE_HINT if tied else "the adapter was trained for another base model")
        want = [ab["B"][0], ab["A"][1]]
        if list(info[1]["shape"]) != want:
            keys = dims_named(base_cfg, list(zip(want, info[1]["shape"])))
            raise InputError(f"adapter shape mismatch at {module}: {keys + ' (' if keys else ''}lora_A {ab['A']} / "
                             f"lora_B {ab['B']} do not fit the base weight {info[1]['shape']}{')' if keys else ''}",
                             hint="the adapter was trained for another base model (different size); " + SIZE_HINT)


def _alpha_to_write(cfg: dict, pairs: dict, where: str) -> float:
    """The one alpha for which llama.cpp's alpha/rank equals PEFT's scale in every module, or a refusal."""
    r0, alpha0, rslora = cfg["r"], float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora"))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    wanted: dict[str, float] = {}
    for module, ab in sorted(pairs.items()):
        rank = ab["A"][0]
        r = _pattern(rank_pattern, module)
        r = r0 if r is None else r
        if rank != r:
            raise InputError(f"{where}: {module} has rank {rank} in the weights but {r} in the config",
                             hint="the adapter config does not belong to these weights; save them together")
        a = _pattern(alpha_pattern, module)
        a = alpha0 if a is None else float(a)
        scale = a / math.sqrt(r) if rslora else a / r
        wanted[module] = scale * rank          # llama.cpp: alpha_written / rank == scale
    first = next(iter(wanted.values()))
    if all(_same(v, first) for v in wanted.values()):
        return alpha0 if _same(first, alpha0) else first
    alphas = sorted({alpha0 if (a := _pattern(alpha_pattern, m)) is None else float(a) for m in pairs})
    ranks = sorted({ab["A"][0] for ab in pairs.values()})
    if len(alphas) > 1:
        raise InputError(f"{where}: alpha_pattern gives modules different alphas ({', '.join(f'{a:g}' for a in alphas)}); "
                         "a llama.cpp adapter has one alpha for every tensor", hint=MERGE_HINT)
    raise InputError(f"{where}: use_rslora with rank_pattern ranks {ranks}: PEFT scales by alpha/sqrt(r) per module, "
                     "llama.cpp by one alpha / each tensor's rank, and one alpha cannot express both",
                     hint=MERGE_HINT + ", or retrain with one rank")


def check_adapter(adapter_dir: Path, base_dir: Path) -> LoraPlan:
    """Every reason llama.cpp could not apply this adapter to this base as PEFT does, from headers only;
    the plan says what the GGUF must carry."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if not adapter_dir.is_dir():
        raise InputError(f"adapter folder {adapter_dir} not found", hint="point at a PEFT adapter folder")
    if not (adapter_dir / CONFIG).is_file():
        raise InputError(f"{adapter_dir} has no {CONFIG}", hint="point at a PEFT adapter folder (save_pretrained)")
    if not (base_dir / "config.json").is_file():
        raise InputError(f"base model {base_dir} has no config.json", hint="point at the base's Hugging Face folder")
    cfg = _read_json(adapter_dir / CONFIG, "adapter config")
    base_cfg = _read_json(base_dir / "config.json", "base config")
    _check_config(cfg, adapter_dir)
    weights, header = _load_weights(adapter_dir)
    pairs = _pairs(header, weights)
    _check_tokens(adapter_dir, base_dir, base_cfg)
    # another size is refused by content, whatever the folders are called (names alone are merge's concern)
    verdict = compare(str(cfg.get("base_model_name_or_path") or ""), str(base_dir), base_dir, base_cfg,
                      modules=list(pairs), adapter_cfg=cfg)
    if verdict.refuse:
        raise InputError(verdict.refuse, hint=SIZE_HINT)
    _check_base(pairs, base_dir, base_cfg)
    alpha_w = _alpha_to_write(cfg, pairs, adapter_dir.name)
    r, alpha, rslora = cfg["r"], float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora"))
    return LoraPlan(
        adapter_dir=adapter_dir, base_dir=base_dir, rank=r, alpha=alpha, use_rslora=rslora,
        scale=alpha / math.sqrt(r) if rslora else alpha / r, alpha_to_write=alpha_w,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in pairs})), n_tensors=2 * len(pairs),
        adapter_files=(CONFIG, WEIGHTS), ranks=tuple(sorted({ab["A"][0] for ab in pairs.values()})))
