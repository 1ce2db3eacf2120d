"""What a notification looks like on each channel: Slack blocks, a Discord embed, a two-part email.

Every builder keeps to the service's size limits, so an over-long error line is clipped here rather
than rejected by the service (which would lose the whole notification).
"""
from __future__ import annotations

import datetime as dt
import email.utils
import html
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Mapping, Sequence

from ..config import EmailConfig

_ICON = {"info": "\N{BELL}", "success": "\N{WHITE HEAVY CHECK MARK}",
         "warning": "\N{WARNING SIGN}\ufe0f", "error": "\N{CROSS MARK}"}
_COLOUR = {"info": 0x3498DB, "success": 0x2ECC71, "warning": 0xF1C40F, "error": 0xE74C3C}

# Service limits (characters). Slack: section text 3000, field text 2000, 10 fields per section,
# header 150. Discord embeds: title 256, description 4096, 25 fields, name 256, value 1024,
# footer 2048, content 2000, 6000 across one message's embeds.
SLACK_TEXT, SLACK_FIELD, SLACK_FIELDS_PER_SECTION, SLACK_HEADER, SLACK_MAX_FIELDS = 3000, 2000, 10, 150, 40
DISCORD_TITLE, DISCORD_DESC, DISCORD_FIELDS, DISCORD_NAME, DISCORD_VALUE = 256, 4096, 25, 256, 1024
DISCORD_FOOTER, DISCORD_CONTENT, DISCORD_TOTAL = 2048, 2000, 6000


@dataclass(frozen=True)
class Message:
    event: str
    title: str
    text: str
    severity: str
    fields: dict[str, str] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    host: str = ""


def _clip(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: max(n - 1, 0)] + "\u2026"


def cell_text(v: Any) -> str:
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
    grid = [[_clip(c, max_cell) for c in cols]] + [[_clip(cell_text(r.get(c)), max_cell) for c in cols] for r in rows]
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


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _slack_field(name: str, value: str) -> dict:
    head = f"*{_clip_mrkdwn(one_line(name), 200)}*\n"
    return {"type": "mrkdwn", "text": head + (_clip_mrkdwn(value, SLACK_FIELD - len(head)) or "-")}


def slack_payload(msg: Message) -> dict:
    icon = _ICON.get(msg.severity, "")
    blocks: list[dict] = [{"type": "header",
                           "text": {"type": "plain_text", "text": _clip(f"{icon} {one_line(msg.title)}", SLACK_HEADER),
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
    fallback = f"{icon} {one_line(msg.title)}" + (f": {msg.text}" if msg.text.strip() else "")
    return {"text": _clip_mrkdwn(fallback, SLACK_TEXT), "blocks": blocks}


def discord_payload(msg: Message) -> dict:
    icon = _ICON.get(msg.severity, "")
    title = _clip(one_line(msg.title), DISCORD_TITLE)
    footer = _clip(f"loradeploy \u00b7 {msg.event} \u00b7 {msg.host}", DISCORD_FOOTER)
    fields = [{"name": _clip(one_line(k), DISCORD_NAME) or "\u200b",
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
    m["Subject"] = _clip(one_line(f"[loradeploy] {msg.title}"), 200)
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
    parts = ['<html><body style="font-family:sans-serif">',
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
        body = "".join("<tr>" + "".join(f"<td>{e(cell_text(r.get(c)))}</td>" for c in cols) + "</tr>" for r in msg.table)
        parts.append('<table border="1" cellpadding="4" style="border-collapse:collapse">'
                     f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append(f'<p style="color:#888;font-size:small">loradeploy &middot; {e(msg.event)} &middot; {e(msg.host)}</p>'
                 "</body></html>")
    m.add_alternative("\n".join(parts), subtype="html")
    return m
