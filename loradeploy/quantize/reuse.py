"""Which tensors of a merged model are worth keeping in the tensor cache: those the adapter left alone.

A tensor the adapter changed has bytes no other adapter or version produces, so caching it only
costs disk (an all-linear 7B merge: 16 GB of quantized tensors nobody reads again). The ones it left
alone (embeddings, norms, the output, unadapted layers) are the base's own bytes, shared by every
adapter on that base. Convert knows which tensors the merge changed; it records their GGUF names
(``adapter_tensors`` in its stage info) and quantize caches every other tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

from .gguf_out import read_source


def changed_hf_names(pairs: Iterable[str], full_tensors: Iterable[str]) -> set[str]:
    """Base tensor names the merge changes: each LoRA module's weight and every replaced tensor."""
    return {f"{m}.weight" for m in pairs} | set(full_tensors)


def gguf_names(gguf: Path, hf_names: Iterable[str]) -> Optional[dict[str, Optional[str]]]:
    """Each of ``hf_names`` -> its tensor's name in ``gguf`` (None where it has none there), through the
    converter's own name map; None for an architecture the map does not know."""
    import gguf as gguf_py

    src = read_source(Path(gguf))
    archs = {name: arch for arch, name in gguf_py.MODEL_ARCH_NAMES.items()}
    if src.arch not in archs:
        return None
    names = gguf_py.get_tensor_name_map(archs[src.arch], int(src.get(f"{src.arch}.block_count", 0) or 0))
    out: dict[str, Optional[str]] = {}
    for hf in sorted(hf_names):
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        out[hf] = g if g is not None and g in src.by_name else None
    return out


def adapter_tensors(gguf: Path, hf_names: Iterable[str]) -> Optional[list[str]]:
    """The GGUF names of ``hf_names`` in ``gguf``; None when one of them has no tensor there (a name
    the map does not know: nothing can be said to be untouched)."""
    mapped = gguf_names(gguf, hf_names)
    if mapped is None:
        return None
    out = []
    for hf, g in mapped.items():
        if g is None:
            if hf == "lm_head.weight" and "output.weight" not in read_source(Path(gguf)).by_name:
                continue  # tied to the embeddings, which the adapter's embed_tokens entry names
            return None
        out.append(g)
    return out


def reusable(changed: Optional[Iterable[str]]) -> Callable[[str], bool]:
    """The engine's cache filter: tensors outside ``changed``; none at all when that is unknown."""
    if changed is None:
        return lambda name: False
    skip = frozenset(changed)
    return lambda name: name not in skip
