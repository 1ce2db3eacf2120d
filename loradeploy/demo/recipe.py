"""Build bookkeeping shared by every demo builder: a marker naming the recipe that made a folder,
so a build is reused only when it is this very recipe, and a quiet, seeded torch."""
from __future__ import annotations

import contextlib
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

from ..errors import InputError

Progress = Callable[[str, float, float], None]

ARCHS = ("llama", "qwen2")
BUILD_MARKER = "loradeploy-build.json"
# run.py only writes the demo config and __init__.py only re-exports: editing them keeps the models;
# text_model.py's builds carry its own digest (and this one)
_NOT_RECIPE = {"run.py", "__init__.py", "text_model.py"}


def _recipe_digest() -> str:
    """Builds record this digest of the code and corpus that made them, so any change to a recipe
    rebuilds cached models instead of reusing stale ones."""
    h = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        if module.name not in _NOT_RECIPE:
            h.update(module.read_bytes())
    h.update(resources.files("loradeploy.data").joinpath("tokenizer_corpus.txt").read_bytes())
    return h.hexdigest()[:16]


BUILD_VERSION = _recipe_digest()


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return None


def already_built(out_dir: Path, params: dict) -> bool:
    """True when ``out_dir`` holds this very build; refuses to replace a folder we did not make."""
    if not out_dir.exists():
        return False
    marker = read_marker(out_dir)
    if marker is not None:
        return all(marker.get(k) == v for k, v in params.items())
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not a loradeploy demo build",
                         hint="choose an empty or new folder")
    return False


def write_marker(folder: Path, params: dict) -> None:
    (folder / BUILD_MARKER).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")


def report_progress(progress: Progress | None, desc: str, done: float, total: float) -> None:
    if progress is not None:
        progress(desc, done, total)


@contextlib.contextmanager
def torch_env(seed: int) -> Iterator[None]:
    """One torch thread: on two shared cores a second OpenMP thread spin-waits against other
    processes and makes these tiny matmuls up to ten times slower. Seeded without disturbing the
    caller's RNG."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
