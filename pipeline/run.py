"""``hero run``: train → quantize → export → validate → report → gate, as a short list of stages."""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path

import onnxruntime
import torch

from exporters.device import TOOL_VERSION
from exporters.device.files import make_dirs
from hero_train.checkpoint import load_deployable
from pipeline import rundir, stages
from pipeline.bundle import BundleOptions, write_bundle
from pipeline.config import DeployConfig, GateSection
from pipeline.gate import NOT_GATED, GateCriteria, evaluate_gate
from pipeline.report import build_report, gate_verdict, markdown_table, write_report


def criteria_from(g: GateSection) -> GateCriteria:
    return GateCriteria(max_drop=g.max_drop, min_accuracy=g.min_accuracy, bits=tuple(g.bits) if g.bits else None)


def run_pipeline(config: DeployConfig, run_dir: Path, checkpoint: Path | None = None, log=print,
                 overwrite: bool = False) -> dict:
    """Run every stage; returns the report (also written to ``run_dir``). A folder holding a finished
    run of other inputs is refused unless `overwrite` (see pipeline.rundir)."""
    inputs = rundir.run_inputs(config, checkpoint)
    rundir.claim(run_dir, inputs, overwrite)
    make_dirs(run_dir)
    began, say = time.perf_counter(), log
    log = lambda message: say(f"{message}  [{time.perf_counter() - began:.0f}s]")  # noqa: E731
    data, q, v = config.data, config.quantize, config.validate_
    if checkpoint is None:
        log("[1/6] train")
        checkpoint = stages.train_stage(config.train_config(), run_dir)
    loaded = load_deployable(checkpoint, config.model.named(), data.ref(), config.model.described_input())
    log(f"[2/6] quantize: {', '.join(f'w{b}' for b in q.bits)} from {checkpoint}")
    variants = stages.variants_stage(q)
    if q.mixed is not None:
        log(f"      mixed precision: per-layer {q.mixed.objective} costs, budget {q.mixed.budget.as_dict()}")
        variants.append(stages.mixed_variant(loaded, q, run_dir))
    calibration = stages.calibrate_stage(loaded, variants[-1].spec, q.calibration_batches)
    log(f"[3/6] export {len(variants)} ONNX artifacts to {run_dir / 'artifacts'}")
    artifacts = stages.export_stage(loaded, variants, config.export, calibration, run_dir)
    log("[4/6] validate in ONNX Runtime against the PyTorch emulation")
    test_split = stages.EvalSplit(loaded, data.limit_test)
    rows = stages.validate_stage(loaded, artifacts, calibration, v, config.runtime, test_split, run_dir)
    meta = {
        "config": config.name, "checkpoint": str(checkpoint), "checkpoint_sha256": loaded.sha256,
        "model": loaded.model_ref.label, "dataset": loaded.data.dataset, "classes": list(loaded.input.classes),
        "train_optimizer": loaded.optimizer, "test_samples": data.limit_test, "data_root": loaded.data.root,
        "target": config.target.model_dump(),
        "tool_version": TOOL_VERSION, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "host": platform.platform(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_inputs": inputs,
    }
    report = build_report(rows, meta)
    if config.bundle.enabled:
        log(f"[4b] bundle every precision for the device: {run_dir / 'bundle'}")
        rt = config.runtime
        options = BundleOptions(test_samples=config.bundle.test_samples,
                                providers=tuple(rt.providers) if rt.providers else None,
                                latency_batch=v.latency_batch, latency_repeats=v.latency_repeats)
        write_bundle(loaded, rows, {a.variant.name: a.path for a in artifacts}, run_dir / "bundle", options)
    for path in rundir.prune(run_dir, [a.path for a in artifacts], config.bundle.enabled):
        log(f"      removed {path}: not produced by this run")
    log("[5/6] gate")
    result = evaluate_gate(report, criteria_from(config.gate))
    report["gate"] = {"passed": result["passed"], "gated": result["gated"], "reasons": result["reasons"],
                      "note": None if result["gated"] else NOT_GATED}
    log(f"[6/6] report: {run_dir / 'report.md'}")
    write_report(report, run_dir, f"{config.name}: {meta['model']} on {meta['dataset']}")
    return report


def summary(report: dict) -> str:
    gate = report["gate"]
    lines = [markdown_table(report), "", f"gate: {gate_verdict(gate)}"]
    lines += [f"  FAIL {r}" for r in gate["reasons"]] + ([f"  note: {gate['note']}"] if gate.get("note") else [])
    return "\n".join(lines)
