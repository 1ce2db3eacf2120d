"""What verify leaves behind: verify.json, the model's history.jsonl, the evaluation.md section and
chart, the CLI table, and the served artifact's verdict for health.

history.jsonl (one line per verified GGUF per run: version, format, sha256, KLD, top-1,
noise/signal, passed) lives under the state folder, so a regression from v1 to v2 stays visible
after work folders are cleaned.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Optional

from ..fsutil import atomic_output, atomic_write_text
from .tuned import CHART_NAME as SIZE_CHART, recipe_lines, write_size_chart

JSON_NAME = "verify.json"
CHART_NAME = "verify_kld.png"
HISTORY_KEYS = ("kld_mean", "kld_p99", "top1", "rms_dp", "noise_to_signal", "passed")


def verify_dir(work_dir: Path, model: str) -> Path:
    return Path(work_dir) / model / "verify"


def history_path(state_dir: Path, model: str) -> Path:
    return Path(state_dir) / "verify" / f"{model}.history.jsonl"


def write_verify_json(path: Path, data: dict) -> Path:
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str))
    return Path(path)


def append_history(path: Path, data: dict) -> None:
    """One line per gated GGUF; appended with O_APPEND so concurrent writers never interleave a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for label, e in data.get("formats", {}).items():
        if not e.get("gated", True):
            continue  # yardsticks (the base GGUF) are never served
        row = {"time": data.get("created_at"), "model": data.get("model"), "version": data.get("version"),
               "format": label, "sha256": e.get("sha256"), "signal": data.get("signal"),
               **{k: e.get(k) for k in HISTORY_KEYS}}
        lines.append(json.dumps(row, default=str) + "\n")
    if not lines:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, "".join(lines).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_history(path: Path) -> list[dict]:
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line from a crash costs that line only
    return rows


def served_verdict(state_dir: Path, model: str, sha256: Optional[str]) -> Optional[dict]:
    """The newest history row for the GGUF with this sha256 (the served file), or None."""
    if not sha256:
        return None
    rows = [r for r in read_history(history_path(state_dir, model)) if r.get("sha256") == sha256]
    return rows[-1] if rows else None


def health_check(state_dir: Path, model: str, sha256: Optional[str]) -> dict:
    """{status: pass|warn|skip, detail, remedy, metrics} for health's ``verify.fidelity`` check.

    Plain data rather than a health Check, so this package does not import health. A served file
    that failed the gate (deployed under on_fail: warn) is a warning; one never verified is a skip.
    """
    row = served_verdict(state_dir, model, sha256)
    if row is None:
        return {"status": "skip", "detail": "the served GGUF was not verified",
                "remedy": f"loradeploy verify --model {model}", "metrics": {}}
    metrics = {k: row.get(k) for k in ("kld_mean", "kld_p99", "top1", "noise_to_signal", "signal")}
    what = (f"{row['format']} {row.get('version')}: KLD {_n(row.get('kld_mean'))}, top-1 {_pct(row.get('top1'))}, "
            f"noise/signal {_n(row.get('noise_to_signal'))}")
    if row.get("passed"):
        return {"status": "pass", "detail": f"verified: {what}", "remedy": "", "metrics": metrics}
    return {"status": "warn", "detail": f"served although it failed verification: {what}",
            "remedy": "deploy a passing format (verify.on_fail: fallback) or re-quantize", "metrics": metrics}


# ----------------------------------------------------------------------------- formatting

def _n(v) -> str:
    return "–" if v is None else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _pct(v) -> str:
    return "–" if v is None else f"{v * 100:.2f} %"


