"""A tuned quant's recipe: which type each tensor group gets, in llama.cpp's own --tensor-type-file format.

A group is one quantizable weight (attn_q/k/v/output and ffn_gate/up/down of each layer, token_embd,
output). The file holds whitespace-separated ``regex=type`` entries, the regex lower-cased and searched
in each tensor name, the first match winning (tools/quantize/quantize.cpp ``parse_tensor_type_file``);
no comments (llama-quantize refuses them). Layers that share a kind and a type share one entry
(``^blk\\.(0|3)\\.attn_q\\.weight$=q5_k``), written only in syntax std::regex and Python's re read alike.

Every group is named in the file, so the file does not depend on the base format's own mix (whose
attn_v / ffn_down counters skip the tensors an override names). The base format sets
``general.file_type`` and the type of every tensor the file does not name (none, for a recipe written here).

``file_size`` is the exact size of the GGUF a recipe produces: the header (as llama-quantize writes it,
imatrix keys included) plus each tensor's bytes padded to 32; the header's length does not depend on
the types, so the allocator prices a group's type by its padded bytes alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..engine import make_plan
from ..gguf_out import ALL_TYPE_NAMES, SourceGGUF, Tensor, header, loader_order, pad, read_source, type_name
from ..importance import Importance
from ..rules import FORMATS, Options, allows_quantization, category

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TYPE_BY_NAME = {v.lower(): k for k, v in ALL_TYPE_NAMES.items()}
_LAYER_KIND = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


class RecipeError(ValueError):
    """A recipe file llama-quantize would refuse."""


@dataclass(frozen=True)
class Group:
    name: str            # the tensor, e.g. blk.3.attn_q.weight
    kind: str            # attn_q ... ffn_down, token_embd, output
    layer: int           # -1 outside the blocks
    rows: int
    n_per_row: int

    @property
    def n_elements(self) -> int:
        return self.rows * self.n_per_row


def kind_of(name: str) -> str:
    """A tensor's kind: attn_q ... ffn_down in the blocks, else its category (token_embd, output)."""
    m = _LAYER_KIND.match(name)
    return m.group(2) if m else category(name)


def groups(src: SourceGGUF) -> list[Group]:
    """The quantizable weights of ``src``, in llama.cpp's order."""
    out = []
    for t in loader_order(src.tensors):
        if not allows_quantization(t, Options()):
            continue
        m = _LAYER_KIND.match(t.name)
        out.append(Group(t.name, kind_of(t.name), int(m.group(1)) if m else -1, t.rows, t.n_per_row))
    return out


def evenly(n: int, k: int) -> np.ndarray:
    """Up to ``k`` indices of ``range(n)`` spread evenly, first and last included (all of them when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


@dataclass(frozen=True)
class Recipe:
    base: str                       # the format: general.file_type, and any tensor not named
    types: dict[str, int]           # tensor name -> ggml type

    def __post_init__(self) -> None:
        if self.base not in FORMATS:
            raise RecipeError(f"base format {self.base} (known: {', '.join(FORMATS)})")

    def entries(self) -> list[tuple[str, int]]:
        """(regex, type): one per kind and type over the layers, one per tensor outside them."""
        by: dict[tuple[str, int], list[int]] = {}
        single = []
        for name, ty in self.types.items():
            m = _LAYER_KIND.match(name)
            if m:
                by.setdefault((m.group(2), ty), []).append(int(m.group(1)))
            else:
                single.append((f"^{re.escape(name)}$", ty))
        for (kind, ty), layers in sorted(by.items(), key=lambda kv: (kv[0][0], min(kv[1]))):
            alt = "|".join(str(i) for i in sorted(layers))
            single.append((rf"^blk\.({alt})\.{kind}\.weight$", ty))
        return [(p.lower(), ty) for p, ty in single]

    def overrides(self) -> tuple[tuple[str, int], ...]:
        return tuple(self.entries())

    def text(self) -> str:
        return "".join(f"{p}={type_name(ty).lower()}\n" for p, ty in self.entries())

    def write(self, path: Path) -> Path:
        from ...fsutil import atomic_write_text

        atomic_write_text(Path(path), self.text())
        return Path(path)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ty in self.types.values():
            out[type_name(ty)] = out.get(type_name(ty), 0) + 1
        return out


def parse_entries(text: str) -> tuple[tuple[str, int], ...]:
    """--tensor-type-file's entries: whitespace-separated ``regex=type``, the regex lower-cased."""
    out = []
    for tok in text.split():
        name, sep, ty = tok.partition("=")
        if not sep or not name:
            raise RecipeError(f"malformed tensor type {tok!r}")
        if ty.lower() not in TYPE_BY_NAME:
            raise RecipeError(f"invalid quantization type {ty!r} in {tok!r}")
        try:
            re.compile(name.lower())
        except re.error as exc:
            raise RecipeError(f"bad regex {name!r}: {exc}") from None
        out.append((name.lower(), TYPE_BY_NAME[ty.lower()]))
    return tuple(out)


