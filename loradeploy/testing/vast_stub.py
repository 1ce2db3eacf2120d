"""A stand-in for the vast.ai API (the one paid outside service, so the one thing faked): it answers
GET /api/v0/instances/<id>/ like the real one, so our real client code path is exercised."""
from __future__ import annotations

import http.server
import json
import threading
import time


def vast_instance_row(iid: int, *, ssh_host: str, ssh_port: int, status: str = "running",
                      direct_port: int | None = None, public_ip: str | None = None) -> dict:
    """An instance as GET /api/v0/instances/{id}/ returns it (trimmed to realistic fields)."""
    ports = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(direct_port)}]} if direct_port else {}
    return {
        "id": iid, "machine_id": 4242, "actual_status": status, "cur_state": status,
        "intended_status": status, "next_state": status, "image_uuid": "pytorch/pytorch:latest",
        "image_runtype": "ssh_direc ssh_proxy", "label": "lora-train", "num_gpus": 1,
        "gpu_name": "RTX 4090", "gpu_util": 0.0, "cpu_cores_effective": 8.0, "disk_space": 100.0,
        "ssh_host": ssh_host, "ssh_port": ssh_port, "ssh_idx": "5",
        "public_ipaddr": public_ip or "203.0.113.7", "local_ipaddrs": "172.17.0.2\n",
        "direct_port_start": direct_port or -1, "direct_port_end": direct_port or -1,
        "ports": ports, "status_msg": "success, running pytorch/pytorch", "jupyter_token": "",
        "extra_env": [["VAST_CONTAINERLABEL", f"C.{iid}"]], "onstart": "", "start_date": time.time() - 3600,
        "end_date": None, "dph_total": 0.42, "template_id": None, "template_hash_id": None,
    }


class VastApiStub:
    """Answers GET /api/v0/instances/<id>/ for instances in ``rows``, checking the bearer key."""

    def __init__(self, api_key: str = "test-key"):
        self.api_key = api_key
        self.rows: dict[int, dict] = {}
        self.requests: list[str] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                stub.requests.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                    return self._send(401, {"success": False, "error": "invalid_user_key",
                                            "msg": "Invalid user key"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] != ["api", "v0", "instances"] or len(parts) != 4:
                    return self._send(404, {"success": False, "error": "not_found"})
                row = stub.rows.get(int(parts[3])) if parts[3].isdigit() else None
                self._send(200, {"instances": row})

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
