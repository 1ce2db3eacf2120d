"""The embedded demo and the tiny models it, the tests and the benchmark build; nothing comes from a hub.

samples: the task (repeat three words, personas sign) and its eval set; tokenizers, training,
builders (base models), adapters (persona LoRAs), bench_models (random weights at a size);
recipe: build markers, so a cached build is reused only for the same recipe; run: prepare_demo.
Importing this package imports no ML library; the builders import them when called.
"""
from __future__ import annotations

from .adapters import train_adapter
from .bench_models import build_bench_adapter, build_bench_llama
from .builders import build_base
from .recipe import ARCHS, BUILD_MARKER
from .run import DEMO_MAX_KLD, DEMO_MODEL, demo_config_dict, prepare_demo
from .samples import (CHAT_TEMPLATE, EXAMPLE_PROMPT, IM_END, IM_START, N_WORDS, PERSONAS, Persona,
                      demo_eval_samples, get_persona, is_heldout, render_chatml, write_demo_eval_samples)

__all__ = ["ARCHS", "BUILD_MARKER", "CHAT_TEMPLATE", "DEMO_MAX_KLD", "DEMO_MODEL", "EXAMPLE_PROMPT", "IM_END", "IM_START", "N_WORDS",
           "PERSONAS", "Persona", "build_base", "build_bench_adapter", "build_bench_llama", "demo_config_dict",
           "demo_eval_samples", "get_persona", "is_heldout", "prepare_demo", "render_chatml", "train_adapter",
           "write_demo_eval_samples"]
