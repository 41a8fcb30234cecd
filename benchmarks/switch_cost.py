"""What precision switching costs on the device at hand, for ResNet18 at 224x224 (issue 25).

One precision-switch bundle of five variants exported from one model: fp32 (BatchNorm folded), w8a8
and w4a8 (`QuantSpec(bits, act_bits=8)`, the default "onnxruntime" activation layout: QLinearConv
after ORT's optimisation), weight-only w8 and w4 (INT4 storage). The model is
`imagenet_models.ResNet18` with random weights and settled BatchNorm statistics; the images are
random uint8 pictures, labelled with the FP32 model's own top-1, so a variant's accuracy is its top-1
agreement with FP32 (random weights have small margins among 1,000 classes, so 8-bit variants agree
less than a trained network's would; the numbers that matter here are costs and host = device).
Activation ranges are calibrated on `--calibration-images` other random images. The bundle is
written by `pipeline.bundle.write_bundle`, which validates it on the host with ONNX Runtime
(host_report.json).

Printed, from one run:

1. Per variant, the device costs `python -m exporters.device.validate_bundle` measures, run in a
   fresh process with torch blocked, as on a device: prepare_ms (session build and first batch-1
   run: a cold switch to it), resident_mib (its session's VmRSS growth, one in-process reading),
   latency_ms (one predict of `--latency-batch` images), and the hot and cold switch latency.
2. Resident memory of a whole switcher against one FP32 session (ONNX Runtime): the VmRSS growth of
   a freshly spawned process from before building it to after it, the runtime warmed up first on a
   one-Conv model and glibc's heap trimmed before both readings (`exporters.device.memory`, as
   runtime_speed.py measures one session); median of `--memory-repeats` processes. resident=2 is
   read after one switch to every precision (so evicted sessions had their chance to leave memory
   behind); all prepared right after building.
3. OpenVINO (when installed) on the same bundle, validated in a fresh process: per variant its
   accuracy against the host's (ONNX Runtime on this host), and its device costs.

    python benchmarks/switch_cost.py                     # about 5 minutes on 2 cores
    python benchmarks/switch_cost.py --image-size 64 --test-images 8 --memory-repeats 1   # smoke test
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from exporters.calibrate import calibrate_activations
from exporters.device import memory
from exporters.device.files import sha256_file
from exporters.onnx import ExportOptions, export_onnx
from exporters.quantize import QuantSpec

try:
    from benchmarks import imagenet_models
except ImportError:  # run as a script: its own folder is on sys.path
    import imagenet_models

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> how it is quantized and stored
    "fp32": (QuantSpec(), ExportOptions()),
    "w8a8": (QuantSpec(bits=8, act_bits=8), ExportOptions()),
    "w4a8": (QuantSpec(bits=4, act_bits=8), ExportOptions()),
    "w8": (QuantSpec(bits=8), ExportOptions()),
    "w4": (QuantSpec(bits=4), ExportOptions(int4_storage=True)),
}
NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
_IDENTITY = ("bits", "symmetric", "per_channel", "act_bits", "bn", "grid", "layer_bits")
# The device side, as on a device: torch and the host packages cannot be imported.
_DEVICE_VALIDATE = """
import runpy, sys
for blocked in ("torch", "hero_train", "pipeline", "click", "onnx", "pydantic", "yaml", "matplotlib"):
    sys.modules[blocked] = None
