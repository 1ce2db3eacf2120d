"""What the remote box holds: the run folder and its files (``probe``), and their SHA-256 computed
on the box (``remote_hashes``), each a POSIX ``sh`` script run over ``ssh.run_remote``."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import FetchError
from .ssh import SshTarget, marked, run_remote
from .ssh_transfer import parse_rsync_version

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- probe: where and what

PROBE_SCRIPT = r'''
say() { printf '@@LD %s\n' "$*"; }
# size and mtime: GNU stat, or BSD stat (macOS), which has -f FORMAT where GNU has -c
if stat -c %s / >/dev/null 2>&1; then st() { stat -L -c '%s %Y' -- "$1" 2>/dev/null; }
else st() { stat -L -f '%z %m' -- "$1" 2>/dev/null; }; fi
out=$1 run=$2 dir=$3
shift 3
if [ -z "$dir" ]; then
  if [ ! -d "$out" ]; then say ERR nooutdir "$out"; exit 0; fi
  if [ -n "$run" ]; then
    dir="$out/$run"
  else
    # newest folder that holds an adapter
    dir=$(ls -1td -- "$out"/*/ 2>/dev/null | while IFS= read -r d; do
            if [ -f "${d}adapter_config.json" ]; then printf '%s' "$d"; break; fi; done)
    if [ -z "$dir" ]; then say ERR norun "$out"; exit 0; fi
  fi
fi
if [ ! -d "$dir" ]; then say ERR nodir "$dir"; exit 0; fi
cd -P -- "$dir" 2>/dev/null || { say ERR noaccess "$dir"; exit 0; }
real=$(pwd -P)
say DIR "$real"
if command -v rsync >/dev/null 2>&1; then
  rsync --version 2>/dev/null | while IFS= read -r l; do say RV "$l"; done
fi
for n in "$@"; do
  if [ -L "$n" ]; then
    t=$(readlink -f -- "$n" 2>/dev/null)
    case "$t" in "$real"/*) ;; *) say LINKOUT "$n" "$t"; continue;; esac
  fi
  [ -e "$n" ] || continue
  if [ -f "$n" ]; then
    s=$(st "$n") || { say UNREADABLE "$n"; continue; }
    say F "$s" "$n"
  else
    say NOTFILE "$n"
  fi
done
for n in adapter_model.bin pytorch_model.bin training_args.bin; do
  if [ -e "$n" ]; then say PICKLE "$n"; fi
done
exit 0
'''


@dataclass
class RemoteListing:
    run_dir: str
    files: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (size, mtime s)
    rsync_version: Optional[tuple[int, ...]] = None
    rsync_compress: frozenset[str] = frozenset()
    links_outside: dict[str, str] = field(default_factory=dict)
    not_files: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)


def probe(t: SshTarget, *, out_dir: str, run: str, run_dir: str, names: list[str],
          log_path: Path | None) -> RemoteListing:
    """Resolve the run folder on the box and stat the allowed files in it (no hashing yet)."""
    rc, out = run_remote(t, PROBE_SCRIPT, [out_dir, run, run_dir, *names], log_path=log_path,
                         timeout=t.connect_timeout_s + 60, what="remote listing")
    lines = marked(out)
    errors = {rest.partition(" ")[0]: rest.partition(" ")[2] for tag, rest in lines if tag == "ERR"}
    where = t.describe()
    if "nooutdir" in errors:
        raise FetchError(f"remote path missing: {errors['nooutdir']} does not exist on {where}",
                         hint="check vast.remote_output_dir")
    if "norun" in errors:
        raise FetchError(f"no run folder with adapter_config.json under {errors['norun']} on {where}",
                         hint="has training saved the adapter yet? set vast.run to pick one")
    if "nodir" in errors:
        raise FetchError(f"remote path missing: {errors['nodir']} does not exist on {where}",
                         hint="check the adapter path / vast.run")
    if "noaccess" in errors:
        raise FetchError(f"remote folder {errors['noaccess']} on {where} is not readable")
    dirs = [rest for tag, rest in lines if tag == "DIR"]
    if rc != 0 or not dirs:
        last = out.strip().splitlines()[-1:] or [""]
        raise FetchError(f"remote listing on {where} failed (exit {rc}): {last[0][:200]}",
                         hint="the box needs a POSIX sh, ls and stat")
    listing = RemoteListing(run_dir=dirs[0])
    listing.rsync_version, listing.rsync_compress = parse_rsync_version(
        [rest for tag, rest in lines if tag == "RV"])
    for tag, rest in lines:
        if tag == "F":
            size, mtime, name = rest.split(" ", 2)
            listing.files[name] = (int(size), int(mtime))
        elif tag == "LINKOUT":
            name, _, target = rest.partition(" ")
            listing.links_outside[name] = target
        elif tag in ("NOTFILE", "UNREADABLE"):
            listing.not_files.append(rest)
        elif tag == "PICKLE":
            listing.pickles.append(rest)
    return listing


# ----------------------------------------------------------------------------- remote hashes

HASH_SCRIPT = r'''
say() { printf '@@LD %s\n' "$*"; }
# size and mtime: GNU stat, or BSD stat (macOS), which has -f FORMAT where GNU has -c
if stat -c %s / >/dev/null 2>&1; then st() { stat -L -c '%s %Y' -- "$1" 2>/dev/null; }
else st() { stat -L -f '%z %m' -- "$1" 2>/dev/null; }; fi
cd -P -- "$1" 2>/dev/null || { say ERR nodir "$1"; exit 0; }
shift
hasher=
for h in openssl sha256sum shasum python3; do
  if command -v "$h" >/dev/null 2>&1; then hasher=$h; break; fi
done
if [ -z "$hasher" ]; then say ERR nohasher; exit 0; fi
say HASHER "$hasher"
for n in "$@"; do
  a=$(st "$n") || a="-1 -1"
  case $hasher in
    openssl) s=$(openssl dgst -sha256 -r "$n" 2>/dev/null) ;;
    sha256sum) s=$(sha256sum -- "$n" 2>/dev/null) ;;
    shasum) s=$(shasum -a 256 -- "$n" 2>/dev/null) ;;
    python3) s=$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$n" 2>/dev/null) ;;
  esac
  b=$(st "$n") || b="-1 -1"
  s=${s%% *}
  say H "${s:--}" $a $b "$n"
done
exit 0
'''


@dataclass(frozen=True)
class RemoteHash:
    sha256: Optional[str]
    before: tuple[int, int]    # (size, mtime) just before hashing
    after: tuple[int, int]     # ... and just after: a difference means it changed under us


def remote_hashes(t: SshTarget, run_dir: str, names: list[str], *, log_path: Path | None,
                  timeout: float) -> tuple[str, dict[str, RemoteHash]]:
    """SHA-256 of each file computed on the box, with its stat before and after hashing."""
    rc, out = run_remote(t, HASH_SCRIPT, [run_dir, *names], log_path=log_path, timeout=timeout,
                         what="remote sha256")
    lines = marked(out)
    for tag, rest in lines:
        if tag == "ERR" and rest.startswith("nohasher"):
            raise FetchError(f"{t.describe()} has no sha256 tool (openssl, sha256sum, shasum or python3)",
                             hint="install coreutils on the box, or set vast.verify_sha256: false")
        if tag == "ERR":
            raise FetchError(f"remote path missing: {run_dir} vanished from {t.describe()}")
    hasher = next((rest for tag, rest in lines if tag == "HASHER"), "?")
    result: dict[str, RemoteHash] = {}
    for tag, rest in lines:
        if tag != "H":
            continue
        parts = rest.split(" ", 5)
        if len(parts) != 6:
            continue
        digest, s1, m1, s2, m2, name = parts
        digest = digest.lower()
        result[name] = RemoteHash(digest if _HEX64.match(digest) else None,
                                  (int(s1), int(m1)), (int(s2), int(m2)))
    missing = [n for n in names if n not in result]
    if rc != 0 or missing:
        raise FetchError(f"remote sha256 on {t.describe()} gave no answer for {', '.join(missing) or 'files'} "
                         f"(exit {rc})")
    return hasher, result


