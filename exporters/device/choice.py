"""Which precision to run: a pure choice over the numbers a device report measured.

`choose(report, variants, runtime, max_latency_ms=, max_memory_mib=, min_accuracy=)` (what
`PrecisionSwitcher.select` calls, then makes the choice active) returns a `Selection`: the variant
with the highest top-1 accuracy on this device among those within every limit, ties to the lower
latency, then to the earlier precision (float, then more bits), and the reason in one line. The
limits, each optional (None: no limit), compare against these numbers of a report row:

- max_latency_ms: ``costs.latency.batch_1.median_ms``, the median time of one predict on one image.
  Batch 1 because a budget that changes at run time is a per-frame budget: a device loop that
  switches precision answers one input at a time. The manifest's batch (``costs.latency.batch``)
  and the 99th percentiles are in the report for a caller who budgets otherwise.
- max_memory_mib: ``costs.resident_mib``, the resident memory the variant's prepared session adds
  (VmRSS growth over its creation and first run).
- min_accuracy: ``runtime_accuracy``, top-1 on the bundle's test.npz on this device (a fraction).

No variant within the limits: a one-line HeroError naming the closest variant, the one whose misses
summed relative to their limits are smallest, and by how much it misses each limit.

Where the numbers come from is checked, never assumed: the report must be a device report
(``meta.role`` "device", written by `exporters.device.validate_bundle` on the device) of the same
runtime, with one row per variant of this bundle (matched by sha256). A host report
(``host_report.json``, ``meta.role`` "host") measured the host's CPU, not this device, so it is
refused unless the caller passes ``allow_host_numbers=True``, which says that they know the numbers
are the host's (its accuracies hold on any device that validated the bundle; its latencies and
memory do not). A row lacking a number a limit needs is an error naming it. Standard library only.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from exporters.device.errors import HeroError
from exporters.device.report_schema import ROLES
# Accuracies are fractions of a test-set count (89/100 is 0.89 only up to rounding): an accuracy
# equal to min_accuracy up to float rounding fits it.
ACCURACY_ROUNDING = 1e-9
LATENCY = ("costs", "latency", "batch_1", "median_ms")
MEMORY = ("costs", "resident_mib")
ACCURACY = ("runtime_accuracy",)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What `choose` picked: `precision` (the key `set_precision` takes), the variant's `name`, and
    `reason`, one line saying why (its numbers, the limits, the more accurate variants that missed)."""

    precision: int | str | None
    name: str
    reason: str


def _number(row: dict, path: tuple[str, ...], where: str) -> float:
    value = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise HeroError(f"{where} has no measured {'.'.join(path)} (got {value!r}): run "
                        "`python -m exporters.device.validate_bundle` on this device with this version")
    return float(value)


def _limits(max_latency_ms, max_memory_mib, min_accuracy) -> dict:
    """The limits given, checked: {name: value}."""
    given = {"max_latency_ms": max_latency_ms, "max_memory_mib": max_memory_mib, "min_accuracy": min_accuracy}
    for name, value in given.items():
        top = 1.0 if name == "min_accuracy" else math.inf
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value) or not 0 <= value <= top):
            what = "a fraction in [0, 1]" if name == "min_accuracy" else "a finite number >= 0"
            raise HeroError(f"{name} must be None or {what}, got {value!r}")
    return {name: float(value) for name, value in given.items() if value is not None}


def _check_source(report, runtime: str, allow_host_numbers: bool) -> None:
    """Refuse a report that is not of `runtime`, or measured where it may not be used."""
    if not isinstance(report, dict) or not isinstance(report.get("meta"), dict) \
            or not isinstance(report.get("baseline"), dict) or not isinstance(report.get("variants"), list):
        raise HeroError("select needs a device report (the JSON object validate_bundle writes): pass its path "
                        "or the object json.load gives")
    meta = report["meta"]
    role = meta.get("role")
    if role not in ROLES:
        raise HeroError(f"the report does not say where it was measured (meta.role {role!r}): run "
                        "`python -m exporters.device.validate_bundle` on this device and select on its report")
    if role == "host" and not allow_host_numbers:
        raise HeroError("this is the host's report: its latencies and memory were measured on the host, not this "
                        "device; select on a device report (validate_bundle on this device), or pass "
                        "allow_host_numbers=True to use the host's numbers knowingly")
    if meta.get("runtime") != runtime:
        raise HeroError(f"the report measured runtime {meta.get('runtime')!r}, this switcher runs {runtime!r}: run "
                        f"validate_bundle --runtime {runtime} and select on that report")


