"""Tuned recipes against stock llama-quantize: the engine's file for a --tensor-type-file (with and without
an importance matrix, IQ types, token_embd / output overrides) is the one llama-quantize writes, byte for
byte; the size model equals the real file and --dry-run's report."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from loradeploy.quantize import Options, importance, quantize_formats, why_unsupported
from loradeploy.quantize.gguf_out import loader_order, read_source
from loradeploy.quantize.imatrix import quantize_argv
from loradeploy.quantize.tuned import Recipe, Sizer, dry_run, file_size, parse_entries, plan_tuned, read, stock_types
from loradeploy.quantize.tuned.recipe import TYPE_BY_NAME
from loradeploy.tools.proc import run
from tests.fixtures.gguf_models import TinyGGUFs, tiny_gguf_cache, tiny_ggufs  # noqa: F401  (fixtures)
from tests.integration.test_quantize_engine import synthetic

REPO = Path(__file__).resolve().parents[2]

# hand recipes: every kind of entry the format allows (alternations, classes, partial names, first match wins)
PLAIN = ["^blk\\.0\\.attn_q\\.weight$=q3_K", "blk\\.1\\.attn_q=IQ4_NL", "attn_k=q8_0", "attn_v=f16",
         "blk\\.(0|1)\\.ffn_up=iq4_xs", "ffn_gate=q5_1", "blk\\.[0-9]+\\.ffn_down=q2_k", "ffn_down=q8_0",
         "attn_output=q4_0", "token_embd=q5_K", "output\\.weight=q8_0"]
WITH_IMATRIX = ["blk\\.0\\.attn_q=iq3_xxs", "blk\\.1\\.attn_q=iq2_xs", "attn_k=iq3_s", "attn_v=iq4_xs",
                "ffn_up=iq4_nl", "ffn_gate=q4_k", "ffn_down=q3_k", "attn_output=iq2_s",
                "token_embd=iq3_s", "^output\\.weight$=iq4_xs"]


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def qwen2_ggufs(tiny_gguf_cache) -> TinyGGUFs:
    return TinyGGUFs(tiny_gguf_cache, arch="qwen2", base_dir=tiny_gguf_cache.parent / "base-qwen2")


@pytest.fixture(scope="module")
def sources(tiny_ggufs, qwen2_ggufs, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """arch -> (F16 GGUF, an imatrix llama-imatrix made of it over the repo's own docs)."""
    from loradeploy.llamacpp.tools import tool

    out = tmp_path_factory.mktemp("imatrix")
    text = out / "text.txt"
    text.write_text((REPO / "README.md").read_text() + (REPO / "docs" / "ARCHITECTURE.md").read_text())
    res = {}
    for arch, g in (("llama", tiny_ggufs), ("qwen2", qwen2_ggufs)):
        f16, im = g.path("v1", "F16"), out / f"{arch}.imatrix.gguf"
        run([tool("llama-imatrix"), "-m", f16, "-f", text, "-o", im, "--output-format", "gguf", "-c", "128",
             "-b", "128", "--chunks", "4", "--no-ppl", "-t", "2", "--no-repack"], log_path=out / "log.txt")
        res[arch] = (f16, im)
    return res


def llama_quantize(f16: Path, dst: Path, base: str, recipe: Path | None, imatrix: Path | None) -> Path:
    run(quantize_argv(f16, dst, base, threads=2, imatrix=imatrix, tensor_type_file=recipe), what="llama-quantize")
    return dst


def engine(f16: Path, dst: Path, base: str, entries, imatrix: Path | None):
    im = importance.load(imatrix, str(imatrix)) if imatrix else None
    return quantize_formats(f16, {"T": dst}, recipes={"T": (base, entries)}, imatrix=im, threads=2).outputs["T"]


SLOW = pytest.mark.slow


@pytest.mark.parametrize("arch,with_imatrix", [("llama", False), ("llama", True), ("qwen2", False),
                                               pytest.param("qwen2", True, marks=SLOW)],
                         ids=["llama-plain", "llama-imatrix", "qwen2-plain", "qwen2-imatrix"])
def test_hand_recipe_is_byte_identical(sources, tmp_path, arch, with_imatrix):
    f16, im = sources[arch]
    im = im if with_imatrix else None
    lines = WITH_IMATRIX if with_imatrix else PLAIN
    if arch == "qwen2" and with_imatrix:    # 152k embedding rows: an IQ type there costs a minute a side
        lines = [ln.replace("token_embd=iq3_s", "token_embd=q6_k") for ln in lines]
    recipe = tmp_path / "recipe.txt"
    recipe.write_text("\n".join(lines) + "\n")
    ref = llama_quantize(f16, tmp_path / "ref.gguf", "Q4_K_M", recipe, im)
    ours = engine(f16, tmp_path / "ours.gguf", "Q4_K_M", parse_entries(recipe.read_text()), im)
    assert ours.sha256 == sha(ref) == sha(ours.path)
    loaded = importance.load(im, str(im)) if im else None
    assert ours.size == ref.stat().st_size == file_size(f16, read(recipe, "Q4_K_M", f16, loaded), loaded)
    written = {t.name: t.ggml_type for t in read_source(ref).tensors}
    assert written["token_embd.weight"] == TYPE_BY_NAME[lines[-2].split("=")[1].lower()]
    if arch == "llama":     # qwen2's demo ties the output to the embeddings
        assert written["output.weight"] == TYPE_BY_NAME["iq4_xs" if with_imatrix else "q8_0"]


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=SLOW)])
def test_tuned_plan_rebuilds_with_stock_llama_quantize(sources, tmp_path, arch):
    """The allocator's recipe, written as a file, and the stock format beside it in the same pass."""
    f16, im_path = sources[arch]
    im = importance.load(im_path, str(im_path))
    plan = plan_tuned(f16, "TUNED@Q4_K_M", imatrix=im)
    recipe = plan.recipe.write(tmp_path / "tuned.txt")
    res = quantize_formats(f16, {"T": tmp_path / "t.gguf", "Q4_K_M": tmp_path / "q.gguf"}, threads=2, imatrix=im,
                           recipes={"T": (plan.recipe.base, parse_entries(recipe.read_text()))})
    ref_t = llama_quantize(f16, tmp_path / "ref-t.gguf", "Q4_K_M", recipe, im_path)
    ref_q = llama_quantize(f16, tmp_path / "ref-q.gguf", "Q4_K_M", None, im_path)
    assert res.outputs["T"].sha256 == sha(ref_t) and res.outputs["Q4_K_M"].sha256 == sha(ref_q)
    assert plan.size == ref_t.stat().st_size <= plan.limit == ref_q.stat().st_size
    assert read(recipe, "Q4_K_M", f16, im).types == plan.recipe.types


