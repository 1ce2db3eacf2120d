"""Slack / Discord webhooks and SMTP email for pipeline events.

A notification is a side effect: delivery failures are retried briefly, logged as warnings and
returned as ``DeliveryResult``s, never raised into the pipeline. Every log line, error string and
outgoing message passes through ``redact`` so webhook tokens and the SMTP password never leak.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import html
import http.client
import json
import logging
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import quote, urlsplit

from .config import EmailConfig, NotificationsConfig, WebhookConfig

EVENTS = ("run_started", "stage_failed", "run_finished", "health_degraded", "health_unhealthy")
_DEFAULT_SEVERITY = {"run_started": "info", "stage_failed": "error", "run_finished": "success",
                     "health_degraded": "warning", "health_unhealthy": "error"}
_ICON = {"info": "\N{BELL}", "success": "\N{WHITE HEAVY CHECK MARK}",
         "warning": "\N{WARNING SIGN}\ufe0f", "error": "\N{CROSS MARK}"}
_COLOUR = {"info": 0x3498DB, "success": 0x2ECC71, "warning": 0xF1C40F, "error": 0xE74C3C}

# Service limits (characters). Slack: section text 3000, field text 2000, 10 fields per section,
# header 150. Discord embeds: title 256, description 4096, 25 fields, name 256, value 1024,
# footer 2048, content 2000, 6000 across one message's embeds.
SLACK_TEXT, SLACK_FIELD, SLACK_FIELDS_PER_SECTION, SLACK_HEADER, SLACK_MAX_FIELDS = 3000, 2000, 10, 150, 40
DISCORD_TITLE, DISCORD_DESC, DISCORD_FIELDS, DISCORD_NAME, DISCORD_VALUE = 256, 4096, 25, 256, 1024
DISCORD_FOOTER, DISCORD_CONTENT, DISCORD_TOTAL = 2048, 2000, 6000

_URL_WORDS = {"api", "services", "webhooks", "hooks", "slack", "github", "triggers", "workflows"}
_MIN_SECRET = 3  # shorter values cannot be scrubbed without shredding ordinary words


@dataclass(frozen=True)
class DeliveryResult:
    channel: str            # "slack" | "discord" | "email"
    ok: bool
    error: str | None = None  # redacted one-line reason when not ok
    attempts: int = 0


@dataclass(frozen=True)
class Message:
    event: str
    title: str
    text: str
    severity: str
    fields: dict[str, str] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    host: str = ""


# ----------------------------------------------------------------------------- redaction

class Redactor:
    """Replaces known secrets (and their URL-quoted forms) with ``***``; webhook URLs keep their host."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()):
        table: dict[str, str] = {}
        for secret, repl in pairs:
            if not secret or len(secret) < _MIN_SECRET:
                continue
            for form in {secret, quote(secret, safe=""), quote(secret)}:
                table.setdefault(form, repl)
        # Longest first, so a whole URL is replaced before its path segments are.
        self._pairs = sorted(table.items(), key=lambda kv: len(kv[0]), reverse=True)

    def __call__(self, text: Any) -> str:
        out = str(text)
        for secret, repl in self._pairs:
            if secret in out:
                out = out.replace(secret, repl)
        return out


def _url_secrets(url: str) -> list[tuple[str, str]]:
    u = urlsplit(url)
    host = u.hostname or ""
    if u.port:
        host = f"{host}:{u.port}"
    pairs = [(url, f"{u.scheme}://{host}/***"), (url.split("?", 1)[0], f"{u.scheme}://{host}/***")]
    if u.password:
        pairs.append((u.password, "***"))
    if u.path.strip("/"):
        pairs.append((u.path, "/***"))
    # Slack T.../B.../token and Discord id/token segments; short path words stay readable.
    pairs += [(seg, "***") for seg in u.path.split("/") if len(seg) >= 8 and seg.lower() not in _URL_WORDS]
    if u.query:
        pairs.append((u.query, "***"))
        pairs += [(kv.partition("=")[2], "***") for kv in u.query.split("&")]
    return pairs


