"""Accepting a received file: the listing, both remote stats and the received copy agree on size and
mtime, and the SHA-256 computed on the box matches ours.

So a remote file rewritten after it was listed is caught whether the rewrite landed before, during
or after its transfer. (A manifest written by the training job was not used: it can be stale, and
hashing on the box costs a fraction of the transfer.)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..fsutil import sha256_file
from ..tools.ssh_remote import RemoteHash, RemoteListing
from .watcher import Watcher

# progress(description, completed, total), as the stages report it
ProgressFn = Callable[[str, float, float], None]


def _counter(desc: str, start: int, total: int, progress: ProgressFn) -> Callable[[int], None]:
    state = [start]

    def add(n: int) -> None:
        state[0] += n
        progress(desc, state[0], total)
    return add


@dataclass
class Problem:
    name: str
    text: str


def verify_files(names: list[str], listing: RemoteListing, remote: dict[str, RemoteHash], staging: Path,
                 watcher: Watcher, progress: Callable[[str, float, float], None], model: str
            ) -> tuple[list[Problem], dict[str, str]]:
    problems: list[Problem] = []
    local: dict[str, str] = {}
    total = sum(listing.files[n][0] for n in names)
    done = 0
    for name in names:
        path = staging / name
        lsize, lmtime = listing.files[name]
        if not path.is_file():
            problems.append(Problem(name, f"{name} was not received"))
            continue
        digest = watcher.digest_for(path, name)
        if digest is None:
            digest = sha256_file(path, progress=_counter(f"verify {model}", done, total, progress))
        local[name] = digest
        done += lsize
        st = path.stat()
        rh = remote.get(name)
        if rh is not None and (rh.before != (lsize, lmtime) or rh.after != rh.before):
            problems.append(Problem(name, f"remote {name} changed after it was listed "
                                           f"(size/mtime {lsize}/{lmtime} -> {rh.after[0]}/{rh.after[1]}; "
                                           f"remote sha256 {rh.sha256}, local {digest})"))
            continue
        if (st.st_size, int(st.st_mtime)) != (lsize, lmtime):
            problems.append(Problem(name, f"remote {name} changed after it was listed: listed {lsize} bytes "
                                           f"mtime {lmtime}, received {st.st_size} bytes mtime {int(st.st_mtime)}"))
            continue
        if rh is not None and rh.sha256 != digest:
            digest = local[name] = sha256_file(path)     # a watcher slip must never fail a good file
            if rh.sha256 != digest:
                problems.append(Problem(name, f"sha256 mismatch for {name}: remote {rh.sha256}, local {digest}"))
    return problems, local
