"""hero_train.checkpoint.load_deployable: the one deploy context, read from a checkpoint or a plain
state_dict; the dataset given replaces the recorded one, never the checkpoint file itself."""

import pytest
import torch

from exporters.device.errors import HeroError
from exporters.device.files import sha256_file
from hero_train.checkpoint import DataRef, InputSpec, load_checkpoint, load_deployable, save_checkpoint
from hero_train.data import DATASETS
from hero_train.models import ModelRef, build_model


def _checkpoint(path, dataset="fashion-mnist"):
    model = build_model("resnet20", num_classes=10, in_channels=1)
    return save_checkpoint({"model": {"name": "resnet20", "num_classes": 10, "in_channels": 1},
                            "input_shape": [1, 28, 28], "dataset": dataset, "classes": [f"c{i}" for i in range(10)],
                            "normalization": {"mean": [0.25], "std": [0.5]}, "config": {"optimizer": "hero"},
                            "epoch": 1, "state_dict": model.state_dict()}, path)


def test_the_normalization_keeps_how_many_images_it_was_measured_on(tmp_path):
    path = _checkpoint(tmp_path / "c.pt")
    ckpt = load_checkpoint(path)
    ckpt["normalization"]["samples"] = 48
    save_checkpoint(ckpt, path)
    loaded = load_deployable(path)
    assert loaded.input.normalization() == {"mean": [0.25], "std": [0.5], "samples": 48}
    assert InputSpec((1, 2, 2), (0.1,), (0.2,), ("a",)).normalization() == {"mean": [0.1], "std": [0.2]}


def test_a_checkpoint_becomes_its_deploy_context(tmp_path):
    path = _checkpoint(tmp_path / "c.pt")
    loaded = load_deployable(path, data=DataRef(root="/data"))
    assert loaded.model_ref == ModelRef(name="resnet20") and not loaded.model.training
    assert loaded.input == InputSpec((1, 28, 28), (0.25,), (0.5,), tuple(f"c{i}" for i in range(10)))
    assert loaded.data == DataRef("fashion-mnist", "/data", None, None)
    assert (loaded.path, loaded.sha256, loaded.optimizer) == (path, sha256_file(path), "hero")


def test_a_dataset_given_replaces_the_recorded_one_in_the_context_only(tmp_path):
    path = _checkpoint(tmp_path / "c.pt", dataset=str(tmp_path / "old.npz"))
    before = sha256_file(path)
    moved = str(tmp_path / "moved.npz")
    loaded = load_deployable(path, data=DataRef(moved))
    assert loaded.data == DataRef(moved, None, 1, 28)  # your own images decode to the model's input
    assert load_checkpoint(path)["dataset"] == str(tmp_path / "old.npz") and sha256_file(path) == before


def test_another_built_in_dataset_is_refused(tmp_path):
    path = _checkpoint(tmp_path / "c.pt")
    with pytest.raises(HeroError, match="trained on 'fashion-mnist'"):
        load_deployable(path, data=DataRef("cifar10"))


def test_a_plain_state_dict_takes_the_input_it_is_described_with_or_its_datasets(tmp_path, tiny_fmnist):
    path = tmp_path / "weights.pt"
    torch.save(build_model("resnet20", num_classes=10, in_channels=1).state_dict(), path)
    named = ModelRef(name="resnet20")
    described = InputSpec((1, 28, 28), (0.1,), (0.2,), tuple("abcdefghij"))
    assert load_deployable(path, named, DataRef(), described).input == described
    loaded = load_deployable(path, named, DataRef("fashion-mnist", str(tiny_fmnist)))
    info = DATASETS["fashion-mnist"]
    assert loaded.input == InputSpec((1, 28, 28), info.mean, info.std, tuple(str(i) for i in range(10)))
    assert loaded.data.dataset == "fashion-mnist" and loaded.optimizer is None
    with pytest.raises(HeroError, match="say what its input is"):
        load_deployable(path, named)
