"""Your own image data: .npz and ImageFolder readers, the one preprocessing, batched augmentation."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from exporters.device.errors import HeroError
from hero_train.images import (FolderImages, channel_stats, decode_image, load_folder, preprocess_array,
                               random_resized_crop_flip, read_npz, scan_folder)


def save_image(path, array: np.ndarray, **kwargs) -> None:
    """uint8 H×W (grey) or H×W×3 array -> an image file, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def smooth_image(rng, h: int, w: int) -> np.ndarray:
    """A photo-like RGB image: a coarse random grid enlarged, so resizing has structure to keep."""
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC))


def make_folder(root, splits=("train", "test"), classes=("cat", "dog"), per_class=3, size=(12, 10)):
    """ROOT/<split>/<class>/<i>.png, each class one flat colour (class index * 100)."""
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                save_image(root / split / name / f"{i}.png", np.full((*size, 3), c * 100, np.uint8))
    return root


def write_npz(path, **arrays):
    rng = np.random.default_rng(0)
    defaults = dict(x_train=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), y_train=np.array([0, 1, 2, 0, 1, 2]),
                    x_test=rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), y_test=np.array([2, 1, 0]))
    defaults.update(arrays)
    np.savez(path, **{k: v for k, v in defaults.items() if v is not None})
    return path


# --------------------------------------------------------------------------- .npz


@pytest.mark.parametrize("layout", ["NHW", "NHWC-1", "NHWC-3", "NCHW-1", "NCHW-3"])
def test_read_npz_detects_layout_and_returns_nchw(tmp_path, layout):
    rng = np.random.default_rng(1)
    c = 3 if layout.endswith("3") else 1
    nchw = rng.integers(0, 256, (5, c, 7, 9), dtype=np.uint8)
    stored = {"NHW": nchw[:, 0], "NHWC-1": nchw.transpose(0, 2, 3, 1), "NHWC-3": nchw.transpose(0, 2, 3, 1),
              "NCHW-1": nchw, "NCHW-3": nchw}[layout]
    path = write_npz(tmp_path / "d.npz", x_train=stored, y_train=np.array([0, 1, 2, 1, 0]))
    images, labels, num_classes = read_npz(path, "train")
    assert images.dtype == torch.uint8 and images.shape == (5, c, 7, 9)
    assert torch.equal(images, torch.from_numpy(nchw))
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 1, 0]
    assert num_classes == 3


def test_read_npz_num_classes_spans_both_splits_and_accepts_label_columns(tmp_path):
    path = write_npz(tmp_path / "d.npz", y_train=np.array([0, 1, 4, 0, 1, 3], np.uint8),
                     y_test=np.array([[0], [1], [1]], np.int32))
    images, labels, num_classes = read_npz(path, "test")
    assert images.shape == (3, 1, 8, 8)
    assert labels.tolist() == [0, 1, 1] and num_classes == 5


def test_read_npz_refuses_ambiguous_layout(tmp_path):
    path = write_npz(tmp_path / "amb.npz", x_train=np.zeros((6, 3, 5, 3), np.uint8))
    with pytest.raises(HeroError, match=r"'x_train' in .*amb\.npz has shape \(6, 3, 5, 3\), ambiguous"):
        read_npz(path, "train")


@pytest.mark.parametrize("arrays, split, fragment", [
    (dict(y_test=None), "train", r"has no array 'y_test'"),
    (dict(x_train=np.zeros((6, 8, 8), np.float32)), "train", r"'x_train' in .*d\.npz is float32, expected uint8"),
    (dict(y_train=np.zeros(6, np.float64)), "train", r"'y_train' in .*d\.npz must be 1-D integer labels"),
    (dict(y_test=np.array([0, -1, 1])), "test", r"'y_test' in .*d\.npz has label -1 < 0"),
    (dict(y_train=np.array([0, 1, 2, 0, 1])), "train", r"x_train has 6 images but y_train has 5 labels"),
    (dict(y_test=np.array([0, 3, 5])), "train", r"y_test has classes \[3, 5\] that never occur in y_train"),
    (dict(), "val", r"has no array 'y_val'"),
    (dict(), "dev", r"unknown split 'dev': choose one of train, test, val"),
])
def test_read_npz_refusals_name_file_and_array(tmp_path, arrays, split, fragment):
    path = write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(HeroError, match=fragment) as info:
        read_npz(path, split)
    assert "\n" not in str(info.value)


def test_read_npz_refuses_missing_and_non_npz_files(tmp_path):
    with pytest.raises(HeroError, match=r"nope\.npz does not exist"):
        read_npz(tmp_path / "nope.npz", "train")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(HeroError, match=r"junk\.npz is not a readable \.npz file"):
        read_npz(tmp_path / "junk.npz", "train")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(HeroError, match=r"one\.npy holds a single array"):
        read_npz(tmp_path / "one.npy", "train")


