"""Accuracy cost of nested grids (refit-only precision switching) against the canonical quantizer.

TensorRT may not refit Q/DQ scales, so `exporters.device.nested_grid` puts every precision on the 8-bit
scale s8 = amax/127 with the n-bit step 2^(8-n)·s8: switching precision then changes only INT8
weight values. The canonical n-bit quantizer uses the step amax/(2^(n-1)-1) instead. This script
measures what that costs on a trained checkpoint: test accuracy of the BN-folded model with its
Conv/Linear weights on each grid (symmetric, per output channel), bits 2..8.

    python benchmarks/nested_grid_accuracy.py --checkpoint runs/quickstart/train/checkpoint.pt
"""

from __future__ import annotations

import click
import numpy as np
import torch

from exporters.device.nested_grid import nested_grid_codes, scale8
from exporters.quantize import QuantSpec, fold_bn, quantize_model, quantized_layers
from hero_train.checkpoint import load_deployable
from pipeline import stages


def nested_model(folded: torch.nn.Module, bits: int) -> torch.nn.Module:
    """A copy of the folded model whose weights are dequantized nested-grid codes (codes · s8)."""
    import copy

    model = copy.deepcopy(folded)
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            w = layer.weight.detach().numpy()
            codes, s8 = nested_grid_codes(w, bits, axis=0)
            s8 = s8.reshape(-1, *[1] * (w.ndim - 1))
            layer.weight.copy_(torch.from_numpy((codes.astype(np.float64) * s8).astype(np.float32)))
    return model


@click.command()
@click.option("--checkpoint", required=True)
@click.option("--limit-test", type=int, default=5000, show_default=True)
def main(checkpoint, limit_test):
    loaded = load_deployable(checkpoint)
    x, y = stages.load_split(loaded, "test", limit_test)
    folded = fold_bn(loaded.model)
    assert all(scale8(l.weight.detach().numpy()).min() > 0 for _, l in quantized_layers(folded))

    def accuracy(model):
        return float((stages.torch_logits(model, x, 500).argmax(1) == y).mean())

    base = accuracy(folded)
    print(f"{checkpoint}: full precision {100 * base:.2f}% on {len(y)} test images")
    print("bits  canonical  nested  nested - canonical (pts)")
    for bits in range(8, 1, -1):
        canonical = accuracy(quantize_model(loaded.model, QuantSpec(bits=bits)))
        nested = accuracy(nested_model(folded, bits))
        print(f"{bits:>4}  {100 * canonical:8.2f}%  {100 * nested:6.2f}%  {100 * (nested - canonical):+8.2f}")


if __name__ == "__main__":
    main()
