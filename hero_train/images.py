"""Your own image data: an ImageFolder tree or an .npz file, one preprocessing, batched augmentation.

A dataset is either a folder in the ImageFolder layout, ROOT/train/<class>/*, ROOT/test/<class>/*
and optionally ROOT/val/<class>/* (PNG, JPEG, WebP or BMP files; the classes are the sorted
folder names under train/), or an .npz with x_train, y_train, x_test, y_test (optionally x_val,
y_val): uint8 images N×H×W, N×H×W×C or N×C×H×W and integer labels 0..K-1.

Every image reaches the model through one preprocessing to `channels` (1: Pillow "L", 3: "RGB")
and `size` S: resize the shorter side to S (bilinear, antialiased), then center-crop S×S, giving
uint8 C×S×S. Files go through Pillow (`decode_image`); in-memory arrays go through the same steps
with torch ops on whole batches (`preprocess_array`). The two agree to a grey level or two, not
bit for bit (torch's antialiased bilinear kernel is modelled on Pillow's but rounds differently).

Training adds the ImageNet random-resized-crop (scale (0.08, 1), ratio (3/4, 4/3)) and a
horizontal flip, for a whole float batch at once with per-sample affine grids
(`random_resized_crop_flip`), deterministic given a torch.Generator.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from exporters.device.errors import HeroError, unknown_choice

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SPLITS = ("train", "test", "val")
CHANNEL_MODES = {1: "L", 3: "RGB"}
# ITU-R 601-2 luma, the weights of Pillow's RGB -> "L" conversion (Image.convert docs).
LUMA_601 = (0.299, 0.587, 0.114)
_PREPROCESS_CHUNK = 1024  # images per interpolate call: bounds the float copy of a large array


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise HeroError(unknown_choice("split", split, SPLITS))


def _check_geometry(channels: int, size: int) -> None:
    if channels not in CHANNEL_MODES:
        raise HeroError(unknown_choice("number of channels", channels, sorted(CHANNEL_MODES)))
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise HeroError(f"image size must be a whole number >= 1, got {size!r}")


# --------------------------------------------------------------------------- .npz files


def _npz_array(npz, path: Path, key: str) -> np.ndarray:
    if key not in npz.files:
        raise HeroError(f"{path} has no array {key!r} (it has {', '.join(npz.files) or 'none'}): "
                        "save x_train, y_train, x_test, y_test with np.savez")
    try:
        return npz[key]
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise HeroError(f"array {key!r} in {path} cannot be read without pickle ({exc}): "
                        "save plain numeric arrays") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise HeroError(f"array {key!r} in {path} is damaged ({exc}): write the .npz again") from None


def _npz_labels(npz, path: Path, key: str) -> np.ndarray:
    y = _npz_array(npz, path, key)
    if y.ndim == 2 and y.shape[1] == 1:  # Keras-style (N, 1) columns
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise HeroError(f"array {key!r} in {path} must be 1-D integer labels, got {y.dtype} of shape "
                        f"{y.shape}: store class indices 0..K-1, e.g. y.astype(np.int64)")
    if len(y) and y.min() < 0:
        raise HeroError(f"array {key!r} in {path} has label {int(y.min())} < 0: labels must be 0..K-1")
    return y.astype(np.int64)


def _nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """N×H×W -> C=1; N×H×W×C or N×C×H×W told apart by which axis holds 1 or 3 channels."""
    if x.dtype != np.uint8:
        raise HeroError(f"array {key!r} in {path} is {x.dtype}, expected uint8 images 0..255: "
                        "convert with np.clip(x * 255, 0, 255).round().astype(np.uint8) or similar")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        last, first = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
        if last and not first:
            return x.transpose(0, 3, 1, 2)
        if first and not last:
            return x
        why = "ambiguous" if first else "not recognised"
    else:
        why = "not recognised"
    raise HeroError(f"array {key!r} in {path} has shape {x.shape}, {why} as images: use N×H×W, "
                    "N×H×W×C or N×C×H×W with C = 1 or 3 on exactly one of those axes")


def read_npz(path: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Images (uint8 N×C×H×W), labels (int64) and the number of classes K of one split of an .npz.

    K is max label + 1 over train and test, so both label arrays are read and checked: every test
    (and val) class must occur in train. Arrays are loaded with allow_pickle=False."""
    _check_split(split)
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise HeroError(f"dataset file {path} does not exist: give the path of an .npz file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise HeroError(f"{path} is not a readable .npz file ({exc}): save it with np.savez") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise HeroError(f"{path} holds a single array, not an .npz archive: save x_train, y_train, "
                        "x_test, y_test with np.savez")
    with npz:
        labels = {s: _npz_labels(npz, path, f"y_{s}") for s in ("train", "test")}
        if split == "val":
            labels["val"] = _npz_labels(npz, path, "y_val")
        x = _nchw(_npz_array(npz, path, f"x_{split}"), path, f"x_{split}")
    y = labels[split]
    if len(x) != len(y):
        raise HeroError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels: "
                        "give one label per image")
    if len(labels["train"]) == 0:
        raise HeroError(f"{path}: y_train is empty: the training split needs images")
    in_train = set(np.unique(labels["train"]).tolist())
    for s in sorted(labels.keys() - {"train"}):
        missing = sorted(set(np.unique(labels[s]).tolist()) - in_train)
        if missing:
            raise HeroError(f"{path}: y_{s} has classes {missing[:10]} that never occur in y_train: "
                            "every class needs training images")
    num_classes = max(int(labels[s].max()) for s in ("train", "test") if len(labels[s])) + 1
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), num_classes


