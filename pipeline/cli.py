"""The ``hero`` command line.

Every user error (a HeroError, or a bad option click detects) becomes one line on stderr and exit
code 2; ``hero check`` and ``hero run`` exit 1 when the gate fails.
"""

from __future__ import annotations

import os
import sys

import click

from exporters.device.errors import HeroError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hero-deploy", prog_name="hero")
def cli():
    """hero-deploy: train with HERO, quantize post-training, export, validate and gate."""


@cli.command()
@click.option("--model", default="resnet20", show_default=True, help="resnet20|resnet32|resnet56|mobilenetv2|vgg19bn|resnet18")
@click.option("--dataset", default="fashion-mnist", show_default=True, help="fashion-mnist|cifar10|cifar100")
@click.option("--data-root", default=None, help="folder holding the dataset files (else $HERO_DATA, system and cache paths)")
@click.option("--optimizer", default="hero", show_default=True, help="sgd|first-order|gradl1|hero")
@click.option("--epochs", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True, help="initial LR of the cosine schedule")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--h", "h", type=float, default=0.5, show_default=True, help="perturbation radius (paper: 0.5 CIFAR-10, 1.0 otherwise)")
@click.option("--gamma", type=float, default=0.1, show_default=True, help="Hessian-penalty weight")
@click.option("--variant", default="authors", show_default=True, help="authors|paper (see README)")
@click.option("--hvp", default="exact", show_default=True, help="exact|finite-difference")
@click.option("--hero-warmup-epochs", type=int, default=1, show_default=True, help="epochs without the penalty")
@click.option("--lam", type=float, default=5e-4, show_default=True,
              help="Gradient-L1 weight (5e-4: the penalty is ~8% of the loss at initialisation on ResNet20)")
