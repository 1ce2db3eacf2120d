"""loradeploy.lora.preflight on small hand-made adapter folders: every refusal names its reason, and
the alpha a good adapter must carry makes llama.cpp's alpha/rank equal PEFT's own scaling."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loradeploy.errors import InputError
from loradeploy.lora import LoraPlan, check_adapter

H, FF, VOCAB = 16, 32, 64
ATTN = "model.layers.0.self_attn"
SHAPES = {f"{ATTN}.q_proj": (H, H), f"{ATTN}.v_proj": (H, H), "model.layers.0.mlp.up_proj": (FF, H)}


def make_base(d: Path, *, vocab: int = VOCAB, tie: bool = False, tokenizer_tokens: int | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"{m}.weight": torch.zeros(shape) for m, shape in SHAPES.items()}
    tensors["model.embed_tokens.weight"] = torch.zeros(vocab, H)
    if not tie:
        tensors["lm_head.weight"] = torch.zeros(vocab, H)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "vocab_size": vocab, "hidden_size": H, "tie_word_embeddings": tie}))
    if tokenizer_tokens is not None:
        write_tokenizer(d, tokenizer_tokens)
    return d


def write_tokenizer(d: Path, n: int, added: tuple[str, ...] = ()) -> None:
    vocab = {f"t{i}": i for i in range(n - len(added))}
    added_tokens = [{"id": n - len(added) + i, "content": t, "special": True} for i, t in enumerate(added)]
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                                                  "added_tokens": added_tokens}))


def make_adapter(d: Path, *, r: int = 4, alpha: float | None = 8, modules=(f"{ATTN}.q_proj", f"{ATTN}.v_proj"),
                 ranks: dict[str, int] | None = None, extra: dict[str, tuple] | None = None, drop: tuple = (),
                 **cfg) -> Path:
    """A PEFT-style folder: lora_A [r, in] and lora_B [out, r] per module, named as save_pretrained names them."""
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m in modules:
        rank = (ranks or {}).get(m, r)
        out_f, in_f = SHAPES[m]
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, in_f)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, rank)
    for name, shape in (extra or {}).items():
        tensors[name] = torch.randn(*shape)
    for name in drop:
        tensors.pop(name)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, **cfg}
    if alpha is not None:
        config["lora_alpha"] = alpha
    (d / "adapter_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture
def base(tmp_path) -> Path:
    return make_base(tmp_path / "base")


def refused(adapter: Path, base: Path, *words: str) -> InputError:
    with pytest.raises(InputError) as info:
        check_adapter(adapter, base)
    err = info.value
    text = err.one_line()
    assert "\n" not in text and err.hint, text
    for w in words:
        assert w.lower() in text.lower(), text
    return err


# ----------------------------------------------------------------------------- good adapters

def test_plain_lora_scale_is_alpha_over_r(tmp_path, base):
    plan = check_adapter(make_adapter(tmp_path / "a", r=4, alpha=8), base)
    assert isinstance(plan, LoraPlan)
    assert (plan.rank, plan.alpha, plan.use_rslora) == (4, 8.0, False)
    assert plan.scale == 2.0 and plan.alpha_to_write == 8.0 and not plan.needs_rewrite
    assert plan.target_modules == ("q_proj", "v_proj") and plan.n_tensors == 4 and plan.ranks == (4,)
    assert plan.adapter_files == ("adapter_config.json", "adapter_model.safetensors")


def test_rslora_writes_alpha_times_sqrt_r(tmp_path, base):
    plan = check_adapter(make_adapter(tmp_path / "a", r=4, alpha=8, use_rslora=True), base)
    assert plan.scale == pytest.approx(8 / math.sqrt(4))
    assert plan.alpha_to_write == pytest.approx(8 * math.sqrt(4))
    assert plan.alpha_to_write / plan.rank == pytest.approx(plan.scale)   # llama.cpp's alpha / rank
    assert plan.needs_rewrite


def test_missing_alpha_is_peft_default(tmp_path, base):
    plan = check_adapter(make_adapter(tmp_path / "a", r=4, alpha=None), base)
    assert plan.alpha == 8.0 and plan.scale == 2.0


def test_rank_pattern_without_rslora_fits_one_alpha(tmp_path, base):
    # llama.cpp divides by each tensor's own rank, as PEFT does without rsLoRA
    a = make_adapter(tmp_path / "a", r=4, alpha=8, ranks={f"{ATTN}.v_proj": 2}, rank_pattern={"v_proj": 2})
    plan = check_adapter(a, base)
    assert plan.ranks == (2, 4) and plan.alpha_to_write == 8.0


def test_rslora_with_rank_pattern_of_one_rank_passes(tmp_path, base):
    a = make_adapter(tmp_path / "a", r=4, alpha=8, use_rslora=True, rank_pattern={"v_proj": 4})
    assert check_adapter(a, base).alpha_to_write == pytest.approx(16.0)


def test_alpha_pattern_equal_to_lora_alpha_passes(tmp_path, base):
    assert check_adapter(make_adapter(tmp_path / "a", alpha=8, alpha_pattern={"q_proj": 8}), base).alpha_to_write == 8


@pytest.mark.parametrize("cfg", [
    dict(r=4, lora_alpha=8),
    dict(r=4, lora_alpha=8, use_rslora=True),
    dict(r=8, lora_alpha=16, use_rslora=True),
    dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}),
    # rsLoRA, ranks 4 and 16: alpha 4 on v_proj gives it the same alpha/sqrt(r)*r as the rest (8*2 == 4*4)
    dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 16}, alpha_pattern={"v_proj": 4}),
], ids=["plain", "rslora-r4", "rslora-r8", "rank-pattern", "rslora-compensated"])
def test_alpha_to_write_matches_peft_scaling(tmp_path, cfg):
    """Against PEFT itself: a real LoraModel on a module tree of the same names, saved by save_pretrained;
    every layer's PEFT scaling must equal alpha_to_write / that layer's rank (llama.cpp's formula)."""
    from peft import LoraConfig, get_peft_model

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(H, H, bias=False), torch.nn.Linear(H, H, bias=False)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer()])

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    peft_model = get_peft_model(Tiny(), LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                   init_lora_weights=False, **cfg))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(str(out), safe_serialization=True)
    plan = check_adapter(out, make_base(tmp_path / "base"))
    checked = 0
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "scaling") and "default" in getattr(mod, "scaling", {}):
            rank = mod.lora_B["default"].weight.shape[1]
            assert plan.alpha_to_write / rank == pytest.approx(mod.scaling["default"], rel=1e-6), name
            checked += 1
    assert checked == 2


