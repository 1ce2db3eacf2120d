"""Scoring a GGUF of this model against fixed reference log-probabilities, cheaply (issue 20's search).

The measured step scores a dozen files; each score is one llama.cpp forward pass, so its cost is what the
search costs. Three things keep it small:
- **one batch**: the search's sequences go through llama.cpp as one batch of several sequences (one
  decode call, one graph), not one call per sequence;
- **shared prefixes once**: the calibration conversations all open with the same system prompt and chat
  template; the sequences are laid out as a prefix tree, a token shared by several sequences is one batch
  entry carrying all their sequence ids (llama.cpp's unified KV cache), so the common prefix is computed once;
- **few scored positions**: logits are asked only at up to ``max_positions`` positions spread evenly over
  the tree (llama.cpp then computes the output matrix for those rows alone), and a shared prefix's position
  is scored once, not once per sequence.

The forward pass is capped at ``max_tokens`` tree nodes. Every file is scored at the same positions, so
differences between files are paired. ``heldout`` picks the search's sequences apart from verify's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MAX_TOKENS = 1024         # forward-pass tokens (prefix-tree nodes) per score
MAX_POSITIONS = 1024      # positions whose logits are compared ...
MIN_POSITIONS = 192       # ... however large the vocabulary
POSITION_BYTES = 64 << 20  # ... else as many as keep the reference's float32 log-probabilities this small
MIN_TOKENS = 96           # the fewest forward-pass tokens, however large the model
TOKEN_FLOPS = 4e10        # above ~100M weights the forward pass is capped near this many weight-tokens
MIN_HELDOUT = 256         # fewer held-out tokens than this: the search reads verify's own text (recorded)


@dataclass(frozen=True)
class Layout:
    """The prefix tree of the chosen sequences, as one llama.cpp batch."""
    tokens: np.ndarray            # (n,) per node, in position order within each branch
    pos: np.ndarray               # (n,)
    seq_ids: list[tuple[int, ...]]   # per node: the sequences through it
    out: np.ndarray               # nodes whose logits are scored, ascending
    nxt: np.ndarray               # per scored node: the token after it (its first child)
    n_seq: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


def layout(sequences: Sequence[Sequence[int]], *, max_tokens: int = MAX_TOKENS,
           max_positions: int = MAX_POSITIONS, max_seq: int = 64) -> Layout:
    """The prefix tree of ``sequences`` (taken in order, the last one cut to fit ``max_tokens`` nodes)."""
    root: dict[int, int] = {}
    children: list[dict[int, int]] = []
    tokens, pos, ids = [], [], []
    first_child: list[int] = []
    n_seq = 0
    for s in sequences:
        if len(s) < 2 or n_seq >= max_seq or len(tokens) >= max_tokens:
            continue
        node, sid = -1, n_seq
        for i, t in enumerate(s):
            kids = children[node] if node >= 0 else root
            nxt = kids.get(int(t))
            if nxt is None:
                if len(tokens) >= max_tokens:
                    break
                nxt = len(tokens)
                kids[int(t)] = nxt
                tokens.append(int(t))
                pos.append(i)
                ids.append([])
                children.append({})
                first_child.append(-1)
            ids[nxt].append(sid)
            if node >= 0 and first_child[node] < 0:
                first_child[node] = nxt
            node = nxt
        n_seq += 1
    scored = np.array([i for i, c in enumerate(first_child) if c >= 0], dtype=np.int64)
    if scored.size > max_positions:
        scored = scored[np.unique(np.linspace(0, scored.size - 1, max_positions).round().astype(np.int64))]
    toks = np.array(tokens, dtype=np.int64)
    return Layout(toks, np.array(pos, dtype=np.int64), [tuple(x) for x in ids], scored,
                  toks[[first_child[i] for i in scored]] if scored.size else np.zeros(0, np.int64), n_seq)


def heldout(verify_seqs: Sequence[Sequence[int]], more_seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    """The sequences of ``more_seqs`` (the same calibration source read further) that verify does not
    score: none of verify's sequences is a prefix of one, nor one of them a prefix of verify's."""
    seen = [tuple(v) for v in verify_seqs]
    out = []
    for s in more_seqs:
        t = tuple(s)
        if not any(t[:len(v)] == v or v[:len(t)] == t for v in seen):
            out.append(list(s))
    return out


def _logits(gguf: Path, lay: Layout, threads: int) -> np.ndarray:
    """(len(lay.out), vocab) float32 raw logits of ``gguf`` at the scored nodes, one decode call."""
    import llama_cpp as L

    from ...errors import LlamaRuntimeError
    from ...llamacpp import runtime

    llm = runtime.load(gguf, n_ctx=32, n_batch=32, n_threads=threads, n_threads_batch=threads)
    n = lay.n_tokens
    p = L.llama_context_default_params()
    p.n_ctx = max(64, -(-n // 256) * 256)
    p.n_batch = p.n_ubatch = p.n_ctx
    p.n_seq_max = max(1, lay.n_seq)
    p.kv_unified = True
    p.n_threads = p.n_threads_batch = threads
    ctx = L.llama_init_from_model(llm._model.model, p)
    if not ctx:
        del llm
        raise LlamaRuntimeError(f"llama.cpp made no context for {gguf}")
    batch = L.llama_batch_init(n, 0, max(1, lay.n_seq))
    try:
        want = np.zeros(n, bool)
        want[lay.out] = True
        for i in range(n):
            batch.token[i] = int(lay.tokens[i])
            batch.pos[i] = int(lay.pos[i])
            batch.n_seq_id[i] = len(lay.seq_ids[i])
            for j, sid in enumerate(lay.seq_ids[i]):
                batch.seq_id[i][j] = sid
            batch.logits[i] = bool(want[i])
        batch.n_tokens = n
        if (rc := L.llama_decode(ctx, batch)) != 0:
            raise LlamaRuntimeError(f"llama_decode returned {rc} for {gguf}")
        vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(llm._model.model))
        ptr = L.llama_get_logits(ctx)
        return np.ctypeslib.as_array(ptr, shape=(lay.out.size * vocab,)).reshape(lay.out.size, vocab).copy()
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        del llm


def tokens_for(gguf: Path) -> int:
    """Forward-pass tokens per score: ``MAX_TOKENS`` for small models, fewer as the weights grow (a score
    costs about weights x tokens; the weights counted as the 16-bit file's bytes / 2), never under
    ``MIN_TOKENS``."""
    n = Path(gguf).stat().st_size / 2
    return int(min(MAX_TOKENS, max(MIN_TOKENS, TOKEN_FLOPS / max(n, 1))))


def positions_for(gguf: Path) -> int:
    """Scored positions per score: each costs the reference a row of vocabulary-sized log-probabilities,
    so ``MAX_POSITIONS`` for small vocabularies, ``MIN_POSITIONS`` for Qwen's 152k."""
    from ..gguf_out import read_source

    t = read_source(Path(gguf)).by_name.get("token_embd.weight")
    vocab = t.rows if t is not None else 1 << 17
    return int(min(MAX_POSITIONS, max(MIN_POSITIONS, POSITION_BYTES // (4 * vocab))))


def _log_softmax(x: np.ndarray, rows: int = 16) -> np.ndarray:
    out = np.empty(x.shape, np.float32)
    for lo in range(0, x.shape[0], rows):          # a few rows at a time: float64 temporaries stay small
        c = x[lo:lo + rows].astype(np.float64)
        c -= c.max(axis=1, keepdims=True)
        out[lo:lo + rows] = c - np.log(np.exp(c).sum(axis=1, keepdims=True))
    return out


@dataclass
class Scorer:
    """Mean KLD and top-1 agreement of any GGUF of this model against fixed log-probabilities."""
    layout: Layout
    ref: np.ndarray                # (positions, vocab) float32 log-probabilities
    threads: int = 1
    seconds: float = 0.0
    source: str = "in-sample"      # heldout | in-sample: whether verify scores the same text
    scores: int = 0
    reference_seconds: float = 0.0

    @classmethod
    def of_gguf(cls, gguf: Path, sequences: Sequence[Sequence[int]], threads: int = 1, *,
                max_tokens: Optional[int] = None, max_positions: Optional[int] = None,
                source: str = "in-sample") -> "Scorer":
        """``max_tokens``, ``max_positions``: default ``tokens_for`` the model's size, ``positions_for`` its
        vocabulary."""
        t0 = time.perf_counter()
        max_tokens = tokens_for(gguf) if max_tokens is None else max_tokens
        max_positions = positions_for(gguf) if max_positions is None else max_positions
        lay = layout(sequences, max_tokens=max_tokens, max_positions=max_positions)
        if lay.out.size == 0:
            raise ValueError("no calibration positions to score the tuned search on")
        s = cls(lay, _log_softmax(_logits(gguf, lay, threads)), threads, 0.0, source)
        s.reference_seconds = time.perf_counter() - t0
        return s

    def score(self, gguf: Path) -> dict:
        from ...verify.metrics import PositionStats

        t0 = time.perf_counter()
        stats = PositionStats()
        stats.add(self.ref, _logits(gguf, self.layout, self.threads), self.layout.nxt)
        self.seconds += time.perf_counter() - t0
        self.scores += 1
        return {**stats.summary(), "agree": np.concatenate(stats.same_top)}   # per position: same top-1

    def describe(self) -> dict:
        return {"text": self.source, "tokens": self.layout.n_tokens, "positions": int(self.layout.out.size),
                "sequences": self.layout.n_seq, "scores": self.scores, "score_seconds": round(self.seconds, 3),
                "reference_seconds": round(self.reference_seconds, 3)}


def search_sequences(verify_seqs: Sequence[Sequence[int]], more_seqs: Optional[Sequence[Sequence[int]]],
                     verify_kinds: Sequence[str] = (), more_kinds: Sequence[str] = ()) -> tuple[list[list[int]], str]:
    """(the sequences the search scores on, heldout | in-sample): the calibration text verify does not
    score when there is enough of it (and, where verify reads conversations, enough of that is
    conversations, not only the general text after them), else verify's own."""
    more = list(more_seqs or [])
    kinds = dict(zip(map(tuple, more), more_kinds)) if len(more_kinds) == len(more) else {}
    held = heldout(verify_seqs, more)
    chat = sum(len(s) for s in held if kinds.get(tuple(s)) == "chat")
    wants_chat = "chat" in verify_kinds and bool(kinds)
    if sum(len(s) for s in held) >= MIN_HELDOUT and (not wants_chat or chat >= MIN_HELDOUT // 2):
        return held, "heldout"
    return [list(s) for s in verify_seqs], "in-sample"