def table_rows(data: dict) -> list[list[str]]:
    sig = data.get("signal_stats") or {}
    rows = [["signal (base, no adapter)", _n(data.get("signal")), _n(sig.get("kld_p99")), _pct(sig.get("top1")),
             _n(sig.get("rms_dp")), "1", "", ""]]
    for label, e in data.get("formats", {}).items():
        beh = behaviour_cell(e)
        verdict = "pass" if e.get("passed") else "yardstick" if not e.get("gated", True) else "FAIL"
        rows.append([label, _n(e.get("kld_mean")), _n(e.get("kld_p99")), _pct(e.get("top1")), _n(e.get("rms_dp")),
                     _n(e.get("noise_to_signal")), beh, verdict])
    return rows


def behaviour_cell(e: dict) -> str:
    """template+stop: FAIL when either failed; a stop check the reference could not decide says so."""
    states = {k: e[k].get("ok") for k in ("template", "stop") if e.get(k)}
    if not states:
        return "–"
    if False in states.values():
        return "FAIL"
    return "ok, stop inconclusive" if states.get("stop", True) is None else "ok"


def stop_line(data: dict) -> str:
    """One line on the teacher-forced stop check, from the reference's side."""
    stop = (data.get("reference") or {}).get("stop")
    if not stop:
        return ""
    if not stop.get("conclusive"):
        return (f"stop check inconclusive: the reference ends none of its {stop.get('turns', 0)} assistant turns "
                "(random or untrained weights), so no GGUF is held to it")
    return f"stop check: the reference ends {stop['ended']} of {stop['turns']} assistant turns; each GGUF must too"


HEADERS = ["format", "KLD mean", "KLD p99", "top-1", "RMS Δp", "noise/signal", "template+stop", "gate"]


def markdown_section(verdicts: Iterable[dict], out_dir: Path, *, charts: bool = True) -> list[str]:
    """The "Fidelity" section of evaluation.md (and its chart, written into ``out_dir``)."""
    verdicts = [v for v in verdicts if v]
    if not verdicts:
        return []
    out = ["## Fidelity (verify)", "",
           "Each GGUF against the unmerged PEFT model on the calibration tokens (llama.cpp's KLD statistics). "
           "*signal* is the base model without the adapter against the same reference: the adapter's own effect. "
           "noise/signal = KLD(format) / signal.", ""]
    for v in verdicts:
        gate = v.get("gate") or {}
        out += [f"**{v.get('model')} {v.get('version')}** — {v.get('n_positions')} positions from "
                f"{v.get('calibration', {}).get('source', '?')}; gate: {gate.get('verdict')}, serves "
                f"{gate.get('served') or 'nothing'}" + (f" ({gate['reason']})" if gate.get("reason") else ""), ""]
        if stop_line(v):
            out += [stop_line(v), ""]
        out += ["| " + " | ".join(HEADERS) + " |", "|:---|" + "---:|" * (len(HEADERS) - 1)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table_rows(v)] + [""]
        out += recipe_lines(v)
    if charts:
        chart = write_chart(verdicts, Path(out_dir) / CHART_NAME)
        if chart:
            out += [f"![KLD per format against the adapter's signal]({chart.name})", ""]
        sized = write_size_chart(verdicts, Path(out_dir) / SIZE_CHART)
        if sized:
            out += [f"![KLD against file size: stock formats and tuned recipes]({sized.name})", ""]
    return out