# --------------------------------------------------------------------------- folders


def test_scan_folder_classes_are_sorted_train_folders_and_files_sorted(tmp_path):
    root = make_folder(tmp_path, classes=("zebra", "ant", "Moth"), per_class=2)
    save_image(root / "train" / "ant" / "sub" / "deep.jpg", np.zeros((4, 4, 3), np.uint8))
    index = scan_folder(root, "train")
    assert index.classes == ["Moth", "ant", "zebra"]
    names = [p.relative_to(root / "train").as_posix() for p in index.files]
    assert names == ["Moth/0.png", "Moth/1.png", "ant/0.png", "ant/1.png", "ant/sub/deep.jpg",
                     "zebra/0.png", "zebra/1.png"]
    assert index.labels == [0, 0, 1, 1, 1, 2, 2] and index.skipped == 0


def test_scan_folder_test_split_may_lack_classes_but_keeps_train_indices(tmp_path):
    root = make_folder(tmp_path, splits=("train",), classes=("a", "b", "c"))
    make_folder(tmp_path, splits=("test",), classes=("c",), per_class=1)
    index = scan_folder(root, "test")
    assert index.classes == ["a", "b", "c"] and index.labels == [2]


def test_scan_folder_skips_and_counts_non_images_and_ignores_hidden(tmp_path):
    root = make_folder(tmp_path, per_class=2)
    (root / "train" / "cat" / "notes.txt").write_text("x")
    (root / "train" / "cat" / "labels.csv").write_text("x")
    (root / "train" / "README.md").write_text("x")
    (root / "train" / "dog" / ".DS_Store").write_text("x")
    save_image(root / "train" / "dog" / ".hidden.png", np.zeros((4, 4, 3), np.uint8))
    save_image(root / "train" / "dog" / ".cache" / "x.png", np.zeros((4, 4, 3), np.uint8))
    save_image(root / "train" / "dog" / "UPPER.JPG", np.zeros((4, 4, 3), np.uint8), format="JPEG")
    (root / "train" / ".git").mkdir()
    index = scan_folder(root, "train")
    assert index.classes == ["cat", "dog"]
    assert [p.name for p in index.files] == ["0.png", "1.png", "0.png", "1.png", "UPPER.JPG"]
    assert index.skipped == 3


@pytest.mark.parametrize("setup, split, fragment", [
    (lambda r: (r / "test").mkdir(parents=True), "test", r"train is not a folder: an image folder dataset needs"),
    (lambda r: make_folder(r, splits=("train",)), "test", r"test is not a folder: put the test images in"),
    (lambda r: make_folder(r, splits=("train",)), "val", r"val is not a folder"),
    (lambda r: (make_folder(r), (r / "train" / "emu").mkdir()), "train", r"class folder .*train/emu has no images"),
    (lambda r: (make_folder(r), (r / "test" / "cat" / "a.txt").write_text("x"), (r / "test" / "cat" / "0.png").unlink(),
                (r / "test" / "cat" / "1.png").unlink(), (r / "test" / "cat" / "2.png").unlink()),
     "test", r"class folder .*test/cat has no images"),
    (lambda r: (make_folder(r), make_folder(r, splits=("val",), classes=("owl",))), "val",
     r"class folder .*val/owl has no counterpart in .*train"),
    (lambda r: (make_folder(r, splits=("train",)), (r / "test").mkdir()), "test", r"test has no images"),
    (lambda r: ((r / "train").mkdir(parents=True), (r / "test").mkdir()), "train", r"train has no class folders"),
    (lambda r: make_folder(r), "dev", r"unknown split 'dev'"),
])
def test_scan_folder_refusals(tmp_path, setup, split, fragment):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(HeroError, match=fragment):
        scan_folder(root, split)


# --------------------------------------------------------------------------- decoding


def test_decode_image_center_crops_a_wide_image(tmp_path):
    # 40 wide, 20 high: red | green | blue | white in 10-column bands. The shorter side is already 20,
    # so the result is the exact center 20×20 window: the green and blue bands.
    bands = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
    image = np.repeat(bands, 10, axis=0)[None].repeat(20, axis=0)
    save_image(tmp_path / "wide.png", image)
    out = decode_image(tmp_path / "wide.png", 3, 20)
    assert out.dtype == np.uint8 and out.shape == (3, 20, 20)
    assert (out[:, :, :10] == np.array([0, 255, 0])[:, None, None]).all()
    assert (out[:, :, 10:] == np.array([0, 0, 255])[:, None, None]).all()
    # 23 wide: 3 columns too many; the window starts at round(1.5) = 2, as torchvision's center_crop.
    save_image(tmp_path / "odd.png", (np.arange(23, dtype=np.uint8) * 10)[None].repeat(20, axis=0))
    assert decode_image(tmp_path / "odd.png", 1, 20)[0, 0].tolist() == list(range(20, 220, 10))


