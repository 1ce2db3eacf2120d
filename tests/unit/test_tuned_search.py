"""The tuned search's cheap parts (issue 20): the scorer's prefix-tree batch, the held-out split from
verify's text, the top-1 guard when choosing the recipe, and probes spread over a kind's layers."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from loradeploy.quantize.tuned.measure import TimeBudget, choose, stock_seconds, top1_worse
from loradeploy.quantize.tuned.probe import corrected_errors, corrections, probes, trusted
from loradeploy.quantize.tuned.scorer import MIN_HELDOUT, heldout, layout, search_sequences


def test_a_shared_prefix_is_one_batch_entry_carrying_every_sequence():
    seqs = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6, 7], [9]]          # [9] predicts nothing: skipped
    lay = layout(seqs, max_tokens=100, max_positions=100)
    assert lay.n_seq == 3 and lay.n_tokens == 7                      # 1 2 3 4 | 5 | 6 7
    by = {(int(t), int(p)): ids for t, p, ids in zip(lay.tokens, lay.pos, lay.seq_ids)}
    assert by[(1, 0)] == (0, 1, 2) and by[(2, 1)] == (0, 1, 2) and by[(3, 2)] == (0, 2)
    assert by[(4, 3)] == (0,) and by[(5, 2)] == (1,) and by[(7, 4)] == (2,)
    # every node with a successor is scored once, its next token the first successor seen
    scored = {int(lay.tokens[i]): int(n) for i, n in zip(lay.out, lay.nxt)}
    assert scored == {1: 2, 2: 3, 3: 4, 6: 7}


def test_the_batch_is_capped_in_tokens_and_positions():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 1000, 50)) for _ in range(20)]
    lay = layout(seqs, max_tokens=120, max_positions=30)
    assert lay.n_tokens == 120 and lay.out.size == 30 and lay.n_seq == 3
    assert np.all(np.diff(lay.out) > 0)
    # positions within a sequence stay in order, so one decode call sees each prefix before it is used
    for s in range(lay.n_seq):
        pos = [int(p) for p, ids in zip(lay.pos, lay.seq_ids) if s in ids]
        assert pos == list(range(len(pos)))


def test_the_search_reads_text_verify_does_not_score():
    verify = [[1, 2, 3], [1, 2, 4, 5]]                                 # the last one cut at verify's budget
    more = [[1, 2, 3], [1, 2, 4, 5, 6, 7], [1, 2, 8] + [9] * (MIN_HELDOUT // 2), [10, 11] * (MIN_HELDOUT // 4)]
    assert heldout(verify, more) == more[2:]
    seqs, text = search_sequences(verify, more)
    assert text == "heldout" and seqs == more[2:]
    seqs, text = search_sequences(verify, more[:2])                    # nothing beyond verify's: its own text
    assert text == "in-sample" and seqs == verify
    # verify reads conversations: general text alone beyond them does not make a held-out set
    kinds = ["chat", "chat", "text", "text"]
    assert search_sequences(verify, more, ["chat", "chat"], kinds)[1] == "in-sample"
    assert search_sequences(verify, more, ["chat", "chat"], ["chat", "chat", "chat", "text"])[1] == "heldout"
    assert search_sequences(verify, more, ["text", "text"], kinds)[1] == "heldout"


def test_a_recipe_with_worse_top1_than_the_stock_mix_is_not_kept():
    kld = {"stock": 0.010, "estimate": 0.006, "corrected": 0.004}
    assert choose(kld, {"stock": 0.95, "estimate": 0.96, "corrected": 0.95}) == ("corrected", {})
    chosen, rejected = choose(kld, {"stock": 0.95, "estimate": 0.95, "corrected": 0.94})
    assert chosen == "estimate" and set(rejected) == {"corrected"}
    chosen, rejected = choose(kld, {"stock": 0.95, "estimate": 0.90, "corrected": 0.94})
    assert chosen == "stock" and "below the stock mix" in rejected["estimate"]
    # equal KLD: the corrected recipe, then the estimate, before the stock mix
    assert choose({k: 0.01 for k in kld}, {k: 0.9 for k in kld})[0] == "corrected"
    # per position (paired): a flip or two between near-tied tokens is noise, three lost and none won is not
    stock = np.ones(200, bool)
    lose = lambda n: np.r_[np.zeros(n, bool), np.ones(200 - n, bool)]
    agree = {"stock": stock, "estimate": stock, "corrected": lose(2)}
    assert choose(kld, {"stock": 1.0, "estimate": 1.0, "corrected": 0.99}, agree)[0] == "corrected"
    agree["corrected"] = lose(3)
    assert choose(kld, {"stock": 1.0, "estimate": 1.0, "corrected": 0.985}, agree)[0] == "estimate"
    assert not top1_worse(stock, lose(2)) and top1_worse(stock, lose(3))
    part = np.r_[np.ones(100, bool), np.zeros(100, bool)]          # the stock mix right on half
    swapped = np.r_[np.ones(97, bool), np.zeros(3, bool), np.ones(3, bool), np.zeros(97, bool)]
    assert not top1_worse(part, swapped)                             # lost 3, won 3 back
    # a candidate the budget left unmeasured is not chosen
    assert choose({"stock": 0.01, "estimate": 0.02}, {"stock": 0.9, "estimate": 0.9}) == ("stock", {})


def test_a_probe_lowers_a_few_layers_spread_over_the_kind():
    names = [f"blk.{i}.ffn_up.weight" for i in range(12)] + ["output.weight"]
    stock = {n: 12 for n in names}                                   # Q4_K
    errs = {n: {11: 0.3, 12: 0.1, 13: 0.05} for n in names}          # Q3_K, Q4_K, Q5_K
    plan = SimpleNamespace(errors=SimpleNamespace(by_group=errs), weights={n: 1.0 for n in names}, stock=stock)
    sizer = SimpleNamespace(cost=lambda n, ty: {11: 3, 12: 4, 13: 5}[ty])
    moved, est, kinds = probes(plan, sizer, layers=4)
    low, up = moved["lower:ffn_up"], moved["raise:ffn_up"]
    changed = sorted(int(n.split(".")[1]) for n in names if low[n] != stock[n])
    assert changed == [0, 4, 7, 11] and all(low[f"blk.{i}.ffn_up.weight"] == 11 for i in changed)
    assert all(up[f"blk.{i}.ffn_up.weight"] == 13 for i in changed) and sum(up[n] != stock[n] for n in names) == 4
    assert abs(est["lower:ffn_up"] - 4 * 0.2) < 1e-12 and abs(est["raise:ffn_up"] - 4 * 0.05) < 1e-12
    assert moved["lower:output"]["output.weight"] == 11 and kinds["ffn_up"] == names[:12]


def test_the_corrected_allocation_keeps_to_what_was_measured_and_scales_each_side():
    """A kind whose downward probe measured flat may go one type down, never further (Q3_K stays out for a
    Q5_K stock); the upward side takes its own measured ratio."""
    names = ["blk.0.ffn_up.weight", "token_embd.weight"]
    stock = {n: 13 for n in names}                                               # Q5_K
    errs = {n: {11: 0.4, 12: 0.1, 13: 0.05, 14: 0.02} for n in names}            # Q3_K .. Q6_K
    sizer = SimpleNamespace(cost=lambda n, ty: {11: 3, 12: 4, 13: 5, 14: 6}[ty])
    assert set(trusted(errs, stock, sizer)["token_embd.weight"]) == {12, 13, 14}
    kinds = {"ffn_up": names[:1], "token_embd": names[1:]}
    kld = {"stock": 1.0, "lower:ffn_up": 1.0, "raise:ffn_up": 0.99, "lower:token_embd": 1.5, "raise:token_embd": 0.7}
    est = {"lower:ffn_up": 0.05, "raise:ffn_up": 0.03, "lower:token_embd": 0.05, "raise:token_embd": 0.03}
    corr = corrections(kld, est, kinds)
    assert corr["lower"]["token_embd"] == 10.0 and abs(corr["raise"]["token_embd"] - 10.0) < 1e-9
    assert corr["lower"]["ffn_up"] == 1e-3 * 10.0                                # flat: the floor, not zero
    assert abs(corr["raise"]["ffn_up"] - 0.01 / 0.03) < 1e-9
    e = corrected_errors(errs, {n: 1.0 for n in names}, stock, corr, sizer)
    assert set(e["blk.0.ffn_up.weight"]) == {12, 13, 14} and e["token_embd.weight"][13] == 0.0
    assert abs(e["token_embd.weight"][14] - 10.0 * (0.02 - 0.05)) < 1e-12
    assert abs(e["token_embd.weight"][12] - 10.0 * (0.1 - 0.05)) < 1e-12


def test_the_stock_recipes_time_is_its_share_of_one_engine_pass():
    n = {"a": 100, "b": 300}
    recipes = {"stock": {"a": 12, "b": 12}, "estimate": {"a": 13, "b": 12}, "lower:x": {"a": 11, "b": 12}}
    stats = {"seconds": 2.0, "quantize_seconds_by_type": {"Q4_K": 0.8, "Q5_K": 0.1, "Q3_K": 0.3}}
    # Q4_K's 0.8 s went to 400 elements, all of them the stock recipe's; the 0.8 s not quantizing is
    # shared by the three files written
    assert abs(stock_seconds(stats, recipes, n) - (0.8 + 0.8 / 3)) < 1e-9
    assert TimeBudget().ratio == 2.0


def test_slow_types_are_measured_on_a_few_layers_and_scaled_on_the_rest(tmp_path):
    from loradeploy.quantize.rules import IQ3_XXS, Q3_K, Q4_K
    from loradeploy.quantize.tuned.recipe import Group
    from loradeploy.quantize.tuned.sensitivity import Errors, _scale_slow

    gs = [Group(f"blk.{i}.attn_q.weight", "attn_q", i, 8, 256) for i in range(6)]
    res = Errors({g.name: {Q3_K: 0.2 + i, Q4_K: 0.1} for i, g in enumerate(gs)}, {})
    for i in (0, 5):
        res.by_group[gs[i].name][IQ3_XXS] = (0.2 + i) * (0.5 if i == 0 else 0.7)
    _scale_slow(res, gs, {g.name: [Q3_K, Q4_K, IQ3_XXS] for g in gs}, {gs[0].name, gs[5].name})
    assert abs(res.by_group[gs[2].name][IQ3_XXS] - 2.2 * 0.6) < 1e-12
    assert res.scaled == {g.name: [IQ3_XXS] for g in gs[1:5]}


def test_probe_files_are_held_to_the_disk_and_the_preflight_counts_the_search():
    from loradeploy.merge.preflight import BPW, RunWrites, disk_need
    from loradeploy.quantize.tuned.measure import DISK_MARGIN, disk_room

    gb = 1 << 30
    # 4.5 GB files (7B at Q4_K_M): stock, estimate, corrected and the run cache stay, so 30 GB free leaves 2
    assert disk_room(Path("."), int(4.5 * gb), 18, free=30 * gb) == int((30 * gb - 18 * gb - DISK_MARGIN) // (4.5 * gb))
    assert disk_room(Path("."), int(4.5 * gb), 18, free=10 * gb) == 0
    assert disk_room(Path("."), 1 << 20, 18, free=30 * gb) == 18
    base = SimpleNamespace(param_count=7_000_000_000, config={"vocab_size": 152064},
                           tensors={"w": (None, {"shape": [7_000_000_000]})})
    adapter = SimpleNamespace(pairs={}, full_tensors=[])
    plain = disk_need(base, adapter, "two-step", ["Q4_K_M"], False, RunWrites())
    tuned = disk_need(base, adapter, "two-step", ["Q4_K_M", "TUNED-Q4_K_M", "TUNED-4.8BPW"], False, RunWrites())
    assert plain["tuned search"] == 0
    assert tuned["tuned search"] == 3 * int(7e9 * BPW["Q4_K_M"] / 8) + 3 * int(7e9 * BPW["Q8_0"] / 8)