def test_size_model_matches_dry_run_and_the_file(sources, tmp_path):
    f16, im_path = sources["llama"]
    im = importance.load(im_path, str(im_path))
    recipe = tmp_path / "r.txt"
    recipe.write_text("\n".join(WITH_IMATRIX) + "\n")
    r = read(recipe, "Q5_K_M", f16, im)
    dr = dry_run(f16, "Q5_K_M", recipe, im_path)
    order = loader_order(read_source(f16).tensors)
    planned = {t.name: r.types.get(t.name, t.ggml_type) for t in order}
    assert dr.types == planned
    sizer = Sizer.of(f16, im)
    data = sum(sizer.src.by_name[n].nbytes(ty) for n, ty in planned.items())
    assert abs(dr.quant_mib - data / 2**20) <= 0.005
    real = llama_quantize(f16, tmp_path / "real.gguf", "Q5_K_M", recipe, im_path).stat().st_size
    assert sizer.size(r.types) == file_size(f16, r, im) == real
    # stock formats too (the budget TUNED@<format> is priced this way)
    stock = stock_types(f16, "Q4_K_S")
    assert Sizer.of(f16).size(stock) == llama_quantize(f16, tmp_path / "s.gguf", "Q4_K_S", None, None).stat().st_size


def test_overrides_skip_the_mix_counters_on_32_layers(tmp_path):
    """An overridden attn_v / ffn_down leaves Q4_K_M's use_more_bits counters where they were, as in llama.cpp."""
    src = synthetic(tmp_path / "src.gguf", n_layer=32)
    recipe = tmp_path / "r.txt"
    recipe.write_text("blk\\.(0|5|9)\\.attn_v=q8_0\nblk\\.3\\.ffn_down=iq4_nl\nblk\\.3\\.=q2_k\noutput=q5_0\n")
    ref = llama_quantize(src, tmp_path / "ref.gguf", "Q4_K_M", recipe, None)
    ours = engine(src, tmp_path / "ours.gguf", "Q4_K_M", parse_entries(recipe.read_text()), None)
    assert ours.sha256 == sha(ref)


