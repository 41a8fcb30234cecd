"""What precision switching costs on the device at hand, for ResNet18 at 224x224.

One precision-switch bundle of five variants exported from one model: fp32 (BatchNorm folded), w8a8
and w4a8 (`QuantSpec(bits, act_bits=8)`, the default "onnxruntime" activation layout: QLinearConv
after ORT's optimisation), weight-only w8 and w4 (INT4 storage). The model is
`imagenet_models.ResNet18` with random weights and settled BatchNorm statistics; the test images are
the `--test-images` of `--pool` x as many random uint8 pictures on which the smallest top-1 margin
over the five variants' emulations (`quantize_model`; top-1 minus top-2 logit, over the logits'
standard deviation) is largest, labelled with the FP32 model's own top-1, so a variant's accuracy is
its top-1 agreement with FP32. Random weights give
1,000 logits with small margins (median 0.08 standard deviations on random pictures); there the 1-2%
by which two runtimes' integer arithmetic differ flips a tenth of the top-1s between runtimes, and
host = device accuracy would measure rounding noise, not the runtime. Pictures on which every
variant is decisive make it measure the runtime.
Activation ranges are calibrated on `--calibration-images` other random images. The bundle is
written by `pipeline.bundle.write_bundle`, which validates it on the host with ONNX Runtime
(host_report.json).

Printed, from one run:

1. Per variant, the device costs `python -m exporters.device.validate_bundle` measures, run in a
   fresh process with torch blocked, as on a device: ready_ms (session build and first batch-1 run:
   a cold switch to it), its session's VmRSS growth built and after the first run (one in-process
   reading), weight layers on integer / float kernels, latency at batch 1 and at `--latency-batch`
   (median / 99th percentile of 10 runs), and the hot and cold switch latency.
2. Resident memory of one FP32 session, one W8A8 session (built, and after its first run: whether
   the integer variant keeps only its int8 weights resident) and of a whole switcher (ONNX
   Runtime): the VmRSS growth of a freshly spawned process from before building it to after it, the runtime warmed up first on a
   one-Conv model and glibc's heap trimmed before both readings (`exporters.device.memory`, as
   runtime_speed.py measures one session); median of `--memory-repeats` processes. resident=2 is
   read after one switch to every precision (so evicted sessions had their chance to leave memory
   behind); all prepared right after building.
3. OpenVINO (when installed) on the same bundle, validated in a fresh process: per variant its
   accuracy against the host's (ONNX Runtime on this host), its device costs, and its logits
   against ONNX Runtime's on the same artifact (relative RMS error, top-1 agreement).

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
from exporters.device.schema import identity
from exporters.onnx import ExportOptions, export_onnx
from exporters.quantize import QuantSpec, quantize_model

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
# The device side, as on a device: torch and the host packages cannot be imported.
_DEVICE_VALIDATE = """
import runpy, sys
for blocked in ("torch", "hero_train", "pipeline", "click", "onnx", "pydantic", "yaml", "matplotlib"):
    sys.modules[blocked] = None
sys.argv = ["validate_bundle", *sys.argv[1:]]
runpy.run_module("exporters.device.validate_bundle", run_name="__main__")
"""


# OpenVINO against ONNX Runtime on each artifact of the bundle, logits compared directly (torch blocked).
_DEVICE_COMPARE = """
import json, sys
for blocked in ("torch", "hero_train", "pipeline", "click", "onnx", "pydantic", "yaml", "matplotlib"):
    sys.modules[blocked] = None
import numpy as np
from exporters.device.manifest import read_manifest
from exporters.device.openvino_runtime import OpenVinoRunner
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.device.compare import compare, relative_error
bundle = sys.argv[1]
with np.load(bundle + "/test.npz") as data:
    x = data["x"]
out = {}
for v in read_manifest(bundle)["variants"]:
    path = bundle + "/" + v["artifact"]
    ort = OnnxRuntimeRunner(path, ["CPUExecutionProvider"]).predict(x, 8)
    ov = OpenVinoRunner(path).predict(x, 8)
    top = np.sort(ort, axis=1)
    margin = (top[:, -1] - top[:, -2]) / ort.std(axis=1)
    out[v["name"]] = {"relative_error": relative_error(ov, ort), "top1_agreement": compare(ort, ov).agreement.rate,
                      "median_margin": float(np.median(margin))}
