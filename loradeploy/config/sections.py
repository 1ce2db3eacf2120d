"""The config sections of one run: vast/fetch, merge, quantization, deployment, health, logging,
pipeline, evaluation and performance. Notifications live in ``notifications.py``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from ..stagespec import HeavyStage
from .base import STAGES, QuantName, RelPath, Stage, _Section, imatrix_problem, is_loopback, tensor_type

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
    # repr=False: a printed config (a traceback, a debug line) must not carry the key.
    api_key: Optional[str] = Field(None, repr=False, description="vast.ai API key; defaults to $VAST_API_KEY")
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
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="peft merge: auto = a CUDA GPU, else Apple's (mps), else the CPU")
    dtype: Literal["auto", "float16", "bfloat16"] = Field(
        "auto", description="16-bit dtype of the merged weights; auto keeps the base's 16-bit dtype")
    save_merged_hf: bool = Field(False, description="keep the merged HF folder after conversion")
    batch_size: int = Field(1, ge=1, description="tensors merged per step by the stream strategy")
    max_shard_size: str = "4GB"
    allow_base_mismatch: bool = Field(False, description="merge even when the adapter names another base")
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------- quantization

class QuantizationConfig(_Section):
    # before formats: the formats validator reads it (pydantic validates fields in this order)
    imatrix: Optional[Union[Literal["auto"], RelPath]] = Field(
        None, description="auto = llama-imatrix on the F16 GGUF over verify's calibration text; or an imatrix file")
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
    keep_f16: bool = Field(True, description="keep the converted F16 GGUF after quantizing")
    engine: Literal["auto", "loradeploy", "llama.cpp"] = Field(
        "auto", description="auto: loradeploy's byte-identical engine where it applies, else llama.cpp's quantizer")
    tuned_measure: bool = Field(
        True, description="TUNED@ formats: correct the cheap per-tensor estimates by KLD measured on calibration "
                          "text verify does not score (a batched llama.cpp pass per probe, within 2x the stock "
                          "quantize time) and keep the stock mix where nothing measures better; off: the cheap "
                          "estimates alone")
    tuned_search_ratio: Optional[float] = Field(
        2.0, gt=0, description="TUNED@ formats: the measured search's time, at most this many times the stock "
                               "format's quantize (never under 5 s); probes that do not fit are skipped and take "
                               "the median correction. null: no limit, every probe is measured")

    _tt = field_validator("output_tensor_type", "token_embedding_type")(classmethod(lambda cls, v: tensor_type(v)))

    @field_validator("formats")
    @classmethod
    def _dedupe(cls, v: list[str], info: ValidationInfo) -> list[str]:
        out: list[str] = []
        for f in v:
            if f not in out:
                out.append(f)
        # fail at load, not at quantize time (a missing "imatrix" in data already failed on its own)
        why = imatrix_problem(out, info.data.get("imatrix"))
        if why:
            raise ValueError(why)
        return out

    @model_validator(mode="after")
    def _primary(self):
        if self.primary_format is not None and self.primary_format not in self.formats:
            raise ValueError(f"primary_format {self.primary_format} is not one of formats {self.formats}")
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
    backend: Literal["llama-server", "python"] = Field(
        "llama-server", description="llama.cpp's own server (batches requests over slots) or llama-cpp-python's")
    parallel: int = Field(4, ge=1, description="llama-server slots: requests decoded together (continuous batching)")
    api_key: Optional[SecretStr] = Field(None, description="require `Authorization: Bearer KEY` on every route "
                                                           "of every served port; write ${ENV}, never the key")
    allow_unauthenticated: bool = Field(False, description="allow a non-loopback host without api_key")
    # what each served port's front proxy bounds (serving.limits.proxy_limits)
    max_body_mb: float = Field(8, gt=0, le=1024, description="largest request body a port reads (413 over it)")
    max_connections: int = Field(256, ge=1, le=65536, description="open client connections per port (503 over it)")
    head_timeout_s: float = Field(30, gt=0, description="a client's whole request head, from its first byte")
    body_timeout_s: float = Field(60, gt=0, description="a client's whole request body")
    idle_timeout_s: float = Field(60, gt=0, description="a kept-alive client connection with no request")
    backend_timeout_s: float = Field(600, gt=0, description="the backend's silence before 504 (no byte this long)")

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, v: Optional[SecretStr]) -> Optional[SecretStr]:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("is empty (an unset ${VAR}?): export the key or remove api_key")
        # it travels in an HTTP header: whitespace, control or non-ASCII characters (a trailing newline from
        # `cat keyfile`) would fail at serve start, or never match what a client sends
        if v is not None and not all(33 <= ord(c) <= 126 for c in v.get_secret_value()):
            raise ValueError("holds whitespace, a control character or non-ASCII (a trailing newline from a key "
                             "file?): use printable ASCII only, e.g. export LORADEPLOY_API_KEY=$(tr -d '\\n' < FILE)")
        return v

    @model_validator(mode="after")
    def _no_open_door(self) -> "LlamaCppServerConfig":
        if not is_loopback(self.host) and self.api_key is None and not self.allow_unauthenticated:
            raise ValueError(f"host {self.host!r} is not loopback: set api_key (e.g. ${{LORADEPLOY_API_KEY}}) "
                             "or write allow_unauthenticated: true")
        return self


class LMStudioConfig(_Section):
    home: RelPath = Field(Path("~/.lmstudio"), description="LM Studio home (holds models/ and config-presets/)")
    publisher: str = "loradeploy"
    link_mode: Literal["symlink", "hardlink", "copy"] = "symlink"
    use_cli: bool = Field(True, description="use `lms` when it is on PATH or in <home>/bin")
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
    mode: Literal["merged", "adapter"] = Field(
        "merged", description="merged: the adapter merged into its own GGUF; adapter: one quantized base per base "
                              "model, each adapter applied at run time by a shared llama-server (models.X.mode overrides)")
    llamacpp: LlamaCppServerConfig = Field(default_factory=LlamaCppServerConfig)
    lmstudio: LMStudioConfig = Field(default_factory=LMStudioConfig)
    ollama: OllamaConfig = Field(default_factory=OllamaConfig)


# ----------------------------------------------------------------------------- health

class HealthCheckConfig(_Section):
    enabled: bool = True
    timeout_s: Optional[float] = Field(None, gt=0, description="whole-request deadline; default: scaled to "
                                                               "the model's size and the cores (30 s at least)")
    test_prompts: list[str] = Field(default_factory=lambda: ["Say hello in one short sentence."])
    min_response_length: int = Field(1, ge=0)
    max_tokens: int = Field(64, ge=1)
    max_latency_s: Optional[float] = Field(None, gt=0, description="slower than this is degraded; default: 3x "
                                                                   "the expected answer time (10 s at least)")
    min_tokens_per_s: Optional[float] = Field(None, ge=0, description="slower than this is degraded; default: a "
                                                                      "fifth of the expected rate (at most 1)")
    min_free_disk_gb: float = Field(5.0, ge=0)
    min_free_memory_gb: float = Field(1.0, ge=0)
    max_gpu_memory_fraction: float = Field(0.95, gt=0, le=1)


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
    timeout_s: Optional[float] = Field(None, gt=0, description="per request; default: scaled to the model's "
                                                               "size, the cores and concurrency (60 s at least)")
    include_base: bool = True
    base_gguf: Literal["none", "q8_0", "f16"] = Field(
        "none", description="also convert the base model (no adapter) for the base reference row")
    charts: bool = True
    # (IQ formats here without quantization.imatrix are refused by Config, which sees both keys)


class RayConfig(_Section):
    """Where the Ray executor runs heavy stages; see README "Running on a Ray cluster"."""
    address: Optional[str] = Field(None, description="unset = start a local Ray instance; `auto`, host:port or "
                                                     "ray://head:10001 = join that cluster")
    storage: Optional[RelPath] = Field(None, description="a folder every node sees at this path (an NFS mount); "
                                                         "work artifacts go here (default: pipeline.work_dir)")
    max_retries: int = Field(2, ge=0, le=10, description="re-runs of a task whose worker or node died")
    stage_resources: dict[HeavyStage, dict[str, float]] = Field(
        default_factory=dict, description="custom Ray resources a heavy stage asks for, e.g. {verify: {gpu_box: 1}}")

    @property
    def remote(self) -> bool:
        """True when the cluster may span machines (then the storage must be named)."""
        if self.address is None:
            return False
        host = self.address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
        return self.address == "auto" or not is_loopback(host)


class PerformanceConfig(_Section):
    parallel_downloads: int = Field(2, ge=1, le=32)
    max_memory_gb: Optional[float] = Field(None, gt=0, description="RAM budget; default 85% of total; with "
                                                                   "executor ray, what each heavy task reserves")
    max_cpu_threads: int = Field(0, ge=0, description="0 = all cores")
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    mixed_precision: Literal["auto", "fp16", "bf16", "no"] = "auto"
    min_free_disk_gb: float = Field(1.0, ge=0, description="disk that must stay free after a stage's writes")
    tensor_cache_gb: float = Field(16.0, ge=0, description="quantized tensors reused across adapters and "
                                                            "versions (in the state dir); 0 = off")
    executor: Literal["local", "ray"] = Field("local", description="ray: heavy stages become Ray tasks")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _ray_ready(self):
        if self.executor != "ray":
            return self
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise ValueError("executor ray needs the ray package, which is not installed: pip install -e '.[ray]'")
        if self.ray.remote and self.ray.storage is None:
            raise ValueError(f"ray.address {self.ray.address!r} may span machines: set ray.storage to a folder "
                             "every node sees (an NFS mount)")
        return self
