"""The streamed PEFT reference: base + adapter, unmerged, one decoder layer at a time, in float32.

The model is a skeleton on the meta device (transformers' own classes for the model type, so the
decoder layer, rotary embedding, masks and norms are the library's math); each layer is filled from
the safetensors, run for every calibration sequence twice, adapter on and adapter off (the two
hidden-state streams share the load), then dropped. The final norm and the head follow over rows of
positions and chunks of the vocabulary, so a 152k x 3584 head is never float32 whole. Peak memory:
one layer in float32, both streams' hidden states, one block of logits, one head chunk.

Masks and position embeddings come from the library too: the model's own ``forward`` runs once per
sequence length with the layers replaced by recorders that keep the arguments each layer is called
with (``_Recorder``), and stops before the norm.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import VerifyError
from ..merge.hf_folder import load_adapter_info, load_base_info
from .weights import AdapterWeights, LayerLora, Weights, free_layer, load_layer, release_freed

Progress = Callable[[str, float, float], None]
SUPPORTED = ("llama", "qwen2")            # model types tested equal to the in-memory peft reference
HEAD_BLOCK_BYTES = 256 * 2**20            # logits of one block of positions, both streams, float32
HEAD_CHUNK_BYTES = 64 * 2**20             # one vocabulary chunk of the head in float32


class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer ``i``: keeps the keyword arguments the model passes it."""

    def __init__(self, i: int, sink: dict, last: bool):
        super().__init__()
        self.i, self.sink, self.last = i, sink, last

    def forward(self, hidden_states, *args, **kwargs):
        self.sink[self.i] = kwargs
        if self.last:
            raise _Stop
        return hidden_states


def supported(model_type: str) -> bool:
    return model_type in SUPPORTED


def head_name(weights: Weights, config) -> str:
    if "lm_head.weight" in weights and not getattr(config, "tie_word_embeddings", False):
        return "lm_head.weight"
    return "model.embed_tokens.weight"


