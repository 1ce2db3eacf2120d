"""The reference: the UNMERGED PEFT model (base + adapter), so a merge bug shows as distance too.

Two ways to run it, with the same output: ``streamed`` (one decoder layer at a time from the
safetensors, float32; ``streamed.py``), what CPU runs use, and ``memory`` (peft in memory: float32 on
CPU, 16-bit on CUDA), the oracle the tests hold the streamed one to. Either writes the reference's
log-probabilities of every scored position to a disk .npy (float32, positions x vocabulary) and, with
the adapter switched off, scores the base model against them: that distance is the adapter's
signal. The model is freed before any GGUF is loaded.
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
from .calibration import Calibration
from .metrics import LOGSOFTMAX_ROWS, PositionStats

Progress = Callable[[str, float, float], None]
BYTES_PER_THREAD = 64 * 2**20


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
    turn_ends: list[dict] = field(default_factory=list)   # the reference's top-1 where each assistant turn ends
    device: str = "cpu"
    dtype: str = "float32"
    mode: str = "memory"               # streamed | memory
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


class LogprobWriter:
    """Appends the reference's log-probabilities, block by block in calibration order, to the .npy and
    scores the base (adapter off) against them: one writer for both ways of running the reference."""

    def __init__(self, path: Path, rows: int, vocab: int):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path, self.rows, self.vocab = Path(path), rows, vocab
        self.f = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.f, {"descr": "<f4", "fortran_order": False, "shape": (rows, vocab)})
        self.header = self.f.tell()
        self.signal = PositionStats()
        self.written = 0

    def add(self, ref_logits, base_logits, next_ids: np.ndarray) -> None:
        """``ref_logits``, ``base_logits``: (n, vocab) torch tensors of raw logits."""
        import torch

        n = ref_logits.shape[0]
        ref_lp = np.empty((n, self.vocab), dtype=np.float32)
        for lo in range(0, n, LOGSOFTMAX_ROWS):  # float64 copies of a few rows only
            rows = ref_logits[lo:lo + LOGSOFTMAX_ROWS].double()
            ref_lp[lo:lo + len(rows)] = torch.log_softmax(rows, dim=-1).float().cpu().numpy()
        if not np.isfinite(ref_lp).all():
            raise VerifyError("the reference's logits are not finite (NaN or Inf): the adapter or the base "
                              "holds non-finite weights", hint="check the adapter's tensors; retrain or re-export it")
        self.f.write(np.ascontiguousarray(ref_lp, dtype="<f4").data)   # no bytes copy of the block
        self.signal.add(ref_lp, base_logits.float().cpu().numpy(), np.asarray(next_ids))
        self.written += n

    def close(self) -> None:
        self.f.close()
        if self.written != self.rows:
            raise VerifyError(f"the reference wrote {self.written} of {self.rows} positions", hint="re-run verify")


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


def _memory_pass(base_dir: Path, adapter_dir: Path, cal: Calibration, out_path: Path, device: str,
                 progress: Optional[Progress]) -> tuple[LogprobWriter, str, str]:
    import torch

    model, dev, dtype = load_reference(base_dir, adapter_dir, device=device)
    try:
        w = LogprobWriter(out_path, cal.n_positions, int(model.get_output_embeddings().weight.shape[0]))
        try:
            for i, seq in enumerate(cal.sequences):
                if progress:
                    progress("reference logits (PEFT, unmerged)", i, len(cal.sequences))
                ids = torch.tensor([seq], device=dev)
                logits = model(input_ids=ids).logits[0, :-1]
                with model.disable_adapter():
                    base_logits = model(input_ids=ids).logits[0, :-1]
                w.add(logits, base_logits, np.asarray(seq[1:]))
                del logits, base_logits
        finally:
            w.close()
    finally:
        del model
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return w, dev, dtype


def _streamed_pass(base_dir: Path, adapter_dir: Path, cal: Calibration, out_path: Path,
                   progress: Optional[Progress]) -> LogprobWriter:
    from .streamed import StreamedModel, streamed_hidden

    model = StreamedModel(base_dir, adapter_dir)
    try:
        h_on, h_off = streamed_hidden(model, cal.sequences, progress=progress)
        nxt = np.concatenate([np.asarray(s[1:]) for s in cal.sequences])
        w = LogprobWriter(out_path, cal.n_positions, model.vocab)
        try:
            for lo, ref, base in model.logits(h_on, h_off, progress=progress):
                w.add(ref, base, nxt[lo:lo + ref.shape[0]])
        finally:
            w.close()
    finally:
        model.close()
    return w


def turn_end_tops(path: Path, header: int, vocab: int, offsets: list[int], cal: Calibration,
                  eos: list[int]) -> list[dict]:
    """Where each calibration assistant turn ends, the reference's top-1 (teacher forced: the same rows
    the candidates are scored on) and whether that is an end-of-turn token."""
    out = []
    run = ReferenceRun(Path(path), header, offsets, vocab, {})
    fd = os.open(path, os.O_RDONLY)
    try:
        for seq, pos, token in cal.turn_ends:
            lp = run.rows(fd, offsets[seq] + pos - 1, 1)[0]
            top = int(lp.argmax())
            out.append({"sequence": seq, "position": pos, "token": token, "top1": top, "ends": top in eos,
                        "p_end": float(np.exp(lp[token]))})
    finally:
        os.close(fd)
    return out


def run_reference(base_dir: Path, adapter_dir: Path, cal: Calibration, out_path: Path, *, mode: str = "streamed",
                  device: str = "auto", threads: int = 0, eos: list[int] = (),
                  progress: Optional[Progress] = None) -> ReferenceRun:
    """``mode``: streamed | memory (chosen by ``memory.plan_reference``)."""
    import torch

    t0 = time.monotonic()
    prev_threads = torch.get_num_threads()  # a process-wide setting: restored for the stages after this one
    torch.set_num_threads(threads_for(folder_bytes(base_dir), threads or prev_threads))
    prev_grad = torch.is_grad_enabled()  # process-wide too: training after verify (same process) needs it back
    torch.set_grad_enabled(False)
    try:
        if mode == "streamed":
            w, dev, dtype = _streamed_pass(base_dir, adapter_dir, cal, out_path, progress), "cpu", "float32"
        else:
            w, dev, dtype = _memory_pass(base_dir, adapter_dir, cal, out_path, device, progress)
    finally:
        gc.collect()
        torch.set_num_threads(prev_threads)
        torch.set_grad_enabled(prev_grad)
    offsets = list(np.cumsum([0] + [len(s) - 1 for s in cal.sequences[:-1]]).tolist())
    ends = turn_end_tops(out_path, w.header, w.vocab, offsets, cal, list(eos))
    return ReferenceRun(out_path, w.header, offsets, w.vocab, w.signal.summary(), ends, dev, dtype, mode,
                        round(time.monotonic() - t0, 3))
