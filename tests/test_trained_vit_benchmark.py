"""benchmarks/trained_vit.py's training: its schedule, and a resumed run that equals an uninterrupted one."""

import math

import pytest
import torch

from benchmarks import trained_vit as T
from hero_train.data import Dataset


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_zero():
    warm, peak = T.HYPER["warmup_steps"], T.HYPER["lr"]
    assert T.learning_rate(0, 10 * warm) == pytest.approx(peak / warm)
    assert T.learning_rate(warm - 1, 10 * warm) == pytest.approx(peak)
    assert T.learning_rate(warm, 10 * warm) == pytest.approx(peak)
    middle = warm + (9 * warm) // 2
    assert T.learning_rate(middle, 10 * warm) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert T.learning_rate(10 * warm, 10 * warm) == pytest.approx(0.0, abs=1e-12)


def _data(n=2 * T.HYPER["batch"]):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, T.IMAGE, T.IMAGE), dtype=torch.uint8, generator=g)
    return Dataset("tiny", images, torch.randint(0, T.CLASSES, (n,), generator=g), T.CLASSES, (0.5,), (0.25,))


def _model():
    torch.manual_seed(0)
    return T.build(depth=1)


def test_a_resumed_training_equals_an_uninterrupted_one(tmp_path):
    data = _data()
    straight = _model()
    T.train(straight, data, 2, tmp_path / "straight")
    resumed = _model()
    T.train(resumed, data, 1, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / T.STATE_FILE, weights_only=True)["epoch"] == 1
    T.train(resumed, data, 2, tmp_path / "resumed")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(_model().state_dict()["head.weight"], straight.state_dict()["head.weight"])
