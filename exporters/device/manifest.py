"""A bundle's manifest.json, read as untrusted input on the device: every field checked by type and
range before use, unknown keys refused, every file hashed before it is read, and files the manifest
does not list reported. The schema (what `pipeline.bundle` writes) is `_TOP` and `_VARIANT` below;
nesting deeper than they allow is refused by `read_json` without a RecursionError.

numpy-free and torch-free: standard library only.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path, PurePosixPath

from exporters.device.bits import SUPPORTED_BITS
from exporters.device.errors import HeroError
from exporters.device.files import read_json, sha256_file

FORMAT = "hero-deploy-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRIDS = ("canonical", "nested")
BN_MODES = ("fold-first", "quantize-first", "keep")
# Written next to the bundle's files on the device: never reported as unlisted.
DEVICE_FILES = ("engines",)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _text(v) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 4096


def _int(lo: int, hi: int | None = None):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _optional(check):
    return lambda v: v is None or check(v)


def _fraction(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


def _bits(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v in SUPPORTED_BITS


def _layer_bits(v) -> bool:
    return isinstance(v, dict) and len(v) <= 100_000 and all(_text(k) and _bits(b) for k, b in v.items())


def _shape(v) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= 8 and all(_int(1, 1 << 20)(d) for d in v)


def _texts(v) -> bool:
    return isinstance(v, list) and len(v) <= 100_000 and all(isinstance(s, str) and len(s) <= 4096 for s in v)


def _floats(v) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= 8 and all(
        isinstance(f, numbers.Real) and not isinstance(f, bool) and math.isfinite(f) for f in v)


def _normalization(v) -> bool:
    # "samples": how many images a custom dataset's statistics were measured on
    return isinstance(v, dict) and {"mean", "std"} <= set(v) <= {"mean", "std", "samples"} \
        and _floats(v["mean"]) and _floats(v["std"]) and len(v["mean"]) == len(v["std"]) \
        and all(s > 0 for s in v["std"]) and _int(1)(v.get("samples", 1))


def _sha(v) -> bool:
    return isinstance(v, str) and bool(_SHA256.match(v))


_VARIANT = {  # key: (required, check, what it must be)
    "name": (True, _text, "a name"),
    "bits": (True, _optional(_bits), f"null or one of {', '.join(map(str, SUPPORTED_BITS))}"),
    "symmetric": (True, lambda v: isinstance(v, bool), "true or false"),
    "per_channel": (True, lambda v: isinstance(v, bool), "true or false"),
    "act_bits": (True, lambda v: v is None or (_int(8, 8)(v)), "null or 8"),
    "bn": (False, lambda v: v in BN_MODES, " or ".join(BN_MODES)),
    "grid": (False, lambda v: v in GRIDS, " or ".join(GRIDS)),
    "layer_bits": (False, _optional(_layer_bits), "null or an object of layer name -> bit width"),
    "block_size": (False, _optional(_int(16)), "null or an integer >= 16"),
    "runtime": (False, _text, "a runtime name"),
    "artifact": (True, _text, "a relative path"),
    "sha256": (True, _sha, "64 lowercase hex digits"),
    "file_bytes": (False, _int(0), "an integer >= 0"),
    "refit_group": (False, _sha, "64 lowercase hex digits"),
    "torch_accuracy": (False, _optional(_fraction), "null or a fraction in [0, 1]"),
    "report_accuracy": (False, _optional(_fraction), "null or a fraction in [0, 1]"),
    "host_accuracy": (False, _optional(_fraction), "null or a fraction in [0, 1]"),
}
_TEST_DATA = {
    "path": (True, _text, "a relative path"),
    "sha256": (True, _sha, "64 lowercase hex digits"),
    "samples": (True, _int(1), "an integer >= 1"),
}
_TOP = {
    "format": (True, lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": (True, lambda v: v == FORMAT_VERSION and not isinstance(v, bool), str(FORMAT_VERSION)),
    "tool_version": (False, _text, "a version"),
    "created": (False, _text, "a timestamp"),
    "model": (False, _text, "a model name"),
    "dataset": (False, _text, "a dataset name"),
    "num_classes": (False, _int(1), "an integer >= 1"),
    "classes": (False, _optional(_texts), "null or a list of class names"),
    "input_shape": (True, _shape, "a list of 1 to 8 positive integers"),
    "normalization": (False, _optional(_normalization), "null or {mean: [...], std: [...] > 0, samples: int}"),
    "source_sha256": (False, _sha, "64 lowercase hex digits"),
    "inputs_key": (False, _sha, "64 lowercase hex digits"),
    "test_data": (True, lambda v: isinstance(v, dict), "an object"),
    "host_report": (False, _text, "a relative path"),
    "latency_batch": (False, _int(1, 1 << 16), "an integer from 1 to 65536"),
    "variants": (True, lambda v: isinstance(v, list) and 0 < len(v) <= 64, "a list of 1 to 64 variants"),
}


def _check_fields(obj, schema: dict, where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise HeroError(f"{path}: {where} must be an object, got {type(obj).__name__}: rebuild the bundle")
    unknown = sorted(set(obj) - set(schema))
    if unknown:
        raise HeroError(f"{path}: {where} has unknown keys {', '.join(map(repr, unknown[:5]))}: "
                        "rebuild the bundle with this version of hero-deploy")
    missing = [k for k, (required, _, _) in schema.items() if required and k not in obj]
    if missing:
        raise HeroError(f"{path}: {where} lacks {', '.join(missing)}: rebuild the bundle")
    for key, value in obj.items():
        _, check, expected = schema[key]
        if not check(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise HeroError(f"{path}: {where}{key} must be {expected}, got {shown}: rebuild the bundle")


def read_manifest(bundle_dir) -> dict:
    """The bundle's manifest, every field checked against the schema above."""
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
    _check_fields(manifest, _TOP, "", path)
    _check_fields(manifest["test_data"], _TEST_DATA, "test_data.", path)
    for i, variant in enumerate(manifest["variants"]):
        _check_fields(variant, _VARIANT, f"variants[{i}].", path)
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
    listed = {MANIFEST, manifest["test_data"]["path"], *(v["artifact"] for v in manifest["variants"])}
    if manifest.get("host_report"):
        listed.add(manifest["host_report"])
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
