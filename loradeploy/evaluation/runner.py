"""Run the samples against each target and collect the results: the ``evaluate()`` entry.

Each target (one model in one format, or the base model without its adapter) gets the samples that
apply to it, over streaming chat completions, with a warm-up, repeats and bounded concurrency.
Targets without a running server are served for the duration of their turn by a temporary
llama.cpp server, one at a time so memory stays bounded. A target that cannot be reached turns into
error rows; the others are still evaluated.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..config import Config
from ..errors import EvalError, InputError
from ..expectations import eval_timeout, model_bytes
from ..resources import cpu_budget
from ..serving import record
from ..serving.ports import pid_listening_on
from . import metrics
from .chat import Api
from ..tools.procmem import gpu_memory_bytes, proc_tree_memory
from .report import write_reports
from .results import EvalResult, SampleResult, TargetResult, aggregate, compare, round_opt
from .samples import Sample, load_samples, with_system_prompt
from .servers import temp_server
from .targets import EvalTarget, build_targets

SCHEMA_VERSION = 1
ProgressFn = Callable[[str, float, float], None]


class _TargetRun:
    def __init__(self, cfg: Config, target: EvalTarget, samples: list[Sample], tick: Callable[[str], None]):
        self.cfg, self.t, self.samples, self.tick = cfg, target, samples, tick
        self.ev = cfg.evaluation
        self.serial = threading.Lock()
        self.serialize = False
        self.peak_rss = self.peak_anon = self.peak_file = 0
        self.pid: Optional[int] = None
        self.notes: list[str] = []
        self.runtime: Optional[dict] = None
        # a server we start has the configured context; a given one has what its target says
        self.n_ctx = target.n_ctx or (None if target.base_url else cfg.deployment.llamacpp.n_ctx)

    def _error_rows(self, message: str) -> list[SampleResult]:
        rows = []
        for rep in range(self.ev.repeats):
            for s in self.samples:
                rows.append(SampleResult(self.t.label, s.id, rep, error=message, tags=s.tags))
                self.tick(self.t.label)
        return rows

    def _sample_rss(self) -> None:
        if self.pid:
            m = proc_tree_memory(self.pid)  # anonymous memory apart from the reclaimable file pages
            if m is not None:
                self.peak_rss, self.peak_anon = max(self.peak_rss, m.rss), max(self.peak_anon, m.anon)
                self.peak_file = max(self.peak_file, m.file)

    def _one(self, api: Api, s: Sample, rep: int) -> SampleResult:
        msgs = self._messages(s)
        n_ctx = self.n_ctx
        if n_ctx:
            n = api.count_tokens("\n".join(m["content"] for m in msgs))
            # chat templates add a few tokens per message around the content
            if n is not None and n + 4 * len(msgs) + 4 >= n_ctx:
                return SampleResult(self.t.label, s.id, rep, error=f"prompt is about {n} tokens, longer than the "
                                    f"context of {n_ctx} tokens", prompt_tokens=n, tags=s.tags)
        kw = {"max_tokens": self.ev.max_tokens, "temperature": self.ev.temperature}
        if self.serialize:
            with self.serial:
                reply = api.chat(msgs, **kw)
        else:
            reply = api.chat(msgs, **kw)
        tries = 0
        while reply.interrupted and tries < 3:
            self.serialize = True
            tries += 1
            with self.serial:
                reply = api.chat(msgs, **kw)
        if reply.error and not reply.text and reply.error.startswith("the stream ended"):
            reply.error = api.diagnose(msgs, **kw) or reply.error
        res = SampleResult(self.t.label, s.id, rep, reply.text, tags=s.tags, **reply.stats())
        if reply.interrupted:
            res.error = "the server kept cutting this answer short (llama-cpp-python interrupt_requests)"
        if not res.error:
            res.scores = {k: round_opt(v) for k, v in
                          metrics.score_response(res.response, s.reference, s.expected_contains).items()}
            res.quality = round_opt(metrics.combined_quality(res.scores))
        return res

    def _messages(self, s: Sample) -> list[dict]:
        return with_system_prompt(s.messages, self.t.system_prompt)

    def _measure(self, api: Api) -> list[SampleResult]:
        for i in range(self.ev.warmup):
            api.chat(self._messages(self.samples[i % len(self.samples)]), max_tokens=self.ev.max_tokens,
                     temperature=self.ev.temperature)
        jobs = [(s, rep) for rep in range(self.ev.repeats) for s in self.samples]
        out: list[SampleResult] = []
        with cf.ThreadPoolExecutor(min(self.ev.concurrency, len(jobs))) as pool:
            futs = [pool.submit(self._one, api, s, rep) for s, rep in jobs]
            for f in cf.as_completed(futs):
                out.append(f.result())
                self._sample_rss()
                self.tick(self.t.label)
        if self.serialize:
            self.notes.append(f"{self.t.label}: the server cut answers short when requests overlapped "
                              "(llama-cpp-python's interrupt_requests); those were re-sent one at a time")
        order = {(s.id, rep): i for i, (s, rep) in enumerate(jobs)}
        out.sort(key=lambda r: order[(r.sample_id, r.repeat)])
        return out

    def _api_key(self) -> Optional[str]:
        # only our deployed ports get the key: a URL given by hand may be anyone's server
        key = self.cfg.deployment.llamacpp.api_key
        return key.get_secret_value() if key is not None and self.t.live else None

    def _serve(self, api_url: str, pid: Optional[int], key: Optional[str] = None) -> tuple[list[SampleResult], Optional[str]]:
        """``key``: a temporary server's own key (serving.launch.TempServer); else the deployment's for live ports."""
        timeout = eval_timeout(self.ev, model_bytes(self.t.gguf_path, self.t.lora_path), cpu_budget())
        api = Api(api_url, timeout, api_key=key or self.t.api_key or self._api_key())
        try:
            api.probe(timeout=min(10.0, timeout))
        except EvalError as exc:
            return self._error_rows(exc.one_line()), exc.one_line()
        if pid is None and api.host in ("127.0.0.1", "localhost", "::1"):
            pid = pid_listening_on(api.port)
        self.pid = pid or None   # 0: the registry says the backend is stopped
        self._sample_rss()
        return self._measure(api), None

    def _serve_file(self) -> tuple[list[SampleResult], Optional[str], Optional[int]]:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.t.label)
        log_path = Path(self.cfg.logging.log_dir) / self.t.model / f"eval-server-{safe}.log"
        try:
            lora = Path(self.t.lora_path) if self.t.lora_path else None
            with temp_server(self.cfg, Path(self.t.gguf_path), safe, log_path, lora=lora) as srv:
                # the mode as the runtime decision states it; nothing is inferred from safe_mode
                self.runtime = getattr(srv, "runtime", None)
                rows, err = self._serve(srv.url, srv.pid, getattr(srv, "key", None))
                return rows, err, gpu_memory_bytes(srv.pid)
        except EvalError as exc:
            return self._error_rows(exc.one_line()), exc.one_line(), None

    def run(self) -> tuple[TargetResult, list[SampleResult]]:
        t0 = time.monotonic()
        tr = TargetResult(self.t, n_samples=len(self.samples))
        gpu: Optional[int] = None
        if self.t.base_url:
            if self.t.live:  # the mode the deployed server was started in, as recorded when it started
                self.runtime = _recorded_cpu_mode(self.cfg, self.t.model)
            rows, err = self._serve(self.t.base_url, self.t.pid)
            gpu = gpu_memory_bytes(self.pid) if self.pid else None
        else:
            rows, err, gpu = self._serve_file()
        agg = aggregate(rows)
        size = None
        if self.t.gguf_path:
            with contextlib.suppress(OSError):
                size = os.path.getsize(self.t.gguf_path)
        mib = lambda b: round_opt(b / 2**20, 1) if b else None  # noqa: E731
        agg["memory"] = {"rss_mib": mib(self.peak_rss), "anon_mib": mib(self.peak_anon),
                         "file_pages_mib": mib(self.peak_file), "gpu_mib": mib(gpu) if gpu is not None else None,
                         "file_mib": mib(size), "pid": self.pid, "mode": self.t.mode}
        tr.aggregates = agg
        tr.error = err
        tr.runtime = self.runtime
        tr.status = ("down" if err else "failed" if agg["ok"] == 0 else "partial" if agg["errors"] else "ok")
        tr.seconds = time.monotonic() - t0
        return tr, rows


def _recorded_cpu_mode(cfg: Config, model: str) -> Optional[dict]:
    """The CPU mode the model's deployed backend was started in, as the runtime decided it."""
    reg = record.load(cfg)
    backend = reg.backend_of(reg.models.get(model))
    return backend.cpu_mode.as_dict() if backend is not None and backend.cpu_mode is not None else None


