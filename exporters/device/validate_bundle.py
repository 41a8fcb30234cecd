"""Validate a precision-switch bundle on the device it is deployed to.

    python -m exporters.device.validate_bundle BUNDLE [--runtime onnxruntime|openvino|tensorrt]
                                               [--out device_report.json]
                                               [--providers CUDAExecutionProvider,CPUExecutionProvider]
                                               [--inference-precision f32|bf16]   (openvino)

Checks every file's sha256 against the manifest, runs every variant on the bundle's test.npz through
one `PrecisionSwitcher`, and writes a device report: the report schema of the host's report.json
(`exporters.device.report_schema.REPORT`, where every field's meaning on the device is stated), so
that ``hero check DEVICE_REPORT --baseline BUNDLE/host_report.json --max-regression PTS`` flags any
variant whose accuracy on the device departs from the host's (variants are matched on their
identity, `exporters.device.schema.IDENTITY`). There is no PyTorch emulation here: no
``consistent`` or ``max_logit_diff``, and ``agreement`` is with the float variant run here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np

from exporters.device import memory
from exporters.device.compare import compare
from exporters.device.errors import HeroError
from exporters.device.files import write_atomic
from exporters.device.runtime import latency_stats, top1
from exporters.device.manifest import read_manifest, unlisted_files, verify_file
from exporters.device.report_schema import REPORT, with_drops
from exporters.device.schema import conform, identity
from exporters.device.switch import RUNTIMES, SESSION_RUNTIMES, PrecisionSwitcher, measure_switch_latency



def load_test_data(bundle_dir, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """(x float32, y int64) from the bundle's test.npz, checked against `manifest` (as read_manifest
    returns it)."""
    entry = manifest["test_data"]
    path = verify_file(Path(bundle_dir), entry["path"], entry["sha256"])
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except (OSError, ValueError, KeyError) as exc:
        raise HeroError(f"cannot read x and y from {path} ({exc}): rebuild the bundle") from None
    shape = tuple(manifest["input_shape"])
    if x.dtype != np.float32 or y.dtype != np.int64 or x.shape[1:] != shape or y.shape != (len(x),) or not len(x):
        raise HeroError(f"{path} must hold float32 x of shape (N, {', '.join(map(str, shape))}) and int64 y of "
                        f"shape (N,), got {x.dtype} {x.shape} and {y.dtype} {y.shape}: rebuild the bundle")
    return x, y


def _runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    if runtime == "openvino":
        from exporters.device.openvino_runtime import import_openvino

        return import_openvino().__version__
    from exporters.device import tensorrt

    return tensorrt.available()[1]


def validate_bundle(bundle_dir, runtime: str = "onnxruntime", providers=None, *, latency_batch: int | None = None,
                    latency_repeats: int = 10, switch_repeats: int = 20, inference_precision: str | None = None) -> dict:
    """The device report (`REPORT`) of every variant of the bundle; `latency_batch` None: the manifest's."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    x, y = load_test_data(bundle_dir, manifest)
    if None not in {v["bits"] for v in manifest["variants"]}:
        raise HeroError(f"bundle {bundle_dir} has no float variant (bits null) to serve as the baseline: rebuild it")
    latency_batch = latency_batch or manifest["latency_batch"]
    options = {"inference_precision": inference_precision} if inference_precision is not None else {}
    cold = None
    if runtime in SESSION_RUNTIMES:  # also warms the runtime up, so `costs` below are per variant
        cold_switcher = PrecisionSwitcher(bundle_dir, runtime, providers, resident=1, **options)
        cold = measure_switch_latency(cold_switcher, 1)
        del cold_switcher
    switcher = PrecisionSwitcher(bundle_dir, runtime, providers, **options)
    rows, reasons, reference = [], [], None
    for bits in switcher.precisions:  # float first: it is the reference for agreement
        switcher.set_precision(bits)
        variant = switcher.variant(bits)
        logits = switcher.predict(x)
        if reference is None:
            reference = logits
        if not np.all(np.isfinite(logits)):
            reasons.append(f"{variant['name']}: the runtime produced non-finite logits on this device")
        latency = {"batch_1": {"batch": 1, **latency_stats(lambda: switcher.predict(x[:1]), latency_repeats)},
                   "batch": {"batch": len(x[:latency_batch]),
                             **latency_stats(lambda: switcher.predict(x[:latency_batch]), latency_repeats)}}
        rows.append({
            "name": variant["name"], **identity(variant), "runtime": runtime,
            "torch_accuracy": variant.get("torch_accuracy"), "host_accuracy": variant.get("host_accuracy"),
            "runtime_accuracy": top1(logits, y), "agreement": compare(reference, logits).agreement.rate,
            "latency_ms": latency["batch"]["median_ms"],
            "file_bytes": variant.get("file_bytes"), "artifact": variant["artifact"], "sha256": variant["sha256"],
            "costs": {"latency": latency, "artifact_bytes": (bundle_dir / variant["artifact"]).stat().st_size,
                      "ops": switcher.executed_ops(x[:1])},
        })
    for row, bits in zip(rows, switcher.precisions):
        row["costs"].update(switcher.costs.get(bits, {}))
    baseline, variants = with_drops(dict(rows[0], drop=0.0, drop_points=0.0), rows[1:])
    meta = {
        "bundle": str(bundle_dir), "model": manifest.get("model"), "dataset": manifest.get("dataset"),
        "source_sha256": manifest.get("source_sha256"), "test_samples": int(len(x)), "runtime": runtime,
        "role": "device", "runtime_version": _runtime_version(runtime), "providers": list(switcher.providers),
        "switch_latency": measure_switch_latency(switcher, switch_repeats), "cold_switch_latency": cold,
        "latency_batch": latency_batch, "inference_precision": switcher.inference_precision,
        "memory": {"measure": "VmRSS growth, glibc heap trimmed at each reading (exporters.device.memory)",
                   "unavailable": memory.unavailable_reason()},
        "refit_verdicts": switcher.refit_verdicts if runtime == "tensorrt" else None,
        "unlisted_files": unlisted_files(bundle_dir, manifest),
        "host": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
        "numpy": np.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return conform({"meta": meta, "baseline": baseline, "variants": variants,
                    "gate": {"passed": not reasons, "reasons": reasons}}, REPORT, "device report")


def summary_lines(report: dict) -> list[str]:
    lines = []
    for r in [report["baseline"], *report["variants"]]:
        host = r.get("host_accuracy")
        host_text = "" if host is None else f" (host {100 * host:.2f}%)"
        latency = r["costs"]["latency"]
        lines.append(f"{r['name']}: accuracy {100 * r['runtime_accuracy']:.2f}%{host_text}, agreement with float "
                     f"{r['agreement']:.4f}, {latency['batch_1']['median_ms']:.2f} ms at batch 1, "
                     f"{latency['batch']['median_ms']:.2f} ms at batch {latency['batch']['batch']}, ready in "
                     f"{r['costs']['ready_ms']:.0f} ms")
    switch = report["meta"]["switch_latency"]
    lines.append(f"precision switch: median {switch['median_ms']:.4f} ms, max {switch['max_ms']:.4f} ms "
                 f"over {switch['switches']} switches")
    unlisted = report["meta"].get("unlisted_files") or []
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        lines.append(f"note: files the manifest does not list (no sha256 covers them): {shown}")
    lines += [f"FAIL {reason}" for reason in report["gate"]["reasons"]]
    return lines


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and the message: one line here, like every other error
        print(f"validate_bundle: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m exporters.device.validate_bundle",
                                     description="Validate a hero-deploy precision-switch bundle on this device.")
    parser.add_argument("bundle", help="the bundle folder written by `hero bundle`")
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    parser.add_argument("--out", default="device_report.json", help="the device report to write")
    parser.add_argument("--providers", default=None,
                        help="ONNX Runtime execution providers, comma-separated, in priority order; "
                             "with --runtime openvino, one OpenVINO device (default CPU)")
    parser.add_argument("--inference-precision", choices=("f32", "bf16"), default=None,
                        help="openvino: the precision float layers run in (default f32 on the CPU)")
    parser.add_argument("--latency-batch", type=_count, default=None,
                        help="the batch timed beside batch 1 (default: the manifest's latency_batch)")
    parser.add_argument("--latency-repeats", type=_count, default=10)
    parser.add_argument("--switch-repeats", type=_count, default=20)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if Path(args.out).is_dir():
        print(f"validate_bundle: error: --out {args.out} is a folder: name the report file", file=sys.stderr)
        return 2
    try:
        report = validate_bundle(args.bundle, args.runtime, providers, latency_batch=args.latency_batch,
                                 latency_repeats=args.latency_repeats, switch_repeats=args.switch_repeats,
                                 inference_precision=args.inference_precision)
        write_atomic(args.out, json.dumps(report, indent=2))
    except HeroError as exc:
        print(f"validate_bundle: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --out a folder, read-only, disk full; a bundle file unreadable
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"validate_bundle: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(report)))
    print(f"device report: {args.out}")
    return 0 if report["gate"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
