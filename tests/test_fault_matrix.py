"""The fault matrix across commands (with tests/test_faults.py, test_run_folder.py and test_gate.py):
every case is exit 2, exactly one error line on stderr, no traceback, and every file that existed
before is unchanged. Host: hero quantize/export/validate/bundle/analyze/check/train/run. Device:
python -m exporters.device.validate_bundle and PrecisionSwitcher, on manifests damaged by type,
range and shape."""

import json
import os
import subprocess
import sys

import onnx
import pytest
import torch
from bundle_helpers import built_bundle, copy_bundle
from onnx.external_data_helper import convert_model_to_external_data
from conftest import one_error, snapshot

from exporters.device.errors import HeroError
from exporters.device.files import sha256_file
from exporters.device.switch import PrecisionSwitcher
from exporters.device.validate_bundle import main as validate_main
from hero_train.checkpoint import save_checkpoint
from pipeline.cli import main

CPU = ["CPUExecutionProvider"]


def host_case(trained, tmp_path, args):
    """Fill the placeholders of a case's arguments."""
    (tmp_path / "folder").mkdir(exist_ok=True)
    (tmp_path / "not_onnx.onnx").write_text("plain text")
    (tmp_path / "report.json").write_text(json.dumps({"meta": {}, "baseline": {"reference_accuracy": 0.5},
                                                      "variants": []}))
    values = {"CKPT": trained["checkpoint"], "DATA": trained["data"], "TMP": str(tmp_path)}
    return [a.format(**values) for a in args]


