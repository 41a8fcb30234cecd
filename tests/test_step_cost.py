"""benchmarks/step_cost.py: the summary's ratios, pass floors and target checks (no timing)."""

from benchmarks import step_cost as S


def synthetic_times():
    # SGD steps of 100 ms, a forward+backward pass of 90 ms, and every method at a known cost.
    per_step = {"sgd": 0.100, "first-order": 0.200, "gradl1-exact": 0.400, "gradl1-fd": 0.210,
                "hero-exact": 0.450, "hero-fd": 0.300, S.PASS: 0.090}
    return {clock: {m: [t * 0.9, t, t * 1.5] for m, t in per_step.items()} for clock in S.CLOCKS}


def test_summary_ratios_and_pass_floors():
    memory = {m: 100 for m in S.METHODS} | {"hero-fd": 120}
    summary = S.summarise(synthetic_times(), memory)
    assert abs(summary["hero-fd"]["wall_ratio"] - 3.0) < 1e-9
    assert abs(summary["hero-fd"]["wall_floor_ratio"] - 3 * 0.9) < 1e-9
    assert abs(summary["first-order"]["wall_floor_ratio"] - 2 * 0.9) < 1e-9
    assert abs(summary["hero-exact"]["wall_floor_ratio"] - 4 * 0.9) < 1e-9  # two passes + a double backward
    assert "wall_floor_ratio" not in summary[S.PASS]
    assert summary[S.PASS]["peak_bytes"] is None and summary["hero-fd"]["memory_ratio"] == 1.2


def test_targets_fail_above_their_limits():
    checks = {(c["method"], c["quantity"]): c for c in
              S.check_targets(S.summarise(synthetic_times(), {m: 100 for m in S.METHODS}), "wall")}
    assert checks[("hero-fd", "wall time")]["ok"] is False  # 3.0x > 2.6x
    assert checks[("hero-exact", "wall time")]["ok"] is False  # 4.5x > 4.0x
    assert checks[("hero-fd", "memory")]["ok"] is True
