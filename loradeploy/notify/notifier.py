"""The notifier: pipeline and health events, redacted, sent to every active channel at once.

A notification is a side effect: delivery failures are retried briefly, logged as warnings and
returned as ``DeliveryResult``s, never raised into the pipeline. Every log line, error string and
outgoing message passes through the redactor so webhook tokens, the SMTP password and the server's
api_key never leak.
"""
from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from ..config import Config, NotificationsConfig, WebhookConfig
from .channels import Permanent, Transient, post_json, send_email
from .payloads import Message, cell_text, discord_payload, email_message, slack_payload
from .redact import RedactFilter, Redactor, config_secrets, secret_pairs

EVENTS = ("run_started", "stage_failed", "run_finished", "health_degraded", "health_unhealthy")
_DEFAULT_SEVERITY = {"run_started": "info", "stage_failed": "error", "run_finished": "success",
                     "health_degraded": "warning", "health_unhealthy": "error"}


@dataclass(frozen=True)
class DeliveryResult:
    channel: str            # "slack" | "discord" | "email"
    ok: bool
    error: str | None = None  # redacted one-line reason when not ok
    attempts: int = 0


def _safe(method: Callable[..., list[DeliveryResult]]) -> Callable[..., list[DeliveryResult]]:
    """The convenience methods shape caller data before notify(); that must not raise either."""
    def wrapper(self: "Notifier", *args: Any, **kwargs: Any) -> list[DeliveryResult]:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"notification {method.__name__} not sent: {type(exc).__name__}: {exc}")
            return []
    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