# --------------------------------------------------------------------------- ImageFolder trees


@dataclass
class FolderIndex:
    """The image files of one split, in sorted order, with class indices into `classes`."""

    files: list[Path]
    labels: list[int]
    classes: list[str]  # sorted folder names of ROOT/train
    skipped: int  # non-hidden files without an image suffix, or not inside a class folder


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def scan_folder(root: str | os.PathLike, split: str) -> FolderIndex:
    """Index ROOT/<split>/<class>/** in the ImageFolder layout; classes are the folders of ROOT/train.

    Files are taken by suffix (IMAGE_SUFFIXES, any case), searched recursively inside each class
    folder and sorted by path, so the index is the same on every machine. Hidden files and folders
    (".*") are ignored. Other files (a README, a .txt of labels, files lying directly in
    ROOT/<split>) are skipped rather than refused, because such trees often carry them; their count
    is `skipped`, for the caller to report. Whether a file really is an image is found when it is
    decoded (`decode_image`)."""
    _check_split(split)
    root = Path(root)
    train = root / "train"
    if not train.is_dir():
        raise HeroError(f"{train} is not a folder: an image folder dataset needs ROOT/train/<class>/ "
                        "(and ROOT/test/<class>/)")
    folder = root / split
    if not folder.is_dir():
        raise HeroError(f"{folder} is not a folder: put the {split} images in {folder}/<class>/")
    classes = [p.name for p in _class_dirs(train)]
    if not classes:
        raise HeroError(f"{train} has no class folders: put each class's images in {train}/<class>/")
    index = {name: i for i, name in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    skipped = sum(1 for p in folder.iterdir() if p.is_file() and _visible(p))
    for class_dir in _class_dirs(folder):
        if class_dir.name not in index:
            raise HeroError(f"class folder {class_dir} has no counterpart in {train}: every {split} class "
                            "needs training images (rename or remove the folder)")
        found = sorted(p for p in class_dir.rglob("*") if p.is_file()
                       and all(_visible(Path(part)) for part in p.relative_to(class_dir).parts))
        images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += len(found) - len(images)
        if not images:
            raise HeroError(f"class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES)}): "
                            "add images or remove the folder")
        files += images
        labels += [index[class_dir.name]] * len(images)
    if not files:
        raise HeroError(f"{folder} has no images: put the {split} images in {folder}/<class>/")
    return FolderIndex(files, labels, classes, skipped)


# --------------------------------------------------------------------------- the one preprocessing


def _resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Shorter side to `size`, the longer one scaled and truncated (torchvision's Resize(int) rule)."""
    if h <= w:
        return size, max(size, int(size * w / h))
    return max(size, int(size * h / w)), size


def _crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """Top-left corner of the centered size×size window (torchvision's center_crop rounding)."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def decode_image(path: str | os.PathLike, channels: int, size: int) -> np.ndarray:
    """Decode one file with Pillow into uint8 (channels, size, size): convert to "L" or "RGB",
    resize the shorter side to `size` (bilinear, antialiased), center-crop. A file Pillow cannot
    read fully (corrupt, truncated, not an image) is a HeroError naming it."""
    _check_geometry(channels, size)
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert(CHANNEL_MODES[channels])
    except FileNotFoundError:
        raise HeroError(f"image {path} does not exist: scan the folder again (scan_folder)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise HeroError(f"cannot decode image {path} ({exc}): replace or remove the file") from None
    h, w = _resized_shape(img.height, img.width, size)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    top, left = _crop_offsets(h, w, size)
    img = img.crop((left, top, left + size, top + size))
    array = np.asarray(img, dtype=np.uint8)
    return (array[None] if channels == 1 else array.transpose(2, 0, 1)).copy()  # writable, C order


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if have == 3 and channels == 1:
        luma = torch.tensor(LUMA_601, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        return (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    raise HeroError(f"images have {have} channels, cannot make {channels}: use 1 (grey) or 3 (RGB) channels")


def preprocess_array(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """`decode_image`'s preprocessing for uint8 images N×C×H×W already in memory, batch-wise with
    torch: channels (3 -> 1 by ITU-R 601 luma as Pillow's "L", 1 -> 3 by repetition), shorter side
    to `size` (F.interpolate bilinear, antialias=True), center crop. Returns uint8 N×C×S×S."""
    _check_geometry(channels, size)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise HeroError(f"preprocess_array expects uint8 images N×C×H×W, got {images.dtype} of shape "
                        f"{tuple(images.shape)}")
    h, w = _resized_shape(images.shape[2], images.shape[3], size)
    top, left = _crop_offsets(h, w, size)
    out = torch.empty((len(images), channels, size, size), dtype=torch.uint8, device=images.device)
    for start in range(0, len(images), _PREPROCESS_CHUNK):
        chunk = _convert_channels(images[start:start + _PREPROCESS_CHUNK], channels)
        if (h, w) != tuple(chunk.shape[2:]):
            chunk = F.interpolate(chunk.float(), size=(h, w), mode="bilinear", antialias=True,
                                  align_corners=False).round().clamp(0, 255)
        out[start:start + len(chunk)] = chunk[:, :, top:top + size, left:left + size]
    return out


class FolderImages(torch.utils.data.Dataset):
    """The files of a FolderIndex, decoded on access: (uint8 tensor C×S×S, int label).

    Paths and labels are kept in two numpy arrays rather than lists of Python objects, so DataLoader
    workers forked from this process share them instead of copying them page by page as reference
    counts change (pytorch/pytorch#13246). Picklable for spawned workers too."""

    def __init__(self, index: FolderIndex, channels: int, size: int):
        _check_geometry(channels, size)
        self.paths = np.array([os.fspath(p) for p in index.files])
        self.labels = np.array(index.labels, dtype=np.int64)
        self.classes = list(index.classes)
        self.channels = channels
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = decode_image(str(self.paths[i]), self.channels, self.size)
        return torch.from_numpy(image), int(self.labels[i])


def load_folder(index: FolderIndex, channels: int, size: int, num_workers: int = 0,
                batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split into one uint8 tensor N×C×S×S and int64 labels (the in-memory form of
    hero_train.data.Dataset), written into a preallocated tensor so the peak is one copy."""
    data = FolderImages(index, channels, size)
    images = torch.empty((len(data), channels, size, size), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    start = 0
    for batch, _ in loader:
        images[start:start + len(batch)] = batch
        start += len(batch)
    return images, torch.from_numpy(data.labels.copy())


# --------------------------------------------------------------------------- batched augmentation


def _crop_sizes(b: int, h: int, w: int, scale, ratio, generator: torch.Generator,
                attempts: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop.get_params (torchvision) for b samples at once: up to `attempts` draws of
    area fraction ~ U(scale) and log aspect ~ U(log ratio); the first that fits is kept, a sample
    with none falls back to the whole image clamped to the ratio range. Returns widths, heights
    and whether a draw fitted."""
    device = generator.device
    area = h * w * torch.empty(b, attempts, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(b, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                 generator=generator)
    aspect = log_ratio.exp()
    cw = (area * aspect).sqrt().round()
    ch = (area / aspect).sqrt().round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.float().argmax(1, keepdim=True)  # argmax returns the first maximum
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(h * max(ratio)), h
    else:
        fw, fh = w, h
    any_fit = fits.any(1)
    return torch.where(any_fit, cw, float(fw)), torch.where(any_fit, ch, float(fh)), any_fit


def random_resized_crop_flip(batch: torch.Tensor, generator: torch.Generator, scale=(0.08, 1.0),
                             ratio=(3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """The ImageNet random-resized-crop (Szegedy et al. 2015; torchvision's RandomResizedCrop
    sampling) plus a horizontal flip with probability `flip_p`, for a float batch (B, C, H, W) at
    once: each sample's crop box and mirror become one affine grid (F.affine_grid), and
    F.grid_sample (bilinear) resamples it back to H×W. Crop boxes are whole pixels at whole-pixel
    offsets, as in torchvision; a crop never exceeds the image, so resampling only enlarges and
    needs no antialiasing. Random numbers come from `generator` (on its device) only."""
    if not batch.is_floating_point() or batch.ndim != 4:
        raise HeroError(f"random_resized_crop_flip expects a float batch (B, C, H, W), got {batch.dtype} "
                        f"of shape {tuple(batch.shape)}: convert uint8 images with .float() first")
    if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
        raise HeroError(f"crop scale must satisfy 0 < low <= high <= 1 and ratio 0 < low <= high, "
                        f"got scale={tuple(scale)}, ratio={tuple(ratio)}")
    b, _, h, w = batch.shape
    device = generator.device
    cw, ch, fitted = _crop_sizes(b, h, w, scale, ratio, generator)
    # Offsets uniform over the whole-pixel positions 0..W-cw (randint with per-sample bounds);
    # the fallback crop is centered, as torchvision's.
    left = torch.where(fitted, (torch.rand(b, generator=generator, device=device) * (w - cw + 1)).floor(),
                       ((w - cw) / 2).round())
    top = torch.where(fitted, (torch.rand(b, generator=generator, device=device) * (h - ch + 1)).floor(),
                      ((h - ch) / 2).round())
    flip = torch.rand(b, generator=generator, device=device) < flip_p
    # affine_grid maps output coordinates in [-1, 1] (align_corners=False: pixel edges) to input
    # ones: x_in = sx * x_out + tx, with sx the crop's width fraction, negative to mirror.
    sx = cw / w * torch.where(flip, -1.0, 1.0)
    sy = ch / h
    tx = (2 * left + cw) / w - 1
    ty = (2 * top + ch) / h - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    theta = theta.to(device=batch.device, dtype=batch.dtype)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------- statistics


def channel_stats(batches: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std on the 0..1 scale over every pixel of uint8 batches
    B×C×H×W, for `hero_train.data.normalize`. Pixels are counted in a 256-bin histogram per
    channel (int64, exact), and the moments are formed from it in float64 at the end, so the result
    does not depend on how the data is split into batches."""
    counts = None
    for batch in batches:
        if batch.dtype != torch.uint8 or batch.ndim != 4:
            raise HeroError(f"channel_stats expects uint8 batches B×C×H×W, got {batch.dtype} of shape "
                            f"{tuple(batch.shape)}")
        c = batch.shape[1]
        if counts is None:
            counts = torch.zeros(c, 256, dtype=torch.int64)
        elif counts.shape[0] != c:
            raise HeroError(f"channel_stats got batches with {counts.shape[0]} and {c} channels: "
                            "give batches of one dataset")
        offsets = (torch.arange(c, device=batch.device) * 256).view(1, c, 1, 1)
        flat = (batch.to(torch.int64) + offsets).reshape(-1)
        counts += torch.bincount(flat, minlength=c * 256).view(c, 256).cpu()
    if counts is None or counts[0].sum() == 0:
        raise HeroError("channel_stats got no pixels: give at least one non-empty batch")
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts[0].sum().double()
    mean = (counts.double() * values).sum(1) / n
    var = (counts.double() * (values - mean[:, None]) ** 2).sum(1) / n
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())
