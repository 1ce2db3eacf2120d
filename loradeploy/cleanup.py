"""`loradeploy clean`: temporaries only, never a live or backed-up model."""
from __future__ import annotations

from pathlib import Path

from .config import Config
from .fsutil import TMP_MARK, dir_size, remove_path
from .state import load_record, save_record


def _protected(cfg: Config) -> set[Path]:
    keep = {Path(cfg.deployment.models_dir).resolve()}
    if cfg.deployment.backups_dir:
        keep.add(Path(cfg.deployment.backups_dir).resolve())
    return keep


def clean(cfg: Config, *, dry_run: bool = False) -> list[dict]:
    """Merged HF folders (unless merge.save_merged_hf), F16 GGUFs (unless quantization.keep_f16 or
    served), and stale partial files left by killed runs."""
    items: list[tuple[Path, str, str, str | None]] = []
    keep = _protected(cfg)
    for name in cfg.models:
        rec = load_record(cfg.pipeline.state_dir, name)
        merged = Path(cfg.pipeline.work_dir) / name / "merged"
        if merged.exists() and not cfg.merge.save_merged_hf:
            items.append((merged, "merged HF folder", name, "merge"))
        if not cfg.quantization.keep_f16:
            served = {a.get("format") for a in (rec["stages"].get("quantize") or {}).get("artifacts", [])}
            for a in (rec["stages"].get("convert") or {}).get("artifacts", []):
                p = Path(a["path"])
                if p.exists() and a.get("format") not in served:
                    items.append((p, "converted GGUF", name, "convert"))
        work = Path(cfg.pipeline.work_dir) / name
        if work.exists():
            for p in work.rglob(f"*{TMP_MARK}"):
                items.append((p, "partial file from an interrupted run", name, None))
    out = []
    for p, why, name, stage in items:
        rp = p.resolve()
        if any(rp == k or k in rp.parents for k in keep):
            continue
        out.append({"path": str(p), "size": dir_size(p) if p.exists() else 0, "what": why})
        if not dry_run:
            remove_path(p)
            if stage:
                rec = load_record(cfg.pipeline.state_dir, name)
                r = rec["stages"].get(stage)
                if r and any(a["path"] == str(p) for a in r.get("artifacts", [])):
                    r["cleaned"] = True
                    save_record(cfg.pipeline.state_dir, name, rec)
    return out
