"""benchmarks/runtime_speed.py and benchmarks/imagenet_models.py: the ImageNet-layout models, our
W8A8 export of them running as integer kernels in ONNX Runtime, and the benchmark's small pieces
(no timing; the end-to-end smoke run is marked slow)."""

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from torch import nn

from benchmarks import imagenet_models as I
from benchmarks import runtime_speed as R
from exporters.calibrate import calibrate_activations
from exporters.kernels import kernel_summary
from exporters.onnx import export_onnx
from exporters.quantize import QuantSpec, quantized_layers

# torchvision's resnet18 and mobilenet_v2 at 1000 classes (its model table's "Params" column).
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "mobilenetv2": 3_504_872}


@pytest.mark.parametrize("name", sorted(I.MODELS))
def test_imagenet_models_have_torchvisions_parameter_counts_and_run_at_64(name):
    model = I.build(name)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETERS[name]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, I.NUM_CLASSES)


def test_settled_batchnorm_has_statistics_folding_must_use():
    model = I.settle_batchnorm(I.build("resnet18"), image_size=64)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not model.training and all(n.momentum == 0.1 for n in norms)
    for norm in norms:
        assert norm.running_mean.abs().max() > 1e-3 and (norm.running_var - 1).abs().max() > 1e-2
        assert norm.weight.std() > 0.1
    with torch.no_grad():  # eval-mode statistics keep the logits at a sane scale
        logits = model(torch.randn(4, 3, 64, 64))
    assert torch.isfinite(logits).all() and 1e-2 < logits.std() < 1e2


def test_mobilenetv2_blocks_follow_the_table():
    model = I.build("mobilenetv2")
    blocks = [m for m in model.modules() if isinstance(m, I.InvertedResidual)]
    assert len(blocks) == sum(n for _, _, n, _ in I.MOBILENETV2_STAGES) == 17
    assert sum(b.adds_input for b in blocks) == 1 + 2 + 3 + 2 + 2  # the later blocks of the stages with n > 1
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 2 + 2 * 17 - 1  # stem, 1x1 to 1280; t=1: no expansion


@pytest.mark.parametrize("name", sorted(I.MODELS))
def test_our_w8a8_of_an_imagenet_model_runs_every_weight_op_as_an_integer_kernel(name, tmp_path):
    model = I.settle_batchnorm(I.build(name), image_size=64)
    spec = QuantSpec(bits=8, act_bits=8)
    calibration = calibrate_activations(model, [torch.randn(4, 3, 64, 64)], spec)
    path = export_onnx(model, tmp_path / "w8a8.onnx", spec, calibration=calibration, input_shape=(3, 64, 64))
    summary = kernel_summary(path, R.CPU)
    assert summary["integer_ops"] == len(quantized_layers(model)) and summary["float_weight_ops"] == 0
    assert summary["unfused"] == []


def test_unfused_counts_only_for_artifacts_laid_out_for_integer_kernels():
    summary = {"integer_ops": 0, "float_weight_ops": 1, "unfused": ["node_linear"]}
    assert R.unfused(R.Method("ort", "w8"), summary) == []
    assert R.unfused(R.Method("ort", "w8a8"), summary) == ["node_linear"]
    assert R.unfused(R.Method("ort", R.PEER), summary) == ["node_linear"]


def test_methods_cover_every_artifact_in_ort_and_the_int8_ones_in_openvino():
    names = [m.name for m in R.methods(with_openvino=True)]
    assert names[0] == R.REFERENCE and len(names) == len(set(names)) == len(R.OURS) + 1 + len(R.OPENVINO_ARTIFACTS)
    assert [m.runtime for m in R.methods(with_openvino=False)] == ["ort"] * (len(R.OURS) + 1)


def test_openvino_rows_are_skipped_with_the_reason_when_it_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    assert "pip install openvino" in R.openvino_missing()


def test_thread_counts_option():
    assert R._thread_counts(None, None, "1,2") == (1, 2)
    for bad in ("0", "1,x", ""):
        with pytest.raises(click.BadParameter):
            R._thread_counts(None, None, bad)


@pytest.mark.slow
def test_quick_run_reports_every_method(tmp_path):
    """The --quick smoke run on MobileNetV2 (64x64, one thread): every method in the table and the
    JSON, our W8A8 and the peer fully integer in ORT. About a minute on 2 cores. It runs as its own
    process, as users run it: OpenVINO's runtime threads must not live on in the test process (one
    run of the suite that had loaded it died at exit with a segmentation fault)."""
    out = tmp_path / "speed.json"
    script = Path(R.__file__)
    result = subprocess.run([sys.executable, str(script), "--quick", "--model", "mobilenetv2", "--threads", "1",
                             "--json", str(out)], capture_output=True, text=True, timeout=600,
                            cwd=script.parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    with_openvino = subprocess.run([sys.executable, "-c", "import openvino"], capture_output=True).returncode == 0
    (model,) = json.loads(out.read_text())["results"]
    names = [m.name for m in R.methods(with_openvino)]
    assert set(model["checks"]) == set(model["rss_mib"]) == set(names)
    assert all(set(rss) == {"weights", "first_run"} for rss in model["rss_mib"].values())
    assert set(model["throughput"]["1 thread(s)"]) == {f"{n} b1" for n in names}
    for name in ("ort w8a8", "ort w4a8", f"ort {R.PEER}"):
        assert model["kernels"][name]["float_weight_ops"] == 0, name
        assert model["checks"][name]["rel_error_vs_literal"] < model["checks"][name]["rel_error_vs_fp32"]
    assert all(f"| {n} |" in result.stdout for n in names)