HOST_CASES = {
    "quantize_bits_1": (["quantize", "{CKPT}", "--bits", "1", "--data-root", "{DATA}"], "unsupported bit width 1"),
    "quantize_reversed_range": (["quantize", "{CKPT}", "--bits", "8-2", "--data-root", "{DATA}"], "reversed"),
    "quantize_repeated_bits": (["quantize", "{CKPT}", "--bits", "4,4", "--data-root", "{DATA}"], "4"),
    "quantize_limit_test_0": (["quantize", "{CKPT}", "--limit-test", "0", "--data-root", "{DATA}"], "--limit-test"),
    "quantize_checkpoint_is_a_folder": (["quantize", "{TMP}/folder", "--data-root", "{DATA}"], "is a folder"),
    "quantize_missing_checkpoint": (["quantize", "{TMP}/none.pt", "--data-root", "{DATA}"], "does not exist"),
    "export_out_is_a_folder": (["export", "{CKPT}", "--out", "{TMP}/folder", "--data-root", "{DATA}"], "is a folder"),
    "export_bits_1": (["export", "{CKPT}", "--out", "{TMP}/x.onnx", "--bits", "1", "--data-root", "{DATA}"],
                      "unsupported bit width"),
    "export_act_bits_4": (["export", "{CKPT}", "--out", "{TMP}/x.onnx", "--bits", "4", "--act-bits", "4",
                           "--data-root", "{DATA}"], "act_bits"),
    "validate_not_onnx": (["validate", "{TMP}/not_onnx.onnx", "--checkpoint", "{CKPT}", "--data-root", "{DATA}"],
                          "not_onnx.onnx"),
    "validate_missing_artifact": (["validate", "{TMP}/none.onnx", "--checkpoint", "{CKPT}", "--data-root", "{DATA}"],
                                  "none.onnx"),
    "bundle_no_report": (["bundle", "{TMP}/folder"], "report"),
    "analyze_batches_0": (["analyze", "{CKPT}", "--batches", "0", "--data-root", "{DATA}"], "--batches"),
    "analyze_loss_increase_negative": (["analyze", "{CKPT}", "--loss-increase", "-1", "--data-root", "{DATA}"],
                                       "--loss-increase"),
    "check_no_variants": (["check", "{TMP}/report.json", "--max-drop", "1"], "no variants"),
    "check_nan_threshold": (["check", "{TMP}/report.json", "--max-drop", "nan"], "nan"),
    "train_batch_size_0": (["train", "--batch-size", "0", "--out", "{TMP}/t", "--data-root", "{DATA}"],
                           "batch size"),
    "train_out_is_a_file": (["train", "--epochs", "1", "--out", "{TMP}/not_onnx.onnx", "--data-root", "{DATA}",
                             "--optimizer", "sgd", "--limit-train", "32", "--limit-test", "16"], "is a file"),
    "train_unknown_optimizer": (["train", "--optimizer", "adamw", "--out", "{TMP}/t"], "adamw"),
    "run_missing_config": (["run", "{TMP}/none.yaml"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(HOST_CASES))
def test_host_command_fault_is_one_line_and_exit_2(trained, tmp_path, capsys, case):  # noqa: F811
    args, needle = HOST_CASES[case]
    args = host_case(trained, tmp_path, args)
    before = snapshot(tmp_path, trained["data"])
    assert main(args) == 2
    one_error(capsys, needle)
    assert snapshot(tmp_path, trained["data"]) == before


def test_quantize_checks_bits_before_printing_any_row(trained, tmp_path, capsys):  # noqa: F811
    assert main(["quantize", trained["checkpoint"], "--bits", "4,1", "--data-root", trained["data"]]) == 2
    assert capsys.readouterr().out == ""


def test_checkpoint_whose_input_shape_disagrees_with_its_model_is_refused(trained, tmp_path, capsys):  # noqa: F811
    ckpt = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)
    ckpt["input_shape"] = [3, 28, 28]  # the model takes 1 channel
    bad = save_checkpoint(ckpt, tmp_path / "bad.pt")
    before = snapshot(tmp_path)
    assert main(["quantize", str(bad), "--bits", "8", "--data-root", trained["data"]]) == 2
    one_error(capsys, "3 channels but the model takes 1")
    del ckpt["normalization"]
    save_checkpoint(ckpt, tmp_path / "bad2.pt")
    assert main(["export", str(tmp_path / "bad2.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    one_error(capsys, "metadata is damaged")
    assert snapshot(tmp_path) == {**before, **{k: v for k, v in snapshot(tmp_path).items() if "bad2" in k}}


# --- the device side ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return built_bundle(tmp_path_factory)["bundle"]


def _edit(manifest: dict, path: str, value) -> dict:
    """Set (or, with value=KeyError, delete) the dotted `path` ('variants.1.bits') of the manifest."""
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is KeyError:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return manifest


MANIFEST_CASES = {
    "bits_as_string": ("variants.1.bits", "8", "variants[1].bits"),
    "bits_as_list": ("variants.1.bits", [8], "variants[1].bits"),
    "bits_unsupported": ("variants.1.bits", 1, "variants[1].bits"),
    "bits_bool": ("variants.1.bits", True, "variants[1].bits"),
    "negative_file_bytes": ("variants.1.file_bytes", -1, "file_bytes"),
    "unknown_variant_key": ("variants.1.shell", "rm -rf /", "unknown keys 'shell'"),
    "unknown_top_key": ("extra", 1, "unknown keys 'extra'"),
    "symmetric_as_string": ("variants.1.symmetric", "yes", "symmetric"),
    "act_bits_4": ("variants.1.act_bits", 4, "act_bits"),
    "sha256_not_hex": ("variants.1.sha256", "z" * 64, "sha256"),
    "accuracy_above_one": ("variants.1.torch_accuracy", 1.5, "torch_accuracy"),
    "zero_input_shape": ("input_shape", [0, 28, 28], "input_shape"),
    "samples_as_text": ("test_data.samples", "many", "test_data.samples"),
    "variant_missing_artifact": ("variants.1.artifact", KeyError, "lacks artifact"),
    "no_variants": ("variants", [], "variants"),
    "format_version_2": ("format_version", 2, "format version 2"),
    "artifact_outside_bundle": ("variants.1.artifact", "../../etc/passwd", "not a relative path inside"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_damaged_manifest_is_one_line_and_exit_2_on_the_device(bundle, tmp_path, capsys, case):
    path, value, needle = MANIFEST_CASES[case]
    copy = copy_bundle(bundle, tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(_edit(manifest, path, value)))
    before = snapshot(tmp_path)
    assert validate_main([str(copy), "--out", str(tmp_path / "r.json"), "--providers", CPU[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("validate_bundle: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert snapshot(tmp_path) == before  # no report written, nothing changed
    with pytest.raises(HeroError, match=needle.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        PrecisionSwitcher(copy, "onnxruntime", CPU)


def test_manifest_nested_past_any_schema_is_refused_without_recursion_error(bundle, tmp_path, capsys):
    copy = copy_bundle(bundle, tmp_path / "bundle")
    (copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert validate_main([str(copy), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nests too deeply" in err and "RecursionError" not in err


@pytest.mark.parametrize("args, needle", [
    (["--latency-batch", "0"], "--latency-batch"),
    (["--switch-repeats", "-3"], "--switch-repeats"),
    (["--runtime", "tflite"], "tflite"),
])
def test_device_option_fault_is_one_line_before_any_work(bundle, tmp_path, capsys, args, needle):
    assert (pytest.raises(SystemExit, validate_main, [str(bundle), "--out", str(tmp_path / "r.json"), *args])
            .value.code == 2)
    err = capsys.readouterr().err
    assert err.startswith("validate_bundle: error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "r.json").exists()


def test_device_report_into_a_folder_is_one_line(bundle, tmp_path, capsys):
    assert validate_main([str(bundle), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder" in err


def test_switcher_refuses_an_unknown_precision_and_a_tampered_artifact(bundle, tmp_path):
    switcher = PrecisionSwitcher(bundle, "onnxruntime", CPU)
    with pytest.raises(HeroError, match="no 5-bit variant"):
        switcher.set_precision(5)
    assert switcher.precision is None  # the active variant is unchanged
    copy = copy_bundle(bundle, tmp_path / "bundle")
    model = onnx.load(copy / "artifacts" / "w8.onnx")
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    onnx.save(model, copy / "artifacts" / "w8.onnx")
    with pytest.raises(HeroError, match="w8.onnx .*sha256"):
        PrecisionSwitcher(copy, "onnxruntime", CPU)


def test_unlisted_files_are_reported_in_the_device_report(bundle, tmp_path, capsys):
    copy = copy_bundle(bundle, tmp_path / "bundle")
    (copy / "artifacts" / "w8.onnx.data").write_bytes(b"\0" * 16)
    (copy / "engines").mkdir()
    (copy / "engines" / "w8.engine").write_bytes(b"built here")  # the device's own cache: not reported
    assert validate_main([str(copy), "--out", str(tmp_path / "r.json"), "--providers", CPU[0],
                          "--latency-repeats", "1", "--switch-repeats", "1"]) == 0
    assert "files the manifest does not list" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["meta"]["unlisted_files"] == ["artifacts/w8.onnx.data"]


def test_bundling_an_artifact_with_external_data_is_refused(tmp_path_factory, tmp_path, capsys):
    from pipeline.bundle import write_bundle

    built = built_bundle(tmp_path_factory)
    w8 = next(a for a in built["artifacts"] if a.variant.name == "w8")
    model = onnx.load(w8.path)
    external = tmp_path / "w8.onnx"
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w8.onnx.data", size_threshold=0)
    onnx.save(model, external)
    paths = {a.variant.name: a.path for a in built["artifacts"]}
    rows = [dict(r, sha256=sha256_file(external)) if r["name"] == "w8" else r for r in built["rows"]]
    with pytest.raises(HeroError, match="external data"):
        write_bundle(built["loaded"], rows, {**paths, "w8": external}, tmp_path / "b", built["options"])
    assert not (tmp_path / "b").exists()


def test_validator_subprocess_on_a_damaged_manifest_prints_one_line(bundle, tmp_path):
    copy = copy_bundle(bundle, tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(_edit(manifest, "variants.0.bits", "float")))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-m", "exporters.device.validate_bundle", str(copy), "--out",
                           str(tmp_path / "r.json")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "variants[0].bits" in done.stderr
