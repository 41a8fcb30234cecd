"""PrecisionSwitcher.select / exporters.device.choice: a pure choice over a device report's numbers."""

import copy
import json

import pytest
from bundle_helpers import CPU, built_bundle

from exporters.device.choice import Budget, choose
from exporters.device.errors import HeroError
from exporters.device.switch import PrecisionSwitcher
from exporters.device.validate_bundle import validate_bundle


@pytest.fixture
def tiny(tmp_path_factory):
    return built_bundle(tmp_path_factory)


@pytest.fixture
def switcher(tiny):
    return PrecisionSwitcher(tiny["bundle"], providers=CPU)


def _report(bundle, numbers: dict, role: str = "device", runtime: str = "onnxruntime") -> dict:
    """A device report of `bundle` with the numbers given per variant name:
    {name: (accuracy, latency_ms, resident_mib, prepare_ms)}; the float variant is the baseline."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = []
    for v in manifest["variants"]:
        accuracy, latency, mib, prepare = numbers[v["name"]]
        rows.append({"name": v["name"], "bits": v["bits"], "sha256": v["sha256"], "runtime_accuracy": accuracy,
                     "latency_ms": latency, "costs": {"resident_mib": mib, "prepare_ms": prepare,
                                                      "latency_ms": latency}})
    return {"meta": {"role": role, "runtime": runtime}, "baseline": rows[0], "variants": rows[1:]}


NUMBERS = {"fp32": (0.90, 10.0, 50.0, 120.0), "w8": (0.89, 4.0, 20.0, 80.0), "w4": (0.85, 3.0, 20.0, 70.0)}


@pytest.mark.parametrize("budget, chosen", [
    (Budget(), None),                                           # no limit: the most accurate
    (Budget(max_latency_ms=5.0), 8),                            # fp32 too slow: w8 is the most accurate left
    (Budget(max_latency_ms=3.0), 4),
    (Budget(max_resident_mib=30.0), 8),
    (Budget(max_latency_ms=3.5, max_drop_points=6.0), 4),       # w4 drops 5 points
    (Budget(max_drop_points=0.0), None),
])
def test_select_returns_the_most_accurate_variant_within_every_limit(switcher, tiny, budget, chosen):
    assert switcher.select(_report(tiny["bundle"], NUMBERS), budget) == chosen
    assert switcher.precision is None  # select chooses; it does not switch


def test_equal_accuracy_goes_to_the_faster_variant(switcher, tiny):
    numbers = dict(NUMBERS, w4=(0.89, 3.0, 20.0, 70.0))
    assert switcher.select(_report(tiny["bundle"], numbers), Budget(max_latency_ms=5.0)) == 4


def test_no_variant_within_the_budget_names_what_each_exceeds(switcher, tiny):
    with pytest.raises(HeroError, match=r"no variant fits max_latency_ms=2.0, max_drop_points=1: "
                                        r"fp32 \(latency 10 ms\); w8 \(latency 4 ms\); w4 \(latency 3 ms, drop 5 points\)"):
        switcher.select(_report(tiny["bundle"], NUMBERS), Budget(max_latency_ms=2.0, max_drop_points=1))


def test_a_cold_switch_counts_only_for_variants_not_prepared(tiny):
    switcher = PrecisionSwitcher(tiny["bundle"], providers=CPU, resident=1)  # only float prepared
    report = _report(tiny["bundle"], NUMBERS)
    assert switcher.select(report, Budget(max_latency_ms=5.0, max_switch_ms=75.0)) == 4  # w8 would take 80 ms
    assert switcher.select(report, Budget(max_switch_ms=10.0)) is None  # float is prepared: free
    switcher.set_precision(8)  # now w8 is the one prepared
    assert switcher.select(report, Budget(max_switch_ms=10.0)) == 8


def test_host_numbers_are_refused_unless_allowed(switcher, tiny):
    host = _report(tiny["bundle"], NUMBERS, role="host")
    with pytest.raises(HeroError, match="this is the host's report.*allow_host_numbers=True"):
        switcher.select(host, Budget(max_latency_ms=5.0))
    assert switcher.select(host, Budget(max_latency_ms=5.0), allow_host_numbers=True) == 8
    unknown = _report(tiny["bundle"], NUMBERS)
    del unknown["meta"]["role"]
    with pytest.raises(HeroError, match="does not say where it was measured"):
        switcher.select(unknown, Budget(), allow_host_numbers=True)


def test_a_report_of_another_runtime_or_bundle_or_without_a_number_is_refused(switcher, tiny):
    with pytest.raises(HeroError, match="measured runtime 'openvino', this switcher runs 'onnxruntime'"):
        switcher.select(_report(tiny["bundle"], NUMBERS, runtime="openvino"), Budget())
    other = _report(tiny["bundle"], NUMBERS)
    other["variants"][1]["sha256"] = "0" * 64
    with pytest.raises(HeroError, match="another bundle"):
        switcher.select(other, Budget())
    old = copy.deepcopy(_report(tiny["bundle"], NUMBERS))
    del old["variants"][0]["costs"]
    with pytest.raises(HeroError, match="variant 'w8' has no measured costs.resident_mib"):
        switcher.select(old, Budget(max_resident_mib=100))
    with pytest.raises(HeroError, match="Budget.max_latency_ms must be None or a finite number >= 0"):
        Budget(max_latency_ms=float("nan"))


def test_select_on_a_measured_report_agrees_with_its_numbers(switcher, tiny):
    report = validate_bundle(tiny["bundle"], "onnxruntime", list(CPU), latency_batch=4, latency_repeats=3,
                             switch_repeats=1)
    rows = [report["baseline"], *report["variants"]]
    budget = Budget(max_latency_ms=sorted(r["latency_ms"] for r in rows)[1])  # at least two rows fit
    chosen = switcher.select(report, budget)
    row = next(r for r in rows if r["sha256"] == switcher.variant(chosen)["sha256"])
    fitting = [r for r in rows if r["latency_ms"] <= budget.max_latency_ms]
    assert row in fitting and len(fitting) >= 2
    assert all((r["runtime_accuracy"], -r["latency_ms"]) <= (row["runtime_accuracy"], -row["latency_ms"])
               for r in fitting)
    variants = {bits: switcher.variant(bits)["sha256"] for bits in switcher.precisions}
    assert choose(report, budget, variants, "onnxruntime") == chosen
