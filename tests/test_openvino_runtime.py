"""OpenVINO on the device (exporters/device/openvino_runtime.py): the runner, the switcher and the
validator with runtime "openvino". OpenVINO once crashed the pytest process it was loaded in, so every
OpenVINO call runs in a subprocess (with torch and the host packages blocked, as on a device); the
tests skip, saying why, where openvino is not installed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_helpers import built_bundle

from exporters.device.compare import tolerance

REPO_ROOT = Path(__file__).resolve().parents[1]
_BLOCK = """
import sys
for blocked in ("torch", "hero_train", "pipeline", "click", "onnx", "pydantic", "yaml", "matplotlib"):
    sys.modules[blocked] = None
"""
_OPENVINO_MISSING = subprocess.run([sys.executable, "-c", "import openvino"], capture_output=True).returncode != 0
needs_openvino = pytest.mark.skipif(_OPENVINO_MISSING, reason="openvino is not installed: pip install -e '.[openvino]'")

# Per precision: the switcher's OpenVINO logits against ORT's on the same artifact, after a round of
# switches with one resident session, so every switch evicted a compiled model and compiled another.
_SWITCH_AND_COMPARE = _BLOCK + """
import json
import numpy as np
from exporters.device.openvino_runtime import OpenVinoRunner
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.device.switch import PrecisionSwitcher
bundle = sys.argv[1]
with np.load(bundle + "/test.npz") as data:
    x = data["x"]
sw = PrecisionSwitcher(bundle, "openvino", resident=1)
out = {"providers": sw.providers, "loaded": []}
for bits in [8, 4, None, 4]:
    sw.set_precision(bits)
    out["loaded"].append(sw.loaded)
    ov = sw.predict(x)
    ort = OnnxRuntimeRunner(bundle + "/" + sw.variant(bits)["artifact"], ["CPUExecutionProvider"]).predict(x)
    out[str(bits)] = {"max_diff": float(np.abs(ov - ort).max()), "scale": float(np.abs(ort).max()),
                      "dtype": str(ov.dtype), "shape": list(ov.shape),
                      "direct": float(np.abs(OpenVinoRunner(bundle + "/" + sw.variant(bits)["artifact"]).predict(x, 5) - ov).max())}
print(json.dumps(out))
"""
_VALIDATE = _BLOCK + """
import runpy
sys.argv = ["validate_bundle", *sys.argv[1:]]
runpy.run_module("exporters.device.validate_bundle", run_name="__main__")
"""


@pytest.fixture
def tiny(tmp_path_factory):
    return built_bundle(tmp_path_factory)


def _run(script: str, *args):
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


@needs_openvino
def test_openvino_switcher_computes_what_onnxruntime_computes_on_each_artifact(tiny):
    done = _run(_SWITCH_AND_COMPARE, tiny["bundle"])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["providers"] == ["CPU"] and out["loaded"] == [[8], [4], [None], [4]]
    for bits in ("8", "4", "None"):
        # float kernels on both (f32 inference precision): equal up to the order of float sums
        assert out[bits]["max_diff"] <= tolerance(1e-4, out[bits]["scale"]), (bits, out[bits])
        assert out[bits]["direct"] <= tolerance(1e-5, out[bits]["scale"]) and out[bits]["dtype"] == "float32"
        assert out[bits]["shape"] == [24, 10]


@needs_openvino
def test_validator_on_openvino_writes_a_device_report(tiny, tmp_path):
    report_path = tmp_path / "device_report.json"
    done = _run(_VALIDATE, tiny["bundle"], "--runtime", "openvino", "--out", report_path, "--latency-repeats", "1",
                "--switch-repeats", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    meta = report["meta"]
    assert meta["runtime"] == "openvino" and meta["providers"] == ["CPU"] and meta["role"] == "device"
    assert meta["runtime_version"].startswith("20") and meta["cold_switch_latency"]["switches"] == 3
    assert [r["runtime"] for r in [report["baseline"], *report["variants"]]] == ["openvino"] * 3
    rows = [report["baseline"], *report["variants"]]
    assert all(r["costs"]["ready_ms"] > 0 and r["costs"]["ready_by"] == "session" for r in rows)
    assert meta["inference_precision"] == "f32"
    # float layers on OpenVINO's float kernels: the tiny net's two Conv and its Gemm (FullyConnected)
    assert [(r["costs"]["ops"]["integer"], r["costs"]["ops"]["float"]) for r in rows] == [(0, 3)] * 3


@needs_openvino
def test_bf16_inference_precision_is_used_only_when_asked(tiny, tmp_path):
    report_path = tmp_path / "device_report.json"
    done = _run(_VALIDATE, tiny["bundle"], "--runtime", "openvino", "--inference-precision", "bf16", "--out",
                report_path, "--latency-repeats", "1", "--switch-repeats", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(report_path.read_text())["meta"]["inference_precision"] == "bf16"
    done = _run(_VALIDATE, tiny["bundle"], "--inference-precision", "bf16", "--out", tmp_path / "ort.json")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "inference_precision applies to the openvino runtime, not onnxruntime" in done.stderr


def test_openvino_missing_is_one_line_naming_the_extra(tiny, tmp_path):
    script = _VALIDATE.replace('sys.modules[blocked] = None\n', 'sys.modules[blocked] = None\nsys.modules["openvino"] = None\n', 1)
    done = _run(script, tiny["bundle"], "--runtime", "openvino", "--out", tmp_path / "r.json")
    assert done.returncode == 2 and not (tmp_path / "r.json").exists()
    assert done.stderr.startswith("validate_bundle: error: openvino is not installed") and ".[openvino]" in done.stderr
    assert done.stderr.count("\n") == 1


@needs_openvino
def test_openvino_device_that_does_not_exist_is_one_line(tiny, tmp_path):
    done = _run(_VALIDATE, tiny["bundle"], "--runtime", "openvino", "--providers", "TPU", "--out", tmp_path / "r.json")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "OpenVINO device 'TPU' is not available here: choose one of" in done.stderr
