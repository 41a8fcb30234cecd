"""hero check: exit codes on passing, failing, malformed and incomparable reports; regression; JUnit.

Every rule of pipeline/gate.py's docstring has a test here; refusals are exit 2 with one line on stderr.
"""

import json
import xml.etree.ElementTree as ET

import pytest

from pipeline.cli import main
from pipeline.gate import GateCriteria, evaluate_gate

CLASSES = [str(i) for i in range(10)]


def report(accs, baseline=0.90, consistent=True, samples=1000):
    variants = [{"name": f"w{b}", "bits": b, "symmetric": True, "per_channel": True, "act_bits": None,
                 "runtime": "onnxruntime", "torch_accuracy": a, "runtime_accuracy": a, "agreement": 1.0,
                 "consistent": consistent, "drop": baseline - a, "latency_ms": 1.0, "file_bytes": 10,
                 "test_samples": samples, "artifact": f"artifacts/w{b}.onnx", "sha256": "0" * 64}
                for b, a in accs.items()]
    return {"meta": {"model": "resnet20", "dataset": "cifar10", "classes": CLASSES, "test_samples": samples},
            "baseline": {"name": "fp32", "reference_accuracy": baseline, "runtime_accuracy": baseline,
                         "test_samples": samples},
            "variants": variants, "gate": {"passed": True, "reasons": []}}


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def refused(capsys, *argv) -> str:
    """Run `hero check ARGV`, assert it refused (exit 2, one error line, no traceback); return the line."""
    capsys.readouterr()
    code = main(["check", *argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("hero: error: ") and "Traceback" not in captured.err, lines
    return lines[0]


def test_passing_report_exits_0(tmp_path, capsys):
    path = write(tmp_path, "r.json", report({8: 0.899, 4: 0.88}))
    assert main(["check", path, "--max-drop", "2.5", "--min-accuracy", "0.85"]) == 0
    assert "all passed" in capsys.readouterr().out


def test_failing_variant_exits_1_with_one_line_per_failure(tmp_path, capsys):
    path = write(tmp_path, "r.json", report({8: 0.899, 4: 0.80, 3: 0.50}))
    assert main(["check", path, "--max-drop", "2.0"]) == 1
    fails = [l for l in capsys.readouterr().out.splitlines() if l.startswith("FAIL")]
    assert len(fails) == 2 and "w4" in fails[0] and "w3" in fails[1]


def test_bits_selects_the_checked_variants(tmp_path):
    path = write(tmp_path, "r.json", report({8: 0.899, 3: 0.50}))
    assert main(["check", path, "--max-drop", "2.0", "--bits", "8"]) == 0
    assert main(["check", path, "--max-drop", "2.0", "--bits", "3,8"]) == 1


def test_every_requested_bits_width_without_a_variant_is_refused_by_name(tmp_path, capsys):
    path = write(tmp_path, "r.json", report({8: 0.899, 4: 0.89}))
    line = refused(capsys, path, "--max-drop", "2.0", "--bits", "4,5,6,8")
    assert "bits 5, 6 in the report" in line and "it has bits 4, 8" in line
    assert "bits 5 in" in refused(capsys, path, "--max-drop", "2.0", "--bits", "5")


def test_runtime_disagreement_fails_the_variant(tmp_path):
    path = write(tmp_path, "r.json", report({8: 0.899}, consistent=False))
    assert main(["check", path, "--max-drop", "100"]) == 1


def test_gate_without_any_accuracy_threshold_is_refused_not_passed(tmp_path, capsys):
    path = write(tmp_path, "r.json", report({8: 0.899}))
    junit = tmp_path / "junit.xml"
    assert "the gate checks no accuracy: pass --max-drop" in refused(capsys, path, "--junit", str(junit))
    assert not junit.exists()


def test_a_gate_section_without_threshold_gates_nothing_and_still_fails_a_disagreeing_runtime():
    from pipeline.config import GateSection
    from pipeline.run import criteria_from

    result = evaluate_gate(report({8: 0.10}), criteria_from(GateSection()))  # an accuracy no threshold judges
    assert result["passed"] and not result["gated"] and result["reasons"] == []
    broken = evaluate_gate(report({8: 0.899}, consistent=False), criteria_from(GateSection()))
    assert not broken["passed"] and not broken["gated"] and "disagrees with the PyTorch" in broken["reasons"][0]
    assert evaluate_gate(report({8: 0.899}), GateCriteria(min_accuracy=0.5))["gated"]


def test_run_summary_says_not_gated_and_reads_reports_without_gated_as_gated():
    from pipeline.gate import NOT_GATED
    from pipeline.report import gate_verdict
    from pipeline.run import summary

    ungated = {"passed": True, "gated": False, "reasons": [], "note": NOT_GATED}
    rep = dict(report({8: 0.899}), gate=ungated)
    rep["baseline"].update(torch_accuracy=0.9, drop_points=0.0, agreement=1.0, consistent=True, latency_ms=1.0,
                           file_bytes=40, packed_weight_bytes=40, bits=None)
    for v in rep["variants"]:
        v.update(drop_points=100 * v["drop"], packed_weight_bytes=10)
    printed = summary(rep)
    assert "gate: NOT GATED" in printed and "nothing was gated" in printed and "FAIL" not in printed
    assert gate_verdict({"passed": True, "reasons": []}) == "PASSED"  # a report from before `gated`
    assert gate_verdict(dict(ungated, passed=False, reasons=["w8: broken"])) == "FAILED"


@pytest.mark.parametrize("option", ["--max-drop=nan", "--max-drop=inf", "--max-drop=-1", "--min-accuracy=nan",
                                    "--min-accuracy=-inf", "--min-accuracy=85", "--min-accuracy=-0.1",
                                    "--max-regression=nan", "--max-regression=inf", "--max-regression=-0.5"])
def test_non_finite_or_out_of_range_threshold_is_refused(tmp_path, capsys, option):
    path = write(tmp_path, "r.json", report({8: 0.899}))
    extra = ["--baseline", path] if option.startswith("--max-regression") else []
    line = refused(capsys, path, option, *extra)
    assert option.split("=")[0][2:].replace("-", "_") in line


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, True, "0.9", 1.5, -0.1, "missing"])
@pytest.mark.parametrize("row, key", [("baseline", "reference_accuracy"), ("w4", "runtime_accuracy"),
                                      ("baseline", "runtime_accuracy"), ("w4", "torch_accuracy")])
