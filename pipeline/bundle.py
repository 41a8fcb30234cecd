"""The precision-switch bundle: every variant of one model in one folder, ready to copy to a device.

Layout (read on the device by `exporters.device.switch` and `exporters.device.validate_bundle`)::

    manifest.json       format, model facts and one entry per variant (schema below)
    artifacts/<name>.onnx
    test.npz            x: the first `bundle.test_samples` test images, preprocessed as in training
                        (float32, N x C x H x W); y: their labels (int64)
    host_report.json    `exporters.device.validate_bundle` run on this host on this very bundle: the
                        baseline for ``hero check DEVICE_REPORT --baseline host_report.json``

manifest.json's schema, every field's meaning included, is `exporters.device.manifest.SCHEMA`:
the device reads it as untrusted input, and `write_bundle` writes it against the same declaration.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from exporters.device import TOOL_VERSION
from exporters.device.errors import HeroError
from exporters.device.files import make_dirs, sha256_file, write_atomic
from exporters.device.manifest import (FORMAT, FORMAT_VERSION, HOST_REPORT_FILE, MANIFEST, SCHEMA, TEST_DATA_FILE,
                                       read_manifest, verify_file)
from exporters.device.schema import conform, identity
from exporters.device.validate_bundle import validate_bundle
from pipeline.cache import input_key
from pipeline.gate import read_report

if TYPE_CHECKING:  # torch-importing modules load only when a bundle is built: `hero --help` stays fast
    from hero_train.checkpoint import DataRef, Deployable

_TENSOR_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data")


@dataclasses.dataclass(frozen=True)
class BundleOptions:
    """How to build a bundle: test samples to ship (None = the whole test split), and how the host
    run that produces host_report.json is done."""

    test_samples: int | None = 1000
    providers: tuple[str, ...] | None = None
    latency_batch: int = 64
    latency_repeats: int = 10


def refit_group(onnx_path) -> str:
    """sha256 of everything in an ONNX graph that a TensorRT refit cannot change: the nodes and every
    initializer's name, type and shape, and the values of every initializer but the weights (the
    weight and bias inputs of Conv/Gemm/MatMul and the integer input of DequantizeLinear). Variants
    with the same group differ in weight values only, so one refittable engine serves them all
    (TensorRT 10 IRefitter: refit weights keep their count and type; refitting Q/DQ scales is not
    documented)."""
    import onnx

    graph = onnx.load(os.fspath(onnx_path)).graph
    weights = set()
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            weights.add(node.input[0])
        elif node.op_type in ("Conv", "Gemm", "MatMul"):
            weights.update(node.input[1:3])
    for tensor in graph.initializer:
        if tensor.name in weights:
            for field in _TENSOR_DATA_FIELDS:
                tensor.ClearField(field)
    return hashlib.sha256(graph.SerializeToString()).hexdigest()


def _host_entries(rows: list[dict], paths: dict[str, Path]) -> list[dict]:
    """Validation rows joined with their artifact files, checked: one float variant, a file per row."""
    if sum(r["bits"] is None for r in rows) != 1:
        raise HeroError("a bundle needs exactly one float variant (bits null) as its baseline")
    missing = [r["name"] for r in rows if r["name"] not in paths or not Path(paths[r["name"]]).is_file()]
    if missing:
        raise HeroError(f"no artifact file for variants {missing}: export them (rerun `hero run`) before bundling")
    return [dict(r, path=paths[r["name"]]) for r in rows]


def _refuse_external_data(path: Path) -> None:
    """A bundle's integrity is the sha256 of each file it lists; an artifact whose tensors live in
    other files would run on data no hash covers, so it is refused."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(os.fspath(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if uses_external_data(t)]
    if external:
        raise HeroError(f"{path} keeps tensors {', '.join(external[:3])} in external data files, which a bundle "
                        "cannot cover by sha256: export without external data (models under 2 GB need none)")


def _copy_checked(entry: dict, folder: Path) -> str:
    """Copy the entry's artifact into `folder`; the copy must hash to the validated sha256."""
    _refuse_external_data(Path(entry["path"]))
    target = folder / "artifacts" / entry["path"].name
    make_dirs(target.parent)
    shutil.copyfile(entry["path"], target)
    if sha256_file(target) != entry["sha256"]:
        raise HeroError(f"{entry['path']} changed after it was validated: rerun `hero run` before bundling")
    return target.relative_to(folder).as_posix()


def _manifest(loaded: Deployable, entries: list[dict], folder: Path, key: str, samples: int,
              latency_batch: int) -> dict:
    variants = []
    for e in entries:
        artifact = _copy_checked(e, folder)
        variants.append({
            "name": e["name"], **identity(e), "runtime": e["runtime"], "artifact": artifact,
            "sha256": e["sha256"], "file_bytes": (folder / artifact).stat().st_size,
            "refit_group": refit_group(folder / artifact), "torch_accuracy": e["torch_accuracy"],
            "report_accuracy": e["runtime_accuracy"], "host_accuracy": None,
        })
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": TOOL_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.model_ref.label, "dataset": loaded.data.dataset, "num_classes": len(loaded.input.classes),
        "classes": list(loaded.input.classes), "input_shape": list(loaded.input.shape),
        "normalization": loaded.input.normalization(),
        "source_sha256": loaded.sha256, "inputs_key": key,
        "test_data": {"path": TEST_DATA_FILE, "sha256": sha256_file(folder / TEST_DATA_FILE), "samples": samples},
        "host_report": HOST_REPORT_FILE, "latency_batch": latency_batch, "variants": variants,
    }


