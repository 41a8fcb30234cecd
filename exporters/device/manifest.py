"""A bundle's manifest.json, declared (`SCHEMA`) and read as untrusted input on the device: every
field checked by type and range before use, unknown keys refused, every file hashed before it is
read, and files the manifest does not list reported. `pipeline.bundle` writes it against the same
declaration; nesting deeper than it allows is refused by `read_json` without a RecursionError.

numpy-free and torch-free: standard library only.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from exporters.device.errors import HeroError
from exporters.device.files import read_json, sha256_file
from exporters.device.schema import (ACT_BITS, BITS, BN_MODES, BOOL, FRACTION, GRIDS, NUMBER, SHA256, TEXT, TEXTS,
                                     Field, ListOf, Record, Type, check, integer, map_of, nullable, one_of)

FORMAT = "hero-deploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEST_DATA_FILE = "test.npz"  # the test images a bundle ships (x float32, y int64)
HOST_REPORT_FILE = "host_report.json"  # validate_bundle run on the host on the bundle
# Written next to the bundle's files on the device: never reported as unlisted.
DEVICE_FILES = ("engines",)


def _is_floats(v) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= 8 and all(NUMBER.accepts(f) for f in v)


NORMALIZATION = Type(
    "null or {mean: [...], std: [...] > 0, samples: int}",
    lambda v: v is None or (isinstance(v, dict) and {"mean", "std"} <= set(v) <= {"mean", "std", "samples"}
                            and _is_floats(v["mean"]) and _is_floats(v["std"]) and len(v["mean"]) == len(v["std"])
                            and all(s > 0 for s in v["std"]) and integer(1).accepts(v.get("samples", 1))))

VARIANT = Record({
    "name": Field(TEXT, "the variant's name (fp32, w8, w4a8, ...)", required=True),
    "bits": Field(nullable(BITS), "weight bits; null: the float variant", required=True),
    "symmetric": Field(BOOL, "the weight grid's zero point is 0", required=True),
    "per_channel": Field(BOOL, "one weight scale per output channel (else per tensor)", required=True),
    "act_bits": Field(nullable(one_of(ACT_BITS)), "null: float activations", required=True),
    "bn": Field(one_of(*BN_MODES), "how BatchNorm meets the quantizer (QuantSpec.bn)"),
    "grid": Field(one_of(*GRIDS), "the weight grid (QuantSpec.grid)"),
    "layer_bits": Field(nullable(map_of(BITS)), "mixed precision: layer name -> bits, else null"),
    "block_size": Field(nullable(integer(16)), "Linear weights per block of this many inputs, else null"),
    "runtime": Field(TEXT, "the runtime it was validated with on the host"),
    "artifact": Field(TEXT, "its ONNX file, a path relative to the bundle", required=True),
    "sha256": Field(SHA256, "the artifact's sha256", required=True),
    "file_bytes": Field(integer(0), "the artifact's size"),
    "refit_group": Field(SHA256, "variants with one refit_group differ in weight values only "
                                 "(pipeline.bundle.refit_group): one refittable TensorRT engine serves them"),
    "torch_accuracy": Field(nullable(FRACTION), "the PyTorch emulation's accuracy in the run's report.json"),
    "report_accuracy": Field(nullable(FRACTION), "runtime_accuracy in the run's report.json (its validation samples)"),
    "host_accuracy": Field(nullable(FRACTION), "the runtime's accuracy on test.npz on the host: what the "
                                               "device's should match"),
})
TEST_DATA = Record({
    "path": Field(TEXT, "test.npz: x float32 N x C x H x W preprocessed as in training, y int64 labels",
                  required=True),
    "sha256": Field(SHA256, "the file's sha256", required=True),
    "samples": Field(integer(1), "N", required=True),
})
SCHEMA = Record({
    "format": Field(one_of(FORMAT), "what the file is", required=True),
    "format_version": Field(one_of(FORMAT_VERSION), "the layout's version", required=True),
    "tool_version": Field(TEXT, "the hero-deploy that wrote it"),
    "created": Field(TEXT, "when, ISO 8601 UTC"),
    "model": Field(TEXT, "the model's name or factory"),
    "dataset": Field(TEXT, "the dataset the checkpoint was trained on"),
    "num_classes": Field(integer(1), "the model's outputs"),
    "classes": Field(nullable(TEXTS), "class names, in output order, where known"),
    "input_shape": Field(ListOf(integer(1, 1 << 20), 1, 8), "[C, H, W] of one image", required=True),
    "normalization": Field(NORMALIZATION, "the mean and std inputs are normalised with (samples: how many "
                                          "images a custom dataset's statistics were measured on)"),
    "source_sha256": Field(SHA256, "the checkpoint's sha256"),
    "inputs_key": Field(SHA256, "what the bundle was built from; an unchanged rebuild is skipped"),
    "test_data": Field(TEST_DATA, "the test images shipped with the bundle", required=True),
    "host_report": Field(TEXT, "host_report.json: validate_bundle run on the host on this very bundle, the "
                               "baseline for hero check DEVICE_REPORT --baseline host_report.json", required=True),
    "latency_batch": Field(integer(1, 1 << 16), "the batch latency is timed at, beside batch 1, on host and device",
                           required=True),
    "variants": Field(ListOf(VARIANT, 1, 64), "one entry per precision", required=True),
})


def read_manifest(bundle_dir) -> dict:
    """The bundle's manifest, every field checked against `SCHEMA`."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise HeroError(f"bundle folder {bundle_dir} does not exist: pass the folder `hero bundle` wrote")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise HeroError(f"{bundle_dir} has no {MANIFEST}: is it a bundle written by `hero bundle`?")
    manifest = read_json(path, "manifest", "", ": copy the bundle again")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HeroError(f"{path} is not a {FORMAT} manifest: pass the folder `hero bundle` wrote")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise HeroError(f"{path} has bundle format version {manifest.get('format_version')!r}, this reader "
                        f"takes version {FORMAT_VERSION}: rebuild the bundle or update hero-deploy on the device")
    check(manifest, SCHEMA, str(path), ": rebuild the bundle with this version of hero-deploy")
    plain = [v for v in manifest["variants"] if not v.get("layer_bits")]
    for i, v in enumerate(plain):
        twin = next((w for w in plain[i + 1:] if (w["bits"], w["act_bits"]) == (v["bits"], v["act_bits"])), None)
        if twin is not None:
            raise HeroError(f"{path}: variants {v['name']} and {twin['name']} both have bits {v['bits']} and act_bits "
                            f"{v['act_bits']}: one variant per precision; rebuild the bundle")
    for key in ("name", "artifact"):
        values = [v[key] for v in manifest["variants"]]
        if len(set(values)) != len(values):
            raise HeroError(f"{path}: two variants share one {key}: rebuild the bundle")
    return manifest


