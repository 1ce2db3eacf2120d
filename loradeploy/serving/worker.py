"""``python -m loradeploy.serving.worker backend|proxy CONFIG.json``: the processes behind a served
model, started detached by serving.launch (backend) and serving.switch (proxy)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("backend", "proxy"):
        print("usage: python -m loradeploy.serving.worker backend|proxy CONFIG.json", file=sys.stderr)
        return 2
    conf = json.loads(Path(argv[1]).read_text())
    if argv[0] == "backend":
        from .backend import run_backend

        return run_backend(conf)
    from .proxy import run_proxy

    return run_proxy(conf)


if __name__ == "__main__":
    sys.exit(main())