class Notifier:
    """Sends pipeline events to every active channel (``NotificationsConfig.active()``). Never raises.

    ``secrets`` are further values to scrub besides the channels' own (see ``config_secrets``);
    ``for_config`` passes them for a whole Config.
    """

    def __init__(self, cfg: NotificationsConfig, *, log: logging.Logger | None = None,
                 retries: int = 2, backoff_s: float = 0.5, max_retry_after_s: float = 5.0,
                 secrets: Iterable[str] = ()):
        self.cfg = cfg
        self.log = log or logging.getLogger("loradeploy.notify")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.redact = Redactor([*secret_pairs(cfg), *((s, "***") for s in secrets)])
        self.host = socket.gethostname()

    @classmethod
    def for_config(cls, cfg: Config, log: logging.Logger | None = None, **kw: Any) -> "Notifier":
        return cls(cfg.notifications, log=log, secrets=config_secrets(cfg), **kw)

    def redact_filter(self) -> RedactFilter:
        return RedactFilter(self.redact)

    def channels(self) -> list[str]:
        return self.cfg.active()

    def wants(self, event: str) -> bool:
        return bool(event in self.cfg.events and self.channels())

    # -- events

    def notify(self, event: str, *, title: str, text: str, fields: Mapping[str, Any] | None = None,
               table: Sequence[Mapping[str, Any]] | None = None, severity: str | None = None) -> list[DeliveryResult]:
        try:
            if event not in EVENTS:
                self._warn(f"notification event {event!r} is unknown (known: {', '.join(EVENTS)}); not sent")
                return []
            if not self.wants(event):
                return []
            r = self.redact
            msg = Message(event=event, title=r(title), text=r(text),
                          severity=severity or _DEFAULT_SEVERITY[event],
                          fields={r(k): r(cell_text(v) if not isinstance(v, str) else v) for k, v in (fields or {}).items()},
                          table=[{k: (r(v) if isinstance(v, str) else v) for k, v in row.items()} for row in (table or [])],
                          host=self.host)
            self.log.debug("%s", r(f"notify {event} via {', '.join(self.channels())}: {msg.title}"))
            jobs = self._jobs(msg)
            with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="notify") as pool:
                return list(pool.map(lambda job: self._deliver(event, *job), jobs))
        except Exception as exc:  # a notification bug must not take the pipeline down
            self._warn(f"notification {event} not sent: {type(exc).__name__}: {exc}")
            return []

    @_safe
    def run_started(self, models: Sequence[str]) -> list[DeliveryResult]:
        models = list(models)
        return self.notify("run_started", title=f"loradeploy run started ({len(models)} model(s))",
                           text=", ".join(models), fields={"models": ", ".join(models) or "-"})

    @_safe
    def stage_failed(self, model: str, stage: str, error_line: str, log_path: Any = None) -> list[DeliveryResult]:
        line = (str(error_line).strip().splitlines() or [""])[0]
        fields = {"model": model, "stage": stage, "error": line or "-"}
        if log_path is not None:
            fields["log"] = str(log_path)
        return self.notify("stage_failed", title=f"{model}: {stage} failed", text=line, fields=fields)

    @_safe
    def run_finished(self, summary_rows: Sequence[Mapping[str, Any]], ok: bool) -> list[DeliveryResult]:
        rows = list(summary_rows)
        counts: dict[str, int] = {}
        for row in rows:
            if "status" in row:
                counts[str(row["status"])] = counts.get(str(row["status"]), 0) + 1
        text = ", ".join(f"{n} {s}" for s, n in counts.items()) or f"{len(rows)} model(s)"
        return self.notify("run_finished", title=f"loradeploy run {'succeeded' if ok else 'failed'} "
                                                  f"({len(rows)} model(s))",
                           text=text, fields={"result": "ok" if ok else "failed", "models": str(len(rows))},
                           table=rows, severity="success" if ok else "error")

    @_safe
    def health(self, model: str, status: Any,
               details: Mapping[str, Any] | Sequence[str] | str | None = None) -> list[DeliveryResult]:
        status = str(getattr(status, "value", status)).lower()
        if status not in ("degraded", "unhealthy"):
            return []
        fields: dict[str, Any] = {"model": model, "status": status}
        text = ""
        if isinstance(details, Mapping):
            fields.update(details)
        elif isinstance(details, (list, tuple)):
            text = "\n".join(str(d) for d in details)  # the pipeline passes its list of warnings
        elif details:
            text = str(details)
        return self.notify(f"health_{status}", title=f"{model} is {status}", text=text, fields=fields)

    # -- delivery

    def _jobs(self, msg: Message) -> list[tuple[str, Callable[[], Any]]]:
        c = self.cfg
        hooks: dict[str, tuple[WebhookConfig | None, Callable[[Message], dict]]] = {
            "slack": (c.slack, slack_payload), "discord": (c.discord, discord_payload)}
        jobs: list[tuple[str, Callable[[], Any]]] = []
        # Payloads are built inside the job, so a formatting failure costs only that channel.
        for name in self.channels():
            if name == "email":
                jobs.append(("email", lambda e=c.email: send_email(e, email_message(msg, e))))
            else:
                hook, build = hooks[name]
                jobs.append((name, lambda h=hook, b=build: post_json(h.webhook_url, b(msg), h.timeout_s)))
        return jobs

    def _deliver(self, event: str, channel: str, send: Callable[[], Any]) -> DeliveryResult:
        error = "not attempted"
        attempt = 0
        for attempt in range(1, self.retries + 2):
            try:
                send()
                self.log.info("%s", self.redact(f"notification {event} sent via {channel}"
                                               + (f" after {attempt} attempts" if attempt > 1 else "")))
                return DeliveryResult(channel, True, None, attempt)
            except Transient as exc:
                error = str(exc)
                if attempt > self.retries:
                    break
                wait = exc.retry_after if exc.retry_after is not None else self.backoff_s * 2 ** (attempt - 1)
                wait = min(wait, self.max_retry_after_s)
                self.log.info("%s", self.redact(f"notification {event} via {channel}: {error}; "
                                               f"retrying in {wait:.1f}s"))
                time.sleep(wait)
            except Permanent as exc:
                error = str(exc)
                break
            except Exception as exc:  # noqa: BLE001 — anything else is still only a lost notification
                error = f"{type(exc).__name__}: {exc}"
                break
        error = self.redact(error)
        self._warn(f"notification {event} via {channel} failed after {attempt} attempt(s): {error}")
        return DeliveryResult(channel, False, error, attempt)

    def _warn(self, text: str) -> None:
        try:
            self.log.warning("%s", self.redact(text))
        except Exception:  # noqa: BLE001 — logging itself must not break the caller
            pass


class HealthReportLike(Protocol):
    def model_statuses(self) -> Mapping[str, str]: ...
    def problems(self, model: str) -> Mapping[str, str]: ...


def notify_health(cfg: Config, report: HealthReportLike, *, log: logging.Logger | None = None,
                  notifier: Notifier | None = None) -> list[DeliveryResult]:
    """One health_degraded / health_unhealthy event per model that is not healthy; healthy models send nothing.

    For a health check run on its own (``loradeploy health``): the pipeline's health stage reports
    through the pipeline's notifier instead, so a run never sends the same event twice.
    """
    n = notifier or Notifier.for_config(cfg, log=log)
    out: list[DeliveryResult] = []
    try:
        for model, status in report.model_statuses().items():
            out += n.health(model, status, dict(report.problems(model)))
    except Exception as exc:  # noqa: BLE001 — a malformed report costs the notification, never the check
        n._warn(f"health notification not sent: {type(exc).__name__}: {exc}")
    return out