def secret_pairs(cfg: NotificationsConfig) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for hook in (cfg.slack, cfg.discord):
        if hook is not None:
            pairs += _url_secrets(hook.webhook_url)
    if cfg.email is not None and cfg.email.password:
        pairs.append((cfg.email.password, "***"))
    return pairs


class RedactFilter(logging.Filter):
    """Attach to a handler to scrub secrets from every record it emits (e.g. pipeline.log)."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._redact(record.getMessage())
        record.args = ()
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        return True


# ----------------------------------------------------------------------------- formatting

def _clip(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: max(n - 1, 0)] + "\u2026"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, ".4g")
    return " ".join(str(v).split())


def format_table(rows: Sequence[Mapping[str, Any]], max_cell: int = 40) -> str:
    """Fixed-width text table; columns are the keys in order of first appearance."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    if not cols:
        return ""
    grid = [[_clip(c, max_cell) for c in cols]] + [[_clip(_cell(r.get(c)), max_cell) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _code_block(table: str, budget: int) -> str:
    """A ``` block that fits ``budget`` characters, cut on a line boundary, fences kept."""
    table = table.replace("```", "'''")
    room = budget - 8
    if room <= 10 or not table:
        return ""
    if len(table) > room:
        cut = table[: room - 2].rsplit("\n", 1)[0]
        table = cut + "\n\u2026"
    return f"```\n{table}\n```"


def _mrkdwn(text: str) -> str:
    # Slack's three control characters; everything else passes through.
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip_mrkdwn(text: str, n: int) -> str:
    out = _clip(_mrkdwn(text), n)
    amp = out.rfind("&", max(0, len(out) - 6))
    if amp != -1 and ";" not in out[amp:]:
        out = out[:amp] + "\u2026"  # never leave half an entity
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _slack_field(name: str, value: str) -> dict:
    head = f"*{_clip_mrkdwn(_one_line(name), 200)}*\n"
    return {"type": "mrkdwn", "text": head + (_clip_mrkdwn(value, SLACK_FIELD - len(head)) or "-")}


def slack_payload(msg: Message) -> dict:
    icon = _ICON.get(msg.severity, "")
    blocks: list[dict] = [{"type": "header",
                           "text": {"type": "plain_text", "text": _clip(f"{icon} {_one_line(msg.title)}", SLACK_HEADER),
                                    "emoji": True}}]
    if msg.text.strip():
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _clip_mrkdwn(msg.text, SLACK_TEXT)}})
    items = list(msg.fields.items())[:SLACK_MAX_FIELDS]
    for i in range(0, len(items), SLACK_FIELDS_PER_SECTION):
        blocks.append({"type": "section", "fields": [_slack_field(k, v) for k, v in items[i:i + SLACK_FIELDS_PER_SECTION]]})
    if msg.table:
        block = _code_block(_mrkdwn(format_table(msg.table)), SLACK_TEXT)
        if block:
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": block}})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": _clip_mrkdwn(f"loradeploy \u00b7 {msg.event} \u00b7 {msg.host}", SLACK_FIELD)}]})
    fallback = f"{icon} {_one_line(msg.title)}" + (f": {msg.text}" if msg.text.strip() else "")
    return {"text": _clip_mrkdwn(fallback, SLACK_TEXT), "blocks": blocks}


