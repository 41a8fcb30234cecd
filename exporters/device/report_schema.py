"""The report schema: report.json of ``hero run`` (written by `pipeline.report`) and the device report
of ``python -m exporters.device.validate_bundle`` (a bundle's host_report.json is the same report,
measured on the host). Both are read by ``hero check`` (`pipeline.gate`); a device report also by
`PrecisionSwitcher.select` (`exporters.device.choice`). `REPORT` is the one declaration of them:
each field's ``doc`` is its meaning, and "host" or "device" says which report has it where only
one does. Accuracies are fractions in [0, 1], top-1 on the report's test samples.

Readers accept keys not declared here; `schema.conform` refuses them in what hero-deploy writes.
Standard library only.
"""

from __future__ import annotations

from exporters.device.schema import (ANY, BITS, BN_MODES, BOOL, FRACTION, GRIDS, NUMBER, OBJECT, SHA256, TEXT, TEXTS,
                                     ACT_BITS, ACT_LAYOUTS, Field, ListOf, Record, integer, map_of, nullable, one_of)

ROLES = ("device", "host")  # meta.role of a device report: where it was measured

_ROW = {
    # what the variant is (exporters.quantize.QuantSpec; schema.IDENTITY tells variants apart)
    "name": Field(TEXT, "the variant's name (fp32, w8, w4a8, ...)"),
    "bits": Field(nullable(BITS), "weight bits; null: the float baseline; with layer_bits the widest layer's"),
    "symmetric": Field(BOOL, "the weight grid's zero point is 0"),
    "per_channel": Field(BOOL, "one weight scale per output channel (else per tensor)"),
    "act_bits": Field(nullable(one_of(ACT_BITS)), "null: float activations"),
    "act_layout": Field(nullable(one_of(*ACT_LAYOUTS)), "host: where 8-bit activations are quantized (null without)"),
    "bn": Field(one_of(*BN_MODES), "QuantSpec.bn"),
    "grid": Field(one_of(*GRIDS), "QuantSpec.grid"),
    "layer_bits": Field(nullable(map_of(BITS)), "mixed precision: layer name -> bits, else null"),
    "block_size": Field(nullable(integer(16)), "Linear weights per block of that many inputs, else null"),
    "average_bits": Field(nullable(NUMBER), "host: weight bits averaged over the quantized parameters (null: float)"),
    # its accuracy
    "runtime": Field(TEXT, "the runtime that measured runtime_accuracy"),
    "target_runtime": Field(TEXT, "host: the runtime the config deploys to (runtime.name)"),
    "runtime_accuracy": Field(FRACTION, "the runtime's accuracy on the report's test samples"),
    "torch_accuracy": Field(nullable(FRACTION), "the PyTorch emulation's accuracy, measured on the host on the "
                                                "run's validation samples (the device has no torch)"),
    "canonical_torch_accuracy": Field(FRACTION, "host, nested grids only: the canonical grid's emulation "
                                                "accuracy at the same widths (the price of switching by refit)"),
    "host_accuracy": Field(nullable(FRACTION), "device: the runtime's accuracy on the bundle's test.npz on the "
                                               "host (manifest host_accuracy), the one host number of a row"),
    "test_samples": Field(integer(1), "host: how many test samples the accuracies are of"),
    "drop": Field(NUMBER, "baseline.reference_accuracy minus runtime_accuracy (a fraction)"),
    "drop_points": Field(NUMBER, "drop in percentage points"),
    # agreement with the emulation (host) or with the float variant (device)
    "agreement": Field(FRACTION, "top-1 agreement with the PyTorch emulation (host) or with the float variant "
                                 "run here (device; 1.0 for the baseline)"),
    "consistent": Field(BOOL, "host: the runtime agrees with the emulation within the validator's tolerance "
                              "(pipeline.stages.validate_artifact); false fails the gate"),
    "max_logit_diff": Field(NUMBER, "host: largest |runtime - emulation| logit"),
    "rms_logit_diff": Field(NUMBER, "host: RMS runtime - emulation logit difference"),
    "agreement_unoptimized": Field(FRACTION, "host: agreement with ONNX Runtime's optimisations off"),
    "max_logit_diff_unoptimized": Field(NUMBER, "host: max_logit_diff with optimisations off"),
    "rms_logit_diff_unoptimized": Field(NUMBER, "host: rms_logit_diff with optimisations off"),
    "act_noise_rms": Field(NUMBER, "host, act_bits 8: RMS logit change the activation rounding itself makes"),
    "act_flip_rate": Field(FRACTION, "host, act_bits 8: share of predictions the activation rounding changes"),
    "first_divergence": Field(nullable(OBJECT), "host, inconsistent variants: {module, node, max_abs_diff, "
                                                "tolerance} of the first layer beyond tolerance (pipeline.debug)"),
    "providers": Field(TEXTS, "host: ONNX Runtime's execution providers, in priority order"),
    # what it costs
    "latency_ms": Field(NUMBER, "median time of one predict on meta.latency_batch (device) or validate.latency_batch "
                                "(host) test images, after a warm-up one"),
    "file_bytes": Field(nullable(integer(0)), "the artifact's size"),
    "packed_weight_bytes": Field(integer(0), "host: the weights' size packed at their widths"),
    "artifact": Field(TEXT, "the ONNX file, relative to the run folder (host) or the bundle (device)"),
    "sha256": Field(SHA256, "the artifact's sha256"),
    "trt_lint": Field(TEXTS, "host: breaches of TensorRT's explicit-quantization rules (exporters.trt_lint); "
                             "they fail the gate when target_runtime is tensorrt"),
    "kernels": Field(OBJECT, "host: how ONNX Runtime ran it after optimisation, {integer_ops, float_weight_ops, "
                             "unfused, ops} (exporters.kernels.kernel_summary)"),
    "integer_lint": Field(TEXTS, "host: weight ops meant for integer kernels that stayed float; for act_layout "
                                 "tensorrt, residual Adds TensorRT cannot fuse (exporters.trt_lint)"),
    "costs": Field(OBJECT, "device: measured here, after a warm-up by the cold-switch measurement: "
                           "latency {batch_1, batch: {batch, median_ms, p99_ms, repeats}} over --latency-repeats "
                           "predicts (exporters.device.runtime.latency_stats); ready_ms and ready_by (session: "
                           "build and first batch-1 run, what a cold switch costs; engine: a TensorRT engine built "
                           "or loaded and run once; refit: a refit of the engine it shares, shares_engine_with); "
                           "first_run_ms; resident_built_mib and resident_mib, VmRSS growth to after building its "
                           "session and after its first run, glibc heap trimmed (exporters.device.memory; null off "
                           "Linux, host memory only on TensorRT); artifact_bytes; ops, how the runtime ran it "
                           "(PrecisionSwitcher.executed_ops) or {unavailable: why}"),
}
ROW = Record(_ROW, closed=False)
VARIANT = ROW.replace(**{k: Field(ROW.fields[k].type, ROW.fields[k].doc, required=True)
                         for k in ("name", "symmetric", "per_channel", "act_bits", "runtime_accuracy")},
                      bits=Field(BITS, "weight bits; with layer_bits the widest layer's", required=True))
