"""The release gate behind ``hero check`` and the last stage of ``hero run``.

``hero check`` exits 0 when every selected variant passes, 1 when any fails, and 2 when it refuses
(a HeroError: one line on stderr). It never passes a report it cannot judge. The rules:

- **Reading a report** (`read_report`) refuses a file that is not JSON, not a JSON object, or nested
  deeper than ``MAX_DEPTH`` levels (the schema needs 4); a ``baseline`` that is not an object;
  ``variants`` that is not a non-empty list of objects; a ``meta`` that is not an object; a variant
  that lacks a field of ``REQUIRED``, has unsupported ``bits``/``act_bits`` or non-boolean
  ``symmetric``/``per_channel``, or repeats another variant's name or (bits, symmetric,
  per_channel, act_bits); a ``test_samples`` (row or meta) that is not a positive integer.
- **Accuracies** must be numbers in [0, 1] (a bool is not a number; NaN and infinities are not in
  [0, 1]): ``baseline.accuracy`` and every variant's ``runtime_accuracy`` always;
  ``runtime_accuracy``, ``torch_accuracy`` and ``host_accuracy`` of any row wherever they are not
  null. The refusal names the row.
- **Thresholds** (`GateCriteria`): ``max_drop``, ``min_accuracy`` and ``max_regression`` must be
  finite; ``max_drop`` and ``max_regression`` not negative; ``min_accuracy`` in [0, 1].
- **Selection**: every width in ``--bits`` (config ``gate.bits``) must have a variant in the report;
  the refusal names each missing width.
- **Baseline report** (``--baseline``): both reports must name their model (``meta.model``) and name
  the same one, and every variant compared must have a test-sample count in both (its row's
  ``test_samples``, else ``meta.test_samples``) and the same count; ``meta.dataset`` and
  ``meta.classes`` must match where both reports give them. Else it refuses and says which differs
  or which report lacks it. The checkpoint's sha256 is not compared: checking a new checkpoint
  against an earlier one's report is what ``--max-regression`` is for.
- **No accuracy threshold**: with none of ``max_drop``, ``min_accuracy`` or ``max_regression`` (with a
  baseline report) the gate checks no accuracy. `evaluate_gate` then returns ``gated: False`` and
  judges only what needs no threshold (a runtime that disagrees with its emulation, TensorRT's
  rules). ``hero check`` refuses such a gate (exit 2, ``NO_CRITERION``): a CI gate that checks no
  accuracy must not pass a release. ``hero run`` with no threshold in its ``gate`` section reports
  ``gated: false`` with ``NOT_GATED`` as its note and exits 0 unless a variant failed: a first run of
  your own model does not end in a failure you did not ask for.
- **A variant fails** when its runtime disagrees with the PyTorch emulation (``consistent`` false),
  when a TensorRT target breaks TensorRT's explicit-quantization rules (``trt_lint``), when its
  accuracy drop from the baseline exceeds ``max_drop`` points, when its accuracy is under
  ``min_accuracy``, or when it lost more than ``max_regression`` points against the same variant of
  the baseline report, or is missing from that report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from exporters.device.bits import SUPPORTED_BITS
from exporters.device.errors import HeroError
from exporters.device.files import read_json, write_atomic

REQUIRED = ("name", "bits", "symmetric", "per_channel", "act_bits", "runtime_accuracy")
ACCURACIES = ("accuracy", "runtime_accuracy", "torch_accuracy", "host_accuracy")
MAX_DEPTH = 8  # report > variants > row > trt_lint is 4 levels: anything far deeper is not a report
NO_CRITERION = ("the gate checks no accuracy: pass --max-drop, --min-accuracy or --baseline with "
                "--max-regression (in a deploy config: gate.max_drop or gate.min_accuracy)")
NOT_GATED = ("no threshold set: nothing was gated on accuracy (only each artifact's agreement with its "
             "PyTorch emulation, and TensorRT's rules for a TensorRT target, were checked); to gate, set "
             "gate.max_drop or gate.min_accuracy in the config, or run hero check REPORT --max-drop PTS")


@dataclass(frozen=True)
class GateCriteria:
    max_drop: float | None = None  # points
    min_accuracy: float | None = None  # fraction
    max_regression: float | None = None  # points, against `previous`
    bits: tuple[int, ...] | None = None
    previous: dict | None = None

    def __post_init__(self):
        for name in ("max_drop", "min_accuracy", "max_regression"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value)):
                raise HeroError(f"the gate's {name} must be a finite number, got {value!r}")
        for name in ("max_drop", "max_regression"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise HeroError(f"the gate's {name} is in points and cannot be negative, got {getattr(self, name)}")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise HeroError(f"the gate's min_accuracy is a fraction in [0, 1], got {self.min_accuracy} "
                            "(for 85% write 0.85)")

    @property
    def vacuous(self) -> bool:
        """True when no criterion is about accuracy."""
        regression = self.max_regression is not None and self.previous is not None
        return self.max_drop is None and self.min_accuracy is None and not regression


def read_report(path: str | Path) -> dict:
    """Load and check a report.json (rules in the module docstring); anything unusable is a HeroError."""
    path = Path(path)
    report = read_json(path, "report", "")
    where = f"report {path}"
    if _depth(report) > MAX_DEPTH:
        raise HeroError(f"{where} nests deeper than {MAX_DEPTH} levels: it is not a hero report.json")
    if not isinstance(report, dict) or not isinstance(report.get("variants"), list) \
            or not isinstance(report.get("baseline"), dict):
        raise HeroError(f"{where} lacks 'baseline' and 'variants': is it a hero report.json?")
    if not isinstance(report.get("meta", {}), dict):
        raise HeroError(f"{where}: meta must be an object")
    if not report["variants"]:
        raise HeroError(f"{where} has no variants: nothing to gate")
    _check_count(report.get("meta", {}), f"{where}: meta")
    _check_accuracies(report["baseline"], f"{where}: baseline", ("accuracy",))
    _check_count(report["baseline"], f"{where}: baseline")
    seen: dict = {}
    for i, v in enumerate(report["variants"]):
        if not isinstance(v, dict):
            raise HeroError(f"{where}: variants[{i}] is not an object")
        row = f"{where}: variants[{i}]" + (f" ({v['name']})" if isinstance(v.get("name"), str) else "")
        missing = [k for k in REQUIRED if k not in v]
        if missing:
            raise HeroError(f"{row} lacks {', '.join(missing)}")
        _check_identity(v, row)
        _check_accuracies(v, row, ("runtime_accuracy",))
        _check_count(v, row)
        for key in (v["name"], _identity(v)):
            if key in seen:
                raise HeroError(f"{row} repeats variants[{seen[key]}] ({variant_label(v)}, name {v['name']!r}): "
                                "one row per variant")
            seen[key] = i
    return report


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_fraction(x) -> bool:
    return _is_number(x) and math.isfinite(x) and 0.0 <= x <= 1.0


def _depth(obj) -> int:
    """How many containers deep `obj` nests, found without recursion (stops past MAX_DEPTH)."""
    deepest, todo = 0, [(obj, 1)]
    while todo and deepest <= MAX_DEPTH:
        node, depth = todo.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            todo += [(child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)]
    return deepest


def _check_accuracies(row: dict, where: str, required: tuple[str, ...]) -> None:
    for key in ACCURACIES:
        value = row.get(key)
        if key in required and key not in row:
            raise HeroError(f"{where} lacks {key}")
        if (key in required or value is not None) and not _is_fraction(value):
            raise HeroError(f"{where}: {key} must be a fraction in [0, 1], got {value!r}")


def _check_count(row: dict, where: str) -> None:
    n = row.get("test_samples")
    if n is not None and (not _is_integer(n) or n < 1):
        raise HeroError(f"{where}: test_samples must be a positive integer, got {n!r}")


def _check_identity(v: dict, where: str) -> None:
    if not isinstance(v["name"], str) or not v["name"]:
        raise HeroError(f"{where}: name must be a non-empty string")
    for key, allow_null in (("bits", False), ("act_bits", True)):
        value = v[key]
        if not (allow_null and value is None) and (not _is_integer(value) or value not in SUPPORTED_BITS):
            raise HeroError(f"{where}: {key} must be one of {', '.join(map(str, SUPPORTED_BITS))}"
                            f"{' or null' if allow_null else ''}, got {value!r}")
    for key in ("symmetric", "per_channel"):
        if not isinstance(v[key], bool):
            raise HeroError(f"{where}: {key} must be true or false, got {v[key]!r}")
    for key, choices in (("bn", ("fold-first", "quantize-first", "keep")), ("grid", ("canonical", "nested"))):
        if key in v and v[key] not in choices:
            raise HeroError(f"{where}: {key} must be one of {', '.join(choices)}, got {v[key]!r}")
    layers = v.get("layer_bits")
    if layers is not None and (not isinstance(layers, dict) or not all(
            isinstance(k, str) and _is_integer(b) and b in SUPPORTED_BITS for k, b in layers.items())):
        raise HeroError(f"{where}: layer_bits must be null or map layer names to bit widths")


def variant_label(v: dict) -> str:
    scheme = ("sym" if v["symmetric"] else "asym") + ("/ch" if v["per_channel"] else "/tensor")
    scheme += "".join(f", {v[k]}" for k, default in (("bn", "fold-first"), ("grid", "canonical"))
                      if v.get(k, default) != default)
    scheme += f", blocks of {v['block_size']}" if v.get("block_size") else ""
    act = f"a{v['act_bits']}" if v.get("act_bits") else ""
    width = f"mixed ≤{v['bits']}" if v.get("layer_bits") else f"w{v['bits']}"
    return f"{width}{act} ({scheme})"


def _identity(v: dict) -> tuple:
    """What makes two variants the same precision: widths (per layer for mixed), scheme, activations."""
    layers = v.get("layer_bits")
    return (v["bits"], v["symmetric"], v["per_channel"], v.get("act_bits"), v.get("bn", "fold-first"),
            v.get("grid", "canonical"), tuple(sorted(layers.items())) if isinstance(layers, dict) else None,
            v.get("block_size"))


def _samples(v: dict, meta: dict) -> int | None:
    return v.get("test_samples") if v.get("test_samples") is not None else meta.get("test_samples")


def check_comparable(report: dict, previous: dict, pairs: list[tuple[dict, dict]]) -> None:
    """Refuse a baseline report that measured another model or another test set (module docstring);
    `pairs` are the (variant, its match in `previous`) that the regression check compares."""
    meta, old = report.get("meta") or {}, previous.get("meta") or {}
    unnamed = [who for who, m in (("the report", meta), ("the --baseline report", old))
               if not isinstance(m.get("model"), str) or not m["model"]]
    if unnamed:
        raise HeroError(f"{' and '.join(unnamed)} {'name' if len(unnamed) > 1 else 'names'} no model (meta.model), "
                        "so the regression check cannot tell "
                        "both are of one model: compare reports written by `hero run` or validate_bundle")
    for key in ("model", "dataset", "classes"):
        if meta.get(key) is not None and old.get(key) is not None and meta[key] != old[key]:
            shown = (lambda m: m[key]) if key != "classes" else (lambda m: f"{len(m[key])} classes")
            raise HeroError(f"the report and the --baseline report differ in {key} ({shown(meta)} vs "
                            f"{shown(old)}): compare reports of the same model on the same test set")
    for v, was in pairs:
        n, n_old = _samples(v, meta), _samples(was, old)
        if n is None or n_old is None:
            who = "the report" if n is None else "the --baseline report"
            raise HeroError(f"{who} gives no test-sample count for {variant_label(v)} (test_samples), so the "
                            "regression check cannot tell both used one test set: rerun it with this version")
        if n != n_old:
            raise HeroError(f"{variant_label(v)} was validated on {n} test samples in the report and on {n_old} in "
                            "the --baseline report: compare reports made on the same test set")


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
    """{"passed", "gated", "reasons", "checked": [(label, failures)]} for the selected variants of a
    report checked by `read_report` (or built by `hero run`). ``gated`` is False when `criteria` set no
    accuracy threshold: ``passed`` then says only that no variant failed a check that needs none."""
    present = {v["bits"] for v in report["variants"]}
    missing = [b for b in criteria.bits or () if b not in present]
    if missing:
        raise HeroError(f"no variant with bits {', '.join(map(str, missing))} in the report (it has bits "
                        f"{', '.join(map(str, sorted(present)))}): drop {'them' if len(missing) > 1 else 'it'} "
                        "from --bits (config: gate.bits)")
    selected = [v for v in report["variants"] if criteria.bits is None or v["bits"] in criteria.bits]
    old = {_identity(v): v for v in (criteria.previous or {}).get("variants", [])}
    if criteria.previous is not None:
        check_comparable(report, criteria.previous,
                         [(v, old[_identity(v)]) for v in selected if _identity(v) in old])
    checked = [(variant_label(v), variant_failures(v, report["baseline"]["accuracy"], criteria,
                                                   old.get(_identity(v)))) for v in selected]
    reasons = [r for _, failures in checked for r in failures]
    return {"passed": not reasons, "gated": not criteria.vacuous, "reasons": reasons, "checked": checked}


def write_junit(result: dict, path: str | Path) -> None:
    """One JUnit test case per checked variant, so CI systems show each precision's verdict, and
    one failing case for a gate that checked no accuracy."""
    cases = []
    rows = list(result["checked"]) + ([("gate criteria", [NO_CRITERION])] if not result["gated"] else [])
    for label, failures in rows:
        body = "".join(f"<failure message={quoteattr(f)}>{escape(f)}</failure>" for f in failures)
        cases.append(f'  <testcase classname="hero.gate" name={quoteattr(label)}>{body}</testcase>')
    failed = sum(1 for _, f in rows if f)
    xml = (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="hero-check" '
           f'tests="{len(cases)}" failures="{failed}">\n' + "\n".join(cases) + "\n</testsuite>\n")
    write_atomic(path, xml)
