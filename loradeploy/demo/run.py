"""The embedded default: a tiny base + three persona adapters built locally, and the config to run
them: majora merged, and majora, nayru and veran in adapter mode on one shared base server."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from ..config import STAGES, Config, load_config
from ..fsutil import atomic_write_text
from .adapters import train_adapter
from .builders import build_base
from .samples import EXAMPLE_PROMPT, get_persona, write_demo_eval_samples

DEMO_MODEL = "majora"


def available_stages() -> list[str]:
    """The demo runs every stage. Every stage module ships in this version; the list comes from the
    config rather than the stage registry so the demo never imports the stages above it."""
    return list(STAGES)


# The gate's default KLD limits are llama.cpp's Llama-3-8B figures (verify/gate.py). The demo models
# have two layers 256 wide and no redundancy: rounding moves their logits further than an 8B model's.
# Measured against the PEFT reference over the three personas, merged and adapter mode: Q4_K_M
# 0.02-0.09 mean KLD, Q5_K_M 0.007-0.021, Q8_0 0.0002-0.004, depending on the persona and on the CPU
# that trained the models; the adapters' own signal is 3-4 nats, so noise_to_signal (the scale-free
# check, limit 0.25) stays at 0.01-0.03. These limits are for the demo models only.
DEMO_MAX_KLD = {"Q4_K_M": 0.15, "Q4_K_S": 0.18, "Q5_K_M": 0.05, "Q5_K_S": 0.06, "Q8_0": 0.01, "IQ4_XS": 0.2,
                "IQ4_NL": 0.2}

# Adapter mode: one quantized base, three personas applied at run time by one shared llama-server,
# beside the same majora adapter merged into its own GGUF.
ADAPTER_MODELS = ("majora-adapter", "nayru", "veran")


# The demo's ports: a block, one per model. 5000 is AirPlay Receiver's on macOS (on by default since
# macOS 12, as is 7000), so a Mac starts elsewhere; a taken block moves on by PORT_STEP.
DEMO_PORT, DARWIN_DEMO_PORT, PORT_STEP = 5000, 5050, 10


def demo_port(workdir: Path, *, platform: str | None = None, tries: int = 50) -> int:
    """The first port of the demo's block: the one its config already has (a re-run keeps its own
    servers' ports), else 5000 (5050 on macOS), moved on while any port of the block is taken.
    Taken on loopback or on the wildcard: macOS lets a loopback bind shadow AirPlay's *:5000."""
    from ..serving.ports import port_holder

    def free(port: int) -> bool:
        return all(port_holder(host, port) is None for host in ("127.0.0.1", "0.0.0.0"))

    try:
        return int(yaml.safe_load((Path(workdir) / "deployment_config.yaml").read_text())["models"][DEMO_MODEL]["port"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        pass
    first = DARWIN_DEMO_PORT if (platform or sys.platform) == "darwin" else DEMO_PORT
    n = 1 + len(ADAPTER_MODELS)
    for k in range(tries):
        start = first + k * PORT_STEP
        if all(free(start + i) for i in range(n)):
            return start
    return first   # all taken: serving names who holds the port


def persona_of(model: str) -> str:
    return model.removesuffix("-adapter")


def demo_config_dict(base: Path, adapters: dict[str, Path], samples: dict[str, Path], *, port: int,
                     example_prompt: str) -> dict:
    """``adapters`` and ``samples`` by persona (majora, nayru, veran)."""
    models = {}
    for i, name in enumerate((DEMO_MODEL, *ADAPTER_MODELS)):
        p = persona_of(name)
        models[name] = {"base_model": str(base), "adapter": str(adapters[p]), "system_prompt": get_persona(p).system_prompt,
                        "port": port + i, "version": "v1", "samples": str(samples[p])}
        if name in ADAPTER_MODELS:
            models[name]["mode"] = "adapter"
    return {
        "models": models,
        "quantization": {"formats": ["Q4_K_M", "Q5_K_M", "Q8_0"], "primary_format": "Q4_K_M"},
        # F16 (the converted file) and every quant against the unmerged adapter; Q4_K_M must pass to deploy
        "verify": {"max_tokens": 1536, "stop_prompts": 2, "on_fail": "block", "max_kld": dict(DEMO_MAX_KLD)},
        "deployment": {"targets": ["llamacpp"], "models_dir": "models",
                       "llamacpp": {"n_ctx": 512, "startup_timeout_s": 120}},
        "health_check": {"test_prompts": [example_prompt], "max_tokens": 32, "min_free_disk_gb": 0.5},
        "evaluation": {"samples": str(samples[DEMO_MODEL]), "output_dir": "reports", "max_tokens": 32, "repeats": 1,
                       "base_gguf": "q8_0"},
        "logging": {"log_dir": "logs", "level": "INFO"},
        "pipeline": {"stages": available_stages(), "work_dir": "work", "state_dir": ".loradeploy"},
        "performance": {"min_free_disk_gb": 0.2},
    }


def prepare_demo(workdir: Path, *, arch: str = "llama", port: int | None = None, progress=None) -> Config:
    """Build (or reuse) the demo models in ``workdir`` and write ``workdir/deployment_config.yaml``
    (``port``: the first of the models' ports; None: demo_port())."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = demo_port(workdir) if port is None else port
    base = build_base(workdir / "models" / f"base-{arch}", arch, progress=progress)
    personas = sorted({persona_of(m) for m in (DEMO_MODEL, *ADAPTER_MODELS)})
    adapters = {p: train_adapter(base, workdir / "adapters" / p, persona=p, progress=progress) for p in personas}
    samples = {p: workdir / ("eval_samples.jsonl" if p == DEMO_MODEL else f"eval_samples-{p}.jsonl") for p in personas}
    for p, path in samples.items():
        if not path.exists():
            write_demo_eval_samples(path, persona=p)
    data = demo_config_dict(base, adapters, samples, port=port, example_prompt=EXAMPLE_PROMPT)
    path = workdir / "deployment_config.yaml"
    header = ("# Written by `loradeploy demo`. Re-run it with: loradeploy run -c " + str(path) +
              "\n# Copy it as a starting point; examples/deployment_config.yaml documents every key.\n")
    text = header + yaml.safe_dump(data, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)
    return load_config(path)
