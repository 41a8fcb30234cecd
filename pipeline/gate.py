"""The release gate behind ``hero check`` and the last stage of ``hero run``.

A variant fails when its runtime disagrees with the PyTorch emulation, when its accuracy drop from the
baseline exceeds ``max_drop`` points, when its accuracy is under ``min_accuracy``, or when it lost more
than ``max_regression`` points against the same variant of an earlier (or the host's) report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from exporters.device.errors import HeroError
from exporters.device.files import read_json, write_atomic

REQUIRED = ("bits", "symmetric", "per_channel", "act_bits", "runtime_accuracy")


@dataclass(frozen=True)
class GateCriteria:
    max_drop: float | None = None  # points
    min_accuracy: float | None = None  # fraction
    max_regression: float | None = None  # points, against `previous`
    bits: tuple[int, ...] | None = None
    previous: dict | None = None


def read_report(path: str | Path) -> dict:
    """Load and check a report.json; anything unusable is a HeroError (exit 2)."""
    path = Path(path)
    report = read_json(path, "report", "")
    if not isinstance(report, dict) or not isinstance(report.get("variants"), list) \
            or not isinstance(report.get("baseline"), dict):
        raise HeroError(f"report {path} lacks 'baseline' and 'variants': is it a hero report.json?")
    acc = report["baseline"].get("accuracy")
    if not _is_fraction(acc):
        raise HeroError(f"report {path}: baseline.accuracy must be a fraction in [0, 1]")
    for i, v in enumerate(report["variants"]):
        missing = [k for k in REQUIRED if not isinstance(v, dict) or k not in v]
        if missing:
            raise HeroError(f"report {path}: variants[{i}] lacks {', '.join(missing)}")
        if not _is_fraction(v["runtime_accuracy"]):
            raise HeroError(f"report {path}: variants[{i}].runtime_accuracy must be a fraction in [0, 1]")
    return report


def _is_fraction(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0.0 <= x <= 1.0


def variant_label(v: dict) -> str:
    scheme = ("sym" if v["symmetric"] else "asym") + ("/ch" if v["per_channel"] else "/tensor")
    act = f"a{v['act_bits']}" if v.get("act_bits") else ""
    return f"w{v['bits']}{act} ({scheme})"


def _identity(v: dict) -> tuple:
    return (v["bits"], v["symmetric"], v["per_channel"], v.get("act_bits"))


def variant_failures(v: dict, baseline_accuracy: float, c: GateCriteria, previous: dict | None) -> list[str]:
    label, acc = variant_label(v), v["runtime_accuracy"]
    out = []
    if v.get("consistent") is False:
        out.append(f"{label}: runtime disagrees with the PyTorch emulation (agreement {v.get('agreement')})")
    if v.get("target_runtime") == "tensorrt" and v.get("trt_lint"):
        out.append(f"{label}: breaks TensorRT's explicit-quantization rules: {v['trt_lint'][0]}"
                   + (f" (+{len(v['trt_lint']) - 1} more)" if len(v["trt_lint"]) > 1 else ""))
    drop = 100.0 * (baseline_accuracy - acc)
    if c.max_drop is not None and drop > c.max_drop:
        out.append(f"{label}: accuracy {100 * acc:.2f}% dropped {drop:.2f} pts from the baseline "
                   f"{100 * baseline_accuracy:.2f}% (limit {c.max_drop} pts)")
    if c.min_accuracy is not None and acc < c.min_accuracy:
        out.append(f"{label}: accuracy {100 * acc:.2f}% is under the minimum {100 * c.min_accuracy:.2f}%")
    if c.max_regression is not None and c.previous is not None:
        if previous is None:
            out.append(f"{label}: not in the baseline report, cannot check regression")
        else:
            lost = 100.0 * (previous["runtime_accuracy"] - acc)
            if lost > c.max_regression:
                out.append(f"{label}: accuracy {100 * acc:.2f}% regressed {lost:.2f} pts from "
                           f"{100 * previous['runtime_accuracy']:.2f}% (limit {c.max_regression} pts)")
    return out


def evaluate_gate(report: dict, criteria: GateCriteria) -> dict:
    """{"passed", "reasons", "checked": [(label, failures)]} for the selected variants."""
    selected = [v for v in report["variants"] if criteria.bits is None or v["bits"] in criteria.bits]
    if criteria.bits is not None and not selected:
        raise HeroError(f"no variant with bits in {list(criteria.bits)} in the report")
    old = {_identity(v): v for v in (criteria.previous or {}).get("variants", [])}
    checked = [(variant_label(v), variant_failures(v, report["baseline"]["accuracy"], criteria,
                                                   old.get(_identity(v)))) for v in selected]
    reasons = [r for _, failures in checked for r in failures]
    return {"passed": not reasons, "reasons": reasons, "checked": checked}


def write_junit(result: dict, path: str | Path) -> None:
    """One JUnit test case per checked variant, so CI systems show each precision's verdict."""
    cases = []
    for label, failures in result["checked"]:
        body = "".join(f"<failure message={quoteattr(f)}>{escape(f)}</failure>" for f in failures)
        cases.append(f'  <testcase classname="hero.gate" name={quoteattr(label)}>{body}</testcase>')
    failed = sum(1 for _, f in result["checked"] if f)
    xml = (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="hero-check" '
           f'tests="{len(cases)}" failures="{failed}">\n' + "\n".join(cases) + "\n</testsuite>\n")
    write_atomic(path, xml)
