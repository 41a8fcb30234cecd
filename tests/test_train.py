"""The training loop: metrics, atomic checkpoints, bit-identical resume, clear errors."""

import json

import pytest
import torch

from exporters.device.errors import HeroError
from hero_train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
import hero_train.train as T
from hero_train.config import TrainConfig
from hero_train.train import train
from pipeline.cli import main


def config(root, **kw):
    base = dict(model="resnet20", dataset="fashion-mnist", data_root=str(root), epochs=2, batch_size=32,
                optimizer="hero", hvp="finite-difference", gamma=0.1, hero_warmup_epochs=1, seed=3)
    return TrainConfig(**dict(base, **kw))


def test_resumed_run_ends_with_identical_weights(tiny_fmnist, tmp_path, monkeypatch):
    cut = config(tiny_fmnist)
    full = train(cut, tmp_path / "full")
    # A genuine interruption: the process dies during the second epoch.
    interrupted = tmp_path / "interrupted"
    original, calls = T.train_one_epoch, []

    def die_in_epoch_two(*args, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(T, "train_one_epoch", die_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(cut, interrupted)
    monkeypatch.setattr(T, "train_one_epoch", original)
    assert load_checkpoint(interrupted / "checkpoint.pt")["epoch"] == 1
    resumed = train(cut, interrupted, resume=True)
    a = load_checkpoint(full)["state_dict"]
    b = load_checkpoint(resumed)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(l) for l in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"} <= set(lines[0])


def test_checkpoint_rebuilds_model_and_loads_weights_only(tiny_fmnist, tmp_path):
    path = train(config(tiny_fmnist, epochs=1, optimizer="sgd"), tmp_path / "run")
    ckpt = load_checkpoint(path)
    assert ckpt["model"] == {"name": "resnet20", "factory": None, "kwargs": {}, "num_classes": 10, "in_channels": 1}
    assert ckpt["classes"] == [str(i) for i in range(10)]
    assert ckpt["input_shape"] == [1, 28, 28] and ckpt["dataset"] == "fashion-mnist"
    assert len(ckpt["normalization"]["mean"]) == 1
    model = model_from_checkpoint(ckpt)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    torch.load(path, weights_only=True)  # must not need unsafe unpickling


def test_sgd_learns_the_tiny_task(tiny_fmnist, tmp_path):
    train(config(tiny_fmnist, epochs=3, optimizer="sgd", lr=0.05, augment=False), tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(HeroError, match="not a readable"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(HeroError, match="not a hero-deploy checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(HeroError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_atomic_save_leaves_no_temp_files(tmp_path):
    save_checkpoint({"x": torch.ones(2)}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_resume_with_a_different_config_is_refused(tiny_fmnist, tmp_path):
    train(config(tiny_fmnist, epochs=1, optimizer="sgd"), tmp_path / "run")
    with pytest.raises(HeroError, match="differs in lr"):
        train(config(tiny_fmnist, epochs=1, optimizer="sgd", lr=0.5), tmp_path / "run", resume=True)


def test_resume_ignores_options_the_method_never_reads(tiny_fmnist, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_fmnist, epochs=1, optimizer="sgd", lam=0.01, gamma=0.1), run)
    # SGD reads neither lam nor gamma: changing them must not block the resume
    train(config(tiny_fmnist, epochs=1, optimizer="sgd", lam=5e-4, gamma=5.0), run, resume=True)
    with pytest.raises(HeroError, match="differs in optimizer, gamma"):
        train(config(tiny_fmnist, epochs=1, optimizer="hero", lam=5e-4, gamma=5.0), run, resume=True)


@pytest.mark.parametrize("args,message", [
    (["--epochs", "-1"], "epochs must be >= 0"),
    (["--model", "resnet9000"], "unknown model"),
    (["--label-noise", "1.0"], "label-noise ratio"),
    (["--optimizer", "adam"], "unknown optimizer"),
    (["--epochs", "abc"], "not a valid integer"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_missing_data_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HERO_DATA", str(tmp_path / "nothing"))
    code = main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "empty"), "--epochs", "1",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cifar" in err.lower()


def test_cli_trains_and_writes_checkpoint(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--data-root", str(tiny_fmnist), "--epochs", "1", "--batch-size", "48",
                 "--optimizer", "first-order", "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists()


def test_record_hz_adds_a_positive_hz_norm_per_epoch(tiny_fmnist, tmp_path):
    train(config(tiny_fmnist, epochs=2, optimizer="sgd", record_hz=1), tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(l["hz_norm"] > 0 for l in lines)
    assert lines[0]["hz_norm"] != lines[1]["hz_norm"]