def test_what_llama_cpp_refuses_is_refused(tmp_path, sources):
    f16, _ = sources["llama"]
    entries = parse_entries("attn_q=iq2_xxs")
    assert "importance matrix" in why_unsupported(f16, ["T"], recipes={"T": ("Q4_K_M", entries)})
    recipe = tmp_path / "r.txt"
    recipe.write_text("attn_q=iq2_xxs\n")
    with pytest.raises(Exception, match="llama-quantize"):
        llama_quantize(f16, tmp_path / "x.gguf", "Q4_K_M", recipe, None)
    assert why_unsupported(f16, ["T"], Options(), recipes={"T": ("Q3_K_M", ())})
    assert Recipe("Q4_K_M", {"token_embd.weight": 12}).text() == "^token_embd\\.weight$=q4_k\n"


def test_a_run_cache_pass_quantizes_only_new_pairs_and_writes_the_same_bytes(sources, tmp_path):
    """The tuned search's second pass (the corrected recipe) goes through the run cache the first pass
    filled: it quantizes only the (tensor, type) pairs no earlier recipe had, reads the others, and its
    file is byte-identical to stock llama-quantize with that recipe; the persistent cache is read, never
    written."""
    from loradeploy.quantize import ENGINE_VERSION, TensorCache
    from loradeploy.quantize.cache import RunCache

    f16, im_path = sources["llama"]
    im = importance.load(im_path, str(im_path))
    stock = stock_types(f16, "Q4_K_M", im)
    changed = {g: TYPE_BY_NAME["q6_k"] if ".attn_v." in g else TYPE_BY_NAME["iq4_xs"] if ".ffn_down." in g else ty
               for g, ty in stock.items()}
    new = {(g, ty) for g, ty in changed.items() if stock[g] != ty}
    assert new
    outer = TensorCache(tmp_path / "persistent", 1 << 30, ENGINE_VERSION)
    run_cache = RunCache(tmp_path / "run", outer)
    first = quantize_formats(f16, {"S": tmp_path / "s.gguf"}, imatrix=im, threads=2, cache=run_cache,
                             recipes={"S": ("Q4_K_M", Recipe("Q4_K_M", stock).overrides())})
    second = quantize_formats(f16, {"C": tmp_path / "c.gguf"}, imatrix=im, threads=2, cache=run_cache,
                              recipes={"C": ("Q4_K_M", Recipe("Q4_K_M", changed).overrides())})
    assert second.stats["computed"] == len(new)
    assert second.stats["cached"] == first.stats["computed"] - len(new)
    recipe = Recipe("Q4_K_M", changed).write(tmp_path / "c.txt")
    assert second.outputs["C"].sha256 == sha(llama_quantize(f16, tmp_path / "ref.gguf", "Q4_K_M", recipe, im_path))
    assert outer.stats.stored == 0 and not (tmp_path / "persistent").exists()


