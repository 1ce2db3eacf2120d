"""Evaluation: sample sets run against deployed models and quantized files, scored and reported.

Modules: ``samples`` (the JSONL sample set), ``targets`` (what to evaluate), ``chat`` (one streamed
answer, timed), ``servers`` (temporary llama.cpp servers), ``memory`` (RSS / GPU of a server),
``runner`` (the ``evaluate()`` entry), ``results`` (result types, aggregates, comparison),
``report`` (JSON, Markdown, charts, the CLI table) and ``metrics`` (quality scores, statistics).

Deliberately empty: submodules import each other directly, so importing one never drags in the
runner (and no import path runs back into the package).
"""
