"""The tuned allocator on synthetic sensitivities: it never exceeds the budget, it gives the bits to the
groups the adapter changed most when all else is equal, and at a stock format's size it is never worse
than that format's own assignment (by the same estimate); the budget spellings."""
from __future__ import annotations

import numpy as np
import pytest

from loradeploy.quantize.tuned import Budget, BudgetError, Deltas, allocate, parse_budget
from loradeploy.quantize.tuned.allocate import _hull, options_of
from loradeploy.quantize.tuned.sensitivity import adapter_weights, delta_norm

# type -> bits per weight, roughly as the real ones (Q3_K, Q4_K, Q5_K, Q6_K, Q8_0)
BPW = {11: 3.4375, 12: 4.5, 13: 5.5, 14: 6.5625, 8: 8.5}


def instance(rng, n_groups=40, equal=False):
    sizes = np.full(n_groups, 65536) if equal else rng.integers(1, 64, n_groups) * 4096
    costs, errors = {}, {}
    for g in range(n_groups):
        name = f"blk.{g}.w"
        costs[name] = {ty: int(sizes[g] * b / 8) for ty, b in BPW.items()}
        scale = 1.0 if equal else float(rng.lognormal(0, 1.5))
        # error falls ~4x per extra bit, with noise (and so not always convex)
        errors[name] = {ty: scale * 4.0 ** -b * (1.0 if equal else float(rng.uniform(0.7, 1.3)))
                        for ty, b in BPW.items()}
    return costs, errors


def total(opts, types):
    return sum(next(o for o in opts[g] if o[0] == ty)[1] for g, ty in types.items()), \
        sum(next(o for o in opts[g] if o[0] == ty)[2] for g, ty in types.items())


@pytest.mark.parametrize("seed", range(12))
def test_never_exceeds_the_budget_and_beats_any_start_it_is_given(seed):
    rng = np.random.default_rng(seed)
    costs, errors = instance(rng)
    start = {g: int(rng.choice(list(BPW))) for g in costs}      # a "stock" mix
    opts = options_of(costs, errors, {}, keep=start)
    stock_bytes, stock_err = total(opts, start)
    for budget in (stock_bytes, int(stock_bytes * rng.uniform(0.6, 1.3))):
        cheapest = sum(min(c.values()) for c in costs.values())
        if budget < cheapest:
            with pytest.raises(BudgetError):
                allocate(opts, budget, start=start)
            continue
        a = allocate(opts, budget, start=start)
        assert a.bytes <= budget and total(opts, a.types) == (a.bytes, pytest.approx(a.error))
        if budget >= stock_bytes:
            assert a.error <= stock_err * (1 + 1e-12)
        # nothing left that a single upgrade could still buy and improve
        for g, ty in a.types.items():
            for o in opts[g]:
                if o[2] < next(x[2] for x in opts[g] if x[0] == ty):
                    assert a.bytes - next(x[1] for x in opts[g] if x[0] == ty) + o[1] > budget


def test_at_equal_sensitivity_the_adapters_groups_win():
    costs, errors = instance(np.random.default_rng(0), n_groups=10, equal=True)
    costs = {g: {ty: c[ty] for ty in (12, 14)} for g, c in costs.items()}      # Q4_K or Q6_K
    errors = {g: {ty: e[ty] for ty in (12, 14)} for g, e in errors.items()}
    names = list(costs)
    frob2 = {n: 1.0 for n in names}
    changed = {names[7]: 0.3, names[2]: 0.2, names[5]: 0.1}          # ||dW||, ||W|| = 1
    weights = adapter_weights(Deltas(changed, set(), []), frob2)
    assert weights[names[7]] > weights[names[2]] > weights[names[5]] > weights[names[0]] == 1.0
    opts = options_of(costs, errors, weights)
    base = sum(c[12] for c in costs.values())
    step = costs[names[0]][14] - costs[names[0]][12]
    a = allocate(opts, base + 2 * step)     # room for two groups to go from Q4_K to Q6_K
    up = sorted(n for n, ty in a.types.items() if ty != 12)
    assert up == sorted([names[7], names[2]]) and all(a.types[n] == 14 for n in up)
    a = allocate(opts, base + 3 * step)
    assert {n for n, ty in a.types.items() if ty != 12} == {names[7], names[2], names[5]}
    # a replaced tensor (modules_to_save) counts as the most changed
    w = adapter_weights(Deltas(changed, {names[0]}, []), frob2)
    assert w[names[0]] == max(w.values())


