"""``hero analyze --layers``: which layer hurts, by the Hessian and by measurement.

For every quantizable layer i (exporters.quantize.quantized_layers: a Conv/Linear weight W_i of
n_i entries) and candidate bit width b, on the analysis batches (the loss ``hero analyze`` takes
its Hessian of: training split, BatchNorm in eval mode):

- tr(H_i): Hutchinson's estimate of the trace of the Hessian block of W_i (hessian.block_traces),
  and with ``top_eigen`` its top eigenvalue (power iteration on the same block);
- ||Q_b(W_i) − W_i||²: the perturbation of the run's weight quantizer (symmetric or not, per
  channel or not) in the trained parametrisation, BatchNorm not folded, so that it lives in the
  space the Hessian is taken in (as pipeline.analyze.quantization_perturbation);
- Ω_i(b) = |tr(H_i)| / n_i · ||Q_b(W_i) − W_i||² (`hawq_omega`), the predicted loss increase;
- the measured loss increase (same batches) and accuracy drop (the same batches, or the first
  ``limit_test`` test samples) with W_i alone quantized to b, everything else in float;
- Spearman's rank correlation between Ω_i(b) and the measured increase across layers, per b:
  how far the Hessian's ranking of the layers can be trusted on this model;
- Theorem 3's per-layer view: Δ_i/2, half the largest scale of W_i's grid (the most round to
  nearest moves a weight), against the model's l-inf bound (Eq. 7) from analysis.json.

Schema of ``layers.json``:

- ``checkpoint``, ``sha256``, ``model``, ``dataset``, ``optimizer``: as in analysis.json
- ``scheme``: ``{"symmetric", "per_channel", "bn": "keep"}`` (the trained parametrisation); ``bits``: the candidate widths
- ``data``: ``{"loss": {"split", "samples"}, "accuracy": {"split", "samples"}}``
- ``float``: ``{"loss", "accuracy"}`` of the unquantized model on those data
- ``hessian``: ``{"samples", "seed", "probes": "separate" | "joint", "top_eigen_iters": int | null}``
- ``theorem3``: ``{"loss_increase", "linf"}``: c and Eq. 7's bound on ||δ||∞ for the whole model
- ``layers``: one entry per layer in registration order, ``{"name", "type", "n_params", "trace",
  "mean_trace" (|trace| / n_params), "top_eigenvalue" (null unless asked), "rows": [...]}``, a row
  per width: ``{"bits", "perturbation_sq", "half_step", "linf", "omega", "loss", "loss_increase",
  "accuracy", "accuracy_drop", "safe_linf"}`` (``half_step`` Δ_i/2, ``linf`` the largest |δ|,
  accuracies as fractions, ``safe_linf``: max(half_step, linf) below the model's l-inf bound)
- ``spearman``: ``[{"bits", "loss_increase", "accuracy_drop"}]``: ρ of Ω against each measure
  across layers (null where a ranking is constant, or with fewer than two layers)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from exporters.device.runtime import top1
from exporters.quantize import fake_quantize, quantize_tensor, dequantize, quantized_layers
from hero_train import hessian

LAYERS = "layers.json"
LAYER_PLOT = "layers.png"


# --------------------------------------------------------------------------- the equations


def hawq_omega(trace: float, n_params: int, perturbation_sq: float) -> float:
    """Ω_i = |tr(H_i)| / n_i · ||Q(W_i) − W_i||²_2: the second-order loss increase a layer's
    quantization perturbation predicts, with the Hessian block replaced by its average eigenvalue.
    HAWQ-V3 (Yao et al., "HAWQ-V3: Dyadic Neural Network Quantization", ICML 2021), the sensitivity
    its integer program minimises, from HAWQ-V2 (Dong et al., NeurIPS 2020, Eq. 2.11). The
    absolute value of the averaged trace, as PyHessian and NNCF take it: a Hutchinson estimate of a
    nearly flat block can come out negative, and a negative Ω would reward quantizing it."""
    return abs(trace) / n_params * perturbation_sq


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of `values`, ties given the mean of the ranks they span (the "fractional" ranking
    Spearman's coefficient uses with ties; Kendall & Gibbons, Rank Correlation Methods, Ch. 3)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ: the Pearson correlation of the average ranks of x and y (Spearman 1904; with
    ties this is the tie-corrected coefficient). None when undefined: fewer than two pairs, or a
    ranking that is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs, got {len(x)} and {len(y)} values")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return None if denom == 0.0 else float((dx * dy).sum()) / denom


def layer_perturbation(weight: torch.Tensor, bits: int, symmetric: bool = True, per_channel: bool = True
                       ) -> dict[str, float]:
    """δ = Q(W) − W of one weight under exporters.quantize (per output channel, axis 0):
    ``half_step`` the largest Δ/2 (|δ_i| <= Δ/2 for round to nearest without clipping, HERO paper
    Theorem 2), ``linf`` the largest |δ_i| applied, ``sq`` = ||δ||²_2 (in float64)."""
    w = weight.detach().to(torch.float32)
    q, scale, zero_point = quantize_tensor(w, bits, symmetric=symmetric, per_channel=per_channel, axis=0)
    delta = (dequantize(q, scale, zero_point, axis=0) - w).double()
    return {"half_step": float(scale.max()) / 2.0, "linf": float(delta.abs().max()), "sq": float((delta * delta).sum())}


# --------------------------------------------------------------------------- measurement


@contextlib.contextmanager
def _only_layer_quantized(layer: torch.nn.Module, bits: int, symmetric: bool, per_channel: bool):
    """The model with `layer`'s weight replaced by Q_b(W) in place, restored bit for bit after."""
    saved = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.copy_(fake_quantize(saved, bits, symmetric=symmetric, per_channel=per_channel, axis=0))
    try:
        yield
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