def _config_summary(cfg: Config, samples_path: Optional[str], n_samples: int) -> dict:
    ev = cfg.evaluation
    return {"samples": samples_path, "n_samples": n_samples, "concurrency": ev.concurrency, "warmup": ev.warmup,
            "repeats": ev.repeats, "max_tokens": ev.max_tokens, "temperature": ev.temperature,
            "timeout_s": ev.timeout_s or "auto", "n_ctx": cfg.deployment.llamacpp.n_ctx,
            "n_gpu_layers": cfg.deployment.llamacpp.n_gpu_layers, "include_base": ev.include_base,
            "quality": "mean of the metrics a sample has: exact, contains, ROUGE-L F1, chrF (each 0..1)"}


def evaluate(cfg: Config, models: Optional[Sequence[str]] = None, *,
             samples: Path | str | Sequence[Sample] | None = None, formats: Optional[Sequence[str]] = None,
             targets: Optional[Sequence[EvalTarget]] = None, progress: Optional[ProgressFn] = None,
             output_dir: Path | str | None = None, write: bool = True) -> EvalResult:
    """Evaluate targets (default: everything deployed and quantized for ``models``) and write reports.

    Reports go to ``output_dir`` (default evaluation.output_dir) unless ``write`` is False. A target
    that is down or fails yields error rows; raises only for bad input or nothing to evaluate.
    """
    t0 = time.monotonic()
    created = time.time()
    if samples is None or isinstance(samples, (str, Path)):
        samples_path = str(Path(samples) if samples is not None else cfg.evaluation.samples)
        sample_list = load_samples(samples_path)
    else:
        samples_path, sample_list = None, list(samples)
        if not sample_list:
            raise InputError("no samples to evaluate")
    notes: list[str] = []
    if targets is None:
        target_list, notes = build_targets(cfg, models, formats)
    else:
        target_list = list(targets)
        if models:
            target_list = [t for t in target_list if t.model in models]
        if formats:
            want = {f.strip().upper() for f in formats}
            target_list = [t for t in target_list if t.is_base or t.format in want]
    if not target_list:
        why = "; ".join(notes[:3])
        raise EvalError("nothing to evaluate: no deployed model and no quantized GGUF found"
                        + (f" ({why})" if why else ""),
                        hint="run the pipeline through quantize/deploy first, or check --model / --formats")
    labels = [t.label for t in target_list]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise InputError(f"target labels must be unique; repeated: {', '.join(dup)}")
    for t in target_list:
        if not t.base_url and not t.gguf_path:
            raise InputError(f"target {t.label!r} has neither base_url nor gguf_path")

    plan = [(t, [s for s in sample_list if s.applies_to(t.model)]) for t in target_list]
    for t, ss in plan:
        if not ss:
            notes.append(f"{t.label}: no sample applies to model {t.model}; skipped")
    plan = [(t, ss) for t, ss in plan if ss]
    total = sum(len(ss) * cfg.evaluation.repeats for _, ss in plan)
    done = [0]
    lock = threading.Lock()

    def tick(label: str) -> None:
        with lock:
            done[0] += 1
            n = done[0]
        if progress:
            progress(f"evaluating {label}", n, total)

    target_results: list[TargetResult] = []
    all_rows: list[SampleResult] = []
    for t, ss in plan:
        if progress:
            progress(f"evaluating {t.label}", done[0], total)
        run = _TargetRun(cfg, t, ss, tick)
        tr, rows = run.run()
        notes += [n for n in run.notes if n not in notes]
        target_results.append(tr)
        all_rows += rows
    result = EvalResult(SCHEMA_VERSION, created, time.monotonic() - t0,
                        _config_summary(cfg, samples_path, len(sample_list)), samples_path, sample_list,
                        target_results, all_rows, compare(target_results), notes)
    if write:
        out = Path(output_dir) if output_dir is not None else Path(cfg.evaluation.output_dir)
        write_reports(result, out, charts=cfg.evaluation.charts)
    return result
