"""Models and the whole config: where adapters come from, and every rule that spans sections."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlparse

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..errors import ConfigError
from .base import NAME_RE, QuantName, RelPath, _Section, imatrix_problem, resolve_path
from .notifications import NotificationsConfig
from .sections import (DeploymentConfig, EvaluationConfig, HealthCheckConfig, LoggingConfig, MergeConfig,
                       PerformanceConfig, PipelineConfig, QuantizationConfig, VastConfig)
from .verify import VerifyConfig


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
    mode: Optional[Literal["merged", "adapter"]] = Field(None, description="override deployment.mode")
    samples: Optional[RelPath] = Field(None, description="this model's evaluation samples (and verify's default "
                                                         "calibration); default evaluation.samples")

    @field_validator("base_model")
    @classmethod
    def _base(cls, v: str, info: ValidationInfo) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        looks_local = v.startswith(("/", ".", "~")) or os.sep in v and v.count("/") != 1
        if looks_local:
            return str(resolve_path(Path(v), info))
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
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
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
            if not NAME_RE.match(name):
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
            self._imatrix_for(f"models.{name}.formats", m.formats)
            if self.deployment.format and self.deployment.format not in fmts:
                raise ValueError(f"deployment.format {self.deployment.format} is not quantized for model {name}")
            if self.mode_for(name) == "adapter":
                self._adapter_mode_for(name)
        self._imatrix_for("evaluation.formats", self.evaluation.formats)
        return self

    def _adapter_mode_for(self, name: str) -> None:
        where = f"models.{name}.mode" if self.models[name].mode else "deployment.mode"
        if self.deployment.llamacpp.backend != "llama-server":
            raise ValueError(f"{where}: adapter mode needs deployment.llamacpp.backend: llama-server "
                             f"(llama-cpp-python's server cannot pick an adapter per request)")
        others = [t for t in self.deployment.targets if t != "llamacpp"]
        if others:
            raise ValueError(f"{where}: adapter mode serves through llama-server only, and {', '.join(others)} "
                             f"cannot load a LoRA adapter at run time; use mode: merged for model {name} "
                             f"or deployment.targets: [llamacpp]")
        if self.quantization.imatrix == "auto":
            raise ValueError(f"{where}: adapter mode quantizes one base for every adapter on it, and "
                             f"quantization.imatrix: auto would weigh it by one adapter's calibration; give an "
                             f"imatrix file of the base, or use mode: merged for model {name}")

    def _imatrix_for(self, where: str, formats: Optional[list[str]]) -> None:
        # quantization.formats is checked in its section; these keys cannot see quantization.imatrix there
        why = imatrix_problem(formats, self.quantization.imatrix)
        if why:
            raise ValueError(f"{where}: {why}")

    @property
    def warnings(self) -> tuple[str, ...]:
        """What loads but is probably not what was meant; load_config logs these, the CLI shows them."""
        return self.notifications.warnings

    # --- derived helpers -------------------------------------------------------------------
    def model(self, name: str) -> ModelConfig:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"unknown model {name!r}", hint=f"known models: {', '.join(self.models)}") from None

    def formats_for(self, name: str) -> list[str]:
        return list(self.models[name].formats or self.quantization.formats)

    def samples_for(self, name: str) -> Path:
        """The model's evaluation samples: its own, else evaluation.samples."""
        return Path(self.models[name].samples or self.evaluation.samples)

    def mode_for(self, name: str) -> str:
        """merged | adapter: how the model's adapter reaches its server."""
        return self.models[name].mode or self.deployment.mode

    def serve_format_for(self, name: str) -> str:
        fmts = self.formats_for(name)
        if self.deployment.format:
            return self.deployment.format
        p = self.quantization.primary
        return p if p in fmts else fmts[0]