@torch.no_grad()
def _mean_loss(model: torch.nn.Module, batches) -> float:
    return sum(float(hessian.cross_entropy_loss(model, b)) for b in batches) / len(batches)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 500) -> float:
    x, y = data
    logits = torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(y), batch_size)])
    return top1(logits.cpu().numpy(), y.cpu().numpy())


def layer_sensitivity(model: torch.nn.Module, batches, accuracy_data, *, bits: Sequence[int], symmetric: bool,
                      per_channel: bool, bound_linf: float, samples: int, seed: int, joint: bool = False,
                      top_eigen_iters: int | None = None) -> dict:
    """The ``layers``, ``float``, ``hessian`` and ``spearman`` entries of layers.json for `model`
    (eval mode; restored as it was) on `batches` (loss, Hessian) and `accuracy_data` ((x, y) tensors)."""
    was_training = model.training
    model.eval()
    try:
        layers = quantized_layers(model)
        traces = hessian.block_traces(model, hessian.cross_entropy_loss, batches, [[m.weight] for _, m in layers],
                                      samples=samples, seed=seed, joint=joint)
        base_loss, base_accuracy = _mean_loss(model, batches), _accuracy(model, accuracy_data)
        entries = []
        for (name, layer), trace in zip(layers, traces):
            top = None
            if top_eigen_iters is not None:
                top, _ = hessian.top_eigenvalue(model, hessian.cross_entropy_loss, batches, iters=top_eigen_iters,
                                                seed=seed, params=[layer.weight])
            n = layer.weight.numel()
            rows = []
            for b in bits:
                size = layer_perturbation(layer.weight, b, symmetric, per_channel)
                with _only_layer_quantized(layer, b, symmetric, per_channel):
                    loss, accuracy = _mean_loss(model, batches), _accuracy(model, accuracy_data)
                rows.append({"bits": int(b), "perturbation_sq": size["sq"], "half_step": size["half_step"],
                             "linf": size["linf"], "omega": hawq_omega(trace, n, size["sq"]), "loss": loss,
                             "loss_increase": loss - base_loss, "accuracy": accuracy,
                             "accuracy_drop": base_accuracy - accuracy,
                             "safe_linf": max(size["half_step"], size["linf"]) < bound_linf})
            entries.append({"name": name, "type": type(layer).__name__, "n_params": n, "trace": trace,
                            "mean_trace": abs(trace) / n, "top_eigenvalue": top, "rows": rows})
    finally:
        model.train(was_training)
    return {"float": {"loss": base_loss, "accuracy": base_accuracy},
            "hessian": {"samples": samples, "seed": seed, "probes": "joint" if joint else "separate",
                        "top_eigen_iters": top_eigen_iters},
            "layers": entries, "spearman": rank_correlations(entries, bits)}


