"""The mixed-precision variant ships like any other: exported with each layer on its own grid (INT4
where <= 4 bits), matching its emulation in ONNX Runtime, gated, bundled and switchable."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from test_run_folder import config_file

from exporters.device.runtime import OnnxRuntimeRunner
from exporters.device.switch import PrecisionSwitcher
from exporters.onnx import ExportOptions, export_onnx
from exporters.quantize import QuantSpec, packed_weight_bytes, quantize_model, quantized_layers
from pipeline.cli import main


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()


@pytest.mark.parametrize("int4", [True, False])
def test_mixed_onnx_matches_its_emulation_with_optimisations_on_and_off(tmp_path, int4):
    model = _net()
    spec = QuantSpec(layer_bits={"0": 3, "3": 8, "7": 4})
    path = export_onnx(model, tmp_path / "m.onnx", spec, ExportOptions(int4_storage=int4), input_shape=(1, 10, 10))
    types = {t.name: t.data_type for t in onnx.load(path).graph.initializer if t.name.endswith("_quantized")}
    assert sorted(types.values()) == sorted([TensorProto.INT4 if int4 else TensorProto.INT8] * 2 + [TensorProto.INT8])
    x = torch.randn(6, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = quantize_model(model, spec)(x).numpy()
    for optimization in ("default", "disabled"):
        got = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization=optimization).predict(x.numpy())
        np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    # each layer on its own grid: the 3-bit layer has at most 7 levels a side
    q = quantize_model(model, spec)
    levels = {name: len(torch.unique(layer.weight[0])) for name, layer in quantized_layers(q)}
    assert levels["0"] <= 7 and packed_weight_bytes(model, spec) == (36 * 3 + 288 * 8 + 40 * 4 + 7) // 8


@pytest.mark.slow
def test_a_run_with_a_mixed_variant_gates_bundles_and_switches(trained, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    config = config_file(tmp_path, trained["data"], [8, 4], bundle=True,
                         mixed={"candidates": [8, 4, 3], "budget": {"average_bits": 5.0}, "batches": 1,
                                "hessian_samples": 2})
    assert main(["run", config, "--checkpoint", trained["checkpoint"], "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    mixed = next(v for v in report["variants"] if v["name"] == "mixed")
    assert mixed["consistent"] and mixed["average_bits"] <= 5.0 and set(mixed["layer_bits"].values()) <= {8, 4, 3}
    w8, w4 = (next(v for v in report["variants"] if v["name"] == n) for n in ("w8", "w4"))
    assert w4["packed_weight_bytes"] <= mixed["packed_weight_bytes"] <= w8["packed_weight_bytes"]
    assert "mixed" in (out / "report.md").read_text() and "avg" in (out / "report.md").read_text()
    assert main(["check", str(out / "report.json"), "--max-drop", "100", "--bits", "8"]) == 0
    capsys.readouterr()

    switcher = PrecisionSwitcher(out / "bundle", "onnxruntime", ["CPUExecutionProvider"])
    assert switcher.precisions == [None, 8, 4, "mixed"]
    with np.load(out / "bundle" / "test.npz") as data:
        x = data["x"][:8]
    switcher.set_precision("mixed")
    fresh = OnnxRuntimeRunner(out / "bundle" / "artifacts" / "mixed.onnx", ["CPUExecutionProvider"])
    np.testing.assert_array_equal(switcher.predict(x), fresh.predict(x))
