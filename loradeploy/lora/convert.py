"""A PEFT LoRA adapter -> a llama.cpp LoRA GGUF, by llama.cpp's own convert_lora_to_gguf.py (the
script of the same llama.cpp source as the installed bindings and tools), with the alpha fixed
where the script gets it wrong.

The script writes the config's ``lora_alpha`` as ``adapter.lora.alpha`` and ignores ``use_rslora``,
so an rsLoRA adapter would run at alpha/r instead of PEFT's alpha/sqrt(r). For those (and for any
adapter whose alpha must change, preflight.LoraPlan.needs_rewrite) the script converts a staged copy
of the folder: the weights linked, adapter_config.json rewritten with the alpha llama.cpp needs.
The GGUF is read back before it is renamed into place: type, alpha and tensor count must be right.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConvertError, ProcError
from ..fsutil import atomic_output, sha256_file
from ..tools.proc import run
from .preflight import CONFIG, LoraPlan, check_adapter

SCRIPT = "convert_lora_to_gguf.py"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class _ConvError(ConvertError, ProcError):
    pass


def converter_script() -> Path:
    from ..llamacpp import tools
    return tools.tool(SCRIPT)


def converter_env(script: Path) -> dict[str, str]:
    """The script puts its own gguf-py on sys.path (and its folder, with the ``conversion`` package,
    is sys.path[0]); PYTHONPATH makes that hold even under NO_LOCAL_GGUF, so it never mixes with the
    venv's gguf of another llama.cpp version. Offline: with --base it needs nothing from the hub."""
    gguf_py = str(Path(script).parent / "gguf-py")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [gguf_py, os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1"}


def stage_adapter(plan: LoraPlan, into: Path) -> Path:
    """A copy of the adapter folder for the script: every file linked, adapter_config.json rewritten
    with lora_alpha = plan.alpha_to_write and use_rslora off (the script reads nothing else of it
    that changes the scale). Same folder name, so the GGUF's name metadata is the same."""
    src = plan.adapter_dir
    staged = Path(into) / src.name
    staged.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != CONFIG and f.is_file():
            os.symlink(f.resolve(), staged / f.name)
    cfg = json.loads((src / CONFIG).read_text())
    cfg.update(lora_alpha=plan.alpha_to_write, use_rslora=False)
    (staged / CONFIG).write_text(json.dumps(cfg, indent=2))
    return staged


def run_converter(adapter_dir: Path, base_dir: Path, outfile: Path, *, outtype: str = "f16",
                  log_path: Path | None = None, timeout: float | None = 1800, script: Path | None = None) -> None:
    """llama.cpp's script on a folder, as it is: no checks, no alpha fix (the caller makes it atomic)."""
    script = Path(script or converter_script())
    args = [sys.executable, str(script), "--base", str(base_dir), "--outfile", str(outfile),
            "--outtype", outtype, str(adapter_dir)]
    try:
        run(args, log_path=log_path, env=converter_env(script), timeout=timeout, what=SCRIPT, error_cls=_ConvError)
    except ProcError as exc:
        lines = [ln for ln in exc.stderr_tail.splitlines() if ln.strip()]
        said = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else exc.message)
        raise ConvertError(f"{SCRIPT} failed on {Path(adapter_dir).name}: {said.strip()[:300]}",
                           hint=f"see {log_path}" if log_path else "run it again with a log_path") from None


def _text(field) -> str:
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def lora_gguf_info(path: Path) -> dict:
    """What a LoRA GGUF says about itself: general.type / architecture, adapter.type, adapter.lora.alpha
    (None when absent: llama.cpp then applies scale 1), its tensors and their ranks."""
    from gguf import GGUFReader, GGUFValueType
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{path} is not a readable GGUF: {exc}", hint="convert the adapter again") from None
    info: dict = {"path": str(path), "size": Path(path).stat().st_size}
    for key in ("general.type", "general.architecture", "general.name", "adapter.type"):
        f = reader.fields.get(key)
        info[key.replace(".", "_")] = _text(f) if f is not None and f.types[:1] == [GGUFValueType.STRING] else None
    alpha = reader.fields.get("adapter.lora.alpha")
    info["alpha"] = float(alpha.parts[alpha.data[0]][0]) if alpha is not None else None
    names = [t.name for t in reader.tensors]
    ranks = sorted({int(t.shape[0]) for t in reader.tensors if t.name.endswith(".lora_b")})
    types = sorted({t.tensor_type.name for t in reader.tensors})
    info.update(n_tensors=len(names), n_lora_a=sum(n.endswith(".lora_a") for n in names),
                n_lora_b=sum(n.endswith(".lora_b") for n in names), ranks=ranks, tensor_types=types)
    return info


def check_lora_gguf(info: dict, plan: LoraPlan) -> None:
    """Raise ConvertError unless the GGUF is a LoRA adapter with the alpha and tensors the plan wants."""
    name = Path(info["path"]).name
    if info["general_type"] != "adapter" or info["adapter_type"] != "lora":
        raise ConvertError(f"{name} is not a LoRA adapter GGUF (general.type {info['general_type']}, "
                           f"adapter.type {info['adapter_type']})", hint="a converter update changed its output")
    alpha = info["alpha"]
    # stored as float32: compare at float32 precision
    if alpha is None or abs(alpha - plan.alpha_to_write) > 1e-6 * max(1.0, abs(plan.alpha_to_write)):
        raise ConvertError(f"{name} carries adapter.lora.alpha {alpha}, not {plan.alpha_to_write:g}: llama.cpp would "
                           "scale the adapter differently from PEFT", hint="a converter update changed how it writes alpha")
    if info["n_lora_a"] != plan.n_tensors // 2 or info["n_lora_b"] != plan.n_tensors // 2:
        raise ConvertError(f"{name} holds {info['n_lora_a']} lora_a / {info['n_lora_b']} lora_b tensors, the adapter "
                           f"{plan.n_tensors // 2} pairs: some modules were dropped",
                           hint="the converter does not map every targeted module of this architecture")


def convert_adapter(adapter_dir: Path, base_dir: Path, out: Path, *, outtype: str = "f16",
                    log_path: Path | None = None, timeout: float | None = 1800) -> dict:
    """Preflight, convert (staged when the alpha must change), check, rename into ``out``."""
    if outtype not in OUTTYPES:
        raise ConvertError(f"LoRA outtype {outtype!r} is not one the converter writes", hint=f"one of {OUTTYPES}")
    plan = check_adapter(adapter_dir, base_dir)
    script = converter_script()
    out = Path(out)
    t0 = time.monotonic()
    raw_cfg = json.loads((plan.adapter_dir / CONFIG).read_text())
    with tempfile.TemporaryDirectory(prefix="loradeploy-lora-") as td:
        src = plan.adapter_dir
        if plan.needs_rewrite or "lora_alpha" not in raw_cfg:
            src = stage_adapter(plan, Path(td))
        with atomic_output(out) as tmp:
            run_converter(src, plan.base_dir, tmp, outtype=outtype, log_path=log_path, timeout=timeout, script=script)
            info = lora_gguf_info(tmp)
            check_lora_gguf(info, plan)
    return {"sha256": sha256_file(out), "size": out.stat().st_size, "rank": plan.rank, "ranks": list(plan.ranks),
            "alpha": plan.alpha, "alpha_written": info["alpha"], "use_rslora": plan.use_rslora, "scale": plan.scale,
            "n_tensors": info["n_tensors"], "target_modules": list(plan.target_modules), "outtype": outtype,
            "seconds": round(time.monotonic() - t0, 2), "converter": str(script)}