BASELINE = ROW.replace(
    runtime_accuracy=Field(nullable(FRACTION), ROW.fields["runtime_accuracy"].doc),
    reference_accuracy=Field(FRACTION, "what every variant's drop is measured from: the float variant's "
                                       "runtime_accuracy (one runtime, one set of samples)", required=True))

META = Record({
    "model": Field(nullable(TEXT), "the model's name or factory; a regression check needs it in both reports"),
    "dataset": Field(nullable(TEXT), "the dataset; must match a --baseline report's"),
    "classes": Field(nullable(TEXTS), "host: class names in output order; must match a --baseline report's"),
    "test_samples": Field(nullable(integer(1)), "how many test samples (host: limit_test, null for the whole "
                                                "split; device: test.npz's)"),
    "created": Field(TEXT, "when, ISO 8601 UTC"),
    "host": Field(TEXT, "platform.platform() of the machine that measured"),
    "tool_version": Field(TEXT, "host: the hero-deploy that wrote it"),
    "config": Field(TEXT, "host: the deploy config's name"),
    "checkpoint": Field(TEXT, "host: the checkpoint's path"),
    "checkpoint_sha256": Field(SHA256, "host: the checkpoint's sha256"),
    "train_optimizer": Field(ANY, "host: the optimizer the checkpoint was trained with, where recorded"),
    "data_root": Field(nullable(TEXT), "host: where the data was read"),
    "target": Field(OBJECT, "host: the config's target section"),
    "torch": Field(TEXT, "host: torch's version"),
    "onnxruntime": Field(TEXT, "host: ONNX Runtime's version"),
    "run_inputs": Field(OBJECT, "host: every input of the run but the gate (pipeline.rundir)"),
    "bundle": Field(TEXT, "device: the bundle folder"),
    "role": Field(one_of(*ROLES), "device: where it was measured (a bundle's host_report.json says host, which "
                                  "PrecisionSwitcher.select refuses unless told)"),
    "source_sha256": Field(nullable(SHA256), "device: the checkpoint's sha256, from the manifest"),
    "runtime": Field(TEXT, "device: the runtime that ran the bundle"),
    "runtime_version": Field(TEXT, "device: its version"),
    "providers": Field(TEXTS, "device: the runtime's providers or device"),
    "switch_latency": Field(OBJECT, "device: {median_ms, max_ms, switches} of measure_switch_latency over "
                                    "every variant prepared"),
    "cold_switch_latency": Field(nullable(OBJECT), "device: the same with one resident session, so that every "
                                                   "switch prepares a session (null on TensorRT)"),
    "latency_batch": Field(integer(1), "device: the batch latency_ms and costs.latency.batch are timed at"),
    "inference_precision": Field(nullable(one_of("f32", "bf16")), "device: OpenVINO's INFERENCE_PRECISION_HINT "
                                                                  "(null: its default, or another runtime)"),
    "memory": Field(OBJECT, "device: {measure, unavailable} of the resident-memory readings"),
    "refit_verdicts": Field(nullable(OBJECT), "device, TensorRT: {variant: record} of each refit proven against "
                                              "the variant's own engine (exporters.device.trt_switch)"),
    "unlisted_files": Field(TEXTS, "device: files in the bundle its manifest does not list (no sha256 covers them)"),
    "machine": Field(TEXT, "device: platform.machine()"),
    "python": Field(TEXT, "device: Python's version"),
    "numpy": Field(TEXT, "device: numpy's version"),
}, closed=False)

