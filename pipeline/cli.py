"""The ``hero`` command line.

Every user error (a HeroError, or a bad option click detects) becomes one line on stderr and exit
code 2; ``hero check`` and ``hero run`` exit 1 when the gate fails.
"""

from __future__ import annotations

import sys

import click

from exporters.errors import HeroError


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
@click.option("--lam", type=float, default=0.01, show_default=True, help="Gradient-L1 weight")
@click.option("--label-noise", type=float, default=0.0, show_default=True, help="symmetric label-noise ratio in [0, 1)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu|cuda")
@click.option("--bf16", is_flag=True, help="bf16 autocast (CUDA only)")
@click.option("--limit-train", type=int, default=None, help="train on the first N samples only")
@click.option("--limit-test", type=int, default=None, help="evaluate on the first N test samples only")
@click.option("--no-augment", is_flag=True, help="no random crop and flip")
@click.option("--out", "out_dir", default="runs/train", show_default=True, help="output directory")
@click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint")
def train(out_dir, resume, no_augment, **options):
    """Train a model with HERO or a baseline; writes checkpoint.pt and metrics.jsonl."""
    from hero_train.train import TrainConfig, train as run_training

    config = TrainConfig(augment=not no_augment, **options)
    path = run_training(config, out_dir, resume=resume)
    click.echo(f"checkpoint: {path}")


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
