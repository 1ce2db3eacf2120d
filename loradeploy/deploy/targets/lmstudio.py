"""LM Studio: the GGUF in <home>/models/<publisher>/<model>/ and the system prompt in a preset.

LM Studio lists only files exactly two folders below models/ (publisher/model). The preset follows
LM Studio's current config-preset format: ``<home>/config-presets/<name>.preset.json`` holding
``identifier`` ("@local:<name>"), ``name``, and ``operation.fields`` entries ``{key, value}`` with
the system prompt under ``llm.prediction.systemPrompt`` (load settings under ``load.fields``).
With the ``lms`` CLI (on PATH, or in <home>/bin where LM Studio installs it) the model is also loaded
under the model's name as identifier and LM Studio's server started on
deployment.lmstudio.server_port; without it the app must load it. <home> is deployment.lmstudio.home;
left at its default, ~/.lmstudio-home-pointer is followed when LM Studio moved its home, and its
settings.json's ``downloadsFolder`` (the app's models directory) replaces <home>/models.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ...errors import DeployError, ProcError
from ...fsutil import atomic_output, atomic_symlink, remove_path

if TYPE_CHECKING:
    from ...config import Config
    from ..versions import Version


class _LmsError(DeployError, ProcError):
    pass


def publisher_for(cfg: "Config", model: str) -> str:
    return cfg.models[model].publisher or cfg.deployment.lmstudio.publisher


DEFAULT_HOME = Path("~/.lmstudio")
HOME_POINTER = ".lmstudio-home-pointer"   # in the user's home: the path of LM Studio's home when moved


def lmstudio_home(cfg: "Config") -> Path:
    """deployment.lmstudio.home; left at ~/.lmstudio, the folder ~/.lmstudio-home-pointer names
    instead (LM Studio writes that file, and reads its home from it, when the home is elsewhere)."""
    home = Path(cfg.deployment.lmstudio.home)
    if home != DEFAULT_HOME.expanduser():
        return home
    try:
        named = (Path.home() / HOME_POINTER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return home
    return Path(os.path.expanduser(named)) if named and os.path.isabs(os.path.expanduser(named)) else home


def models_root(cfg: "Config") -> Path:
    """LM Studio's models folder: <home>/models, or the one its settings.json sets (downloadsFolder,
    the app's "Models Directory")."""
    home = lmstudio_home(cfg)
    try:
        folder = json.loads((home / "settings.json").read_text(encoding="utf-8")).get("downloadsFolder")
    except (OSError, ValueError, AttributeError):
        folder = None
    return Path(os.path.expanduser(folder)) if isinstance(folder, str) and folder.strip() else home / "models"


def lms_cli(cfg: "Config") -> str | None:
    """The ``lms`` CLI: on PATH, else where LM Studio installs it (<home>/bin/lms)."""
    found = shutil.which("lms")
    if found:
        return found
    for home in dict.fromkeys((lmstudio_home(cfg), DEFAULT_HOME.expanduser())):
        cand = home / "bin" / "lms"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def model_folder(cfg: "Config", model: str) -> Path:
    return models_root(cfg) / publisher_for(cfg, model) / model


def preset_path(cfg: "Config", model: str) -> Path:
    return lmstudio_home(cfg) / "config-presets" / f"{model}.preset.json"


def preset(cfg: "Config", model: str) -> dict:
    return {
        "identifier": f"@local:{model}",
        "name": model,
        "changed": True,
        "operation": {"fields": [{"key": "llm.prediction.systemPrompt", "value": cfg.models[model].system_prompt}]},
        "load": {"fields": [{"key": "llm.load.contextLength", "value": cfg.deployment.llamacpp.n_ctx}]},
    }


def _place(src: Path, dst: Path, mode: str) -> str:
    if mode == "symlink":
        atomic_symlink(src.resolve(), dst)
        return "symlink"
    with atomic_output(dst) as tmp:
        if mode == "hardlink":
            try:
                os.link(src, tmp)
                return "hardlink"
            except OSError:
                pass  # another filesystem: fall back to a copy
        shutil.copyfile(src, tmp)
    return "copy"


class LMStudioTarget:
    name = "lmstudio"

    def deploy(self, cfg: "Config", model: str, version: "Version",
               progress: Callable[[str, float, float], None] | None = None) -> dict:
        lm = cfg.deployment.lmstudio
        folder = model_folder(cfg, model)
        dst = folder / version.file
        ppath = preset_path(cfg, model)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            ppath.parent.mkdir(parents=True, exist_ok=True)
            how = _place(version.path, dst, lm.link_mode)
            # One file per model folder: LM Studio would otherwise list every old version too.
            for other in folder.iterdir():
                if other != dst and other.name.endswith(".gguf"):
                    remove_path(other)
            with atomic_output(ppath) as tmp:
                tmp.write_text(json.dumps(preset(cfg, model), indent=2, ensure_ascii=False))
        except OSError as exc:
            raise DeployError(f"LM Studio home {lmstudio_home(cfg)} is not writable: {exc.strerror or exc}",
                              hint="fix its permissions or set deployment.lmstudio.home") from None
        info = {"file": str(dst), "link": how, "preset": str(ppath), "identifier": model}
        lms = lms_cli(cfg) if lm.use_cli else None
        if lms is None:
            info["note"] = (f"files and preset placed; open LM Studio to load {publisher_for(cfg, model)}/{model} "
                            f"with preset {model} (no lms CLI on PATH or in {lmstudio_home(cfg) / 'bin'})")
            return info
        from ...tools.proc import run

        key = f"{publisher_for(cfg, model)}/{model}"
        run([lms, "unload", model], check=False, timeout=120, what="lms unload")
        run([lms, "load", key, "--identifier", model, "-y"], timeout=600, what="lms load", error_cls=_LmsError)
        run([lms, "server", "start", "--port", str(lm.server_port)], timeout=120, what="lms server start",
            error_cls=_LmsError)
        info.update(loaded=True, url=f"http://127.0.0.1:{lm.server_port}")
        return info

    def check(self, cfg: "Config", model: str, sha256: str) -> tuple[bool, str]:
        folder = model_folder(cfg, model)
        files = [p for p in folder.glob("*.gguf") if p.is_file()] if folder.is_dir() else []
        if not files:
            return False, f"no GGUF in {folder}"
        if not preset_path(cfg, model).is_file():
            return False, "preset missing"
        return True, "files in place"
