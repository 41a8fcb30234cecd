"""The ONNX Runtime runner: runs without torch, batches, casts, and turns bad input into HeroError."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.device.errors import HeroError
from exporters.device.runtime import OnnxRuntimeRunner, evaluate_accuracy, median_ms, time_batches, top1

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU = ["CPUExecutionProvider"]
FLOAT_QUANTIZATION = json.dumps({
    "spec": {"bits": None, "symmetric": True, "per_channel": True, "bn": "fold-first", "grid": "canonical",
             "layer_bits": None, "act_bits": None, "act_method": "max", "act_percentile": 99.99,
             "act_layout": "onnxruntime", "block_size": None},
    "act_scales": None, "act_zero_points": None, "weight_storage": "float32", "matmul_nbits": False,
    "tool_version": "test"})

_PREDICT_WITHOUT_TORCH = """
import sys
for blocked in ("torch", "hero_train", "pipeline"):
    sys.modules[blocked] = None  # any import of these now raises ImportError
import numpy as np
from exporters.device.runtime import OnnxRuntimeRunner
runner = OnnxRuntimeRunner(sys.argv[1], ["CPUExecutionProvider"])
np.save(sys.argv[3], runner.predict(np.load(sys.argv[2])))
print(runner.weight_dequant)
"""


def _linear_model(path: Path, weight: np.ndarray, elem_type=TensorProto.FLOAT) -> Path:
    """logits = input @ weight.T as a one-Gemm ONNX file with a dynamic batch."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "weight"], ["product"], transB=1),
         helper.make_node("Cast", ["product"], ["logits"], to=TensorProto.FLOAT)], "linear",
        [helper.make_tensor_value_info("input", elem_type, ["batch", weight.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [numpy_helper.from_array(weight.astype(dtype), "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.metadata_props.add(key="hero.quantization", value=FLOAT_QUANTIZATION)
    onnx.save(model, path)
    return path


@pytest.fixture
def weight():
    return np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)


@pytest.fixture
def linear_path(tmp_path, weight):
    return _linear_model(tmp_path / "linear.onnx", weight)


def test_runtime_folds_and_predicts_an_exported_model_with_torch_unimportable(tmp_path):
    torch = pytest.importorskip("torch")
    from exporters.onnx import export_onnx
    from exporters.quantize import QuantSpec, quantize_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2)).eval()
    images = torch.randn(3, 1, 6, 6)
    path = export_onnx(model, tmp_path / "m.onnx", QuantSpec(bits=8), input_shape=(1, 6, 6))
    np.save(tmp_path / "x.npy", images.numpy())
    done = subprocess.run([sys.executable, "-c", _PREDICT_WITHOUT_TORCH, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], cwd=REPO_ROOT, check=True, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "folded"  # the exporter's hero.quantization metadata turns weight folding on
    expected = quantize_model(model, QuantSpec(bits=8))(images).detach().numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=0, atol=1e-5)


def test_predict_in_chunks_equals_one_batch_and_casts_input(linear_path, weight):
    runner = OnnxRuntimeRunner(linear_path, CPU)
    x = np.random.default_rng(1).standard_normal((7, 4))  # float64: the runner casts it
    chunked = runner.predict(x, batch_size=3)
    assert chunked.dtype == np.float32 and chunked.shape == (7, 3)
    np.testing.assert_array_equal(chunked, runner.predict(x))
    np.testing.assert_allclose(chunked, x @ weight.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_float16_input_model_gets_float16_input(tmp_path, weight):
    runner = OnnxRuntimeRunner(_linear_model(tmp_path / "half.onnx", weight, TensorProto.FLOAT16), CPU)
    x = np.ones((2, 4), dtype=np.float32)
    assert runner.input_dtype == np.float16
    np.testing.assert_allclose(runner.predict(x), np.tile(weight.sum(1), (2, 1)), rtol=0, atol=1e-2)


@pytest.mark.parametrize("optimization", ["default", "disabled"])
def test_runner_reports_input_and_metadata(linear_path, optimization):
    runner = OnnxRuntimeRunner(linear_path, CPU, optimization=optimization, intra_op_threads=1)
    assert (runner.input_name, runner.input_shape) == ("input", (4,))
    assert runner.metadata == {"hero.quantization": FLOAT_QUANTIZATION}
    assert runner.providers == CPU


def test_default_providers_end_with_cpu(linear_path):
    runner = OnnxRuntimeRunner(linear_path)
    assert runner.providers[-1] == "CPUExecutionProvider" and "AzureExecutionProvider" not in runner.providers


def test_evaluate_accuracy_counts_argmax_hits(linear_path):
    runner = OnnxRuntimeRunner(linear_path, CPU)
    images = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    labels = runner.predict(images).argmax(1)
    labels[:2] = (labels[:2] + 1) % 3  # two wrong labels out of five
    accuracy, logits = evaluate_accuracy(runner, images, labels, batch_size=2)
    assert accuracy == pytest.approx(0.6) and logits.shape == (5, 3)


class _Sleeper:
    """Sleeps the next of `seconds` on each call and records what it was given."""

    def __init__(self, seconds):
        self.seconds, self.calls = list(seconds), []

    def __call__(self, x=None):
        self.calls.append(x)
        time.sleep(self.seconds[len(self.calls) - 1])

    predict = __call__


def test_median_ms_is_the_median_of_the_timed_calls_after_the_warmup():
    # the warm-up is instant and the mean of the timed calls (148 ms) is far from their median (40 ms):
    # timing the warm-up too gives 22.5 ms, the mean 148 ms, seconds 0.04
    sleeper = _Sleeper([0.0, 0.005, 0.040, 0.400])
    latency = median_ms(sleeper, repeats=3)
    assert len(sleeper.calls) == 4
    assert 40 <= latency < 140


def test_median_ms_runs_the_asked_warmup_calls_untimed():
    sleeper = _Sleeper([0.1, 0.1, 0.0, 0.0, 0.1])  # timing the warm-ups too would give a 100 ms median
    assert median_ms(sleeper, repeats=3, warmup=2) < 50 and len(sleeper.calls) == 5


def test_time_batches_times_predict_on_the_given_batch_after_one_warmup():
    x = np.zeros((4, 4), np.float32)
    runner = _Sleeper([0.0, 0.005, 0.040, 0.400])
    assert 40 <= time_batches(runner, x, repeats=3) < 140
    assert len(runner.calls) == 4 and all(c is x for c in runner.calls)


@pytest.mark.parametrize("repeats, warmup", [(0, 1), (1, -1)])
def test_bad_timer_counts_raise_hero_error(repeats, warmup):
    with pytest.raises(HeroError, match="repeats must be >= 1 and warmup >= 0"):
        median_ms(lambda: None, repeats, warmup)


def test_top1_is_accuracy_against_labels_and_agreement_against_a_reference():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [4.0, 0.0, 1.0]])
    assert top1(logits, np.array([0, 1, 0, 2])) == 0.5
    reference = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert top1(logits, reference.argmax(1)) == 0.75
    assert top1(logits, logits.argmax(1)) == 1.0


def test_top1_refuses_labels_that_do_not_match_the_rows():
    with pytest.raises(HeroError, match="got 2 predictions but labels of shape \\(2, 1\\): pass one label per image"):
        top1(np.eye(2), np.array([[0], [1]]))  # would broadcast to a 2x2 comparison


def test_corrupt_model_file_raises_hero_error(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07not a protobuf\xff\xff")
    with pytest.raises(HeroError, match="cannot load"):
        OnnxRuntimeRunner(path, CPU)


def test_missing_model_file_raises_hero_error(tmp_path):
    with pytest.raises(HeroError, match="does not exist"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx", CPU)


@pytest.mark.parametrize("kwargs, message", [
    (dict(providers=["NoSuchExecutionProvider"]), "not available"),
    (dict(optimization="aggressive"), "unknown optimization"),
])
def test_bad_runner_options_raise_hero_error(linear_path, kwargs, message):
    with pytest.raises(HeroError, match=message):
        OnnxRuntimeRunner(linear_path, **kwargs)


@pytest.mark.parametrize("x, message", [
    (np.zeros((2, 5), np.float32), "does not fit"),
    (np.zeros((0, 4), np.float32), "at least one sample"),
])
def test_bad_predict_input_raises_hero_error(linear_path, x, message):
    with pytest.raises(HeroError, match=message):
        OnnxRuntimeRunner(linear_path, CPU).predict(x)


def test_labels_of_wrong_length_raise_hero_error(linear_path):
    with pytest.raises(HeroError, match="one label per image"):
        evaluate_accuracy(OnnxRuntimeRunner(linear_path, CPU), np.zeros((3, 4), np.float32), np.zeros(2))


def test_providers_this_build_lacks_are_skipped_in_order(linear_path):
    runner = OnnxRuntimeRunner(linear_path, providers=["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                       "CPUExecutionProvider"])
    expected = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
                if p in onnxruntime.get_available_providers()]
    assert runner.providers == expected and runner.providers[-1] == "CPUExecutionProvider"