# ----------------------------------------------------------------------------- refusals: the config

def test_refuses_other_peft_types(tmp_path, base):
    refused(make_adapter(tmp_path / "a", peft_type="IA3"), base, "IA3", "not LoRA")


def test_refuses_dora(tmp_path, base):
    refused(make_adapter(tmp_path / "a", use_dora=True), base, "DoRA")


def test_refuses_dora_magnitude_even_without_flag(tmp_path, base):
    a = make_adapter(tmp_path / "a", extra={f"base_model.model.{ATTN}.q_proj.lora_magnitude_vector": (H,)})
    refused(a, base, "DoRA magnitude")


def test_refuses_modules_to_save(tmp_path, base):
    refused(make_adapter(tmp_path / "a", modules_to_save=["lm_head"]), base, "modules_to_save", "lm_head")


def test_refuses_trainable_token_indices(tmp_path, base):
    refused(make_adapter(tmp_path / "a", trainable_token_indices=[5, 6]), base, "trainable_token_indices")


def test_refuses_alpha_zero(tmp_path, base):
    refused(make_adapter(tmp_path / "a", alpha=0), base, "lora_alpha is 0")


def test_refuses_per_module_alphas(tmp_path, base):
    refused(make_adapter(tmp_path / "a", alpha=8, alpha_pattern={"q_proj": 32}), base, "alpha_pattern", "one alpha")


def test_refuses_rslora_with_several_ranks(tmp_path, base):
    a = make_adapter(tmp_path / "a", r=4, alpha=8, use_rslora=True, ranks={f"{ATTN}.v_proj": 2},
                     rank_pattern={"v_proj": 2})
    refused(a, base, "use_rslora", "rank_pattern", "[2, 4]", "one alpha cannot")


def test_refuses_config_rank_that_is_not_the_weights(tmp_path, base):
    refused(make_adapter(tmp_path / "a", r=4, ranks={f"{ATTN}.q_proj": 2}), base, "rank 2", "but 4")


# ----------------------------------------------------------------------------- refusals: the weights

def test_refuses_pickled_weights(tmp_path, base):
    a = make_adapter(tmp_path / "a")
    (a / "adapter_model.safetensors").rename(a / "adapter_model.bin")
    err = refused(a, base, "adapter_model.bin", "never unpickles")
    assert "safe_serialization" in err.hint


def test_refuses_full_embedding_weights(tmp_path, base):
    a = make_adapter(tmp_path / "a", extra={"base_model.model.model.embed_tokens.weight": (VOCAB, H)})
    refused(a, base, "embed_tokens.weight", "full weight")


