import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from exporters.device.errors import HeroError
from hero_train import data
from hero_train.data import (
    DATASETS, add_label_noise, augment, crop_flip, iterate_batches, load_dataset, noisy_indices, normalize,
)


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Point every place load_dataset looks at an empty folder under tmp_path."""
    monkeypatch.delenv("HERO_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "system")
    return tmp_path


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(array)))
        else:
            (folder / name).write_bytes(_idx_bytes(array))


def _tiny_images(n: int, h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def test_fashion_mnist_loads_gz_and_raw_idx_from_root(places):
    train_images, test_images = _tiny_images(5), _tiny_images(3, seed=1)
    _write_idx_split(places / "root", "train", train_images, np.array([0, 1, 2, 3, 9]), gz=True)
    _write_idx_split(places / "root", "t10k", test_images, np.array([7, 8, 9]), gz=False)

    train = load_dataset("fashion-mnist", "train", root=places / "root")
    test = load_dataset("fashion-mnist", "test", root=places / "root")

    assert train.images.dtype == torch.uint8 and train.images.shape == (5, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(train_images))
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [0, 1, 2, 3, 9]
    assert torch.equal(test.images[:, 0], torch.from_numpy(test_images))
    assert (train.num_classes, train.mean, train.std) == (10, (0.2860,), (0.3530,))


def test_root_is_searched_before_hero_data_and_its_dataset_subfolder(places, monkeypatch):
    _write_idx_split(places / "root", "t10k", _tiny_images(2), np.array([1, 1]), gz=True)
    _write_idx_split(places / "env" / "fashion-mnist", "t10k", _tiny_images(2), np.array([2, 2]), gz=True)
    monkeypatch.setenv("HERO_DATA", str(places / "env"))

    assert load_dataset("fashion-mnist", "test", root=places / "root").labels.tolist() == [1, 1]
    assert load_dataset("fashion-mnist", "test").labels.tolist() == [2, 2]


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_file_is_an_error(places, gz):
    _write_idx_split(places / "root", "t10k", _tiny_images(4), np.arange(4), gz=False)
    images_path = places / "root" / "t10k-images-idx3-ubyte"
    raw = images_path.read_bytes()
    if gz:
        images_path.unlink()
        (places / "root" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-20])
    else:
        images_path.write_bytes(raw[:-100])
    with pytest.raises(HeroError, match="truncated"):
        load_dataset("fashion-mnist", "test", root=places / "root")


def test_idx_with_wrong_magic_is_an_error():
    bad = b"\x00\x00\x0d\x03" + struct.pack(">3I", 1, 2, 2) + bytes(16)  # float IDX, not unsigned byte
    with pytest.raises(HeroError, match="magic"):
        data.parse_idx(bad, 3, "bad-file")


def test_missing_dataset_error_names_every_place_looked_and_how_to_get_it(places, monkeypatch):
    monkeypatch.setenv("HERO_DATA", str(places / "env"))
    with pytest.raises(HeroError) as info:
        load_dataset("fashion-mnist", "train", root=places / "root")
    message = str(info.value)
    for place in (places / "root", places / "env", places / "env" / "fashion-mnist", places / "system",
                  places / "cache" / "hero-deploy" / "fashion-mnist"):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message


def test_unknown_dataset_or_split_is_an_error(places):
    with pytest.raises(HeroError, match="cifar10"):
        load_dataset("mnist", "train")
    with pytest.raises(HeroError, match="train"):
        load_dataset("cifar10", "validation")


def _write_cifar_batch(path: Path, data_rows: np.ndarray, label_key: bytes, labels: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"tiny", label_key: labels, b"data": data_rows, b"filenames": [b"x.png"] * len(labels)}
    path.write_bytes(pickle.dumps(batch, protocol=3))  # protocol 3 keeps ndarray on _reconstruct, as the real files


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def test_cifar10_train_concatenates_five_batches_in_red_green_blue_planes(places):
    folder = places / "root" / "cifar-10-batches-py"
    rows = [_cifar_rows(2, seed) for seed in range(5)]
    for i in range(5):
        _write_cifar_batch(folder / f"data_batch_{i + 1}", rows[i], b"labels", [i, 9 - i])

    train = load_dataset("cifar10", "train", root=places / "root")

    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    # pixel (row 1, column 5) of the green plane of the third image is byte 1024 + 32 + 5 of its row
    assert train.images[2, 1, 1, 5].item() == rows[1][0, 1024 + 32 + 5]
    assert train.mean == DATASETS["cifar10"].mean


def test_cifar100_uses_fine_labels(places, monkeypatch):
    rows = _cifar_rows(3, 7)
    path = places / "env" / "cifar-100-python" / "test"
    path.parent.mkdir(parents=True)
    batch = {b"data": rows, b"fine_labels": [99, 0, 42], b"coarse_labels": [1, 2, 3]}
    path.write_bytes(pickle.dumps(batch, protocol=3))
    monkeypatch.setenv("HERO_DATA", str(places / "env"))
    test = load_dataset("cifar100", "test")
    assert test.labels.tolist() == [99, 0, 42] and test.num_classes == 100
    assert torch.equal(test.images.reshape(3, -1), torch.from_numpy(rows))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_cifar_pickle_is_refused_and_never_runs(places):
    marker = places / "payload-ran"
    path = places / "root" / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=3))

    with pytest.raises(HeroError, match="refused to unpickle .*system"):
        load_dataset("cifar10", "test", root=places / "root")
    assert not marker.exists()


def test_truncated_cifar_batch_is_an_error(places):
    path = places / "root" / "cifar-10-batches-py" / "test_batch"
    _write_cifar_batch(path, _cifar_rows(4, 0), b"labels", [0, 1, 2, 3])
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(HeroError, match="truncated"):
        load_dataset("cifar10", "test", root=places / "root")


def test_debian_fashion_mnist_test_split_when_installed(monkeypatch):
    if not (data.SYSTEM_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    monkeypatch.delenv("HERO_DATA", raising=False)
    test = load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # the test split is balanced


def test_noisy_indices_are_exactly_round_ratio_n_distinct_positions():
    chosen = noisy_indices(1000, 0.37, torch.Generator().manual_seed(3))
    assert len(chosen) == 370 and len(set(chosen.tolist())) == 370
    assert chosen.min() >= 0 and chosen.max() < 1000


def test_label_noise_changes_at_most_the_selected_count():
    labels = torch.arange(2000) % 10
    noisy = add_label_noise(labels, 0.4, num_classes=10, seed=1)
    changed = (noisy != labels).sum().item()
    assert changed <= 800
    assert 680 <= changed <= 760  # about 9/10 of the 800 draw a different class
    assert noisy.min() >= 0 and noisy.max() < 10
    assert torch.equal(labels, torch.arange(2000) % 10)  # input left alone


def test_label_noise_with_many_classes_changes_nearly_all_selected():
    labels = torch.zeros(2000, dtype=torch.int64)
    changed = (add_label_noise(labels, 0.25, num_classes=1000, seed=5) != labels).sum().item()
    assert 490 <= changed <= 500


def test_label_noise_is_deterministic_per_seed():
    labels = torch.arange(500) % 10
    assert torch.equal(add_label_noise(labels, 0.3, 10, seed=4), add_label_noise(labels, 0.3, 10, seed=4))
    assert not torch.equal(add_label_noise(labels, 0.3, 10, seed=4), add_label_noise(labels, 0.3, 10, seed=5))
    assert torch.equal(add_label_noise(labels, 0.0, 10, seed=4), labels)


@pytest.mark.parametrize("ratio", [1.0, -0.1, float("nan")])
def test_label_noise_ratio_outside_zero_one_is_an_error(ratio):
    with pytest.raises(HeroError):
        add_label_noise(torch.zeros(10, dtype=torch.int64), ratio, 10, seed=0)


def test_normalize_matches_hand_computed_values():
    images = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    out = normalize(images, mean=(0.5, 0.2), std=(0.25, 0.1))
    assert out.dtype == torch.float32
    expected = torch.tensor([[[[-2.0, 2.0]], [[0.0, 2.0]]]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_crop_flip_with_zero_shift_and_flip_is_torch_flip():
    batch = torch.randn(3, 2, 8, 8)
    zero = torch.zeros(3, dtype=torch.int64)
    assert torch.equal(crop_flip(batch, zero, zero, torch.ones(3, dtype=torch.bool)), torch.flip(batch, dims=[3]))
    assert torch.equal(crop_flip(batch, zero, zero, torch.zeros(3, dtype=torch.bool)), batch)


def test_crop_flip_shift_moves_content_and_fills_zeros():
    batch = torch.arange(16.0).view(1, 1, 4, 4) + 1
    out = crop_flip(batch, torch.tensor([1]), torch.tensor([-2]), torch.tensor([False]), padding=2)
    # output pixel (i, j) reads input (i + 1, j - 2); outside the image it is the zero padding
    assert out[0, 0, 0, 2].item() == batch[0, 0, 1, 0].item()
    assert out[0, 0, 3].eq(0).all() and out[0, 0, :, :2].eq(0).all()


def test_augment_keeps_shape_and_is_deterministic_per_seed():
    batch = torch.randn(16, 3, 32, 32)
    first = augment(batch, torch.Generator().manual_seed(0))
    assert first.shape == batch.shape
    assert torch.equal(first, augment(batch, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, augment(batch, torch.Generator().manual_seed(1)))


def test_augment_crops_and_flips_identical_images_differently():
    image = torch.randn(1, 3, 32, 32)
    out = augment(image.expand(64, -1, -1, -1).contiguous(), torch.Generator().manual_seed(2))
    candidates = {
        (dy, dx, flip): crop_flip(image, torch.tensor([dy]), torch.tensor([dx]), torch.tensor([flip]))[0]
        for dy in range(-4, 5) for dx in range(-4, 5) for flip in (False, True)
    }
    drawn = [[key for key, view in candidates.items() if torch.equal(view, sample)] for sample in out]
    assert all(len(keys) == 1 for keys in drawn)  # every sample is exactly one padded crop, maybe flipped
    drawn = [keys[0] for keys in drawn]
    assert {flip for _, _, flip in drawn} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in drawn}) > 20


class _TorchCalls(TorchFunctionMode):
    """Records every torch function and Tensor method called while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def test_augment_runs_the_same_torch_calls_for_2_and_512_images():
    calls = {}
    for n in (2, 512):
        batch = torch.randn(n, 3, 32, 32)
        with _TorchCalls() as recorder:
            augment(batch, torch.Generator().manual_seed(0))
        calls[n] = recorder.calls
    assert calls[2] and calls[512] == calls[2]  # whole-batch tensor ops: no Python loop over images


def test_iterate_batches_covers_every_index_once_with_short_last_batch():
    batches = list(iterate_batches(10, 4, shuffle=False))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = list(iterate_batches(10, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert sorted(torch.cat(shuffled).tolist()) == list(range(10)) and len(shuffled[-1]) == 2
    again = list(iterate_batches(10, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again))
