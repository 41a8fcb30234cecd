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
