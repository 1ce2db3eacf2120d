"""Every stage, declared once: its order, phase, inputs, heaviness, CLI help and implementation.

Every other table of stages is derived from ``SPECS`` here: ``STAGES`` and the ``Stage`` type (config),
``PHASES`` and ``NEEDS`` (pipeline), ``HEAVY`` (executor), the stage registry (``stages/``) and the CLI's
stage commands with their help. ``tests/unit/test_stage_declarations.py`` checks each against ``SPECS`` and
that no other module spells out a list of stages. This module imports nothing of loradeploy: the config,
the CLI (before any heavy import) and the stages all read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping


@dataclass(frozen=True)
class StageSpec:
    name: str
    # Stages of one phase run model after model before the next phase starts for any model.
    phase: str
    # Which stages' outputs this one reads (so a cleaned-up temporary is rebuilt when needed).
    needs: tuple[str, ...]
    # Worth sending to another machine (Ray): gigabytes of RAM, many cores or a GPU. The others touch this
    # machine's network, servers and ports, so they stay here.
    heavy: bool
    # The CLI command's help: first line in `loradeploy --help`, the rest in `loradeploy <stage> --help`.
    help: str
    # "module:Class", imported only when the stage runs (torch is heavy).
    impl: str
    # How the CLI offers it: "stage" runs just this stage through the pipeline (`loradeploy merge`);
    # "own" is a command of its own in cli.py that renders its report (verify, health, evaluate).
    command: Literal["stage", "own"] = "stage"
    # Models side by side in this stage's phase, performance.parallel_downloads at a time (network-bound).
    side_by_side: bool = False


def _spec(name: str, phase: str, needs: tuple[str, ...], help: str, *, heavy: bool = False,
          command: Literal["stage", "own"] = "stage", side_by_side: bool = False) -> StageSpec:
    cls = f"{name.capitalize()}Stage"
    return StageSpec(name, phase, needs, heavy, help, f"loradeploy.stages.{name}:{cls}", command, side_by_side)


# In pipeline order. Phases across models: fetches side by side (network-bound); the heavy build stages one
# model at a time (so two merges never compete for RAM); then every deploy + health check; evaluation last.
SPECS: tuple[StageSpec, ...] = (
    _spec("fetch", "fetch", (), "Pull the adapter from the training box (rsync over SSH, verified).",
          side_by_side=True),
    _spec("merge", "build", ("fetch",), "Merge the LoRA adapter into its base model (16-bit).", heavy=True),
    _spec("convert", "build", ("merge",), "Convert the merged model to GGUF with llama.cpp's converter.",
          heavy=True),
    _spec("quantize", "build", ("convert",), "Quantize the GGUF to every configured llama.cpp type.", heavy=True),
    _spec("verify", "build", ("convert", "quantize"),
          "Check every GGUF against the unmerged PEFT model: KLD, top-1, noise/signal, chat template, stop.\n\n"
          "Exit 0 when the gate lets a format deploy, 1 when it blocks (or verify fails).",
          heavy=True, command="own"),
    _spec("deploy", "serve", ("quantize",), "Deploy the primary GGUF to the configured targets."),
    _spec("health", "serve", ("deploy",),
          "Check files, API, a real completion and the system: exit 0 healthy, 1 degraded, 2 unhealthy.",
          command="own"),
    _spec("evaluate", "evaluate", ("deploy",),
          "Compare models and formats on eval_samples.jsonl -> JSON + Markdown + charts.", command="own"),
)

# ----------------------------------------------------------------------------- derived tables

SPEC: Mapping[str, StageSpec] = {s.name: s for s in SPECS}
STAGES: tuple[str, ...] = tuple(SPEC)
Stage = Literal[STAGES]  # type: ignore[valid-type]  # Literal["fetch", "merge", ...], built from SPECS
PHASES: tuple[tuple[str, ...], ...] = tuple(
    tuple(s.name for s in SPECS if s.phase == p) for p in dict.fromkeys(s.phase for s in SPECS))
NEEDS: Mapping[str, tuple[str, ...]] = {s.name: s.needs for s in SPECS if s.needs}
HEAVY: tuple[str, ...] = tuple(s.name for s in SPECS if s.heavy)
HeavyStage = Literal[HEAVY]  # type: ignore[valid-type]
IMPLS: Mapping[str, str] = {s.name: s.impl for s in SPECS}


def side_by_side(phase: tuple[str, ...]) -> bool:
    """Whether models run this phase side by side regardless of the executor (the network-bound fetch)."""
    return any(SPEC[s].side_by_side for s in phase)