GATE = Record({
    "passed": Field(BOOL, "what the exit code says", required=True),
    "reasons": Field(TEXTS, "the failures (empty when it passed)", required=True),
    "gated": Field(BOOL, "host: false when the config set no accuracy threshold: only checks that need none ran "
                         "(absent: read as true)"),
    "note": Field(nullable(TEXT), "host: with gated false, says so and how to set a threshold (else null)"),
}, closed=False)

REPORT = Record({
    "meta": Field(META, "where, when and of what the report was made"),
    "baseline": Field(BASELINE, "the float variant's row", required=True),
    "variants": Field(ListOf(VARIANT, 1), "one row per quantized variant", required=True),
    "gate": Field(GATE, "the verdict (validate_bundle: non-finite logits only; hero check judges the rest)"),
}, closed=False)


def with_drops(baseline: dict, variants: list[dict]) -> tuple[dict, list[dict]]:
    """The baseline row with its `reference_accuracy` (its runtime accuracy) and copies of the variant
    rows with their `drop` and `drop_points` from it: one runtime, the same samples."""
    baseline = dict(baseline, reference_accuracy=baseline["runtime_accuracy"])
    drops = [baseline["reference_accuracy"] - row["runtime_accuracy"] for row in variants]
    return baseline, [dict(row, drop=drop, drop_points=100.0 * drop) for row, drop in zip(variants, drops)]
