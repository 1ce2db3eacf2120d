"""Fetch throughput against plain rsync of the same files, over the same loopback sshd, same run.

    .venv/bin/python bench/fetch.py [--size-mb 320] [--rounds 3]

Prints: plain `rsync -t` seconds and MiB/s; ours (probe + transfer + SHA-256 on both ends +
fsync + metadata) seconds and MiB/s; their ratio (goal >= 0.9); and the bytes a resume moves
after the link is dropped in the middle of the weights file.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from loradeploy.config import config_from_dict  # noqa: E402
from loradeploy.errors import FetchError  # noqa: E402
from loradeploy.fetch import fetch_adapter  # noqa: E402
from loradeploy.testing.sshd import start_sshd, throttled_rsync  # noqa: E402

MiB = 1 << 20


def make_adapter(server, size_mb: int) -> tuple[Path, list[str]]:
    files = {
        "adapter_config.json": b'{"peft_type": "LORA", "r": 64, "lora_alpha": 128}',
        "tokenizer.json": os.urandom(2 * MiB),
        "tokenizer_config.json": b'{"model_max_length": 32768}',
        "special_tokens_map.json": b'{"eos_token": "<|im_end|>"}',
    }
    run = server.make_run("bench-run", files)
    with open(run / "adapter_model.safetensors", "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(MiB))
    return run, sorted(list(files) + ["adapter_model.safetensors"])


def config(tmp: Path, server, run: Path, **vast):
    kh = server.write_known_hosts(tmp / "state" / "known_hosts")
    return config_from_dict({
        "vast": {"ssh_key": str(server.client_key), "known_hosts": str(kh), "ssh_user": server.user, **vast},
        "pipeline": {"work_dir": str(tmp / "work"), "state_dir": str(tmp / "state")},
        "logging": {"log_dir": str(tmp / "logs")},
        "performance": {"min_free_disk_gb": 0},
        "models": {"bench": {"base_model": str(tmp / "base"), "adapter": server.url(run), "port": 5000}},
    }, base_dir=tmp)


def plain_rsync(tmp: Path, server, run: Path, names: list[str], cipher: str | None = None,
                fsync: bool = False) -> float:
    dest = tmp / "plain"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    (tmp / "names").write_text("".join(n + "\n" for n in names))
    ssh = (f"ssh -o BatchMode=yes -o UserKnownHostsFile={tmp / 'state' / 'known_hosts'} "
           f"-i {server.client_key} -p {server.port}" + (f" -c {cipher}" if cipher else ""))
    t0 = time.perf_counter()
    subprocess.run(["rsync", "-t", *(["--fsync"] if fsync else []), f"--files-from={tmp / 'names'}", "-e", ssh,
                    f"{server.user}@127.0.0.1:{run}/", f"{dest}/"], check=True)
    return time.perf_counter() - t0


def ours(tmp: Path, cfg) -> tuple[float, dict]:
    shutil.rmtree(tmp / "work", ignore_errors=True)
    t0 = time.perf_counter()
    meta = fetch_adapter(cfg, "bench").meta
    return time.perf_counter() - t0, meta


def drop_link() -> bool:
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() == "ssh" and "--server" in " ".join(p.cmdline()):
                p.send_signal(signal.SIGKILL)
                return True
        except psutil.Error:
            pass
    return False


def resume_bench(tmp: Path, server, cfg, total: int) -> dict:
    shutil.rmtree(tmp / "work", ignore_errors=True)
    server.restrict_tools(add={"rsync": throttled_rsync(65536)})
    cut = []

    def progress(desc, done, tot):
        if not cut and done >= tot * 0.5:
            cut.append(drop_link())

    try:
        fetch_adapter(cfg, "bench", progress=progress)
        raise SystemExit("the link drop did not interrupt the transfer")
    except FetchError as exc:
        first_error = exc.one_line()
    server.set_remote_path(None)
    partial = tmp / "work" / "bench" / ".adapter.incoming" / ".rsync-partial" / "adapter_model.safetensors"
    kept = sum(p.stat().st_size for p in (tmp / "work" / "bench" / ".adapter.incoming").rglob("*") if p.is_file()
               and p.name != ".files-from")
    have = partial.stat().st_size if partial.exists() else 0
    t0 = time.perf_counter()
    meta = fetch_adapter(cfg, "bench").meta
    return {"error": first_error, "kept": kept, "partial": have, "rest": total - kept,
            "received": meta["bytes_transferred"], "literal": meta["literal_bytes"],
            "matched": meta["matched_bytes"], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--zstd", action="store_true", help="also time ours with zstd forced")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="ld-bench-fetch-"))
    server = start_sshd(tmp / "sshd")
    try:
        run, names = make_adapter(server, args.size_mb)
        total = sum((run / n).stat().st_size for n in names)
        cfg = config(tmp, server, run)
        plain_rsync(tmp, server, run, names)          # warm the page cache and sshd
        plain_t, aes_t, sync_t, ours_t, zstd_t = [], [], [], [], []

        def run_ours() -> float:
            t, meta = ours(tmp, cfg)
            assert meta["verified_sha256"] and meta["tool"] == "rsync"
            return t

        jobs = [(plain_t, lambda: plain_rsync(tmp, server, run, names)),
                (aes_t, lambda: plain_rsync(tmp, server, run, names, cipher="aes128-gcm@openssh.com")),
                (sync_t, lambda: plain_rsync(tmp, server, run, names, cipher="aes128-gcm@openssh.com", fsync=True)),
                (ours_t, run_ours)]
        for i in range(args.rounds):
            for k in range(len(jobs)):          # rotate the order: no job always runs first
                times, job = jobs[(i + k) % len(jobs)]
                os.sync()                      # nobody pays for the previous run's writeback
                times.append(job())
        if args.zstd:
            zcfg = config(tmp, server, run, compression="zstd")
            for _ in range(args.rounds):
                os.sync()
                zstd_t.append(ours(tmp, zcfg)[0])
        mib = total / MiB
        p, a, o = statistics.median(plain_t), statistics.median(aes_t), statistics.median(ours_t)
        f = statistics.median(sync_t)
        print(f"files: {len(names)}, {mib:.1f} MiB over loopback sshd; {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}; median of {args.rounds}")
        print(f"plain rsync -t        : {p:6.2f} s  {mib / p:7.1f} MiB/s   runs {', '.join(f'{x:.2f}' for x in plain_t)}")
        print(f"plain rsync, AES-GCM  : {a:6.2f} s  {mib / a:7.1f} MiB/s   runs {', '.join(f'{x:.2f}' for x in aes_t)}"
              f"   (the cipher we prefer)")
        print(f"plain, AES-GCM, fsync : {f:6.2f} s  {mib / f:7.1f} MiB/s   runs {', '.join(f'{x:.2f}' for x in sync_t)}"
              f"   (rsync --fsync: durable like ours)")
        print(f"loradeploy fetch      : {o:6.2f} s  {mib / o:7.1f} MiB/s   runs {', '.join(f'{x:.2f}' for x in ours_t)}"
              f"   (sha256 both ends, fsync, metadata)")
        if zstd_t:
            z = statistics.median(zstd_t)
            print(f"loradeploy fetch zstd : {z:6.2f} s  {mib / z:7.1f} MiB/s   (compression forced; random data)")
        print(f"throughput ratio ours/plain: {p / o:.2f}x (goal >= 0.9); "
              f"ours/plain-with-same-cipher: {a / o:.2f}x; ours/same-cipher-and-fsync: {f / o:.2f}x")
        r = resume_bench(tmp, server, cfg, total)
        print(f"resume after a link drop mid-file ({r['error'][:80]}...):")
        print(f"  kept locally {r['kept'] / MiB:.1f} MiB (partial weights {r['partial'] / MiB:.1f} MiB), "
              f"rest {r['rest'] / MiB:.1f} MiB")
        print(f"  re-run received {r['received'] / MiB:.2f} MiB (literal {r['literal'] / MiB:.2f} MiB, "
              f"matched {r['matched'] / MiB:.1f} MiB) in {r['seconds']:.2f} s "
              f"= {r['received'] / max(r['rest'], 1):.3f} x the rest")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
