"""A tuned format end to end (issue 20): ``quantization.formats: [Q4_K_M, TUNED@Q4_K_M]`` through fetch, merge,
convert, quantize, verify, deploy and evaluate on the demo's llama persona, served and rolled back like any format.

The oracle: stock ``llama-quantize --tensor-type-file R [--imatrix I] F16 OUT BASE`` of the recipe written beside
the GGUF rebuilds it byte for byte.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from loradeploy.config import config_from_dict
from loradeploy.deploy import versions
from loradeploy.pipeline import run_pipeline
from loradeploy.quantize.imatrix import applied_imatrix, quantize_argv
from loradeploy.quantize.tuned.build import recipe_path
from loradeploy.state import RunRecord
from loradeploy.tools.openai_http import Client
from loradeploy.tools.proc import run
from tests.fixtures.servers import deploy, stop_model_servers
from tests.integration.test_verify import MODEL, _data, _port, _why

TUNED = "TUNED-Q4_K_M"


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _rebuild(f16: Path, recipe: Path, base: str, dst: Path, imatrix: str | None) -> Path:
    run(quantize_argv(f16, dst, base, threads=2, imatrix=imatrix, tensor_type_file=recipe), what="llama-quantize")
    return dst


def _tuned_run(root: Path, base: Path, adapter: Path, *, imatrix=None, stages=None, verify_tokens=None):
    data = _data(root, base, adapter, port=_port(), formats=("TUNED@Q4_K_M", "Q4_K_M"),
                 **({"stages": stages} if stages else {}))
    data["quantization"]["imatrix"] = imatrix
    if verify_tokens:              # verify scores fewer tokens than the samples hold: the rest is held out
        data.setdefault("verify", {})["max_tokens"] = verify_tokens
    cfg = config_from_dict(data)
    return cfg, run_pipeline(cfg, [MODEL])


def _check_quantize(cfg, imatrix: bool, heldout: bool = False) -> tuple[dict, Path]:
    rec = RunRecord.load(cfg.pipeline.state_dir, MODEL)
    q = rec.info("quantize")
    gguf = Path(next(a.path for a in rec.artifacts("quantize", "gguf") if a.format == TUNED))
    stock = Path(next(a.path for a in rec.artifacts("quantize", "gguf") if a.format == "Q4_K_M"))
    recipe = recipe_path(gguf)
    assert recipe.is_file() and recipe.parent == gguf.parent and gguf.name.endswith("-tuned-q4_k_m.gguf")
    assert [a.path for a in rec.artifacts("quantize", "recipe")] == [str(recipe)]
    t = q["tuned"][TUNED]
    assert t["recipe"] == recipe.read_text() and t["base"] == "Q4_K_M" and t["budget"] == TUNED
    assert t["adapter_weighted"] is True and t["engine"] == "loradeploy"
    # measured: the recipe kept is the lowest-KLD of the stock mix, the estimate's and the corrected one
    # whose top-1 is not significantly worse than the stock mix's (paired, McNemar: lost - won > 1.64 x
    # sqrt(lost + won) refuses); with more samples than verify scores, the search reads the rest (held out),
    # else verify's own text
    m = t["measured"]
    n = m["text"]["positions"]
    have = [k for k in ("stock", "estimate", "corrected") if k in m["kld"]]
    kept = [k for k in have if k not in m["rejected"]]
    for k in have[1:]:
        lost, won = m["flips"][k]
        assert abs(m["top1"][k] - (m["top1"]["stock"] + (won - lost) / n)) < 1e-5    # kept to 6 decimals
        assert (k in m["rejected"]) == (lost - won > 1.64 * (lost + won) ** 0.5)
    assert "stock" in kept and m["kld"][m["chosen"]] == min(m["kld"][k] for k in kept)
    assert m["text"]["text"] == ("heldout" if heldout else "in-sample") and m["text"]["positions"] > 0
    assert t["seconds"]["quantize"] == 0.0          # the file kept is the one the search wrote and scored
    assert {"lower:output", "lower:attn_q", "lower:ffn_down", "raise:attn_q", "raise:ffn_down"} <= set(m["kld"])
    # size within budget: never larger than the stock Q4_K_M it replaces (with the same imatrix or none)
    assert t["bytes"] == gguf.stat().st_size <= t["limit_bytes"]
    if not imatrix:
        assert t["limit_bytes"] == stock.stat().st_size
    # the oracle: stock llama-quantize rebuilds the file from the recipe beside it
    f16 = Path(rec.artifacts("convert", "gguf")[0].path)
    im = applied_imatrix(gguf)
    assert (im is not None) == imatrix
    out = _rebuild(f16, recipe, "Q4_K_M", gguf.parent / "oracle.gguf", im)
    assert sha(out) == sha(gguf), "llama-quantize --tensor-type-file does not rebuild the tuned GGUF"
    out.unlink()
    return t, gguf


@pytest.fixture(scope="module")
def tuned_served(llama_pair, tmp_path_factory):
    base, adapter = llama_pair
    root = tmp_path_factory.mktemp("tuned")
    cfg, res = _tuned_run(root, base, adapter, stages=["fetch", "merge", "convert", "quantize", "verify", "deploy",
                                                       "evaluate"])
    try:
        yield root, cfg, res
    finally:
        stop_model_servers(cfg, MODEL)


def test_a_tuned_format_is_quantized_verified_deployed_and_evaluated(tuned_served):
    root, cfg, res = tuned_served
    assert res.ok, _why(res)
    assert cfg.quantization.formats == [TUNED, "Q4_K_M"] and cfg.serve_format_for(MODEL) == TUNED
    t, gguf = _check_quantize(cfg, imatrix=False)
    # verify.json: the tuned format gated like any, with its budget and recipe
    rec = RunRecord.load(cfg.pipeline.state_dir, MODEL)
    v = json.loads(Path(rec.info("verify")["report"]).read_text())
    e = v["formats"][TUNED]
    assert e["passed"] is True and e["tuned"]["recipe"] == t["recipe"] and e["tuned"]["budget"] == TUNED
    assert "--tensor-type-file" in e["tuned"]["rebuild"] and e["limits"] == v["formats"]["Q4_K_M"]["limits"]
    assert v["served_format"] == TUNED
    # chosen by KLD against the F16 on verify's calibration text: no worse than the stock format against PEFT
    assert e["kld_mean"] <= 1.05 * v["formats"]["Q4_K_M"]["kld_mean"]
    # deployed: the served version is the tuned file, and it answers
    live = versions.live_version(cfg, MODEL)
    assert live.format == TUNED and live.sha256 == sha(gguf) and live.path.name.endswith("-tuned-q4_k_m.gguf")
    port = cfg.models[MODEL].port
    reply = Client(f"http://127.0.0.1:{port}", timeout=60).chat(
        {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8})
    assert reply.status == 200, reply
    # the evaluation report shows it beside the stock format, with the KLD-vs-size chart
    md = next(Path(cfg.evaluation.output_dir).rglob("*.md")).read_text()
    assert TUNED in md and "tensor-type-file" in md and "verify_kld_size.png" in md


def test_a_tuned_version_rolls_back_like_any(tuned_served, llama_pair):
    from loradeploy.deploy.service import rollback

    root, cfg, res = tuned_served
    rec = RunRecord.load(cfg.pipeline.state_dir, MODEL)
    stock = next(a for a in rec.artifacts("quantize", "gguf") if a.format == "Q4_K_M")
    deploy(cfg, MODEL, stock.path, fmt="Q4_K_M")
    assert versions.live_version(cfg, MODEL).format == "Q4_K_M"
    back = rollback(cfg, MODEL)
    live = versions.live_version(cfg, MODEL)
    assert back["format"] == TUNED and live.format == TUNED and live.path.is_file()


def test_a_tuned_format_with_the_fine_tunes_imatrix_is_rebuilt_by_llama_quantize(llama_pair, tmp_path):
    base, adapter = llama_pair
    cfg, res = _tuned_run(tmp_path, base, adapter, imatrix="auto", stages=["fetch", "merge", "convert", "quantize"],
                          verify_tokens=256)
    assert res.ok, _why(res)
    t, _ = _check_quantize(cfg, imatrix=True, heldout=True)
    # IQ types are candidates once an imatrix is there; the file still stays within Q4_K_M's size
    assert t["bytes"] <= t["limit_bytes"]