def test_decode_image_resizes_shorter_side_then_crops_a_tall_image(tmp_path):
    # 20 wide, 80 high, top half black and bottom half white -> resized to 10×40 -> rows 15..24 kept:
    # the top rows of the crop are black, the bottom ones white, the seam in the middle.
    image = np.zeros((80, 20), np.uint8)
    image[40:] = 255
    save_image(tmp_path / "tall.png", image)
    out = decode_image(tmp_path / "tall.png", 1, 10)
    assert out.shape == (1, 10, 10)
    assert (out[0, :4] == 0).all() and (out[0, 6:] == 255).all()
    assert (out[0, 4] < 128).all() and (out[0, 5] > 128).all()


def test_decode_image_converts_channels_like_pillow(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    save_image(tmp_path / "c.png", rgb)
    grey = decode_image(tmp_path / "c.png", 1, 6)
    assert grey.shape == (1, 6, 6) and (grey == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)).all()
    save_image(tmp_path / "g.png", np.full((6, 6), 77, np.uint8))
    assert (decode_image(tmp_path / "g.png", 3, 6) == 77).all()
    with pytest.raises(HeroError, match=r"unknown number of channels 4: choose one of 1, 3"):
        decode_image(tmp_path / "g.png", 4, 6)


def test_decode_image_refuses_corrupt_truncated_and_non_image_files(tmp_path):
    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    data[100:160] = bytes(60)  # zeros over the compressed pixel data
    (tmp_path / "corrupt.png").write_bytes(bytes(data))
    jpeg = io.BytesIO()
    Image.fromarray(smooth_image(rng, 64, 64)).save(jpeg, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (tmp_path / "text.png").write_text("hello")
    for name in ("corrupt.png", "cut.jpg", "text.png"):
        with pytest.raises(HeroError, match=rf"cannot decode image .*{name} \(.*\): replace or remove the file"):
            decode_image(tmp_path / name, 3, 16)
    with pytest.raises(HeroError, match=r"image .*missing\.png does not exist"):
        decode_image(tmp_path / "missing.png", 3, 16)


@pytest.mark.parametrize("stored, channels", [(3, 3), (3, 1), (1, 3), (1, 1)])
@pytest.mark.parametrize("h, w, size", [(50, 37, 16), (24, 64, 24), (32, 32, 32), (20, 30, 40), (200, 300, 32)])
def test_preprocess_array_matches_decode_image(tmp_path, stored, channels, h, w, size):
    # Fine noise on top of the smooth image: resizing without antialiasing misses by ~10 grey
    # levels on average when shrinking, a crop one pixel off by more than 3.
    rng = np.random.default_rng(h * w)
    image = smooth_image(rng, h, w).astype(np.int64) + rng.integers(-40, 41, (h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    image = image if stored == 3 else np.asarray(Image.fromarray(image).convert("L"))
    save_image(tmp_path / "x.png", image)
    via_pillow = torch.from_numpy(decode_image(tmp_path / "x.png", channels, size)).int()
    array = torch.from_numpy(image.reshape(h, w, stored).copy()).permute(2, 0, 1)[None].repeat(3, 1, 1, 1)
    via_torch = preprocess_array(array, channels, size)
    assert via_torch.dtype == torch.uint8 and via_torch.shape == (3, channels, size, size)
    diff = (via_torch.int() - via_pillow).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.3


def test_preprocess_array_center_crops_like_decode(tmp_path):
    image = torch.zeros((2, 1, 8, 16), dtype=torch.uint8)
    image[..., 8:] = 255
    out = preprocess_array(image, 1, 8)  # no resize: columns 4..11 kept
    assert out.shape == (2, 1, 8, 8)
    assert (out[..., :4] == 0).all() and (out[..., 4:] == 255).all()


# --------------------------------------------------------------------------- augmentation


def test_random_resized_crop_flip_is_deterministic_given_generator():
    batch = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    a = random_resized_crop_flip(batch, torch.Generator().manual_seed(1))
    b = random_resized_crop_flip(batch, torch.Generator().manual_seed(1))
    c = random_resized_crop_flip(batch, torch.Generator().manual_seed(2))
    assert a.shape == batch.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_random_resized_crop_flip_full_square_crop_is_identity_or_mirror():
    batch = torch.rand(8, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    same = random_resized_crop_flip(batch, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(same, batch, atol=1e-5, rtol=0)
    mirrored = random_resized_crop_flip(batch, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(mirrored, batch.flip(-1), atol=1e-5, rtol=0)


def test_random_resized_crop_flip_samples_crops_inside_the_image():
    # Each pixel holds its column index: a quarter-area square crop (8 of 16 columns) enlarged 2x
    # spans about 7.5 columns, lies within 0..15 and runs backwards where flipped.
    b, size = 400, 16
    batch = torch.arange(size, dtype=torch.float32).expand(b, 1, size, size).contiguous()
    out = random_resized_crop_flip(batch, torch.Generator().manual_seed(3), scale=(0.25, 0.25), ratio=(1, 1))
    row = out[:, 0, 5]
    span = row.amax(1) - row.amin(1)
    assert ((span >= 7.0) & (span <= 7.5 + 1e-5)).all()
    assert row.min() >= 0 and row.max() <= size - 1
    assert row.amin(1).min() <= 0 and row.amax(1).max() >= size - 1  # offsets reach both edges
    flipped = row[:, 0] > row[:, -1]
    assert 0.4 < flipped.float().mean() < 0.6
    # vertically the crop is a constant-per-row window: every output row of a sample is equal.
    assert torch.equal(out[:, 0, 0], out[:, 0, -1])


def test_random_resized_crop_flip_large_crops_never_leave_the_image():
    # Area fractions near 1 with aspect 3/4..4/3 often draw boxes wider or taller than the image;
    # those draws must be rejected, not clamped: a box past the edge would repeat the edge pixels
    # (channel 0 holds the column index, channel 1 the row index) in more than one output pixel.
    size = 64
    ramp = torch.arange(size, dtype=torch.float32)
    batch = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size)]).expand(300, 2, size, size)
    out = random_resized_crop_flip(batch.contiguous(), torch.Generator().manual_seed(0), scale=(0.9, 1.0))
    cols, rows = out[:, 0, size // 2], out[:, 1, :, size // 2]
    for line in (cols, rows):
        assert ((line == line.amin(1, keepdim=True)).sum(1) <= 1).all()
        assert ((line == line.amax(1, keepdim=True)).sum(1) <= 1).all()


def test_random_resized_crop_flip_default_crops_vary_in_size_and_refuse_uint8():
    batch = torch.arange(32, dtype=torch.float32).expand(200, 1, 32, 32).contiguous()
    out = random_resized_crop_flip(batch, torch.Generator().manual_seed(0))
    span = (out[:, 0, 16].amax(1) - out[:, 0, 16].amin(1))
    assert span.min() < 12 and span.max() > 28  # sqrt(0.08) * 32 ≈ 9 columns up to all 32
    with pytest.raises(HeroError, match=r"expects a float batch"):
        random_resized_crop_flip(torch.zeros((1, 1, 4, 4), dtype=torch.uint8), torch.Generator())


# --------------------------------------------------------------------------- statistics


def test_channel_stats_matches_numpy_on_concatenated_batches():
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 3, 5, 7), dtype=np.uint8) for n in (4, 1, 9)]
    batches[1][:] = 255  # an unusual batch, so a per-batch average of means would differ
    mean, std = channel_stats(torch.from_numpy(b) for b in batches)
    everything = np.concatenate(batches).astype(np.float64) / 255
    np.testing.assert_allclose(mean, everything.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, everything.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert len(mean) == len(std) == 3


def test_channel_stats_refuses_no_pixels_and_float_batches():
    with pytest.raises(HeroError, match=r"channel_stats got no pixels"):
        channel_stats([])
    with pytest.raises(HeroError, match=r"channel_stats expects uint8 batches"):
        channel_stats([torch.zeros(1, 1, 2, 2)])


# --------------------------------------------------------------------------- datasets


def test_folder_images_through_dataloader_with_two_workers(tmp_path):
    root = make_folder(tmp_path, classes=("a", "b", "c"), per_class=3, size=(12, 20))
    save_image(root / "train" / "b" / "photo.jpg", smooth_image(np.random.default_rng(0), 30, 18), format="JPEG")
    index = scan_folder(root, "train")
    data = FolderImages(index, 3, 8)
    assert len(pickle.loads(pickle.dumps(data))) == len(data) == 10
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2)
    images, labels = map(torch.cat, zip(*loader))
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 8, 8)
    assert labels.tolist() == index.labels == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    expected = np.stack([decode_image(p, 3, 8) for p in index.files])
    assert np.array_equal(images.numpy(), expected)
    assert (images[labels == 2] == 200).all()
    in_memory, mem_labels = load_folder(index, 3, 8)
    assert torch.equal(in_memory, images) and torch.equal(mem_labels, labels)