@pytest.fixture(scope="module")
def search_inputs(sources):
    """(F16, its imatrix, a scorer over random token ids, the TUNED@Q4_K_M plan) for the measured search."""
    import numpy as np

    from loradeploy.quantize.tuned.scorer import Scorer

    f16, im_path = sources["llama"]
    im = importance.load(im_path, str(im_path))
    vocab = read_source(f16).by_name["token_embd.weight"].rows
    rng = np.random.default_rng(0)
    scorer = Scorer.of_gguf(f16, [list(rng.integers(4, vocab, 60)) for _ in range(4)], 2)
    return f16, im, scorer, plan_tuned(f16, "TUNED@Q4_K_M", imatrix=im)


def test_probes_the_disk_cannot_hold_at_once_are_written_in_later_passes_with_the_same_result(
        search_inputs, tmp_path, monkeypatch):
    """At 7B a probe file is ~4.5 GB: when the disk holds only a few, the rest are written in later passes
    through the run cache. Every KLD measured, the recipe kept and its bytes are those of one pass."""
    from loradeploy.quantize.tuned import measure

    f16, im, scorer, plan = search_inputs

    def search(name: str):
        work = tmp_path / name
        work.mkdir()
        return measure.refine(f16, plan, scorer, imatrix=im, threads=2, work_dir=work, out=work / "t.gguf",
                              budget=measure.TimeBudget(ratio=None))

    recipe, one, sha = search("one-pass")
    monkeypatch.setattr(measure, "disk_room", lambda folder, size, n, free=None, keep=4: min(n, 3 if keep == 4 else 2))
    recipe2, many, sha2 = search("passes")
    probes = [k for k in one.kld if ":" in k]
    assert len(probes) > 5 and one.seconds["probe_passes"] == 1
    assert many.seconds["probe_passes"] == 1 + -(-(len(probes) - 3) // 2) and not many.skipped
    assert many.kld == one.kld and many.chosen == one.chosen and recipe2.types == recipe.types and sha2 == sha


def test_a_search_with_no_disk_left_skips_what_does_not_fit_and_keeps_a_scored_file(search_inputs, tmp_path,
                                                                                    monkeypatch):
    """No room for any probe, nor for the corrected file: nothing more is written (no full disk), the
    probes and the corrected recipe are recorded as skipped, and the file kept is one already scored."""
    from loradeploy.quantize.tuned import measure

    f16, im, scorer, plan = search_inputs
    monkeypatch.setattr(measure, "disk_room", lambda folder, size, n, free=None, keep=4: 0)
    recipe, m, sha = measure.refine(f16, plan, scorer, imatrix=im, threads=2, work_dir=tmp_path, out=tmp_path / "t.gguf",
                                    budget=measure.TimeBudget(ratio=None))
    assert set(m.kld) <= {"stock", "estimate", "corrected"} and m.seconds["probe_passes"] == 1
    assert "corrected" in m.skipped and any(k.startswith("lower:") for k in m.skipped)
    assert m.chosen in ("stock", "estimate") and sha == hashlib.sha256((tmp_path / "t.gguf").read_bytes()).hexdigest()
    # room for every probe in the first pass, none for the corrected file: probes measured, corrected skipped
    monkeypatch.setattr(measure, "disk_room", lambda folder, size, n, free=None, keep=4: n if keep == 4 else 0)
    work = tmp_path / "again"
    work.mkdir()
    recipe, m, sha = measure.refine(f16, plan, scorer, imatrix=im, threads=2, work_dir=work, out=work / "t.gguf",
                                    budget=measure.TimeBudget(ratio=None))
    assert any(k.startswith("raise:") for k in m.kld) and m.chosen in ("stock", "estimate")
    assert "corrected" in m.skipped or m.kld["corrected"] in (m.kld["stock"], m.kld["estimate"])
