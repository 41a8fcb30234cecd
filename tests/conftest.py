"""Shared fixtures: tiny datasets in the real file formats, written per test."""

import gzip
import struct

import numpy as np
import pytest


def write_idx(path, array: np.ndarray) -> None:
    """IDX format (the MNIST/Fashion-MNIST container): magic 0x0000 08 ndim, big-endian sizes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root, n_train=96, n_test=48, seed=0):
    """A learnable stand-in for Fashion-MNIST: each class a bright square at its own place."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 4 + 10 * r : 12 + 10 * r, 2 + 5 * col : 6 + 5 * col] = 250
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def tiny_fmnist(tmp_path):
    return make_fashion_mnist(tmp_path / "fmnist")


def snapshot(*roots) -> dict[str, str]:
    """sha256 of every file under the roots: equal before and after means nothing changed or appeared."""
    from pathlib import Path

    from exporters.device.files import sha256_file

    return {str(p): sha256_file(p) for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def one_error(capsys, *needles) -> str:
    """The one stderr line of a refused command ("hero: error: ..."), holding every needle."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hero: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _train_tiny(root, seed: int):
    from hero_train.config import TrainConfig
    from hero_train.train import train

    config = TrainConfig(model="resnet20", data_root=str(root / "fmnist"), epochs=1, batch_size=32,
                         optimizer="sgd", augment=False, limit_test=16, seed=seed)
    return str(train(config, root / f"train-s{seed}"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One ResNet20 trained for an epoch of SGD on a tiny Fashion-MNIST stand-in (64 training and
    40 test images), shared by every test module that needs "a trained checkpoint": {"data",
    "checkpoint"}. Tests copy it before changing it; the folder is read-only by convention."""
    root = tmp_path_factory.mktemp("trained")
    data = make_fashion_mnist(root / "fmnist", n_train=64, n_test=40)
    return {"data": str(data), "checkpoint": _train_tiny(root, seed=0), "root": root}


@pytest.fixture(scope="session")
def trained_seed1(trained):
    """The same training as `trained` at seed 1: a second checkpoint of the same model and data."""
    return _train_tiny(trained["root"], seed=1)


def with_batchnorm_statistics(model, mean: float = 0.5):
    """`model` in eval mode with non-trivial BatchNorm statistics and affine parameters (as after
    training: running means in [-mean, mean], variances in [0.5, 2], gains in [0.5, 1.5], shifts in
    [-0.2, 0.2]; seed 0), so folding changes the weights and activation ranges are not centred."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.uniform_(-mean, mean)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()