def read(path: Path, base: str, src_path: Path, imatrix: Optional[Importance] = None) -> Recipe:
    """A --tensor-type-file as the Recipe it makes of ``src_path`` (llama.cpp's rules, fallbacks included)."""
    plan = make_plan(src_path, ["r"], recipes={"r": (base, parse_entries(Path(path).read_text()))},
                     has_imatrix=imatrix is not None)
    names = {g.name for g in groups(plan.src)}
    return Recipe(base, {t.name: ty for t, ty in zip(plan.order, plan.types["r"]) if t.name in names})


@dataclass(frozen=True)
class Sizer:
    """Exact file sizes for one source GGUF (and imatrix, whose keys are in the header)."""
    src: SourceGGUF
    order: tuple[Tensor, ...]
    head: int                       # header bytes, padded: the same for every type assignment
    fixed: int                      # padded bytes of the tensors no group covers (norms, biases)

    @classmethod
    def of(cls, src_path: Path, imatrix: Optional[Importance] = None) -> "Sizer":
        src = read_source(src_path)
        order = loader_order(src.tensors)
        extra = imatrix.kvs() if imatrix is not None else ()
        head, _ = header(src, order, [t.ggml_type for t in order], 0, extra)
        names = {g.name for g in groups(src)}
        fixed = sum(pad(t.nbytes()) for t in order if t.name not in names)
        return cls(src, tuple(order), len(head), fixed)

    def cost(self, name: str, ty: int) -> int:
        """Padded bytes of the tensor ``name`` in type ``ty``."""
        return pad(self.src.by_name[name].nbytes(ty))

    def size(self, types: dict[str, int]) -> int:
        """The file's bytes with ``types`` (every group named)."""
        return self.head + self.fixed + sum(self.cost(n, ty) for n, ty in types.items())

    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.order)


def stock_types(src_path: Path, fmt: str, imatrix: Optional[Importance] = None) -> dict[str, int]:
    """Each group's type in the stock format ``fmt`` (llama.cpp's own mix)."""
    plan = make_plan(src_path, [fmt], has_imatrix=imatrix is not None)
    names = {g.name for g in groups(plan.src)}
    return {t.name: ty for t, ty in zip(plan.order, plan.types[fmt]) if t.name in names}


@dataclass(frozen=True)
class DryRun:
    types: dict[str, int]        # tensor -> the type llama-quantize would write
    quant_mib: float             # its "quant size": tensor bytes, unpadded, in MiB to 2 decimals
    bpw: float


_DRY_LINE = re.compile(r"\]\s+(\S+)\s+- \[.*?\], type =\s*(\S+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\S+)\))?")
_DRY_TOTAL = re.compile(r"quant size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)")


def dry_run(src_path: Path, base: str, recipe_file: Optional[Path], imatrix: Optional[Path] = None, *,
            log_path: Optional[Path] = None) -> DryRun:
    """``llama-quantize --dry-run [--tensor-type-file R] [--imatrix I] SRC BASE``, read back."""
    from ...tools.proc import run
    from ..imatrix import quantize_argv

    types: dict[str, int] = {}
    total: list[tuple[float, float]] = []

    def on_line(line: str) -> None:
        if m := _DRY_LINE.search(line):
            types[m.group(1)] = TYPE_BY_NAME[(m.group(3) or m.group(2)).lower()]
        elif m := _DRY_TOTAL.search(line):
            total.append((float(m.group(1)), float(m.group(2))))

    run(quantize_argv(src_path, None, base, threads=1, imatrix=imatrix, tensor_type_file=recipe_file, dry_run=True),
        log_path=log_path, what="llama-quantize --dry-run", on_line=on_line)
    if not total:
        raise RecipeError("llama-quantize --dry-run printed no quant size")
    return DryRun(types, *total[-1])


def file_size(src_path: Path, recipe: Recipe, imatrix: Optional[Importance] = None) -> int:
    """The bytes of the GGUF ``llama-quantize --tensor-type-file`` writes for ``recipe``."""
    plan = make_plan(src_path, ["r"], recipes={"r": (recipe.base, recipe.overrides())},
                     has_imatrix=imatrix is not None)
    extra = imatrix.kvs() if imatrix is not None else ()
    head, sizes = header(plan.src, plan.order, plan.types["r"], plan.ftypes["r"], extra)
    return len(head) + sum(pad(s) for s in sizes)
