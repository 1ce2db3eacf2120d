"""A tiny Llama in GGUF, written with the converter's own GGUFWriter: the llama.cpp CPU probe's model
and the test suite's samples share its hparams, its SentencePiece byte vocabulary and its tensor
layout, so llama.cpp loads both as complete models."""
from __future__ import annotations

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
SPECIAL = ["<unk>", "<s>", "</s>"]
# llama.cpp token types: UNKNOWN, CONTROL, CONTROL, then BYTE for the 256 byte tokens, NORMAL after.
SPECIAL_TYPES, BYTE_TYPE, NORMAL_TYPE = [2, 3, 3], 6, 1


def spm_vocab(pieces: list[str], *, byte_score: float = 0.0) -> tuple[list[str], list[float], list[int]]:
    """unk/bos/eos, the 256 byte tokens (so every text tokenizes), then ``pieces`` scored -0, -1, ..."""
    tokens = SPECIAL + BYTE_TOKENS + list(pieces)
    types = SPECIAL_TYPES + [BYTE_TYPE] * 256 + [NORMAL_TYPE] * len(pieces)
    scores = [0.0] * len(SPECIAL) + [byte_score] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def add_llama_header(w, *, n_embd: int, n_ff: int, n_layer: int, n_head: int,
                     vocab: tuple[list[str], list[float], list[int]], n_ctx: int = 256) -> None:
    """The hparams and tokenizer keys llama.cpp needs to load a Llama (bos 1, eos 2, unk 0)."""
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    tokens, scores, types = vocab
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def llama_tensor_shapes(n_vocab: int, n_embd: int, n_ff: int, n_layer: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every tensor of the model: name -> (numpy shape, is a 2D weight rather than a norm)."""
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((n_vocab, n_embd), True),
        "output_norm.weight": ((n_embd,), False),
        "output.weight": ((n_vocab, n_embd), True),
    }
    for i in range(n_layer):
        shapes.update({
            f"blk.{i}.attn_norm.weight": ((n_embd,), False),
            f"blk.{i}.attn_q.weight": ((n_embd, n_embd), True),
            f"blk.{i}.attn_k.weight": ((n_embd, n_embd), True),
            f"blk.{i}.attn_v.weight": ((n_embd, n_embd), True),
            f"blk.{i}.attn_output.weight": ((n_embd, n_embd), True),
            f"blk.{i}.ffn_norm.weight": ((n_embd,), False),
            f"blk.{i}.ffn_gate.weight": ((n_ff, n_embd), True),
            f"blk.{i}.ffn_up.weight": ((n_ff, n_embd), True),
            f"blk.{i}.ffn_down.weight": ((n_embd, n_ff), True),
        })
    return shapes
