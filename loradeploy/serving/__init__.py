"""Serving: the record of what is served, processes, ports, launch, the serving strategies (merged,
adapter), proxy. Imports nothing above it (never deploy, stages or cli); deploy builds versions and
targets on top of it."""
from .record import entry as served_model  # noqa: F401
from .registry import Endpoint, endpoints  # noqa: F401
from .service import serve_logs, serve_status, serve_stop  # noqa: F401
from .strategy import Offer, model_state, strategy_for  # noqa: F401