def _misses(numbers_: dict, limits: dict) -> list[tuple[float, str]]:
    """(relative miss, text) of each limit the numbers miss."""
    out = []
    if "max_latency_ms" in limits and numbers_["latency"] > limits["max_latency_ms"]:
        limit = limits["max_latency_ms"]
        out.append(((numbers_["latency"] - limit) / max(limit, 1e-9),
                    f"latency {numbers_['latency']:.3g} ms > {limit:.3g} ms by {numbers_['latency'] - limit:.3g} ms"))
    if "max_memory_mib" in limits and numbers_["memory"] > limits["max_memory_mib"]:
        limit = limits["max_memory_mib"]
        out.append(((numbers_["memory"] - limit) / max(limit, 1e-9),
                    f"memory {numbers_['memory']:.3g} MiB > {limit:.3g} MiB by {numbers_['memory'] - limit:.3g} MiB"))
    if "min_accuracy" in limits and numbers_["accuracy"] < limits["min_accuracy"] - ACCURACY_ROUNDING:
        limit = limits["min_accuracy"]
        out.append(((limit - numbers_["accuracy"]) / max(limit, 1e-9),
                    f"accuracy {numbers_['accuracy']:.2%} < {limit:.2%} by "
                    f"{100 * (limit - numbers_['accuracy']):.2f} points"))
    return out


def choose(report: dict, variants: dict, runtime: str, *, max_latency_ms=None, max_memory_mib=None,
           min_accuracy=None, allow_host_numbers: bool = False) -> Selection:
    """The `Selection` under the limits (module docstring). `variants` maps each precision key of the
    bundle to its manifest entry (name, sha256), in precision order."""
    limits = _limits(max_latency_ms, max_memory_mib, min_accuracy)
    _check_source(report, runtime, allow_host_numbers)
    rows = {row.get("sha256"): row for row in [report["baseline"], *report["variants"]] if isinstance(row, dict)}
    if any(v["sha256"] not in rows for v in variants.values()) or len(rows) != len(variants):
        raise HeroError("the report is of another bundle (its variants' sha256 differ from this bundle's): "
                        "validate this bundle on this device and select on that report")
    measured = []
    for order, (key, variant) in enumerate(variants.items()):
        row, where = rows[variant["sha256"]], f"variant {variant['name']!r}"
        numbers_ = {"accuracy": _number(row, ACCURACY, where), "latency": _number(row, LATENCY, where),
                    "memory": _number(row, MEMORY, where) if "max_memory_mib" in limits else None}
        measured.append((-numbers_["accuracy"], numbers_["latency"], order, key, variant["name"], numbers_,
                         _misses(numbers_, limits)))
    measured.sort(key=lambda m: m[:3])
    shown = ", ".join(f"{name}={value:g}" for name, value in limits.items()) or "no limit"
    fitting = [m for m in measured if not m[6]]
    if not fitting:
        closest = min(measured, key=lambda m: (sum(miss for miss, _ in m[6]), m[2]))
        raise HeroError(f"no variant fits {shown}: the closest, {closest[4]}, misses by "
                        f"{' and '.join(text for _, text in closest[6])}; loosen the budget or measure again")
    best = fitting[0]
    numbers_ = best[5]
    memory = "" if numbers_["memory"] is None else f", memory {numbers_['memory']:.3g} MiB"
    better = [f"{m[4]} ({', '.join(text for _, text in m[6])})" for m in measured[:measured.index(best)] if m[6]]
    reason = (f"{best[4]}: the most accurate variant within {shown} (accuracy {numbers_['accuracy']:.2%}, latency "
              f"{numbers_['latency']:.3g} ms at batch 1{memory})"
              + (f"; more accurate but missing: {'; '.join(better)}" if better else ""))
    return Selection(best[3], best[4], reason)
