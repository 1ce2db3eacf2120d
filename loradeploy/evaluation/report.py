"""Evaluation reports: evaluation.json, evaluation.md and PNG charts, plus a rich table for the CLI."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

from ..fsutil import atomic_output, atomic_write_text
from ..verify.report import evaluation_section
from .results import EvalResult

JSON_NAME = "evaluation.json"
MD_NAME = "evaluation.md"
CHARTS = {
    "quality_vs_latency": ("quality_vs_latency.png", "Quality against median latency"),
    "size_vs_quality": ("size_vs_quality.png", "File size against quality"),
    "tokens_per_s": ("tokens_per_s.png", "Generation speed (tokens/s)"),
}
MAX_RESPONSE_SAMPLES = 30
_MODE_SOURCES = {"probe": "from the probe", "cache": "from the cache", "env": "from the environment"}


def write_reports(result: EvalResult, out_dir: Path | str, *, charts: bool = True) -> dict:
    """Write the JSON, the Markdown and (when asked) the charts; returns and records their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chart_paths: dict[str, Path] = {}
    if charts:
        chart_paths = write_charts(result, out)
        missing = [k for k in CHARTS if k not in chart_paths]
        if missing:
            result.notes.append(f"charts without data were not drawn: {', '.join(missing)}")
    result.reports = {"json": str(out / JSON_NAME), "markdown": str(out / MD_NAME),
                      "charts": {k: str(p) for k, p in chart_paths.items()}}
    fidelity = evaluation_section(result.targets, out, charts=charts)  # verify's table and KLD chart, if verified
    atomic_write_text(out / MD_NAME, render_markdown(result, {k: p.name for k, p in chart_paths.items()}, fidelity))
    atomic_write_text(out / JSON_NAME, json.dumps(result.to_dict(), indent=2, default=str))
    return result.reports


# ============================================================================= formatting

