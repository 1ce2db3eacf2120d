"""`loradeploy status`: per model, the last run's stages and artifacts plus its servers."""
from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.table import Table

from .config import STAGES, Config
from .state import RunRecord


def collect_status(cfg: Config) -> dict:
    servers: list[dict] = []
    try:
        from .serving import serve_status
        servers = serve_status(cfg)
    except ImportError:
        pass
    by_model = {s.get("model"): s for s in servers}
    out: dict = {"models": {}}
    for name, m in cfg.models.items():
        rec = RunRecord.load(cfg.pipeline.state_dir, name)
        stages = {}
        for s in STAGES:
            r = rec.stage(s)
            if r:
                stages[s] = {"status": r.get("status"), "seconds": r.get("seconds"),
                             "peak_rss_mib": r.get("peak_rss_mib"), "ended_at": r.get("ended_at"),
                             "error": r.get("error"), "cleaned": r.get("cleaned", False)}
        arts = rec.ggufs(existing=False)
        srv = by_model.get(name) or {}
        out["models"][name] = {
            "version": m.version, "port": m.port, "stages": stages,
            "artifacts": [{"format": a.format, "path": a.path, "size": a.size,
                           "present": Path(a.path).exists()} for a in arts],
            "server": {k: srv.get(k) for k in ("version", "format", "port", "pid", "state", "url")} if srv else None,
        }
    return out


def render_status(data: dict) -> Group:
    t = Table(title="models")
    for c in ("model", "version", "port", "pid", "state", *STAGES):
        t.add_column(c)
    for name, d in data["models"].items():
        srv = d.get("server") or {}
        cells = [name, str(srv.get("version") or d["version"]), str(srv.get("port") or d["port"]),
                 str(srv.get("pid") or "-"), str(srv.get("state") or "not deployed")]
        for s in STAGES:
            st = (d["stages"].get(s) or {}).get("status") or "-"
            cells.append(st)
        t.add_row(*cells)
    a = Table(title="artifacts")
    for c in ("model", "format", "MiB", "path"):
        a.add_column(c)
    for name, d in data["models"].items():
        for art in d["artifacts"]:
            a.add_row(name, art["format"] or "", f"{(art['size'] or 0) / 2**20:.1f}",
                      art["path"] + ("" if art["present"] else " [red](missing)[/]"))
    return Group(t, a)
