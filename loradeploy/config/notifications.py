"""Notification channels. A channel that is configured is on unless it says ``enabled: false``;
``notifications.enabled`` is the master switch and defaults to on, so what was configured is sent."""
from __future__ import annotations

from typing import Literal, Optional
from urllib.parse import urlparse

from pydantic import Field, field_validator

from .base import RelPath, _Section

NotifyEvent = Literal["run_started", "stage_failed", "run_finished", "health_degraded", "health_unhealthy"]


class WebhookConfig(_Section):
    # repr=False: the URL's path is the credential (Slack and Discord tokens live in it).
    webhook_url: str = Field(repr=False)
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
    password: Optional[str] = Field(None, repr=False)
    from_addr: str
    to_addrs: list[str] = Field(min_length=1)
    timeout_s: float = Field(10, gt=0)
    verify_tls: bool = True
    ca_file: Optional[RelPath] = Field(None, description="CA bundle for a private SMTP server")


class NotificationsConfig(_Section):
    enabled: bool = Field(True, description="master switch; each configured channel is on unless it says "
                                            "enabled: false")
    events: list[NotifyEvent] = Field(
        default_factory=lambda: ["stage_failed", "run_finished", "health_degraded", "health_unhealthy"])
    slack: Optional[WebhookConfig] = None
    discord: Optional[WebhookConfig] = None
    email: Optional[EmailConfig] = None

    def configured(self) -> list[str]:
        """Channels written in the config and not switched off one by one."""
        return [name for name, sub in (("slack", self.slack), ("discord", self.discord), ("email", self.email))
                if sub is not None and sub.enabled]

    def active(self) -> list[str]:
        """Channels a notification actually goes to."""
        return self.configured() if self.enabled else []

    @property
    def warnings(self) -> tuple[str, ...]:
        # Not an error: switching everything off for a while is legitimate, but it must not be silent.
        chans = self.configured()
        if self.enabled or not chans:
            return ()
        return (f"notifications.enabled is false: {', '.join(chans)} configured but nothing will be sent "
                "(remove `enabled: false` or the channels)",)
