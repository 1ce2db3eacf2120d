"""GGUF files checked without trusting them: reader parses the header within bounds, check applies
llama.cpp's loader rules and the quant mix, report holds the findings and renders them."""
from __future__ import annotations

from .check import NOMINAL_BPW, bpw_range, check_gguf, validate_gguf
from .report import GGUFReport, Problem, render_report

__all__ = ["NOMINAL_BPW", "GGUFReport", "Problem", "bpw_range", "check_gguf", "render_report", "validate_gguf"]
