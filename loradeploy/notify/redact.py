"""Scrubbing secrets from text: webhook URLs (their path is the credential), the SMTP password,
the llama.cpp server's api_key and the vast.ai key. Used for every outgoing message and every log line."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    from ..config import Config, NotificationsConfig

_URL_WORDS = {"api", "services", "webhooks", "hooks", "slack", "github", "triggers", "workflows"}
_MIN_SECRET = 3  # shorter values cannot be scrubbed without shredding ordinary words


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


def secret_pairs(cfg: "NotificationsConfig") -> list[tuple[str, str]]:
    """The notification channels' own secrets."""
    pairs: list[tuple[str, str]] = []
    for hook in (cfg.slack, cfg.discord):
        if hook is not None:
            pairs += _url_secrets(hook.webhook_url)
    if cfg.email is not None and cfg.email.password:
        pairs.append((cfg.email.password, "***"))
    return pairs


def config_secrets(cfg: "Config") -> list[str]:
    """Secrets elsewhere in the config that may turn up in a log line (a server command line, an API error)."""
    out: list[str] = []
    key = cfg.deployment.llamacpp.api_key
    if key is not None:
        out.append(key.get_secret_value())
    if cfg.vast.api_key:
        out.append(cfg.vast.api_key)
    return out


class RedactFilter(logging.Filter):
    """Attach to a handler to scrub secrets from every record it emits (e.g. pipeline.log)."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._redact(record.getMessage())
        record.args = ()
        if record.exc_info and not record.exc_text:
            # The traceback text would otherwise be formatted later, past this filter, unscrubbed.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        return True
