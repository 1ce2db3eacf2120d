"""The YAML config: frozen pydantic models for every section, validated once at load.

Errors read ``section.key: what is wrong``. ``${VAR}`` and ``${VAR:-default}`` expand from the
environment before validation, so secrets never need to live in the file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional
from urllib.parse import urlparse

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from .errors import ConfigError

STAGES: tuple[str, ...] = ("fetch", "merge", "convert", "quantize", "deploy", "health", "evaluate")
Stage = Literal["fetch", "merge", "convert", "quantize", "deploy", "health", "evaluate"]

# llama.cpp quantization types by name (llama_ftype). Kept here so config validation needs no
# compiled library; tools/llama_quantize.py checks it against the linked llama.cpp at run time.
QUANT_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
    "MXFP4_MOE": 38,
}
# Types whose quality collapses without an importance matrix; llama.cpp refuses them without one.
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "Q2_K_S"}
# ggml tensor types accepted for --output-tensor-type / --token-embedding-type.
GGML_TENSOR_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                     "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}
CONVERT_TYPES = ("f16", "bf16", "f32", "q8_0")

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _resolve(p: Path | None, info: ValidationInfo) -> Path | None:
    if p is None:
        return None
    p = Path(os.path.expanduser(str(p)))
    base = (info.context or {}).get("base_dir") if info.context else None
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return p


def _rel_path(v: Path, info: ValidationInfo) -> Path:
    return _resolve(v, info)


RelPath = Annotated[Path, AfterValidator(_rel_path)]


def _quant_name(v: str) -> str:
    name = str(v).strip().upper()
    if name not in QUANT_TYPES:
        known = ", ".join(sorted(QUANT_TYPES))
        raise ValueError(f"unknown llama.cpp quantization type {v!r}; known: {known}")
    return name


QuantName = Annotated[str, AfterValidator(_quant_name)]


def _tensor_type(v: Optional[str]) -> Optional[str]:
    if v is None:
        return None
    name = str(v).strip().upper()
    if name not in GGML_TENSOR_TYPES:
        raise ValueError(f"unknown ggml tensor type {v!r}; known: {', '.join(sorted(GGML_TENSOR_TYPES))}")
    return name


# ----------------------------------------------------------------------------- vast / fetch

class VastInstance(_Section):
    """A named training box: a vast.ai instance id, or a plain SSH host."""
    instance_id: Optional[int] = Field(None, description="vast.ai instance id (resolved through the API)")
    host: Optional[str] = Field(None, description="SSH host, when not resolved through vast.ai")
    port: int = Field(22, ge=1, le=65535)
    user: Optional[str] = None

    @model_validator(mode="after")
    def _one_way(self):
        if self.instance_id is None and not self.host:
            raise ValueError("give instance_id (vast.ai) or host (plain SSH)")
        return self


class VastConfig(_Section):
    api_key: Optional[str] = Field(None, description="vast.ai API key; defaults to $VAST_API_KEY")
    api_url: Optional[str] = Field(None, description="vast.ai API server URL override")
    instances: dict[str, VastInstance] = Field(default_factory=dict)
    ssh_user: str = "root"
    ssh_key: Optional[RelPath] = Field(None, description="identity file for SSH")
    host_key_policy: Literal["strict", "accept-new"] = "strict"
    known_hosts: Optional[RelPath] = Field(None, description="our own known_hosts file (default: state_dir/known_hosts)")
    remote_output_dir: str = "/workspace/output"
    run: Optional[str] = Field(None, description="run folder under remote_output_dir; newest when unset")
    connect_timeout_s: int = Field(15, ge=1, le=600)
    server_alive_interval_s: int = Field(15, ge=0, le=3600)
    server_alive_count_max: int = Field(4, ge=1, le=100)
    transfer: Literal["auto", "rsync", "scp"] = "auto"
    compression: Literal["auto", "zstd", "none"] = "auto"
    verify_sha256: bool = True
    fetch_timeout_s: int = Field(3600, ge=10)

    @field_validator("remote_output_dir")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute path on the remote box")
        return v.rstrip("/") or "/"


# ----------------------------------------------------------------------------- merge

class MergeConfig(_Section):
    strategy: Literal["auto", "peft", "unsloth", "stream"] = Field(
        "auto", description="auto = stream (tensor by tensor, low memory) for plain LoRA, else peft")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float16", "bfloat16"] = Field(
        "auto", description="16-bit dtype of the merged weights; auto keeps the base's 16-bit dtype")
    save_merged_hf: bool = Field(False, description="keep the merged HF folder after conversion")
    batch_size: int = Field(1, ge=1, description="tensors merged per step by the stream strategy")
    max_shard_size: str = "4GB"
    allow_base_mismatch: bool = Field(False, description="merge even when the adapter names another base")
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------- quantization

class QuantizationConfig(_Section):
    formats: list[QuantName] = Field(default_factory=lambda: ["Q4_K_M", "Q5_K_M", "Q8_0"], min_length=1)
    primary_format: Optional[QuantName] = None
    convert_type: Literal["f16", "bf16", "f32", "q8_0"] = "f16"
    threads: int = Field(0, ge=0, description="0 = all cores, shared across formats")
    parallel_formats: int = Field(0, ge=0, description="formats quantized at once; 0 = chosen from the budget")
    output_tensor_type: Optional[str] = None
    token_embedding_type: Optional[str] = None
    leave_output_tensor: bool = False
    pure: bool = False
    allow_requantize: bool = False
    imatrix: Optional[RelPath] = None
    keep_f16: bool = Field(True, description="keep the converted F16 GGUF after quantizing")

    _tt = field_validator("output_tensor_type", "token_embedding_type")(classmethod(lambda cls, v: _tensor_type(v)))

    @field_validator("formats")
    @classmethod
    def _dedupe(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for f in v:
            if f not in out:
                out.append(f)
        return out

    @model_validator(mode="after")
    def _primary(self):
        if self.primary_format is not None and self.primary_format not in self.formats:
            raise ValueError(f"primary_format {self.primary_format} is not one of formats {self.formats}")
        need = [f for f in self.formats if f in NEEDS_IMATRIX]
        if need and self.imatrix is None:
            raise ValueError(f"{', '.join(need)} need an importance matrix: set quantization.imatrix")
        return self

    @property
    def primary(self) -> str:
        return self.primary_format or self.formats[0]


# ----------------------------------------------------------------------------- deployment

class LlamaCppServerConfig(_Section):
    host: str = "127.0.0.1"
    n_ctx: int = Field(4096, ge=64)
    threads: int = Field(0, ge=0, description="0 = chosen from the CPU budget")
    n_gpu_layers: int = Field(0, ge=-1, description="-1 = all layers on the GPU")
    n_batch: int = Field(512, ge=1)
    startup_timeout_s: float = Field(120, gt=0)
    spare_port_range: tuple[int, int] = (20000, 20999)
    extra_args: list[str] = Field(default_factory=list)


class LMStudioConfig(_Section):
    home: RelPath = Field(Path("~/.lmstudio"), description="LM Studio home (holds models/ and config-presets/)")
    publisher: str = "loradeploy"
    link_mode: Literal["symlink", "hardlink", "copy"] = "symlink"
    use_cli: bool = Field(True, description="use `lms` when it is on PATH")
    server_port: int = Field(1234, ge=1, le=65535)


class OllamaConfig(_Section):
    use_cli: bool = True
    host: str = "http://127.0.0.1:11434"


class DeploymentConfig(_Section):
    targets: list[Literal["llamacpp", "lmstudio", "ollama"]] = Field(default_factory=lambda: ["llamacpp"], min_length=1)
    models_dir: RelPath = Field(Path("models"), description="where deployed GGUF versions live")
    backups_dir: Optional[RelPath] = Field(None, description="default: models_dir/backups")
    keep_backups: int = Field(3, ge=0)
    format: Optional[QuantName] = Field(None, description="format to serve; default quantization.primary_format")
    llamacpp: LlamaCppServerConfig = Field(default_factory=LlamaCppServerConfig)
    lmstudio: LMStudioConfig = Field(default_factory=LMStudioConfig)
    ollama: OllamaConfig = Field(default_factory=OllamaConfig)


# ----------------------------------------------------------------------------- health

class HealthCheckConfig(_Section):
    enabled: bool = True
    timeout_s: float = Field(30, gt=0)
    test_prompts: list[str] = Field(default_factory=lambda: ["Say hello in one short sentence."])
    min_response_length: int = Field(1, ge=0)
    max_tokens: int = Field(64, ge=1)
    max_latency_s: float = Field(10.0, gt=0, description="slower than this is degraded")
    min_tokens_per_s: float = Field(1.0, ge=0, description="slower than this is degraded")
    min_free_disk_gb: float = Field(5.0, ge=0)
    min_free_memory_gb: float = Field(1.0, ge=0)
    max_gpu_memory_fraction: float = Field(0.95, gt=0, le=1)


# ----------------------------------------------------------------------------- notifications

class WebhookConfig(_Section):
    webhook_url: str
    enabled: bool = True
    timeout_s: float = Field(10, gt=0)

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError("must be an http(s) URL")
        return v


class EmailConfig(_Section):
    enabled: bool = True
    smtp_host: str
    smtp_port: int = Field(587, ge=1, le=65535)
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: Optional[str] = None
    password: Optional[str] = None
    from_addr: str
    to_addrs: list[str] = Field(min_length=1)
    timeout_s: float = Field(10, gt=0)
    verify_tls: bool = True
    ca_file: Optional[RelPath] = Field(None, description="CA bundle for a private SMTP server")


class NotificationsConfig(_Section):
    enabled: bool = False
    events: list[Literal["run_started", "stage_failed", "run_finished", "health_degraded", "health_unhealthy"]] = \
        Field(default_factory=lambda: ["stage_failed", "run_finished", "health_degraded", "health_unhealthy"])
    slack: Optional[WebhookConfig] = None
    discord: Optional[WebhookConfig] = None
    email: Optional[EmailConfig] = None


# ----------------------------------------------------------------------------- logging / pipeline

class LoggingConfig(_Section):
    log_dir: RelPath = Path("logs")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    retention_days: int = Field(14, ge=0, description="0 keeps logs forever")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class PipelineConfig(_Section):
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES), min_length=1)
    continue_on_error: bool = False
    retries: int = Field(0, ge=0, le=20)
    retry_backoff_s: float = Field(5.0, ge=0)
    cleanup: bool = Field(True, description="remove temporaries (merged HF folder unless merge.save_merged_hf)")
    work_dir: RelPath = Field(Path("work"), description="per-model adapters, merged folders, GGUFs")
    state_dir: RelPath = Field(Path(".loradeploy"), description="run records, locks, server registry")

    @field_validator("stages")
    @classmethod
    def _ordered(cls, v: list[str]) -> list[str]:
        return [s for s in STAGES if s in v]


class EvaluationConfig(_Section):
    samples: RelPath = Path("eval_samples.jsonl")
    output_dir: RelPath = Path("reports")
    formats: Optional[list[QuantName]] = None
    concurrency: int = Field(2, ge=1, le=64)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(1, ge=1)
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    timeout_s: float = Field(60, gt=0)
    include_base: bool = True
    base_gguf: Literal["none", "q8_0", "f16"] = Field(
        "none", description="also convert the base model (no adapter) for the base reference row")
    charts: bool = True


class PerformanceConfig(_Section):
    parallel_downloads: int = Field(2, ge=1, le=32)
    max_memory_gb: Optional[float] = Field(None, gt=0, description="RAM budget; default 85% of total")
    max_cpu_threads: int = Field(0, ge=0, description="0 = all cores")
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    mixed_precision: Literal["auto", "fp16", "bf16", "no"] = "auto"
    min_free_disk_gb: float = Field(1.0, ge=0, description="disk that must stay free after a stage's writes")


# ----------------------------------------------------------------------------- models

@dataclass(frozen=True)
class AdapterSource:
    kind: Literal["local", "ssh", "vast"]
    path: str  # local path, or remote absolute path (ssh), or run folder ('' = newest) for vast
    host: str | None = None
    port: int = 22
    user: str | None = None
    instance: str | None = None  # vast: numeric id or a name from vast.instances

    def describe(self) -> str:
        if self.kind == "local":
            return self.path
        if self.kind == "ssh":
            return f"ssh://{self.user + '@' if self.user else ''}{self.host}:{self.port}{self.path}"
        return f"vast://{self.instance}/{self.path}".rstrip("/")


def parse_adapter_source(text: str, base_dir: Path | None = None) -> AdapterSource:
    text = str(text).strip()
    if text.startswith("ssh://"):
        u = urlparse(text)
        if not u.hostname or not u.path or not u.path.startswith("/"):
            raise ValueError("ssh adapter must look like ssh://user@host:port/abs/path")
        try:
            port = u.port or 22
        except ValueError as exc:
            raise ValueError(f"bad port in {text!r}") from exc
        return AdapterSource("ssh", u.path, host=u.hostname, port=port, user=u.username)
    if text.startswith("vast://"):
        rest = text[len("vast://"):].strip("/")
        if not rest:
            raise ValueError("vast adapter must look like vast://INSTANCE[/RUN]")
        inst, _, run = rest.partition("/")
        return AdapterSource("vast", run, instance=inst)
    if "://" in text:
        raise ValueError(f"unsupported adapter source {text!r}; use a local path, ssh://... or vast://...")
    p = Path(os.path.expanduser(text))
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return AdapterSource("local", str(p))


class ModelConfig(_Section):
    base_model: str = Field(description="local HF folder, or a hub id found in the local HF cache")
    adapter: str = Field(description="local path, ssh://user@host:port/abs/path, or vast://INSTANCE[/RUN]")
    system_prompt: str = ""
    port: int = Field(ge=1024, le=65535)
    version: str = "v1"
    formats: Optional[list[QuantName]] = Field(None, description="override quantization.formats")
    publisher: Optional[str] = None
    enabled: bool = True

    @field_validator("base_model")
    @classmethod
    def _base(cls, v: str, info: ValidationInfo) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        looks_local = v.startswith(("/", ".", "~")) or os.sep in v and v.count("/") != 1
        if looks_local:
            return str(_resolve(Path(v), info))
        base = (info.context or {}).get("base_dir")
        if base is not None and (Path(base) / v).exists():
            return str(Path(base) / v)
        return v

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str, info: ValidationInfo) -> str:
        src = parse_adapter_source(v, (info.context or {}).get("base_dir"))
        return src.describe() if src.kind == "local" else v.strip()

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (e.g. v1, 2024.06.01)")
        return v

    @property
    def adapter_source(self) -> AdapterSource:
        return parse_adapter_source(self.adapter)


class Config(_Section):
    vast: VastConfig = Field(default_factory=VastConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    models: dict[str, ModelConfig] = Field(min_length=1)
    config_path: Optional[Path] = Field(None, exclude=True, description="set by load_config")

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in v:
            if not _NAME_RE.match(name):
                raise ValueError(f"model name {name!r}: use lowercase letters, digits, '_', '-', '.'")
        return v

    @model_validator(mode="after")
    def _cross(self):
        ports: dict[int, str] = {}
        for name, m in self.models.items():
            if m.port in ports:
                raise ValueError(f"models.{name}.port: {m.port} is already used by model {ports[m.port]}")
            ports[m.port] = name
            src = m.adapter_source
            if src.kind == "vast" and not src.instance.isdigit() and src.instance not in self.vast.instances:
                raise ValueError(f"models.{name}.adapter: vast instance {src.instance!r} is neither an id "
                                 f"nor a name under vast.instances")
            fmts = m.formats or self.quantization.formats
            if self.deployment.format and self.deployment.format not in fmts:
                raise ValueError(f"deployment.format {self.deployment.format} is not quantized for model {name}")
        return self

    # --- derived helpers -------------------------------------------------------------------
    def model(self, name: str) -> ModelConfig:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"unknown model {name!r}", hint=f"known models: {', '.join(self.models)}") from None

    def formats_for(self, name: str) -> list[str]:
        return list(self.models[name].formats or self.quantization.formats)

    def serve_format_for(self, name: str) -> str:
        fmts = self.formats_for(name)
        if self.deployment.format:
            return self.deployment.format
        p = self.quantization.primary
        return p if p in fmts else fmts[0]


# ----------------------------------------------------------------------------- loading

def expand_env(obj: Any, where: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v, f"{where}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            val = os.environ.get(name)
            if val is None or val == "":
                if default is not None:
                    return default
                raise ConfigError(f"{where}: environment variable {name} is not set",
                                  hint=f"export {name}=... or write the value into the config")
            return val
        return _ENV_RE.sub(sub, obj)
    return obj


def _format_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-", "function_")))
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key (check the spelling; see examples/deployment_config.yaml)"
    elif err.get("type") == "missing":
        msg = "required key is missing"
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def config_from_dict(data: Any, *, base_dir: Path | None = None, source: str = "config") -> Config:
    if data is None:
        raise ConfigError(f"{source} is empty", hint="start from examples/deployment_config.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    data = expand_env(data)
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(errors[0])
        more = f" (+{len(errors) - 1} more: {'; '.join(_format_error(e) for e in errors[1:4])})" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {first}{more}") from None


def load_config(path: Path | str) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found", hint="pass -c FILE or copy examples/deployment_config.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    cfg = config_from_dict(data, base_dir=path.resolve().parent, source=str(path))
    return cfg.model_copy(update={"config_path": path.resolve()})


def config_to_yaml(cfg: Config) -> str:
    data = cfg.model_dump(mode="json", exclude={"config_path"})
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
