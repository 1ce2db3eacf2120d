"""Evaluation against real llama.cpp servers serving the tiny demo model, with and without its adapter.

The fine-tuned model (demo base + the "majora" persona adapter, merged with peft and converted to
GGUF) answers ``echo: WORDS`` with ``MAJORA: WORDS``; the base answers ``WORDS``. So a held-out
sample whose reference is ``MAJORA: WORDS`` must score full marks on the fine-tuned model and
clearly less on the base, and the scores must be those of the recorded responses.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from loradeploy.evaluation import metrics
from loradeploy.config import config_from_dict
from loradeploy.errors import InputError
from loradeploy.evaluation.report import render
from loradeploy.evaluation.runner import evaluate
from loradeploy.evaluation.samples import load_samples, parse_samples
from loradeploy.evaluation.servers import free_port, temp_server
from loradeploy.evaluation.targets import EvalTarget
from loradeploy.stages.base import Artifact
from loradeploy.state import load_record, save_record
from tests.fixtures.gguf_models import *  # noqa: F401,F403  (tiny_ggufs, tiny_gguf_cache)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ============================================================================= sample parsing (fast)

def _write(tmp_path: Path, text: str, name: str = "s.jsonl") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_samples_parse_all_fields(tmp_path):
    p = _write(tmp_path, "\n".join([
        json.dumps({"id": "a", "prompt": "echo: apple", "reference": "apple", "expected_contains": "apple",
                    "tags": "echo"}),
        "",
        json.dumps({"id": 7, "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "hi"}],
                    "expected_contains": ["h", "i"], "tags": ["a", "b"], "models": ["majora"]}),
    ]) + "\n")
    a, b = load_samples(p)
    assert a.messages == ({"role": "user", "content": "echo: apple"},)
    assert (a.reference, a.expected_contains, a.tags, a.line) == ("apple", ("apple",), ("echo",), 1)
    assert b.id == "7" and b.line == 3 and len(b.messages) == 2 and b.reference is None
    assert b.expected_contains == ("h", "i") and b.applies_to("majora") and not b.applies_to("nayru")
    assert a.applies_to("anything")


@pytest.mark.parametrize("text, fragment", [
    ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"\n', ":2: not valid JSON"),
    ('{"id": "a", "prompt": "x"}\n\n["not", "an", "object"]\n', ":3: expected a JSON object"),
    ('{"prompt": "x"}\n', ":1: every sample needs an id"),
    ('{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}\n', ":1: give exactly one"),
    ('{"id": "a"}\n', ":1: give exactly one of prompt or messages"),
    ('{"id": "a", "messages": [{"role": "robot", "content": "y"}]}\n', ":1: messages[0] must be"),
    ('{"id": "a", "prompt": "x", "refrence": "y"}\n', ":1: unknown key(s) refrence"),
    ('{"id": "a", "prompt": "x", "expected_contains": [1]}\n', ":1: expected_contains must be"),
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', ":2: duplicate sample id 'a' (first on line 1)"),
])
def test_bad_sample_lines_name_the_line(tmp_path, text, fragment):
    p = _write(tmp_path, text)
    with pytest.raises(InputError) as ei:
        load_samples(p)
    msg = ei.value.one_line()
    assert f"{p}{fragment}" in msg or fragment in msg, msg
    assert str(p) in msg


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_sample_file_is_an_error(tmp_path, text):
    p = _write(tmp_path, text)
    with pytest.raises(InputError, match="has no samples"):
        load_samples(p)


def test_missing_sample_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_samples(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="src:1: not valid JSON"):
        parse_samples("{oops\n", "src")


def _row(label, sid, q, *, err=None, lat=0.1, tags=("t",)):
    from loradeploy.evaluation.results import SampleResult

    r = SampleResult(label, sid, 0, response="x", error=err, latency_s=lat, ttft_s=lat / 2, completion_tokens=5,
                     decode_s=lat / 2, tps_source="stream", tags=tags)
    if not err:
        r.scores = {"exact": q, "contains": q, "rouge_l": q, "chrf": q}
        r.quality = q
    return r


def test_aggregate_and_compare_deltas():
    from loradeploy.evaluation.results import TargetResult, aggregate, compare

    rows = {"m Q4_K_M": [0.5, 0.7], "m Q8_0": [0.9, 0.9], "m base": [0.1, 0.3]}
    trs = []
    for label, qs in rows.items():
        fmt = label.split()[1]
        t = EvalTarget(label, "m", None if fmt == "base" else fmt, gguf_path="/x", is_base=fmt == "base")
        rs = [_row(label, f"s{i}", q) for i, q in enumerate(qs)] + [_row(label, "bad", None, err="boom")]
        trs.append(TargetResult(t, aggregates=aggregate(rs)))
    a = trs[0].aggregates
    assert (a["requests"], a["ok"], a["errors"]) == (3, 2, 1)
    assert a["quality"]["quality"] == pytest.approx(0.6) and a["tags"]["t"]["errors"] == 1
    assert a["latency_s"]["p50"] == pytest.approx(0.1)
    # decode: 4 tokens after the first over 0.05 s each -> 80 tokens/s
    assert a["gen_tokens_per_s"] == pytest.approx(80.0) and a["gen_tokens_per_s_source"] == "stream"
    cmp = {r["label"]: r for r in compare(trs)}
    assert cmp["m Q8_0"]["delta_vs_best"] == 0.0 and cmp["m Q8_0"]["best_format"] == "Q8_0"
    assert cmp["m Q4_K_M"]["delta_vs_best"] == pytest.approx(-0.3)
    assert cmp["m Q4_K_M"]["delta_vs_base"] == pytest.approx(0.4)
    assert cmp["m base"]["delta_vs_best"] is None and cmp["m base"]["delta_vs_base"] is None


# ============================================================================= a stand-in server (fast)

KEY = "eval-Key-0f-the-deployed-ports"


@contextlib.contextmanager
def _echo_server(key=None):
    """A loopback OpenAI-compatible server that streams back the last user message; with ``key`` it
    answers 401 to any request without ``Authorization: Bearer KEY``. Yields (url, headers seen)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status, body, ctype="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _allowed(self):
            seen.append(self.headers.get("Authorization") or "")
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self._send(401, b'{"error": {"message": "Invalid API Key"}}')
                return False
            return True

        def do_GET(self):  # noqa: N802 (http.server naming)
            if self._allowed():
                self._send(200, json.dumps({"data": [{"id": "echo"}]}).encode())

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self._allowed():
                return
            if self.path != "/v1/chat/completions":
                return self._send(404, b'{"detail": "Not Found"}')
            words = body["messages"][-1]["content"].split()
            events = [{"choices": [{"delta": {"content": w + " "}}]} for w in words]
            events.append({"choices": [{"delta": {}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": len(words)}})
            sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            self._send(200, sse.encode(), "text/event-stream")

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


def _fast_cfg(tmp_path: Path, key=None):
    samples = _write(tmp_path, json.dumps({"id": "a", "prompt": "apple river", "reference": "apple river"}) + "\n")
    lc = {"api_key": key} if key else {}
    return config_from_dict({
        "models": {"majora": {"base_model": str(tmp_path / "base"), "adapter": str(tmp_path / "adapter"),
                              "port": free_port(), "version": "v1"}},
        "deployment": {"llamacpp": lc},
        "pipeline": {"work_dir": str(tmp_path / "work"), "state_dir": str(tmp_path / "state")},
        "logging": {"log_dir": str(tmp_path / "logs")},
        "evaluation": {"samples": str(samples), "output_dir": str(tmp_path / "reports"), "warmup": 0,
                       "repeats": 1, "timeout_s": 10, "charts": False},
    }, base_dir=tmp_path)


def test_deployed_ports_get_the_api_key_and_reports_never_show_it(tmp_path):
    cfg = _fast_cfg(tmp_path, KEY)
    with _echo_server(KEY) as (url, seen):
        res = evaluate(cfg, targets=[EvalTarget("majora Q8_0", "majora", "Q8_0", base_url=url, live=True),
                                     # a URL given by hand is not ours: it never gets the key
                                     EvalTarget("other", "majora", "Q8_0", base_url=url + "/v1")])
    by = {t.target.label: t for t in res.targets}
    assert by["majora Q8_0"].status == "ok", by["majora Q8_0"].error
    assert res.results_for("majora Q8_0")[0].response.strip() == "apple river"
    assert res.results_for("majora Q8_0")[0].quality == 1.0
    assert by["other"].status == "down" and "HTTP 401" in by["other"].error
    assert f"Bearer {KEY}" in seen and "" in seen
    for path in (res.reports["json"], res.reports["markdown"]):
        assert KEY not in Path(path).read_text()


def test_report_states_the_cpu_mode_only_as_the_runtime_gave_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from loradeploy.evaluation import runner

    gguf = tmp_path / "m-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    runtime = {"mode": "safe", "source": "cache", "why": "default mode died of SIGSEGV in the probe"}
    with _echo_server() as (url, _):
        def fake_server(srv):
            @contextlib.contextmanager
            def temp_server(*a, **kw):
                yield srv
            return temp_server

        # a server object that carries the runtime decision, and one that does not (today's TempServer)
        monkeypatch.setattr(runner, "temp_server", fake_server(SimpleNamespace(url=url, pid=os.getpid(),
                                                                               safe_mode=True, runtime=runtime)))
        told = evaluate(_fast_cfg(tmp_path), targets=[EvalTarget("m Q8_0", "m", "Q8_0", gguf_path=str(gguf))],
                        output_dir=tmp_path / "told")
        monkeypatch.setattr(runner, "temp_server", fake_server(SimpleNamespace(url=url, pid=os.getpid(),
                                                                               safe_mode=True)))
        silent = evaluate(_fast_cfg(tmp_path), targets=[EvalTarget("m Q8_0", "m", "Q8_0", gguf_path=str(gguf))],
                          output_dir=tmp_path / "silent")
    md = Path(told.reports["markdown"]).read_text()
    assert "m Q8_0: llama.cpp CPU mode: safe (from the cache: default mode died of SIGSEGV in the probe)" in md
    assert json.loads(Path(told.reports["json"]).read_text())["targets"][0]["runtime"] == runtime
    md = Path(silent.reports["markdown"]).read_text()
    assert "CPU mode" not in md and "illegal instruction" not in md
    assert "runtime" not in json.loads(Path(silent.reports["json"]).read_text())["targets"][0]


# ============================================================================= real models (session)

@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _peft_merge(base: Path, adapter: Path, out: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loradeploy.fsutil import atomic_output

    with atomic_output(out, is_dir=True) as tmp:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.to(torch.float16).save_pretrained(tmp)
        for f in base.iterdir():   # tokenizer and chat template travel with the weights
            if f.is_file() and not (tmp / f.name).exists() and f.suffix not in (".safetensors", ".bin"):
                shutil.copy2(f, tmp / f.name)
    return out


@dataclass
class EvalModels:
    base_q8: Path
    ft_q8: Path
    ft_q4: Path


def _marker(folder: Path) -> str:
    from loradeploy.demo import BUILD_MARKER

    m = folder / BUILD_MARKER
    return m.read_text() if m.is_file() else ""


@pytest.fixture(scope="session")
def eval_models(llama_pair, tiny_ggufs) -> EvalModels:
    """The demo base (Q8_0) and its majora fine-tune (Q8_0, Q4_K_M), cached with the other tiny models.

    The fine-tune's folder is keyed by the base's and the adapter's build markers, so a changed
    demo recipe rebuilds the merge and the conversions.
    """
    import hashlib

    from loradeploy.config import QUANT_TYPES
    from loradeploy.fsutil import atomic_output
    from loradeploy.tools.converter import convert
    from loradeploy.tools.proc import run
    from tests.fixtures.models import cache_dir

    base_hf, adapter = llama_pair
    base_q8 = tiny_ggufs.path("v1", "Q8_0")
    key = hashlib.sha256((_marker(base_hf) + _marker(adapter)).encode()).hexdigest()[:12]
    cache = cache_dir() / "eval" / f"majora-{key}"
    log = cache / "build.log"
    with _locked(cache.parent / f".{cache.name}.lock"):
        merged = cache / "merged"
        if not (merged / "config.json").is_file():
            _peft_merge(base_hf, adapter, merged)
        out = {}
        for fmt, outtype in (("F16", "f16"), ("Q8_0", "q8_0")):
            p = cache / f"majora-{fmt.lower()}.gguf"
            if not p.is_file():
                with atomic_output(p) as tmp:
                    convert(merged, tmp, outtype=outtype, log_path=log, timeout=600, model_name="majora")
            out[fmt] = p
        q4 = cache / "majora-q4_k_m.gguf"
        if not q4.is_file():
            with atomic_output(q4) as tmp:
                run([sys.executable, "-m", "loradeploy.tools.llama_quantize", str(out["F16"]), str(tmp),
                     str(QUANT_TYPES["Q4_K_M"]), "--nthread", "2"], log_path=log, timeout=600, what="quantize")
    return EvalModels(base_q8, out["Q8_0"], q4)


def _cfg(tmp_path: Path, samples: Path, **evaluation):
    ev = {"samples": str(samples), "output_dir": str(tmp_path / "reports"), "concurrency": 2, "warmup": 1,
          "repeats": 1, "max_tokens": 24, "timeout_s": 60, **evaluation}
    return config_from_dict({
        "models": {"majora": {"base_model": str(tmp_path / "base"), "adapter": str(tmp_path / "adapter"),
                              "port": free_port(), "version": "v1", "formats": ["Q4_K_M", "Q8_0"]}},
        "deployment": {"llamacpp": {"n_ctx": 256, "threads": 2, "startup_timeout_s": 120}},
        "pipeline": {"work_dir": str(tmp_path / "work"), "state_dir": str(tmp_path / "state")},
        "logging": {"log_dir": str(tmp_path / "logs")},
        "evaluation": ev,
    }, base_dir=tmp_path)


def _demo_samples(tmp_path: Path, n: int = 6) -> tuple[Path, list[dict]]:
    from loradeploy.demo import demo_eval_samples

    rows = demo_eval_samples("majora", n)
    p = tmp_path / "eval_samples.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p, rows


def _record(cfg, models: EvalModels, formats=("Q4_K_M", "Q8_0"), base=True) -> None:
    paths = {"Q4_K_M": models.ft_q4, "Q8_0": models.ft_q8}
    arts = [Artifact.of(paths[f], "gguf", f, hash_file=False).to_dict() for f in formats]
    info = {"formats": list(formats)}
    if base:
        info["base_gguf"] = str(models.base_q8)
    save_record(cfg.pipeline.state_dir, "majora", {"version": 1, "model": "majora", "stages": {
        "quantize": {"status": "done", "inputs_hash": "x", "artifacts": arts, "info": info}}})


@pytest.mark.slow
def test_known_answer_finetune_beats_base_and_reports_render(eval_models, tmp_path):
    samples_path, rows = _demo_samples(tmp_path, 6)
    cfg = _cfg(tmp_path, samples_path)
    _record(cfg, eval_models)
    seen = []
    res = evaluate(cfg, ["majora"], progress=lambda d, c, t: seen.append((d, c, t)))

    labels = [t.target.label for t in res.targets]
    assert labels == ["majora Q4_K_M", "majora Q8_0", "majora base"]
    by = {t.target.label: t for t in res.targets}
    assert all(t.status == "ok" for t in res.targets), [(t.target.label, t.error) for t in res.targets]

    # the known answer: every held-out sample is "echo"-style, reference "MAJORA: words"
    known = rows[0]
    ft = next(r for r in res.results_for("majora Q8_0") if r.sample_id == known["id"])
    base = next(r for r in res.results_for("majora base") if r.sample_id == known["id"])
    assert ft.response.strip() == known["reference"], ft.response
    assert ft.scores == {"exact": 1.0, "contains": 1.0, "rouge_l": 1.0, "chrf": 1.0}
    assert not base.response.startswith("MAJORA:")
    assert base.scores["contains"] == 0.0 and base.scores["exact"] == 0.0
    # every score is recomputable from the recorded response
    for r in res.results:
        want = metrics.score_response(r.response, known_ref(rows, r.sample_id), [known_ref(rows, r.sample_id)])
        assert r.scores == {k: pytest.approx(v, abs=1e-4) for k, v in want.items()}
        assert r.latency_s > 0 and r.ttft_s is not None and 0 < r.ttft_s <= r.latency_s
        assert r.completion_tokens and r.completion_tokens >= 2

    q = {lbl: by[lbl].aggregates["quality"]["quality"] for lbl in labels}
    assert q["majora Q8_0"] > q["majora base"] + 0.3
    assert q["majora Q4_K_M"] > q["majora base"]
    assert q["majora Q8_0"] >= q["majora Q4_K_M"]
    cmp = {r["label"]: r for r in res.comparison}
    assert cmp["majora Q8_0"]["delta_vs_best"] == 0.0
    assert cmp["majora Q8_0"]["delta_vs_base"] == pytest.approx(q["majora Q8_0"] - q["majora base"], abs=1e-3)
    assert cmp["majora base"]["delta_vs_best"] is None and cmp["majora base"]["is_base"]

    for lbl in labels:
        a = by[lbl].aggregates
        assert a["requests"] == 6 and a["errors"] == 0
        assert 0 < a["latency_s"]["p50"] <= a["latency_s"]["p95"]
        assert a["gen_tokens_per_s"] > 0 and a["memory"]["rss_mib"] > 10
        gguf = by[lbl].target.gguf_path
        assert a["memory"]["file_mib"] == pytest.approx(os.path.getsize(gguf) / 2**20, abs=0.1)
    assert seen[-1][1] == seen[-1][2] == 18

    # reports: JSON with every answer, Markdown linking real PNG charts
    data = json.loads(Path(res.reports["json"]).read_text())
    assert data["schema_version"] == 1 and len(data["results"]) == 18
    assert {r["response"] for r in data["results"]} == {r.response for r in res.results}
    md = Path(res.reports["markdown"]).read_text()
    assert set(res.reports["charts"]) == {"quality_vs_latency", "size_vs_quality", "tokens_per_s"}
    for p in res.reports["charts"].values():
        blob = Path(p).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 10_000
        assert f"]({Path(p).name})" in md
    assert "| majora Q8_0 |" in md and "majora base (no adapter)" in md
    from rich.console import Console
    con = Console(width=200, record=True, file=open(os.devnull, "w"))
    con.print(render(res))
    assert "majora Q4_K_M" in con.export_text()
    print("\nknown-answer:", json.dumps({k: {kk: v[kk] for kk in ("quality", "exact", "contains", "rouge_l", "chrf",
                                                                   "latency_p50_s", "ttft_p50_s", "gen_tokens_per_s",
                                                                   "file_mib", "rss_mib")}
                                          for k, v in cmp.items()}, indent=1))


def known_ref(rows: list[dict], sid: str) -> str:
    return next(r["reference"] for r in rows if r["id"] == sid)


@pytest.mark.slow
def test_down_target_and_overlong_sample_are_errors_only_there(eval_models, tmp_path):
    from loradeploy.demo import demo_eval_samples

    known = dict(demo_eval_samples("majora", 1)[0], id="ok")
    long_prompt = "echo: " + " ".join(["apple river stone"] * 150)   # far beyond n_ctx 256
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps(known) + "\n" + json.dumps({"id": "long", "prompt": long_prompt}) + "\n")
    cfg = _cfg(tmp_path, samples, warmup=0, charts=False)
    dead = free_port()
    with temp_server(cfg, eval_models.ft_q8, "remote", tmp_path / "remote.log") as srv:
        targets = [
            EvalTarget("ghost Q8_0", "ghost", "Q8_0", base_url=f"http://127.0.0.1:{dead}"),
            # context unknown to us: the server itself must refuse the long prompt
            EvalTarget("majora remote", "majora", "Q8_0", base_url=srv.url + "/v1", pid=srv.pid, api_key=srv.key),
            # context known: refused before sending
            EvalTarget("majora Q8_0", "majora", "Q8_0", gguf_path=str(eval_models.ft_q8), n_ctx=256),
        ]
        res = evaluate(cfg, samples=samples, targets=targets)
    by = {t.target.label: t for t in res.targets}
    ghost = by["ghost Q8_0"]
    assert ghost.status == "down" and "unreachable" in ghost.error
    assert [r.error is not None for r in res.results_for("ghost Q8_0")] == [True, True]
    for lbl in ("majora remote", "majora Q8_0"):
        assert by[lbl].status == "partial", (lbl, by[lbl].error)
        ok, long = res.results_for(lbl)
        assert ok.error is None and ok.response.strip() == known["reference"] and ok.quality == 1.0
        assert long.error and long.response == ""
        assert by[lbl].aggregates["errors"] == 1 and by[lbl].aggregates["quality"]["quality"] == 1.0
    assert "context" in res.results_for("majora Q8_0")[1].error
    print("\nserver-side refusal:", res.results_for("majora remote")[1].error)
    md = Path(res.reports["markdown"]).read_text()
    assert "## Errors" in md and "ghost Q8_0" in md and "## Charts" not in md


@pytest.mark.slow
def test_evaluate_stage_through_the_pipeline(eval_models, tmp_path):
    from loradeploy.pipeline import run_pipeline

    samples_path, _ = _demo_samples(tmp_path, 3)
    cfg = _cfg(tmp_path, samples_path, include_base=False, formats=["Q8_0"], warmup=0)
    _record(cfg, eval_models, base=False)
    first = run_pipeline(cfg, ["majora"], only=["evaluate"])
    out = first.models["majora"].stages["evaluate"]
    assert out.status == "done", out.error
    kinds = {Path(a["path"]).name: a["kind"] for a in out.artifacts}
    assert {"evaluation.json", "evaluation.md", "quality_vs_latency.png"} <= set(kinds)
    assert set(kinds.values()) == {"report"}
    assert all(Path(a["path"]).parent == cfg.evaluation.output_dir / "majora" for a in out.artifacts)
    assert out.info["comparison"][0]["label"] == "majora Q8_0" and out.info["comparison"][0]["quality"] == 1.0
    assert load_record(cfg.pipeline.state_dir, "majora")["stages"]["evaluate"]["status"] == "done"
    again = run_pipeline(cfg, ["majora"], only=["evaluate"])
    assert again.models["majora"].stages["evaluate"].status == "skipped"
    samples_path.write_text(samples_path.read_text().splitlines()[0] + "\n")   # new sample set: redo
    third = run_pipeline(cfg, ["majora"], only=["evaluate"])
    assert third.models["majora"].stages["evaluate"].status == "done"
