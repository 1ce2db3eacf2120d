"""vast.ai instance id -> SSH host and port, through the `vastai` SDK's own client code."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import FetchError

DEFAULT_API_URL = "https://console.vast.ai"


@dataclass(frozen=True)
class VastEndpoint:
    instance_id: int
    host: str
    port: int
    status: str
    direct: bool          # public IP + mapped port, rather than vast's SSH proxy


def ssh_endpoint(row: dict[str, Any]) -> tuple[str, int, bool]:
    """Pick the SSH address the way ``vastai ssh-url`` does: a direct port mapping when the
    instance has one, else vast's proxy (whose port is one higher on Jupyter images)."""
    ports = row.get("ports") or {}
    direct = ports.get("22/tcp") if isinstance(ports, dict) else None
    if direct and row.get("public_ipaddr"):
        try:
            return str(row["public_ipaddr"]).strip(), int(direct[0]["HostPort"]), True
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    host, port = row.get("ssh_host"), row.get("ssh_port")
    if not host or not port:
        raise FetchError(f"vast.ai instance {row.get('id')} has no SSH address yet",
                         hint="wait until it is running with SSH enabled")
    port = int(port)
    if "jupyter" in str(row.get("image_runtype") or ""):
        port += 1
    return str(host), port, False


def resolve_instance(instance_id: int | str, *, api_key: Optional[str] = None,
                     api_url: Optional[str] = None, timeout: float = 30) -> VastEndpoint:
    """Ask the vast.ai API for an instance and return where to reach it over SSH."""
    try:
        iid = int(str(instance_id).strip())
    except ValueError:
        raise FetchError(f"vast.ai instance id {instance_id!r} is not a number") from None
    key = api_key or os.environ.get("VAST_API_KEY")
    if not key:
        raise FetchError("no vast.ai API key", hint="export VAST_API_KEY=... or set vast.api_key")
    import requests  # the SDK's transport; imported late, like the SDK (slow to import)
    from vastai.api import instances
    from vastai.api.client import VastClient

    url = (api_url or os.environ.get("VAST_URL") or DEFAULT_API_URL).rstrip("/")
    client = VastClient(api_key=key, server_url=url, retry=2, timeout=timeout)
    try:
        row = instances.show_instance(client, iid)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        if code in (401, 403):
            raise FetchError(f"vast.ai rejected the API key (HTTP {code})",
                             hint="check VAST_API_KEY / vast.api_key") from None
        if code == 404:
            raise FetchError(f"vast.ai instance {iid} not found", hint="check the id with `vastai show instances`") from None
        raise FetchError(f"vast.ai API at {url} answered HTTP {code} for instance {iid}") from None
    except requests.RequestException as exc:
        raise FetchError(f"cannot reach the vast.ai API at {url}: {type(exc).__name__}",
                         hint="check the network or vast.api_url") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FetchError(f"vast.ai API at {url} gave an unexpected answer for instance {iid}: {exc}") from None
    if not row:
        raise FetchError(f"vast.ai instance {iid} not found", hint="check the id with `vastai show instances`")
    status = str(row.get("actual_status") or row.get("cur_state") or "unknown")
    if status != "running":
        raise FetchError(f"vast.ai instance {iid} is {status}, not running", hint=f"start it: vastai start instance {iid}")
    host, port, direct = ssh_endpoint(row)
    return VastEndpoint(iid, host, port, status, direct)
