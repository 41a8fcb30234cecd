"""benchmarks/switch_cost.py at a tiny size (ResNet18 at 32x32, 4 test images, one memory reading):
the bundle of five variants is written, both device reports come back from processes with torch
blocked, and the printout holds what the README quotes. About half a minute on 2 cores. It runs as
its own process, as users run it (OpenVINO is loaded there, never in the test process)."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_switch_cost_smoke_run_prints_costs_memory_and_openvino_accuracy(tmp_path):
    out = tmp_path / "switch_cost.json"
    done = subprocess.run([sys.executable, "benchmarks/switch_cost.py", "--image-size", "32", "--test-images", "4",
                           "--pool", "2", "--calibration-images", "4", "--latency-batch", "2", "--memory-repeats", "1",
                           "--out-dir", str(tmp_path / "run"), "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    ort = result["onnxruntime"]
    rows = [ort["baseline"], *ort["variants"]]
    assert [r["name"] for r in rows] == ["fp32", "w8", "w4", "w4a8", "w8a8"]
    assert ort["meta"]["role"] == "device" and ort["meta"]["cold_switch_latency"]["switches"] == 5
    assert ort["baseline"]["host_accuracy"] == 1.0  # the labels are FP32's own top-1 on the host
    assert all(r["costs"]["ready_ms"] > 0 for r in rows)
    # ORT runs the activation-quantized variants on integer kernels only, the others on float ones
    # (weight-only: folded to float weights): 20 Conv and the Gemm of ResNet18.
    ops = {r["name"]: (r["costs"]["ops"]["integer"], r["costs"]["ops"]["float"]) for r in rows}
    assert ops == {"fp32": (0, 21), "w8": (0, 21), "w4": (0, 21), "w4a8": (21, 0), "w8a8": (21, 0)}
    mib = {case: m["ready"] for case, m in result["resident_mib"].items()}
    # Five sessions hold more than the two most recent, and those more than one FP32 session alone.
    assert mib["all prepared"] > mib["resident=2"] > mib["one fp32 session"] > 0
    assert "| w8a8 |" in done.stdout and "resident memory, ORT" in done.stdout
    with_openvino = subprocess.run([sys.executable, "-c", "import openvino"], capture_output=True).returncode == 0
    assert (result["openvino"] is not None) == with_openvino
    if with_openvino:
        agreement = result["openvino_vs_onnxruntime"]
        assert set(agreement) == set(ops) and agreement["fp32"]["relative_error"] < 1e-4
    assert ("OpenVINO (device) vs ONNX Runtime (host) accuracy" in done.stdout) == with_openvino
