"""``hero analyze``: the curvature of a trained checkpoint and what it says about quantization.

Measured on the first ``--batches`` batches of the checkpoint's training split (clean labels, no
augmentation, BatchNorm in eval mode: the loss of the model that gets quantized), over every
parameter. Writes ``analysis.json`` and ``analysis.md`` (the summary, and the layer tables with
``--layers``) to ``--out`` (default: ``analysis/`` next to the checkpoint), ``loss_contour.png``
with ``--contour``, and ``layers.json`` and ``layers.png`` with ``--layers`` (pipeline.sensitivity,
which documents them). Schema of ``analysis.json``:

- ``checkpoint``, ``sha256``, ``model``, ``dataset``, ``optimizer``: what was analysed
- ``data``: ``{"split", "batches", "batch_size", "samples", "bn_mode"}``
- ``loss``, ``grad_norm``, ``n_params``: mean loss, ||g||_2 of its gradient, parameter count
- ``top_eigenvalue``, ``hessian_trace``, ``hz_norm``: power iteration, Hutchinson, ||Hz|| (h = 1)
- ``theorem3``: ``{"loss_increase", "lambda_max", "grad_l1", "n_nonzero", "l2", "linf", "linf_from_l2"}``:
  c, the |top eigenvalue| used as λ_max, ||g||_1, the number of nonzero parameters (n = ||W||_0),
  and the bounds of Theorem 3: ``l2`` Eq. 6, ``linf`` Eq. 7 (valid for a δ that keeps zero
  weights at zero, as the quantizer does), ``linf_from_l2`` = ``l2`` / sqrt(``n_params``), a
  looser l-inf bound
- ``quantization``: ``{"symmetric", "per_channel", "rows": [...]}``, rows of
  ``quantization_safety``
- ``contour``: ``null`` or ``{"file", "steps", "span", "alphas", "betas", "losses"}``
- ``layers``: ``null`` or ``"layers.json"``, the per-layer analysis written beside it
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporters.device.errors import HeroError
from exporters.device.files import write_atomic
from exporters.quantize import quantized_layers
from hero_train import hessian
from hero_train.checkpoint import Deployable
from pipeline import sensitivity, stages

ANALYSIS = "analysis.json"
REPORT = "analysis.md"
CONTOUR = "loss_contour.png"


@dataclass(frozen=True)
class AnalysisOptions:
    """What ``hero analyze`` measures, on `device`, over the first `batches` training batches of
    `batch_size`: Theorem 3's bounds for a loss increase c = `loss_increase` against each weight
    width of `bits` (on the `symmetric`, `per_channel` grid), the top Hessian eigenvalue by `iters`
    power iterations, the trace by `samples` Hutchinson probes (seeded by `seed`), and with
    `contour` = (steps, span) the loss contour."""

    batches: int
    batch_size: int
    loss_increase: float
    bits: tuple[int, ...]
    symmetric: bool
    per_channel: bool
    iters: int
    samples: int
    seed: int
    contour: tuple[int, float] | None
    device: str

    def __post_init__(self):
        """The checks `hero analyze`'s option types make, for callers of `run_analysis` from Python."""
        if min(self.batches, self.batch_size) < 1:
            raise HeroError(f"--batches and --batch-size must be >= 1 (got {self.batches}, {self.batch_size})")
        if not (math.isfinite(self.loss_increase) and self.loss_increase > 0):
            raise HeroError(f"--loss-increase must be > 0 (got {self.loss_increase})")
        if min(self.iters, self.samples) < 1:
            raise HeroError(f"--iters and --samples must be >= 1 (got {self.iters}, {self.samples})")
        if self.contour is not None and (self.contour[0] < 2 or not self.contour[1] > 0):
            raise HeroError(f"--steps must be >= 2 and --span > 0 (got {self.contour[0]}, {self.contour[1]})")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise HeroError("--device cuda asked for, but this torch has no CUDA device")


