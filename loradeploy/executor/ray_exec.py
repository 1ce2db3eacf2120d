"""The Ray executor: each model's heavy stages become Ray tasks; Ray packs them onto nodes.

No scheduler, queue or worker protocol of our own: a task declares what it needs (resources.py),
Ray places it, retries it (bounded) when its worker or node dies, and hands back what it returned.
The driver — this process — keeps everything that must have one owner: run records, locks,
notifications. Before a task's artifacts count, the driver re-hashes them on the shared storage.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..fsutil import TMP_MARK, remove_path, sha256_file
from ..stages.base import Artifact, StageContext, StageResult
from .base import HEAVY, ExecutorError, Ran
from .logs import LogTail, remote_paths
from .remote import TaskSpec, run_stage_task
from .resources import Node, Request, alive_nodes, check_feasible, remote_overrides, request_for, storage_of

REMOTE_STATE = Path(".loradeploy-remote") / "state"
POLL_S = 0.5  # how often the driver copies a running task's log and progress


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("performance.executor is ray but the ray package is not installed",
                          hint="pip install -e '.[ray]'") from None
    return ray


class RayExecutor:
    name = "ray"

    def __init__(self, cfg: Config):
        self.rc = cfg.performance.ray
        self.storage = storage_of(cfg)
        self._owns = False
        self._fn: Any = None

    # ------------------------------------------------------------------ lifecycle

    def run_config(self, cfg: Config) -> Config:
        """The run's config: every work artifact on the shared storage, so any node can read what
        another wrote (the fetched adapter, the merged folder, the GGUFs)."""
        pipe = cfg.pipeline.model_copy(update={"work_dir": self.storage})
        return cfg.model_copy(update={"pipeline": pipe})

    def start(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            # Our logs travel through the storage (logs.py); Ray's own banner and notices would reach
            # the user's terminal, and library code never prints: only Ray's errors get through.
            kw: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
            if self.rc.address is None:
                kw["include_dashboard"] = False  # a private instance for one run: nobody looks at it
            try:
                ray.init(address=self.rc.address, **kw)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError ... for one cause
                where = self.rc.address or "a local instance"
                raise ExecutorError(f"cannot start or reach the Ray cluster ({where}): {type(exc).__name__}: "
                                    f"{exc}", hint="start the head with `ray start --head`, or fix "
                                                   "performance.ray.address") from None
            self._owns = True
        self._fn = ray.remote(run_stage_task)
        self.storage.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        if self._owns:
            _ray().shutdown()
            self._owns = False

    def packs(self, phase: tuple[str, ...]) -> bool:
        """Models side by side in the heavy phase: Ray decides what fits where."""
        return any(s in HEAVY for s in phase)

    # ------------------------------------------------------------------ one stage

    def nodes(self) -> list[Node]:
        return alive_nodes(_ray().nodes())

    def run(self, stage: str, obj, ctx: StageContext) -> Ran:
        if stage not in HEAVY:
            return Ran(obj.run(ctx))
        ray = _ray()
        nodes = self.nodes()
        req = request_for(ctx, stage, nodes)
        check_feasible(req, ctx.model_name, nodes)
        log_p, prog_p = remote_paths(self.storage, ctx.model_name, stage, uuid.uuid4().hex[:12])
        spec = TaskSpec(self._task_cfg(ctx.cfg, req), ctx.model_name, stage, dict(ctx.upstream),
                        dict(ctx.options), log_p, prog_p, req.describe())
        history = self._history_paths(ctx)
        remove_path(history[0])
        t0, submitted = time.monotonic(), time.time()
        ref = self._fn.options(**req.options(), max_retries=self.rc.max_retries, retry_exceptions=False,
                               name=f"loradeploy:{ctx.model_name}:{stage}").remote(spec)
        ctx.log.info("%s: submitted to Ray, asking for %s", stage, req.describe())
        ctx.progress(f"waiting for a Ray node with {req.describe()}", 0, 0)
        tail = LogTail(log_p, prog_p, ctx.log_path, ctx.progress)
        try:
            out = self._wait(ray, ref, tail, ctx, stage)
        finally:
            tail.finish()
            self._sweep(ctx)
            self._adopt_history(*history)
        wall = time.monotonic() - t0
        node = self._node_name(out["node_id"])
        where = f"{node} ({out['node_id'][:8]})"
        if "error" in out:
            raise out["error"]
        if "crash" in out:
            raise ExecutorError(f"{stage} crashed on Ray node {where}: {out['crash']}", hint=f"see {ctx.log_path}")
        arts = [self._verified(a, ctx.model_name, stage, where) for a in out["artifacts"]]
        info = {**out["info"], "executor": "ray", "node": node, "node_id": out["node_id"],
                "ray": {**req.options(), "memory_gib": round(req.memory / 2**30, 3),
                        "seconds_on_node": round(out["seconds"], 3), "seconds_on_driver": round(wall, 3),
                        # wall clocks of two machines: as good as their time sync
                        "queued_s": round(max(0.0, out["started_at"] - submitted), 3),
                        "returned_s": round(max(0.0, submitted + wall - out["ended_at"]), 3)}}
        ctx.log.info("%s: ran on Ray node %s in %.1fs (%.1fs here)", stage, where, out["seconds"], wall)
        return Ran(StageResult(arts, info), out["peak_rss_mib"], out["start_rss_mib"], note=f"on {where}")

    def _wait(self, ray, ref, tail: LogTail, ctx: StageContext, stage: str) -> dict:
        try:
            while True:
                ready, _ = ray.wait([ref], timeout=POLL_S)
                tail.pump()
                if ready:
                    break
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ExecutorError(f"{stage} of {ctx.model_name} was lost on the Ray cluster "
                                f"(after {self.rc.max_retries} retries): {type(exc).__name__}: {first}",
                                hint="check the nodes (ray status); raise performance.ray.max_retries") from None
        except BaseException:
            ray.cancel(ref, force=True)  # Ctrl-C or a dying driver: the task must not outlive the run
            raise

    def _task_cfg(self, cfg: Config, req: Request) -> Config:
        """The task's own copy of the config: budgets within its reservation; caches and appended
        history under the storage (the driver's state folder stays the driver's)."""
        upd: dict[str, Any] = {
            "performance": cfg.performance.model_copy(update={**remote_overrides(req), "executor": "local"}),
            "pipeline": cfg.pipeline.model_copy(update={"state_dir": self.storage / REMOTE_STATE}),
        }
        if req.num_gpus == 0 and cfg.merge.device == "auto":
            # never a GPU Ray did not reserve for this task (another task may hold it)
            upd["merge"] = cfg.merge.model_copy(update={"device": "cpu"})
        return cfg.model_copy(update=upd)

    def _node_name(self, node_id: str) -> str:
        for n in alive_nodes(_ray().nodes()) if node_id else ():
            if n.node_id == node_id:
                return n.name
        return node_id[:8] or "?"

    def _verified(self, a: dict, model: str, stage: str, where: str) -> Artifact:
        """The artifact as this machine sees it: present, and byte for byte what the node wrote."""
        from ..merge import folder_digest

        p = Path(a["path"])
        if not p.exists():
            raise ExecutorError(f"{stage} of {model} wrote {p} on Ray node {where}, but this machine does not see it",
                                hint="performance.ray.storage must be one shared folder at the same path on "
                                     "every node")
        digest = a.get("sha256")
        if digest is not None:
            here = folder_digest(p) if p.is_dir() else sha256_file(p)
            if here != digest:
                raise ExecutorError(f"{p} differs here from what {stage} wrote on Ray node {where} "
                                    f"(sha256 {here[:12]} vs {digest[:12]})",
                                    hint="the shared storage is not consistent across nodes; re-run the stage")
        return Artifact.of(p, a["kind"], a.get("format"), sha256=digest, hash_file=False)

    def _sweep(self, ctx: StageContext) -> None:
        """Drop temporaries a task left behind (its node died mid-write). Safe: this model's stages
        run one at a time, and only this driver runs this model (its lock)."""
        work = Path(ctx.paths.work)
        if work.exists():
            for p in work.rglob(f"*{TMP_MARK}"):
                ctx.log.warning("removing %s, left by a task that did not finish", p)
                remove_path(p)

    def _history_paths(self, ctx: StageContext) -> tuple[Path, Path]:
        """verify appends to the model's history: (the task's file on the storage, the driver's file)."""
        from ..verify.report import history_path
        return (history_path(self.storage / REMOTE_STATE, ctx.model_name),
                history_path(ctx.cfg.pipeline.state_dir, ctx.model_name))

    @staticmethod
    def _adopt_history(remote: Path, local: Path) -> None:
        try:
            data = remote.read_bytes()
        except OSError:
            return
        if data:
            local.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        remove_path(remote)
