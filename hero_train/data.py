"""Datasets as in-memory uint8 tensors, symmetric label noise, and batched augmentation.

A dataset is one uint8 tensor (N, C, H, W) plus int64 labels; normalisation and
augmentation run on whole batches with tensor ops (the airbench way), never image by image.
Files are found locally (argument, $HERO_DATA, the Debian package, the user cache) and only
downloaded when asked; CIFAR pickles go through a restricted unpickler.
"""

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from exporters.device.errors import HeroError, unknown_choice
from hero_train import images as images_lib

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset before reading it; mean/std are per channel on the 0..1 scale."""

    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    folder: str  # the folder its official files unpack into


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(10, 1, (0.2860,), (0.3530,), "fashion-mnist"),
    "cifar10": DatasetInfo(10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py"),
    "cifar100": DatasetInfo(100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python"),
}

SPLITS = ("train", "test", "val")

# The Debian package dataset-fashion-mnist installs the four .gz files here.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 of the official files, as published by the dataset authors and used by torchvision.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CIFAR_ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


@dataclass
class Dataset:
    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    num_classes: int
    mean: tuple[float, ...] | None  # None: not known yet (a custom test split: use the training split's)
    std: tuple[float, ...] | None
    classes: tuple[str, ...] = ()
    custom: bool = False  # a folder or .npz: trained with random-resized-crop + flip, else crop + flip

    def __len__(self) -> int:
        return len(self.labels)


def user_cache_dir() -> Path:
    """Where downloads go: $XDG_CACHE_HOME/hero-deploy, by default ~/.cache/hero-deploy."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hero-deploy"


def _required_files(name: str, split: str) -> list[str]:
    if name == "fashion-mnist":
        prefix = "train" if split == "train" else "t10k"
        return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    if name == "cifar10":
        return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return [split]


def _search_dirs(name: str, root: str | os.PathLike | None) -> list[Path]:
    """Folders to look in, in order: root, $HERO_DATA (each as given and with the dataset's
    folder appended), the Debian package (Fashion-MNIST only), the user cache."""
    folder = DATASETS[name].folder
    dirs: list[Path] = []
    for base in (root, os.environ.get("HERO_DATA") or None):
        if base is not None:
            base = Path(base).expanduser()
            dirs += [base, base / folder]
    if name == "fashion-mnist":
        dirs.append(SYSTEM_FASHION_MNIST_DIR)
    dirs.append(user_cache_dir() / folder)
    return list(dict.fromkeys(dirs))