def test_refuses_full_lm_head(tmp_path, base):
    a = make_adapter(tmp_path / "a", extra={"base_model.model.lm_head.weight": (VOCAB, H)})
    refused(a, base, "lm_head.weight", "full weight")


def test_refuses_trainable_token_deltas(tmp_path, base):
    name = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    refused(make_adapter(tmp_path / "a", extra={name: (2, H)}), base, "trainable-token")


def test_refuses_lora_on_embeddings(tmp_path, base):
    a = make_adapter(tmp_path / "a", extra={"base_model.model.model.embed_tokens.lora_embedding_A": (4, VOCAB),
                                            "base_model.model.model.embed_tokens.lora_embedding_B": (H, 4)})
    refused(a, base, "lora_embedding", "embedding")


def test_refuses_half_a_pair(tmp_path, base):
    a = make_adapter(tmp_path / "a", drop=(f"base_model.model.{ATTN}.v_proj.lora_B.weight",))
    refused(a, base, "v_proj", "no lora_B")


def test_refuses_modules_the_base_lacks(tmp_path):
    base = make_base(tmp_path / "base")
    a = make_adapter(tmp_path / "a", modules=("model.layers.0.mlp.up_proj",))
    (base / "model.safetensors").unlink()
    save_file({f"{ATTN}.q_proj.weight": torch.zeros(H, H)}, str(base / "model.safetensors"))
    refused(a, base, "up_proj", "does not have")


def test_refuses_wrong_base_size(tmp_path):
    base = make_base(tmp_path / "base")
    a = make_adapter(tmp_path / "a")
    save_file({f"{ATTN}.q_proj.weight": torch.zeros(2 * H, H), f"{ATTN}.v_proj.weight": torch.zeros(H, H)},
              str(base / "model.safetensors"))
    refused(a, base, "shape mismatch", "q_proj")


# ----------------------------------------------------------------------------- refusals: new tokens

def test_refuses_tokenizer_larger_than_base_vocab(tmp_path, base):
    a = make_adapter(tmp_path / "a")
    write_tokenizer(a, VOCAB + 2, added=("<|new1|>", "<|new2|>"))
    refused(a, base, f"{VOCAB + 2} tokens", f"vocab_size {VOCAB}", "new tokens")


def test_refuses_tokenizer_larger_than_base_tokenizer(tmp_path):
    # the config's vocab_size is padded (as Qwen's is): the new token still fits there, but not the base vocabulary
    base = make_base(tmp_path / "base", vocab=VOCAB, tokenizer_tokens=VOCAB - 8)
    a = make_adapter(tmp_path / "a")
    write_tokenizer(a, VOCAB - 7, added=("<|tool|>",))
    refused(a, base, "<|tool|>", "base vocabulary")


def test_refuses_added_tokens_past_the_vocab(tmp_path, base):
    a = make_adapter(tmp_path / "a")
    (a / "added_tokens.json").write_text(json.dumps({"<pad>": VOCAB}))
    refused(a, base, "added_tokens.json", "<pad>")


def test_same_tokenizer_as_base_passes(tmp_path):
    base = make_base(tmp_path / "base", tokenizer_tokens=VOCAB)
    a = make_adapter(tmp_path / "a")
    write_tokenizer(a, VOCAB)
    (a / "added_tokens.json").write_text(json.dumps({"t3": 3}))
    assert check_adapter(a, base).n_tensors == 4


# ----------------------------------------------------------------------------- refusals: the folders

def test_refuses_missing_folders_and_files(tmp_path, base):
    refused(tmp_path / "nowhere", base, "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, base, "adapter_config.json")
    a = make_adapter(tmp_path / "a")
    refused(a, tmp_path / "nobase", "config.json")
    (a / "adapter_model.safetensors").unlink()
    refused(a, base, "no adapter_model.safetensors")
    (a / "adapter_config.json").write_text("{not json")
    refused(a, base, "not valid JSON")


@pytest.mark.parametrize("key,value", [("use_qalora", True), ("target_parameters", ["experts.down_proj"]),
                                       ("kasa_config", {"r": 4})])
def test_refuses_lora_variants_llama_cpp_lacks(tmp_path, base, key, value):
    refused(make_adapter(tmp_path / "a", **{key: value}), base, key, "does not implement")


def test_refuses_fan_in_fan_out(tmp_path, base):
    refused(make_adapter(tmp_path / "a", fan_in_fan_out=True), base, "fan_in_fan_out")
