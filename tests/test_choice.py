"""PrecisionSwitcher.select / exporters.device.choice: the most accurate variant within a budget, from a
device report's numbers, made active; and the README's device loop, run as written."""

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import CPU, built_bundle, copy_bundle

from exporters.device.choice import choose
from exporters.device.errors import HeroError
from exporters.device.switch import PrecisionSwitcher
from exporters.device.validate_bundle import validate_bundle

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def tiny(tmp_path_factory):
    return built_bundle(tmp_path_factory)


@pytest.fixture
def switcher(tiny):
    return PrecisionSwitcher(tiny["bundle"], providers=CPU)


def _report(bundle, numbers: dict, role: str = "device", runtime: str = "onnxruntime") -> dict:
    """A device report of `bundle` with the numbers given per variant name:
    {name: (accuracy, batch-1 median latency ms, resident_mib)}; the float variant is the baseline.
    The manifest-batch latency is set 10x the batch-1 one in the other order, so that a choice made
    on it, not on batch 1, would differ."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = []
    for v in manifest["variants"]:
        accuracy, latency, mib = numbers[v["name"]]
        rows.append({"name": v["name"], "bits": v["bits"], "sha256": v["sha256"], "runtime_accuracy": accuracy,
                     "latency_ms": 100.0 - latency,
                     "costs": {"resident_mib": mib, "latency": {
                         "batch_1": {"batch": 1, "median_ms": latency, "p99_ms": 2 * latency},
                         "batch": {"batch": 8, "median_ms": 100.0 - latency, "p99_ms": 100.0}}}})
    return {"meta": {"role": role, "runtime": runtime}, "baseline": rows[0], "variants": rows[1:]}


NUMBERS = {"fp32": (0.90, 10.0, 50.0), "w8": (0.89, 4.0, 20.0), "w4": (0.85, 3.0, 20.0)}


@pytest.mark.parametrize("budget, chosen", [
    ({}, None),                                             # no limit: the most accurate
    ({"max_latency_ms": 5.0}, 8),                           # latency: fp32 (10 ms) too slow, w8 the best left
    ({"max_latency_ms": 3.0}, 4),                           # a limit equal to a measured latency fits
    ({"max_memory_mib": 30.0}, 8),                          # memory: fp32's 50 MiB too much
    ({"min_accuracy": 0.86}, None),                         # accuracy alone: fp32 is the most accurate
    ({"max_latency_ms": 3.5, "min_accuracy": 0.85}, 4),     # w4's 85% fits 0.85 exactly
    ({"max_latency_ms": 9.0, "max_memory_mib": 25.0, "min_accuracy": 0.89}, 8),
])
def test_select_makes_active_the_most_accurate_variant_within_every_limit(tiny, budget, chosen):
    switcher = PrecisionSwitcher(tiny["bundle"], providers=CPU)
    switcher.set_precision(4 if chosen is None else None)  # select must switch, from elsewhere
    selection = switcher.select(**budget, device_report=_report(tiny["bundle"], NUMBERS))
    assert selection.precision == chosen and switcher.precision == chosen
    assert selection.name == switcher.variant(chosen)["name"]
    assert selection.reason.startswith(f"{selection.name}: the most accurate variant within ")
    assert "\n" not in selection.reason


def test_latency_is_the_batch_1_median_and_the_reason_names_the_more_accurate_that_missed(switcher, tiny):
    selection = switcher.select(max_latency_ms=5.0, device_report=_report(tiny["bundle"], NUMBERS))
    # batch 1: fp32 10 ms, w8 4 ms; at the manifest's batch fp32 (90 ms) would be faster than w8 (96 ms)
    assert selection.precision == 8
    assert selection.reason == ("w8: the most accurate variant within max_latency_ms=5 (accuracy 89.00%, latency "
                                "4 ms at batch 1); more accurate but missing: fp32 (latency 10 ms > 5 ms by 5 ms)")


def test_equal_accuracy_goes_to_the_faster_variant(switcher, tiny):
    numbers = dict(NUMBERS, w4=(0.89, 3.0, 20.0))
    assert switcher.select(max_latency_ms=5.0, device_report=_report(tiny["bundle"], numbers)).precision == 4


def test_no_variant_fits_names_the_closest_and_by_how_much_in_one_line(switcher, tiny):
    report = _report(tiny["bundle"], NUMBERS)
    with pytest.raises(HeroError) as caught:
        switcher.select(max_latency_ms=2.0, min_accuracy=0.86, device_report=report)
    # misses relative to their limits: fp32 4.0, w8 1.0 + 0 (accuracy 89% fits), w4 0.5 + 0.012
    assert str(caught.value) == ("no variant fits max_latency_ms=2, min_accuracy=0.86: the closest, w4, misses by "
                                 "latency 3 ms > 2 ms by 1 ms and accuracy 85.00% < 86.00% by 1.00 points; "
                                 "loosen the budget or measure again")
    # fp32 1.56 + 1.5, w8 0.026 (latency only), w4 0.045 (accuracy only)
    with pytest.raises(HeroError, match=r"the closest, w8, misses by latency 4 ms > 3.9 ms by 0.1 ms;"):
        switcher.select(max_latency_ms=3.9, min_accuracy=0.89, max_memory_mib=20, device_report=report)
    assert switcher.precision is None  # a failed select switches nothing


def test_host_numbers_are_refused_unless_allowed(switcher, tiny):
    with pytest.raises(HeroError, match="this is the host's report.*allow_host_numbers=True"):
        switcher.select(max_latency_ms=5.0, device_report=_report(tiny["bundle"], NUMBERS, role="host"))
    assert switcher.select(max_latency_ms=5.0, device_report=_report(tiny["bundle"], NUMBERS, role="host"),
                           allow_host_numbers=True).precision == 8
    # No report given: the bundle's own host_report.json, the host's numbers: refused unless allowed.
    with pytest.raises(HeroError, match="this is the host's report"):
        switcher.select(min_accuracy=0.0)
    host = json.loads((tiny["bundle"] / "host_report.json").read_text())
    chosen = switcher.select(min_accuracy=0.0, allow_host_numbers=True)
    accuracy = {r["name"]: r["runtime_accuracy"] for r in [host["baseline"], *host["variants"]]}
    assert accuracy[chosen.name] == max(accuracy.values()) and switcher.precision == chosen.precision
    unknown = _report(tiny["bundle"], NUMBERS)
    del unknown["meta"]["role"]
    with pytest.raises(HeroError, match="does not say where it was measured"):
        switcher.select(device_report=unknown, allow_host_numbers=True)


def test_a_report_of_another_runtime_or_bundle_or_without_a_number_is_refused(switcher, tiny, tmp_path):
    with pytest.raises(HeroError, match="measured runtime 'openvino', this switcher runs 'onnxruntime'"):
        switcher.select(device_report=_report(tiny["bundle"], NUMBERS, runtime="openvino"))
    other = _report(tiny["bundle"], NUMBERS)
    other["variants"][1]["sha256"] = "0" * 64
    with pytest.raises(HeroError, match="another bundle"):
        switcher.select(device_report=other)
    old = copy.deepcopy(_report(tiny["bundle"], NUMBERS))
    del old["variants"][0]["costs"]["resident_mib"]
    with pytest.raises(HeroError, match="variant 'w8' has no measured costs.resident_mib"):
        switcher.select(max_memory_mib=100, device_report=old)
    for bad in ({"max_latency_ms": float("nan")}, {"min_accuracy": 1.5}, {"max_memory_mib": -1}):
        with pytest.raises(HeroError, match=f"{next(iter(bad))} must be None or"):
            switcher.select(**bad, device_report=_report(tiny["bundle"], NUMBERS))
    with pytest.raises(HeroError, match=r"device report .*missing.json does not exist: run `python -m "):
        switcher.select(device_report=tmp_path / "missing.json")


def test_select_on_a_measured_report_agrees_with_its_numbers(switcher, tiny, tmp_path):
    report = validate_bundle(tiny["bundle"], "onnxruntime", list(CPU), latency_batch=4, latency_repeats=3,
                             switch_repeats=1)
    path = tmp_path / "device_report.json"
    path.write_text(json.dumps(report))
    rows = [report["baseline"], *report["variants"]]
    batch_1 = {r["name"]: r["costs"]["latency"]["batch_1"]["median_ms"] for r in rows}
    budget = sorted(batch_1.values())[1]  # at least two rows fit
    chosen = switcher.select(max_latency_ms=budget, device_report=path)  # a path is read as the report
    fitting = [r for r in rows if batch_1[r["name"]] <= budget]
    row = next(r for r in rows if r["name"] == chosen.name)
    assert row in fitting and len(fitting) >= 2
    assert all((r["runtime_accuracy"], -batch_1[r["name"]]) <= (row["runtime_accuracy"], -batch_1[row["name"]])
               for r in fitting)
    variants = {bits: switcher.variant(bits) for bits in switcher.precisions}
    assert choose(report, variants, "onnxruntime", max_latency_ms=budget) == chosen


def readme_device_loop() -> str:
    """The README's ```python block that calls `select` (the device loop example)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    [block] = [b for b in blocks if ".select(" in b]
    return block


