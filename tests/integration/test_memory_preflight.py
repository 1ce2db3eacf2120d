"""A stage whose memory estimate does not fit is refused before it starts: one line (what it needs, what is
free, which key to change), exit 3, nothing half-written; a stage that runs records its estimate beside
its measured peak."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from loradeploy.config import config_from_dict
from loradeploy.pipeline import run_pipeline

from tests.cli.helpers import invoke

REFUSAL = re.compile(r"^.+ needs ~[\d.]+ GiB \(peak ~[\d.]+ GiB\), [\d.]+ GiB is available \(budget [\d.]+ GiB\) "
                     r"\(set performance\.max_memory_gb or free memory\)$")
TINY_GB = 0.05   # far below any stage's estimate (the test process alone is bigger)


def _data(tmp: Path, base: Path, adapter: Path, stages, **sections) -> dict:
    data = {"models": {"majora": {"base_model": str(base), "adapter": str(adapter), "port": 5000}},
            "quantization": {"formats": ["Q4_K_M", "Q8_0"]},
            "pipeline": {"stages": list(stages), "work_dir": str(tmp / "work"), "state_dir": str(tmp / "state")},
            "logging": {"log_dir": str(tmp / "logs")}, "performance": {"min_free_disk_gb": 0.1}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return data


def _budget(data: dict, gb: float | None) -> dict:
    return {**data, "performance": {**data["performance"], "max_memory_gb": gb}}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_merge_and_convert_refused_in_one_line_with_nothing_written(llama_pair, tmp_path):
    base, adapter = llama_pair
    data = _data(tmp_path, base, adapter, ["merge", "convert", "quantize"])
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_budget(data, TINY_GB)))
    # through the CLI: the fused merge + convert is refused at the merge, exit 3, one line
    res = invoke("run", "-c", str(cfg_file), "--model", "majora", "--json")
    assert res.exit_code == 3, res.output
    merge = json.loads(res.output)["models"]["majora"]["stages"]["merge"]
    assert merge["status"] == "failed" and REFUSAL.match(merge["error"]), merge["error"]
    assert merge["error"].startswith("the fused merge + convert needs ~")
    assert _files(tmp_path / "work") == []

    # merge checks with a normal budget; convert alone, with the tiny one, refuses before writing the GGUF
    assert run_pipeline(config_from_dict(_budget(data, None), base_dir=tmp_path), ["majora"], only=["merge"]).ok
    out = run_pipeline(config_from_dict(_budget(data, TINY_GB), base_dir=tmp_path), ["majora"], only=["convert"])
    conv = out.models["majora"].stages["convert"]
    assert not out.ok and REFUSAL.match(conv.error) and conv.error.startswith("the fused merge + convert")
    assert _files(tmp_path / "work") == []

    # the two-step path: the stream merge is refused before its folder is written
    two = _data(tmp_path / "two", base, adapter, ["merge", "convert"], merge={"save_merged_hf": True})
    out = run_pipeline(config_from_dict(_budget(two, TINY_GB), base_dir=tmp_path), ["majora"])
    err = out.models["majora"].stages["merge"].error
    assert REFUSAL.match(err) and err.startswith("the stream merge needs ~"), err
    assert _files(tmp_path / "two" / "work") == []


def test_quantize_refused_and_estimates_recorded(llama_pair, tmp_path):
    base, adapter = llama_pair
    data = _data(tmp_path, base, adapter, ["merge", "convert", "quantize"])
    assert run_pipeline(config_from_dict(_budget(data, None), base_dir=tmp_path), ["majora"],
                        only=["merge", "convert"]).ok
    before = _files(tmp_path / "work")
    assert [f for f in before if f.endswith(".gguf")] == ["majora/gguf/majora_v1-f16.gguf"]
    out = run_pipeline(config_from_dict(_budget(data, TINY_GB), base_dir=tmp_path), ["majora"], only=["quantize"])
    q = out.models["majora"].stages["quantize"]
    assert not out.ok and REFUSAL.match(q.error) and q.error.startswith("quantize needs ~"), q.error
    assert _files(tmp_path / "work") == before and _files(tmp_path / "state" / "tensor-cache") == []

    # with room, it runs; every heavy stage's record has its estimate beside the measured peak
    assert run_pipeline(config_from_dict(_budget(data, None), base_dir=tmp_path), ["majora"]).ok
    record = json.loads((tmp_path / "state" / "runs" / "majora.json").read_text())
    for stage in ("convert", "quantize"):
        st = record["stages"][stage]
        assert st["estimated_peak_mib"] > 0 and st["peak_rss_mib"] > 0, st
        assert st["info"]["estimate_terms_mib"], st["info"]