@dataclass(frozen=True)
class LayerOptions:
    """The per-layer analysis (pipeline.sensitivity): each layer's top eigenvalue too
    (`top_eigen`, by the analysis' iters), one Hutchinson probe over all layers per sample
    (`joint_probes`), accuracy on the first `limit_test` test samples (None: the analysis batches)."""

    top_eigen: bool
    joint_probes: bool
    limit_test: int | None

    def __post_init__(self):
        if self.limit_test is not None and self.limit_test < 1:
            raise HeroError(f"--limit-test must be >= 1 (got {self.limit_test})")


def quantization_perturbation(model: torch.nn.Module, bits: int, symmetric: bool = True,
                              per_channel: bool = True) -> dict[str, float]:
    """The perturbation δ = Q(W) − W that fake quantization (no BatchNorm folding, so δ lives in
    the parameter space of the Hessian) applies to every Conv/Linear weight: ``half_step`` is
    the largest Δ/2 (Δ the scale of exporters.quantize; |δ_i| ≤ Δ/2 for round-to-nearest
    without clipping, HERO paper Theorem 2), ``linf`` the largest |δ_i| actually applied
    (it can exceed Δ/2 only where the asymmetric grid clips), ``l2`` = ||δ||_2 over all of them."""
    sizes = [sensitivity.layer_perturbation(layer.weight, bits, symmetric, per_channel)
             for _, layer in quantized_layers(model)]
    return {"half_step": max(s["half_step"] for s in sizes), "linf": max(s["linf"] for s in sizes),
            "l2": math.sqrt(sum(s["sq"] for s in sizes))}


def quantization_safety(model: torch.nn.Module, bounds: dict[str, float], bits_list: Sequence[int],
                        symmetric: bool = True, per_channel: bool = True) -> list[dict]:
    """One row per bit width: the quantization perturbation against Theorem 3's bounds.

    A perturbation smaller than a bound cannot raise the loss by c (under the theorem's
    second-order model), so "safe" is a sufficient condition; "not guaranteed" says only that
    the theorem gives no guarantee. The l-inf check uses max(Δ/2, largest |δ_i|).
    """
    rows = []
    for bits in bits_list:
        size = quantization_perturbation(model, bits, symmetric, per_channel)
        safe_linf = max(size["half_step"], size["linf"]) < bounds["linf"]
        safe_l2 = size["l2"] < bounds["l2"]
        rows.append({"bits": int(bits), **size, "bound_linf": bounds["linf"], "bound_l2": bounds["l2"],
                     "safe_linf": safe_linf, "safe_l2": safe_l2,
                     "verdict": "safe" if safe_linf or safe_l2 else "not guaranteed"})
    return rows


def safety_table(rows: Sequence[dict]) -> str:
    """The rows of `quantization_safety` as a fixed-width text table."""
    lines = [f"{'bits':>4} | {'Δ/2 (l-inf)':>11} | {'||δ||2':>10} | {'bound l-inf':>11} | {'bound l2':>10} | verdict"]
    for r in rows:
        lines.append(f"{r['bits']:>4} | {max(r['half_step'], r['linf']):>11.4g} | {r['l2']:>10.4g} | "
                     f"{r['bound_linf']:>11.4g} | {r['bound_l2']:>10.4g} | {r['verdict']}")
    return "\n".join(lines)


