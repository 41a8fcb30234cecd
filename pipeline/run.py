"""``hero run``: train → quantize → export → validate → report → gate, as a short list of stages."""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path

import onnxruntime
import torch

from exporters.device.errors import HeroError
from exporters.device.files import make_dirs
from pipeline import stages
from pipeline.bundle import bundle_stage
from pipeline.config import DeployConfig
from pipeline.gate import GateCriteria, evaluate_gate
from pipeline.report import build_report, markdown_table, write_report


def criteria_from(config: DeployConfig) -> GateCriteria:
    g = config.gate
    return GateCriteria(max_drop=g.max_drop, min_accuracy=g.min_accuracy,
                        bits=tuple(g.bits) if g.bits else None)


def run_pipeline(config: DeployConfig, run_dir: Path, checkpoint: Path | None = None,
                 log=print) -> dict:
    """Run every stage; returns the report (also written to ``run_dir``)."""
    make_dirs(run_dir)
    began, say = time.perf_counter(), log
    log = lambda message: say(f"{message}  [{time.perf_counter() - began:.0f}s]")  # noqa: E731
    data_root = (config.train or {}).get("data_root")
    if checkpoint is None:
        log("[1/6] train")
        checkpoint = stages.train_stage(config, run_dir)
    loaded = stages.load_stage(checkpoint)
    log(f"[2/6] quantize: {', '.join(f'w{b}' for b in config.quantize.bits)} from {checkpoint}")
    variants = stages.variants_stage(config.quantize)
    act_scales = stages.calibrate_stage(loaded, config.quantize, data_root)
    log(f"[3/6] export {len(variants)} ONNX artifacts to {run_dir / 'artifacts'}")
    artifacts = stages.export_stage(loaded, variants, act_scales, config, run_dir)
    log("[4/6] validate in ONNX Runtime against the PyTorch emulation")
    rows = stages.validate_stage(loaded, artifacts, act_scales, config, run_dir, data_root)
    meta = {
        "config": config.name, "checkpoint": str(checkpoint), "checkpoint_sha256": loaded.sha256,
        "model": loaded.ckpt["model"]["name"], "dataset": loaded.ckpt["dataset"],
        "train_optimizer": loaded.ckpt["config"].get("optimizer"),
        "test_samples": config.validate_.limit_test, "data_root": data_root, "target": config.target.model_dump(),
        "tool_version": stages.TOOL_VERSION, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "host": platform.platform(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    report = build_report(rows, meta)
    if config.bundle.enabled:
        log(f"[4b] bundle every precision for the device: {run_dir / 'bundle'}")
        bundle_stage(loaded, artifacts, rows, config, run_dir / "bundle", data_root)
    log("[5/6] gate")
    result = evaluate_gate(report, criteria_from(config))
    report["gate"] = {"passed": result["passed"], "reasons": result["reasons"]}
    log(f"[6/6] report: {run_dir / 'report.md'}")
    write_report(report, run_dir, f"{config.name}: {meta['model']} on {meta['dataset']}")
    return report


def summary(report: dict) -> str:
    gate = report["gate"]
    lines = [markdown_table(report), "", f"gate: {'PASSED' if gate['passed'] else 'FAILED'}"]
    lines += [f"  FAIL {r}" for r in gate["reasons"]]
    return "\n".join(lines)
