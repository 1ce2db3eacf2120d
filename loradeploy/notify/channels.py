"""Delivery: one HTTP POST to a webhook, one SMTP session for an email. Failures are classified as
Transient (retry) or Permanent (give up); the notifier decides what to do with them."""
from __future__ import annotations

import datetime as dt
import email.utils
import http.client
import json
import smtplib
import socket
import ssl
import urllib.error
import urllib.request
from email.message import EmailMessage
from typing import Any

from ..config import EmailConfig
from .payloads import one_line


class Transient(Exception):
    """Worth another try: the network, a 5xx, a 429 (``retry_after`` seconds when the service says)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Permanent(Exception):
    """Retrying cannot help: TLS, authentication, a 4xx, a refused recipient."""


def _retry_after(headers: Any, body: bytes) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value:
        try:
            return max(float(value), 0.0)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return max((when - dt.datetime.now(dt.timezone.utc)).total_seconds(), 0.0)
            except (TypeError, ValueError):
                pass
    try:  # Discord also puts seconds in the JSON body
        return max(float(json.loads(body)["retry_after"]), 0.0)
    except (ValueError, KeyError, TypeError):
        return None


def post_json(url: str, payload: dict, timeout: float) -> int:
    """POST JSON; returns the 2xx status. Raises Transient (5xx, 429, network) or Permanent."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                 headers={"Content-Type": "application/json; charset=utf-8",
                                          "User-Agent": "loradeploy-notify"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read(65536)
            return resp.status
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(2048)
        except OSError:
            body = b""
        snippet = one_line(body.decode("utf-8", "replace"))[:200]
        detail = f"HTTP {exc.code}" + (f": {snippet}" if snippet else "")
        if exc.code == 429 or exc.code >= 500:
            raise Transient(detail, _retry_after(exc.headers, body)) from None
        raise Permanent(detail) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            raise Permanent(f"TLS error: {reason}") from None
        raise Transient(f"connection failed: {reason or type(reason).__name__}") from None


def _tls_context(cfg: EmailConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    if not cfg.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def send_email(cfg: EmailConfig, message: EmailMessage) -> None:
    """One SMTP delivery. Raises Transient (network, 4xx) or Permanent (TLS, auth, 5xx)."""
    local = socket.gethostname() or "localhost"  # smtplib's default getfqdn() can stall on DNS
    smtp: smtplib.SMTP | None = None
    try:
        if cfg.security == "ssl":
            smtp = smtplib.SMTP_SSL(cfg.smtp_host, cfg.smtp_port, local_hostname=local,
                                    timeout=cfg.timeout_s, context=_tls_context(cfg))
        else:
            smtp = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, local_hostname=local, timeout=cfg.timeout_s)
        smtp.ehlo()
        if cfg.security == "starttls":
            smtp.starttls(context=_tls_context(cfg))
            smtp.ehlo()
        if cfg.username:
            smtp.login(cfg.username, cfg.password or "")
        smtp.send_message(message)
    except ssl.SSLError as exc:
        raise Permanent(f"TLS error: {exc}") from None
    except smtplib.SMTPRecipientsRefused as exc:
        raise Permanent(f"recipients refused: {', '.join(exc.recipients)}") from None
    except smtplib.SMTPNotSupportedError as exc:
        raise Permanent(f"server does not support it: {exc}") from None
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        detail = f"SMTP {exc.smtp_code}: {one_line(text)[:200]}"
        if isinstance(exc, smtplib.SMTPAuthenticationError) or not 400 <= exc.smtp_code < 500:
            raise Permanent(detail) from None
        raise Transient(detail) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise Transient(f"connection failed: {exc or type(exc).__name__}") from None
    finally:
        if smtp is not None:
            try:
                smtp.quit()  # the message is already accepted; a failed QUIT must not resend it
            except (smtplib.SMTPException, OSError):
                smtp.close()
