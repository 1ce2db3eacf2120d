"""Reading a config: YAML, ``${VAR}`` / ``${VAR:-default}`` expansion, validation into one-line errors."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .model import Config

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
log = logging.getLogger("loradeploy.config")


def expand_env(obj: Any, where: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v, f"{where}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            val = os.environ.get(name)
            if val is None or val == "":
                if default is not None:
                    return default
                raise ConfigError(f"{where}: environment variable {name} is not set",
                                  hint=f"export {name}=... or write the value into the config")
            return val
        return _ENV_RE.sub(sub, obj)
    return obj


def _format_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-", "function_")))
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key (check the spelling; see examples/deployment_config.yaml)"
    elif err.get("type") == "missing":
        msg = "required key is missing"
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def config_from_dict(data: Any, *, base_dir: Path | None = None, source: str = "config") -> Config:
    if data is None:
        raise ConfigError(f"{source} is empty", hint="start from examples/deployment_config.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    data = expand_env(data)
    # every relative path, written or default, resolves once, here: against the config's folder, or the
    # folder this process runs in for a config given as data; records, servers and children get absolute paths
    base_dir = Path(base_dir if base_dir is not None else Path.cwd()).resolve()
    try:
        cfg = Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(errors[0])
        more = f" (+{len(errors) - 1} more: {'; '.join(_format_error(e) for e in errors[1:4])})" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {first}{more}") from None
    for w in cfg.warnings:
        log.warning("%s: %s", source, w)
    return cfg


def load_config(path: Path | str) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found", hint="pass -c FILE or copy examples/deployment_config.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    cfg = config_from_dict(data, base_dir=path.resolve().parent, source=str(path))
    return cfg.model_copy(update={"config_path": path.resolve()})
