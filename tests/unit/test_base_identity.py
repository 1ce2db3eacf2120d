"""Base identity by content: the configured base is compared with what the adapter names (its config,
found locally or in the Hugging Face cache) and with the adapter's own shapes, never by folder name.
Tiny configs and tensors in tmp folders; no model is needed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loradeploy.errors import InputError
from loradeploy.lora import check_adapter
from loradeploy.merge import check_adapter_against_base, load_adapter_info, load_base_info
from loradeploy.merge.base_identity import compare, find_named, normalise

# a Qwen2.5-7B-shaped config, cut down to two layers; the tensors are tiny stand-ins of the same layout
QWEN_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
           "num_hidden_layers": 2, "num_attention_heads": 28, "num_key_value_heads": 4,
           "intermediate_size": 18944, "vocab_size": 152064}
QWEN_1_5B = {**QWEN_7B, "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2,
             "intermediate_size": 8960, "vocab_size": 151936}
H = 8  # the width of the stand-in tensors


def make_base(d: Path, config: dict, *, hidden: int = H, layers: int = 2) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    t = {f"model.layers.{i}.self_attn.q_proj.weight": torch.zeros(hidden, hidden) for i in range(layers)}
    t["model.norm.weight"] = torch.ones(hidden)
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    return d


def make_adapter(d: Path, named: str, *, hidden: int = H, layers: int = 2, r: int = 2) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    t = {}
    for i in range(layers):
        m = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        t[f"{m}.lora_A.weight"] = torch.zeros(r, hidden)
        t[f"{m}.lora_B.weight"] = torch.zeros(hidden, r)
    save_file(t, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["q_proj"],
         "base_model_name_or_path": named}))
    return d


def cache_entry(cache: Path, repo: str, config: dict) -> Path:
    """A hub cache entry as huggingface_hub lays it out: refs/main names the snapshot holding config.json."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("abc123")
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    c = tmp_path / "hf-cache"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    return c


def merge_check(base: Path, adapter: Path, configured: str | None = None, *, allow: bool = False) -> list[str]:
    return check_adapter_against_base(load_adapter_info(adapter), load_base_info(base), configured or str(base),
                                      allow_mismatch=allow)


def refused(base: Path, adapter: Path, *words: str, allow: bool = False) -> str:
    with pytest.raises(InputError) as info:
        merge_check(base, adapter, allow=allow)
    text = info.value.one_line()
    assert "\n" not in text and info.value.hint
    for w in words:
        assert w in text, text
    return text


@pytest.mark.parametrize("name, want", [
    ("Qwen/Qwen2.5-7B", "qwen2.5-7b"),
    ("unsloth/qwen2.5-7b-unsloth-bnb-4bit", "qwen2.5-7b"),
    ("unsloth/Qwen2.5-7B-Instruct-bnb-4bit", "qwen2.5-7b-instruct"),
    ("unsloth/Qwen2.5-7B-unsloth", "qwen2.5-7b"),
    ("/models/Qwen2.5-7B/", "qwen2.5-7b"),
    ("models--Qwen--Qwen2.5-7B", "qwen2.5-7b"),
])
def test_names_normalise(name, want):
    assert normalise(name) == want


def test_renamed_folder_with_the_hub_model_cached_is_accepted(tmp_path, cache):
    # the user's case: a local folder called "base" holding Qwen2.5-7B, the adapter naming the hub id
    cache_entry(cache, "Qwen/Qwen2.5-7B", QWEN_7B)
    base = make_base(tmp_path / "base", QWEN_7B)
    adapter = make_adapter(tmp_path / "adapter", "Qwen/Qwen2.5-7B")
    assert merge_check(base, adapter) == []
    v = compare("Qwen/Qwen2.5-7B", str(base), base, QWEN_7B)
    assert v.refuse is None and v.mismatch is None and "Hugging Face cache" in v.notes[0]


def test_renamed_folder_not_in_cache_is_accepted_by_shapes(tmp_path, cache):
    base = make_base(tmp_path / "base", QWEN_7B)
    adapter = make_adapter(tmp_path / "adapter", "Qwen/Qwen2.5-7B")
    assert merge_check(base, adapter) == []
    assert "accepted by its tensor shapes" in compare("Qwen/Qwen2.5-7B", str(base), base, QWEN_7B).notes[0]


@pytest.mark.parametrize("alias", ["unsloth/qwen2.5-7b-unsloth-bnb-4bit", "unsloth/Qwen2.5-7B-bnb-4bit",
                                   "unsloth/Qwen2.5-7B"])
def test_unsloth_alias_is_accepted(tmp_path, cache, alias):
    base = make_base(tmp_path / "Qwen2.5-7B", QWEN_7B)
    assert merge_check(base, make_adapter(tmp_path / "adapter", alias)) == []
    assert merge_check(base, make_adapter(tmp_path / "adapter2", alias), "Qwen/Qwen2.5-7B") == []


