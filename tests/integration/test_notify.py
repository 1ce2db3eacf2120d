"""Notifications against real receivers on loopback: an HTTP webhook sink and aiosmtpd servers."""
from __future__ import annotations

import logging
import time
import uuid

import pytest

from loradeploy.config import EmailConfig, NotificationsConfig, WebhookConfig, config_from_dict
from loradeploy.notify import DISCORD_TOTAL, EVENTS, DeliveryResult, Notifier, format_table, notify_health
from tests.fixtures.receivers import *  # noqa: F401,F403 (pytest fixtures)
from tests.fixtures.receivers import SMTP_PASSWORD, SMTP_USER

# aiosmtpd warns about AUTH without STARTTLS even over implicit TLS (SMTPS), where it is fine.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

SLACK_PATH = "/services/T0ABC1234/B0DEF5678/xoxSlackToken0123456789ab"
DISCORD_PATH = "/api/webhooks/112233445566778899/dIsCoRdToKeN-abcdefghijklmnopqrstuvwxyz_0123456789"
ROWS = [{"model": "majora", "status": "ok", "format": "Q4_K_M", "port": 5000, "seconds": 12.345},
        {"model": "nayru", "status": "failed", "format": "Q4_K_M", "port": 5001, "seconds": 3.0},
        {"model": "veran", "status": "ok", "format": "Q5_K_M", "port": 5002, "seconds": 8.5}]


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)

    def warnings(self) -> list[str]:
        return [self.format(r) for r in self.records if r.levelno >= logging.WARNING]


