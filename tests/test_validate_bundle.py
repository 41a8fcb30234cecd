"""The on-device validator: runs without torch, reports in the host schema, and `hero check` compares."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import CPU, FakeTensorRT, built_bundle, copy_bundle, use_fake_tensorrt

from exporters.device.runtime import OnnxRuntimeRunner
from exporters.device.validate_bundle import main as validate_main
from exporters.device.validate_bundle import validate_bundle
from pipeline.cli import main as hero

REPO_ROOT = Path(__file__).resolve().parents[1]

_VALIDATE_WITHOUT_HOST_PACKAGES = """
import runpy, sys
for blocked in ("torch", "hero_train", "pipeline", "click", "onnx", "pydantic", "yaml", "matplotlib"):
    sys.modules[blocked] = None  # any import of these now raises ImportError
sys.argv = ["validate_bundle", *sys.argv[1:]]
runpy.run_module("exporters.device.validate_bundle", run_name="__main__")
"""
# A TensorRT-only device: the validator, the switcher and the shared timer and top-1 import without onnxruntime.
_WITHOUT_ONNXRUNTIME = """
import sys
sys.modules["onnxruntime"] = None
import numpy as np
from exporters.device import switch, validate_bundle
from exporters.device.runtime import median_ms, top1
print(top1(np.eye(4), np.array([0, 1, 2, 0])), median_ms(lambda: None, 3) >= 0)
sys.exit(validate_bundle.main(sys.argv[1:]))
"""


@pytest.fixture
def tiny(tmp_path_factory):
    return built_bundle(tmp_path_factory)


def _validate_in_subprocess(*args):
    return subprocess.run([sys.executable, "-c", _VALIDATE_WITHOUT_HOST_PACKAGES, *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_validator_runs_without_torch_and_hero_check_compares_with_the_host(tiny, tmp_path, capsys):
    device = tmp_path / "device_report.json"
    done = _validate_in_subprocess(tiny["bundle"], "--out", device, "--providers", "CPUExecutionProvider",
                                   "--latency-repeats", "2", "--switch-repeats", "3")
    assert done.returncode == 0, done.stderr
    assert "precision switch: median" in done.stdout
    report = json.loads(device.read_text())
    host_path = tiny["bundle"] / "host_report.json"
    host = json.loads(host_path.read_text())
    identity = [(v["bits"], v["symmetric"], v["per_channel"], v["act_bits"]) for v in report["variants"]]
    assert identity == [(v["bits"], v["symmetric"], v["per_channel"], v["act_bits"]) for v in host["variants"]]
    assert identity == [(8, True, True, None), (4, True, True, None)]
    assert report["meta"]["switch_latency"]["switches"] == 9
    assert hero(["check", str(device), "--baseline", str(host_path), "--max-regression", "1"]) == 0

    better = json.loads(host_path.read_text())
    for v in better["variants"]:
        v["runtime_accuracy"] = min(1.0, v["runtime_accuracy"] + 0.5)
    better_path = tmp_path / "better_host.json"
    better_path.write_text(json.dumps(better))
    capsys.readouterr()
    assert hero(["check", str(device), "--baseline", str(better_path), "--max-regression", "1"]) == 1
    assert capsys.readouterr().out.count("regressed") == 2


def test_device_report_numbers_follow_the_documented_definitions(tiny):
    report = validate_bundle(tiny["bundle"], "onnxruntime", list(CPU), latency_batch=4, latency_repeats=1,
                             switch_repeats=1)
    with np.load(tiny["bundle"] / "test.npz") as data:
        x, y = data["x"], data["y"]
    manifest = json.loads((tiny["bundle"] / "manifest.json").read_text())
    float_pred = OnnxRuntimeRunner(tiny["bundle"] / "artifacts" / "fp32.onnx", CPU).predict(x).argmax(1)
    baseline = report["baseline"]
    assert baseline["bits"] is None and baseline["agreement"] == 1.0
    assert baseline["reference_accuracy"] == baseline["runtime_accuracy"] == pytest.approx(np.mean(float_pred == y))
    for v, entry in zip(report["variants"], manifest["variants"][1:], strict=True):
        pred = OnnxRuntimeRunner(tiny["bundle"] / entry["artifact"], CPU).predict(x).argmax(1)
        assert v["runtime_accuracy"] == pytest.approx(np.mean(pred == y))
        assert v["agreement"] == pytest.approx(np.mean(pred == float_pred))
        assert v["drop_points"] == pytest.approx(100 * (baseline["reference_accuracy"] - v["runtime_accuracy"]))
        assert (v["sha256"], v["torch_accuracy"], v["host_accuracy"]) == \
               (entry["sha256"], entry["torch_accuracy"], entry["host_accuracy"])
        assert v["latency_ms"] > 0 and v["runtime"] == "onnxruntime"
    for row in [baseline, *report["variants"]]:
        costs = row["costs"]
        assert costs["ready_ms"] >= costs["first_run_ms"] > 0 and costs["ready_by"] == "session"
        latency = costs["latency"]
        assert (latency["batch_1"]["batch"], latency["batch"]["batch"]) == (1, 4)
        assert latency["batch"]["median_ms"] == row["latency_ms"]
        for stats in latency.values():
            assert stats["p99_ms"] >= stats["median_ms"] > 0 and stats["repeats"] == 1
        assert isinstance(costs["resident_mib"], float) or report["meta"]["memory"]["unavailable"]
        assert costs["artifact_bytes"] == (tiny["bundle"] / row["artifact"]).stat().st_size
    # How ORT ran them: float kernels on float and weight-only artifacts (their weights folded), all
    # three Conv and the Gemm of the tiny net; every kernel that ran is counted by op type.
    for row in [baseline, *report["variants"]]:
        ops = row["costs"]["ops"]
        assert (ops["integer"], ops["float"]) == (0, 3), (row["name"], ops)
        assert sum(ops["by_type"].values()) >= 3 and "profiler" in ops["how"]
    meta = report["meta"]
    assert meta["role"] == "device" and meta["refit_verdicts"] is None
    assert meta["cold_switch_latency"]["switches"] == 3 and meta["switch_latency"]["switches"] == 3
    host = json.loads((tiny["bundle"] / "host_report.json").read_text())
    assert host["meta"]["role"] == "host" and "costs" in host["baseline"]
    assert report["gate"] == {"passed": True, "reasons": []}


def test_tensorrt_device_report_records_each_refit_verdict(tiny, tmp_path, monkeypatch):
    use_fake_tensorrt(monkeypatch, FakeTensorRT(faulty_refit=True))
    bundle = copy_bundle(tiny["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"][2]["refit_group"] = manifest["variants"][1]["refit_group"]  # w4 refits w8's engine
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = validate_bundle(bundle, "tensorrt", latency_batch=4, latency_repeats=1, switch_repeats=1)
    verdicts = report["meta"]["refit_verdicts"]
    assert {name: r["verdict"] for name, r in verdicts.items()} == {"w8": "ok", "w4": "mismatch"}
    assert report["meta"]["cold_switch_latency"] is None
    stored = json.loads((bundle / "engines" / "refit_verdicts.json").read_text())["verdicts"]
    assert {r["variant"]: r["verdict"] for r in stored} == {"w8": "ok", "w4": "mismatch"}
    w4 = next(v for v in report["variants"] if v["name"] == "w4")
    assert w4["costs"]["ready_by"] == "engine"  # it runs on its own engine
    assert "unavailable" in w4["costs"]["ops"]


def test_validator_without_onnxruntime_imports_and_asks_for_it_in_one_line(tiny, tmp_path):
    done = subprocess.run([sys.executable, "-c", _WITHOUT_ONNXRUNTIME, str(tiny["bundle"]), "--out",
                           str(tmp_path / "r.json")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["0.75 True"]
    assert done.returncode == 2 and not (tmp_path / "r.json").exists()
    assert done.stderr.startswith("validate_bundle: error: onnxruntime is not installed") and \
           done.stderr.count("\n") == 1


def test_tampered_bundle_is_exit_2_with_one_line_in_a_subprocess(tiny, tmp_path):
    bundle = copy_bundle(tiny["bundle"], tmp_path / "bundle")
    (bundle / "artifacts" / "w8.onnx").write_bytes(b"not the exported model")
    done = _validate_in_subprocess(bundle, "--out", tmp_path / "r.json")
    assert done.returncode == 2 and not (tmp_path / "r.json").exists()
    assert done.stderr.count("\n") == 1 and "artifacts/w8.onnx" in done.stderr


@pytest.mark.parametrize("problem", ["missing_folder", "missing_manifest", "tampered_test_data"])
def test_bad_bundle_is_exit_2(tiny, tmp_path, capsys, problem):
    bundle = tmp_path / "nowhere"
    if problem != "missing_folder":
        bundle = copy_bundle(tiny["bundle"], tmp_path / "bundle")
    if problem == "missing_manifest":
        (bundle / "manifest.json").unlink()
    if problem == "tampered_test_data":
        with np.load(bundle / "test.npz") as data:
            np.savez(bundle / "test.npz", x=data["x"], y=(data["y"] + 1) % 10)
    assert validate_main([str(bundle), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("validate_bundle: error: ") and err.count("\n") == 1
    assert {"missing_folder": "does not exist", "missing_manifest": "no manifest.json",
            "tampered_test_data": "test.npz"}[problem] in err