def test_unsloth_alias_resolves_to_the_cached_original(tmp_path, cache):
    snap = cache_entry(cache, "Qwen/Qwen2.5-7B", QWEN_7B)
    assert find_named("unsloth/qwen2.5-7b-unsloth-bnb-4bit") == snap
    assert find_named("Qwen/Qwen2.5-7B") == snap
    assert find_named("Qwen2.5-7B") == snap          # no org: found by its normalised name
    assert find_named("Qwen/Qwen2.5-1.5B") is None
    base = make_base(tmp_path / "base", QWEN_7B)
    assert merge_check(base, make_adapter(tmp_path / "adapter", "unsloth/qwen2.5-7b-unsloth-bnb-4bit")) == []


def test_different_size_in_the_cache_is_refused_naming_the_keys(tmp_path, cache):
    # the adapter names Qwen2.5-1.5B, cached here; the configured base is the 7B: another model, whatever
    # the folders are called, and allow_base_mismatch does not wave it through
    cache_entry(cache, "Qwen/Qwen2.5-1.5B", QWEN_1_5B)
    base = make_base(tmp_path / "base", QWEN_7B)
    adapter = make_adapter(tmp_path / "adapter", "Qwen/Qwen2.5-1.5B")
    for allow in (False, True):
        text = refused(base, adapter, "hidden_size 1536 vs 3584", "intermediate_size 8960 vs 18944",
                       "num_attention_heads 12 vs 28", "Hugging Face cache", "base_model", allow=allow)
        assert "architectures" not in text


def test_different_size_found_by_the_adapter_shapes(tmp_path, cache):
    # nothing resolves the name: the lora shapes are the evidence, and the key they contradict is named
    cfg = {**QWEN_7B, "hidden_size": H}
    base = make_base(tmp_path / "base", cfg, hidden=H)
    adapter = make_adapter(tmp_path / "adapter", "someone/some-model", hidden=2 * H)
    refused(base, adapter, f"hidden_size {2 * H} vs {H}", "shape mismatch", allow=True)


def test_fewer_layers_than_the_base_is_refused(tmp_path, cache):
    base = make_base(tmp_path / "base", {**QWEN_7B, "num_hidden_layers": 3}, layers=3)
    adapter = make_adapter(tmp_path / "adapter", "Qwen/Qwen2.5-7B", layers=2)
    refused(base, adapter, "num_hidden_layers 2 vs 3", allow=True)


def test_local_folder_named_by_the_adapter_is_compared(tmp_path, cache):
    # peft records the training box's path; when it is a folder here, its config decides
    trained_on = make_base(tmp_path / "train-box" / "model", QWEN_1_5B)
    base = make_base(tmp_path / "model", QWEN_7B)
    refused(base, make_adapter(tmp_path / "adapter", str(trained_on)), "hidden_size 1536 vs 3584")
    same = make_base(tmp_path / "copy-elsewhere", QWEN_7B)
    assert merge_check(same, make_adapter(tmp_path / "adapter2", str(base))) == []


def test_relabelled_architecture_is_a_name_mismatch(tmp_path, cache):
    cache_entry(cache, "Qwen/Qwen2.5-7B", QWEN_7B)
    base = make_base(tmp_path / "base", {**QWEN_7B, "architectures": ["FooForCausalLM"]})
    adapter = make_adapter(tmp_path / "adapter", "Qwen/Qwen2.5-7B")
    refused(base, adapter, "architectures Qwen2ForCausalLM vs FooForCausalLM", "allow_base_mismatch")
    warnings = merge_check(base, adapter, allow=True)
    assert len(warnings) == 1 and "FooForCausalLM" in warnings[0]


def test_another_family_is_a_name_mismatch(tmp_path, cache):
    base = make_base(tmp_path / "base", QWEN_7B)
    # a Llama named by the adapter, a Qwen configured, shapes that happen to fit: the family disagrees
    refused(base, make_adapter(tmp_path / "a", "meta-llama/Llama-3.1-8B"), "Llama-3.1-8B", "a llama model",
            "is qwen2", "allow_base_mismatch")
    assert len(merge_check(base, make_adapter(tmp_path / "b", "meta-llama/Llama-3.1-8B"), allow=True)) == 1
    # a name that states no family, or the base's own: shapes decide
    assert merge_check(base, make_adapter(tmp_path / "c", "/root/train/base")) == []
    assert merge_check(base, make_adapter(tmp_path / "d", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")) == []
    assert merge_check(base, make_adapter(tmp_path / "e", "cognitivecomputations/dolphin-2.9.2-qwen2-7b")) == []


def test_adapter_mode_refuses_another_size_by_content(tmp_path, cache):
    cache_entry(cache, "Qwen/Qwen2.5-1.5B", QWEN_1_5B)
    base = make_base(tmp_path / "base", QWEN_7B)
    with pytest.raises(InputError) as info:
        check_adapter(make_adapter(tmp_path / "adapter", "Qwen/Qwen2.5-1.5B"), base)
    assert "hidden_size 1536 vs 3584" in info.value.one_line()
    # the same model under another name and folder is accepted in adapter mode too
    plan = check_adapter(make_adapter(tmp_path / "adapter2", "unsloth/qwen2.5-7b-unsloth-bnb-4bit"), base)
    assert plan.rank == 2
