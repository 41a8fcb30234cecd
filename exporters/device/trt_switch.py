"""Precision switching on TensorRT: one engine per refit group, switched by refit, every refit proven.

Variants whose graphs differ only in weight values (same `refit_group` in the manifest) share one
refittable engine, and switching between them refits it (`TensorRTRunner.refit_from_onnx`). A
refit that TensorRT accepts can still compute the wrong thing: TensorRT 11.3's release notes list a
GEMM bias that REFIT engines may drop, a weight the ONNX parser transformed may not be the one
refit, and nothing in the refit API reports either. So the first time a variant runs from a shared
engine on a device, its output on a fixed probe batch (`probe_input`) is compared with an engine
built for that variant alone (no REFIT flag); the verdict is

- "ok": relative RMS difference (`compare.relative_error`) within REFIT_RTOL; the variant switches by
  refit from then on, and its own engine is not kept loaded;
- "mismatch": beyond it, or non-finite; the variant runs on its own engine from then on (switching
  to it selects that engine: no refit, more device memory).

REFIT_RTOL is 1e-2: two engines of the same weights may pick different tactics (the order of float
sums, where FP16 or INT8 requantization rounds), which moves logits by rounding; a dropped bias or
stale weights move them by the size of that bias or weight change, which on the networks here is
several percent of the logits or more. It is a chosen bound, not one measured on a GPU.

Each verdict is recorded next to the engine cache, in `<engine_dir>/refit_verdicts.json` (schema:
`VerdictRecord` fields, keyed by the TensorRT version, GPU and compute capability, the shared
engine's ONNX sha256 and the variant's sha256), so a later switcher on this device trusts it without
proving again, and in the device report (`meta.refit_verdicts`). Costs (`PrecisionSwitcher.costs`)
are those of each engine prepared ("ready_by" "engine"; its `resident_mib` is host memory: VmRSS
does not see the GPU's) and, for a variant switched to by refit, its last refit ("ready_by"
"refit", "ready_ms" the refit's time, "resident_mib" that of the engine it shares). numpy and
TensorRT only.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import numpy as np

from exporters.device import memory
from exporters.device.compare import relative_error
from exporters.device.errors import HeroError
from exporters.device.files import write_atomic
from exporters.device.manifest import precision_order

VERDICTS = "refit_verdicts.json"
REFIT_RTOL = 1e-2
PROBE_BATCH = 4
_KEY = ("tensorrt_version", "gpu_name", "compute_capability", "engine_onnx_sha256", "variant_sha256")


def probe_input(input_shape, batch: int = PROBE_BATCH) -> np.ndarray:
    """The fixed probe batch of every refit proof: standard-normal float32 (normalised images are of
    that scale), numpy's default_rng(0), so every device and every run probes with the same numbers."""
    return np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)


def verdict(got: np.ndarray, reference: np.ndarray) -> tuple[str, float]:
    """("ok" | "mismatch", relative error) of a refit engine's probe output against its variant's own engine's."""
    if got.shape != reference.shape or not np.all(np.isfinite(got)):
        return "mismatch", float("inf")
    error = relative_error(got, reference)
    return ("ok" if error <= REFIT_RTOL else "mismatch"), error


def read_verdicts(path: Path) -> list[dict]:
    """The records of a verdicts file; a missing or unreadable one holds none (each is proven again)."""
    try:
        records = json.loads(Path(path).read_text()).get("verdicts", [])
    except (OSError, ValueError, AttributeError, RecursionError):
        return []
    return [r for r in records if isinstance(r, dict) and r.get("verdict") in ("ok", "mismatch")
            and all(isinstance(r.get(k), str) for k in _KEY)]


def _refit_known_issue(version: str) -> bool:
    from exporters.device.trt_contract import refit_known_issue

    return bool(refit_known_issue(version))


