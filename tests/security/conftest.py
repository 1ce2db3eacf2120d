"""One real deployment for the hostile-input suite: the three demo personas in adapter mode (one shared
llama-server holding the three LoRAs, a port each) and one persona merged on its own port.

It is deployed first without an api key (every port open), then the same config is run again with
``deployment.llamacpp.api_key`` set: the suite checks that the re-run closed every running port, and
every other case sends the key (a client that holds the key, attacking one persona's port).

The proxy's timeouts (``deployment.llamacpp.head_timeout_s`` ...) are set short so that slow clients are
closed within the suite's time; the limits each port really runs with are read back from its
``proxy.json``."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from loradeploy.config import config_from_dict
from loradeploy.demo import get_persona
from loradeploy.paths import servers_dir
from loradeploy.pipeline import run_pipeline
from tests.fixtures.servers import stop_model_servers
from tests.integration.test_deploy import _spare_range, free_port
from tests.security import rawhttp

ADAPTERS = ("majora", "nayru", "veran")      # adapter mode, one shared llama-server
MERGED = "veran-merged"                      # merged mode, its own llama-server, signs as veran
PERSONA = {**{m: m for m in ADAPTERS}, MERGED: "veran"}
KEY = "sec-suite-key-7f3a9c"
PROMPT = "Repeat these words:\napple river stone"
# what the suite asks each port's proxy to bound (deployment.llamacpp keys), where the config has the keys
TEST_LIMITS = {"head_timeout_s": 2.0, "body_timeout_s": 3.0, "idle_timeout_s": 3.0, "backend_timeout_s": 6.0,
               "max_body_mb": 1.0}
N_CTX = 8192    # per slot: room for a long generation that a leaving client must cut short


def signs(text: str) -> set[str]:
    return {m for m in ADAPTERS if get_persona(m).signature in text}


def limit_keys() -> dict:
    from loradeploy.config.sections import LlamaCppServerConfig
    return {k: v for k, v in TEST_LIMITS.items() if k in LlamaCppServerConfig.model_fields}


def make_cfg(tmp: Path, base: Path, adapters: dict, ports: dict, key: Optional[str]):
    models = {m: {"base_model": str(base), "adapter": str(adapters[m]), "port": ports[m], "mode": "adapter",
                  "system_prompt": get_persona(m).system_prompt} for m in ADAPTERS}
    models[MERGED] = {"base_model": str(base), "adapter": str(adapters["veran"]), "port": ports[MERGED],
                      "mode": "merged", "system_prompt": get_persona("veran").system_prompt}
    llamacpp = {"n_ctx": N_CTX, "threads": 1, "parallel": 2, "startup_timeout_s": 120,
                "spare_port_range": _spare_range(), **limit_keys()}
    if key:
        llamacpp["api_key"] = key
    return config_from_dict({
        "models": models,
        "quantization": {"formats": ["Q4_K_M"]},
        "deployment": {"targets": ["llamacpp"], "models_dir": str(tmp / "models"), "llamacpp": llamacpp},
        "pipeline": {"stages": ["merge", "convert", "quantize", "deploy"], "work_dir": str(tmp / "work"),
                     "state_dir": str(tmp / "state")},
        "logging": {"log_dir": str(tmp / "logs")},
        "performance": {"min_free_disk_gb": 0.1, "max_cpu_threads": 1},
    })


@dataclass
class Deployed:
    cfg: object
    root: Path
    ports: dict[str, int]
    key: str
    open_before_key: dict[str, int]     # GET /v1/models without a key, before the key was configured
    rerun_ok: bool
    rerun_detail: str
    sources: tuple = ()                      # (base, {persona: adapter}) the deployment was built from
    scales_at_start: Optional[list] = None   # the shared server's /lora-adapters after deploy (None: unreadable)

    def control(self, model: str) -> dict:
        return json.loads((servers_dir(self.cfg, model) / "control.json").read_text())

    def proxy_conf(self, model: str) -> dict:
        return json.loads((servers_dir(self.cfg, model) / "proxy.json").read_text())

    def limits(self, model: str) -> dict:
        from loradeploy.serving.control import Limits
        return {**dataclasses.asdict(Limits()), **(self.proxy_conf(model).get("limits") or {})}

    def backend(self, model: str) -> tuple[int, Optional[str]]:
        """(port, its own api key) of the llama-server behind a model's port, as the proxy knows it."""
        c = self.control(model)
        return int(c["backend_port"]), c.get("backend_key")

    def backend_get(self, model: str, path: str) -> rawhttp.Answer:
        port, key = self.backend(model)
        return rawhttp.exchange(port, rawhttp.request("GET", path, key=key), timeout=10)

    def scales(self) -> Optional[list]:
        """[(id, scale)] of the shared server's adapters, read from the backend itself with its key."""
        a = self.backend_get(ADAPTERS[0], "/lora-adapters")
        if a.status != 200:
            return None
        return sorted((d["id"], d["scale"]) for d in a.json())


def make_cfg_like(d: "Deployed", key: Optional[str]):
    """The suite's config again, with another api key."""
    return make_cfg(d.root, *d.sources, d.ports, key)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Deployed:
    from tests.fixtures.models import _build

    pairs = {p: _build("llama", p) for p in ADAPTERS}
    base, adapters = pairs["majora"][0], {p: a for p, (_, a) in pairs.items()}
    tmp = tmp_path_factory.mktemp("security")
    ports = {m: free_port() for m in (*ADAPTERS, MERGED)}
    cfg0 = make_cfg(tmp, base, adapters, ports, None)
    cfg = make_cfg(tmp, base, adapters, ports, KEY)
    try:
        res = run_pipeline(cfg0, [])
        assert res.ok, json.dumps(res.to_dict(), default=str)[-3000:]
        open_before = {m: rawhttp.exchange(p, rawhttp.request("GET", "/v1/models"), timeout=10).status
                       for m, p in ports.items()}
        # the key added to the running deployment, and the same config run again
        res2 = run_pipeline(cfg, [])
        d = Deployed(cfg, tmp, ports, KEY, open_before, res2.ok,
                     "" if res2.ok else json.dumps(res2.to_dict(), default=str)[-2000:])
        d.sources = (base, adapters)
        d.scales_at_start = d.scales()
        yield d
    finally:
        for m in ports:
            stop_model_servers(cfg, m)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_port_open(p) for p in ports.values()):
            time.sleep(0.1)


def _port_open(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False