def _unchanged(out_dir: Path, key: str) -> bool:
    """True when `out_dir` is a complete bundle built from the same inputs."""
    try:
        manifest = read_manifest(out_dir)
        for v in manifest["variants"]:
            verify_file(out_dir, v["artifact"], v["sha256"])
        verify_file(out_dir, manifest["test_data"]["path"], manifest["test_data"]["sha256"])
    except (HeroError, KeyError, TypeError):
        return False
    return manifest.get("inputs_key") == key and (out_dir / HOST_REPORT_FILE).is_file()


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())):
        raise HeroError(f"{out_dir} exists and is not a bundle: choose a new or empty folder for the bundle")


def _swap_in(built: Path, out_dir: Path) -> None:
    """Replace `out_dir` (an earlier bundle or nothing) by `built`, so no stale file survives."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / "bundle")
    os.replace(built, out_dir)
    if old is not None:
        shutil.rmtree(old)


def write_bundle(loaded: Deployable, rows: list[dict], paths: dict[str, Path], out_dir,
                 options: BundleOptions) -> Path:
    """Write the bundle of `rows` (report.json variant rows; `paths` maps their names to artifact
    files) to `out_dir`, replacing an earlier bundle there; returns `out_dir`."""
    from pipeline import stages

    out_dir = Path(out_dir)
    entries = _host_entries(rows, paths)
    key = input_key(format=FORMAT_VERSION, tool=TOOL_VERSION, source=loaded.sha256,
                    data=dataclasses.asdict(loaded.data), options=dataclasses.asdict(options),
                    variants=[{**identity(e), **{k: e.get(k) for k in ("name", "runtime", "sha256", "torch_accuracy",
                                                                       "runtime_accuracy")}} for e in entries])
    _check_replaceable(out_dir)
    if _unchanged(out_dir, key):
        return out_dir
    x, y = stages.load_split(loaded, "test", options.test_samples)
    make_dirs(out_dir.parent)
    built = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.new-"))
    built.chmod(0o755)  # mkdtemp makes it 0700: the bundle is meant for another user on the device
    try:
        np.savez_compressed(built / TEST_DATA_FILE, x=x.astype(np.float32), y=y.astype(np.int64))
        manifest = _manifest(loaded, entries, built, key, len(x), options.latency_batch)
        write_atomic(built / MANIFEST, json.dumps(conform(manifest, SCHEMA, MANIFEST), indent=2))
        providers = list(options.providers) if options.providers else None
        host = validate_bundle(built, "onnxruntime", providers, latency_repeats=options.latency_repeats)
        host["meta"].update(bundle=str(out_dir), role="host")
        accuracy = {r["name"]: r["runtime_accuracy"] for r in [host["baseline"], *host["variants"]]}
        for v in manifest["variants"]:
            v["host_accuracy"] = accuracy[v["name"]]
        write_atomic(built / MANIFEST, json.dumps(conform(manifest, SCHEMA, MANIFEST), indent=2))
        write_atomic(built / HOST_REPORT_FILE, json.dumps(host, indent=2))
        _swap_in(built, out_dir)
    finally:
        if built.exists():
            shutil.rmtree(built)
    return out_dir


def bundle_run(run_dir, data: DataRef, out_dir=None, checkpoint=None, options: BundleOptions = BundleOptions(),
               named=None) -> Path:
    """Bundle a finished ``hero run`` directory from its report.json, artifacts and checkpoint
    (`named` and `data` as `hero_train.checkpoint.load_deployable` takes them; the channels and
    image size the run's data section gives, unless `data` gives them)."""
    from hero_train.checkpoint import load_deployable

    run_dir = Path(run_dir)
    report = read_report(run_dir / "report.json")
    meta = report.get("meta") or {}
    checkpoint = Path(checkpoint or meta.get("checkpoint") or "")
    if not checkpoint.is_file():
        raise HeroError(f"the checkpoint of {run_dir} ({checkpoint}) is not there: pass --checkpoint")
    recorded = ((meta.get("run_inputs") or {}).get("config") or {}).get("data") or {}
    data = dataclasses.replace(data, channels=data.channels or recorded.get("channels"),
                               image_size=data.image_size or recorded.get("image_size"))
    loaded = load_deployable(checkpoint, named, data)
    if meta.get("checkpoint_sha256") not in (None, loaded.sha256):
        raise HeroError(f"{checkpoint} is not the checkpoint {run_dir} was deployed from (sha256 differs): "
                        "pass the right --checkpoint or rerun `hero run`")
    rows = [report["baseline"], *report["variants"]]
    missing = [k for k in ("name", "artifact", "sha256", "torch_accuracy", "runtime") if any(k not in r for r in rows)]
    if missing:
        raise HeroError(f"{run_dir / 'report.json'} lacks {', '.join(missing)} in its rows: rerun `hero run`")
    paths = {r["name"]: run_dir / r["artifact"] for r in rows}
    out = Path(out_dir) if out_dir is not None else run_dir / "bundle"
    return write_bundle(loaded, rows, paths, out, options)
