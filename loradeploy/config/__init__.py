"""The YAML config: frozen pydantic models for every section, validated once at load.

Errors read ``section.key: what is wrong``. ``${VAR}`` and ``${VAR:-default}`` expand from the
environment before validation, so secrets never need to live in the file. ``Config.warnings`` lists
what loads but is probably not meant (logged at load on ``loradeploy.config``; the CLI prints them).

Layout: ``base`` (shared types, validators, type tables), ``sections`` and ``notifications`` (one
model per YAML section), ``model`` (models and the whole Config with its cross-section rules),
``load`` (YAML, environment expansion, error wording).
"""
from .base import (CONVERT_TYPES, GGML_TENSOR_TYPES, NEEDS_IMATRIX, QUANT_TYPES, STAGES, QuantName, RelPath, Stage,
                   is_loopback)
from .load import config_from_dict, expand_env, load_config
from .model import AdapterSource, Config, ModelConfig, parse_adapter_source
from .notifications import EmailConfig, NotificationsConfig, NotifyEvent, WebhookConfig
from .sections import (DeploymentConfig, EvaluationConfig, HealthCheckConfig, LlamaCppServerConfig, LMStudioConfig,
                       LoggingConfig, MergeConfig, OllamaConfig, PerformanceConfig, PipelineConfig, QuantizationConfig,
                       VastConfig, VastInstance)

__all__ = [
    "AdapterSource", "CONVERT_TYPES", "Config", "DeploymentConfig", "EmailConfig", "EvaluationConfig",
    "GGML_TENSOR_TYPES", "HealthCheckConfig", "LMStudioConfig", "LlamaCppServerConfig", "LoggingConfig",
    "MergeConfig", "ModelConfig", "NEEDS_IMATRIX", "NotificationsConfig", "NotifyEvent", "OllamaConfig",
    "PerformanceConfig", "PipelineConfig", "QUANT_TYPES", "QuantName", "QuantizationConfig", "RelPath", "STAGES",
    "Stage", "VastConfig", "VastInstance", "WebhookConfig", "config_from_dict", "expand_env", "is_loopback",
    "load_config", "parse_adapter_source",
]