def test_the_readme_device_loop_switches_down_under_a_latency_budget_and_back_up(tiny, tmp_path, monkeypatch):
    copy_bundle(tiny["bundle"], tmp_path / "bundle")
    (tmp_path / "device_report.json").write_text(json.dumps(_report(tiny["bundle"], NUMBERS)))
    monkeypatch.chdir(tmp_path)
    budgets = [50.0, 50.0, 5.0, 3.5, 2.0, 50.0]  # roomy, tight, tighter, past every variant, roomy again
    ran, printed = [], []

    def frames():
        for budget in budgets:
            yield np.zeros((1, 1, 28, 28), np.float32), budget

    namespace = {"frames": frames, "handle": lambda logits: ran.append(logits.shape), "print": printed.append}
    exec(compile(readme_device_loop(), "README.md device loop", "exec"), namespace)  # noqa: S102 - the README's own code
    assert ran == [(1, 10)] * len(budgets)
    # fp32 (10 ms), w8 under 5 ms, w4 under 3.5 ms, w4 kept when nothing fits 2 ms, fp32 again with headroom
    assert namespace["history"] == [None, None, 8, 4, 4, None] and namespace["sw"].precision is None
    assert [str(line).split(":")[0] for line in printed] == ["fp32", "w8", "w4", "no variant fits max_latency_ms=2, "
                                                             "min_accuracy=0.8", "fp32"]
