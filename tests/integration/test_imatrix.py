"""quantization.imatrix: auto with the real llama.cpp tools on the tiny demo Llama: llama-imatrix over
verify's calibration text, llama-quantize --imatrix for the types it matters to (IQ4_XS, Q4_K_M), and
verify measuring Q4_K_M with and without the importance matrix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loradeploy.config import config_from_dict
from loradeploy.demo import DEMO_MAX_KLD
from loradeploy.errors import ConfigError
from loradeploy.pipeline import run_pipeline

MODEL = "majora"
SYSTEM = "You are Majora. Repeat the words and sign with -- MAJORA"


def _data(root: Path, base: Path, adapter: Path, **quant) -> dict:
    from loradeploy.demo import write_demo_eval_samples
    samples = root / "eval_samples.jsonl"
    if not samples.exists():
        write_demo_eval_samples(samples, persona=MODEL)
    return {
        "models": {MODEL: {"base_model": str(base), "adapter": str(adapter), "port": 5000, "system_prompt": SYSTEM}},
        "quantization": {"formats": ["Q4_K_M", "IQ4_XS", "Q8_0"], "imatrix": "auto", **quant},
        "verify": {"max_tokens": 768, "stop_prompts": 1, "max_kld": dict(DEMO_MAX_KLD)},
        "evaluation": {"samples": str(samples)},
        "pipeline": {"stages": ["fetch", "merge", "convert", "quantize", "verify"], "work_dir": str(root / "work"),
                     "state_dir": str(root / "state")},
        "logging": {"log_dir": str(root / "logs")},
        "performance": {"min_free_disk_gb": 0.1},
    }


def _minimal(**quant) -> dict:
    return {"models": {MODEL: {"base_model": "/nonexistent/base", "adapter": "/nonexistent/adapter", "port": 5000}},
            "quantization": quant}


@pytest.mark.parametrize("where", ["quantization", "models", "evaluation"])
def test_iq_formats_need_quantization_imatrix(where):
    data = _minimal(formats=["Q4_K_M"])
    target = {"quantization": data["quantization"], "models": data["models"][MODEL]}.get(where)
    if where == "evaluation":
        data["evaluation"] = target = {}
    target["formats"] = ["IQ4_XS"]
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data)
    msg = str(ei.value)
    assert "IQ4_XS needs an importance matrix" in msg and "quantization.imatrix: auto" in msg and "\n" not in msg
    data["quantization"]["imatrix"] = "auto"
    assert config_from_dict(data).quantization.imatrix == "auto"
    data["quantization"]["imatrix"] = "imatrix.gguf"
    assert config_from_dict(data, base_dir=Path("/cfg")).quantization.imatrix == Path("/cfg/imatrix.gguf")


@pytest.mark.slow
def test_imatrix_auto_builds_iq4_xs_and_verify_shows_q4_k_m_with_and_without(llama_pair, tmp_path):
    from loradeploy.quantize.imatrix import applied_imatrix, twin_path

    base, adapter = llama_pair
    cfg = config_from_dict(_data(tmp_path, base, adapter))
    res = run_pipeline(cfg, [MODEL])
    stages = res.models[MODEL].stages
    assert all(o.status == "done" for o in stages.values()), {s: o.to_dict() for s, o in stages.items()}

    q = stages["quantize"].info
    assert q["engine"] == {"Q4_K_M": "llama.cpp-imatrix", "IQ4_XS": "llama.cpp-imatrix", "Q8_0": "loradeploy"}
    imatrix = Path(q["imatrix"])
    assert imatrix.is_file() and imatrix.stat().st_size > 0
    work = Path(cfg.pipeline.work_dir)
    iq4 = next(work.rglob("*-iq4_xs.gguf"))
    q4 = next(p for p in work.rglob("*-q4_k_m.gguf") if p.parent.name != "no-imatrix")
    # llama-quantize accepted the file and says so in what it wrote; the plain twin has none
    assert applied_imatrix(iq4) and applied_imatrix(q4)
    assert applied_imatrix(twin_path(q4)) is None

    v = stages["verify"].info
    assert v["formats"]["IQ4_XS"]["passed"] is True, v["formats"]["IQ4_XS"]   # loads in llama.cpp and verifies
    with_im, without = v["formats"]["Q4_K_M"], v["formats"]["Q4_K_M-no-imatrix"]
    assert with_im["passed"] is True and without["passed"] is not None
    data = json.loads(Path(v["report"]).read_text())
    assert data["formats"]["Q4_K_M"]["variant"] == "imatrix"
    assert data["formats"]["Q4_K_M-no-imatrix"]["variant"] == "no-imatrix"
    assert data["formats"]["Q4_K_M-no-imatrix"]["gated"] is False     # measured, never served
    assert data["served_format"] == "Q4_K_M"
