"""The reference: the UNMERGED PEFT model (base + adapter), so a merge bug shows as distance too.

fp32 on CPU, 16-bit on CUDA. One pass over the calibration sequences writes the reference's
log-probabilities of every scored position to a disk memmap (float32, positions x vocabulary), and
in the same pass, with the adapter switched off (``disable_adapter``), scores the base model against
them: that distance is the adapter's signal. Only one sequence's logits are in memory at a time,
and the model is freed before any GGUF is loaded.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import VerifyError
from .behaviour import Generation, reference_generations
from .calibration import Calibration, Conversation
from .metrics import PositionStats

Progress = Callable[[str, float, float], None]
BYTES_PER_THREAD = 64 * 2**20
LOGSOFTMAX_ROWS = 128


def threads_for(nbytes: int, budget: int) -> int:
    """Threads worth using on a model of ``nbytes``: ggml and torch synchronise their threads at
    every op, and on small matrices (or a busy machine, where a spinning thread waits for a
    descheduled one) that wait costs more than the work: one thread scores a tiny model 50x faster
    than two on a loaded 2-core box. Big models get the whole budget."""
    return max(1, min(max(1, budget), nbytes // BYTES_PER_THREAD))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


@dataclass
class ReferenceRun:
    logprobs_path: Path                # a .npy of float32 (positions x vocab), np.load(mmap_mode="r") reads it
    header_bytes: int
    offsets: list[int]                 # first row of each calibration sequence
    vocab: int
    signal: dict                       # KLD(reference || base) summary, llama.cpp's statistics
    generations: list[Generation] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    seconds: float = 0.0

    def rows(self, fd: int, start: int, n: int) -> np.ndarray:
        """Rows ``start..start+n`` by pread: read into a private buffer rather than mapped, so the
        file's pages (a 152k vocabulary makes it GBs) never count as this process's memory."""
        width = self.vocab * 4
        buf = os.pread(fd, n * width, self.header_bytes + start * width)
        if len(buf) != n * width:
            raise VerifyError(f"reference log-probs {self.logprobs_path} are truncated", hint="re-run verify")
        return np.frombuffer(buf, dtype="<f4").reshape(n, self.vocab)


def eos_ids(tok, base_dir: Path) -> list[int]:
    """Every id the fine-tune ends a turn with: the tokenizer's eos and generation_config's."""
    import json

    ids: list[int] = []
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    gc_path = Path(base_dir) / "generation_config.json"
    if gc_path.is_file():
        eos = json.loads(gc_path.read_text()).get("eos_token_id")
        for i in (eos if isinstance(eos, list) else [eos] if eos is not None else []):
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def _device_dtype(want: str):
    import torch

    from ..merge.peft import pick_device

    device = pick_device(want)
    if device == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def load_reference(base_dir: Path, adapter_dir: Path, *, device: str = "auto"):
    """base + adapter through peft, unmerged, in eval mode; returns (model, device, dtype name)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dev, dtype = _device_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, low_cpu_mem_usage=True)
        model = PeftModel.from_pretrained(model.to(dev), str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise VerifyError(f"cannot load the reference (base {base_dir} + adapter {adapter_dir}): {exc}",
                          hint="the adapter must load with peft onto this base") from None
    model.eval()
    return model, dev, str(dtype).removeprefix("torch.")


def run_reference(base_dir: Path, adapter_dir: Path, tok, cal: Calibration, out_path: Path, *,
                  device: str = "auto", threads: int = 0, stop_convs: list[Conversation] = (),
                  max_new_tokens: int = 128, progress: Optional[Progress] = None) -> ReferenceRun:
    import torch

    t0 = time.monotonic()
    prev_threads = torch.get_num_threads()  # a process-wide setting: restored for the stages after this one
    torch.set_num_threads(threads_for(folder_bytes(base_dir), threads or prev_threads))
    prev_grad = torch.is_grad_enabled()  # process-wide too: training after verify (same process) needs it back
    torch.set_grad_enabled(False)
    try:
        model, dev, dtype = load_reference(base_dir, adapter_dir, device=device)
    except BaseException:
        torch.set_grad_enabled(prev_grad)
        torch.set_num_threads(prev_threads)
        raise
    try:
        vocab = int(model.get_output_embeddings().weight.shape[0])
        offsets, row = [], 0
        for s in cal.sequences:
            offsets.append(row)
            row += len(s) - 1
        out_path.parent.mkdir(parents=True, exist_ok=True)
        signal = PositionStats()
        with open(out_path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (row, vocab)})
            header = f.tell()
            for i, seq in enumerate(cal.sequences):
                if progress:
                    progress("reference logits (PEFT, unmerged)", i, len(cal.sequences))
                ids = torch.tensor([seq], device=dev)
                logits = model(input_ids=ids).logits[0, :-1]
                ref_lp = np.empty(tuple(logits.shape), dtype=np.float32)
                for lo in range(0, logits.shape[0], LOGSOFTMAX_ROWS):  # float64 copies of a few rows only
                    rows = logits[lo:lo + LOGSOFTMAX_ROWS].double()
                    ref_lp[lo:lo + len(rows)] = torch.log_softmax(rows, dim=-1).float().cpu().numpy()
                del logits
                f.write(np.ascontiguousarray(ref_lp, dtype="<f4").tobytes())
                with model.disable_adapter():
                    base_logits = model(input_ids=ids).logits[0, :-1].float().cpu().numpy()
                signal.add(ref_lp, base_logits, np.asarray(seq[1:]))
                del ref_lp, base_logits
        gens = reference_generations(model, tok, list(stop_convs), eos_ids(tok, base_dir), max_new_tokens, dev)
    finally:
        del model
        gc.collect()
        torch.set_num_threads(prev_threads)
        torch.set_grad_enabled(prev_grad)
        if dev == "cuda":
            torch.cuda.empty_cache()
    return ReferenceRun(out_path, header, offsets, vocab, signal.summary(), gens, dev, dtype,
                        round(time.monotonic() - t0, 3))
