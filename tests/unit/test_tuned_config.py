"""A tuned format in the config (issue 20): spellings, one file-safe label, the gate's limits, the report's parts."""
from __future__ import annotations

import pytest

from loradeploy.config import config_from_dict
from loradeploy.config.tuned import TUNABLE, parse_tuned
from loradeploy.errors import ConfigError
from loradeploy.quantize.rules import FORMATS
from loradeploy.quantize.tuned import parse_budget
from loradeploy.verify.gate import limits_for, sized_after
from loradeploy.verify.tuned import recipe_lines, write_size_chart


def _cfg(tmp_path, **quant):
    return config_from_dict({"models": {"m": {"base_model": str(tmp_path), "adapter": str(tmp_path), "port": 5000}},
                             "quantization": quant}, base_dir=tmp_path)


def test_spellings_become_one_file_safe_label():
    for spec, label in [("TUNED@Q4_K_M", "TUNED-Q4_K_M"), ("tuned-q5_k_m", "TUNED-Q5_K_M"),
                        ("TUNED@4.8bpw", "TUNED-4.8BPW"), ("tuned@4.5GiB", "TUNED-4.5GIB"), ("TUNED@900mb", "TUNED-900MB")]:
        t = parse_tuned(spec)
        assert t.label == label and "@" not in t.label and "/" not in t.label
        assert parse_tuned(t.label) == t                  # the label reads back as the same budget
        assert parse_budget(t.label).value == t.value
    assert parse_tuned("TUNED@4.5GB").value == 4_500_000_000


def test_the_tunable_formats_are_the_engines():
    assert set(TUNABLE) == set(FORMATS)


@pytest.mark.parametrize("bad", ["TUNED@Q3_K_M", "TUNED@", "TUNED@0.5bpw", "TUNED@fast", "TUNEDQ4_K_M"])
def test_a_bad_budget_fails_at_load(tmp_path, bad):
    with pytest.raises(ConfigError) as exc:
        _cfg(tmp_path, formats=[bad])
    assert "TUNED@" in str(exc.value) or "tuned" in str(exc.value).lower()


def test_the_config_keeps_the_label_everywhere(tmp_path):
    cfg = _cfg(tmp_path, formats=["Q4_K_M", "TUNED@Q4_K_M", "tuned-q4_k_m"], primary_format="TUNED@Q4_K_M")
    assert cfg.quantization.formats == ["Q4_K_M", "TUNED-Q4_K_M"]    # one spelling, deduplicated
    assert cfg.serve_format_for("m") == "TUNED-Q4_K_M"
    assert cfg.quantization.imatrix is None                          # no imatrix needed: IQ types only join with one


def test_a_tuned_format_is_held_to_the_limits_of_the_format_it_is_sized_after(tmp_path):
    v = config_from_dict({"models": {"m": {"base_model": str(tmp_path), "adapter": str(tmp_path), "port": 5000}},
                          "verify": {"max_kld": {"Q4_K_M": 0.15, "TUNED@Q5_K_M": 0.01}}}, base_dir=tmp_path).verify
    assert sized_after("TUNED-Q4_K_M") == "Q4_K_M" and sized_after("Q8_0") == "Q8_0"
    assert limits_for("TUNED-Q4_K_M", v) == limits_for("Q4_K_M", v)
    assert limits_for("TUNED-Q5_K_M", v).max_kld == 0.01            # its own, when written
    assert limits_for("TUNED-4.8BPW", v).max_kld > 0


def test_the_report_names_the_recipe_and_charts_kld_against_size(tmp_path):
    tuned = {"budget": "TUNED-Q4_K_M", "sized_after": "Q4_K_M", "base": "Q4_K_M", "recipe_file": "/x/m-tuned.tensor-types.txt",
             "recipe": "a=q4_k\nb=q6_k\n", "rebuild": "llama-quantize --tensor-type-file m-tuned.tensor-types.txt F16.gguf "
             "m-tuned.gguf Q4_K_M"}
    v = {"model": "m", "formats": {"Q4_K_M": {"size": 1000, "kld_mean": 0.02}, "Q8_0": {"size": 2000, "kld_mean": 0.001},
                                   "TUNED-Q4_K_M": {"size": 990, "kld_mean": 0.015, "tuned": tuned},
                                   "TUNED-Q5_K_M": {"size": 1200, "kld_mean": 0.008}}}
    lines = recipe_lines(v)
    assert "TUNED-Q4_K_M" in lines[0] and "--tensor-type-file" in lines[0] and "2 entries" in lines[0]
    assert write_size_chart([v], tmp_path / "c.png").stat().st_size > 0
    assert write_size_chart([{"formats": {"Q4_K_M": {"size": 1, "kld_mean": 0.1}}}], tmp_path / "d.png") is None
