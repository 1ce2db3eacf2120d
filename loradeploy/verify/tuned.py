"""Tuned formats (issue 20) in verify.json and the report: each one's budget and recipe, how to rebuild it
with stock llama.cpp, and a chart of KLD against file size (stock formats as points, tuned budgets as a curve)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config.tuned import is_tuned
from ..fsutil import atomic_output

CHART_NAME = "verify_kld_size.png"


def recipe_entry(label: str, gguf: Path) -> Optional[dict]:
    """What verify.json keeps of a tuned GGUF: its budget, the recipe beside it, the command that rebuilds it."""
    from ..config import QUANT_TYPES
    from ..quantize.imatrix import applied_imatrix
    from ..quantize.tuned.build import recipe_path
    from .gate import sized_after

    if not is_tuned(label):
        return None
    rfile = recipe_path(gguf)
    if not rfile.is_file():
        return {"budget": label, "recipe_file": None, "recipe": None}
    from gguf import GGUFReader

    ft = GGUFReader(str(gguf)).fields.get("general.file_type")
    ftype = int(ft.parts[ft.data[0]][0]) if ft is not None else None
    base = next((k for k, v in QUANT_TYPES.items() if v == ftype), sized_after(label))
    im = applied_imatrix(gguf)
    return {"budget": label, "sized_after": sized_after(label), "base": base, "recipe_file": str(rfile),
            "recipe": rfile.read_text(), "imatrix": im,
            "rebuild": f"llama-quantize --tensor-type-file {rfile.name}" + (f" --imatrix {im}" if im else "")
            + f" F16.gguf {Path(gguf).name} {base}"}


def recipe_lines(verdict: dict) -> list[str]:
    """Markdown: one line per tuned format of a verify.json."""
    out = []
    for label, e in verdict.get("formats", {}).items():
        t = e.get("tuned")
        if not t or not t.get("recipe"):
            continue
        n = len(t["recipe"].split())
        out.append(f"- **{label}**: at most {t['sized_after']}'s size, {e.get('size') or 0:,} bytes; recipe "
                   f"`{Path(t['recipe_file']).name}` ({n} entries, base {t['base']}); rebuild with stock llama.cpp: "
                   f"`{t['rebuild']}`")
    return out + [""] if out else []


def write_size_chart(verdicts: list[dict], path: Path) -> Optional[Path]:
    """Mean KLD (log) against file size per model: stock formats as labelled points, tuned ones as a curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def pts(v: dict, tuned: bool) -> list[tuple[int, float, str]]:
        return sorted((e["size"], e["kld_mean"], k) for k, e in v.get("formats", {}).items()
                      if e.get("size") and (e.get("kld_mean") or 0) > 0 and e.get("gated", True) is not False
                      and is_tuned(k) == tuned)

    if not any(pts(v, True) for v in verdicts):
        return None
    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for j, v in enumerate(verdicts):
        color, who = f"C{j % 10}", v.get("model") if len(verdicts) > 1 else None
        stock, tuned = pts(v, False), pts(v, True)
        ax.scatter([s / 2**20 for s, _, _ in stock], [k for _, k, _ in stock], color=color, marker="o",
                   label=f"{who + ' ' if who else ''}stock formats")
        for s, k, name in stock:
            ax.annotate(name, (s / 2**20, k), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.plot([s / 2**20 for s, _, _ in tuned], [k for _, k, _ in tuned], color=color, marker="D",
                linestyle="-", label=f"{who + ' ' if who else ''}tuned budgets")
        for s, k, name in tuned:
            ax.annotate(name, (s / 2**20, k), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KLD against the PEFT reference")
    ax.set_title("KLD against file size: stock formats and tuned recipes")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
