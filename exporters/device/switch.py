"""Switch a deployed model between precisions at run time, from one precision-switch bundle.

A bundle (written on the host by `pipeline.bundle`) is a folder::

    manifest.json        format, model facts and one entry per variant (schema in pipeline/bundle.py)
    artifacts/<name>.onnx
    test.npz             x: preprocessed float32 test images, y: int64 labels
    host_report.json     the host's run of exporters.device.validate_bundle on this very bundle

The manifest is checked field by field and every artifact's sha256 against it before anything
runs (`exporters.device.manifest`).

What a switch costs, by runtime:

- onnxruntime: one InferenceSession per variant, created and warmed up (one batch-1 run) when
  the switcher is built; `set_precision` only selects the prepared session. Measured on a
  2-core x86 host with ResNet-20 (28x28, fp32/w8/w4): creating a session costs 45-100 ms and
  its first run a few ms more, selecting a prepared one under a microsecond. Creating sessions
  lazily moves that 50-100 ms onto the first switch to each precision. One session whose
  initializers are replaced (`SessionOptions.add_initializer`) does not help: ORT binds
  initializers when a session is created, so every switch would build a new session (40 ms).
  Feeding the weights as graph inputs gives one session and microsecond switches, but ORT then
  cannot fold or prepack them and inference ran 2.6x (batch 64) to 10x (batch 1) slower; a
  float graph also differs in structure from a Q/DQ one. The price of prepared sessions is
  memory: every variant stays loaded.
- tensorrt: variants whose graphs differ only in weight values (same `refit_group` in the
  manifest: same nodes, initializer shapes and dtypes, and Q/DQ scales) share one refittable
  engine, and switching between them refits it with the other variant's weights
  (`TensorRTRunner.refit_from_onnx`, which needs the `onnx` package). Variants with their own
  scales (ordinary per-bit-width PTQ) get their own engine, built once on this device and
  cached next to the bundle; switching to them selects the prepared engine. On TensorRT 11.3, whose
  REFIT has a known issue (`trt_contract.refit_known_issue`), every variant gets its own engine.

numpy and the runtime only (onnxruntime or TensorRT, imported when used): this runs on the device.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from exporters.device.errors import HeroError, unknown_choice
from exporters.device.manifest import read_manifest, verify_file

RUNTIMES = ("onnxruntime", "tensorrt")


def precision_key(variant: dict) -> int | str | None:
    """How a variant is named to `set_precision`: its bits (None = float), or, for a mixed-precision
    variant (per-layer widths), its name."""
    return variant["name"] if variant.get("layer_bits") else variant["bits"]


def precision_order(key: int | str | None) -> tuple:
    """Sort key: float (None) first, then from the most bits to the fewest, then mixed variants by name."""
    return (key is not None, isinstance(key, str), -(key or 0) if not isinstance(key, str) else 0, str(key))


class PrecisionSwitcher:
    """One model, every precision of a bundle prepared, one of them active.

    `precisions` lists the bundle's bits (None = float; a mixed-precision variant by its name) float
    first, then descending, then mixed; the float
    variant is active at start (else the widest). `last_switch_ms` is the wall-clock time of the
    last `set_precision`.
    """

    def __init__(self, bundle_dir, runtime: str = "onnxruntime", providers=None, *, engine_dir=None):
        if runtime not in RUNTIMES:
            raise HeroError(unknown_choice("runtime", runtime, RUNTIMES))
        self.bundle_dir = Path(bundle_dir)
        self.runtime = runtime
        self.manifest = read_manifest(self.bundle_dir)
        self._variants = {precision_key(v): v for v in self.manifest["variants"]}
        self.precisions = sorted(self._variants, key=precision_order)
        paths = {bits: verify_file(self.bundle_dir, v["artifact"], v["sha256"]) for bits, v in self._variants.items()}
        if runtime == "onnxruntime":
            self._backend = _OnnxRuntimeBackend(paths, providers, self.manifest.get("input_shape"))
        else:
            engines = Path(engine_dir) if engine_dir is not None else self.bundle_dir / "engines"
            self._backend = _TensorRTBackend(paths, self._variants, engines)
        self.providers = self._backend.providers
        self.precision = self.precisions[0]
        self._backend.select(self.precision)
        self.last_switch_ms: float | None = None

    def variant(self, bits: int | str | None) -> dict:
        """The manifest entry of the variant with `bits` (a mixed variant: its name)."""
        if bits not in self._variants:
            shown = ", ".join("float" if b is None else str(b) for b in self.precisions)
            what = f"variant {bits!r}" if isinstance(bits, str) else f"{bits}-bit variant"
            raise HeroError(f"this bundle has no {what}: choose one of {shown}")
        return self._variants[bits]

    def set_precision(self, bits: int | str | None) -> None:
        """Make the variant with `bits` (None: float; a mixed variant's name) the one `predict` runs."""
        self.variant(bits)
        start = time.perf_counter()
        self._backend.select(bits)
        self.precision = bits
        self.last_switch_ms = (time.perf_counter() - start) * 1000.0

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 logits of the active variant for a batch of preprocessed images."""
        return self._backend.active.predict(x)


class _OnnxRuntimeBackend:
    """A prepared ONNX Runtime session per variant; selecting one is a dict lookup."""

    def __init__(self, paths: dict, providers, input_shape):
        from exporters.device.runtime import OnnxRuntimeRunner  # onnxruntime only when this runtime is chosen

        self.runners = {bits: OnnxRuntimeRunner(path, providers) for bits, path in paths.items()}
        if input_shape:
            warmup = np.zeros((1, *input_shape), np.float32)
            for runner in self.runners.values():
                runner.predict(warmup)  # ORT allocates and picks kernels on the first run, not in a switch
        self.providers = next(iter(self.runners.values())).providers
        self.active = None

    def select(self, bits) -> None:
        self.active = self.runners[bits]


class _TensorRTBackend:
    """One refittable engine per refit group; selecting a variant refits its group's engine
    with that variant's weights unless they are already loaded."""

    def __init__(self, paths: dict, variants: dict, engine_dir: Path):
        from exporters.device import tensorrt  # TensorRT only when this runtime is chosen

        ok, why = tensorrt.available()
        if not ok:
            raise HeroError(why)
        from exporters.device.trt_contract import refit_known_issue

        self._paths = paths
        self._group = {bits: v.get("refit_group") or v["sha256"] for bits, v in variants.items()}
        if refit_known_issue(why):  # no REFIT on this version: every variant gets its own engine
            self._group = {bits: v["sha256"] for bits, v in variants.items()}
        self._runners, self._loaded = {}, {}
        for bits in sorted(paths, key=precision_order):
            group = self._group[bits]
            if group in self._runners:
                continue
            shared = sum(g == group for g in self._group.values()) > 1
            engine = _prepared_engine(tensorrt, paths[bits], variants[bits], engine_dir, refit=shared)
            self._runners[group] = tensorrt.TensorRTRunner(engine)
            self._loaded[group] = bits
        self.providers = ["TensorRT"]
        self.active = None

    def select(self, bits) -> None:
        group = self._group[bits]
        runner = self._runners[group]
        if self._loaded[group] != bits:
            runner.refit_from_onnx(self._paths[bits])
            self._loaded[group] = bits
        self.active = runner


def _prepared_engine(tensorrt, onnx_path: Path, variant: dict, engine_dir: Path, refit: bool) -> Path:
    """An engine for `onnx_path` in `engine_dir`: the cached one when its sidecar says it was built
    from this very ONNX file on this device with the same refit setting, else a fresh build."""
    from exporters.device.trt_contract import EngineConfig, check_sidecar, read_sidecar

    engine = engine_dir / f"{variant['name']}.engine"
    try:
        sidecar = read_sidecar(engine)
        check_sidecar(sidecar, tensorrt.device_identity())
        if engine.is_file() and sidecar.get("onnx_sha256") == variant["sha256"] \
                and ("REFIT" in sidecar["flags"]["set"]) == refit:
            return engine
    except (HeroError, KeyError, TypeError):
        pass  # no usable cached engine: build one below
    precision = "fp32" if variant["bits"] is None else "int8"
    tensorrt.build_engine(onnx_path, engine, EngineConfig(precision=precision, refit=refit))
    return engine


def measure_switch_latency(switcher: PrecisionSwitcher, repeats: int) -> dict:
    """Cycle through the precisions `repeats` times, each switch to a different one, ending on the
    precision active before; {"median_ms", "max_ms", "switches"} of `last_switch_ms`."""
    if repeats < 1:
        raise HeroError(f"repeats must be >= 1, got {repeats}")
    start = switcher.precision
    order = switcher.precisions
    times = []
    for i in range(repeats * len(order)):
        switcher.set_precision(order[(order.index(start) + 1 + i) % len(order)])
        times.append(switcher.last_switch_ms)
    return {"median_ms": statistics.median(times), "max_ms": max(times), "switches": len(times)}
