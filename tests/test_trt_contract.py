"""The TensorRT engine contract and exporters.device.tensorrt's behaviour without TensorRT; runs anywhere."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporters.device import tensorrt as trt_module
from exporters.device.errors import HeroError
from exporters.device.trt_api import TRT_INSTALL_HINT
from exporters.device.trt_contract import (
    REBUILD_COMMAND,
    REBUILD_HINT,
    EngineConfig,
    batch_chunks,
    build_flags,
    check_network_precision,
    check_refit_weights,
    check_sidecar,
    pack_int4,
    profile_shapes,
    read_sidecar,
    tensorrt_major,
    unrefittable_changes,
    weight_digest,
)

REPO = Path(__file__).resolve().parents[1]
DEVICE = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.mark.parametrize("kwargs", [{"precision": "int4"}, {"precision": "fp16", "min_batch": 0},
                                    {"precision": "fp16", "opt_batch": 512}, {"precision": "fp32", "workspace_mb": 0}])
def test_engine_config_rejects_bad_values(kwargs):
    with pytest.raises(HeroError):
        EngineConfig(**kwargs)


def test_int8_builds_strongly_typed_without_precision_flags_on_both_majors():
    assert build_flags(EngineConfig("int8"), "10.16.1") == {
        "strongly_typed": True, "network": ["STRONGLY_TYPED"], "precision_from": "onnx types", "set": [], "clear": []}
    # TensorRT 11 ignores the deprecated STRONGLY_TYPED flag: every network is strongly typed.
    assert build_flags(EngineConfig("int8"), "11.4.0")["network"] == []


def test_fp16_is_a_builder_flag_on_10_and_the_onnx_types_on_11():
    ten, eleven = build_flags(EngineConfig("fp16"), "10.0.1"), build_flags(EngineConfig("fp16"), "11.4.0")
    assert (ten["strongly_typed"], ten["set"], ten["precision_from"]) == (False, ["FP16"], "builder flags")
    assert (eleven["strongly_typed"], eleven["set"], eleven["precision_from"]) == (True, [], "onnx types")


def test_fp32_clears_tf32_on_both_majors():
    assert build_flags(EngineConfig("fp32"), "10.16.1")["clear"] == ["TF32"]
    assert build_flags(EngineConfig("fp32"), "11.4.0")["clear"] == ["TF32"]


@pytest.mark.parametrize("version", ["9.2.0", "12.0.1", "nightly"])
def test_unsupported_tensorrt_versions_are_refused_with_the_pin(version):
    with pytest.raises(HeroError, match=re.escape("pip install 'tensorrt>=10,<12'")):
        tensorrt_major(version)


def test_refit_and_weight_stripping_flags():
    assert build_flags(EngineConfig("int8", refit=True))["set"] == ["REFIT"]
    assert build_flags(EngineConfig("int8", strip_weights=True))["set"] == ["STRIP_PLAN", "REFIT_IDENTICAL"]
    # REFIT_IDENTICAL with different weights is undefined behaviour, so a switchable stripped plan uses REFIT.
    assert build_flags(EngineConfig("int8", refit=True, strip_weights=True))["set"] == ["REFIT", "STRIP_PLAN"]


def test_refit_is_refused_on_tensorrt_11_3_but_refit_identical_is_not():
    with pytest.raises(HeroError, match="11.3.0 release notes"):
        build_flags(EngineConfig("int8", refit=True), "11.3.1")
    assert build_flags(EngineConfig("int8", strip_weights=True), "11.3.1")["set"] == ["STRIP_PLAN", "REFIT_IDENTICAL"]
    assert build_flags(EngineConfig("int8", refit=True), "11.4.0")["set"] == ["REFIT"]


def test_strongly_typed_network_must_have_the_types_its_precision_names():
    strong, weak = build_flags(EngineConfig("fp16"), "11.4.0"), build_flags(EngineConfig("fp16"), "10.16.1")
    check_network_precision("fp16", strong, {"FLOAT", "HALF"})
    check_network_precision("fp16", weak, {"FLOAT"})  # weak typing: BuilderFlag.FP16 decides
    with pytest.raises(HeroError, match=re.escape("ExportOptions(fp16=True)")):
        check_network_precision("fp16", strong, {"FLOAT"})
    with pytest.raises(HeroError, match="computes in float16"):
        check_network_precision("fp32", strong, {"FLOAT", "HALF"})
    with pytest.raises(HeroError, match="no Q/DQ layers"):
        check_network_precision("int8", build_flags(EngineConfig("int8"), "10.0.1"), {"FLOAT"})
    check_network_precision("int8", strong, {"FLOAT", "INT8"})


def test_profile_spans_the_dynamic_batch_axis_only():
    shapes = profile_shapes((-1, 3, 32, 32), EngineConfig("fp32", min_batch=1, opt_batch=8, max_batch=64))
    assert shapes == {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [64, 3, 32, 32]}


def test_profile_rejects_fixed_batch_and_dynamic_sample_dims():
    with pytest.raises(HeroError, match="dynamic batch axis"):
        profile_shapes((8, 3, 32, 32), EngineConfig("fp32"))
    with pytest.raises(HeroError, match="beyond the batch axis"):
        profile_shapes((-1, 3, -1, 32), EngineConfig("fp32"))


def test_batch_chunks_cover_every_row_in_order():
    assert batch_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert batch_chunks(0, 4) == []


def test_missing_or_corrupt_sidecar_tells_to_rebuild(tmp_path):
    engine = tmp_path / "model.engine"
    with pytest.raises(HeroError, match=re.escape(REBUILD_HINT)):
        read_sidecar(engine)
    (tmp_path / "model.engine.json").write_text("{not json")
    with pytest.raises(HeroError, match=re.escape(REBUILD_HINT)):
        read_sidecar(engine)


def test_sidecar_round_trips_and_matches_its_device(tmp_path):
    (tmp_path / "model.engine.json").write_text(json.dumps(DEVICE))
    check_sidecar(read_sidecar(tmp_path / "model.engine"), DEVICE)


@pytest.mark.parametrize("key, built", [("tensorrt_version", "10.0.1"), ("gpu_name", "Orin"), ("compute_capability", "8.7")])
def test_sidecar_mismatch_names_both_values_and_the_fix(key, built):
    with pytest.raises(HeroError) as info:
        check_sidecar({**DEVICE, key: built}, DEVICE)
    message = str(info.value)
    assert built in message and DEVICE[key] in message and REBUILD_HINT in message


CODES = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
PROTOTYPES = {"w": (12, "INT8"), "b": (3, "FLOAT"), "w4": (12, "INT4"), "h": (3, "HALF"), "bf": (3, "BF16")}
MANIFEST = {"w": {"shape": [3, 4], "dtype": "int8", "sha256": weight_digest(CODES)}}


@pytest.mark.parametrize("weights, match", [
    ({"w": np.zeros(5, np.int8)}, "5 elements"),
    ({"w": CODES.astype(np.float32)}, "float32 but the engine expects int8"),
    ({"b": np.ones(3)}, "float64 but the engine expects float32"),
    ({"h": np.ones(3, np.float32)}, "float32 but the engine expects float16"),
    ({"w": CODES.reshape(4, 3)}, "shape"),
    ({"conv.weight": CODES}, "no refittable weights"),
    ({"w4": CODES.astype(np.int32)}, "int32 but the engine stores it as INT4"),
    ({"w4": CODES * 2}, r"codes in \[-12, 10\]"),
    ({"bf": np.ones(3, np.float32)}, "as BF16, which has no numpy type"),
])
def test_refit_weights_must_match_engine_count_dtype_shape_and_names(weights, match):
    with pytest.raises(HeroError, match=match) as info:
        check_refit_weights(weights, PROTOTYPES, MANIFEST, identical_only=False)
    assert "\n" not in str(info.value)


def test_refit_weights_of_matching_layout_pass_even_when_values_change():
    check_refit_weights({"w": -CODES, "b": np.ones(3, np.float32), "h": np.ones(3, np.float16)}, PROTOTYPES,
                        MANIFEST, identical_only=False)


def test_refit_identical_engine_accepts_only_build_time_values():
    check_refit_weights({"w": CODES.copy()}, PROTOTYPES, MANIFEST, identical_only=True)
    with pytest.raises(HeroError, match="REFIT_IDENTICAL"):
        check_refit_weights({"w": -CODES}, PROTOTYPES, MANIFEST, identical_only=True)


def test_int4_prototype_takes_int8_codes_in_range_or_ml_dtypes_int4():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    check_refit_weights({"w4": CODES}, PROTOTYPES, None, identical_only=False)
    check_refit_weights({"w4": CODES.astype(ml_dtypes.int4)}, PROTOTYPES, None, identical_only=False)


def test_int4_packing_puts_the_first_code_in_the_low_nibble_like_onnx():
    from onnx import TensorProto, helper

    codes = np.array([1, -2, 3, -4, 5, -8, 7], np.int8)  # odd count: the last high nibble is padding
    onnx_int4 = helper.make_tensor("w", TensorProto.INT4, [codes.size], codes.tolist())
    onnx_bytes = bytes(onnx_int4.int32_data) if not onnx_int4.raw_data else onnx_int4.raw_data
    assert pack_int4(codes).tobytes() == onnx_bytes
    assert pack_int4(codes).tolist() == [0xE1, 0xC3, 0x85, 0x07]
    with pytest.raises(HeroError, match="holds \\[-8, 7\\]"):
        pack_int4(np.array([9], np.int8))


def test_changed_scales_the_engine_cannot_refit_are_reported():
    scale = np.full(3, 0.01, np.float32)
    manifest = {"scale": {"shape": [3], "dtype": "float32", "sha256": weight_digest(scale)}, **MANIFEST}
    assert unrefittable_changes({"w": -CODES, "scale": scale}, {"w"}, manifest) == []
    assert unrefittable_changes({"w": -CODES, "scale": 2 * scale}, {"w"}, manifest) == ["scale"]
    assert unrefittable_changes({"w": -CODES, "scale": 2 * scale}, {"w", "scale"}, manifest) == []
    assert unrefittable_changes({"scale": scale}, {"w"}, manifest) == ["w"]


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError


def test_available_reports_missing_tensorrt(no_tensorrt):
    ok, reason = trt_module.available()
    assert ok is False and reason == TRT_INSTALL_HINT


def test_tensorrt_calls_without_tensorrt_raise_the_install_hint(no_tensorrt, tmp_path):
    hint = r"pip install 'hero-deploy\[tensorrt\]' on an NVIDIA machine"
    with pytest.raises(HeroError, match=hint):
        trt_module.TensorRTRunner(tmp_path / "model.engine")
    with pytest.raises(HeroError, match=hint):
        trt_module.build_engine(tmp_path / "model.onnx", tmp_path / "model.engine", EngineConfig("int8"))
    with pytest.raises(HeroError, match=hint):
        trt_module.load_engine(tmp_path / "model.engine")


def test_modules_import_without_tensorrt_cuda_onnx_or_torch():
    code = (
        "import sys\n"
        "for name in ('tensorrt', 'cuda', 'onnx', 'torch'):\n"
        "    sys.modules[name] = None\n"
        "import exporters.device.tensorrt, exporters.device.trt_api, exporters.device.trt_contract\n"
        "import exporters.device.nested_grid\n"
        "print(exporters.device.tensorrt.available()[0])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_rebuild_hint_names_a_command_that_exists():
    from exporters.device.validate_bundle import _parser

    module, bundle, *options = REBUILD_COMMAND.removeprefix("python -m ").split()
    assert module == "exporters.device.validate_bundle" and REBUILD_COMMAND in REBUILD_HINT
    args = _parser().parse_args([bundle, *options])  # argparse exits (SystemExit) on an unknown option
    assert args.runtime == "tensorrt"
