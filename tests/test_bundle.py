"""pipeline.bundle: the bundle's files and manifest, its test data, refit groups, rebuilds, `hero bundle`."""

import dataclasses
import json
import shutil
import stat

import numpy as np
import onnx
import pytest
from bundle_helpers import CPU, TEST_SAMPLES, built_bundle
from onnx import TensorProto, helper, numpy_helper

from exporters.device.errors import HeroError
from exporters.device.files import sha256_file
from exporters.device.runtime import OnnxRuntimeRunner
from pipeline import stages
from hero_train.checkpoint import save_checkpoint
from hero_train.models import build_model
from pipeline.bundle import refit_group, write_bundle
from pipeline.cli import main as hero
from pipeline.report import build_report


@pytest.fixture
def tiny(tmp_path_factory):
    return built_bundle(tmp_path_factory)


def _paths(tiny):
    return {a.variant.name: a.path for a in tiny["artifacts"]}


def test_manifest_lists_every_variant_with_checksums_and_host_accuracy(tiny):
    bundle = tiny["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (manifest["format"], manifest["format_version"]) == ("hero-deploy-bundle", 1)
    assert (manifest["model"], manifest["dataset"], manifest["num_classes"]) == ("bundle_helpers:tiny_conv", "fashion-mnist", 10)
    assert manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["input_shape"] == [1, 28, 28] and manifest["normalization"]["std"] == [0.3530]
    assert manifest["source_sha256"] == tiny["loaded"].sha256
    with np.load(bundle / "test.npz") as data:
        x, y = data["x"], data["y"]
    for entry, row, artifact in zip(manifest["variants"], tiny["rows"], tiny["artifacts"], strict=True):
        assert {k: entry[k] for k in ("name", "bits", "symmetric", "per_channel", "act_bits", "runtime")} == \
               {k: row[k] for k in ("name", "bits", "symmetric", "per_channel", "act_bits", "runtime")}
        path = bundle / entry["artifact"]
        assert entry["sha256"] == sha256_file(path) == artifact.sha256
        assert entry["file_bytes"] == path.stat().st_size
        assert entry["report_accuracy"] == row["runtime_accuracy"]
        assert entry["torch_accuracy"] == row["torch_accuracy"]
        pred = OnnxRuntimeRunner(path, CPU).predict(x).argmax(1)
        assert entry["host_accuracy"] == pytest.approx(np.mean(pred == y))
    assert [v["artifact"] for v in manifest["variants"]] == ["artifacts/fp32.onnx", "artifacts/w8.onnx",
                                                             "artifacts/w4.onnx"]
    host = json.loads((bundle / "host_report.json").read_text())
    assert host["meta"]["role"] == "host" and [v["name"] for v in host["variants"]] == ["w8", "w4"]


def test_test_data_is_the_first_preprocessed_test_samples(tiny):
    manifest = json.loads((tiny["bundle"] / "manifest.json").read_text())
    x_ref, y_ref = stages.load_split(tiny["loaded"], "test", TEST_SAMPLES)
    with np.load(tiny["bundle"] / "test.npz") as data:
        assert data["x"].dtype == np.float32 and data["y"].dtype == np.int64
        np.testing.assert_array_equal(data["x"], x_ref)
        np.testing.assert_array_equal(data["y"], y_ref)
    assert manifest["test_data"] == {"path": "test.npz", "sha256": sha256_file(tiny["bundle"] / "test.npz"),
                                     "samples": TEST_SAMPLES}


def _dq_conv(path, weight_codes, scale, bias=0.0):
    """input -> Conv(W = DequantizeLinear(codes, scale), bias) as an ONNX file."""
    inits = [numpy_helper.from_array(np.asarray(weight_codes, np.int8).reshape(1, 1, 2, 2), "w_q"),
             numpy_helper.from_array(np.float32(scale), "w_scale"),
             numpy_helper.from_array(np.array([bias], np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]),
         helper.make_node("Conv", ["input", "w", "b"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 3, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, 2, 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_refit_group_ignores_weight_values_but_not_scales(tmp_path):
    base = refit_group(_dq_conv(tmp_path / "a.onnx", [1, 2, 3, 4], 0.1))
    assert refit_group(_dq_conv(tmp_path / "b.onnx", [4, -3, 2, 1], 0.1, bias=2.0)) == base
    assert refit_group(_dq_conv(tmp_path / "c.onnx", [1, 2, 3, 4], 0.2)) != base


def test_unchanged_rebuild_is_skipped_and_a_changed_one_replaces_the_bundle(tiny, tmp_path):
    options = dataclasses.replace(tiny["options"], test_samples=10, latency_batch=4)
    paths = {a.variant.name: a.path for a in tiny["artifacts"]}
    out = tmp_path / "bundle"
    assert write_bundle(tiny["loaded"], tiny["rows"], paths, out, options) == out
    stamp = (out / "manifest.json").stat().st_mtime_ns
    (out / "stale.onnx").write_bytes(b"left over")
    write_bundle(tiny["loaded"], tiny["rows"], paths, out, options)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # same inputs: nothing rewritten

    write_bundle(tiny["loaded"], tiny["rows"], paths, out, dataclasses.replace(options, test_samples=6))
    assert json.loads((out / "manifest.json").read_text())["test_data"]["samples"] == 6
    assert not (out / "stale.onnx").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # readable by the device's user
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary folders left behind


def test_folder_that_is_not_a_bundle_is_left_alone(tiny, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(HeroError, match="not a bundle"):
        write_bundle(tiny["loaded"], tiny["rows"], _paths(tiny), out, tiny["options"])
    assert (out / "notes.txt").read_text() == "keep me"


def test_bundle_needs_exactly_one_float_variant(tiny, tmp_path):
    rows = [r for r in tiny["rows"] if r["bits"] is not None]
    with pytest.raises(HeroError, match="exactly one float variant"):
        write_bundle(tiny["loaded"], rows, _paths(tiny), tmp_path / "b", tiny["options"])


def test_missing_artifact_file_is_refused(tiny, tmp_path):
    paths = dict(_paths(tiny), w4=tmp_path / "gone.onnx")
    with pytest.raises(HeroError, match=r"no artifact file for variants \['w4'\]"):
        write_bundle(tiny["loaded"], tiny["rows"], paths, tmp_path / "b", tiny["options"])


def test_artifact_changed_after_validation_is_refused(tiny, tmp_path):
    paths = _paths(tiny)
    paths["w8"] = tmp_path / "w8.onnx"
    shutil.copyfile(tiny["artifacts"][2].path, paths["w8"])  # the w4 file in w8's place
    with pytest.raises(HeroError, match="changed after it was validated"):
        write_bundle(tiny["loaded"], tiny["rows"], paths, tmp_path / "b", tiny["options"])
    assert not (tmp_path / "b").exists()


def _finished_run(tiny, tmp_path, recorded_sha256=None):
    """A run folder as `hero run` leaves it, with a real (untrained ResNet20) checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(tiny["artifacts"][0].path.parent, run / "artifacts")
    checkpoint = save_checkpoint({
        "model": {"name": "resnet20", "num_classes": 10, "in_channels": 1}, "input_shape": [1, 28, 28],
        "dataset": "fashion-mnist", "config": {},
        "normalization": {"mean": list(tiny["loaded"].input.mean), "std": list(tiny["loaded"].input.std)},
        "epoch": 0, "state_dict": build_model("resnet20", num_classes=10, in_channels=1).state_dict(),
    }, run / "train" / "checkpoint.pt")
    rows = [dict(r, file_bytes=1, packed_weight_bytes=0) for r in tiny["rows"]]
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": recorded_sha256 or sha256_file(checkpoint)}
    (run / "report.json").write_text(json.dumps(build_report(rows, meta)))
    return run


def test_bundle_command_bundles_a_finished_run(tiny, tmp_path, capsys):
    run = _finished_run(tiny, tmp_path)
    code = hero(["bundle", str(run), "--test-samples", "8", "--data-root", tiny["loaded"].data.root,
                 "--providers", CPU[0]])
    assert code == 0
    assert "host_report.json --max-regression" in capsys.readouterr().out
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["test_data"]["samples"] == 8 and len(manifest["variants"]) == 3
    assert manifest["model"] == "resnet20" and manifest["source_sha256"] == sha256_file(run / "train" / "checkpoint.pt")


def test_bundle_command_refuses_another_checkpoint(tiny, tmp_path, capsys):
    run = _finished_run(tiny, tmp_path, recorded_sha256="0" * 64)
    assert hero(["bundle", str(run), "--data-root", tiny["loaded"].data.root]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    assert not (run / "bundle").exists()
