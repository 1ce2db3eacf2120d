"""loradeploy's quantize engine against llama_model_quantize: same tensor types, same file bytes.

References come from llama.cpp itself (tests.fixtures.gguf_models builds and caches them through
loradeploy.tools.llama_quantize), so a change of the pinned llama.cpp shows up here first.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

from loradeploy.quantize import ENGINE_VERSION, Options, TensorCache, quantize_formats, why_unsupported
from loradeploy.quantize.cache import trim, usage
from loradeploy.quantize.gguf_out import TYPE_NAMES, loader_order, read_source
from tests.fixtures.gguf_models import TinyGGUFs, tiny_gguf_cache, tiny_ggufs  # noqa: F401  (fixtures)

SIX = ["Q4_K_M", "Q5_K_M", "Q8_0", "Q6_K", "Q4_K_S", "Q5_K_S"]


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def types_of(path: Path) -> dict[str, str]:
    return {t.name: TYPE_NAMES.get(t.ggml_type, str(t.ggml_type)) for t in read_source(path).tensors}


def llama_cpp(src: Path, dst: Path, fmt: str, **opts) -> Path:
    from loradeploy.config import QUANT_TYPES
    from loradeploy.tools.llama_quantize import quantize

    assert quantize(str(src), str(dst), QUANT_TYPES[fmt], nthread=2, **opts) == 0
    return dst


def reference(ggufs: TinyGGUFs, fmt: str, tmp_path: Path) -> Path:
    """llama_model_quantize's output for ``fmt`` (the fixture's own Q8_0 comes from the converter)."""
    if fmt == "Q8_0":
        return llama_cpp(ggufs.path("v1", "F16"), tmp_path / "ref-Q8_0.gguf", fmt)
    return ggufs.path("v1", fmt)


@pytest.fixture(scope="module")
def qwen2_ggufs(tiny_gguf_cache) -> TinyGGUFs:
    return TinyGGUFs(tiny_gguf_cache, arch="qwen2", base_dir=tiny_gguf_cache.parent / "base-qwen2")


def synthetic(path: Path, *, arch="llama", n_layer=32, hidden=256, ffn=288, vocab=64, tied=False,
              n_head=4, n_kv=2, seed=0) -> Path:
    """A shapes-only model: many layers, 8 rows per matrix (llama_model_quantize never checks shapes),
    and rows llama.cpp must fall back on (ffn 288 is no multiple of 256)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)

    def t(name, shape, f32=False):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32 if f32 else np.float16))

    t("token_embd.weight", (vocab, hidden))
    if not tied:
        t("output.weight", (vocab, hidden))
    t("output_norm.weight", (hidden,), True)
    for i in range(n_layer):
        p = f"blk.{i}."
        t(p + "attn_norm.weight", (hidden,), True)
        t(p + "ffn_norm.weight", (hidden,), True)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            t(p + name + ".weight", (8, hidden))
        t(p + "ffn_down.weight", (8, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _check_identical(src: Path, refs: dict[str, Path], tmp_path: Path, **kw) -> None:
    res = quantize_formats(src, {f: tmp_path / f"ours-{f}.gguf" for f in refs}, threads=2, **kw)
    for f, ref in refs.items():
        assert types_of(res.outputs[f].path) == types_of(ref), f
        assert res.outputs[f].sha256 == sha(ref) == sha(res.outputs[f].path), f


@pytest.mark.parametrize("fmt", SIX)
def test_tiny_llama_is_byte_identical(tiny_ggufs, tmp_path, fmt):
    _check_identical(tiny_ggufs.path("v1", "F16"), {fmt: reference(tiny_ggufs, fmt, tmp_path)}, tmp_path)


def test_tiny_qwen2_is_byte_identical_all_six_in_one_pass(qwen2_ggufs, tmp_path):
    refs = {f: reference(qwen2_ggufs, f, tmp_path) for f in SIX}
    _check_identical(qwen2_ggufs.path("v1", "F16"), refs, tmp_path)


@pytest.mark.parametrize("shape", [
    dict(),                                             # 32 layers: every use_more_bits branch, fallbacks
    dict(tied=True, hidden=320, ffn=512),               # tied embeddings, rows that fit no 256-block
    dict(arch="qwen2", n_layer=28, tied=True),
    dict(n_layer=80, n_head=8, n_kv=2),                 # Llama 70B: attn_v gets more bits
    dict(n_layer=7),
], ids=["llama32", "tied320", "qwen2-28", "llama70b", "llama7"])
def test_every_tensor_type_matches_llama_cpp(tmp_path, shape):
    src = synthetic(tmp_path / "src.gguf", **shape)
    fmts = SIX if shape.get("n_layer") != 80 else ["Q4_K_M", "Q4_K_S"]
    refs = {f: llama_cpp(src, tmp_path / f"ref-{f}.gguf", f) for f in fmts}
    _check_identical(src, refs, tmp_path)


def test_options_are_honoured(tmp_path):
    src = synthetic(tmp_path / "src.gguf", n_layer=8)
    refs = {"Q4_K_M": llama_cpp(src, tmp_path / "ref.gguf", "Q4_K_M", output_tensor_type="Q8_0",
                                token_embedding_type="Q6_K", pure=False)}
    _check_identical(src, refs, tmp_path, opts=Options.of("Q8_0", "Q6_K", False, False))
    refs = {"Q5_K_M": llama_cpp(src, tmp_path / "ref-pure.gguf", "Q5_K_M", pure=True, leave_output_tensor=True)}
    _check_identical(src, refs, tmp_path, opts=Options.of(None, None, True, True))


def test_unsupported_goes_to_llama_cpp(tmp_path, tiny_ggufs):
    f16 = tiny_ggufs.path("v1", "F16")
    assert why_unsupported(f16, ["Q4_K_M"]) is None
    assert "format" in why_unsupported(f16, ["Q3_K_M"])
    assert "already quantized" in why_unsupported(tiny_ggufs.path("v1", "Q8_0"), ["Q4_K_M"])
    assert why_unsupported(f16, ["Q4_K_M"], Options.of("IQ4_NL", None, False, False))
    src = synthetic(tmp_path / "g.gguf", arch="gemma", n_layer=2)
    assert "architecture" in why_unsupported(src, ["Q4_K_M"])


def test_loader_order(tiny_ggufs):
    names = [t.name for t in loader_order(read_source(tiny_ggufs.path("v1", "F16")).tensors)]
    assert names == list(types_of(tiny_ggufs.path("v1", "Q4_K_M")))


def test_cache_hit_miss_and_corrupt_entry(tiny_ggufs, tmp_path, caplog):
    f16, ref = tiny_ggufs.path("v1", "F16"), tiny_ggufs.path("v1", "Q4_K_M")
    root = tmp_path / "cache"
    cache = TensorCache(root, 1 << 30, ENGINE_VERSION)
    first = quantize_formats(f16, {"Q4_K_M": tmp_path / "a.gguf"}, cache=cache)
    assert first.stats["cached"] == 0 and cache.stats.stored == first.stats["computed"] > 0
    cache = TensorCache(root, 1 << 30, ENGINE_VERSION)
    second = quantize_formats(f16, {"Q4_K_M": tmp_path / "b.gguf"}, cache=cache)
    assert second.stats["computed"] == 0 and second.stats["cached"] == first.stats["computed"]
    victim = sorted(root.glob("*/*.q"))[0]
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 0xFF
    victim.write_bytes(bytes(blob))
    cache = TensorCache(root, 1 << 30, ENGINE_VERSION)
    with caplog.at_level(logging.WARNING):
        third = quantize_formats(f16, {"Q4_K_M": tmp_path / "c.gguf"}, cache=cache)
    assert cache.stats.corrupt == 1 and third.stats["computed"] == 1 and "damaged" in caplog.text
    assert {r.outputs["Q4_K_M"].sha256 for r in (first, second, third)} == {sha(ref)}
    # a different engine version never reads these entries, and trimming drops them
    assert TensorCache(root, 1 << 30, "other").get(victim.name.split(".")[0], 12, 1) is None
    before = usage(root)
    r = trim(root, before["bytes"] // 2, ENGINE_VERSION)
    assert r["removed"] > 0 and usage(root)["bytes"] <= before["bytes"] // 2
    assert trim(root, 1 << 30, "other")["kept"] == 0 and usage(root)["entries"] == 0


def test_stage_uses_the_engine_and_says_so(tiny_ggufs, llama_pair, tmp_path):
    from loradeploy.cleanup import clean
    from loradeploy.config import config_from_dict
    from loradeploy.paths import ModelPaths
    from loradeploy.stages.base import Artifact, StageContext
    from loradeploy.stages.quantize import QuantizeStage

    f16 = tiny_ggufs.path("v1", "F16")

    def stage(engine: str, formats: list[str], name: str):
        base, adapter = llama_pair
        cfg = config_from_dict({
            "models": {"m": {"base_model": str(base), "adapter": str(adapter), "port": 5990}},
            "quantization": {"formats": formats, "engine": engine},
            "pipeline": {"work_dir": str(tmp_path / name / "work"), "state_dir": str(tmp_path / "state")},
            "logging": {"log_dir": str(tmp_path / "logs")}})
        # convert records which tensors the adapter changed; none here, so every tensor may be cached
        up = {"convert": {"artifacts": [Artifact.of(f16, "gguf", "F16").to_dict()], "info": {"adapter_tensors": []}}}
        ctx = StageContext(cfg, "m", logging.getLogger("t"), tmp_path / f"{name}.log", ModelPaths.of(cfg, "m"), up)
        return cfg, QuantizeStage().run(ctx)

    _, ours = stage("auto", ["Q4_K_M", "Q8_0", "Q3_K_S"], "auto")
    assert ours.info["engine"] == {"Q4_K_M": "loradeploy", "Q8_0": "loradeploy", "Q3_K_S": "llama.cpp"}
    cfg, theirs = stage("llama.cpp", ["Q4_K_M"], "ref")
    assert theirs.info["engine"] == {"Q4_K_M": "llama.cpp"}
    assert ours.artifacts[0].sha256 == theirs.artifacts[0].sha256 == sha(ours.artifacts[0].path)
    assert ours.artifacts[1].sha256 == sha(reference(tiny_ggufs, "Q8_0", tmp_path))
    assert usage(tmp_path / "state" / "tensor-cache")["entries"] > 0
    # `loradeploy clean` trims the cache to its bound (here 0: everything goes) and says so
    small = cfg.model_copy(update={"performance": cfg.performance.model_copy(update={"tensor_cache_gb": 0})})
    report = [r for r in clean(small, dry_run=True) if "tensor cache" in r["what"]]
    assert report and report[0]["size"] > 0