def test_bad_accuracy_is_refused_naming_the_row(tmp_path, capsys, row, key, value):
    rep = report({8: 0.899, 4: 0.89})
    target = rep["baseline"] if row == "baseline" else rep["variants"][1]
    if value == "missing":
        del target[key]
    else:
        target[key] = value
    path = write(tmp_path, "r.json", rep)
    optional = key in ("torch_accuracy",) or (row == "baseline" and key == "runtime_accuracy")
    if optional and value in (None, "missing"):  # not required: null or absent is allowed
        assert main(["check", path, "--max-drop", "2"]) == 0
        return
    line = refused(capsys, path, "--max-drop", "2")
    assert row in line and key in line


def _deep(levels: int) -> list:
    nested = []
    for _ in range(levels):
        nested = [nested]
    return nested


def _with(**changes):
    rep = report({8: 0.899, 4: 0.89})
    for key, value in changes.items():
        if key.startswith("v_"):
            rep["variants"][1][key[2:]] = value
        else:
            rep[key] = value
    return json.dumps(rep)


MALFORMED = {
    "not_json": "{not json",
    "integer_too_long": '{"baseline": {"reference_accuracy": ' + "1" * 5000 + "}}",
    "not_an_object": json.dumps([1, 2]),
    "no_baseline": json.dumps({"variants": []}),
    "variants_not_a_list": _with(variants={"w8": {}}),
    "no_variants": _with(variants=[]),
    "row_not_an_object": _with(variants=[report({8: 0.899})["variants"][0], "w4"]),
    "row_lacks_fields": json.dumps({"baseline": {"reference_accuracy": 0.9}, "variants": [{"bits": 8}]}),
    "meta_not_an_object": _with(meta=["resnet20"]),
    "nested_beyond_json": "[" * 100_000 + "]" * 100_000,
    "nested_beyond_schema": _with(meta={"model": "resnet20", "deep": _deep(50)}),
    "duplicate_name": _with(v_name="w8"),
    "duplicate_variant": _with(v_bits=8),
    "bits_not_an_int": _with(v_bits="4"),
    "unsupported_bits": _with(v_bits=12),
    "symmetric_not_bool": _with(v_symmetric="yes"),
    "test_samples_not_positive": _with(v_test_samples=0),
    "accuracy_out_of_range": json.dumps(report({8: 1.7})),
}


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_reports_exit_2_with_one_line(tmp_path, capsys, content):
    refused(capsys, write(tmp_path, "bad.json", content), "--max-drop", "100")


def test_missing_report_exits_2(tmp_path, capsys):
    refused(capsys, str(tmp_path / "none.json"), "--max-drop", "100")


