"""Switch a deployed model between precisions at run time, from one precision-switch bundle.

A bundle (written on the host by `pipeline.bundle`) is a folder::

    manifest.json        format, model facts and one entry per variant (schema: exporters/device/manifest.py)
    artifacts/<name>.onnx
    test.npz             x: preprocessed float32 test images, y: int64 labels
    host_report.json     the host's run of exporters.device.validate_bundle on this very bundle

The manifest is checked field by field against that schema, and every artifact's sha256 against
the manifest, before anything runs.

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
  memory: every variant stays loaded, unless `resident=N` keeps only the N most recently used.
- openvino (optional, `exporters.device.openvino_runtime`): the same, one compiled model per variant.
- tensorrt: variants whose graphs differ only in weight values (same `refit_group` in the
  manifest: same nodes, initializer shapes and dtypes, and Q/DQ scales) share one refittable
  engine, and switching between them refits it with the other variant's weights
  (`TensorRTRunner.refit_from_onnx`, which needs the `onnx` package). Variants with their own
  scales (ordinary per-bit-width PTQ) get their own engine, built once on this device and
  cached next to the bundle; switching to them selects the prepared engine. On TensorRT 11.3, whose
  REFIT has a known issue (`trt_contract.refit_known_issue`), every variant gets its own engine.
  Each refit is proven on its first use on a device (`exporters.device.trt_switch`).

`select(max_latency_ms=, max_memory_mib=, min_accuracy=, device_report=)` switches to the most
accurate variant within a budget, chosen from a device report's measured numbers
(`exporters.device.choice` holds the rule).

numpy and the runtime only (onnxruntime, openvino or TensorRT, imported when used): this runs on
the device.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from exporters.device import memory
from exporters.device.choice import Selection, choose
from exporters.device.errors import HeroError, unknown_choice
from exporters.device.files import read_json
from exporters.device.manifest import bundle_path, precision_keys, precision_order, read_manifest, verify_file

RUNTIMES = ("onnxruntime", "openvino", "tensorrt")
SESSION_RUNTIMES = ("onnxruntime", "openvino")  # a prepared session per variant: `resident` applies


class PrecisionSwitcher:
    """One model, the precisions of a bundle prepared, one of them active.

    `precisions` lists the bundle's bits (None = float; a mixed-precision variant, or a w8a8 beside a
    w8, by its name: `precision_keys`) float first, then descending, then the named ones; the float
    variant is active at start (else the widest).
    `last_switch_ms` is the wall-clock time of the last `set_precision`.

    `resident` (onnxruntime and openvino): how many prepared sessions stay loaded. None (the
    default) prepares every variant up front, so every switch is a lookup; N keeps the N most
    recently used, the first N precisions prepared at start, and a switch to another one evicts the
    least recently used session and prepares the new one (a cold switch: its `ready_ms`). The
    default is all: on ResNet18 at 224x224 a cold switch costs a hundred milliseconds or more against
    well under a microsecond for a prepared session, while all five variants (fp32, w8a8, w4a8, w8,
    w4) hold about 4x one FP32 session's memory and resident=2 about 1.4x (measured by
    `benchmarks/switch_cost.py`, numbers in benchmarks/README.md); set N where memory is tighter than
    latency. TensorRT keeps one engine per
    refit group and takes no `resident`.

    `costs[bits]` is what making each variant ready cost here, measured when it was last made ready:
    {"ready_ms": the time to make it ready, "ready_by": how ("session": session build and first
    batch-1 run; "engine": TensorRT engine build or load and first run; "refit": a TensorRT refit),
    "first_run_ms", "resident_built_mib" and "resident_mib": VmRSS growth after the session was
    built and after its first run (`exporters.device.memory`; None where unreadable)}.

    `providers`: ONNX Runtime's execution providers; for openvino, one OpenVINO device name in a
    list (default ["CPU"]). `inference_precision` (openvino only): "f32" or "bf16", the precision
    OpenVINO runs float layers in; None is f32 on the CPU (`exporters.device.openvino_runtime`).
    """

    def __init__(self, bundle_dir, runtime: str = "onnxruntime", providers=None, *, engine_dir=None,
                 resident: int | None = None, inference_precision: str | None = None):
        if runtime not in RUNTIMES:
            raise HeroError(unknown_choice("runtime", runtime, RUNTIMES))
        if inference_precision is not None and runtime != "openvino":
            raise HeroError(f"inference_precision applies to the openvino runtime, not {runtime}: leave it unset")
        if resident is not None and (isinstance(resident, bool) or not isinstance(resident, int) or resident < 1):
            raise HeroError(f"resident must be None (every variant prepared) or an integer >= 1, got {resident!r}")
        if resident is not None and runtime not in SESSION_RUNTIMES:
            raise HeroError(f"resident applies to {' and '.join(SESSION_RUNTIMES)}; TensorRT keeps one engine per "
                            "refit group: leave resident unset")
        self.bundle_dir = Path(bundle_dir)
        self.runtime = runtime
        self.resident = resident
        self.manifest = read_manifest(self.bundle_dir)
        self._variants = precision_keys(self.manifest["variants"])
        self.precisions = sorted(self._variants, key=precision_order)
        paths = {bits: verify_file(self.bundle_dir, v["artifact"], v["sha256"]) for bits, v in self._variants.items()}
        self.costs: dict = {}
        self.inference_precision = None  # openvino: the INFERENCE_PRECISION_HINT set (None: the device's default)
        if runtime in SESSION_RUNTIMES:
            opener, self.inference_precision = _session_opener(runtime, providers, inference_precision)
            self._backend = _SessionBackend(paths, opener, self.manifest.get("input_shape"), resident, self.costs)
        else:
            from exporters.device.trt_switch import TensorRTBackend

            engines = Path(engine_dir) if engine_dir is not None else self.bundle_dir / "engines"
            self._backend = TensorRTBackend(paths, self._variants, engines, self.manifest["input_shape"], self.costs)
        self.providers = self._backend.providers
        self.precision = self.precisions[0]
        self._backend.select(self.precision)
        self.last_switch_ms: float | None = None

    @property
    def loaded(self) -> list:
        """The precisions whose sessions are prepared now, least recently used first (TensorRT: all)."""
        return self._backend.loaded()

    @property
    def refit_verdicts(self) -> dict:
        """TensorRT: {variant name: verdict record} of refits proven here (`trt_switch`); else {}."""
        return dict(self._backend.verdicts)

    def variant(self, bits: int | str | None) -> dict:
        """The manifest entry of the variant with `bits` (a mixed variant: its name)."""
        if bits not in self._variants:
            shown = ", ".join("float" if b is None else str(b) for b in self.precisions)
            what = f"variant {bits!r}" if isinstance(bits, str) else f"{bits}-bit variant"
            raise HeroError(f"this bundle has no {what}: choose one of {shown}")
        return self._variants[bits]

    def select(self, max_latency_ms: float | None = None, max_memory_mib: float | None = None,
               min_accuracy: float | None = None, device_report=None, *, allow_host_numbers: bool = False) -> Selection:
        """Make active, and return with the reason, the most accurate variant whose measured numbers
        fit every limit given: `max_latency_ms` against its median latency at batch 1 on this device
        (one image per predict, as a per-frame budget is), `max_memory_mib` against the resident memory
        its session adds, `min_accuracy` (a fraction) against its top-1 accuracy on test.npz; ties go
        to the faster variant. The numbers are those of `device_report` (a path or the loaded JSON of
        `python -m exporters.device.validate_bundle` run on this device with this runtime). None:
        the bundle's host_report.json, whose latencies and memory are the host's, so it is refused
        unless `allow_host_numbers=True`. No variant fits: a HeroError naming the closest and by how
        much it misses. Rules: `exporters.device.choice`."""
        if device_report is None:
            device_report = bundle_path(self.bundle_dir, self.manifest["host_report"])
        if not isinstance(device_report, dict):
            device_report = read_json(device_report, "device report", ": run `python -m exporters.device.validate_bundle "
                                      "BUNDLE --out REPORT` on this device first", ": validate the bundle again")
        chosen = choose(device_report, {bits: self._variants[bits] for bits in self.precisions}, self.runtime,
                        max_latency_ms=max_latency_ms, max_memory_mib=max_memory_mib, min_accuracy=min_accuracy,
                        allow_host_numbers=allow_host_numbers)
        self.set_precision(chosen.precision)
        return chosen

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

    def executed_ops(self, x: np.ndarray) -> dict:
        """How the runtime runs the active variant: {"integer", "float", "by_type", "how"} (weight
        layers on integer against float kernels, after the runtime's optimisation), or
        {"unavailable": why} where the runtime cannot tell (`x`: a sample batch to run)."""
        return self._backend.executed_ops(x)


def _session_opener(runtime: str, providers, inference_precision: str | None):
    """(path -> a prepared runner of `runtime`, the OpenVINO inference precision set or None); the
    runtime is imported here, when it is chosen."""
    if runtime == "onnxruntime":
        from exporters.device.runtime import OnnxRuntimeRunner, checked_providers

        providers = checked_providers(providers)
        return (lambda path: OnnxRuntimeRunner(path, providers)), None
    from exporters.device.openvino_runtime import DEFAULT_DEVICE, OpenVinoRunner, compile_config, import_openvino

    import_openvino()
    names = [providers] if isinstance(providers, str) else list(providers or [DEFAULT_DEVICE])
    if len(names) != 1:
        raise HeroError(f"openvino runs on one device: name one (CPU, GPU, NPU), got {', '.join(names)}")
    hint = compile_config(names[0], None, inference_precision).get("INFERENCE_PRECISION_HINT")  # checks it
    return (lambda path: OpenVinoRunner(path, names[0], inference_precision=inference_precision)), hint


class _SessionBackend:
    """One prepared session (ONNX Runtime or OpenVINO) per resident variant, at most `resident` of
    them (None: all), evicting the least recently used; selecting a resident one is a dict lookup,
    selecting another prepares it (a cold switch). Every preparation records its cost in `costs`."""

    def __init__(self, paths: dict, opener, input_shape, resident: int | None, costs: dict):
        self._paths, self._open, self._costs = paths, opener, costs
        self._warmup = np.zeros((1, *input_shape), np.float32) if input_shape else None
        self._capacity = len(paths) if resident is None else min(resident, len(paths))
        self.runners: OrderedDict = OrderedDict()  # least recently used first
        for bits in sorted(paths, key=precision_order)[:self._capacity]:
            self._prepare(bits)
        self.providers = next(iter(self.runners.values())).providers
        self.active = None
        self.verdicts: dict = {}  # refit verdicts: TensorRT's only

    def loaded(self) -> list:
        return list(self.runners)

    def _prepare(self, bits) -> None:
        """Build `bits`' session and run it once (ORT and OpenVINO allocate and pick kernels on the
        first run, which belongs to the switch, not to the first predict); record its costs (the
        switcher's `costs`: VmRSS growth with the heap trimmed at each reading; None off Linux)."""
        before = memory.reading()
        start = time.perf_counter()
        runner = self._open(self._paths[bits])
        built = time.perf_counter()
        built_kib = memory.resident_delta_kib(before)
        run_start = time.perf_counter()
        if self._warmup is not None:
            runner.predict(self._warmup)
        done = time.perf_counter()
        self.runners[bits] = runner
        grown = memory.resident_delta_kib(before)
        self._costs[bits] = {"ready_ms": (built - start + done - run_start) * 1000.0, "ready_by": "session",
                             "first_run_ms": (done - run_start) * 1000.0,
                             "resident_built_mib": None if built_kib is None else built_kib / 1024.0,
                             "resident_mib": None if grown is None else grown / 1024.0}

    def executed_ops(self, x: np.ndarray) -> dict:
        return self.active.executed_ops(x)

    def select(self, bits) -> None:
        if bits in self.runners:
            self.runners.move_to_end(bits)
        else:
            self.active = None
            while len(self.runners) >= self._capacity:
                self.runners.popitem(last=False)  # the session is freed with its last reference
            self._prepare(bits)
        self.active = self.runners[bits]


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