print(json.dumps(out))
"""


# ---- the bundle -----------------------------------------------------------------------------------

def _write_npz(path: Path, test: np.ndarray, test_labels: np.ndarray, calibration: np.ndarray) -> Path:
    """An .npz dataset (hero_train.images.read_npz): the test images, and as training split the
    calibration images first, then the test images again (every test class must occur in training)."""
    train_labels = np.concatenate([np.full(len(calibration), test_labels[0]), test_labels])
    np.savez(path, x_train=np.concatenate([calibration, test]), y_train=train_labels, x_test=test, y_test=test_labels)
    return path


def _logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + 8])) for i in range(0, len(x), 8)]).numpy()


def top1_margin(logits: np.ndarray) -> np.ndarray:
    """Per row, the top-1 logit minus the top-2 one, over the row's standard deviation."""
    top = np.sort(logits, axis=1)
    return (top[:, -1] - top[:, -2]) / logits.std(axis=1)


def build_bundle(folder: Path, image_size: int, test_images: int, calibration_images: int,
                 latency_batch: int, pool: int = 1) -> Path:
    """Export VARIANTS of one ResNet18 and write them as a bundle in folder/bundle."""
    from hero_train.checkpoint import DataRef, Deployable, InputSpec
    from hero_train.models import ModelRef
    from pipeline import stages
    from pipeline.bundle import BundleOptions, write_bundle

    model = imagenet_models.settle_batchnorm(imagenet_models.build("resnet18"), image_size)
    rng = np.random.default_rng(0)
    test = rng.integers(0, 256, (test_images * pool, image_size, image_size, 3), dtype=np.uint8)
    calibration = rng.integers(0, 256, (calibration_images, image_size, image_size, 3), dtype=np.uint8)
    data = _write_npz(folder / "data.npz", test, np.zeros(len(test), np.int64), calibration)
    shape = (3, image_size, image_size)
    loaded = Deployable(model, ModelRef(factory="benchmarks.imagenet_models:ResNet18"),
                        InputSpec(shape, tuple(NORMALIZATION["mean"]), tuple(NORMALIZATION["std"]),
                                  tuple(str(i) for i in range(imagenet_models.NUM_CLASSES))),
                        DataRef(str(data), None, 3, image_size), folder / "resnet18.pt", "0" * 64)
    x_test, _ = stages.load_split(loaded, "test", None)
    x_train, _ = stages.load_split(loaded, "train", calibration_images)
    batches = [torch.from_numpy(x_train[i:i + 8]) for i in range(0, len(x_train), 8)]
    ranges = {name: calibrate_activations(model, batches, spec) if spec.act_bits else None
              for name, (spec, _) in VARIANTS.items()}
    logits = _logits(model, x_test)
    margins = [top1_margin(_logits(quantize_model(model, spec, ranges[name]), x_test))
               for name, (spec, _) in VARIANTS.items()]
    keep = np.sort(np.argsort(-np.min(margins, axis=0), kind="stable")[:test_images])  # every variant decisive
    test, labels = test[keep], logits[keep].argmax(1).astype(np.int64)  # labels: FP32's own top-1
    _write_npz(data, test, labels, calibration)
    paths, rows = {}, []
    for name, (spec, options) in VARIANTS.items():
        paths[name] = export_onnx(model, folder / "artifacts" / f"{name}.onnx", spec, options, ranges[name],
                                  input_shape=shape)
        rows.append({"name": name, **identity(spec.to_dict()), "runtime": "onnxruntime",
                     "torch_accuracy": None, "runtime_accuracy": None, "sha256": sha256_file(paths[name]),
                     "artifact": f"artifacts/{name}.onnx"})
    options = BundleOptions(test_samples=None, providers=("CPUExecutionProvider",), latency_batch=latency_batch,
                            latency_repeats=5)
    return write_bundle(loaded, rows, paths, folder / "bundle", options)


# ---- the device side ------------------------------------------------------------------------------