def test_regression_against_an_earlier_report(tmp_path, capsys):
    old = write(tmp_path, "old.json", report({8: 0.90, 4: 0.89}))
    new = write(tmp_path, "new.json", report({8: 0.899, 4: 0.86}))
    assert main(["check", new, "--baseline", old, "--max-regression", "1.0"]) == 1
    assert "regressed 3.00 pts" in capsys.readouterr().out
    assert main(["check", new, "--baseline", old, "--max-regression", "5.0"]) == 0
    assert main(["check", new, "--baseline", old]) == 2  # --max-regression missing


def _device_like(rep: dict) -> dict:
    """validate_bundle's shape: no classes in meta, no test_samples in the rows."""
    del rep["meta"]["classes"]
    for row in [rep["baseline"], *rep["variants"]]:
        del row["test_samples"]
    return rep


def _delete(key):
    return lambda r: r["meta"].pop(key)


def _set(key, value, device_like=False):
    return lambda r: (_device_like(r) if device_like else r)["meta"].update({key: value})


EDITS = {"model": _set("model", "resnet32"), "dataset": _set("dataset", "cifar100"),
         "classes": _set("classes", CLASSES[:9]), "meta_samples": _set("test_samples", 500, device_like=True),
         "row_samples": lambda r: r["variants"][0].update(test_samples=500),
         "no_model": _delete("model"), "no_meta": lambda r: r.pop("meta"),
         "no_samples": lambda r: _device_like(r)["meta"].pop("test_samples")}


@pytest.mark.parametrize("field, says", [
    ("model", "differ in model (resnet20 vs resnet32)"), ("dataset", "differ in dataset (cifar10 vs cifar100)"),
    ("classes", "differ in classes (10 classes vs 9 classes)"),
    ("row_samples", "validated on 1000 test samples in the report and on 500"),
    ("meta_samples", "validated on 1000 test samples in the report and on 500"),
    ("no_model", "the --baseline report names no model"), ("no_meta", "the --baseline report names no model"),
    ("no_samples", "the --baseline report gives no test-sample count for w8"),
])
def test_baseline_report_of_another_model_or_test_set_is_refused(tmp_path, capsys, field, says):
    new = write(tmp_path, "new.json", report({8: 0.899, 4: 0.89}))
    old = report({8: 0.90, 4: 0.89})
    EDITS[field](old)
    line = refused(capsys, new, "--baseline", write(tmp_path, "old.json", old), "--max-regression", "5")
    assert says in line


def test_baseline_comparison_uses_only_fields_both_reports_have(tmp_path, capsys):
    """A host report (classes, per-row counts) against a device report (neither) of the same test set."""
    device = write(tmp_path, "device.json", _device_like(report({8: 0.899, 4: 0.89})))
    host = write(tmp_path, "host.json", report({8: 0.90, 4: 0.89}))
    assert main(["check", device, "--baseline", host, "--max-regression", "1"]) == 0
    both_unnamed = [json.loads(open(p).read()) for p in (device, host)]
    for rep in both_unnamed:
        del rep["meta"]["model"]
    line = refused(capsys, write(tmp_path, "d.json", both_unnamed[0]), "--baseline",
                   write(tmp_path, "h.json", both_unnamed[1]), "--max-regression", "1")
    assert "the report and the --baseline report name no model" in line


def test_junit_has_one_case_per_variant_with_failures(tmp_path):
    path = write(tmp_path, "r.json", report({8: 0.899, 4: 0.80}))
    junit = tmp_path / "junit.xml"
    assert main(["check", path, "--max-drop", "2.0", "--junit", str(junit)]) == 1
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    failed = [c.get("name") for c in suite if c.find("failure") is not None]
    assert failed == ["w4 (sym/ch)"]


def test_trt_lint_findings_fail_only_tensorrt_targets(tmp_path, capsys):
    rep = report({4: 0.89})
    rep["variants"][0].update(trt_lint=["INT4 weights feed Conv"], target_runtime="onnxruntime")
    assert main(["check", write(tmp_path, "ort.json", rep), "--max-drop", "100"]) == 0
    rep["variants"][0]["target_runtime"] = "tensorrt"
    assert main(["check", write(tmp_path, "trt.json", rep), "--max-drop", "100"]) == 1
    assert "TensorRT's explicit-quantization rules: INT4 weights feed Conv" in capsys.readouterr().out


def test_hero_check_and_help_import_no_torch(tmp_path):
    """The CI gate and `hero --help` run without importing torch (a fresh process; ~2 s saved per call)."""
    import subprocess
    import sys

    path = write(tmp_path, "r.json", report({8: 0.899, 4: 0.88}))
    probe = ("import sys; from pipeline.cli import main; "
             "helped = main(['--help']); "
             f"code = main(['check', {path!r}, '--max-drop', '2.5']); "
             "print(helped, code, 'torch' in sys.modules, 'onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 0 False False", out.stdout
