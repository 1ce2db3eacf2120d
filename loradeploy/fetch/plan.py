"""Where a model's adapter comes from (a local folder, ``ssh://`` or a vast.ai instance) and which of
the files found there are fetched. Nothing here touches the network."""
from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..config import AdapterSource
from ..errors import FetchError
from ..tools.ssh import SshTarget
from ..tools.ssh_remote import RemoteListing

if TYPE_CHECKING:
    from ..config import Config

REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "training_args.json", "trainer_state.json", "all_results.json", "train_results.json",
    "eval_results.json", "metrics.json",
)
# An allow-list rather than "everything in the folder": run folders also hold optimizer states and
# checkpoints many times the adapter's size.
ALLOWED = REQUIRED + OPTIONAL
PICKLE_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin")
_RUN_NAME = re.compile(r"^[A-Za-z0-9_@+=,.:-][A-Za-z0-9_@+=,.: -]{0,200}$")


@dataclass(frozen=True)
class Plan:
    kind: str                         # local | ssh | vast
    source: str                       # describe() of the adapter source
    path: str = ""                    # local folder, or remote run folder ('' = choose under out_dir)
    host: Optional[str] = None
    port: int = 22
    user: Optional[str] = None
    instance_id: Optional[int] = None  # resolved through the vast.ai API at run time
    out_dir: str = ""
    run: str = ""

    def inputs(self) -> dict[str, Any]:
        d = {"kind": self.kind, "source": self.source, "path": self.path}
        if self.kind != "local":
            d.update(host=self.host, port=self.port, user=self.user, instance_id=self.instance_id,
                     out_dir=self.out_dir, run=self.run, files=list(ALLOWED))
        return d


def _check_run_name(run: str) -> str:
    if run and (not _RUN_NAME.match(run) or run in (".", "..")):
        raise FetchError(f"invalid run folder name {run!r}", hint="a plain folder name under vast.remote_output_dir")
    return run


def _check_remote_path(path: str) -> str:
    if not path.startswith("/") or ".." in path.split("/") or "\n" in path or "\0" in path:
        raise FetchError(f"invalid remote adapter path {path!r}", hint="an absolute path without '..'")
    return posixpath.normpath(path)


def plan_for(cfg: "Config", model_name: str, instance_id: int | str | None = None) -> Plan:
    """Where the model's adapter comes from (no network access)."""
    m = cfg.model(model_name)
    src: AdapterSource = m.adapter_source
    v = cfg.vast
    if instance_id is not None and str(instance_id).strip() != "":
        run = src.path if src.kind == "vast" else ""
        src = AdapterSource("vast", run, instance=str(instance_id).strip())
    if src.kind == "local":
        return Plan("local", src.describe(), path=src.path)
    if src.kind == "ssh":
        return Plan("ssh", src.describe(), path=_check_remote_path(src.path), host=src.host,
                    port=src.port, user=src.user or v.ssh_user)
    run = _check_run_name(src.path or v.run or "")
    described = AdapterSource("vast", run, instance=src.instance).describe()
    named = v.instances.get(src.instance or "")
    if named is not None and named.host:
        return Plan("vast", described, host=named.host, port=named.port, user=named.user or v.ssh_user,
                    out_dir=v.remote_output_dir, run=run)
    iid = named.instance_id if named is not None else src.instance
    try:
        iid = int(str(iid))
    except ValueError:
        raise FetchError(f"vast instance {src.instance!r} is neither an id nor a name under vast.instances") from None
    return Plan("vast", described, instance_id=iid, user=(named.user if named else None) or v.ssh_user,
                out_dir=v.remote_output_dir, run=run)


def fetch_inputs(cfg: "Config", model_name: str, instance_id: int | str | None = None) -> dict[str, Any]:
    """Everything a fetch's result depends on, for the stage's resume hash."""
    plan = plan_for(cfg, model_name, instance_id)
    d = plan.inputs()
    if plan.kind != "local":
        d.update(verify_sha256=cfg.vast.verify_sha256, host_key_policy=cfg.vast.host_key_policy)
    return d


def ssh_target(cfg: "Config", host: str, port: int, user: Optional[str]) -> SshTarget:
    v = cfg.vast
    known = Path(v.known_hosts) if v.known_hosts else Path(cfg.pipeline.state_dir) / "known_hosts"
    known.parent.mkdir(parents=True, exist_ok=True)
    if v.ssh_key is not None and not Path(v.ssh_key).is_file():
        raise FetchError(f"SSH key {v.ssh_key} not found", hint="check vast.ssh_key")
    return SshTarget(host=host, port=port, user=user, identity=v.ssh_key, known_hosts=known,
                     host_key_policy=v.host_key_policy, connect_timeout_s=v.connect_timeout_s,
                     alive_interval_s=v.server_alive_interval_s, alive_count_max=v.server_alive_count_max)


def files_to_fetch(listing: RemoteListing, t: SshTarget, log: logging.Logger) -> list[str]:
    """The allowed files the box has, after refusing what must not be fetched."""
    where = f"{t.describe()}:{listing.run_dir}"
    for name, target in listing.links_outside.items():
        raise FetchError(f"refusing {name} at {where}: symlink leads outside the run folder ({target})")
    bad = [n for n in listing.not_files if n in REQUIRED]
    if bad:
        raise FetchError(f"{bad[0]} at {where} is not a regular readable file")
    missing = [n for n in REQUIRED if n not in listing.files]
    if "adapter_model.safetensors" in missing and any(p in PICKLE_WEIGHTS for p in listing.pickles):
        raise FetchError(f"refusing pickle weights adapter_model.bin at {where}: they can run code when loaded",
                         hint="save the adapter with safe_serialization=True (adapter_model.safetensors)")
    if missing:
        raise FetchError(f"remote path {where} has no {', '.join(missing)}",
                         hint="point the adapter at the folder holding adapter_config.json")
    if listing.pickles:
        log.info("not fetching pickle files %s", ", ".join(listing.pickles))
    return [n for n in ALLOWED if n in listing.files]
