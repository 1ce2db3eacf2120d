"""Serving: registry, processes, ports, launch, switch, proxy. Imports nothing above it
(never deploy, stages or cli); deploy builds versions and targets on top of it."""
from .registry import Endpoint, endpoints, registry_entry  # noqa: F401
from .service import serve_logs, serve_status, serve_stop  # noqa: F401
from .switch import model_state  # noqa: F401
