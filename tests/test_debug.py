"""``hero debug``: layer-by-layer runtime against emulation, locating a corrupted layer in a copy
of an artifact; the ONNX node to module mapping; SQNR."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from exporters.onnx import ExportOptions, export_onnx
from exporters.calibrate import calibrate_activations
from exporters.quantize import QuantSpec, fake_quantize, quantized_layers
from hero_train.checkpoint import DataRef, Deployable, InputSpec, load_deployable
from hero_train.config import TrainConfig
from hero_train.models import ModelRef
from hero_train.train import train
from pipeline import debug, stages
from pipeline.cli import main

MODEL = "own_models:depthwise_cnn"
LAYERS = ["stem", "block.depthwise", "block.pointwise", "head"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_fashion_mnist

    root = tmp_path_factory.mktemp("debug")
    data = make_fashion_mnist(root / "fmnist", n_train=48, n_test=40)
    config = TrainConfig(model=MODEL, model_kwargs={"width": 4}, dataset="fashion-mnist", data_root=str(data),
                         epochs=1, batch_size=16, optimizer="sgd", lr=0.05, augment=False, seed=0)
    return train(config, root / "run"), data, root


def _loaded(checkpoint, data=None):
    return load_deployable(checkpoint, ModelRef.parse(MODEL, None), DataRef(root=None if data is None else str(data)))


@pytest.fixture(scope="module")
def artifact(trained):
    checkpoint, _, root = trained
    loaded = _loaded(checkpoint)
    options = ExportOptions(metadata={"hero.source_sha256": loaded.sha256, "hero.variant": "w4"})
    return export_onnx(loaded.model, root / "w4.onnx", QuantSpec(bits=4), options, input_shape=(1, 28, 28))


def corrupted_copy(path, tmp_path, initializer: str):
    """A copy of the artifact with one integer weight initializer negated (the original untouched)."""
    proto = onnx.load(str(path))
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.name == initializer:
            q = numpy_helper.to_array(tensor)
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array((-q).astype(q.dtype), tensor.name))
            break
    else:
        raise AssertionError(f"no initializer {initializer}")
    copy = tmp_path / "corrupt.onnx"
    onnx.save(proto, str(copy))
    return copy


def test_hero_debug_locates_a_corrupted_layer_in_a_copy_of_the_artifact(trained, artifact, tmp_path, capsys):
    checkpoint, data, _ = trained
    before = artifact.read_bytes()
    broken = corrupted_copy(artifact, tmp_path, "block.pointwise.weight_quantized")
    args = ["--checkpoint", str(checkpoint), "--model", MODEL, "--data-root", str(data), "--limit-test", "24"]
    assert main(["debug", str(broken), *args]) == 1
    result = json.loads((tmp_path / "corrupt.debug.json").read_text())
    assert [row["module"] for row in result["layers"]] == LAYERS and result["unmapped"] == []
    assert result["first_divergence"]["module"] == "block.pointwise"
    assert [row["consistent"] for row in result["layers"][:2]] == [True, True]
    assert "first divergence: block.pointwise" in capsys.readouterr().out
    out = tmp_path / "clean.json"
    assert main(["debug", str(artifact), *args, "--out", str(out)]) == 0
    clean = json.loads(out.read_text())
    assert clean["first_divergence"] is None and clean["samples"] == 24 and clean["variant"] == "w4"
    assert artifact.read_bytes() == before  # the instrumented graph is a copy
    # the emulation is the same on both runs, so its SQNR against float is too
    assert [r["sqnr_db"] for r in clean["layers"]] == pytest.approx([r["sqnr_db"] for r in result["layers"]])
    assert clean["layers"][2]["sqnr_runtime_db"] > result["layers"][2]["sqnr_runtime_db"] + 10


@pytest.mark.parametrize("layer", LAYERS)
def test_first_divergence_names_whichever_layer_was_corrupted(trained, artifact, tmp_path, layer):
    checkpoint, data, _ = trained
    loaded = _loaded(checkpoint, data)
    x, _ = stages.load_split(loaded, "test", 16)
    broken = corrupted_copy(artifact, tmp_path, f"{layer}.weight_quantized")
    found = debug.first_divergence(loaded, broken, x)
    assert found is not None and found["module"] == layer
    assert found["max_abs_diff"] > found["tolerance"]
    assert debug.first_divergence(loaded, artifact, x) is None


def test_matmul_layers_map_through_their_bias_add_and_w8a8_agrees(tmp_path):
    from own_models import tiny_attention

    torch.manual_seed(0)
    model = tiny_attention(dim=8).eval()
    x = np.random.default_rng(0).normal(size=(12, 3, 16, 16)).astype(np.float32)
    loaded = Deployable(model, ModelRef(factory="own_models:tiny_attention", kwargs={"dim": 8}),
                        InputSpec((3, 16, 16), (0.0,) * 3, (1.0,) * 3, tuple(str(i) for i in range(10))), DataRef(),
                        tmp_path / "none.pt", "0" * 64)
    spec = QuantSpec(bits=8, act_bits=8)
    calibration = calibrate_activations(model, [torch.from_numpy(x)], spec)
    path = export_onnx(model, tmp_path / "att.onnx", spec, calibration=calibration, input_shape=(3, 16, 16))
    result = debug.debug_artifact(loaded, path, x)
    rows = {row["module"]: row for row in result["layers"]}
    assert list(rows) == [name for name, _ in quantized_layers(model)]
    assert rows["q"]["op_type"] == "MatMul" and rows["head"]["op_type"] == "Gemm"
    assert all(row["sqnr_db"] is not None and row["sqnr_db"] > 20 for row in rows.values())
    # W8A8 agrees without counting on the absence of a rounding flip (tests/agreement.py): a flip adds
    # one step at one element, the quantization noise covers every element, so the runtime's error
    # against float stays within 3.5 dB of the emulation's (||r - e|| <= 0.5 ||e - f|| gives
    # ||r - f|| <= 1.5 ||e - f||, 20 log10 1.5 = 3.5 dB) at every layer.
    assert all(row["sqnr_runtime_db"] >= row["sqnr_db"] - 3.5 for row in rows.values()), rows
    broken = corrupted_copy(path, tmp_path, "k.weight_transposed_quantized")
    assert debug.first_divergence(loaded, broken, x)["module"] == "k"
    assert result["forced_codes"]["agrees"] and result["forced_codes"]["points"] >= 5
    assert not debug.debug_artifact(loaded, broken, x)["forced_codes"]["agrees"]
    assert "forced codes" in debug.debug_table(result) and debug.debug_table(result).count("\n") == len(rows) + 2


def test_float_graphs_map_weights_stored_under_exporter_names_by_value(tmp_path):
    from own_models import tiny_attention

    torch.manual_seed(1)
    model = tiny_attention(dim=8).eval()
    path = export_onnx(model, tmp_path / "float.onnx", QuantSpec(bits=None), input_shape=(3, 16, 16))
    proto = onnx.load(str(path))
    reads = {node.input[1] for node in proto.graph.node if node.op_type == "MatMul"}
    assert "q.weight_transposed" not in reads  # float MatMul weights are the exporter's folded "val_N"
    taps, unmapped = debug.layer_taps(proto, model)
    assert [t.module for t in taps] == [name for name, _ in quantized_layers(model)] and unmapped == []


def test_sqnr_of_uniform_quantization_is_about_six_db_per_bit():
    """A uniform signal on [-1, 1] on a grid of step Δ: noise Δ²/12 against power 1/3, so
    SQNR = 20·log10(2/Δ), about 6.02 dB per bit (Widrow & Kollár, Quantization Noise, Ch. 5)."""
    signal = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for bits in (4, 6, 8):
        quantized = fake_quantize(signal, bits, per_channel=False)
        noise = float(((quantized - signal).double() ** 2).sum())
        step = float(signal.abs().max()) / (2 ** (bits - 1) - 1)
        expected = 20 * np.log10(2 / step)
        assert debug.sqnr_db(float((signal.double() ** 2).sum()), noise) == pytest.approx(expected, abs=0.1)
    assert debug.sqnr_db(1.0, 0.0) is None


def test_debug_errors_are_one_line_hero_errors(trained, artifact, tmp_path, capsys):
    checkpoint, data, root = trained
    base = ["--checkpoint", str(checkpoint), "--model", MODEL, "--data-root", str(data)]
    assert main(["debug", str(tmp_path / "missing.onnx"), *base]) == 2
    assert main(["debug", str(artifact), *base, "--atol", "0"]) == 2
    assert main(["debug", str(artifact), *base, "--limit-test", "0"]) == 2
    other = tmp_path / "other.onnx"
    shutil.copy(artifact, other)
    proto = onnx.load(str(other))
    for prop in proto.metadata_props:
        if prop.key == "hero.source_sha256":
            prop.value = "f" * 64
    onnx.save(proto, str(other))
    assert main(["debug", str(other), *base]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hero: error:")]
    assert len(errors) == 4
    assert "does not exist" in errors[0] and "--atol" in errors[1] and "--limit-test" in errors[2]
    assert "another checkpoint" in errors[3]


def test_validation_names_the_first_diverging_layer_of_an_inconsistent_variant(trained, artifact, tmp_path, capsys):
    from exporters.device.files import sha256_file
    from pipeline.config import RuntimeSection, ValidateSection

    checkpoint, data, _ = trained
    loaded = _loaded(checkpoint, data)
    broken = corrupted_copy(artifact, tmp_path, "block.pointwise.weight_quantized")
    art = stages.Artifact(stages.Variant("w4", QuantSpec(bits=4)), broken, sha256_file(broken),
                          broken.stat().st_size, 0)
    rows = stages.validate_stage(loaded, [art], None, ValidateSection(latency_repeats=1), RuntimeSection(),
                                 stages.EvalSplit(loaded, 32), tmp_path)
    assert not rows[0]["consistent"] and rows[0]["first_divergence"]["module"] == "block.pointwise"
    assert "first diverging layer: block.pointwise" in capsys.readouterr().err