@pytest.fixture
def logs():
    log = logging.getLogger(f"test.notify.{uuid.uuid4().hex}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    h = Captured()
    log.addHandler(h)
    return log, h


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def notifier(cfg: NotificationsConfig, log: logging.Logger, **kw) -> Notifier:
    kw.setdefault("backoff_s", 0.02)
    kw.setdefault("max_retry_after_s", 1.0)
    return Notifier(cfg, log=log, **kw)


def hooks(slack_url=None, discord_url=None, email=None, **kw) -> NotificationsConfig:
    kw.setdefault("events", list(EVENTS))
    # No `enabled: True`: a configured channel is on by default.
    return NotificationsConfig(slack=WebhookConfig(webhook_url=slack_url, timeout_s=2) if slack_url else None,
                               discord=WebhookConfig(webhook_url=discord_url, timeout_s=2) if discord_url else None,
                               email=email, **kw)


def email_cfg(server, security, **kw) -> EmailConfig:
    kw.setdefault("ca_file", server.cert.cert if server.cert else None)
    return EmailConfig(smtp_host=server.host, smtp_port=server.port, security=security,
                       username=server.username, password=server.password, from_addr="loradeploy@example.test",
                       to_addrs=["ops@example.test", "oncall@example.test"], timeout_s=5, **kw)


# ----------------------------------------------------------------------------- payloads

def test_slack_payload_shape(http_receiver, logs):
    log, _ = logs
    n = notifier(hooks(slack_url=http_receiver.url(SLACK_PATH)), log)
    res = n.stage_failed("majora", "quantize", "llama_model_quantize failed: <bad> & worse\nsecond line",
                         "/var/log/loradeploy/majora/quantize.log")
    assert res == [DeliveryResult("slack", True, None, 1)]
    (req,) = http_receiver.wait_for(1)
    assert req.path == SLACK_PATH and req.headers["Content-Type"].startswith("application/json")
    body = req.json()
    assert "majora: quantize failed" in body["text"]
    header, section, fields, context = body["blocks"]
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    assert "majora: quantize failed" in header["text"]["text"]
    # Slack mrkdwn needs &, <, > escaped; only the first line of the error is sent.
    assert section == {"type": "section", "text": {"type": "mrkdwn",
                                                   "text": "llama_model_quantize failed: &lt;bad&gt; &amp; worse"}}
    assert fields["type"] == "section"
    assert [f["text"] for f in fields["fields"]] == [
        "*model*\nmajora", "*stage*\nquantize", "*error*\nllama_model_quantize failed: &lt;bad&gt; &amp; worse",
        "*log*\n/var/log/loradeploy/majora/quantize.log"]
    assert all(f["type"] == "mrkdwn" for f in fields["fields"])
    assert context["type"] == "context" and "stage_failed" in context["elements"][0]["text"]


def test_slack_limits_and_table(http_receiver, logs):
    log, _ = logs
    n = notifier(hooks(slack_url=http_receiver.url(SLACK_PATH)), log)
    fields = {f"field{i}": "v" * 3000 for i in range(14)}
    assert n.notify("run_finished", title="T" * 500, text="x" * 5000, fields=fields, table=ROWS)[0].ok
    body = http_receiver.wait_for(1)[0].json()
    blocks = body["blocks"]
    assert len(body["text"]) <= 3000
    assert len(blocks[0]["text"]["text"]) <= 150
    assert len(blocks[1]["text"]["text"]) == 3000 and blocks[1]["text"]["text"].endswith("\u2026")
    field_sections = [b for b in blocks if "fields" in b]
    assert [len(b["fields"]) for b in field_sections] == [10, 4]
    assert all(len(f["text"]) <= 2000 for b in field_sections for f in b["fields"])
    table = blocks[-2]["text"]["text"]
    assert table.startswith("```\n") and table.endswith("\n```")
    assert all(r["model"] in table for r in ROWS) and "12.35" in table


def test_discord_payload_shape(http_receiver, logs):
    log, _ = logs
    http_receiver.default.status = 204  # what Discord answers without ?wait=true
    http_receiver.default.body = b""
    n = notifier(hooks(discord_url=http_receiver.url(DISCORD_PATH)), log)
    res = n.health("nayru", "degraded", {"latency_s": 12.5, "tokens_per_s": "0.8"})
    assert res == [DeliveryResult("discord", True, None, 1)]
    body = http_receiver.wait_for(1)[0].json()
    assert "nayru is degraded" in body["content"]
    assert body["allowed_mentions"] == {"parse": []}  # error text must never ping @everyone
    (embed,) = body["embeds"]
    assert embed["title"] == "nayru is degraded"
    assert embed["color"] == 0xF1C40F
    assert [(f["name"], f["value"]) for f in embed["fields"]] == [
        ("model", "nayru"), ("status", "degraded"), ("latency_s", "12.5"), ("tokens_per_s", "0.8")]
    assert "health_degraded" in embed["footer"]["text"]
    assert embed["timestamp"].endswith("+00:00")


def test_discord_truncates_over_long_content(http_receiver, logs):
    log, _ = logs
    n = notifier(hooks(discord_url=http_receiver.url(DISCORD_PATH)), log)
    fields = {("k" * 300 if i == 0 else f"f{i}"): "v" * 2000 for i in range(30)}
    assert n.notify("stage_failed", title="T" * 400, text="d" * 9000, fields=fields, table=ROWS)[0].ok
    (embed,) = http_receiver.wait_for(1)[0].json()["embeds"]
    assert len(embed["title"]) == 256 and embed["title"].endswith("\u2026")
    assert len(embed["description"]) <= 4096
    assert 0 < len(embed["fields"]) <= 25
    assert len(embed["fields"][0]["name"]) == 256
    assert all(len(f["value"]) <= 1024 for f in embed["fields"])
    total = (len(embed["title"]) + len(embed.get("description", "")) + len(embed["footer"]["text"])
             + sum(len(f["name"]) + len(f["value"]) for f in embed["fields"]))
    assert total <= DISCORD_TOTAL
    assert embed["color"] == 0xE74C3C


def test_discord_run_finished_table(http_receiver, logs):
    log, _ = logs
    n = notifier(hooks(discord_url=http_receiver.url(DISCORD_PATH)), log)
    assert n.run_finished(ROWS, ok=False)[0].ok
    (embed,) = http_receiver.wait_for(1)[0].json()["embeds"]
    assert embed["title"] == "loradeploy run failed (3 model(s))"
    assert embed["description"].startswith("2 ok, 1 failed")
    assert "```\n" + format_table(ROWS) + "\n```" in embed["description"]


# ----------------------------------------------------------------------------- email

def _check_mail(server, *, tls, authenticated):
    (mail,) = server.wait_for(1)
    assert mail.tls is tls and mail.authenticated is authenticated
    assert mail.rcpt_tos == ["ops@example.test", "oncall@example.test"]
    msg = mail.message
    assert msg["Subject"] == "[loradeploy] loradeploy run failed (3 model(s))"
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",)).get_content().replace("\r\n", "\n")
    html = msg.get_body(("html",)).get_content()
    assert format_table(ROWS) in plain
    assert "<table" in html and "<td>veran</td>" in html and "<td>12.35</td>" in html
    return mail


def test_email_starttls_with_auth(smtp_starttls, logs):
    log, _ = logs
    n = notifier(hooks(email=email_cfg(smtp_starttls, "starttls")), log)
    assert n.run_finished(ROWS, ok=False) == [DeliveryResult("email", True, None, 1)]
    _check_mail(smtp_starttls, tls=True, authenticated=True)
    assert smtp_starttls.auth_attempts and all(ok for _, ok in smtp_starttls.auth_attempts)


def test_email_implicit_ssl_with_auth(smtp_ssl, logs):
    log, _ = logs
    n = notifier(hooks(email=email_cfg(smtp_ssl, "ssl")), log)
    assert n.run_finished(ROWS, ok=False)[0].ok
    _check_mail(smtp_ssl, tls=True, authenticated=True)


def test_email_plain(smtp_plain, logs):
    log, _ = logs
    n = notifier(hooks(email=email_cfg(smtp_plain, "none")), log)
    assert n.run_finished(ROWS, ok=False)[0].ok
    _check_mail(smtp_plain, tls=False, authenticated=False)


def test_email_tls_verification_is_honoured(smtp_starttls, logs):
    log, h = logs
    # Without the private CA the self-signed cert must be refused, once (not retried).
    strict = notifier(hooks(email=email_cfg(smtp_starttls, "starttls", ca_file=None)), log)
    (res,) = strict.run_finished(ROWS, ok=False)
    assert not res.ok and res.attempts == 1 and "certificate" in res.error.lower()
    assert smtp_starttls.messages == []
    assert any("via email failed" in w for w in h.warnings())
    lax = notifier(hooks(email=email_cfg(smtp_starttls, "starttls", ca_file=None, verify_tls=False)), log)
    assert lax.run_finished(ROWS, ok=False)[0].ok
    assert len(smtp_starttls.wait_for(1)) == 1


def test_email_wrong_password_fails_cleanly(smtp_starttls, logs):
    log, h = logs
    cfg = email_cfg(smtp_starttls, "starttls").model_copy(update={"password": "wrong-Passw0rd-xyz"})
    (res,) = notifier(hooks(email=cfg), log).stage_failed("veran", "merge", "boom", None)
    assert not res.ok and res.attempts == 1 and res.error.startswith("SMTP 535")
    assert smtp_starttls.messages == [] and smtp_starttls.auth_attempts[-1][1] is False
    assert "wrong-Passw0rd-xyz" not in h.text()


# ----------------------------------------------------------------------------- retries and failures

def test_500_then_200_is_delivered_after_retry(http_receiver, logs):
    log, h = logs
    http_receiver.respond(500, "upstream hiccup")
    n = notifier(hooks(slack_url=http_receiver.url(SLACK_PATH)), log)
    assert n.stage_failed("majora", "fetch", "ssh: timeout", None) == [DeliveryResult("slack", True, None, 2)]
    reqs = http_receiver.wait_for(2)
    assert len(reqs) == 2 and reqs[0].body == reqs[1].body
    assert "HTTP 500: upstream hiccup; retrying" in h.text() and not h.warnings()


def test_429_retry_after_is_honoured_and_capped(http_receiver, logs):
    log, _ = logs
    url = http_receiver.url(DISCORD_PATH)
    http_receiver.respond(429, '{"retry_after": 0.4}', {"Content-Type": "application/json"})
    t0 = time.monotonic()
    assert notifier(hooks(discord_url=url), log).stage_failed("m", "s", "e", None)[0].attempts == 2
    assert time.monotonic() - t0 >= 0.4  # body retry_after, as Discord sends it
    http_receiver.respond(429, "", {"Retry-After": "3600"})
    t0 = time.monotonic()
    (res,) = notifier(hooks(discord_url=url), log, max_retry_after_s=0.2).stage_failed("m", "s", "e", None)
    assert res.ok and res.attempts == 2 and time.monotonic() - t0 < 2


def test_persistent_5xx_gives_up_after_two_retries(http_receiver, logs):
    log, h = logs
    http_receiver.respond(503, "down", times=5)
    (res,) = notifier(hooks(slack_url=http_receiver.url(SLACK_PATH)), log).run_started(["majora"])
    assert res == DeliveryResult("slack", False, "HTTP 503: down", 3)
    assert len(http_receiver.requests) == 3
    (warning,) = h.warnings()
    assert "run_started via slack failed after 3 attempt(s): HTTP 503: down" in warning


def test_4xx_is_not_retried(http_receiver, logs):
    log, _ = logs
    http_receiver.respond(400, "invalid_payload")
    (res,) = notifier(hooks(slack_url=http_receiver.url(SLACK_PATH)), log).run_started(["majora"])
    assert res == DeliveryResult("slack", False, "HTTP 400: invalid_payload", 1)


def test_receivers_down_never_raise(http_receiver, closed_port, silent_port, logs):
    log, h = logs
    dead_smtp = EmailConfig(smtp_host="127.0.0.1", smtp_port=closed_port, security="none",
                            from_addr="a@example.test", to_addrs=["b@example.test"], timeout_s=1)
    cfg = hooks(slack_url=f"http://127.0.0.1:{closed_port}{SLACK_PATH}",
                discord_url=http_receiver.url(DISCORD_PATH), email=dead_smtp)
    t0 = time.monotonic()
    slack, discord, mail = notifier(cfg, log).stage_failed("veran", "deploy", "port busy", None)
    assert time.monotonic() - t0 < 5
    assert discord.ok and len(http_receiver.requests) == 1  # one dead channel does not block another
    assert (slack.channel, slack.ok, slack.attempts) == ("slack", False, 3)
    assert (mail.channel, mail.ok, mail.attempts) == ("email", False, 3)
    assert "connection failed" in slack.error and "connection failed" in mail.error
    assert len(h.warnings()) == 2
    # A server that accepts but never answers is bounded by timeout_s.
    hung = NotificationsConfig(events=list(EVENTS), slack=WebhookConfig(
        webhook_url=f"http://127.0.0.1:{silent_port}{SLACK_PATH}", timeout_s=0.3))
    t0 = time.monotonic()
    (res,) = notifier(hung, log).run_started(["veran"])
    assert not res.ok and res.attempts == 3 and time.monotonic() - t0 < 3


def test_broken_channel_config_costs_only_that_channel(http_receiver, logs):
    log, h = logs
    bad = EmailConfig(smtp_host="127.0.0.1", smtp_port=1, security="none", from_addr="a@x.test\nBcc: evil@x.test",
                      to_addrs=["b@x.test"])
    res = notifier(hooks(slack_url=http_receiver.url(SLACK_PATH), email=bad), log).run_started(["m"])
    assert [(r.channel, r.ok, r.attempts) for r in res] == [("slack", True, 1), ("email", False, 1)]
    assert "ValueError" in res[1].error and len(h.warnings()) == 1


def test_only_enabled_events_and_channels_are_sent(http_receiver, logs):
    log, h = logs
    url = http_receiver.url(SLACK_PATH)
    only_failures = hooks(slack_url=url, events=["stage_failed"])
    n = notifier(only_failures, log)
    assert n.run_finished(ROWS, ok=True) == []
    assert n.run_started(["majora"]) == []
    assert n.health("majora", "unhealthy", "no completion") == []
    assert notifier(hooks(slack_url=url), log).health("majora", "healthy", {}) == []  # healthy is no event
    assert notifier(only_failures.model_copy(update={"enabled": False}), log).stage_failed("m", "s", "e") == []
    off = only_failures.model_copy(update={"slack": WebhookConfig(webhook_url=url, enabled=False)})
    assert notifier(off, log).stage_failed("m", "s", "e") == []
    assert n.notify("no_such_event", title="t", text="x") == []
    assert "unknown" in h.text()
    time.sleep(0.1)
    assert http_receiver.requests == []
    assert [r.channel for r in n.stage_failed("m", "s", "e")] == ["slack"]
    assert len(http_receiver.wait_for(1)) == 1
    assert [r.channel for r in notifier(hooks(slack_url=url), log).health("m", "unhealthy", "x")] == ["slack"]


# ----------------------------------------------------------------------------- secrets

def test_secrets_never_reach_logs_or_payloads(http_receiver, closed_port, smtp_starttls, logs):
    log, h = logs
    slack_url = f"http://127.0.0.1:{closed_port}{SLACK_PATH}"
    discord_url = http_receiver.url(DISCORD_PATH)
    # A receiver that echoes the URL back in its error body, as some proxies do.
    http_receiver.respond(404, f"Unknown Webhook {discord_url}")
    cfg = hooks(slack_url=slack_url, discord_url=discord_url, email=email_cfg(smtp_starttls, "starttls"))
    n = notifier(cfg, log)
    leak = f"fetch failed: POST {discord_url} refused; login {SMTP_USER}:{SMTP_PASSWORD}"
    res = n.stage_failed("majora", f"fetch {slack_url}", leak, None)
    assert [(r.channel, r.ok) for r in res] == [("slack", False), ("discord", False), ("email", True)]

    secrets = [SLACK_PATH, DISCORD_PATH, "xoxSlackToken0123456789ab", "dIsCoRdToKeN-abcdefghijklmnopqrstuvwxyz",
               "112233445566778899", "T0ABC1234", SMTP_PASSWORD]
    logged = h.text() + "\n".join(r.error or "" for r in res)
    assert h.warnings() and f"127.0.0.1:{http_receiver.port}/***" in logged  # the lines exist, scrubbed
    for s in secrets:
        assert s not in logged
    # What goes out is scrubbed too: the email carries the error line without the password.
    sent = smtp_starttls.wait_for(1)[0].raw.decode("utf-8", "replace")
    assert "fetch failed" in sent and SMTP_PASSWORD not in sent and "xoxSlackToken" not in sent

    # The redactor also serves other log handlers, e.g. pipeline.log.
    other = logging.getLogger(f"test.notify.filter.{uuid.uuid4().hex}")
    other.propagate = False
    sink = Captured()
    sink.addFilter(n.redact_filter())
    other.addHandler(sink)
    other.error("posting to %s with %s", slack_url, SMTP_PASSWORD)
    assert sink.lines == [f"posting to http://127.0.0.1:{closed_port}/*** with ***"]


def test_configured_channels_are_on_by_default(http_receiver, logs):
    log, _ = logs
    url = http_receiver.url(SLACK_PATH)
    cfg = config_from_dict({"models": {"m": {"base_model": "/b", "adapter": "/a", "port": 5000}},
                            "notifications": {"slack": {"webhook_url": url}}})
    assert cfg.notifications.enabled and cfg.notifications.active() == ["slack"] and cfg.warnings == ()
    assert [r.ok for r in notifier(cfg.notifications, log).stage_failed("m", "merge", "boom")] == [True]
    assert len(http_receiver.wait_for(1)) == 1


class _Report:
    """What notify_health reads from a health report."""

    def model_statuses(self):
        return {"majora": "healthy", "nayru": "degraded", "veran": "unhealthy"}

    def problems(self, model):
        return {"completion": f"{model} answered nothing"} if model != "majora" else {}


def test_notify_health_sends_one_event_per_unwell_model_without_the_api_key(http_receiver, logs, monkeypatch):
    log, h = logs
    monkeypatch.setenv("LD_TEST_KEY", "sk-very-secret-server-key")
    cfg = config_from_dict({"models": {"m": {"base_model": "/b", "adapter": "/a", "port": 5000}},
                            "deployment": {"llamacpp": {"api_key": "${LD_TEST_KEY}"}},
                            "notifications": {"slack": {"webhook_url": http_receiver.url(SLACK_PATH)}}})
    n = Notifier.for_config(cfg, log=log, backoff_s=0.02)
    res = notify_health(cfg, _Report(), notifier=n)
    assert [r.ok for r in res] == [True, True]
    bodies = [r.json() for r in http_receiver.wait_for(2)]
    assert sorted(b["blocks"][0]["text"]["text"].split(" ", 1)[1] for b in bodies) == \
        ["nayru is degraded", "veran is unhealthy"]
    # the server's key is scrubbed like the channels' own secrets, in messages and log lines
    assert n.redact("auth sk-very-secret-server-key") == "auth ***"
    n.log.warning("%s", n.redact("llama-server --api-key sk-very-secret-server-key"))
    assert "sk-very-secret" not in h.text()


def test_notify_health_never_raises(logs):
    log, h = logs
    cfg = config_from_dict({"models": {"m": {"base_model": "/b", "adapter": "/a", "port": 5000}}})
    assert notify_health(cfg, object(), log=log) == []
    assert "health notification not sent" in h.text()


def test_run_logs_are_scrubbed_even_with_notifications_off(tmp_path, monkeypatch):
    from loradeploy.logsetup import pipeline_logger, stage_logger
    from loradeploy.pipeline import make_notifier
    monkeypatch.setenv("LD_TEST_KEY", "sk-very-secret-server-key")
    cfg = config_from_dict({"models": {"m": {"base_model": "/b", "adapter": "/a", "port": 5000}},
                            "deployment": {"llamacpp": {"api_key": "${LD_TEST_KEY}"}},
                            "notifications": {"enabled": False}, "logging": {"log_dir": str(tmp_path / "logs")}})
    log = pipeline_logger(cfg.logging.log_dir, "INFO")
    make_notifier(cfg, log)
    make_notifier(cfg, log)  # a second run in the same process replaces the filter, it does not stack
    with stage_logger(cfg.logging.log_dir, "m", "deploy", "INFO") as (slog, path):
        slog.info("starting llama-server --api-key %s", "sk-very-secret-server-key")
        try:
            raise RuntimeError("auth sk-very-secret-server-key refused")
        except RuntimeError:
            slog.exception("deploy crashed")
    texts = [path.read_text(), (tmp_path / "logs" / "pipeline.log").read_text()]
    for text in texts:
        assert "--api-key ***" in text and "auth *** refused" in text
        assert "sk-very-secret" not in text
    per_handler = [sum(1 for f in h.filters if type(f).__name__ == "RedactFilter") for h in log.handlers]
    assert per_handler and set(per_handler) == {1}, per_handler  # every handler scrubbed, none twice