def _f(v, nd: int = 3, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{v * 100:.1f}"
    return f"{v:.{nd}f}"


def _delta(v) -> str:
    return "–" if v is None else f"{v * 100:+.1f}"


def _cell(text, limit: int = 0) -> str:
    s = " ".join(str(text).split())
    if limit and len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("|", "\\|") or " "


def _table(headers: list[str], rows: list[list[str]], align: Optional[list[str]] = None) -> str:
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _label(row: dict) -> str:
    tags = []
    if row.get("live"):
        tags.append("live")
    if row.get("is_base"):
        tags.append("no adapter")
    return row["label"] + (f" ({', '.join(tags)})" if tags else "")


def runtime_line(runtime: Optional[dict]) -> Optional[str]:
    """``llama.cpp CPU mode: safe (from the cache: WHY)``, with the runtime decision's own words.

    None without a decided mode: the report then says nothing about the mode rather than guess.
    """
    if not runtime or not runtime.get("mode"):
        return None
    source = runtime.get("source")
    where = _MODE_SOURCES.get(source, f"from {source}") if source else ""
    why = " ".join(str(runtime.get("why") or "").split())
    detail = ": ".join(p for p in (where, why) if p)
    return f"llama.cpp CPU mode: {runtime['mode']}" + (f" ({detail})" if detail else "")


def runtime_lines(result: EvalResult) -> list[tuple[Optional[str], str]]:
    """(target label or None for the whole run, line); a target is named only where it differs."""
    out: list[tuple[Optional[str], str]] = []
    run_line = runtime_line(result.runtime)
    if run_line:
        out.append((None, run_line))
    for t in result.targets:
        line = runtime_line(t.runtime)
        if line and line != run_line:
            out.append((t.target.label, line))
    return out


# ============================================================================= markdown

def render_markdown(result: EvalResult, charts: dict[str, str], fidelity: Sequence[str] = ()) -> str:
    c = result.config
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(result.created_at))
    out = ["# Evaluation report", "",
           f"{when} · {c.get('n_samples')} samples from `{result.samples_path or 'given samples'}` · "
           f"{len(result.targets)} targets · concurrency {c.get('concurrency')} · warm-up {c.get('warmup')} · "
           f"repeats {c.get('repeats')} · max_tokens {c.get('max_tokens')} · temperature {c.get('temperature')} · "
           f"{result.seconds:.1f}s", "",
           "Quality scores are percentages (0–100). *Quality* is the mean, per answer, of the metrics the sample "
           "defines: exact match, contains (expected strings found), ROUGE-L F1 and chrF against the reference. "
           "Δ best is the quality lost to the best format of the same model; Δ base is the gain over the base "
           "model without the adapter. Latency is measured at the client, queueing included.", ""]
    if result.notes:
        out += ["**Notes**", ""] + [f"- {n}" for n in result.notes] + [""]
    modes = runtime_lines(result)
    if modes:
        out += ["**Runtime**", ""]
        out += [f"- {_cell(label)}: {line}" if label else f"- {line}" for label, line in modes] + [""]

    out += ["## Comparison", ""]
    rows = []
    for r in result.comparison:
        status = f"{r['status']}: {_cell(r['reason'], 120)}" if r.get("reason") else r["status"]
        rows.append([_cell(_label(r)), status, _f(r["quality"], pct=True), _delta(r["delta_vs_best"]),
                     _delta(r["delta_vs_base"]), _f(r["exact"], pct=True), _f(r["contains"], pct=True),
                     _f(r["rouge_l"], pct=True), _f(r["chrf"], pct=True), _f(r["latency_p50_s"]),
                     _f(r["ttft_p50_s"]), _f(r["gen_tokens_per_s"], 1), _f(r["file_mib"], 1),
                     _f(r["rss_mib"], 0), f"{r['errors']}/{r['requests']}"])
    out += [_table(["target", "status", "quality", "Δ best", "Δ base", "exact", "contains", "ROUGE-L", "chrF",
                    "p50 s", "TTFT p50 s", "gen tok/s", "file MiB", "RSS MiB", "errors"], rows), ""]
    best = {}
    for r in result.comparison:
        if r["best_format"] and r["model"] not in best:
            best[r["model"]] = r["best_format"]
    if best:
        out += ["Best format per model: " + ", ".join(f"**{m}** {f}" for m, f in best.items()), ""]

    if charts:
        out += ["## Charts", ""]
        for key, (_, title) in CHARTS.items():
            if key in charts:
                out += [f"![{title}]({charts[key]})", ""]

    out += list(fidelity)
    out += ["## Latency and throughput", ""]
    rows = []
    for t in result.targets:
        a = t.aggregates
        lat, ttft = a.get("latency_s", {}), a.get("ttft_s", {})
        rows.append([_cell(t.target.label), _f(lat.get("mean")), _f(lat.get("p50")), _f(lat.get("p95")),
                     _f(ttft.get("mean")), _f(ttft.get("p50")), _f(ttft.get("p95")),
                     _f(a.get("gen_tokens_per_s"), 1), a.get("gen_tokens_per_s_source") or "–",
                     _f(a.get("e2e_tokens_per_s"), 1), _f(a.get("prompt_tokens_per_s"), 1),
                     _f(a.get("completion_tokens_mean"), 1)])
    out += [_table(["target", "latency mean s", "p50 s", "p95 s", "TTFT mean s", "TTFT p50 s", "TTFT p95 s",
                    "gen tok/s", "measured from", "end-to-end tok/s", "prompt tok/s", "tokens/answer"], rows), "",
            "Generation tokens/s comes from the server's timings when it reports them, else from when streamed "
            "tokens arrive; when they arrive in one burst it falls back to the end-to-end rate (tokens over "
            "request time). Prompt tokens/s is shown where the server reports timings (llama.cpp's own server "
            "does).", ""]

    out += ["## Memory", ""]
    rows = []
    for t in result.targets:
        m = t.aggregates.get("memory", {})
        rows.append([_cell(t.target.label), _f(m.get("file_mib"), 1), _f(m.get("rss_mib"), 1),
                     _f(m.get("anon_mib"), 1), _f(m.get("file_pages_mib"), 1), _f(m.get("gpu_mib"), 1),
                     str(m.get("pid") or "–"),
                     _cell(Path(t.target.gguf_path).name if t.target.gguf_path else "–")])
    out += [_table(["target", "file MiB", "server RSS MiB (peak)", "anonymous MiB", "file pages MiB (reclaimable)",
                    "GPU MiB", "pid", "file"], rows, ["l", "r", "r", "r", "r", "r", "r", "l"]), ""]

    tag_rows = []
    for t in result.targets:
        for tag, q in t.aggregates.get("tags", {}).items():
            tag_rows.append([_cell(tag), _cell(t.target.label), str(q["requests"]), str(q["errors"]),
                             _f(q["quality"], pct=True), _f(q["exact"], pct=True), _f(q["contains"], pct=True),
                             _f(q["rouge_l"], pct=True), _f(q["chrf"], pct=True)])
    if tag_rows:
        tag_rows.sort(key=lambda r: r[0])
        out += ["## Quality by tag", "",
                _table(["tag", "target", "answers", "errors", "quality", "exact", "contains", "ROUGE-L", "chrF"],
                       tag_rows, ["l", "l"] + ["r"] * 7), ""]

    errs = [r for r in result.results if r.error]
    if errs:
        out += ["## Errors", ""]
        rows = [[_cell(r.target), _cell(r.sample_id), str(r.repeat), _cell(r.error, 160)] for r in errs[:60]]
        out += [_table(["target", "sample", "repeat", "error"], rows, ["l", "l", "r", "l"]), ""]
        if len(errs) > 60:
            out += [f"… and {len(errs) - 60} more in {JSON_NAME}.", ""]

    out += ["## Answers", "", f"The first repeat of up to {MAX_RESPONSE_SAMPLES} samples; every answer is in "
            f"{JSON_NAME}.", ""]
    first = {(r.target, r.sample_id): r for r in result.results if r.repeat == 0}
    for s in result.samples[:MAX_RESPONSE_SAMPLES]:
        prompt = s.messages[-1]["content"]
        out += [f"**{_cell(s.id)}** — {_cell(prompt, 160)}" +
                (f" → reference: `{_cell(s.reference, 120)}`" if s.reference is not None else ""), ""]
        rows = []
        for t in result.targets:
            r = first.get((t.target.label, s.id))
            if r is None:
                continue
            text = f"*error:* {_cell(r.error, 120)}" if r.error else f"`{_cell(r.response, 120)}`"
            rows.append([_cell(t.target.label), text, _f(r.quality, pct=True)])
        if rows:
            out += [_table(["target", "answer", "quality"], rows, ["l", "l", "r"]), ""]
    return "\n".join(out).rstrip() + "\n"