def head_rows(vocab: int) -> int:
    """Positions per block of logits: both streams' (rows x vocab) float32 within HEAD_BLOCK_BYTES."""
    return max(16, HEAD_BLOCK_BYTES // (vocab * 4 * 2))


def head_chunk(vocab: int, hidden: int) -> int:
    return max(256, min(vocab, HEAD_CHUNK_BYTES // (hidden * 4)))


class StreamedModel:
    """The skeleton, the base's and the adapter's weights, and the passes over them."""

    def __init__(self, base_dir: Path, adapter_dir: Path):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = AutoConfig.from_pretrained(str(base_dir))
        mtype = getattr(self.config, "model_type", "?")
        if not supported(mtype):
            raise VerifyError(f"the streamed reference does not support model type {mtype!r} "
                              f"(supported: {', '.join(SUPPORTED)})", hint="set verify.reference: memory")
        info = load_adapter_info(Path(adapter_dir))
        if not info.plain_lora:
            raise VerifyError(f"adapter {adapter_dir} is not a plain LoRA (DoRA or extra weights); the streamed "
                              "reference cannot apply it", hint="set verify.reference: memory")
        self.base = Weights(load_base_info(Path(base_dir)).tensors)
        self.adapter = AdapterWeights(info)
        self.config.use_cache = False
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        inner = self.skeleton.model
        inner.rotary_emb = type(inner.rotary_emb)(config=self.skeleton.config)   # tiny; real buffers
        self.layers = inner.layers
        self.n_layers = len(self.layers)
        self.sink: dict[int, dict] = {}
        inner.layers = torch.nn.ModuleList(_Recorder(i, self.sink, i == self.n_layers - 1)
                                           for i in range(self.n_layers))
        self.hidden = int(self.config.hidden_size)
        self.head = head_name(self.base, self.config)
        self.vocab = self.base.shape(self.head)[0]

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    # ------------------------------------------------------------------ inputs

    def layer_kwargs(self, length: int) -> list[dict]:
        """What the model's own forward hands each layer for a sequence of ``length`` tokens."""
        self.sink.clear()
        try:
            self.skeleton.model(inputs_embeds=torch.zeros(1, length, self.hidden), use_cache=False)
        except _Stop:
            pass
        return [self.sink[i] for i in range(self.n_layers)]

    def embed(self, ids: torch.Tensor, *, adapter: bool) -> torch.Tensor:
        name = "model.embed_tokens.weight"
        full = self.adapter.replaced(name) if adapter else None
        x = self.adapter.file.gather(full, ids) if full else self.base.gather(name, ids)
        lora = self.adapter.lora("model.embed_tokens") if adapter else None
        return x + lora.embed(ids) if lora is not None else x

    # ------------------------------------------------------------------ layers

    def _replacements(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.layers[0].state_dict():
            full = self.adapter.replaced(prefix + key)
            if full:
                out[key] = self.adapter.file.rows(full)
        return out

    def run_layers(self, streams: list[list[torch.Tensor]], kwargs: list[list[dict]],
                   progress: Optional[Progress] = None) -> None:
        """streams[0] adapter on, streams[1] adapter off: each layer read once, run on both, freed."""
        n_seq = len(streams[0])
        for i in range(self.n_layers):
            prefix = f"model.layers.{i}."
            layer = load_layer(self.layers[i], prefix, self.base)
            lora = LayerLora(layer, prefix, self.adapter)
            swap = self._replacements(prefix)   # modules_to_save inside a layer: the adapter's own tensors
            base_params = {k: layer.get_parameter(k) for k in swap}
            try:
                for s in range(n_seq):
                    if progress:
                        progress(f"reference: layer {i + 1}/{self.n_layers}", i * n_seq + s, self.n_layers * n_seq)
                    for on, stream in ((False, streams[1]), (True, streams[0])):
                        lora.on = on
                        if swap:
                            layer.load_state_dict(swap if on else base_params, strict=False, assign=True)
                        out = layer(stream[s], **kwargs[s][i])
                        stream[s] = out[0] if isinstance(out, tuple) else out
            finally:
                lora.remove()
                free_layer(layer)
        if progress:
            progress("reference: layers", self.n_layers * n_seq, self.n_layers * n_seq)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        norm = load_layer(self.skeleton.model.norm, "model.norm.", self.base)
        try:
            return norm(h)
        finally:
            free_layer(norm)

    # ------------------------------------------------------------------ head

    def logits(self, h_on: torch.Tensor, h_off: torch.Tensor, *, progress: Optional[Progress] = None):
        """Yields (lo, ref logits, base logits) for blocks of positions; the head is read in vocabulary
        chunks for each block (file pages, not this process's memory, hold it between blocks)."""
        n, vocab = h_on.shape[0], self.vocab
        rows, chunk = head_rows(vocab), head_chunk(vocab, self.hidden)
        full = self.adapter.replaced("lm_head.weight")     # modules_to_save: the adapter's own head
        lora = self.adapter.lora("lm_head")
        on_a = F.linear(h_on, lora.a) if lora is not None else None
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            ref = torch.empty((hi - lo, vocab), dtype=torch.float32)
            base = torch.empty((hi - lo, vocab), dtype=torch.float32)
            for c in range(0, vocab, chunk):
                ce = min(vocab, c + chunk)
                w = self.base.rows(self.head, c, ce)
                base[:, c:ce] = F.linear(h_off[lo:hi], w)
                if full:
                    w = self.adapter.file.rows(full, c, ce)
                ref[:, c:ce] = F.linear(h_on[lo:hi], w)
                if on_a is not None:
                    ref[:, c:ce] += F.linear(on_a[lo:hi], lora.b[c:ce]) * lora.scale
                del w
            if progress:
                progress("reference: logits", hi, n)
            yield lo, ref, base
            del ref, base
            release_freed()


def streamed_hidden(model: StreamedModel, sequences: Sequence[list[int]], *,
                    progress: Optional[Progress] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The final-norm hidden states of every scored position (all but each sequence's last token), adapter
    on and off, stacked in calibration order."""
    on, off, kwargs = [], [], []
    for seq in sequences:
        ids = torch.tensor([seq])
        on.append(model.embed(ids, adapter=True))
        off.append(model.embed(ids, adapter=False))
        kwargs.append(model.layer_kwargs(len(seq)))
    model.run_layers([on, off], kwargs, progress)
    del kwargs
    h_on = torch.cat([model.final_norm(h)[0, :-1] for h in on])
    on.clear()
    h_off = torch.cat([model.final_norm(h)[0, :-1] for h in off])
    return h_on, h_off
