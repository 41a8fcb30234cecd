"""The `hero` commands that had no tests of their own (export, quantize, validate), and the CLI's shape:
`hero train` options derived from TrainConfig, --data-root wherever data is read, cheap checks first."""

import dataclasses
import json
import typing

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
import yaml

from exporters.device.files import sha256_file
from exporters.onnx import QUANTIZATION_KEY
from hero_train.config import TrainConfig
from pipeline.cli import cli, main


def test_every_trainconfig_field_is_a_hero_train_option_with_its_default():
    params = {p.name: p for p in cli.commands["train"].params}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        param = params[field.name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        given = param.type.convert(param.default, param, None) if hints[field.name] is dict else param.default
        assert given == default, field.name
        if hints[field.name] is bool:
            assert param.is_flag and param.opts == [("--no-" if field.default else "--") + field.name.replace("_", "-")]
        else:
            assert param.opts == ["--" + field.name.replace("_", "-")]
    assert set(params) == {f.name for f in dataclasses.fields(TrainConfig)} | {"out_dir", "resume"}


@pytest.mark.parametrize("command", ["train", "quantize", "validate", "bundle", "analyze", "run", "export"])
def test_every_command_that_reads_data_takes_data_root(command):
    assert "data_root" in {p.name for p in cli.commands[command].params}


def test_hero_quantize_prints_accuracy_per_bit_width(trained, capsys):
    assert main(["quantize", trained["checkpoint"], "--bits", "8,4", "--limit-test", "20",
                 "--data-root", trained["data"]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["bits", "accuracy"] and [line.split()[0] for line in lines[1:]] == ["fp32", "8", "4"]
    for line in lines[1:]:
        assert 0.0 <= float(line.split()[1].rstrip("%")) <= 100.0


@pytest.mark.parametrize("bits,needle", [("8-2", "reversed"), ("1", "unsupported bit width 1"), ("4,x", "a list like")])
def test_hero_quantize_refuses_bad_bits_before_reading_anything(tmp_path, capsys, bits, needle):
    missing = tmp_path / "nope.pt"  # never opened: the bit widths are checked first
    assert main(["quantize", str(missing), "--bits", bits]) == 2
    err = capsys.readouterr().err
    assert needle in err and "does not exist" not in err and err.count("\n") == 1


def test_hero_export_then_validate_round_trips_the_spec(trained, tmp_path, capsys):
    out = tmp_path / "w4.onnx"
    assert main(["export", trained["checkpoint"], "--out", str(out), "--bits", "4", "--asymmetric",
                 "--int4-storage"]) == 0
    metadata = {p.key: p.value for p in onnx.load(out).metadata_props}
    entry = json.loads(metadata[QUANTIZATION_KEY])
    assert entry["spec"]["bits"] == 4 and entry["spec"]["symmetric"] is False and entry["weight_storage"] == "uint4"
    assert metadata["hero.source_sha256"] == sha256_file(trained["checkpoint"])
    capsys.readouterr()
    row_file = tmp_path / "row.json"
    assert main(["validate", str(out), "--checkpoint", trained["checkpoint"], "--limit-test", "16",
                 "--data-root", trained["data"], "--json", str(row_file)]) == 0
    row = json.loads(row_file.read_text())
    assert row["bits"] == 4 and row["consistent"] and row["agreement"] == 1.0
    assert "consistent: True" in capsys.readouterr().out


def test_hero_export_w8a8_calibrates_from_the_data_root(trained, tmp_path):
    out = tmp_path / "w8a8.onnx"
    assert main(["export", trained["checkpoint"], "--out", str(out), "--bits", "8", "--act-bits", "8",
                 "--calibration-batches", "1", "--data-root", trained["data"]]) == 0
    entry = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}[QUANTIZATION_KEY])
    assert entry["spec"]["act_bits"] == 8 and entry["act_scales"] and all(v > 0 for v in entry["act_scales"].values())
    validate = ["validate", str(out), "--checkpoint", trained["checkpoint"], "--limit-test", "16",
                "--data-root", trained["data"]]
    # Consistent: a rounding flip at an activation Q point moves logits by far less than half their
    # size (tests/agreement.py), so these bounds hold on any CPU whether or not one happens.
    assert main([*validate, "--logit-atol", "0.5", "--min-agreement", "0.5"]) == 0
    # Inconsistent by construction: the head's weight scale times 1e6 moves every logit by about 1e6
    # times its size, whatever the kernels; the emulation (from the metadata) is unchanged.
    proto = onnx.load(out)
    (head,) = [t for t in proto.graph.initializer if t.name.startswith("classifier.weight") and t.name.endswith("_scale")]
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * np.float32(1e6), head.name))
    broken = tmp_path / "w8a8-broken-head.onnx"
    onnx.save(proto, broken)
    assert main(["validate", str(broken), *validate[2:], "--logit-atol", "0.5", "--min-agreement", "0.5"]) == 1


def test_hero_validate_refuses_an_artifact_without_hero_metadata(trained, tmp_path, capsys):
    out = tmp_path / "plain.onnx"
    assert main(["export", trained["checkpoint"], "--out", str(out)]) == 0
    proto = onnx.load(out)
    del proto.metadata_props[:]
    onnx.save(proto, out)
    assert main(["validate", str(out), "--checkpoint", trained["checkpoint"], "--data-root", trained["data"]]) == 2
    assert f"no {QUANTIZATION_KEY} metadata" in capsys.readouterr().err


def test_hero_run_with_a_checkpoint_and_no_train_section_reads_data_from_data_root(trained, tmp_path, capsys):
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"name": "ckpt", "quantize": {"bits": [8]}, "data": {"limit_test": 16}, "gate": {"max_drop": 100.0},
                                      "validate": {"batch_size": 16, "latency_repeats": 1, "unoptimized_samples": 8}}))
    out = tmp_path / "run"
    assert main(["run", str(config), "--checkpoint", trained["checkpoint"], "--out", str(out),
                 "--data-root", trained["data"]]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["data_root"] == trained["data"] and report["meta"]["test_samples"] == 16
    assert [v["name"] for v in report["variants"]] == ["w8"]


def test_hero_run_refuses_a_data_section_naming_another_dataset(trained, tmp_path, capsys):
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"name": "x", "data": {"dataset": "cifar10", "root": trained["data"]}}))
    assert main(["run", str(config), "--checkpoint", trained["checkpoint"], "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "trained on 'fashion-mnist'" in err and err.count("\n") == 1


def test_an_output_path_that_is_a_folder_is_one_error_line_and_exit_2(trained, tmp_path, capsys):
    folder = tmp_path / "taken.onnx"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert main(["export", trained["checkpoint"], "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hero: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert (folder / "keep.txt").read_text() == "mine" and [p.name for p in folder.iterdir()] == ["keep.txt"]