@click.option("--label-noise", type=float, default=0.0, show_default=True, help="symmetric label-noise ratio in [0, 1)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu|cuda")
@click.option("--bf16", is_flag=True, help="bf16 autocast (CUDA only)")
@click.option("--sync-bn", is_flag=True, help="BatchNorm statistics over all torchrun ranks (CUDA only)")
@click.option("--limit-train", type=int, default=None, help="train on the first N samples only")
@click.option("--limit-test", type=int, default=None, help="evaluate on the first N test samples only")
@click.option("--no-augment", is_flag=True, help="no random crop and flip")
@click.option("--record-hz", type=int, default=None, help="record ||Hz|| (Eq. 11's z) per epoch on N batches")
@click.option("--out", "out_dir", default="runs/train", show_default=True, help="output directory")
@click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint")
def train(out_dir, resume, no_augment, **options):
    """Train a model with HERO or a baseline; writes checkpoint.pt and metrics.jsonl."""
    from hero_train.train import TrainConfig, train as run_training

    config = TrainConfig(augment=not no_augment, **options)
    path = run_training(config, out_dir, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        click.echo(f"checkpoint: {path}")


def _bits_list(text: str | None) -> tuple[int, ...] | None:
    """'4,8' or '2-8' -> (4, 8) / (2, ..., 8)."""
    if not text:
        return None
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise HeroError(f"--bits takes a list like 4,8 or a range like 2-8 (got {text!r})") from None
    return tuple(out)


@cli.command()
@click.argument("config_path", metavar="CONFIG")
@click.option("--checkpoint", type=click.Path(), default=None, help="skip training: deploy this checkpoint")
@click.option("--out", "out_dir", default=None, help="run directory (default runs/<config name>)")
def run(config_path, checkpoint, out_dir):
    """Train → quantize → export → validate → report → gate. Exit 0 pass, 1 gate failed, 2 bad input."""
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.run import run_pipeline, summary

    config = load_config(config_path)
    run_dir = Path(out_dir or f"runs/{config.name}")
    report = run_pipeline(config, run_dir, Path(checkpoint) if checkpoint else None,
                          log=lambda m: click.echo(m, err=True))
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
    from pipeline.gate import GateCriteria, evaluate_gate, read_report, write_junit

    if (baseline_path is None) != (max_regression is None):
        raise HeroError("--baseline and --max-regression go together")
    report = read_report(report_path)
    previous = read_report(baseline_path) if baseline_path else None
    criteria = GateCriteria(max_drop=max_drop, min_accuracy=min_accuracy, max_regression=max_regression,
                            bits=_bits_list(bits), previous=previous)
    result = evaluate_gate(report, criteria)
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
@click.option("--asymmetric", is_flag=True)
@click.option("--per-tensor", is_flag=True)
@click.option("--no-fold-bn", is_flag=True)
@click.option("--limit-test", type=int, default=None)
def quantize(checkpoint, bits, asymmetric, per_tensor, no_fold_bn, limit_test):
    """PTQ sweep in PyTorch: the test accuracy of the fake-quantized model at each bit width."""
    from exporters.quantize import QuantSpec, quantize_model
    from pipeline import stages

    loaded = stages.load_stage(checkpoint)
    x, y = stages.eval_data(loaded, "test", limit_test)
    click.echo("bits  accuracy")
    for b in (None, *_bits_list(bits)):
        spec = QuantSpec(bits=b, symmetric=not asymmetric, per_channel=not per_tensor, fold_bn=not no_fold_bn)
        logits = stages.torch_logits(quantize_model(loaded.model, spec), x, 500)
        click.echo(f"{'fp32' if b is None else b:>4}  {100 * (logits.argmax(1) == y).mean():.2f}%")


@cli.command()
@click.argument("checkpoint")
@click.option("--out", "out_path", required=True, help="the .onnx file to write")
@click.option("--bits", type=int, default=None, help="weight bits (omit for a float graph)")
@click.option("--act-bits", type=int, default=None, help="8 for W{n}A8 (calibrated on training batches)")
@click.option("--asymmetric", is_flag=True)
@click.option("--per-tensor", is_flag=True)
@click.option("--no-fold-bn", is_flag=True)
@click.option("--int4-storage", is_flag=True, help="INT4 initializers for bits <= 4 (opset 21)")
@click.option("--fp16", is_flag=True, help="float16 graph (float models only)")
def export(checkpoint, out_path, bits, act_bits, asymmetric, per_tensor, no_fold_bn, int4_storage, fp16):
    """Export one variant of a checkpoint to ONNX."""
    from exporters.onnx import export_onnx
    from exporters.quantize import QuantSpec
    from pipeline import stages
    from pipeline.config import QuantizeSection

    loaded = stages.load_stage(checkpoint)
    spec = QuantSpec(bits=bits, symmetric=not asymmetric, per_channel=not per_tensor,
                     fold_bn=not no_fold_bn, act_bits=act_bits)
    scales = stages.calibrate_stage(loaded, QuantizeSection(act_bits=act_bits), None) if act_bits else None
    path = export_onnx(loaded.model, out_path, input_shape=tuple(loaded.ckpt["input_shape"]), spec=spec,
                       act_scales=scales, int4_storage=int4_storage, fp16=fp16,
                       metadata={"hero.source_sha256": loaded.sha256})
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("artifact")
@click.option("--checkpoint", required=True, help="the checkpoint the artifact was exported from")
@click.option("--limit-test", type=int, default=None, help="validate on the first N test samples")
@click.option("--json", "json_out", default=None, help="also write the result row to this file")
def validate(artifact, checkpoint, limit_test, json_out):
    """Run one exported artifact in ONNX Runtime and compare it with its PyTorch emulation."""
    import json
    from pathlib import Path

    from exporters.device.files import write_atomic
    from pipeline import stages
    from pipeline.config import DeployConfig

    loaded = stages.load_stage(checkpoint)
    art, scales = stages.artifact_from_file(Path(artifact), loaded)
    config = DeployConfig.model_validate({"name": "validate", "validate": {"limit_test": limit_test}})
    x, y = stages.eval_data(loaded, "test", limit_test)
    row = {"name": art.variant.name, "bits": art.variant.spec.bits,
           **stages.validate_artifact(loaded, art, scales, x, y, config)}
    if json_out:
        write_atomic(json_out, json.dumps(row, indent=2))
    for key in ("name", "bits", "torch_accuracy", "runtime_accuracy", "agreement", "max_logit_diff",
                "agreement_unoptimized", "latency_ms", "consistent"):
        click.echo(f"{key:>22}: {row[key]}")
    return 0 if row["consistent"] else 1


def _register_stage_commands() -> None:
    from pipeline.analyze import analyze_command
    from pipeline.bundle import bundle_command

    cli.add_command(analyze_command)
    cli.add_command(bundle_command)


_register_stage_commands()


def main(argv: list[str] | None = None) -> int:
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
    code = result if isinstance(result, int) else 0
    return code


if __name__ == "__main__":
    sys.exit(main())
