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


def _pieces() -> list[str]:
    """Word pieces after the byte tokens, up to N_VOCAB: a, b, ..., z, then two-letter ones."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    n = N_VOCAB - 259
    return [f"\u2581{letters[i % 26]}" + (letters[(i // 26) % 26] if i >= 26 else "") for i in range(n)]


def build_model(dest: Path) -> None:
    """Write the probe model to ``dest`` (a temporary name, then rename: never half a file)."""
    import numpy as np

    import gguf
    import llama_cpp

    from ..gguf.tiny import add_llama_header, llama_tensor_shapes, spm_vocab

    rng = np.random.default_rng(0)
    f32 = dest.with_name(dest.name + f".f32.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(f32), "llama")
    add_llama_header(w, n_embd=N_EMBD, n_ff=N_FF, n_layer=N_LAYER, n_head=N_HEAD, vocab=spm_vocab(_pieces()))
    w.add_file_type(0)
    for name, (shape, is_matrix) in llama_tensor_shapes(N_VOCAB, N_EMBD, N_FF, N_LAYER).items():
        # 2D weights scaled so activations stay O(1) through the layers; norms are ones
        w.add_tensor(name, (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32) if is_matrix
                     else np.ones(shape, dtype=np.float32))
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
    # n_gpu_layers=0: the CPU path the mode is about, also in a Metal or CUDA build of llama.cpp
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, n_batch=64, n_threads=2, n_threads_batch=2,
                          n_gpu_layers=0, verbose=False)
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