def training_batches(loaded: Deployable, n_batches: int, batch_size: int,
                     device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n_batches · batch_size training samples, normalised as in training."""
    x, y = stages.load_split(loaded, "train", n_batches * batch_size)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    return [(x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)) for s in range(0, len(y), batch_size)]


def analyze(loaded: Deployable, batches, options: AnalysisOptions) -> dict:
    """Every diagnostic on `batches`; returns the analysis.json dict (contour file left to the caller)."""
    model, loss_fn, o = loaded.model, hessian.cross_entropy_loss, options
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    with torch.no_grad():
        loss = sum(float(loss_fn(model, b)) for b in batches) / len(batches)
    grad = hessian.gradient(model, loss_fn, batches)
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grad])))
    grad_l1 = float(sum(g.double().abs().sum() for g in grad))
    eigenvalue, _ = hessian.top_eigenvalue(model, loss_fn, batches, iters=o.iters, seed=o.seed)
    # Power iteration finds the eigenvalue largest in magnitude; |it| bounds λ_max from above,
    # so the bounds stay valid (if loose) should it come out negative.
    lambda_max = abs(eigenvalue)
    n_params = sum(p.numel() for p in params)
    n_nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    bounds = hessian.theorem3_bounds(grad_l2=grad_norm, grad_l1=grad_l1, lambda_max=lambda_max, c=o.loss_increase,
                                     n_params=n_params, n_nonzero=n_nonzero)
    result = {
        "checkpoint": str(loaded.path), "sha256": loaded.sha256, "model": loaded.model_ref.label,
        "dataset": loaded.data.dataset, "optimizer": loaded.optimizer,
        "data": {"split": "train", "batches": len(batches), "batch_size": len(batches[0][1]),
                 "samples": sum(len(b[1]) for b in batches), "bn_mode": "eval"},
        "loss": loss, "grad_norm": grad_norm, "n_params": n_params,
        "top_eigenvalue": eigenvalue,
        "hessian_trace": hessian.hutchinson_trace(model, loss_fn, batches, samples=o.samples, seed=o.seed),
        "hz_norm": hessian.hz_norm(model, loss_fn, batches, h=1.0),
        "theorem3": {"loss_increase": o.loss_increase, "lambda_max": lambda_max, "grad_l1": grad_l1,
                     "n_nonzero": n_nonzero, **bounds},
        "quantization": {"symmetric": o.symmetric, "per_channel": o.per_channel,
                         "rows": quantization_safety(model, bounds, o.bits, o.symmetric, o.per_channel)},
        "contour": None,
        "layers": None,
    }
    if o.contour is not None:
        steps, span = o.contour
        grid = hessian.loss_contour(model, loss_fn, batches, steps=steps, span=span, seed=o.seed)
        result["contour"] = {"file": CONTOUR, "steps": steps, "span": span, "alphas": grid.alphas.tolist(),
                             "betas": grid.betas.tolist(), "losses": grid.losses.tolist()}
    return result


def summary(result: dict) -> str:
    """The human-readable report printed by ``hero analyze``."""
    t, d = result["theorem3"], result["data"]
    lines = [
        f"{result['model']} on {result['dataset']} ({result['optimizer']}), {d['samples']} training samples "
        f"in {d['batches']} batch(es), BatchNorm in {d['bn_mode']} mode",
        f"  loss {result['loss']:.4f}   ||g|| {result['grad_norm']:.4g}   parameters {result['n_params']}",
        f"  top Hessian eigenvalue {result['top_eigenvalue']:.4g}   trace (Hutchinson) {result['hessian_trace']:.4g}"
        f"   ||Hz|| {result['hz_norm']:.4g}",
        f"Theorem 3: raising the loss by c = {t['loss_increase']:g} takes ||δ||2 >= {t['l2']:.4g} (Eq. 6) "
        f"and ||δ||inf >= {t['linf']:.4g} (Eq. 7: ||g||1 {t['grad_l1']:.4g}, {t['n_nonzero']} nonzero weights; "
        f"the l2 bound / sqrt(parameters) gives {t['linf_from_l2']:.4g})",
        f"Weight quantization ({'symmetric' if result['quantization']['symmetric'] else 'asymmetric'}, "
        f"{'per-channel' if result['quantization']['per_channel'] else 'per-tensor'}, no BN folding):",
        safety_table(result["quantization"]["rows"]),
        "  safe: smaller than a bound, so it cannot raise the loss by c (Theorem 3, second-order model);",
        "  not guaranteed: the theorem says nothing either way.",
    ]
    return "\n".join(lines)


def accuracy_data(loaded: Deployable, batches, limit_test: int | None, device: str):
    """(x, y) tensors the per-layer accuracy drop is measured on: the first `limit_test` test
    samples, or (None) the analysis batches themselves."""
    if limit_test is None:
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    x, y = stages.load_split(loaded, "test", limit_test)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def analyze_layers(loaded: Deployable, batches, result: dict, accuracy: tuple, accuracy_split: str, *,
                   samples: int, seed: int, joint: bool, top_eigen_iters: int | None) -> dict:
    """layers.json (pipeline.sensitivity) for the analysis `result` already computed on `batches`,
    accuracies on `accuracy` ((x, y) tensors from `accuracy_split`)."""
    q = result["quantization"]
    bits = [r["bits"] for r in q["rows"]]
    layers = sensitivity.layer_sensitivity(loaded.model, batches, accuracy, bits=bits, symmetric=q["symmetric"],
                                           per_channel=q["per_channel"], bound_linf=result["theorem3"]["linf"],
                                           samples=samples, seed=seed, joint=joint, top_eigen_iters=top_eigen_iters)
    return {**{k: result[k] for k in ("checkpoint", "sha256", "model", "dataset", "optimizer")},
            "scheme": {"symmetric": q["symmetric"], "per_channel": q["per_channel"], "bn": "keep"}, "bits": bits,
            "data": {"loss": {"split": result["data"]["split"], "samples": result["data"]["samples"]},
                     "accuracy": {"split": accuracy_split, "samples": len(accuracy[1])}},
            "theorem3": {"loss_increase": result["theorem3"]["loss_increase"], "linf": result["theorem3"]["linf"]},
            **layers}


def report_markdown(result: dict, layers: dict | None) -> str:
    """analysis.md: the summary `hero analyze` prints, then the layer tables when there are any."""
    parts = [f"# hero analyze: {result['model']} ({result['optimizer']})", "", "```", summary(result), "```"]
    if layers is not None:
        parts += ["", sensitivity.layer_markdown(layers), "", f"![per-layer sensitivity]({sensitivity.LAYER_PLOT})"]
    return "\n".join(parts) + "\n"


def run_analysis(loaded: Deployable, options: AnalysisOptions, layers: LayerOptions | None,
                 out_dir=None) -> tuple[dict, dict | None, Path]:
    """`hero analyze`: analyse, write analysis.json and analysis.md (and the contour plot; with
    `layers`, layers.json and its plot) to `out_dir` (default: analysis/ next to the checkpoint);
    returns the result, the per-layer result (None without `layers`) and the folder."""
    loaded.model.to(options.device)
    data = training_batches(loaded, options.batches, options.batch_size, options.device)
    result = analyze(loaded, data, options)
    out = Path(out_dir) if out_dir else loaded.path.parent / "analysis"
    per_layer = None
    if layers is not None:
        accuracy = accuracy_data(loaded, data, layers.limit_test, options.device)
        per_layer = analyze_layers(loaded, data, result, accuracy, "train" if layers.limit_test is None else "test",
                                   samples=options.samples, seed=options.seed, joint=layers.joint_probes,
                                   top_eigen_iters=options.iters if layers.top_eigen else None)
    if result["contour"] is not None:
        grid = hessian.Contour(*(np.array(result["contour"][k]) for k in ("alphas", "betas", "losses")))
        image = io.BytesIO()
        hessian.plot_loss_contour(grid, image, f"{result['model']} ({result['optimizer']}) training loss")
        write_atomic(out / CONTOUR, image.getvalue())
    if per_layer is not None:
        image = io.BytesIO()
        sensitivity.plot_layers(per_layer, image)
        write_atomic(out / sensitivity.LAYER_PLOT, image.getvalue())
        write_atomic(out / sensitivity.LAYERS, json.dumps(per_layer, indent=2) + "\n")
        result["layers"] = sensitivity.LAYERS
    write_atomic(out / REPORT, report_markdown(result, per_layer))
    write_atomic(out / ANALYSIS, json.dumps(result, indent=2) + "\n")
    return result, per_layer, out