def rank_correlations(entries: Sequence[dict], bits: Sequence[int]) -> list[dict]:
    """Per width, Spearman's ρ of Ω against the measured loss increase and accuracy drop across layers."""
    out = []
    for i, b in enumerate(bits):
        rows = [e["rows"][i] for e in entries]
        omega = [r["omega"] for r in rows]
        out.append({"bits": int(b), "loss_increase": spearman(omega, [r["loss_increase"] for r in rows]),
                    "accuracy_drop": spearman(omega, [r["accuracy_drop"] for r in rows])})
    return out


# --------------------------------------------------------------------------- report


def _rho(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def layer_markdown(result: dict) -> str:
    """The layer tables of analysis.md: one of the Hessian per layer, then one per bit width of
    Ω against the measured loss increase and accuracy drop, and Δ/2 against Theorem 3's bound."""
    bound = result["theorem3"]["linf"]
    acc = result["data"]["accuracy"]
    lines = ["## Per-layer sensitivity", "",
             f"Hessian blocks by Hutchinson ({result['hessian']['samples']} {result['hessian']['probes']} probes); "
             f"Ω = |tr(H_i)|/n_i · ||Q(W_i) − W_i||² (HAWQ-V3); measured with that layer alone quantized "
             f"(loss on the {result['data']['loss']['samples']} analysis samples, accuracy on "
             f"{acc['samples']} {acc['split']} samples; float: loss {result['float']['loss']:.4f}, accuracy "
             f"{100 * result['float']['accuracy']:.2f}%). Theorem 3 l-inf bound: {bound:.4g}.", "",
             "| layer | type | params | tr(H_i) | abs(tr)/n | top eigenvalue |", "|---|---|---:|---:|---:|---:|"]
    for e in result["layers"]:
        top = "" if e["top_eigenvalue"] is None else f"{e['top_eigenvalue']:.4g}"
        lines.append(f"| {e['name']} | {e['type']} | {e['n_params']} | {e['trace']:.4g} | {e['mean_trace']:.4g} | {top} |")
    for i, corr in enumerate(result["spearman"]):
        lines += ["", f"### {corr['bits']} bits: Spearman ρ(Ω, measured loss increase) {_rho(corr['loss_increase'])}, "
                      f"ρ(Ω, accuracy drop) {_rho(corr['accuracy_drop'])}", "",
                  "| layer | ‖δ‖² | Ω (predicted) | Δloss (measured) | Δaccuracy (points) | Δ/2 | Theorem 3 |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for e in result["layers"]:
            r = e["rows"][i]
            lines.append(f"| {e['name']} | {r['perturbation_sq']:.4g} | {r['omega']:.4g} | {r['loss_increase']:+.4g} | "
                         f"{100 * r['accuracy_drop']:+.2f} | {r['half_step']:.4g} | "
                         f"{'safe' if r['safe_linf'] else 'not guaranteed'} |")
    return "\n".join(lines)


def plot_layers(result: dict, path) -> None:
    """Grouped bars per layer and bit width: predicted Ω, measured loss increase, and Δ/2 against
    Theorem 3's l-inf bound (a line); written as PNG to `path` (a file or a binary stream)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [e["name"] for e in result["layers"]]
    bits = result["bits"]
    x, width = np.arange(len(names)), 0.8 / len(bits)
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) * max(1, len(bits)) ** 0.5), 9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    panels = [("omega", "predicted Ω (HAWQ-V3)", "log"), ("loss_increase", "measured loss increase", "symlog"),
              ("half_step", "Δ/2 (Theorem 3 l-inf)", "log")]
    for ax, (key, label, scale) in zip(axes, panels):
        values = np.array([[e["rows"][i][key] for e in result["layers"]] for i in range(len(bits))])
        for i, b in enumerate(bits):
            ax.bar(x + (i - (len(bits) - 1) / 2) * width, values[i], width, label=f"{b} bits")
        if scale == "log":
            ax.set_yscale("log", nonpositive="clip")  # clip, not mask: bars start at 0
        else:
            magnitudes = np.abs(values[values != 0])
            smallest = float(magnitudes.min()) if magnitudes.size else 1.0
            ax.set_yscale("symlog", linthresh=max(smallest, float(np.abs(values).max()) * 1e-4))
        ax.set_ylabel(label)
    axes[2].axhline(result["theorem3"]["linf"], color="black", linestyle="--", label="bound (Eq. 7)")
    axes[0].legend(fontsize=7, ncol=len(bits) + 1)
    axes[2].legend(fontsize=7)
    axes[2].set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    axes[0].set_title(f"{result['model']} ({result['optimizer']}): per-layer sensitivity")
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
