"""Stage registry: name -> "module:Class" (from ``stagespec.SPECS``), imported lazily (torch is heavy)."""
from __future__ import annotations

import importlib

from ..errors import StageUnavailable
from ..stagespec import IMPLS

REGISTRY: dict[str, str] = dict(IMPLS)  # a copy: tests swap an entry for a stage that is not built


def get_stage(name: str):
    try:
        target = REGISTRY[name]
    except KeyError:
        raise StageUnavailable(f"unknown stage {name!r}", hint=f"known stages: {', '.join(REGISTRY)}") from None
    mod_name, _, cls_name = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name == mod_name:
            raise StageUnavailable(f"stage {name} is not built in this version of loradeploy",
                                   hint="remove it from pipeline.stages or skip it with --skip-stage") from None
        raise StageUnavailable(f"stage {name} needs the Python package {exc.name!r}, which is not installed",
                               hint="run `make setup` (or pip install the package)") from None
    cls = getattr(mod, cls_name, None)
    if cls is None:
        raise StageUnavailable(f"stage {name} is not built in this version of loradeploy")
    return cls()