class TensorRTBackend:
    """One engine per refit group (one per variant on TensorRT 11.3.x), a proven refit per switch
    within a group, and an engine of its own for a variant whose refit failed its proof."""

    def __init__(self, paths: dict, variants: dict, engine_dir: Path, input_shape, costs: dict):
        from exporters.device import tensorrt  # TensorRT only when this runtime is chosen

        ok, why = tensorrt.available()
        if not ok:
            raise HeroError(why)
        self._trt, self._paths, self._variants, self._costs = tensorrt, paths, variants, costs
        self._engine_dir, self._verdict_file = Path(engine_dir), Path(engine_dir) / VERDICTS
        self._group = {bits: v.get("refit_group") or v["sha256"] for bits, v in variants.items()}
        if _refit_known_issue(why):  # no REFIT on this version: every variant gets its own engine
            self._group = {bits: v["sha256"] for bits, v in variants.items()}
        self._identity = tensorrt.device_identity()
        self._probe = probe_input(input_shape)
        self._runners, self._loaded, self._base, self._own = {}, {}, {}, {}
        self.verdicts: dict[str, dict] = {}

        for bits in sorted(paths, key=precision_order):
            group = self._group[bits]
            if group not in self._runners:
                shared = sum(g == group for g in self._group.values()) > 1
                self._runners[group] = self._engine_runner(bits, refit=shared)
                self._loaded[group], self._base[group] = bits, bits
        stored = read_verdicts(self._verdict_file)
        for bits in paths:
            record = next((r for r in stored if all(r[k] == v for k, v in self._key(bits).items())), None)
            if self._shared(bits) and record is not None:
                self.verdicts[variants[bits]["name"]] = record
                if record["verdict"] == "mismatch":
                    self._own[bits] = self._engine_runner(bits, refit=False)
        self.providers = ["TensorRT"]
        self.active = None

    def loaded(self) -> list:
        """Every variant: each has an engine prepared (its group's, or its own)."""
        return list(self._paths)

    def _shared(self, bits) -> bool:
        return sum(g == self._group[bits] for g in self._group.values()) > 1

    def _key(self, bits) -> dict:
        base = self._base[self._group[bits]]
        return {**{k: str(self._identity[k]) for k in ("tensorrt_version", "gpu_name", "compute_capability")},
                "engine_onnx_sha256": self._variants[base]["sha256"], "variant_sha256": self._variants[bits]["sha256"]}

    def _engine_runner(self, bits, refit: bool):
        """A runner on `bits`' engine (the refittable one of its group, or, refit False in a shared
        group, its own `<name>.own.engine`), run once on the probe; its cost goes into `costs`."""
        before = memory.reading()
        start = time.perf_counter()
        own = not refit and self._shared(bits)
        engine = _prepared_engine(self._trt, self._paths[bits], self._variants[bits], self._engine_dir, refit, own)
        runner = self._trt.TensorRTRunner(engine)
        built = time.perf_counter()
        built_kib = memory.resident_delta_kib(before)
        run_start = time.perf_counter()
        runner.predict(self._probe)
        done = time.perf_counter()
        grown = memory.resident_delta_kib(before)
        self._costs[bits] = {"ready_ms": (built - start + done - run_start) * 1000.0, "ready_by": "engine",
                             "first_run_ms": (done - run_start) * 1000.0,
                             "resident_built_mib": None if built_kib is None else built_kib / 1024.0,
                             "resident_mib": None if grown is None else grown / 1024.0}
        return runner

    def executed_ops(self, x: np.ndarray) -> dict:
        """TensorRT's layer precisions need its engine inspector with detailed profiling verbosity,
        which these engines are not built with: not read."""
        return {"unavailable": "TensorRT engines here are built without detailed profiling verbosity, "
                               "so the engine inspector cannot say which layers run INT8"}

    def select(self, bits) -> None:
        if bits in self._own:
            self.active = self._own[bits]
            return
        group = self._group[bits]
        runner = self._runners[group]
        if self._loaded[group] != bits:
            start = time.perf_counter()
            runner.refit_from_onnx(self._paths[bits])
            self._loaded[group] = bits
            base = self._costs.get(self._base[group], {})
            self._costs[bits] = {"ready_ms": (time.perf_counter() - start) * 1000.0, "ready_by": "refit",
                                 "resident_mib": base.get("resident_mib"),
                                 "shares_engine_with": self._variants[self._base[group]]["name"]}
        if self._shared(bits) and self._variants[bits]["name"] not in self.verdicts:
            self._prove(bits, runner)
        self.active = self._own.get(bits, runner)

    def _prove(self, bits, runner) -> None:
        """Compare the shared engine, now holding `bits`' weights, with `bits`' own engine on the
        probe; record the verdict here and in the verdicts file; keep the own engine on a mismatch."""
        got = runner.predict(self._probe)
        switch_costs = self._costs.pop(bits, {})
        own = self._engine_runner(bits, refit=False)
        result, error = verdict(got, own.predict(self._probe))
        if result == "mismatch":  # from now on the variant runs on its own engine: that is its cost
            self._own[bits] = own
        else:  # the proof's engine is no part of what the switch costs
            self._costs[bits] = switch_costs
            if hasattr(own, "close"):
                own.close()
        record = {**self._key(bits), "variant": self._variants[bits]["name"], "verdict": result,
                  "rel_error": error if np.isfinite(error) else None, "rtol": REFIT_RTOL,
                  "probe": f"default_rng(0) standard normal, batch {PROBE_BATCH}",
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.verdicts[record["variant"]] = record
        kept = [r for r in read_verdicts(self._verdict_file) if any(r[k] != record[k] for k in _KEY)]
        write_atomic(self._verdict_file, json.dumps({"verdicts": [*kept, record]}, indent=2))


def _prepared_engine(tensorrt, onnx_path: Path, variant: dict, engine_dir: Path, refit: bool, own: bool) -> Path:
    """An engine for `onnx_path` in `engine_dir` (`<name>.engine`; `<name>.own.engine` for the
    unshared engine that proves or replaces a refit): the cached one when its sidecar says it was
    built from this very ONNX file on this device with the same refit setting, else a fresh build."""
    from exporters.device.trt_contract import EngineConfig, check_sidecar, read_sidecar

    engine = engine_dir / f"{variant['name']}{'.own' if own else ''}.engine"
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
