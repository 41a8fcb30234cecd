"""The mixed-precision solver: exact against brute force, budgets, keep_8bit, infeasibility, and
the cost tables built from layers.json."""

import itertools
import math

import numpy as np
import pytest

from exporters.device.errors import HeroError
from pipeline import mixed


def brute_force(costs, sizes, capacity, forced=()):
    """The minimum cost over every assignment within `capacity` bits (None if none fits)."""
    names = list(costs)
    options = [[8] if n in forced else sorted(costs[n]) for n in names]
    best = None
    for combo in itertools.product(*options):
        if sum(sizes[n] * b for n, b in zip(names, combo)) <= capacity:
            cost = sum(costs[n][b] for n, b in zip(names, combo))
            best = cost if best is None else min(best, cost)
    return best


def random_instance(rng):
    n_layers = int(rng.integers(1, 6))
    names = [f"layer{i}" for i in range(n_layers)]
    sizes = {n: int(rng.choice([int(rng.integers(1, 40)), 9 * int(rng.integers(1, 12)), 16 * int(rng.integers(1, 5))]))
             for n in names}
    costs = {}
    for n in names:
        bits = sorted(rng.choice([2, 3, 4, 5, 6, 8], size=int(rng.integers(1, 5)), replace=False).tolist())
        costs[n] = {int(b): float(rng.normal()) for b in bits}  # any sign: the measured objective can be < 0
    return costs, sizes


def assert_optimal(costs, sizes, budget, keep=()):
    forced = mixed.keep_8bit_layers(keep, list(costs))
    capacity = mixed.budget_bits(budget, sizes)
    expected = brute_force(costs, sizes, capacity, forced)
    result = mixed.solve_bits(costs, sizes, budget, keep)
    bits = result["bits"]
    assert list(bits) == list(costs)
    assert all(b in costs[n] for n, b in bits.items()) and all(bits[n] == 8 for n in forced)
    total = sum(sizes[n] * b for n, b in bits.items())
    assert total <= capacity
    assert result["cost"] == pytest.approx(sum(costs[n][b] for n, b in bits.items()), abs=1e-12)
    assert result["cost"] == pytest.approx(expected, abs=1e-9)
    assert result["average_bits"] == pytest.approx(total / sum(sizes.values()))
    assert result["packed_bytes"] == math.ceil(total / 8)
    return result


def test_solver_matches_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 300:
        costs, sizes = random_instance(rng)
        lo = sum(sizes[n] * min(c) for n, c in costs.items())
        hi = sum(sizes[n] * max(c) for n, c in costs.items())
        n_total = sum(sizes.values())
        average = round(float(rng.uniform(lo, hi + 10)) / n_total, 3)
        if average * n_total < lo:
            continue
        assert_optimal(costs, sizes, {"average_bits": average})
        checked += 1


