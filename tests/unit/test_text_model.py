"""The text model's data (demo/text_model.py): real standard-library text, split by module so the
evaluation samples come from modules no training step saw."""
from __future__ import annotations

from loradeploy.demo.text_model import HELD_OUT, doc_pairs, held_out, stdlib_modules, write_text_samples
from loradeploy.evaluation.samples import load_samples


def test_modules_split_by_name_and_pairs_are_signatures_with_their_docstrings():
    mods = stdlib_modules()
    names = [n for n, _ in mods]
    assert len(names) == len(set(names)) > 300 and not any(".test." in n or n.startswith("test.") for n in names)
    out = [n for n in names if held_out(n)]
    assert 0.5 / HELD_OUT < len(out) / len(names) < 2.0 / HELD_OUT
    pairs = doc_pairs([m for m in mods if m[0] in {"json.decoder", "textwrap"}])
    assert pairs and all(p.signature.split()[0] in ("def", "class", "async") for p in pairs)
    wrap = next(p for p in pairs if p.signature.startswith("def wrap("))
    assert wrap.module == "textwrap" and wrap.kind == "function" and wrap.docstring.startswith("Wrap a single paragraph")
    assert all(20 <= len(p.docstring) <= 400 and "\n\n" not in p.docstring for p in pairs)


def test_samples_come_only_from_held_out_modules(tmp_path):
    path = write_text_samples(tmp_path / "s.jsonl", n=20)
    samples = load_samples(path)
    assert len(samples) == 20 and len({s.id for s in samples}) == 20
    for s in samples:
        module = next(t for t in s.tags if t.startswith("module:")).split(":", 1)[1]
        assert held_out(module) and s.reference and s.messages[-1]["role"] == "user"
        assert module in s.messages[-1]["content"]


def test_a_short_build_trains_saves_and_loads_the_base_and_its_adapter(tmp_path, monkeypatch):
    """The builders end to end with 2 steps each (the bench trains 600 and 300): a float16 Llama of the
    declared shape with a ChatML tokenizer, a peft adapter naming it, markers that reuse both."""
    import json

    from loradeploy.demo import text_model as tm
    from loradeploy.demo.recipe import read_marker

    monkeypatch.setitem(tm.BASE_TRAIN, "steps", 2)
    monkeypatch.setitem(tm.ADAPTER_TRAIN, "steps", 2)
    base = tm.build_text_base(tmp_path / "base", threads=1)
    cfg = json.loads((base / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["tie_word_embeddings"]) == (4, 512, False)
    assert cfg["vocab_size"] >= tm.VOCAB and read_marker(base)["steps"] == 2
    adapter = tm.train_text_adapter(base, tmp_path / "adapter", threads=1)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base.resolve()) and conf["r"] == tm.ADAPTER_TRAIN["r"]
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    mtime = (base / "model.safetensors").stat().st_mtime
    assert tm.build_text_base(tmp_path / "base", threads=1) == base and (base / "model.safetensors").stat().st_mtime == mtime
