"""Executors: where a stage runs. ``local`` runs it in this process (today's behaviour); ``ray`` sends
each model's heavy stages (``HEAVY``, from stagespec) to a Ray cluster as tasks that declare
the CPUs, memory and GPUs they need, and lets Ray pack them. Records, locks and notifications stay
with the pipeline, in this process, whichever executor runs the work.

Registry: ``performance.executor`` -> "module:Class", imported lazily (ray is an optional extra).
"""
from __future__ import annotations

import importlib

from ..config import Config
from .base import HEAVY, ExecutorError, Ran  # noqa: F401

REGISTRY: dict[str, str] = {
    "local": "loradeploy.executor.local:LocalExecutor",
    "ray": "loradeploy.executor.ray_exec:RayExecutor",
}


def get_executor(cfg: Config):
    name = cfg.performance.executor
    try:
        target = REGISTRY[name]
    except KeyError:
        raise ExecutorError(f"unknown executor {name!r}", hint=f"known executors: {', '.join(REGISTRY)}") from None
    mod_name, _, cls_name = target.partition(":")
    return getattr(importlib.import_module(mod_name), cls_name)(cfg)
