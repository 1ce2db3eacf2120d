"""The probe child: can llama.cpp compute on this CPU in a given mode?

``python -m loradeploy.llamacpp.probe MODE GGUF`` loads the probe model in MODE ("default" or
"safe": no extra weight buffer types, so no AMX / repacked layouts), evaluates a prompt long
enough to take the batched matmul path, generates tokens one at a time (the vector path), and
prints one ``PROBE_OK {json}`` line. Any other ending — a signal, an exit code, silence past the
parent's deadline — means the mode does not work here. The model is built on first use: a tiny
Llama whose layers are Q4_K/Q6_K (K-quants, repackable) with a Q8_0 output matrix.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

OK_MARK = "PROBE_OK"
N_EMBD, N_FF, N_LAYER, N_HEAD, N_VOCAB = 256, 512, 2, 4, 512
PROMPT_TOKENS = 48
# Test-only: "default:SIGSEGV,safe:hang" makes this child die (or stall, or fail) in the named mode,
# so tests can prove the parent's handling of every kind of death on any machine.
SELFTEST_ENV = "LORADEPLOY_PROBE_SELFTEST"


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style: unk/bos/eos, the 256 byte tokens, then pieces; every text tokenizes."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < N_VOCAB:
        a, b = letters[i % 26], letters[(i // 26) % 26]
        tokens.append(f"\u2581{a}{b}" if i >= 26 else f"\u2581{a}")
        types.append(1)
        i += 1
    scores = [0.0] * 259 + [-float(k) for k in range(len(tokens) - 259)]
    return tokens, scores, types


def build_model(dest: Path) -> None:
    """Write the probe model to ``dest`` (a temporary name, then rename: never half a file)."""
    import numpy as np

    import gguf
    import llama_cpp

    rng = np.random.default_rng(0)
    f32 = dest.with_name(dest.name + f".f32.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(f32), "llama")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    tokens, scores, types = _vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def mat(rows: int, cols: int):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(N_VOCAB, N_EMBD))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", mat(N_VOCAB, N_EMBD))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", mat(N_EMBD, N_EMBD))
        w.add_tensor(p + "ffn_gate.weight", mat(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", mat(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", mat(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
        params.nthread = 1
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc} for the probe model")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        for leftover in (f32, tmp):
            if leftover.exists():
                leftover.unlink()


def _selftest(mode: str) -> None:
    spec = os.environ.get(SELFTEST_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        which, _, action = item.partition(":")
        if which != mode:
            continue
        if action == "hang":
            time.sleep(3600)
        elif action == "fail":
            print("selftest: failing on purpose", file=sys.stderr, flush=True)
            sys.exit(1)
        else:
            os.kill(os.getpid(), getattr(signal, action))
            time.sleep(5)  # a signal that does not kill must still not look like success
            sys.exit(70)


def run(mode: str, gguf_path: Path) -> dict:
    import llama_cpp

    from .runtime import apply_mode

    apply_mode(mode == "default")
    t0 = time.monotonic()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, n_batch=64, n_threads=2, n_threads_batch=2,
                          verbose=False)
    loaded = time.monotonic() - t0
    _selftest(mode)
    prompt = [1] + [3 + (7 * k) % (N_VOCAB - 3) for k in range(PROMPT_TOKENS - 1)]
    out = []
    for tok in llm.generate(prompt, temp=0.0, reset=True):
        out.append(int(tok))
        if len(out) >= 4:
            break
    return {"mode": mode, "tokens": out, "load_s": round(loaded, 3), "total_s": round(time.monotonic() - t0, 3)}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("default", "safe"):
        print("usage: python -m loradeploy.llamacpp.probe default|safe GGUF", file=sys.stderr)
        return 2
    path = Path(argv[1])
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_model(path)
    result = run(argv[0], path)
    print(f"{OK_MARK} {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
