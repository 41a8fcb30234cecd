"""Faults a user meets: a diverging run, a checkpoint with nan weights, a torn metrics line, hostile or
mistyped YAML. Each is one `hero: error:` line and exit 2, and leaves every file as it was."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_error, snapshot

from exporters.device.files import sha256_file
from hero_train import train as train_module
from hero_train.checkpoint import save_checkpoint
from hero_train.config import TrainConfig
from hero_train.train import train
from pipeline.cli import main
from pipeline.config import load_config

TINY = ["--optimizer", "sgd", "--batch-size", "32", "--limit-test", "16", "--no-augment"]




def poisoned(trained, tmp_path, name: str, value: float) -> Path:
    """A copy of the trained checkpoint with one element of tensor `name` set to `value`."""
    ckpt = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)
    ckpt["state_dict"][name].view(-1)[0] = value
    return save_checkpoint(ckpt, tmp_path / "poisoned.pt")


# --- training that diverges -------------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["1e30", "1e10"])
def test_training_that_diverges_stops_at_its_epoch_and_writes_no_checkpoint(trained, tmp_path, capsys, lr):
    out = tmp_path / "run"
    before = snapshot(trained["data"], tmp_path)
    assert main(["train", "--data-root", trained["data"], *TINY, "--epochs", "1", "--lr", lr, "--out", str(out)]) == 2
    one_error(capsys, "training diverged at epoch 1", "lower --lr", f"now {float(lr):g}")
    assert snapshot(trained["data"], tmp_path) == before  # no checkpoint.pt, no metrics line


def test_huge_lr_names_the_step_and_the_nan_loss(trained, tmp_path, capsys):
    assert main(["train", "--data-root", trained["data"], *TINY, "--epochs", "1", "--lr", "1e30",
                 "--out", str(tmp_path / "run")]) == 2
    one_error(capsys, "training diverged at epoch 1, step ", ": loss is nan")


def test_resumed_run_that_diverges_keeps_the_last_good_checkpoint_byte_identical(trained, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--data-root", trained["data"], *TINY, "--epochs", "2", "--out", str(out)]
    real_epoch, real_step = train_module.train_one_epoch, train_module.take_step

    def killed_in_epoch_2(*a, **k):
        if a[4] == 1:  # epoch index 1: the process is stopped after epoch 1's checkpoint
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    monkeypatch.setattr(train_module, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data_root=trained["data"], optimizer="sgd", batch_size=32, limit_test=16, augment=False,
                          epochs=2), out)
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1

    def blows_up(optimizer, closure, model=None):  # a step that overflows a weight
        loss = real_step(optimizer, closure, model)
        with torch.no_grad():
            model.classifier.weight.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(train_module, "take_step", blows_up)
    capsys.readouterr()
    before = snapshot(out, trained["data"])
    assert main([*args, "--resume"]) == 2
    one_error(capsys, "training diverged at epoch 2, step 1: weight classifier.weight is not finite")
    assert snapshot(out, trained["data"]) == before


# --- a torn metrics.jsonl ---------------------------------------------------------------------------


def _finished_run(trained, tmp_path) -> tuple[Path, list[str]]:
    out = tmp_path / "run"
    args = ["train", "--data-root", trained["data"], *TINY, "--epochs", "1", "--out", str(out)]
    assert main(args) == 0
    return out, args


def test_resume_drops_a_torn_last_metrics_line_and_says_so(trained, tmp_path, capsys):
    out, args = _finished_run(trained, tmp_path)
    good = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(good + '{"epoch": 2, "train_lo')  # killed while writing epoch 2
    checkpoint = sha256_file(out / "checkpoint.pt")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torn last line" in err and "Traceback" not in err
    assert (out / "metrics.jsonl").read_text() == good and json.loads(good)["epoch"] == 1
    assert sha256_file(out / "checkpoint.pt") == checkpoint


def test_resume_refuses_a_broken_metrics_line_before_the_last(trained, tmp_path, capsys):
    out, args = _finished_run(trained, tmp_path)
    (out / "metrics.jsonl").write_text("not json\n" + (out / "metrics.jsonl").read_text())
    capsys.readouterr()
    before = snapshot(out)
    assert main([*args, "--resume"]) == 2
    one_error(capsys, "metrics.jsonl line 1 is not JSON")
    assert snapshot(out) == before


# --- checkpoints with non-finite weights or buffers -------------------------------------------------


@pytest.mark.parametrize("tensor,value", [("classifier.weight", float("nan")), ("features.1.running_var", float("inf"))])
def test_export_refuses_a_checkpoint_with_a_non_finite_tensor_naming_it(trained, tmp_path, capsys, tensor, value):
    checkpoint = poisoned(trained, tmp_path, tensor, value)
    before = snapshot(tmp_path, trained["data"])
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "w8.onnx"), "--bits", "8"]) == 2
    one_error(capsys, f"tensor {tensor} holds nan or inf")
    assert snapshot(tmp_path, trained["data"]) == before


def test_quantize_refuses_a_checkpoint_with_nan_weights(trained, tmp_path, capsys):
    checkpoint = poisoned(trained, tmp_path, "features.0.weight", float("nan"))
    before = snapshot(tmp_path, trained["data"])
    assert main(["quantize", str(checkpoint), "--bits", "8", "--limit-test", "16", "--data-root", trained["data"]]) == 2
    one_error(capsys, "tensor features.0.weight holds nan or inf")
    assert snapshot(tmp_path, trained["data"]) == before


def test_analyze_refuses_a_checkpoint_with_nan_weights(trained, tmp_path, capsys):
    checkpoint = poisoned(trained, tmp_path, "classifier.bias", float("-inf"))
    before = snapshot(tmp_path, trained["data"])
    assert main(["analyze", str(checkpoint), "--data-root", trained["data"]]) == 2
    one_error(capsys, "tensor classifier.bias holds nan or inf")
    assert snapshot(tmp_path, trained["data"]) == before


def test_run_refuses_a_checkpoint_with_nan_weights_and_writes_no_run(trained, tmp_path, capsys):
    checkpoint = poisoned(trained, tmp_path, "classifier.weight", float("nan"))
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"name": "nan", "quantize": {"bits": [8]}, "data": {"limit_test": 16}}))
    before = snapshot(tmp_path, trained["data"])
    assert main(["run", str(config), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "run"),
                 "--data-root", trained["data"]]) == 2
    one_error(capsys, "tensor classifier.weight holds nan or inf")
    assert snapshot(tmp_path, trained["data"]) == before


# --- YAML configs -----------------------------------------------------------------------------------


def _run_config(tmp_path, capsys, text: str, *needles) -> str:
    config = tmp_path / "deploy.yaml"
    config.write_text(text)
    before = snapshot(tmp_path)
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    line = one_error(capsys, str(config), *needles)
    assert snapshot(tmp_path) == before
    return line


def test_a_python_tag_is_refused_as_such_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    line = _run_config(tmp_path, capsys, f'name: x\ntrain: !!python/object/apply:os.system ["touch {marker}"]\n',
                       "python tags are not allowed")
    assert "not valid YAML" not in line and not marker.exists()


def test_a_billion_laughs_alias_bomb_is_refused_without_expanding(tmp_path, capsys):
    lines = ['lol0: &lol0 "lol"'] + [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 10)}]" for i in range(1, 10)]
    _run_config(tmp_path, capsys, "name: bomb\n" + "\n".join(lines) + "\n", "aliases expand to more than")


def test_a_cyclic_alias_is_refused(tmp_path, capsys):
    _run_config(tmp_path, capsys, "name: &a [*a]\n", "aliases expand to more than")


def test_a_few_aliases_still_load(tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text("name: x\nquantize: {bits: &bits [8, 4]}\ngate: {bits: *bits}\n")
    loaded = load_config(config)
    assert loaded.quantize.bits == [8, 4] and loaded.gate.bits == [8, 4]


@pytest.mark.parametrize("key,text", [
    ("validate.batch_size", "validate: {batch_size: 256.0}"),
    ("validate.batch_size", "validate: {batch_size: '256'}"),
    ("train.epochs", "train: {epochs: many}"),
    ("quantize.calibration_batches", "quantize: {calibration_batches: 8.5}"),
    ("quantize.bits.1", "quantize: {bits: [8, 4.0]}"),
    ("bundle.enabled", "bundle: {enabled: 'true'}"),
    ("train.bf16", "train: {bf16: 1}"),
    ("data.channels", "data: {channels: 2}"),
    ("quantize.act_method", "quantize: {act_method: median}"),
])
def test_every_value_is_type_checked_naming_its_key(tmp_path, capsys, key, text):
    _run_config(tmp_path, capsys, f"name: x\n{text}\n", f": {key}: ")


def test_float_fields_still_take_yaml_ints_and_exponents(tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text("name: x\ntrain: {gamma: 1, weight_decay: 1e-4, lr: 2.5E-1, epochs: 3}\ngate: {max_drop: 2}\n"
                      "quantize: {bits: [4, 8], act_bits: 8, act_method: percentile}\ndata: {channels: 3}\n")
    loaded = load_config(config)
    assert (loaded.train.gamma, loaded.train.weight_decay, loaded.train.lr, loaded.train.epochs) == (1.0, 1e-4, 0.25, 3)
    assert loaded.gate.max_drop == 2.0 and loaded.quantize.bits == [8, 4] and loaded.data.channels == 3
