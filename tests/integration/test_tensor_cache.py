"""The tensor cache keeps only what another adapter can reuse: the tensors the adapter left alone. A second
adapter on the same base reads them back (cache hits) and writes the same bytes as without a cache."""
from __future__ import annotations

import hashlib
from pathlib import Path

from loradeploy.config import config_from_dict
from loradeploy.pipeline import run_pipeline
from loradeploy.quantize.gguf_out import read_source

FORMATS = ["Q4_K_M", "Q8_0"]


def _cfg(tmp: Path, base: Path, adapters: dict[str, Path], cache_gb: float):
    return config_from_dict({
        "models": {m: {"base_model": str(base), "adapter": str(a), "port": 5000 + i}
                   for i, (m, a) in enumerate(adapters.items())},
        "quantization": {"formats": FORMATS},
        "pipeline": {"stages": ["merge", "convert", "quantize"], "work_dir": str(tmp / "work"),
                     "state_dir": str(tmp / "state")},
        "logging": {"log_dir": str(tmp / "logs")},
        "performance": {"min_free_disk_gb": 0.1, "tensor_cache_gb": cache_gb}}, base_dir=tmp)


def _digests(gguf: Path) -> dict[str, str]:
    src = read_source(gguf)
    with open(gguf, "rb") as f:
        out = {}
        for t in src.tensors:
            f.seek(src.data_start + t.offset)
            out[t.name] = hashlib.sha256(f.read(t.nbytes())).hexdigest()
    return out


def _cached(state: Path) -> set[str]:
    return {p.name.split(".")[0] for p in (state / "tensor-cache").glob("*/*.q")}


def test_only_untouched_tensors_cached_and_reused(llama_pair, tmp_path):
    from loradeploy.demo.bench_models import build_bench_adapter
    base, adapter = llama_pair
    other = build_bench_adapter(base, tmp_path / "adapter-b", r=4, seed=3)

    cfg = _cfg(tmp_path / "cached", base, {"a": adapter}, 1.0)
    res = run_pipeline(cfg, ["a"])
    assert res.ok, res.to_dict()
    conv, quant = res.models["a"].stages["convert"], res.models["a"].stages["quantize"]
    changed = set(conv.info["adapter_tensors"])
    f16 = Path(next(a["path"] for a in conv.artifacts if a["kind"] == "gguf"))
    digests = _digests(f16)
    assert changed and changed < set(digests) and all(".attn_" in n or ".ffn_" in n for n in changed)
    stats = quant.info["engine_stats"]
    cached = _cached(tmp_path / "cached" / "state")
    untouched = {digests[n] for n in digests if n not in changed}
    assert stats["cache"]["stored"] > 0 and cached and cached <= untouched
    assert not cached & {digests[n] for n in changed}, "a tensor the adapter changed was cached"

    # a second adapter on the same base: every cached tensor is a hit, only its own tensors are computed
    cfg2 = _cfg(tmp_path / "cached", base, {"a": adapter, "b": other}, 1.0)
    res_b = run_pipeline(cfg2, ["b"])
    assert res_b.ok, res_b.to_dict()
    stats_b = res_b.models["b"].stages["quantize"].info["engine_stats"]
    # (hits can outnumber entries: tensors with the same bytes, e.g. equal norms, share one entry)
    assert stats_b["cache"]["hits"] >= stats["cache"]["stored"] and stats_b["cache"]["misses"] == 0
    assert stats_b["cache"]["stored"] == 0 and stats_b["cached"] == stats_b["cache"]["hits"]
    assert stats_b["computed"] == stats["computed"] - stats["cache"]["stored"]  # only what its adapter changed

    # byte-identical to the same adapter quantized without any cache
    plain = run_pipeline(_cfg(tmp_path / "plain", base, {"b": other}, 0), ["b"])
    assert plain.ok, plain.to_dict()
    sha = {a["format"]: a["sha256"] for a in res_b.models["b"].stages["quantize"].artifacts if a["kind"] == "gguf"}
    ref = {a["format"]: a["sha256"] for a in plain.models["b"].stages["quantize"].artifacts if a["kind"] == "gguf"}
    assert sha == ref and set(sha) == set(FORMATS)
    assert not (tmp_path / "plain" / "state" / "tensor-cache").exists() or not _cached(tmp_path / "plain" / "state")
