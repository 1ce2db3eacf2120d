"""Slack / Discord webhooks and SMTP email for pipeline and health events, with secrets redacted.

Layout: ``payloads`` (what a message looks like per channel, within each service's limits),
``channels`` (HTTP and SMTP delivery), ``redact`` (the secret scrubber and its logging filter),
``notifier`` (events, retries, ``notify_health``).
"""
from .channels import post_json, send_email
from .notifier import EVENTS, DeliveryResult, Notifier, notify_health
from .payloads import (DISCORD_TOTAL, Message, discord_payload, email_message, format_table, slack_payload)
from .redact import RedactFilter, Redactor, config_secrets, secret_pairs

__all__ = ["DISCORD_TOTAL", "DeliveryResult", "EVENTS", "Message", "Notifier", "RedactFilter", "Redactor",
           "config_secrets", "discord_payload", "email_message", "format_table", "notify_health", "post_json",
           "secret_pairs", "send_email", "slack_payload"]
