"""benchmarks/architecture_coverage.py without torchvision: its float-weight counter on hand-built
ONNX graphs and on a real export that leaves a bare Parameter float, its verdict by the tests'
tolerance policy, one row end to end on a tiny model, and its one-line exit when torchvision is absent."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from benchmarks import architecture_coverage as C
from exporters.onnx import export_onnx
from exporters.quantize import QuantSpec

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "architecture_coverage.py"


def _graph(nodes, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(a), name) for name, a in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


W = np.ones((4, 4), np.float32)
CODES = {"w_q": np.ones((4, 4), np.int8), "w_scale": np.float32(0.5)}


def test_counter_finds_float_weights_read_directly_or_through_layout_ops():
    proto = _graph([helper.make_node("MatMul", ["x", "w1"], ["a"]),
                    helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
                    helper.make_node("MatMul", ["a", "w2t"], ["b"]),
                    helper.make_node("Reshape", ["w3", "shape"], ["w3r"]),
                    helper.make_node("Gemm", ["b", "w3r"], ["c"]),
                    helper.make_node("MatMul", ["c", "w1"], ["y"])],  # w1 again: one matrix, counted once
                   {"w1": W, "w2": W, "w3": W.reshape(2, 8), "shape": np.array([4, 4], np.int64)})
    assert C.float_weight_matrices(proto) == ["w1", "w2", "w3"]


def test_counter_passes_dequantized_weights_activation_products_and_vectors():
    proto = _graph([helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]),
                    helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                    helper.make_node("MatMul", ["x", "wt"], ["a"]),
                    helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
                    helper.make_node("MatMul", ["a", "at"], ["b"]),  # two activations, e.g. Q @ K^T
                    helper.make_node("Unsqueeze", ["v", "axes"], ["v2"]),
                    helper.make_node("MatMul", ["b", "v2"], ["y"])],  # a 1-D initializer is no matrix
                   {**CODES, "v": np.ones(2, np.float32), "axes": np.array([1], np.int64)})
    assert C.float_weight_matrices(proto) == []


class BareParameter(nn.Module):
    """A Linear the quantizer knows, then a bare Parameter applied with F.linear, which it does not."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.proj = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return nn.functional.linear(torch.relu(self.fc(x.flatten(1))), self.proj)


def test_counter_finds_the_weight_an_export_left_float(tmp_path):
    path = export_onnx(BareParameter().eval(), tmp_path / "m.onnx", QuantSpec(bits=4), input_shape=(2, 2, 2))
    assert C.float_weight_matrices(onnx.load(path)) == ["proj"]


def test_judge_applies_the_float_tolerance_and_the_act_quantization_effect():
    rng = np.random.default_rng(0)
    emulation = rng.standard_normal((16, 10)).astype(np.float32) * 5
    assert C.judge(emulation * (1 + 1e-6), emulation) == "pass"
    assert C.judge(emulation + 1e-2, emulation).startswith("fail: ")
    plain = emulation + 0.2 * rng.standard_normal(emulation.shape)  # the A8 effect: Frobenius norm ~2.5
    assert C.judge(emulation + 0.01, emulation, plain) == "pass"
    assert C.judge(plain, emulation, plain).startswith("fail: runtime is")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("scheme", sorted(C.SCHEMES))
def test_a_tiny_model_deploys_fully_quantized_and_agrees(scheme, tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 8, 8), dtype=np.float32)
    batches = [torch.from_numpy(rng.standard_normal((4, 3, 8, 8), dtype=np.float32)) for _ in range(2)]
    spec, options = C.SCHEMES[scheme]
    row = C.run_scheme(Tiny().eval(), C.Row("tiny", scheme, 8), spec, options, x, batches, tmp_path)
    assert (row.exported, row.float_weights, row.verdict, row.errors) == ("yes", [], "pass", {})
    assert row.top1_agreement == 1.0 and row.agrees == "policy"
    assert row.forced_agrees is (True if spec.act_bits else None)
    assert 0 <= row.float32_error < 1e-5 and row.discriminates  # a tame model: float rounding moves it little


def test_float32_reach_compares_the_runtime_with_pytorchs_own_float32_error():
    rng = np.random.default_rng(0)
    exact = rng.standard_normal((64, 10)) * 5
    noise = lambda scale: exact + scale * rng.standard_normal(exact.shape)  # noqa: E731
    emulation, unquantized = noise(0.01), noise(1.0)
    row = C.Row("m", "W4", 8, verdict="fail: x", literal_verdict="fail: x")
    C.float32_reach(row, emulation, exact, unquantized, noise(0.015), noise(0.01))
    assert (row.agrees, row.discriminates) == ("float32 reach", True)
    C.float32_reach(row, emulation, exact, unquantized, noise(0.01), noise(0.05))  # the literal graph is off
    assert row.agrees == "no"
    C.float32_reach(row, emulation, exact, noise(0.02), noise(0.01), noise(0.01))  # an effect float32 error hides
    assert (row.agrees, row.discriminates) == ("no", False)
    row.forced_agrees = True  # an A8 row: forced codes tell what float32 reach cannot
    C.float32_reach(row, emulation, exact, noise(0.02), noise(0.01), noise(0.01))
    assert row.agrees == "float32 reach + forced codes"
    row.forced_agrees = False
    C.float32_reach(row, emulation, exact, noise(0.02), noise(0.01), noise(0.01))
    assert row.agrees == "no"
    row.verdict = row.literal_verdict = "pass"
    C.float32_reach(row, emulation, exact, unquantized, noise(0.05), noise(0.05))
    assert row.agrees == "policy"


def test_a_failing_stage_becomes_the_row_not_an_exception(tmp_path):
    spec, options = C.SCHEMES["W4"]
    x = np.zeros((2, 3, 8, 8), np.float32)  # a Tiny wants 3 channels: give the model 5 instead
    row = C.run_scheme(Tiny().eval(), C.Row("tiny", "W4", 8), spec, options, x[:, :1].repeat(5, 1), [], tmp_path)
    assert row.exported.startswith("emulate: RuntimeError: ") and row.float_weights is None


def test_without_torchvision_the_script_exits_2_with_one_line(tmp_path):
    blocked = ("import runpy, sys; sys.modules['torchvision'] = None; sys.argv = ['architecture_coverage.py']; "
               f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120,
                            cwd=SCRIPT.parents[1])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: torchvision does not import here (ModuleNotFoundError: ")
    assert result.stderr.count("\n") == 1 and result.stdout == ""