def _existing(folder: Path, stem: str) -> Path | None:
    """The file `stem` in `folder`, or its gzipped form (IDX files ship as .gz)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate(name: str, files: list[str], root: str | os.PathLike | None) -> tuple[list[Path] | None, list[str]]:
    """Paths of `files` in the first folder holding all of them, and a note per folder looked in."""
    looked = []
    for folder in _search_dirs(name, root):
        found = [_existing(folder, stem) for stem in files]
        if all(found):
            return found, looked
        missing = [stem for stem, path in zip(files, found) if path is None]
        looked.append(f"{folder} ({'missing ' + ', '.join(missing) if folder.is_dir() else 'no such folder'})")
    return None, looked


def _how_to_get(name: str) -> str:
    if name == "fashion-mnist":
        return ("apt-get install dataset-fashion-mnist, set HERO_DATA to a folder holding the IDX files, "
                "or pass download=True / --download")
    url = CIFAR_ARCHIVES[name][0]
    return f"unpack {url} into a folder and set HERO_DATA to it, or pass download=True / --download"


def parse_idx(data: bytes, ndim: int, source: str) -> np.ndarray:
    """Decode an unsigned-byte IDX array (LeCun et al., http://yann.lecun.com/exdb/mnist/, 'the IDX file
    format'; Fashion-MNIST uses it unchanged): magic 0x00 0x00 0x08 ndim, then ndim big-endian uint32
    sizes, then the values in row-major order. Anything short or long is refused."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise HeroError(f"{source} is not a {ndim}-d unsigned-byte IDX file (bad magic number); re-download it")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise HeroError(f"{source} is truncated (header cut short); re-download it")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(shape))
    if len(data) - header != size:
        problem = "truncated" if len(data) - header < size else "longer than its header says"
        raise HeroError(f"{source} is {problem}: {len(data) - header} bytes of data for shape {shape}; re-download it")
    return np.frombuffer(data, np.uint8, count=size, offset=header).reshape(shape).copy()


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise HeroError(f"could not read {path} (truncated or corrupt: {exc}); re-download it") from exc


def _read_fashion_mnist(paths: list[Path], info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    images = parse_idx(_read_bytes(paths[0]), 3, str(paths[0]))
    labels = parse_idx(_read_bytes(paths[1]), 1, str(paths[1]))
    if len(images) != len(labels):
        raise HeroError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels; re-download both")
    if labels.size and labels.max() >= info.num_classes:
        raise HeroError(f"{paths[1]} has label {labels.max()} but {info.num_classes} classes; re-download it")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain containers and numpy arrays: the CIFAR batches hold dicts,
    lists, bytes, str, int and one ndarray, so every other global is refused (pickle docs,
    'Restricting Globals')."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise HeroError(f"refused to unpickle {module}.{name} from {self.source}: CIFAR batches hold only "
                            "plain data and numpy arrays; this file is not a genuine CIFAR batch")
        return self._ALLOWED[(module, name)]


# What a cut-short or garbled pickle raises on the way to a HeroError naming the file.
_CORRUPT_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError,
                          KeyError)


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch (https://www.cs.toronto.edu/~kriz/cifar.html): `data` is uint8 (N, 3072),
    each row the 32x32 red, then green, then blue plane, row-major."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), str(path)).load()
    except _CORRUPT_PICKLE_ERRORS as exc:
        raise HeroError(f"could not read CIFAR batch {path} (truncated or corrupt: {exc!r}); re-download it") from exc
    if not isinstance(batch, dict):
        raise HeroError(f"{path} is not a CIFAR batch (expected a dict, got {type(batch).__name__})")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise HeroError(f"{path} has no uint8 (N, 3072) 'data' array; re-download it")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise HeroError(f"{path} needs {len(data)} '{label_key}' in 0..{num_classes - 1}; re-download it")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar(name: str, paths: list[Path], info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    label_key = "labels" if name == "cifar10" else "fine_labels"
    parts = [_read_cifar_batch(path, label_key, info.num_classes) for path in paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Download `url` to `dest` unless a file with the right md5 is already there."""
    if dest.is_file() and _md5(dest) == md5:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise HeroError(f"could not download {url} ({exc}); check the network or fetch it by hand") from exc
    if _md5(partial) != md5:
        partial.unlink()
        raise HeroError(f"{url} downloaded with the wrong md5 (expected {md5}); try again later or fetch it by hand")
    partial.replace(dest)


def download_dataset(name: str) -> Path:
    """Fetch the official files of `name` into the user cache, verify their md5, unpack archives."""
    cache = user_cache_dir()
    if name == "fashion-mnist":
        for filename, md5 in FASHION_MNIST_MD5.items():
            _fetch(FASHION_MNIST_URL + filename, cache / DATASETS[name].folder / filename, md5)
    else:
        url, md5 = CIFAR_ARCHIVES[name]
        archive = cache / url.rsplit("/", 1)[1]
        _fetch(url, archive, md5)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(cache, filter="data")  # refuses absolute paths, '..' and links out of `cache`
    return cache / DATASETS[name].folder


STATS_SAMPLES = 10_000  # training images the normalisation of a custom dataset is measured on
DEFAULT_IMAGE_SIZE = 32


def is_custom(name: str) -> bool:
    """A dataset given as an .npz file or an image folder (anything else is a built-in name)."""
    return name not in DATASETS and (str(name).endswith(".npz") or Path(name).expanduser().is_dir()
                                     or os.sep in str(name))


def check_dataset(name: str) -> None:
    """A built-in name, an existing .npz file or an existing folder; else a HeroError."""
    if name in DATASETS:
        return
    path = Path(name).expanduser()
    if str(name).endswith(".npz") and not path.is_file():
        raise HeroError(f"dataset {name}: no such .npz file")
    if not str(name).endswith(".npz") and not path.is_dir():
        if os.sep in str(name):
            raise HeroError(f"dataset {name}: no such folder (an image folder holds train/<class>/ and test/<class>/)")
        raise HeroError(unknown_choice("dataset", name, DATASETS) + ", a folder or an .npz file")


IN_MEMORY_BYTES = int(os.environ.get("HERO_IN_MEMORY_BYTES", 2 * 2**30))  # decoded folders above this stream


@dataclass
class StreamedSplit:
    """An image-folder split too large to hold decoded: its images are decoded batch by batch in
    DataLoader worker processes (`batches`), so reading it costs memory for a few batches only."""

    name: str
    images: images_lib.FolderImages
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    custom: bool = True

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.images.labels.copy())

    def loader(self, batch_sampler) -> torch.utils.data.DataLoader:
        """Decoded (uint8 images, labels) batches of the index lists `batch_sampler` yields, in order."""
        return torch.utils.data.DataLoader(self.images, batch_sampler=batch_sampler,
                                           num_workers=_workers(), generator=_loader_seed())

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, int64 labels) of the first `limit` samples (all when None), in order."""
        data = self.images if limit is None else torch.utils.data.Subset(self.images, range(min(limit, len(self))))
        workers = _workers()
        yield from torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers,
                                               generator=_loader_seed())


def _workers() -> int:
    """DataLoader worker processes for decoding images."""
    return min(4, os.cpu_count() or 1)


def _normalization(batches) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 batches; a constant channel's std is floored so it never divides by zero."""
    mean, std = images_lib.channel_stats(batches)
    return mean, tuple(max(v, 1e-3) for v in std)


def _loader_seed() -> torch.Generator:
    """A DataLoader's own generator: without one it draws its worker seed from torch's global RNG,
    so reading a streamed folder would change the dropout masks and initialisation of training."""
    return torch.Generator().manual_seed(0)


def _folder_index(path: Path, split: str):
    """The folder's files in a fixed shuffled order (seed 0), so its first N samples mix the classes
    as a built-in test set's do, and the count of skipped non-image files on stderr."""
    index = images_lib.scan_folder(path, split)
    if index.skipped:
        print(f"dataset {path}: {split}: skipped {index.skipped} file(s) that are not images "
              f"({', '.join(images_lib.IMAGE_SUFFIXES)})", file=sys.stderr)
    order = torch.randperm(len(index.files), generator=torch.Generator().manual_seed(0)).tolist()
    return dataclasses.replace(index, files=[index.files[i] for i in order], labels=[index.labels[i] for i in order])


def _load_custom(name: str, split: str, channels: int | None, image_size: int | None, limit: int | None,
                 stream: bool) -> Dataset | StreamedSplit:
    """An .npz (arrays preprocessed to `channels` and `image_size` when given) or an image folder
    (decoded with Pillow: shorter side to image_size, default 32, then center crop): in memory, or
    streamed when `stream` and its decoded size exceeds IN_MEMORY_BYTES."""
    check_dataset(name)
    path = Path(name).expanduser()
    if path.suffix == ".npz":
        images, labels, num_classes = images_lib.read_npz(path, split)
        images, labels = images[:limit], labels[:limit]
        classes = tuple(str(i) for i in range(num_classes))
        c, h, w = images.shape[1:]
        if channels is not None or image_size is not None or h != w:
            images = images_lib.preprocess_array(images, channels or c, image_size or min(h, w))
    else:
        index = _folder_index(path, split)
        if limit is not None:
            index = dataclasses.replace(index, files=index.files[:limit], labels=index.labels[:limit])
        c, size = channels or 3, image_size or DEFAULT_IMAGE_SIZE
        classes, num_classes = tuple(index.classes), len(index.classes)
        if stream and len(index.files) * c * size * size > IN_MEMORY_BYTES:
            streamed = StreamedSplit(str(name), images_lib.FolderImages(index, c, size), num_classes, classes)
            if split == "train":
                streamed.mean, streamed.std = _normalization(
                    images for images, _ in streamed.batches(1024, STATS_SAMPLES))
            return streamed
        workers = _workers() if len(index.files) >= 512 else 0
        images, labels = images_lib.load_folder(index, c, size, workers)
    mean = std = None
    if split == "train":
        sample = images[:STATS_SAMPLES]
        mean, std = _normalization(sample[i : i + 1024] for i in range(0, len(sample), 1024))
    return Dataset(str(name), images, labels, num_classes, mean, std, classes, custom=True)


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None, download: bool = False, *,
                 channels: int | None = None, image_size: int | None = None, limit: int | None = None,
                 stream: bool = False) -> Dataset | StreamedSplit:
    """Load a whole split as uint8 images and int64 labels. `name` is a built-in dataset (found as
    `_search_dirs` says) or your own: an image folder (ROOT/train/<class>/*, ROOT/test/<class>/*,
    optional ROOT/val/<class>/*) or an .npz with x_train, y_train, x_test, y_test; `channels` and
    `image_size` set their preprocessing (`hero_train.images`); a folder's files come in a fixed
    shuffled order. `limit` keeps the first samples only (a folder decodes no more). A custom
    training split carries its normalisation, measured on its first STATS_SAMPLES images. With
    `stream`, a folder larger than IN_MEMORY_BYTES decoded comes as a StreamedSplit."""
    if split not in SPLITS:
        raise HeroError(unknown_choice("split", split, SPLITS))
    if name not in DATASETS:
        return _load_custom(name, split, channels, image_size, limit, stream)
    if split == "val":
        raise HeroError(f"{name} has no val split: use train or test")
    info = DATASETS[name]
    files = _required_files(name, split)
    paths, looked = _locate(name, files, root)
    if paths is None and download:
        download_dataset(name)
        paths, looked = _locate(name, files, root)
    if paths is None:
        raise HeroError(f"{name} {split} split not found; looked in: {'; '.join(looked)}. "
                        f"To get it: {_how_to_get(name)}")
    if name == "fashion-mnist":
        images, labels = _read_fashion_mnist(paths, info)
    else:
        images, labels = _read_cifar(name, paths, info)
    classes = tuple(str(i) for i in range(info.num_classes))
    if channels not in (None, info.channels) or image_size not in (None, images.shape[-1]):
        images = images_lib.preprocess_array(images, channels or info.channels, image_size or images.shape[-1])
    return Dataset(name, images[:limit], labels[:limit], info.num_classes, info.mean, info.std, classes)


def noisy_indices(n: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly round(ratio * n) distinct indices of 0..n-1, uniformly without replacement."""
    if not 0 <= ratio < 1:
        raise HeroError(f"label noise ratio must be in [0, 1), got {ratio}")
    return torch.randperm(n, generator=generator)[: round(ratio * n)]


def add_label_noise(labels: torch.Tensor, ratio: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise of HERO's noisy-label experiments (Yang et al., DAC 2022):
    round(ratio * N) samples (Python's round), chosen uniformly,
    each get a label drawn uniformly from all classes, so about 1/num_classes of them keep theirs.
    Returns a new tensor; `labels` is untouched."""
    generator = torch.Generator().manual_seed(seed)
    chosen = noisy_indices(len(labels), ratio, generator)
    noisy = labels.clone()
    noisy[chosen] = torch.randint(num_classes, (len(chosen),), generator=generator, dtype=labels.dtype)
    return noisy


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, as float32; `images` is uint8 (..., C, H, W)."""
    if images.dtype != torch.uint8:
        raise HeroError(f"normalize expects uint8 images, got {images.dtype}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


def crop_flip(batch: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor, flip: torch.Tensor,
              padding: int = 4) -> torch.Tensor:
    """Per-sample translation by (shift_y, shift_x) in [-padding, padding] with zero fill, then a
    horizontal flip where `flip` is true: pad once, then gather every sample's window by indexing."""
    b, c, h, w = batch.shape
    padded = F.pad(batch, (padding, padding, padding, padding))
    rows = (shift_y.to(batch.device) + padding)[:, None] + torch.arange(h, device=batch.device)
    cols = (shift_x.to(batch.device) + padding)[:, None] + torch.arange(w, device=batch.device)
    cols = torch.where(flip.to(batch.device)[:, None], cols.flip(1), cols)
    samples = torch.arange(b, device=batch.device)[:, None, None, None]
    channels = torch.arange(c, device=batch.device)[None, :, None, None]
    return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]


def augment(batch: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation used by HERO: random crop after 4-pixel padding and random
    horizontal flip (p = 0.5), for the whole batch at once; deterministic given `generator`.

    The padding is applied to the normalised batch, so it fills with the dataset mean colour
    rather than black; that keeps augmentation after normalisation and on the training device."""
    b = batch.shape[0]
    device = generator.device
    shift_y = torch.randint(-padding, padding + 1, (b,), generator=generator, device=device)
    shift_x = torch.randint(-padding, padding + 1, (b,), generator=generator, device=device)
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    return crop_flip(batch, shift_y, shift_x, flip, padding)


def iterate_batches(n: int, batch_size: int, *, shuffle: bool,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index tensors covering 0..n-1 once, `batch_size` at a time; the last batch may be smaller."""
    if batch_size < 1:
        raise HeroError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return iter(order.split(batch_size))
