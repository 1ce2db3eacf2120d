"""The fused merge → F16 GGUF against the reference two-step path (merged folder + the converter's CLI),
byte for byte, on the tiny Llama and Qwen2; and the pipeline's records and resume on the fused path."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from loradeploy.config import config_from_dict
from loradeploy.fsutil import sha256_file
from loradeploy.pipeline import run_pipeline

pytestmark = pytest.mark.slow
FUSED_STAGES = ["fetch", "merge", "convert"]


def two_step_reference(base: Path, adapter: Path, work: Path, model_name: str) -> str:
    """What a person does by hand: our stream merge to a folder, then llama.cpp's converter CLI on it."""
    import torch

    from loradeploy.merge import copy_side_files, load_adapter_info, load_base_info
    from loradeploy.merge.stream import stream_merge
    from loradeploy.tools import converter
    merged = work / "merged"
    merged.mkdir(parents=True)
    stream_merge(load_base_info(base), load_adapter_info(adapter), merged, dtype=torch.float16)
    copy_side_files(base, adapter, merged, torch.float16)
    out = work / "two-step-f16.gguf"
    converter.convert(merged, out, outtype="f16", model_name=model_name, log_path=work / "convert.log")
    return sha256_file(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request):
    """sha256 of the two-step F16 GGUF per architecture, computed once for the module's tests."""
    done: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in done:
            base, adapter = request.getfixturevalue(f"{arch}_pair")
            done[arch] = two_step_reference(base, adapter, tmp_path_factory.mktemp(f"ref-{arch}"), "majora-v1")
        return done[arch]
    return get


def cfg_for(tmp: Path, base: Path, adapter: Path, **merge):
    return config_from_dict({
        "models": {"majora": {"base_model": str(base), "adapter": str(adapter), "port": 5000}},
        "quantization": {"formats": ["F16"]},
        "merge": merge,
        "pipeline": {"stages": FUSED_STAGES, "work_dir": str(tmp / "work"), "state_dir": str(tmp / "state")},
        "logging": {"log_dir": str(tmp / "logs")},
        "performance": {"min_free_disk_gb": 0.01},
    }, base_dir=tmp)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_gguf_is_byte_identical_to_two_step(arch, request, reference, tmp_path):
    from loradeploy.merge import fused_convert, load_adapter_info, load_base_info
    from loradeploy.merge.preflight import FUSED, MergePlan
    base, adapter = request.getfixturevalue(f"{arch}_pair")
    want = reference(arch)
    plan = MergePlan(load_base_info(base), load_adapter_info(adapter), "stream", FUSED)
    out = tmp_path / "fused-f16.gguf"
    info = fused_convert(plan, out, cfg_for(tmp_path, base, adapter).merge, outtype="f16", model_name="majora-v1",
                         folder_name="merged", log=logging.getLogger("test.fused"))
    assert sha256_file(out) == want
    assert info["sha256"] == want            # hashed while written == the file on disk
    assert info["lora_merged"] == len(plan.adapter.pairs) and not info["unmatched"]
    assert not list(tmp_path.glob(".fused-*")), "the side-file folder is temporary"


def test_pipeline_fused_records_resume_and_adapter_change(llama_pair, reference, tmp_path):
    base, adapter = llama_pair
    want = reference("llama")
    own = tmp_path / "adapter"
    shutil.copytree(adapter, own)
    cfg = cfg_for(tmp_path, base, own)
    res = run_pipeline(cfg, ["majora"])
    assert res.ok, res.to_dict()
    st = res.models["majora"].stages
    assert st["merge"].info["fused"] is True and st["merge"].info["path"] == "fused"
    assert st["merge"].artifacts == []
    assert st["convert"].info["path"] == "fused"
    assert "pre_tokenizer" in st["convert"].info, "the in-process converter reports what the preflight would"
    (gguf,) = [a for a in st["convert"].artifacts if a["kind"] == "gguf"]
    assert gguf["sha256"] == want == sha256_file(Path(gguf["path"]))
    assert not (tmp_path / "work" / "majora" / "merged").exists(), "no merged folder on the fused path"

    again = run_pipeline(cfg, ["majora"])
    assert {s: o.status for s, o in again.models["majora"].stages.items()} == {s: "skipped" for s in FUSED_STAGES}

    # a changed adapter (other LoRA weights, same shapes) redoes merge and convert
    cfg_json = json.loads((own / "adapter_config.json").read_text())
    cfg_json["lora_alpha"] = cfg_json.get("lora_alpha", 8) * 2
    (own / "adapter_config.json").write_text(json.dumps(cfg_json))
    redo = run_pipeline(cfg, ["majora"])
    st = {s: o.status for s, o in redo.models["majora"].stages.items()}
    assert st["merge"] == "done" and st["convert"] == "done", st
    (gguf2,) = [a for a in redo.models["majora"].stages["convert"].artifacts if a["kind"] == "gguf"]
    assert gguf2["sha256"] != want

    # the same model switched to keeping its merged folder: the two-step path, same bytes as fused
    keep = cfg_for(tmp_path, base, adapter, save_merged_hf=True)
    kept = run_pipeline(keep, ["majora"])
    assert kept.ok, kept.to_dict()
    ks = kept.models["majora"].stages
    assert ks["merge"].info["path"] == "two-step" and ks["convert"].info["path"] == "two-step"
    assert "pre_tokenizer" in ks["merge"].info, "the converter preflight ran beside the merge"
    assert (tmp_path / "work" / "majora" / "merged" / "config.json").exists()
    (gguf3,) = [a for a in ks["convert"].artifacts if a["kind"] == "gguf"]
    assert gguf3["sha256"] == want == sha256_file(Path(gguf3["path"]))


def test_fused_unsupported_architecture_fails_before_merging(llama_pair, tmp_path):
    base, adapter = llama_pair
    odd = tmp_path / "odd-base"
    shutil.copytree(base, odd)
    cfg_json = json.loads((odd / "config.json").read_text())
    cfg_json["architectures"] = ["FooBarForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg_json))
    cfg = cfg_for(tmp_path, odd, adapter, allow_base_mismatch=True)
    res = run_pipeline(cfg, ["majora"])
    st = res.models["majora"].stages
    assert st["merge"].status == "done" and st["convert"].status == "failed"
    assert "does not support architecture" in st["convert"].error and "FooBarForCausalLM" in st["convert"].error
    gguf_dir = tmp_path / "work" / "majora" / "gguf"
    assert not gguf_dir.exists() or not list(gguf_dir.iterdir()), "nothing half-written is left"
