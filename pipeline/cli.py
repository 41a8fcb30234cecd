"""The ``hero`` command line: every command is here (the options several share, and their types, in
pipeline.cli_options); the work is done by plain functions elsewhere.

Every user error (a HeroError, or a bad option click detects) becomes one line on stderr and exit
code 2; ``hero check`` and ``hero run`` exit 1 when the gate fails.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from exporters.device.errors import HeroError
from exporters.device.schema import ACT_LAYOUTS
from pipeline.cli_options import (DATA_ROOT_HELP, JSON_MAPPING, FloatRange, IntRange, deploy_options, named_model,
                                  quant_spec, scheme_options, train_options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hero-deploy", prog_name="hero")
def cli():
    """hero-deploy: train with HERO, quantize post-training, export, validate and gate."""


@cli.command()
@train_options
@click.option("--out", "out_dir", default="runs/train", show_default=True, help="output directory")
@click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint")
def train(out_dir, resume, **options):
    """Train a model with HERO or a baseline; writes checkpoint.pt and metrics.jsonl."""
    from hero_train.config import TrainConfig
    from hero_train.train import train as run_training

    path = run_training(TrainConfig(**options), out_dir, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        click.echo(f"checkpoint: {path}")


@cli.command()
@click.argument("config_path", metavar="CONFIG")
@click.option("--checkpoint", type=click.Path(), default=None, help="skip training: deploy this checkpoint")
@click.option("--out", "out_dir", default=None, help="run directory (default runs/<config name>)")
@click.option("--model", default=None, help="overrides the config's model section: a built-in name or your factory "
                                            "package.module:function (needed for a checkpoint that records a factory)")
@click.option("--model-kwargs", type=JSON_MAPPING, default=None, help="JSON keyword arguments of the factory")
@click.option("--dataset", default=None, help="overrides the config's data.dataset (a built-in name, a folder, an .npz)")
@click.option("--data-root", default=None, help="overrides the config's data.root: " + DATA_ROOT_HELP)
@click.option("--overwrite", is_flag=True, help="replace a finished run of other inputs in --out")
def run(config_path, checkpoint, out_dir, model, model_kwargs, dataset, data_root, overwrite):
    """Train → quantize → export → validate → report → gate. Exit 0 pass, 1 gate failed, 2 bad input."""
    from pipeline.config import load_config
    from pipeline.run import run_pipeline, summary

    config = load_config(config_path)
    named = named_model(model, model_kwargs)
    if named is not None:
        section = {**config.model.model_dump(exclude_unset=True), **named.to_dict()}
        config = config.model_copy(update={"model": type(config.model).model_validate(section)})
    overrides = {k: v for k, v in (("dataset", dataset), ("root", data_root)) if v is not None}
    if overrides:
        data = type(config.data).model_validate({**config.data.model_dump(exclude_unset=True), **overrides})
        config = config.model_copy(update={"data": data})
    run_dir = Path(out_dir or f"runs/{config.name}")
    report = run_pipeline(config, run_dir, Path(checkpoint) if checkpoint else None,
                          log=lambda m: click.echo(m, err=True), overwrite=overwrite)
    click.echo(summary(report))
    return 0 if report["gate"]["passed"] else 1


@cli.command()
@click.argument("report_path", metavar="REPORT")
@click.option("--max-drop", type=float, default=None, help="largest allowed drop from the baseline, points")
@click.option("--min-accuracy", type=float, default=None, help="smallest allowed accuracy, fraction")
@click.option("--baseline", "baseline_path", default=None, help="an earlier (or the host's) report.json")
@click.option("--max-regression", type=float, default=None, help="largest allowed loss against --baseline, points")
@click.option("--bits", default=None, help="check only these variants, e.g. 4,8")
@click.option("--junit", default=None, help="also write a JUnit XML file")
def check(report_path, max_drop, min_accuracy, baseline_path, max_regression, bits, junit):
    """Gate a report: exit 0 when every selected variant passes, 1 when any fails, 2 on bad input."""
    from exporters.device.bits import parse_bits
    from pipeline.gate import NO_CRITERION, GateCriteria, evaluate_gate, read_report, write_junit

    if (baseline_path is None) != (max_regression is None):
        raise HeroError("--baseline and --max-regression go together")
    selected = parse_bits(bits) if bits else None
    criteria = GateCriteria(max_drop=max_drop, min_accuracy=min_accuracy, max_regression=max_regression,
                            bits=selected)  # thresholds checked before any file is read
    report = read_report(report_path)
    if baseline_path:
        criteria = dataclasses.replace(criteria, previous=read_report(baseline_path))
    result = evaluate_gate(report, criteria)
    if not result["gated"]:  # a gate that checks no accuracy must not pass a release
        raise HeroError(NO_CRITERION)
    if junit:
        write_junit(result, junit)
    for reason in result["reasons"]:
        click.echo(f"FAIL {reason}")
    click.echo(f"hero check: {len(result['checked'])} variant(s), "
               f"{'all passed' if result['passed'] else str(len(result['reasons'])) + ' failure(s)'}")
    return 0 if result["passed"] else 1


@cli.command()
@click.argument("checkpoint")
@click.option("--bits", default="2-8", show_default=True, help="bit widths, e.g. 2-8 or 4,8")
@scheme_options
@click.option("--limit-test", type=IntRange(min=1), default=None, help="evaluate on the first N test samples")
@click.option("--mixed-average-bits", type=FloatRange(min=0, min_open=True), default=None,
              help="also a mixed-precision row: per-layer widths from --bits (those <= 8) at this average, "
                   "minimising HAWQ-V3's Hessian-weighted perturbation (4 training batches)")
@deploy_options
def quantize(checkpoint, bits, asymmetric, per_tensor, bn, grid, limit_test, mixed_average_bits, request):
    """PTQ sweep in PyTorch: the test accuracy of the fake-quantized model at each bit width."""
    from exporters.device.bits import parse_bits
    from exporters.device.runtime import top1
    from exporters.quantize import average_bits, quantize_model
    from pipeline import stages
    from pipeline.config import MixedSection

    widths = parse_bits(bits)
    specs = [quant_spec(b, asymmetric, per_tensor, bn, grid) for b in (None, *widths)]
    mixed = None
    if mixed_average_bits is not None:
        mixed = MixedSection.model_validate({"candidates": [b for b in widths if b <= 8] or [8],
                                             "budget": {"average_bits": mixed_average_bits}})
    loaded = request.load(checkpoint)
    x, y = stages.load_split(loaded, "test", limit_test)
    if mixed is not None:
        import tempfile

        from pipeline.config import QuantizeSection

        section = QuantizeSection(bits=list(widths), symmetric=not asymmetric, per_channel=not per_tensor, bn=bn,
                                  grid=grid, mixed=mixed)
        with tempfile.TemporaryDirectory() as scratch:
            specs.append(stages.mixed_variant(loaded, section, Path(scratch)).spec)
    click.echo("bits  accuracy")
    for spec in specs:
        logits = stages.torch_logits(quantize_model(loaded.model, spec), x, 500)
        label = f"mixed {average_bits(loaded.model, spec):.2f}" if spec.layer_bits else \
            ("fp32" if spec.bits is None else spec.bits)
        click.echo(f"{label:>4}  {100 * top1(logits, y):.2f}%")
        if spec.layer_bits:
            click.echo("      " + ", ".join(f"{n}:{b}" for n, b in spec.layer_bits))


@cli.command()
@click.argument("checkpoint")
@click.option("--out", "out_path", required=True, help="the .onnx file to write")
@click.option("--bits", type=int, default=None, help="weight bits (omit for a float graph)")
@click.option("--act-bits", type=int, default=None, help="8 for W{n}A8 (calibrated on training batches)")
@click.option("--act-layout", type=click.Choice(ACT_LAYOUTS), default=ACT_LAYOUTS[0], show_default=True,
              help="where activations are quantized: for ONNX Runtime's integer kernels (uint8 at every fusable "
                   "point) or TensorRT's explicit quantization (int8 on Conv/Linear inputs)")
@scheme_options
@click.option("--int4-storage", is_flag=True, help="INT4 initializers for bits <= 4 (opset 21)")
@click.option("--fp16", is_flag=True, help="float16 graph (float models only)")
@click.option("--calibration-batches", type=IntRange(min=1), default=None,
              help="training batches of 128 for --act-bits 8 [default: the config's quantize.calibration_batches]")
@deploy_options
def export(checkpoint, out_path, bits, act_bits, act_layout, asymmetric, per_tensor, bn, grid, int4_storage, fp16,
           calibration_batches, request):
    """Export one variant of a checkpoint to ONNX."""
    from exporters.device.runtime import SOURCE_KEY
    from exporters.onnx import ExportOptions, export_onnx
    from pipeline import stages
    from pipeline.config import QuantizeSection

    spec = quant_spec(bits, asymmetric, per_tensor, bn, grid, act_bits, act_layout)
    if Path(out_path).is_dir():
        raise HeroError(f"--out {out_path} is a folder: name the .onnx file to write")
    loaded = request.load(checkpoint)
    options = ExportOptions(int4_storage=int4_storage, fp16=fp16, metadata={SOURCE_KEY: loaded.sha256})
    batches = calibration_batches or QuantizeSection.model_fields["calibration_batches"].default
    calibration = stages.calibrate_stage(loaded, spec, batches)
    path = export_onnx(loaded.model, out_path, spec, options, calibration, input_shape=loaded.input.shape)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("artifact")
@click.option("--checkpoint", required=True, help="the checkpoint the artifact was exported from")
@click.option("--limit-test", type=IntRange(min=1), default=None, help="validate on the first N test samples")
@deploy_options
@click.option("--logit-atol", type=float, default=None,
              help="largest |Δlogit| (times max(1, max |logit|)) still consistent [default: validate.logit_atol]")
@click.option("--min-agreement", type=FloatRange(0, 1), default=None,
              help="smallest top-1 agreement still consistent [default: validate.min_agreement]")
@click.option("--json", "json_out", default=None, help="also write the result row to this file")
def validate(artifact, checkpoint, limit_test, request, logit_atol, min_agreement, json_out):
    """Run one exported artifact in ONNX Runtime and compare it with its PyTorch emulation."""
    import json

    from exporters.device.files import write_atomic
    from pipeline import stages
    from pipeline.config import RuntimeSection, ValidateSection

    chosen = {"logit_atol": logit_atol, "min_agreement": min_agreement}
    section = ValidateSection(**{k: v for k, v in chosen.items() if v is not None})
    loaded = request.load(checkpoint)
    art, calibration = stages.artifact_from_file(Path(artifact), loaded)
    x, y = stages.load_split(loaded, "test", limit_test)
    row = {"name": art.variant.name, "bits": art.variant.spec.bits,
           **stages.validate_artifact(loaded, art, calibration, stages.in_memory_batches(x, y, section.batch_size),
                                      section, RuntimeSection())}
    if json_out:
        write_atomic(json_out, json.dumps(row, indent=2))
    for key in ("name", "bits", "torch_accuracy", "runtime_accuracy", "agreement", "max_logit_diff",
                "agreement_unoptimized", "latency_ms", "consistent"):
        click.echo(f"{key:>22}: {row[key]}")
    return 0 if row["consistent"] else 1


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", default=None, help="bundle folder (default RUN_DIR/bundle)")
@click.option("--checkpoint", default=None, help="the run's checkpoint, if it moved since the run")
@click.option("--test-samples", type=IntRange(min=1), default=1000, show_default=True,
              help="test images to ship for on-device validation")
@deploy_options
@click.option("--providers", default=None, help="ONNX Runtime providers for the host run, comma-separated")
def bundle(run_dir, out_dir, checkpoint, test_samples, request, providers):
    """Bundle every variant of a finished run for a device: artifacts, manifest, test data, host report."""
    from exporters.device.manifest import HOST_REPORT_FILE
    from pipeline.bundle import BundleOptions, bundle_run

    chosen = tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else None
    path = bundle_run(run_dir, request.data(), out_dir, checkpoint,
                      BundleOptions(test_samples=test_samples, providers=chosen),
                      named_model(request.model, request.model_kwargs))
    click.echo(f"bundle: {path}")
    click.echo(f"on the device: python -m exporters.device.validate_bundle {path} --out device_report.json, then "
               f"hero check device_report.json --baseline {path / HOST_REPORT_FILE} --max-regression 1")


@cli.command()
@click.argument("checkpoint")
@click.option("--batches", type=IntRange(min=1), default=4, show_default=True,
              help="training batches the Hessian is taken over")
@click.option("--batch-size", type=IntRange(min=1), default=128, show_default=True)
@click.option("--loss-increase", type=FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="c of Theorem 3")
@click.option("--bits", default="2-8", show_default=True, help="bit widths to check, e.g. 2-8 or 4,8")
@click.option("--asymmetric", is_flag=True)
@click.option("--per-tensor", is_flag=True)
@click.option("--iters", type=IntRange(min=1), default=20, show_default=True, help="power iterations")
@click.option("--samples", type=IntRange(min=1), default=20, show_default=True, help="Hutchinson probes")
@click.option("--contour", is_flag=True, help="also plot the loss contour (steps² loss evaluations)")
@click.option("--steps", type=IntRange(min=2), default=21, show_default=True, help="contour grid points per axis")
@click.option("--span", type=FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="contour grid half-width")
@click.option("--layers", is_flag=True, help="per-layer sensitivity: traces, Ω, measured loss and accuracy per "
                                             "bit width (layers.json, layers.png, analysis.md)")
@click.option("--top-eigen", is_flag=True, help="with --layers: each layer's top Hessian eigenvalue too (--iters)")
@click.option("--joint-probes", is_flag=True, help="with --layers: one Hutchinson probe over all layers per sample, "
                                                   "layers-times cheaper and noisier")
@click.option("--limit-test", type=IntRange(min=1), default=None,
              help="with --layers: accuracy on the first N test samples [default: the analysis batches]")
@click.option("--seed", type=int, default=0, show_default=True)
@deploy_options
@click.option("--device", default="cpu", show_default=True, help="cpu|cuda")
@click.option("--out", "out_dir", default=None, help="output folder (default: analysis/ next to the checkpoint)")
def analyze(checkpoint, bits, asymmetric, per_tensor, contour, steps, span, layers, top_eigen, joint_probes,
            limit_test, request, out_dir, **measured):
    """Hessian diagnostics of a checkpoint and Theorem 3's verdict on each weight bit width (per layer with --layers)."""
    from exporters.device.bits import parse_bits
    from pipeline.analyze import ANALYSIS, CONTOUR, REPORT, AnalysisOptions, LayerOptions, run_analysis, summary
    from pipeline.sensitivity import LAYER_PLOT, LAYERS, layer_markdown

    options = AnalysisOptions(bits=parse_bits(bits), symmetric=not asymmetric, per_channel=not per_tensor,
                              contour=(steps, span) if contour else None, **measured)
    if not layers and (top_eigen or joint_probes or limit_test is not None):
        raise HeroError("--top-eigen, --joint-probes and --limit-test are options of the per-layer analysis: add --layers")
    layer_options = LayerOptions(top_eigen, joint_probes, limit_test) if layers else None
    result, per_layer, out = run_analysis(request.load(checkpoint), options, layer_options, out_dir)
    click.echo(summary(result))
    if per_layer is not None:
        click.echo(layer_markdown(per_layer))
    written = [ANALYSIS, REPORT] + ([CONTOUR] if result["contour"] else []) + ([LAYERS, LAYER_PLOT] if per_layer else [])
    click.echo(f"wrote {', '.join(str(out / name) for name in written)}")


