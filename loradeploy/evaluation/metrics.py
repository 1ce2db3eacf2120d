"""Quality and timing statistics for evaluation, in plain Python (no metric packages).

Every quality score is in [0, 1]:

- ``exact_match``: 1 when the response equals the reference after case folding, whitespace
  collapsing and trimming surrounding punctuation/quotes, else 0.
- ``contains_score``: fraction of the expected strings found in the response (case-insensitive,
  whitespace collapsed); 1 when all are there.
- ``rouge_l``: ROUGE-L F1 over lowercase word tokens (longest common subsequence).
- ``chrf``: chrF (Popović 2015) with character n-grams 1..6, beta 2, whitespace removed:
  precision and recall are averaged over the orders present in both strings, then combined
  into an F-beta score. Same definition as sacreBLEU's chrF, scaled to [0, 1].
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Iterable, Optional, Sequence

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)
_EDGE = "\"'`.,;:!?()[]{}<> \t\n"

QUALITY_METRICS = ("exact", "contains", "rouge_l", "chrf")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "")
    return _WS.sub(" ", text).strip().casefold()


def exact_match(prediction: str, reference: str) -> float:
    return 1.0 if normalize_text(prediction).strip(_EDGE) == normalize_text(reference).strip(_EDGE) else 0.0


def contains_score(prediction: str, expected: Sequence[str]) -> float:
    expected = [e for e in expected if e]
    if not expected:
        return 1.0
    hay = normalize_text(prediction)
    return sum(1 for e in expected if normalize_text(e) in hay) / len(expected)


def word_tokens(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text or "").casefold())


def lcs_length(a: Sequence, b: Sequence) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_prf(prediction: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of ROUGE-L over word tokens."""
    p, r = word_tokens(prediction), word_tokens(reference)
    if not p or not r:
        both_empty = not p and not r
        return (1.0, 1.0, 1.0) if both_empty else (0.0, 0.0, 0.0)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0, 0.0, 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return prec, rec, 2 * prec * rec / (prec + rec)


def rouge_l(prediction: str, reference: str) -> float:
    return rouge_l_prf(prediction, reference)[2]


def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(prediction: str, reference: str, *, order: int = 6, beta: float = 2.0) -> float:
    hyp = _WS.sub("", prediction or "")
    ref = _WS.sub("", reference or "")
    if not hyp and not ref:
        return 1.0
    prec_sum = rec_sum = 0.0
    effective = 0
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        nh, nr = sum(h.values()), sum(r.values())
        if nh and nr:
            common = sum((h & r).values())
            prec_sum += common / nh
            rec_sum += common / nr
            effective += 1
    if not effective:
        return 0.0
    p, r = prec_sum / effective, rec_sum / effective
    if p + r == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * p * r / (b2 * p + r)


def score_response(prediction: str, reference: Optional[str], expected_contains: Sequence[str]) -> dict:
    """All quality metrics that apply to this sample; a metric without its input is None."""
    has_ref = reference is not None
    return {
        "exact": exact_match(prediction, reference) if has_ref else None,
        "contains": contains_score(prediction, expected_contains) if expected_contains else None,
        "rouge_l": rouge_l(prediction, reference) if has_ref else None,
        "chrf": chrf(prediction, reference) if has_ref else None,
    }


def combined_quality(scores: dict) -> Optional[float]:
    """Mean of the quality metrics this sample has: one number to rank formats by."""
    vals = [scores[k] for k in QUALITY_METRICS if scores.get(k) is not None]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------- statistics

def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        return float(vals[0])
    pos = (len(vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    return float(vals[lo] + (vals[hi] - vals[lo]) * (pos - lo))


def mean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(values: Sequence[Optional[float]]) -> dict:
    vals = [v for v in values if v is not None]
    return {"n": len(vals), "mean": mean(vals), "p50": percentile(vals, 50), "p95": percentile(vals, 95),
            "min": min(vals) if vals else None, "max": max(vals) if vals else None}
