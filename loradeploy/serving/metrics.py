"""A port's own ``/metrics`` in Prometheus' text format (0.0.4), written by hand: requests by route and
code, requests in flight, a latency histogram by route, prompt and generated tokens, and what is served.

Token counts come from what the backend returns: ``usage`` (OpenAI) or llama-server's ``timings``. A
stream is never parsed chunk by chunk: only its last events (``tail_tokens``), where both appear."""
from __future__ import annotations

import json
from typing import Iterable, Optional

from .policy import ROUTES

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
OTHER = "other"          # the route label of every path off the allow-list (bounded label values)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def route_label(path: Optional[str]) -> str:
    return path if path in ROUTES else OTHER


def _esc(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list] = {}       # route -> [count per bucket..., +Inf count, sum]
        self.prompt_tokens = 0
        self.generated_tokens = 0

    def observe(self, route: str, code: int, seconds: float) -> None:
        key = (route, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.hist.get(route)
        if h is None:
            h = self.hist[route] = [0] * (len(BUCKETS) + 1) + [0.0]
        for i, le in enumerate(BUCKETS):
            if seconds <= le:
                h[i] += 1
                break
        else:
            h[len(BUCKETS)] += 1
        h[-1] += seconds

    def tokens(self, counted: Optional[tuple[int, int]]) -> None:
        if counted:
            self.prompt_tokens += counted[0]
            self.generated_tokens += counted[1]

    def render(self, in_flight: int, served: dict) -> str:
        out = ["# HELP loradeploy_requests_total Requests answered on this port, by route and status code.",
               "# TYPE loradeploy_requests_total counter"]
        out += [f"loradeploy_requests_total{_labels(route=r, code=c)} {n}"
                for (r, c), n in sorted(self.requests.items())]
        out += ["# HELP loradeploy_requests_in_flight Requests being answered now.",
                "# TYPE loradeploy_requests_in_flight gauge", f"loradeploy_requests_in_flight {in_flight}",
                "# HELP loradeploy_request_seconds Time from a request's head to the end of its answer.",
                "# TYPE loradeploy_request_seconds histogram"]
        for r, h in sorted(self.hist.items()):
            total = 0
            for le, n in zip(BUCKETS, h):
                total += n
                out.append(f"loradeploy_request_seconds_bucket{_labels(route=r, le=_num(le))} {total}")
            total += h[len(BUCKETS)]
            out.append(f"loradeploy_request_seconds_bucket{_labels(route=r, le='+Inf')} {total}")
            out.append(f"loradeploy_request_seconds_sum{_labels(route=r)} {_num(h[-1])}")
            out.append(f"loradeploy_request_seconds_count{_labels(route=r)} {total}")
        out += ["# HELP loradeploy_prompt_tokens_total Prompt tokens of the answered requests (as the backend counted).",
                "# TYPE loradeploy_prompt_tokens_total counter", f"loradeploy_prompt_tokens_total {self.prompt_tokens}",
                "# HELP loradeploy_generated_tokens_total Tokens generated for the answered requests.",
                "# TYPE loradeploy_generated_tokens_total counter",
                f"loradeploy_generated_tokens_total {self.generated_tokens}",
                "# HELP loradeploy_served_info What this port serves.", "# TYPE loradeploy_served_info gauge",
                f"loradeploy_served_info{_labels(**{k: served.get(k) or '' for k in ('version', 'format', 'sha256', 'mode')})} 1"]
        return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- token counts

def tokens_of(obj) -> Optional[tuple[int, int]]:
    """(prompt, generated) from an answer's ``usage``, else from llama-server's ``timings``."""
    if not isinstance(obj, dict):
        return None
    usage, timings = obj.get("usage"), obj.get("timings")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        gen = usage.get("completion_tokens")
        return usage["prompt_tokens"], gen if isinstance(gen, int) else 0
    if isinstance(timings, dict) and isinstance(timings.get("predicted_n"), int):
        prompt = timings.get("prompt_n")
        return prompt if isinstance(prompt, int) else 0, timings["predicted_n"]
    return None


def body_tokens(body: bytes) -> Optional[tuple[int, int]]:
    try:
        return tokens_of(json.loads(body))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def tail_tokens(tail: Iterable[bytes]) -> Optional[tuple[int, int]]:
    """The counts in the last server-sent event of a stream that carries usage or timings."""
    text = b"".join(tail)
    for event in reversed(text.split(b"\n\n")):
        if b'"usage"' not in event and b'"timings"' not in event:
            continue
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                got = body_tokens(line[5:])
                if got:
                    return got
    return None
