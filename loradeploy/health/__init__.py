"""Health of deployed models: the GGUF on disk (files), the API and a real completion (api), the
machine (system); check runs them into a HealthReport, render draws it.

The names callers use are re-exported here, so ``from loradeploy.health import check_health``
does not depend on which module a function lives in.
"""
from .api import Completion, client_for, complete, model_checks, models_check, port_check  # noqa: F401
from .check import check_and_notify, HealthReport, ModelHealth, check_health, exit_code, probe  # noqa: F401
from .files import file_checks  # noqa: F401
from .render import render  # noqa: F401
from .results import (DEGRADED, EXIT_CODES, FAIL, HEALTHY, PASS, SKIP, UNHEALTHY, WARN, Check,  # noqa: F401
                      EndpointLike, verdict)
from .system import disk_checks, gpu_checks, memory_check, process_check, system_checks  # noqa: F401