@cli.command()
@click.argument("artifact")
@click.option("--checkpoint", required=True, help="the checkpoint the artifact was exported from")
@click.option("--limit-test", type=IntRange(min=1), default=None,
              help="compare on the first N test samples [default: 256]")
@click.option("--atol", type=float, default=None,
              help="largest |Δ| per layer (times max(1, max |output|)) still consistent [default: validate.logit_atol]")
@click.option("--out", "out_path", default=None, help="the debug.json to write (default: ARTIFACT's name + .debug.json)")
@deploy_options
def debug(artifact, checkpoint, limit_test, atol, out_path, request):
    """Layer by layer: SQNR of the emulation against float, and where ONNX Runtime parts from it.
    Exit 0 when every layer agrees, 1 at a divergence."""
    import json

    from exporters.device.files import write_atomic
    from pipeline import stages
    from pipeline.config import ValidateSection
    from pipeline.debug import DEFAULT_SAMPLES, debug_artifact, debug_table

    chosen = ValidateSection().logit_atol if atol is None else atol
    if not Path(artifact).is_file():
        raise HeroError(f"artifact {artifact} does not exist: export it first or fix the path")
    loaded = request.load(checkpoint)
    x, _ = stages.load_split(loaded, "test", limit_test or DEFAULT_SAMPLES)
    result = debug_artifact(loaded, Path(artifact), x, atol=chosen)
    out = Path(out_path) if out_path else Path(artifact).with_suffix(".debug.json")
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    click.echo(debug_table(result))
    click.echo(f"wrote {out}")
    return 0 if result["first_divergence"] is None else 1


def _run(argv) -> int:
    try:
        result = cli.main(args=argv, prog_name="hero", standalone_mode=False)
    except HeroError as exc:
        click.echo(f"hero: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("hero: aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"hero: error: {exc.format_message()}", err=True)
        return 2
    except OSError as exc:  # a path the user gave: missing, a folder, read-only, no permission, disk full
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"hero: error: {where}{exc.strerror or exc}", err=True)
        return 2
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Run one command. Library warnings (torch's UserWarning, ...) are held back while it runs: a
    command that stops with an error prints that one line only; one that finishes prints each
    distinct warning once, as `hero: warning: ...`, except deprecation notices libraries give each
    other (DeprecationWarning, FutureWarning: nothing a user of hero can act on)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        code = _run(argv)
    if code in (0, 1):
        seen = set()
        for w in caught:
            if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                continue
            text = f"{w.category.__name__}: {str(w.message).strip().splitlines()[0] if str(w.message).strip() else ''}"
            if text not in seen:
                seen.add(text)
                click.echo(f"hero: warning: {text}", err=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