def device_report(bundle: Path, runtime: str, out: Path, latency_batch: int) -> dict:
    """`validate_bundle` on `bundle` in a fresh process with torch blocked; its report."""
    done = subprocess.run([sys.executable, "-c", _DEVICE_VALIDATE, str(bundle), "--runtime", runtime, "--out", str(out),
                           "--latency-batch", str(latency_batch), "--latency-repeats", "10", "--switch-repeats", "20"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"validate_bundle --runtime {runtime} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(out.read_text())


def _warm_up_onnxruntime(scratch: Path) -> None:
    """Build and run a one-Conv session, so ORT's libraries, kernel registry and thread pools are in
    place before the reading (runtimes._tiny_conv)."""
    try:
        from benchmarks.runtimes import _tiny_conv
    except ImportError:
        from runtimes import _tiny_conv
    from exporters.device.runtime import OnnxRuntimeRunner

    OnnxRuntimeRunner(_tiny_conv(scratch / "tiny.onnx"), ["CPUExecutionProvider"]).predict(
        np.zeros((1, 3, 8, 8), np.float32))


def switcher_rss_kib(bundle: str, resident: int | None, single: str | None) -> tuple[int | None, int | None]:
    """VmRSS growth of this (fresh) process from before preparing one session of the variant named
    `single` (or a PrecisionSwitcher with `resident`, cycled once through every precision) to after
    building it and to after its first batch-1 run (a switcher: both after it is ready)."""
    from exporters.device.runtime import OnnxRuntimeRunner
    from exporters.device.switch import PrecisionSwitcher

    with tempfile.TemporaryDirectory() as scratch:
        _warm_up_onnxruntime(Path(scratch))
    shape = json.loads((Path(bundle) / "manifest.json").read_text())["input_shape"]
    before = memory.reading()
    if single:
        held = OnnxRuntimeRunner(Path(bundle) / "artifacts" / f"{single}.onnx", ["CPUExecutionProvider"])
        built = memory.resident_delta_kib(before)
        held.predict(np.zeros((1, *shape), np.float32))
    else:
        held = PrecisionSwitcher(bundle, providers=["CPUExecutionProvider"], resident=resident)
        if resident is not None:
            for key in held.precisions[1:] + held.precisions[:1]:
                held.set_precision(key)
        built = None
    grown = memory.resident_delta_kib(before)
    del held
    return built, grown


MEMORY_CASES = {"one fp32 session": (None, "fp32"), "one w8a8 session": (None, "w8a8"),
                "resident=2": (2, None), "all prepared": (None, None)}


def resident_memory_mib(bundle: Path, repeats: int) -> dict[str, dict]:
    """{case: {"built", "ready"}: median VmRSS growth in MiB over `repeats` fresh processes} for one
    FP32 session, one W8A8 session (built, and after its first run), a switcher with resident=2 and
    one with every variant prepared."""
    context = multiprocessing.get_context("spawn")
    out = {}
    for case, (resident, single) in MEMORY_CASES.items():
        readings = []
        for _ in range(repeats):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                readings.append(pool.submit(switcher_rss_kib, str(bundle), resident, single).result())
        out[case] = {stage: None if any(r[i] is None for r in readings)
                     else statistics.median(r[i] for r in readings) / 1024 for i, stage in enumerate(("built", "ready"))}
    return out


def runtime_agreement(bundle: Path) -> dict:
    """{variant: {"relative_error", "top1_agreement", "median_margin"}}: OpenVINO's logits against ONNX
    Runtime's on each artifact (relative RMS difference, `exporters.device.compare.relative_error`), in a fresh
    process with torch blocked."""
    done = subprocess.run([sys.executable, "-c", _DEVICE_COMPARE, str(bundle)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"comparing OpenVINO with ONNX Runtime failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout.splitlines()[-1])


# ---- printing -------------------------------------------------------------------------------------

def _rows(report: dict) -> list[dict]:
    return [report["baseline"], *report["variants"]]


def _cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def costs_table(report: dict, openvino: dict | None) -> str:
    ov = {r["name"]: r for r in _rows(openvino)} if openvino else {}
    batch = report["meta"]["latency_batch"]
    header = ["variant", "file MiB", "ready ms", "session MiB (built / run)", "int / float ops",
              "b1 ms (p50 / p99)", f"b{batch} ms (p50 / p99)", "host acc (ORT)", "device acc (ORT)"]
    if openvino:
        header += ["OpenVINO acc", "OV int / float ops", "OV ready ms", "OV b1 ms", f"OV b{batch} ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in _rows(report):
        c = r["costs"]
        b1, bn = c["latency"]["batch_1"], c["latency"]["batch"]
        cells = [r["name"], f"{c['artifact_bytes'] / 2 ** 20:.1f}", f"{c['ready_ms']:.0f}",
                 f"{_cell(c['resident_built_mib'], '.1f')} / {_cell(c['resident_mib'], '.1f')}",
                 f"{c['ops']['integer']} / {c['ops']['float']}",
                 f"{b1['median_ms']:.1f} / {b1['p99_ms']:.1f}", f"{bn['median_ms']:.1f} / {bn['p99_ms']:.1f}",
                 _cell(r["host_accuracy"], ".2%"), f"{r['runtime_accuracy']:.2%}"]
        if openvino:
            o = ov[r["name"]]
            oc = o["costs"]
            cells += [f"{o['runtime_accuracy']:.2%}", f"{oc['ops']['integer']} / {oc['ops']['float']}",
                      f"{oc['ready_ms']:.0f}", f"{oc['latency']['batch_1']['median_ms']:.1f}",
                      f"{oc['latency']['batch']['median_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def switch_lines(report: dict, label: str) -> list[str]:
    hot, cold = report["meta"]["switch_latency"], report["meta"]["cold_switch_latency"]
    return [f"{label} switch, every variant prepared: median {hot['median_ms'] * 1000:.1f} µs, max "
            f"{hot['max_ms'] * 1000:.1f} µs over {hot['switches']} switches; cold (resident=1, evict and prepare): "
            f"median {cold['median_ms']:.0f} ms, max {cold['max_ms']:.0f} ms over {cold['switches']} switches"]


def memory_lines(mib: dict) -> list[str]:
    fp32 = mib["one fp32 session"]["ready"]
    if fp32 is None:
        return [f"resident memory: not measured ({memory.unavailable_reason()})"]
    single = [f"one {name} session {mib[f'one {name} session']['built']:.1f} MiB built, "
              f"{mib[f'one {name} session']['ready']:.1f} MiB after its first run" for name in ("fp32", "w8a8")]
    return [f"resident memory, ORT, median of fresh processes: {'; '.join(single)}; "
            + "; ".join(f"{case} {mib[case]['ready']:.1f} MiB ({mib[case]['ready'] / fp32:.2f}x FP32)"
                        for case in ("resident=2", "all prepared"))]


def accuracy_lines(openvino: dict, agreement: dict) -> list[str]:
    parts = [f"{r['name']} {r['runtime_accuracy']:.2%} vs {r['host_accuracy']:.2%} (top-1 agreement "
             f"{agreement[r['name']]['top1_agreement']:.2%}, relative logit error "
             f"{agreement[r['name']]['relative_error']:.4f})" for r in _rows(openvino)]
    differ = sum(abs(r["runtime_accuracy"] - r["host_accuracy"]) > 0 for r in _rows(openvino))
    margin = statistics.median(a["median_margin"] for a in agreement.values())
    return [f"OpenVINO (device) vs ONNX Runtime (host) accuracy on {openvino['meta']['test_samples']} images "
            f"(median top-1 margin {margin:.2f} logit SDs): " + ", ".join(parts)
            + f"; {differ} of {len(parts)} variants differ"]


@click.command()
@click.option("--image-size", type=click.IntRange(min=32), default=imagenet_models.IMAGE_SIZE, show_default=True)
@click.option("--test-images", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--pool", type=click.IntRange(min=1), default=8, show_default=True,
              help="Test images are the largest-margin of pool x --test-images random pictures.")
@click.option("--calibration-images", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--latency-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--memory-repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Keep the bundle and reports here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write results here.")
def main(image_size, test_images, pool, calibration_images, latency_batch, memory_repeats, out_dir, json_path):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        bundle = build_bundle(folder, image_size, test_images, calibration_images, latency_batch, pool)
        ort = device_report(bundle, "onnxruntime", folder / "device_onnxruntime.json", latency_batch)
        has_openvino = subprocess.run([sys.executable, "-c", "import openvino"], capture_output=True).returncode == 0
        openvino = device_report(bundle, "openvino", folder / "device_openvino.json", latency_batch) \
            if has_openvino else None
        agreement = runtime_agreement(bundle) if has_openvino else None
        mib = resident_memory_mib(bundle, memory_repeats)
    print(f"\n## ResNet18 {image_size}x{image_size}, {test_images} test images, "
          f"onnxruntime {ort['meta']['runtime_version']}, {ort['meta']['host']}\n")
    print(costs_table(ort, openvino) + "\n")
    lines = switch_lines(ort, "ORT") + (switch_lines(openvino, "OpenVINO") if openvino else []) + memory_lines(mib)
    lines += accuracy_lines(openvino, agreement) if openvino else ["OpenVINO rows skipped: openvino is not installed"]
    print("\n".join(lines))
    if json_path:
        Path(json_path).write_text(json.dumps({"onnxruntime": ort, "openvino": openvino, "resident_mib": mib,
                                               "openvino_vs_onnxruntime": agreement},
                                              indent=2))


if __name__ == "__main__":
    main()
