"""``python -m loradeploy.serving.worker backend|proxy CONFIG.json``: the processes behind a served
model, started detached by serving.launch (backend) and serving.switch (proxy)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _supervise_backend(conf_path: Path, conf: dict) -> int:
    """The server (llama-server, or the python backend in a child process) runs as this process's
    child, so that how it ends — a signal included, which no other process could learn — is written
    next to its config for status and health to report."""
    import time

    from ..fsutil import atomic_write_text
    from ..tools.proc import describe_exit, supervise
    from .backends import child_argv
    from .registry import exit_path, server_path

    code = supervise(child_argv(conf, conf_path), record_path=server_path(conf_path))
    atomic_write_text(exit_path(conf_path), json.dumps({"code": code, "how": describe_exit(code), "at": time.time()}))
    print(f"backend {describe_exit(code)}", file=sys.stderr, flush=True)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("backend", "backend-child", "proxy"):
        print("usage: python -m loradeploy.serving.worker backend|proxy CONFIG.json", file=sys.stderr)
        return 2
    conf_path = Path(argv[1])
    if argv[0] == "proxy":  # the proxy reads (and on SIGHUP re-reads) its typed ProxyConf itself
        from .proxy import run_proxy

        return run_proxy(conf_path)
    conf = json.loads(conf_path.read_text())
    if argv[0] == "backend-child":
        from .backend import run_backend

        return run_backend(conf)
    return _supervise_backend(conf_path, conf)


if __name__ == "__main__":
    sys.exit(main())