# ============================================================================= charts

def _points(result: EvalResult, x_key: str, y_key: str) -> list[dict]:
    return [r for r in result.comparison if r.get(x_key) is not None and r.get(y_key) is not None]


def _scatter(path: Path, pts: list[dict], x_key: str, y_key: str, xlabel: str, ylabel: str, title: str,
             *, y_pct: bool = True, x_pct: bool = False) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    models = sorted({p["model"] for p in pts})
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    seen = set()
    for p in pts:
        x = p[x_key] * (100 if x_pct else 1)
        y = p[y_key] * (100 if y_pct else 1)
        marker = "X" if p["is_base"] else ("*" if p["live"] else "o")
        label = p["model"] if p["model"] not in seen else None
        seen.add(p["model"])
        ax.scatter([x], [y], s=140 if marker == "*" else 70, marker=marker, color=colors[p["model"]],
                   label=label, edgecolors="black", linewidths=0.5, zorder=3)
        text = "base" if p["is_base"] else (p["format"] or p["label"])
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    ax.margins(x=0.12)   # room for the labels of the outermost points
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if y_pct:
        ax.set_ylim(min(-2, ax.get_ylim()[0]), max(102, ax.get_ylim()[1]))
    ax.legend(loc="best", fontsize=8, title="model  (★ live, ✕ base)", title_fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def _bars(path: Path, result: EvalResult) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in result.comparison if r.get("gen_tokens_per_s")]
    if not rows:
        return False
    fig = Figure(figsize=(7.5, 0.8 + 0.45 * len(rows)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    models = sorted({r["model"] for r in rows})
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    labels = [r["label"] for r in rows]
    vals = [r["gen_tokens_per_s"] for r in rows]
    bars = ax.barh(range(len(rows)), vals, color=[colors[r["model"]] for r in rows],
                   hatch=None, edgecolor="black", linewidth=0.5)
    for b, r in zip(bars, rows):
        if r["is_base"]:
            b.set_hatch("//")
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {b.get_width():.1f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens per second")
    ax.set_title(CHARTS["tokens_per_s"][1])
    ax.set_xlim(0, max(vals) * 1.18)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return True


def write_charts(result: EvalResult, out_dir: Path) -> dict[str, Path]:
    """Draw each chart that has data; returns {chart key: path}."""
    out: dict[str, Path] = {}
    pts = _points(result, "latency_p50_s", "quality")
    if pts:
        p = out_dir / CHARTS["quality_vs_latency"][0]
        _scatter(p, pts, "latency_p50_s", "quality", "median latency per answer (s)", "quality (%)",
                 CHARTS["quality_vs_latency"][1])
        out["quality_vs_latency"] = p
    pts = _points(result, "file_mib", "quality")
    if pts:
        p = out_dir / CHARTS["size_vs_quality"][0]
        _scatter(p, pts, "file_mib", "quality", "GGUF file size (MiB)", "quality (%)", CHARTS["size_vs_quality"][1])
        out["size_vs_quality"] = p
    p = out_dir / CHARTS["tokens_per_s"][0]
    if _bars(p, result):
        out["tokens_per_s"] = p
    return out


# ============================================================================= CLI table

def render(result: EvalResult):
    """A rich renderable: the comparison table, then notes and where the reports are."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    # the terminal gets the headline columns; the Markdown report has all of them
    table = Table(title="Evaluation (quality in %; * = live)", title_justify="left", box=None, pad_edge=False,
                  header_style="bold underline")
    table.add_column("target", no_wrap=True)
    for name in ("status", "quality", "Δ best", "Δ base", "p50 s", "tok/s", "MiB", "errors"):
        table.add_column(name, justify="left" if name == "status" else "right", no_wrap=True)
    style = {"ok": "green", "partial": "yellow", "failed": "red", "down": "red"}
    for r in result.comparison:
        table.add_row(r["label"] + (" *" if r["live"] else ""), Text(r["status"], style=style.get(r["status"], "")), _f(r["quality"], pct=True),
                      _delta(r["delta_vs_best"]), _delta(r["delta_vs_base"]), _f(r["latency_p50_s"], 2),
                      _f(r["gen_tokens_per_s"], 0), _f(r["file_mib"], 0 if (r["file_mib"] or 0) >= 100 else 1),
                      f"{r['errors']}/{r['requests']}")
    parts: list = [table]
    for n in result.notes:
        parts.append(Text(f"note: {n}", style="dim"))
    for label, line in runtime_lines(result):
        parts.append(Text(f"{label}: {line}" if label else line, style="dim"))
    for t in result.targets:
        if t.error:
            parts.append(Text(f"{t.target.label}: {t.error}", style="red"))
    if result.reports:
        parts.append(Text(f"report: {result.reports.get('markdown')}  (data: {result.reports.get('json')})"))
    return Group(*parts)
