"""The release gate behind ``hero check`` and the last stage of ``hero run``.

``hero check`` exits 0 when every selected variant passes, 1 when any fails, and 2 when it refuses
(a HeroError: one line on stderr). It never passes a report it cannot judge. The rules:

- **Reading a report** (`read_report`) refuses a file that is not JSON, not a JSON object, or nested
  deeper than ``MAX_DEPTH`` levels (the schema needs 6), a report without variants, and one that
  does not fit `exporters.device.report_schema.REPORT` (a field of the wrong type or range, a
  variant lacking a required field); the refusal names the row. Accuracies are numbers in [0, 1]
  (a bool is not a number; NaN and infinities are not in [0, 1]). Two variants may not share a name
  or an identity (`exporters.device.schema.IDENTITY`).
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

from exporters.device.errors import HeroError
from exporters.device.files import read_json, write_atomic
from exporters.device.report_schema import REPORT
from exporters.device.schema import IDENTITY_DEFAULTS, check, identity_key

MAX_DEPTH = 8  # report > variants > row > costs > latency > batch_1 is 6 levels: anything far deeper is not a report
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
    if not report["variants"]:
        raise HeroError(f"{where} has no variants: nothing to gate")
    check(report, REPORT, where)
    seen: dict = {}
    for i, v in enumerate(report["variants"]):
        for key in (v["name"], identity_key(v)):
            if key in seen:
                raise HeroError(f"{where}: variants[{i}] ({v['name']}) repeats variants[{seen[key]}] "
                                f"({variant_label(v)}, name {v['name']!r}): one row per variant")
            seen[key] = i
    return report


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _depth(obj) -> int:
    """How many containers deep `obj` nests, found without recursion (stops past MAX_DEPTH)."""
    deepest, todo = 0, [(obj, 1)]
    while todo and deepest <= MAX_DEPTH:
        node, depth = todo.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            todo += [(child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)]
    return deepest


def variant_label(v: dict) -> str:
    scheme = ("sym" if v["symmetric"] else "asym") + ("/ch" if v["per_channel"] else "/tensor")
    scheme += "".join(f", {v[k]}" for k in ("bn", "grid") if v.get(k, IDENTITY_DEFAULTS[k]) != IDENTITY_DEFAULTS[k])
    scheme += f", blocks of {v['block_size']}" if v.get("block_size") else ""
    act = f"a{v['act_bits']}" if v.get("act_bits") else ""
    width = f"mixed ≤{v['bits']}" if v.get("layer_bits") else f"w{v['bits']}"
    return f"{width}{act} ({scheme})"


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
    old = {identity_key(v): v for v in (criteria.previous or {}).get("variants", [])}
    if criteria.previous is not None:
        check_comparable(report, criteria.previous,
                         [(v, old[identity_key(v)]) for v in selected if identity_key(v) in old])
    checked = [(variant_label(v), variant_failures(v, report["baseline"]["reference_accuracy"], criteria,
                                                   old.get(identity_key(v)))) for v in selected]
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
