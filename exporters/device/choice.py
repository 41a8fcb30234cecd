"""Which precision to run: a pure choice over the numbers a device report measured.

`choose(report, budget, ...)` (and `PrecisionSwitcher.select(report, budget)`, which fills in the
bundle's variants, runtime and loaded sessions) returns the precision key of the variant with the
highest top-1 accuracy on this device among those within every limit of `budget`; ties go to the
lower latency, then to the earlier precision (float, then more bits). The limits, each optional:

- max_latency_ms: the row's ``latency_ms`` (one predict on ``meta.latency_batch`` images);
- max_resident_mib: ``costs.resident_mib``, the memory one prepared session of the variant holds;
- max_drop_points: 100 x (the float variant's accuracy - the row's), both measured on the device;
- max_switch_ms: what switching to it costs now: nothing for a prepared session, its
  ``costs.prepare_ms`` for one `resident` evicted (a cold switch).

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

ROLES = ("device", "host")
# Accuracies are fractions of a test-set count, so 100 x (0.90 - 0.89) is 1.0000000000000009:
# a drop equal to the limit up to float rounding fits it.
DROP_ROUNDING = 1e-9


@dataclasses.dataclass(frozen=True)
class Budget:
    """The limits a chosen variant must meet (None: no limit); see the module docstring."""

    max_latency_ms: float | None = None
    max_resident_mib: float | None = None
    max_drop_points: float | None = None
    max_switch_ms: float | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value) or value < 0):
                raise HeroError(f"Budget.{field.name} must be None or a finite number >= 0, got {value!r}")


def _number(row: dict, path: tuple[str, ...], where: str) -> float:
    value = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise HeroError(f"{where} has no measured {'.'.join(path)} (got {value!r}): run "
                        "`python -m exporters.device.validate_bundle` on this device with this version")
    return float(value)


def _check_source(report, runtime: str, allow_host_numbers: bool) -> dict:
    """The report's meta, after checking it is a report of `runtime` measured where it may be used."""
    if not isinstance(report, dict) or not isinstance(report.get("meta"), dict) \
            or not isinstance(report.get("baseline"), dict) or not isinstance(report.get("variants"), list):
        raise HeroError("select needs a device report (the JSON object validate_bundle writes): load it with json.load")
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
    return meta


def choose(report: dict, budget: Budget, variants: dict, runtime: str, loaded=None, *,
           allow_host_numbers: bool = False):
    """The precision key to run (module docstring). `variants` maps each precision key of the bundle
    to its artifact's sha256, in precision order; `loaded` the keys whose sessions are prepared (None:
    all)."""
    _check_source(report, runtime, allow_host_numbers)
    rows = {}
    for row in [report["baseline"], *report["variants"]]:
        sha = row.get("sha256") if isinstance(row, dict) else None
        rows[sha] = row
    missing = [key for key, sha in variants.items() if sha not in rows]
    if missing or len(rows) != len(variants):
        raise HeroError("the report is of another bundle (its variants' sha256 differ from this bundle's): "
                        "validate this bundle on this device and select on that report")
    float_accuracy = _number(report["baseline"], ("runtime_accuracy",), f"variant {report['baseline'].get('name')!r}")
    candidates, refused = [], []
    for order, (key, sha) in enumerate(variants.items()):
        row = rows[sha]
        where = f"variant {row.get('name')!r}"
        accuracy = _number(row, ("runtime_accuracy",), where)
        latency = _number(row, ("latency_ms",), where)
        over = []
        if budget.max_latency_ms is not None and latency > budget.max_latency_ms:
            over.append(f"latency {latency:.3g} ms")
        if budget.max_resident_mib is not None:
            mib = _number(row, ("costs", "resident_mib"), where)
            if mib > budget.max_resident_mib:
                over.append(f"memory {mib:.3g} MiB")
        drop = 100.0 * (float_accuracy - accuracy)
        if budget.max_drop_points is not None and drop > budget.max_drop_points + DROP_ROUNDING:
            over.append(f"drop {drop:.3g} points")
        if budget.max_switch_ms is not None and loaded is not None and key not in loaded:
            prepare = _number(row, ("costs", "prepare_ms"), where)
            if prepare > budget.max_switch_ms:
                over.append(f"cold switch {prepare:.3g} ms")
        if over:
            refused.append(f"{row.get('name')} ({', '.join(over)})")
        else:
            candidates.append((-accuracy, latency, order, key))
    if not candidates:
        limits = ", ".join(f"{f.name}={getattr(budget, f.name)}" for f in dataclasses.fields(budget)
                           if getattr(budget, f.name) is not None)
        raise HeroError(f"no variant fits {limits}: {'; '.join(refused)}; loosen the budget")
    return min(candidates)[3]