def discord_payload(msg: Message) -> dict:
    icon = _ICON.get(msg.severity, "")
    title = _clip(_one_line(msg.title), DISCORD_TITLE)
    footer = _clip(f"loradeploy \u00b7 {msg.event} \u00b7 {msg.host}", DISCORD_FOOTER)
    fields = [{"name": _clip(_one_line(k), DISCORD_NAME) or "\u200b",
               "value": _clip(str(v), DISCORD_VALUE) or "-",
               "inline": len(str(v)) <= 40}
              for k, v in list(msg.fields.items())[:DISCORD_FIELDS]]
    # The 6000 total is shared: the description gives way first, then trailing fields.
    fixed = len(title) + len(footer)
    while fields and fixed + sum(len(f["name"]) + len(f["value"]) for f in fields) > DISCORD_TOTAL - 200:
        fields.pop()
    room = min(DISCORD_DESC, DISCORD_TOTAL - fixed - sum(len(f["name"]) + len(f["value"]) for f in fields))
    desc = _clip(msg.text, room)
    if msg.table:
        block = _code_block(format_table(msg.table), room - len(desc) - 2)
        if block:
            desc = f"{desc}\n\n{block}" if desc else block
    embed: dict[str, Any] = {"title": title, "color": _COLOUR.get(msg.severity, _COLOUR["info"]),
                             "footer": {"text": footer},
                             "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if desc:
        embed["description"] = desc
    if fields:
        embed["fields"] = fields
    return {"content": _clip(f"{icon} **{title}**", DISCORD_CONTENT), "username": "loradeploy",
            "embeds": [embed], "allowed_mentions": {"parse": []}}


def email_message(msg: Message, cfg: EmailConfig) -> EmailMessage:
    m = EmailMessage()
    m["Subject"] = _clip(_one_line(f"[loradeploy] {msg.title}"), 200)
    m["From"] = cfg.from_addr
    m["To"] = ", ".join(cfg.to_addrs)
    m["Date"] = email.utils.formatdate(localtime=True)
    m["Message-ID"] = email.utils.make_msgid(domain="loradeploy.local")  # make_msgid's default does a DNS lookup
    m["X-Loradeploy-Event"] = msg.event
    table = format_table(msg.table) if msg.table else ""
    plain = [msg.title, "", msg.text, ""] + [f"{k}: {v}" for k, v in msg.fields.items()]
    if table:
        plain += ["", table]
    plain += ["", f"-- loradeploy \u00b7 {msg.event} \u00b7 {msg.host}"]
    m.set_content("\n".join(plain).strip() + "\n")
    e = html.escape
    colour = f"#{_COLOUR.get(msg.severity, _COLOUR['info']):06x}"
    parts = [f'<html><body style="font-family:sans-serif">',
             f'<h2 style="color:{colour}">{e(msg.title)}</h2>',
             f'<p style="white-space:pre-wrap">{e(msg.text)}</p>']
    if msg.fields:
        parts.append("<table>" + "".join(f'<tr><th align="left">{e(str(k))}</th><td>{e(str(v))}</td></tr>'
                                         for k, v in msg.fields.items()) + "</table>")
    if msg.table:
        cols: list[str] = []
        for r in msg.table:
            cols += [k for k in r if k not in cols]
        head = "".join(f"<th>{e(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{e(_cell(r.get(c)))}</td>" for c in cols) + "</tr>" for r in msg.table)
        parts.append('<table border="1" cellpadding="4" style="border-collapse:collapse">'
                     f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append(f'<p style="color:#888;font-size:small">loradeploy &middot; {e(msg.event)} &middot; {e(msg.host)}</p>'
                 "</body></html>")
    m.add_alternative("\n".join(parts), subtype="html")
    return m


# ----------------------------------------------------------------------------- transports

class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Permanent(Exception):
    pass


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
    """POST JSON; returns the 2xx status. Raises _Transient (5xx, 429, network) or _Permanent."""
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
        snippet = _one_line(body.decode("utf-8", "replace"))[:200]
        detail = f"HTTP {exc.code}" + (f": {snippet}" if snippet else "")
        if exc.code == 429 or exc.code >= 500:
            raise _Transient(detail, _retry_after(exc.headers, body)) from None
        raise _Permanent(detail) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            raise _Permanent(f"TLS error: {reason}") from None
        raise _Transient(f"connection failed: {reason or type(reason).__name__}") from None


def _tls_context(cfg: EmailConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    if not cfg.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def send_email(cfg: EmailConfig, message: EmailMessage) -> None:
    """One SMTP delivery. Raises _Transient (network, 4xx) or _Permanent (TLS, auth, 5xx)."""
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
        raise _Permanent(f"TLS error: {exc}") from None
    except smtplib.SMTPRecipientsRefused as exc:
        raise _Permanent(f"recipients refused: {', '.join(exc.recipients)}") from None
    except smtplib.SMTPNotSupportedError as exc:
        raise _Permanent(f"server does not support it: {exc}") from None
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        detail = f"SMTP {exc.smtp_code}: {_one_line(text)[:200]}"
        if isinstance(exc, smtplib.SMTPAuthenticationError) or not 400 <= exc.smtp_code < 500:
            raise _Permanent(detail) from None
        raise _Transient(detail) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise _Transient(f"connection failed: {exc or type(exc).__name__}") from None
    finally:
        if smtp is not None:
            try:
                smtp.quit()  # the message is already accepted; a failed QUIT must not resend it
            except (smtplib.SMTPException, OSError):
                smtp.close()


# ----------------------------------------------------------------------------- notifier

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
    """Sends pipeline events to every configured, enabled channel. Never raises."""

    def __init__(self, cfg: NotificationsConfig, *, log: logging.Logger | None = None,
                 retries: int = 2, backoff_s: float = 0.5, max_retry_after_s: float = 5.0):
        self.cfg = cfg
        self.log = log or logging.getLogger("loradeploy.notify")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.redact = Redactor(secret_pairs(cfg))
        self.host = socket.gethostname()

    def redact_filter(self) -> RedactFilter:
        return RedactFilter(self.redact)

    def channels(self) -> list[str]:
        c = self.cfg
        return [name for name, sub in (("slack", c.slack), ("discord", c.discord), ("email", c.email))
                if sub is not None and sub.enabled]

    def wants(self, event: str) -> bool:
        return bool(self.cfg.enabled and event in self.cfg.events and self.channels())

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
                          fields={r(k): r(_cell(v) if not isinstance(v, str) else v) for k, v in (fields or {}).items()},
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
    def health(self, model: str, status: Any, details: Mapping[str, Any] | str | None = None) -> list[DeliveryResult]:
        status = str(getattr(status, "value", status)).lower()
        if status not in ("degraded", "unhealthy"):
            return []
        fields: dict[str, Any] = {"model": model, "status": status}
        text = ""
        if isinstance(details, Mapping):
            fields.update(details)
        elif details:
            text = str(details)
        return self.notify(f"health_{status}", title=f"{model} is {status}", text=text, fields=fields)

    # -- delivery

    def _jobs(self, msg: Message) -> list[tuple[str, Callable[[], Any]]]:
        c = self.cfg
        jobs: list[tuple[str, Callable[[], Any]]] = []
        hooks: list[tuple[str, WebhookConfig | None, Callable[[Message], dict]]] = [
            ("slack", c.slack, slack_payload), ("discord", c.discord, discord_payload)]
        # Payloads are built inside the job, so a formatting failure costs only that channel.
        for name, hook, build in hooks:
            if hook is not None and hook.enabled:
                jobs.append((name, lambda h=hook, b=build: post_json(h.webhook_url, b(msg), h.timeout_s)))
        if c.email is not None and c.email.enabled:
            jobs.append(("email", lambda e=c.email: send_email(e, email_message(msg, e))))
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
            except _Transient as exc:
                error = str(exc)
                if attempt > self.retries:
                    break
                wait = exc.retry_after if exc.retry_after is not None else self.backoff_s * 2 ** (attempt - 1)
                wait = min(wait, self.max_retry_after_s)
                self.log.info("%s", self.redact(f"notification {event} via {channel}: {error}; "
                                               f"retrying in {wait:.1f}s"))
                time.sleep(wait)
            except _Permanent as exc:
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