sys.argv = ["validate_bundle", *sys.argv[1:]]
runpy.run_module("exporters.device.validate_bundle", run_name="__main__")
"""


# ---- the bundle -----------------------------------------------------------------------------------

def _write_npz(path: Path, test: np.ndarray, test_labels: np.ndarray, calibration: np.ndarray) -> Path:
    """An .npz dataset (hero_train.images.read_npz): the test images, and as training split the
    calibration images first, then the test images again (every test class must occur in training)."""
    train_labels = np.concatenate([np.full(len(calibration), test_labels[0]), test_labels])
    np.savez(path, x_train=np.concatenate([calibration, test]), y_train=train_labels, x_test=test, y_test=test_labels)
    return path


def build_bundle(folder: Path, image_size: int, test_images: int, calibration_images: int,
                 latency_batch: int) -> Path:
    """Export VARIANTS of one ResNet18 and write them as a bundle in folder/bundle."""
    from hero_train.checkpoint import Loaded
    from pipeline import stages
    from pipeline.bundle import BundleOptions, write_bundle

    model = imagenet_models.settle_batchnorm(imagenet_models.build("resnet18"), image_size)
    rng = np.random.default_rng(0)
    test = rng.integers(0, 256, (test_images, image_size, image_size, 3), dtype=np.uint8)
    calibration = rng.integers(0, 256, (calibration_images, image_size, image_size, 3), dtype=np.uint8)
    data = _write_npz(folder / "data.npz", test, np.zeros(test_images, np.int64), calibration)
    ckpt = {"model": {"name": None, "factory": "benchmarks.imagenet_models:ResNet18", "kwargs": {},
                      "num_classes": imagenet_models.NUM_CLASSES, "in_channels": 3},
            "input_shape": [3, image_size, image_size], "dataset": str(data), "normalization": NORMALIZATION}
    loaded = Loaded(folder / "resnet18.pt", ckpt, model, "0" * 64)
    x_test, _ = stages.eval_data(loaded, "test", None)
    with torch.no_grad():
        labels = torch.cat([model(torch.from_numpy(x_test[i:i + 8])) for i in range(0, len(x_test), 8)]).argmax(1)
    _write_npz(data, test, labels.numpy().astype(np.int64), calibration)  # labels: FP32's own top-1
    x_train, _ = stages.eval_data(loaded, "train", calibration_images)
    batches = [torch.from_numpy(x_train[i:i + 8]) for i in range(0, len(x_train), 8)]
    paths, rows = {}, []
    for name, (spec, options) in VARIANTS.items():
        calibration_ranges = calibrate_activations(model, batches, spec) if spec.act_bits else None
        paths[name] = export_onnx(model, folder / "artifacts" / f"{name}.onnx", spec, options, calibration_ranges,
                                  input_shape=(3, image_size, image_size))
        rows.append({"name": name, **{k: spec.to_dict()[k] for k in _IDENTITY}, "runtime": "onnxruntime",
                     "torch_accuracy": None, "runtime_accuracy": None, "sha256": sha256_file(paths[name]),
                     "artifact": f"artifacts/{name}.onnx"})
    options = BundleOptions(test_samples=None, providers=("CPUExecutionProvider",), latency_batch=latency_batch,
                            latency_repeats=5)
    return write_bundle(loaded, rows, paths, folder / "bundle", options)


# ---- the device side ------------------------------------------------------------------------------

def device_report(bundle: Path, runtime: str, out: Path, latency_batch: int) -> dict:
    """`validate_bundle` on `bundle` in a fresh process with torch blocked; its report."""
    done = subprocess.run([sys.executable, "-c", _DEVICE_VALIDATE, str(bundle), "--runtime", runtime, "--out", str(out),
                           "--latency-batch", str(latency_batch), "--latency-repeats", "5", "--switch-repeats", "20"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"validate_bundle --runtime {runtime} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(out.read_text())


def _warm_up_onnxruntime(scratch: Path) -> None:
    """Build and run a one-Conv session, so ORT's libraries, kernel registry and thread pools are in
    place before the reading (runtime_speed._tiny_conv)."""
    try:
        from benchmarks.runtime_speed import _tiny_conv
    except ImportError:
        from runtime_speed import _tiny_conv
    from exporters.device.runtime import OnnxRuntimeRunner

    OnnxRuntimeRunner(_tiny_conv(scratch / "tiny.onnx"), ["CPUExecutionProvider"]).predict(
        np.zeros((1, 3, 8, 8), np.float32))


def switcher_rss_kib(bundle: str, resident: int | None, fp32_only: bool) -> int | None:
    """VmRSS growth of this (fresh) process from before to after preparing one FP32 session
    (`fp32_only`) or a PrecisionSwitcher with `resident`, cycled once through every precision."""
    from exporters.device.runtime import OnnxRuntimeRunner
    from exporters.device.switch import PrecisionSwitcher

    with tempfile.TemporaryDirectory() as scratch:
        _warm_up_onnxruntime(Path(scratch))
    shape = json.loads((Path(bundle) / "manifest.json").read_text())["input_shape"]
    before = memory.reading()
    if fp32_only:
        held = OnnxRuntimeRunner(Path(bundle) / "artifacts" / "fp32.onnx", ["CPUExecutionProvider"])
        held.predict(np.zeros((1, *shape), np.float32))
    else:
        held = PrecisionSwitcher(bundle, providers=["CPUExecutionProvider"], resident=resident)
        if resident is not None:
            for key in held.precisions[1:] + held.precisions[:1]:
                held.set_precision(key)
    grown = memory.resident_delta_kib(before)
    del held
    return grown


def resident_memory_mib(bundle: Path, repeats: int) -> dict[str, float | None]:
    """{case: median VmRSS growth in MiB over `repeats` fresh processes} for one FP32 session, a
    switcher with resident=2 and one with every variant prepared."""
    context = multiprocessing.get_context("spawn")
    cases = {"one fp32 session": (None, True), "resident=2": (2, False), "all prepared": (None, False)}
    out = {}
    for case, (resident, fp32_only) in cases.items():
        readings = []
        for _ in range(repeats):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                readings.append(pool.submit(switcher_rss_kib, str(bundle), resident, fp32_only).result())
        out[case] = None if None in readings else statistics.median(readings) / 1024
    return out


# ---- printing -------------------------------------------------------------------------------------

def _rows(report: dict) -> list[dict]:
    return [report["baseline"], *report["variants"]]


def _cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def costs_table(report: dict, openvino: dict | None) -> str:
    ov = {r["name"]: r for r in _rows(openvino)} if openvino else {}
    header = ["variant", "file MiB", "prepare ms", "first run ms", "session MiB", f"latency ms (b{report['meta']['latency_batch']})",
              "host acc (ORT)", "device acc (ORT)"]
    if openvino:
        header += ["OpenVINO acc", "OpenVINO prepare ms", "OpenVINO latency ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in _rows(report):
        c = r["costs"]
        cells = [r["name"], f"{r['file_bytes'] / 2 ** 20:.1f}", f"{c['prepare_ms']:.0f}", f"{c['first_run_ms']:.0f}",
                 _cell(c["resident_mib"], ".1f"), f"{r['latency_ms']:.1f}", _cell(r["host_accuracy"], ".2%"),
                 f"{r['runtime_accuracy']:.2%}"]
        if openvino:
            o = ov[r["name"]]
            cells += [f"{o['runtime_accuracy']:.2%}", f"{o['costs']['prepare_ms']:.0f}", f"{o['latency_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def switch_lines(report: dict, label: str) -> list[str]:
    hot, cold = report["meta"]["switch_latency"], report["meta"]["cold_switch_latency"]
    return [f"{label} switch, every variant prepared: median {hot['median_ms'] * 1000:.1f} µs, max "
            f"{hot['max_ms'] * 1000:.1f} µs over {hot['switches']} switches; cold (resident=1, evict and prepare): "
            f"median {cold['median_ms']:.0f} ms, max {cold['max_ms']:.0f} ms over {cold['switches']} switches"]


def memory_lines(mib: dict) -> list[str]:
    fp32 = mib["one fp32 session"]
    if fp32 is None:
        return [f"resident memory: not measured ({memory.unavailable_reason()})"]
    return [f"resident memory, ORT, median of fresh processes: one FP32 session {fp32:.1f} MiB; "
            + "; ".join(f"{case} {mib[case]:.1f} MiB ({mib[case] / fp32:.2f}x FP32)" for case in ("resident=2",
                                                                                              "all prepared"))]


def accuracy_lines(openvino: dict) -> list[str]:
    parts = [f"{r['name']} {r['runtime_accuracy']:.2%} vs {r['host_accuracy']:.2%}" for r in _rows(openvino)]
    differ = sum(abs(r["runtime_accuracy"] - r["host_accuracy"]) > 0 for r in _rows(openvino))
    return [f"OpenVINO (device) vs ONNX Runtime (host) accuracy on {openvino['meta']['test_samples']} images: "
            + ", ".join(parts) + f"; {differ} of {len(parts)} variants differ"]


@click.command()
@click.option("--image-size", type=click.IntRange(min=32), default=imagenet_models.IMAGE_SIZE, show_default=True)
@click.option("--test-images", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--calibration-images", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--latency-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--memory-repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Keep the bundle and reports here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write results here.")
def main(image_size, test_images, calibration_images, latency_batch, memory_repeats, out_dir, json_path):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        bundle = build_bundle(folder, image_size, test_images, calibration_images, latency_batch)
        ort = device_report(bundle, "onnxruntime", folder / "device_onnxruntime.json", latency_batch)
        has_openvino = subprocess.run([sys.executable, "-c", "import openvino"], capture_output=True).returncode == 0
        openvino = device_report(bundle, "openvino", folder / "device_openvino.json", latency_batch) \
            if has_openvino else None
        mib = resident_memory_mib(bundle, memory_repeats)
    print(f"\n## ResNet18 {image_size}x{image_size}, {test_images} test images, "
          f"onnxruntime {ort['meta']['runtime_version']}, {ort['meta']['host']}\n")
    print(costs_table(ort, openvino) + "\n")
    lines = switch_lines(ort, "ORT") + (switch_lines(openvino, "OpenVINO") if openvino else []) + memory_lines(mib)
    lines += accuracy_lines(openvino) if openvino else ["OpenVINO rows skipped: openvino is not installed"]
    print("\n".join(lines))
    if json_path:
        Path(json_path).write_text(json.dumps({"onnxruntime": ort, "openvino": openvino, "resident_mib": mib},
                                              indent=2))


if __name__ == "__main__":
    main()