def test_options_drop_dominated_types_unless_kept_and_the_hull_is_convex():
    costs = {"g": {1: 10, 2: 20, 3: 30, 4: 40}}
    errors = {"g": {1: 10.0, 2: 9.9, 3: 1.0, 4: 2.0}}
    assert [o[0] for o in options_of(costs, errors, {})["g"]] == [1, 2, 3]
    opts = options_of(costs, errors, {}, keep={"g": 4})["g"]
    assert [o[0] for o in opts] == [1, 2, 3, 4]
    assert [opts[i][0] for i in _hull(opts)] == [1, 3]   # 2 lies above the chord, 4 helps nothing


def test_budget_spellings():
    assert parse_budget("TUNED@Q4_K_M") == Budget("TUNED@Q4_K_M", "format", "Q4_K_M")
    assert parse_budget("tuned@q5_k_m").value == "Q5_K_M"
    assert parse_budget("TUNED@4.8bpw") == Budget("TUNED@4.8bpw", "bpw", 4.8)
    assert parse_budget("TUNED@4.5GB").value == 4_500_000_000
    assert parse_budget("TUNED@4.5GiB").value == int(4.5 * 2**30)
    assert parse_budget("TUNED@900MB").value == 900_000_000
    for bad in ("Q4_K_M", "TUNED@", "TUNED@Q3_K_M", "TUNED@0.5bpw", "TUNED@4.5 parsecs", "TUNED@0GB"):
        with pytest.raises(BudgetError):
            parse_budget(bad)
    head, n = 1000, 8_000_000
    assert parse_budget("TUNED@4bpw").limit(head=head, n_elements=n, stock_size=None) == head + 4_000_000
    assert parse_budget("TUNED@Q6_K").limit(head=head, n_elements=n, stock_size=lambda f: {"Q6_K": 7}[f]) == 7


def test_delta_norm_is_the_frobenius_norm_of_the_lora_delta():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((8, 96)), rng.standard_normal((64, 8))
    assert delta_norm(a, b, 0.5) == pytest.approx(np.linalg.norm(0.5 * b @ a))


def test_a_dominant_group_is_held_at_its_stock_type_so_the_file_meets_its_size():
    # a tied embedding: its cheaper type frees more bytes than every other group can take up
    costs = {"token_embd.weight": {13: 100, 14: 150}, "blk.0.w": {12: 5, 8: 10}, "blk.1.w": {12: 5, 8: 10}}
    errors = {"token_embd.weight": {13: 0.5, 14: 0.4}, "blk.0.w": {12: 1.0, 8: 0.0}, "blk.1.w": {12: 1.0, 8: 0.0}}
    opts = options_of(costs, errors, {g: 1.0 for g in costs})
    stock = {"token_embd.weight": 14, "blk.0.w": 12, "blk.1.w": 12}
    free = allocate(opts, 160, start=stock)
    assert free.bytes == 120 and free.types["token_embd.weight"] == 13          # least error, 25 % short
    filled = allocate(opts, 160, start=stock, at_least=158)
    assert filled.bytes == 160 and filled.types["token_embd.weight"] == 14 and filled.method.endswith("+filled")
    # nothing to fill with: the best assignment stands
    assert allocate(opts, 160, start=stock, at_least=10_000).bytes == 160