def bundle_path(bundle_dir: Path, relative: str) -> Path:
    """The file `relative` (a manifest path) inside the bundle; paths leaving the bundle are refused."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in relative:
        raise HeroError(f"bundle manifest path {relative!r} is not a relative path inside the bundle: "
                        "rebuild the bundle with `hero bundle`")
    return Path(bundle_dir, *rel.parts)


def verify_file(bundle_dir: Path, relative: str, sha256: str) -> Path:
    """The bundle file `relative`, after checking that its sha256 is the manifest's."""
    path = bundle_path(bundle_dir, relative)
    if not path.is_file():
        raise HeroError(f"bundle {bundle_dir} lacks {relative}, which its manifest lists: copy the whole bundle")
    actual = sha256_file(path)
    if actual != sha256:
        raise HeroError(f"{relative} in bundle {bundle_dir} has sha256 {actual[:12]}… but the manifest says "
                        f"{str(sha256)[:12]}…: the file was changed or damaged in transfer; copy the bundle again")
    return path


def unlisted_files(bundle_dir, manifest: dict) -> list[str]:
    """Files in the bundle that the manifest does not list (relative POSIX paths, sorted): a copy that
    picked up something else, or an artifact's external data, which no sha256 covers."""
    bundle_dir = Path(bundle_dir)
    listed = {MANIFEST, manifest["test_data"]["path"], manifest["host_report"], *(v["artifact"] for v in manifest["variants"])}
    found = []
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_file() and rel not in listed and rel.split("/")[0] not in DEVICE_FILES:
            found.append(rel)
    return found


# ---- how a variant is named to a switcher ------------------------------------------------------

def precision_keys(variants: list[dict]) -> dict:
    """{how each variant is named to `set_precision`: variant}. A variant is named by its bits (None =
    float), except a mixed-precision variant (per-layer widths) and an activation-quantized variant
    whose bits a weight-only variant of the bundle also has (w8a8 beside w8): those by their name."""
    widths = [v["bits"] for v in variants if not v.get("layer_bits")]
    return {(v["name"] if v.get("layer_bits") or (v.get("act_bits") and widths.count(v["bits"]) > 1) else v["bits"]): v
            for v in variants}


def precision_order(key: int | str | None) -> tuple:
    """Sort key: float (None) first, then from the most bits to the fewest, then mixed variants by name."""
    return (key is not None, isinstance(key, str), -(key or 0) if not isinstance(key, str) else 0, str(key))
