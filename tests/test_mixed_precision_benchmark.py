"""benchmarks/mixed_precision.py: the random control's budget repair, the variant plan and the
per-checkpoint cache (no sensitivity, export or timing)."""

import random

import pytest
from torch import nn

from benchmarks import mixed_precision as M
from exporters.device.errors import HeroError
from exporters.quantize import quantized_layers
from pipeline.mixed import budget_bits


def tiny_sizes():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 3))
    return {name: layer.weight.numel() for name, layer in quantized_layers(model)}


def test_random_bits_fits_the_budget_and_leaves_no_single_raise():
    sizes = tiny_sizes()
    ladder = sorted(M.CANDIDATES)
    for budget in (3.0, 3.5, 4.0, 6.0):
        capacity = budget_bits({"average_bits": budget}, sizes)
        rng = random.Random(1)
        for _ in range(50):
            bits = M.random_bits(sizes, M.CANDIDATES, capacity, rng)
            used = M.total_bits(bits, sizes)
            assert set(bits) == set(sizes) and used <= capacity
            for name, b in bits.items():
                if b != ladder[-1]:
                    up = ladder[ladder.index(b) + 1]
                    assert used + sizes[name] * (up - b) > capacity, (name, bits)


def test_random_bits_draws_differ_and_reject_an_impossible_budget():
    sizes = tiny_sizes()
    capacity = budget_bits({"average_bits": 4.0}, sizes)
    rng = random.Random(0)
    assert len({tuple(M.random_bits(sizes, M.CANDIDATES, capacity, rng).values()) for _ in range(20)}) > 1
    with pytest.raises(ValueError):
        M.random_bits(sizes, M.CANDIDATES, budget_bits({"average_bits": 1.5}, sizes), rng)


def test_plan_variants_stay_within_each_budget_and_follow_their_objective():
    sizes = tiny_sizes()
    first = next(iter(sizes))
    # The hessian table makes the first layer cheap to squeeze, the measured table makes it costly.
    hessian = {n: {b: (0.0 if n == first else 1.0) * 2.0 ** -b for b in M.CANDIDATES} for n in sizes}
    measured = {n: {b: (100.0 if n == first else 1.0) * 2.0 ** -b for b in M.CANDIDATES} for n in sizes}
    variants = M.plan_variants({"hessian": hessian, "measured": measured}, sizes)
    methods = [(v["method"], v["budget"]) for v in variants]
    assert methods.count(("random", 4.0)) == methods.count(("random", 3.5)) == M.RANDOM_DRAWS
    for v in variants:
        if isinstance(v["bits"], dict):
            assert M.total_bits(v["bits"], sizes) <= budget_bits({"average_bits": v["budget"]}, sizes)
    by = {(v["method"], v["budget"]): v["bits"] for v in variants if v["method"] in M.OBJECTIVES}
    assert by[("hessian", 3.5)][first] == 2 and by[("measured", 3.5)][first] == 8


def test_summary_averages_random_draws_and_cache_reruns_only_changed_checkpoints():
    rows = [{"method": "random", "budget": 4.0, "accuracy": a, "average_bits": 4.0, "packed_bytes": 10}
            for a in (0.5, 0.7)] + [{"method": "fp32", "budget": None, "accuracy": 0.9, "average_bits": None,
                                     "packed_bytes": 40}]
    summary = {(s["method"], s["budget"]): s for s in M.summarise(rows)}
    assert summary[("random", 4.0)]["accuracy"] == pytest.approx(0.6)
    assert summary[("random", 4.0)]["accuracy_std"] == pytest.approx(0.1414, abs=1e-3)
    assert summary[("fp32", None)]["accuracy_std"] is None and summary[("fp32", None)]["average_bits"] == 32
    settings = {"limit_test": 10}
    cache = {"a": {"sha256": "x", "settings": settings}, "b": {"sha256": "y", "settings": settings},
             "c": {"sha256": "z", "settings": {"limit_test": 20}}}
    assert M.pending(cache, {"a": 1, "b": 2, "c": 3, "d": 4}, settings,
                     {"a": "x", "b": "changed", "c": "z", "d": "w"}) == ["b", "c", "d"]


def test_cached_columns_come_from_results_measured_with_the_same_settings():
    settings = {"limit_test": 10}
    cache = {"a": {"settings": settings, "rows": [1]}, "c": {"settings": {"limit_test": 20}}}
    assert M.cached_results(cache, ["a"], settings) == {"a": cache["a"]}
    with pytest.raises(HeroError, match=r"--cached c b: not in the cache with these settings \(cached: a, c\)"):
        M.cached_results(cache, ["a", "c", "b"], settings)
