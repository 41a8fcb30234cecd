"""hero check: exit codes on passing, failing and malformed reports; regression; JUnit."""

import json
import xml.etree.ElementTree as ET

import pytest

from pipeline.cli import main


def report(accs, baseline=0.90, consistent=True):
    variants = [{"name": f"w{b}", "bits": b, "symmetric": True, "per_channel": True, "act_bits": None,
                 "runtime": "onnxruntime", "torch_accuracy": a, "runtime_accuracy": a, "agreement": 1.0,
                 "consistent": consistent, "drop": baseline - a, "latency_ms": 1.0, "file_bytes": 10,
                 "artifact": f"artifacts/w{b}.onnx", "sha256": "0" * 64} for b, a in accs.items()]
    return {"baseline": {"accuracy": baseline}, "variants": variants, "gate": {"passed": True, "reasons": []}}


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


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
    assert main(["check", path, "--bits", "5"]) == 2


def test_runtime_disagreement_fails_the_variant(tmp_path):
    path = write(tmp_path, "r.json", report({8: 0.899}, consistent=False))
    assert main(["check", path]) == 1


def test_regression_against_an_earlier_report(tmp_path, capsys):
    old = write(tmp_path, "old.json", report({8: 0.90, 4: 0.89}))
    new = write(tmp_path, "new.json", report({8: 0.899, 4: 0.86}))
    assert main(["check", new, "--baseline", old, "--max-regression", "1.0"]) == 1
    assert "regressed 3.00 pts" in capsys.readouterr().out
    assert main(["check", new, "--baseline", old, "--max-regression", "5.0"]) == 0
    assert main(["check", new, "--baseline", old]) == 2  # --max-regression missing


@pytest.mark.parametrize("content", ["{not json", json.dumps({"variants": []}), json.dumps([1, 2]),
                                     json.dumps(report({8: 1.7})), json.dumps({"baseline": {"accuracy": 0.9},
                                                                              "variants": [{"bits": 8}]})])
def test_malformed_reports_exit_2_with_one_line(tmp_path, capsys, content):
    path = write(tmp_path, "bad.json", content)
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_missing_report_exits_2(tmp_path):
    assert main(["check", str(tmp_path / "none.json")]) == 2


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
    assert main(["check", write(tmp_path, "ort.json", rep)]) == 0
    rep["variants"][0]["target_runtime"] = "tensorrt"
    assert main(["check", write(tmp_path, "trt.json", rep)]) == 1
    assert "TensorRT's explicit-quantization rules: INT4 weights feed Conv" in capsys.readouterr().out
