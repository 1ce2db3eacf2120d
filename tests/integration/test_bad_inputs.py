"""Each bad input: a one-line error naming the problem, a non-zero exit, nothing half-written."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from loradeploy import stages as stage_registry
from loradeploy.pipeline import run_pipeline
from tests.integration.test_pipeline import make_cfg


def _fail(res, stage="merge"):
    out = res.models["majora"].stages[stage]
    assert not res.ok
    assert out.status == "failed", res.to_dict()
    assert "\n" not in out.error
    return out.error


def _no_merged(tmp: Path):
    merged = tmp / "work" / "majora" / "merged"
    assert not merged.exists()
    assert not [p for p in (tmp / "work" / "majora").glob("*tmp*")]


def test_base_model_missing(llama_pair, tmp_path):
    _, adapter = llama_pair
    cfg = make_cfg(tmp_path, tmp_path / "no-such-base", adapter, stages=["fetch", "merge"])
    err = _fail(run_pipeline(cfg, ["majora"]))
    assert "base model folder" in err and "not found" in err
    r = subprocess.run([sys.executable, "-m", "loradeploy.cli", "run", "-c", str(tmp_path / "deployment_config.yaml"),
                        "--model", "majora"], capture_output=True, text=True)
    assert r.returncode == 1 and "base model folder" in r.stdout + r.stderr


def test_hub_id_not_in_cache(llama_pair, tmp_path):
    _, adapter = llama_pair
    cfg = make_cfg(tmp_path, "nobody/not-a-cached-model", adapter, stages=["fetch", "merge"])
    err = _fail(run_pipeline(cfg, ["majora"]))
    assert "nor in the local Hugging Face cache" in err and "huggingface-cli download" in err


def _copy_editing_json(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of the folder ``src`` whose JSON file ``name`` went through ``edit(data)`` (in place)."""
    shutil.copytree(src, dst)
    data = json.loads((dst / name).read_text())
    edit(data)
    (dst / name).write_text(json.dumps(data))
    return dst


def _shrunk_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    w = load_file(str(dst / "adapter_model.safetensors"))
    # an adapter trained for a model half as wide
    w = {k: (v[:, : v.shape[1] // 2].contiguous() if "lora_A" in k else v[: v.shape[0] // 2].contiguous())
         for k, v in w.items()}
    save_file(w, str(dst / "adapter_model.safetensors"))
    return dst


def test_adapter_for_another_base_shape_mismatch(llama_pair, tmp_path):
    base, adapter = llama_pair
    bad = _shrunk_adapter(adapter, tmp_path / "bad-adapter")
    cfg = make_cfg(tmp_path, base, bad, stages=["fetch", "merge"])
    err = _fail(run_pipeline(cfg, ["majora"]))
    assert "shape mismatch" in err and "another base" in err
    _no_merged(tmp_path)


def test_adapter_names_another_base(llama_pair, tmp_path):
    # shapes that fit decide only while the name does not contradict them: a Qwen named, a Llama configured
    base, adapter = llama_pair
    other = _copy_editing_json(adapter, tmp_path / "other", "adapter_config.json",
                               lambda c: c.update(base_model_name_or_path="Qwen/Qwen2.5-7B"))
    cfg = make_cfg(tmp_path, base, other, stages=["fetch", "merge"])
    err = _fail(run_pipeline(cfg, ["majora"]))
    assert "Qwen2.5-7B" in err and "allow_base_mismatch" in err


def test_pickle_adapter_refused(llama_pair, tmp_path):
    base, adapter = llama_pair
    pk = tmp_path / "pickled"
    pk.mkdir()
    shutil.copy(adapter / "adapter_config.json", pk)
    torch.save({"x": torch.zeros(1)}, pk / "adapter_model.bin")
    cfg = make_cfg(tmp_path, base, pk, stages=["fetch", "merge"])
    res = run_pipeline(cfg, ["majora"])
    first_failed = next(o for o in res.models["majora"].stages.values() if o.status == "failed")
    assert "pickle" in first_failed.error and "safetensors" in first_failed.error


def test_unknown_quant_type_cli(tmp_path, llama_pair):
    base, adapter = llama_pair
    make_cfg(tmp_path, base, adapter)
    data = yaml.safe_load((tmp_path / "deployment_config.yaml").read_text())
    data["quantization"]["formats"] = ["Q4_K_M", "Q7_K_Z"]
    (tmp_path / "deployment_config.yaml").write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "loradeploy.cli", "run", "-c", str(tmp_path / "deployment_config.yaml"),
                        "--model", "majora"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "quantization.formats.1: unknown llama.cpp quantization type 'Q7_K_Z'" in r.stderr
    assert "Traceback" not in r.stderr


def test_not_enough_disk(llama_pair, tmp_path):
    base, adapter = llama_pair
    cfg = make_cfg(tmp_path, base, adapter, stages=["fetch", "merge"], performance={"min_free_disk_gb": 10**7})
    err = _fail(run_pipeline(cfg, ["majora"]))
    assert "not enough disk" in err and "min_free_disk_gb" in err
    _no_merged(tmp_path)


def test_unsupported_architecture_caught_before_merge(llama_pair, tmp_path):
    base, adapter = llama_pair
    odd = _copy_editing_json(base, tmp_path / "odd-base", "config.json",
                             lambda c: c.update(architectures=["FooBarForCausalLM"]))
    cfg = make_cfg(tmp_path, odd, adapter, stages=["fetch", "merge"], merge={"allow_base_mismatch": True})
    err = _fail(run_pipeline(cfg, ["majora"]))
    assert "does not support architecture" in err and "FooBarForCausalLM" in err
    _no_merged(tmp_path)


def test_unrecognised_tokenizer_caught_before_merge(qwen2_pair, tmp_path):
    base, adapter = qwen2_pair

    def swap_ids(tj):
        # two token ids swapped: the converter's hash of its test string's encoding matches no tokenizer it knows
        vocab = tj["model"]["vocab"]
        vocab["3"], vocab["a"] = vocab["a"], vocab["3"]

    odd = _copy_editing_json(base, tmp_path / "odd-tok", "tokenizer.json", swap_ids)
    cfg = make_cfg(tmp_path, odd, adapter, stages=["fetch", "merge"], merge={"allow_base_mismatch": True})
    err = _fail(run_pipeline(cfg, ["majora"]))
    assert "does not recognise the tokenizer" in err
    _no_merged(tmp_path)


def test_unavailable_stage_fails_loudly(llama_pair, tmp_path, monkeypatch):
    base, adapter = llama_pair
    monkeypatch.setitem(stage_registry.REGISTRY, "evaluate", "loradeploy.stages.not_built_yet:Nope")
    cfg = make_cfg(tmp_path, base, adapter, stages=["fetch", "evaluate"])
    res = run_pipeline(cfg, ["majora"])
    assert not res.ok
    ev = res.models["majora"].stages["evaluate"]
    assert ev.status == "unavailable" and "not built" in ev.error
