"""A checkpoint whose recorded model disagrees with its weights (hero_train/checkpoint.py,
`model_from_checkpoint`): every command that loads it refuses with one line naming the checkpoint,
the model it records and the first tensor that does not fit, never a traceback."""

import pytest
import torch
import yaml
from torch import nn

from hero_train.checkpoint import load_checkpoint, save_checkpoint, weights_misfit
from hero_train.models import build_model
from pipeline.cli import main


@pytest.fixture
def mislabelled(tmp_path):
    """ResNet20 weights in a checkpoint that records resnet32 (as if its metadata were edited)."""
    torch.manual_seed(0)
    payload = {"model": {"name": "resnet32", "factory": None, "kwargs": {}, "num_classes": 10, "in_channels": 1},
               "input_shape": [1, 28, 28], "dataset": "fashion-mnist", "classes": [str(i) for i in range(10)],
               "normalization": {"mean": [0.29], "std": [0.35]}, "config": {}, "epoch": 1,
               "state_dict": build_model("resnet20", num_classes=10, in_channels=1).state_dict()}
    path = save_checkpoint(payload, tmp_path / "checkpoint.pt")
    assert load_checkpoint(path)["model"]["name"] == "resnet32"  # the metadata itself is well formed
    return path


def _refusal(capsys, argv) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("hero: error: ") and "Traceback" not in err, err
    return lines[0]


def _commands(ckpt, tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"name": "mislabelled", "quantize": {"bits": [8]}, "gate": {"max_drop": 1.0}}))
    return {
        "export": ["export", ckpt, "--bits", "8", "--out", str(tmp_path / "m.onnx")],
        "quantize": ["quantize", ckpt, "--bits", "8", "--limit-test", "8"],
        "validate": ["validate", str(tmp_path / "m.onnx"), "--checkpoint", ckpt],
        "analyze": ["analyze", ckpt, "--out", str(tmp_path / "analysis")],
        "run": ["run", str(config), "--checkpoint", ckpt, "--out", str(tmp_path / "run")],
    }


@pytest.mark.parametrize("command", ["export", "quantize", "validate", "analyze", "run"])
def test_weights_of_another_model_are_one_line_naming_checkpoint_model_and_tensor(mislabelled, tmp_path, capsys,
                                                                                   command):
    line = _refusal(capsys, _commands(str(mislabelled), tmp_path)[command])
    assert str(mislabelled) in line and "records model resnet32" in line
    assert "features.6.residual.0.weight has shape [32, 16, 3, 3] but the model expects [16, 16, 3, 3]" in line
    assert "missing key(s)" in line and "unexpected key(s)" in line and "--model" in line
    assert not (tmp_path / "m.onnx").exists()


def test_misfit_names_shape_then_missing_then_unexpected_keys():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    weights = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(3), "2.weight": torch.zeros(1)}
    assert weights_misfit(model, weights) == ("tensor 0.weight has shape [5, 4] but the model expects [3, 4]; "
                                              "2 missing key(s): 1.weight, 1.bias; 1 unexpected key(s): 2.weight")
    assert weights_misfit(model, model.state_dict()) is None