def write_chart(verdicts: list[dict], path: Path) -> Optional[Path]:
    """Mean KLD per format (log scale, one group per model) with each model's signal as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(v, k, e) for v in verdicts for k, e in v.get("formats", {}).items() if (e.get("kld_mean") or 0) > 0]
    if not pts:
        return None
    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for i, (v, label, e) in enumerate(pts):
        color = "C2" if e.get("passed") else ("C7" if not e.get("gated", True) else "C3")
        ax.bar(i, e["kld_mean"], color=color, edgecolor="black", linewidth=0.5)
        limit = (e.get("limits") or {}).get("max_kld")
        if e.get("gated", True) and limit:
            ax.hlines(limit, i - 0.4, i + 0.4, colors="black", linestyles=":", linewidth=1.2)
    ax.set_xticks(range(len(pts)))
    names = [k if e.get("gated", True) else f"{k} (no adapter)" for _, k, e in pts]
    ax.set_xticklabels([f"{v.get('model')}\n{n}" if len(verdicts) > 1 else n for (v, _, _), n in zip(pts, names)],
                       fontsize=8)
    for j, v in enumerate(verdicts):
        if v.get("signal"):
            ax.axhline(v["signal"], color=f"C{j % 10}", linestyle="--", linewidth=1.2,
                       label=f"{v.get('model')} signal (KLD of the base) {v['signal']:.3g}")
    ax.set_yscale("log")
    ax.set_ylabel("mean KLD against the PEFT reference")
    ax.set_title("Fidelity per format (green pass, red fail, grey the base GGUF; dotted: the limit)")
    ax.grid(True, axis="y", alpha=0.3)
    if any(v.get("signal") for v in verdicts):
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def load_verdicts(work_dir: Path, models: Iterable[str]) -> list[dict]:
    """verify.json of each model that has one."""
    out = []
    for m in models:
        p = verify_dir(work_dir, m) / JSON_NAME
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def verdicts_for_targets(targets: Iterable) -> list[dict]:
    """The verify.json of each evaluated model, found beside its quantized GGUFs (work/MODEL/gguf ->
    work/MODEL/verify) and kept only when it verified one of the evaluated files (by sha256)."""
    by_model: dict[str, set] = {}
    dirs: dict[str, Path] = {}
    for t in targets:
        t = getattr(t, "target", t)  # a TargetResult or an EvalTarget
        by_model.setdefault(t.model, set()).add(getattr(t, "sha256", None))
        path = getattr(t, "gguf_path", None)
        if path and Path(path).parent.name == "gguf":
            dirs.setdefault(t.model, Path(path).parent.parent / "verify")
    out = []
    for model, d in dirs.items():
        try:
            data = json.loads((d / JSON_NAME).read_text())
        except (OSError, ValueError):
            continue
        shas = {e.get("sha256") for e in data.get("formats", {}).values()}
        if shas & by_model[model] or None in by_model[model]:
            out.append(data)
    return out


def evaluation_section(targets: Iterable, out_dir: Path, *, charts: bool = True) -> list[str]:
    """The lines evaluation.md gets for the evaluated targets' models (empty when none was verified)."""
    return markdown_section(verdicts_for_targets(targets), out_dir, charts=charts)


def render(data: dict):
    """A rich table of one model's verdict, for ``loradeploy verify``."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    gate = data.get("gate") or {}
    table = Table(title=f"verify {data.get('model')} {data.get('version')} ({data.get('n_positions')} positions)",
                  title_justify="left", box=None, header_style="bold underline")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in table_rows(data):
        style = "red" if r[-1] == "FAIL" else "green" if r[-1] == "pass" else ""
        table.add_row(*r[:-1], Text(r[-1], style=style))
    style = {"passed": "green", "fallback": "yellow", "warned": "yellow"}.get(gate.get("verdict"), "red")
    line = f"gate: {gate.get('verdict')}; serves {gate.get('served') or 'nothing'}"
    parts = [table, Text(line + (f" — {gate['reason']}" if gate.get("reason") else ""), style=style)]
    if stop_line(data):
        parts.append(Text(stop_line(data), style="yellow" if "inconclusive" in stop_line(data) else "dim"))
    if data.get("path"):
        parts.append(Text(f"report: {data['path']}", style="dim"))
    return Group(*parts)


def render_file(path: str | Path):
    """``render`` of a verify.json on disk."""
    data = json.loads(Path(path).read_text())
    data.setdefault("path", str(path))
    return render(data)


def gate_allows(info: dict) -> bool:
    """True when the verify record (stage info or verify.json) names a format to serve."""
    return bool(info.get("served_format"))


def stamp() -> float:
    return round(time.time(), 3)