def test_solver_matches_brute_force_with_kib_budgets_and_layers_kept_at_8_bits():
    rng = np.random.default_rng(1)
    checked = 0
    while checked < 100:
        costs, sizes = random_instance(rng)
        for n in costs:
            costs[n].setdefault(8, float(rng.normal()))
        keep = [k for k in ("first", "last", list(costs)[len(costs) // 2]) if rng.random() < 0.5]
        forced = mixed.keep_8bit_layers(keep, list(costs))
        lo = sum(sizes[n] * (8 if n in forced else min(c)) for n, c in costs.items())
        kib = (lo + float(rng.uniform(0, 200))) / 8192
        assert_optimal(costs, sizes, {"weight_kib": kib}, keep)
        checked += 1


def test_solver_beats_the_greedy_ratio_rule():
    """Lowering the big layer first (best cost saved per bit) wastes budget a small layer needed."""
    costs = {"big": {4: 1.0, 8: 0.0}, "small1": {2: 0.9, 8: 0.0}, "small2": {2: 0.9, 8: 0.0}}
    sizes = {"big": 10, "small1": 4, "small2": 4}
    result = assert_optimal(costs, sizes, {"weight_kib": (10 * 4 + 4 * 8 + 4 * 8) / 8192})
    assert result["bits"] == {"big": 4, "small1": 8, "small2": 8}


def test_a_generous_budget_keeps_every_layer_at_its_cheapest_cost_and_ties_take_fewer_bits():
    costs = {"a": {4: 0.5, 8: 0.1}, "b": {4: 0.2, 8: 0.2}}
    result = mixed.solve_bits(costs, {"a": 16, "b": 32}, {"average_bits": 8})
    assert result["bits"] == {"a": 8, "b": 4} and result["cost"] == pytest.approx(0.3)
    assert result["budget_bits"] == 8 * 48 and result["average_bits"] == pytest.approx((16 * 8 + 32 * 4) / 48)


def test_an_infeasible_budget_names_the_smallest_achievable():
    costs = {"a": {4: 0.0, 8: 0.0}, "b": {3: 0.0, 8: 0.0}}
    sizes = {"a": 10, "b": 30}
    with pytest.raises(HeroError, match=r"3\.25 average bits") as err:
        mixed.solve_bits(costs, sizes, {"average_bits": 3.2})
    assert "\n" not in str(err.value)
    with pytest.raises(HeroError, match=r"4\.25 average bits"):  # a held at 8: (10·8 + 30·3) / 40
        mixed.solve_bits(costs, sizes, {"average_bits": 4.0}, keep_8bit=["a"])
    with pytest.raises(HeroError, match=r"8 average bits"):
        mixed.solve_bits(costs, sizes, {"average_bits": 7.9}, keep_8bit=["first", "last"])
    assert mixed.solve_bits(costs, sizes, {"average_bits": 3.25})["bits"] == {"a": 4, "b": 3}


def test_budgets_are_read_as_the_decimals_they_print_as():
    sizes = {"a": 10, "b": 20}
    assert mixed.budget_bits({"average_bits": 4.1}, sizes) == 123
    assert mixed.budget_bits({"weight_kib": 0.5}, sizes) == 4096


@pytest.mark.parametrize("budget", [{}, {"average_bits": 4, "weight_kib": 1}, {"bits": 4}, {"average_bits": 0},
                                    {"weight_kib": float("nan")}, {"average_bits": True}, [4.5]])
def test_malformed_budgets_are_refused(budget):
    with pytest.raises(HeroError, match="budget"):
        mixed.solve_bits({"a": {4: 0.0}}, {"a": 8}, budget)


@pytest.mark.parametrize("costs,sizes,keep,message", [
    ({"a": {4: 0.0}}, {"b": 8}, (), "same layers"),
    ({"a": {4: 0.0}}, {"a": 0}, (), "positive integer"),
    ({"a": {}}, {"a": 8}, (), "no candidate"),
    ({"a": {4: float("inf")}}, {"a": 8}, (), "non-finite"),
    ({"a": {9: 0.0}}, {"a": 8}, (), "unsupported bit width"),
    ({"a": {4: 0.0}}, {"a": 8}, ("first",), "8 is not among"),
    ({"a": {4: 0.0, 8: 0.0}}, {"a": 8}, ("fc",), "unknown layer in keep_8bit 'fc'"),
])
def test_bad_cost_tables_are_refused(costs, sizes, keep, message):
    with pytest.raises(HeroError, match=message):
        mixed.solve_bits(costs, sizes, {"average_bits": 8}, keep)


def layers_json():
    """A layers.json dict (pipeline.sensitivity's schema) of two layers measured at 3 and 8 bits."""
    def rows(omega3, measured3):
        return [{"bits": 3, "omega": omega3, "loss_increase": measured3},
                {"bits": 8, "omega": omega3 / 1000, "loss_increase": -1e-4}]
    return {"layers": [{"name": "conv1", "n_params": 432, "rows": rows(0.5, 0.01)},
                       {"name": "fc", "n_params": 640, "rows": rows(0.01, 0.3)}]}


def test_the_objective_picks_which_measure_the_solver_minimises():
    layers = layers_json()
    sizes = mixed.layer_sizes(layers)
    assert sizes == {"conv1": 432, "fc": 640}
    budget = {"weight_kib": (432 * 3 + 640 * 8) / 8192}  # room for either layer at 8 bits, not both
    hessian = mixed.solve_bits(mixed.cost_table(layers, "hessian"), sizes, budget)
    measured = mixed.solve_bits(mixed.cost_table(layers, "measured"), sizes, budget)
    assert hessian["bits"] == {"conv1": 8, "fc": 3}  # Ω says conv1 hurts most
    assert measured["bits"] == {"conv1": 3, "fc": 8}  # the measurement says fc
    assert measured["cost"] == pytest.approx(0.01 - 1e-4)
    assert mixed.cost_table(layers, "measured", [8]) == {"conv1": {8: -1e-4}, "fc": {8: -1e-4}}


def test_cost_tables_refuse_an_unknown_objective_or_a_width_not_measured():
    with pytest.raises(HeroError, match="unknown mixed-precision objective 'loss'"):
        mixed.cost_table(layers_json(), "loss")
    with pytest.raises(HeroError, match=r"no \[4\]-bit rows for conv1"):
        mixed.cost_table(layers_json(), "hessian", [4, 8])
