"""The paper's figures from finished cells: PTQ accuracy vs bits (Figure 1), ||Hz|| and the
generalization gap over epochs (Figure 2), loss contours of HERO and SGD (Figure 3)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.paper import tables as T  # noqa: E402
from benchmarks.paper import plan as P  # noqa: E402
from benchmarks.paper.plan import method_label  # noqa: E402
from pipeline.report import plot_accuracy_vs_bits  # noqa: E402

CONTOUR_FILE = "contour.json"


def _suffix(group: str, many: bool) -> str:
    return "_" + group.replace(" / ", "_") if many else ""


def _main_cells(plan: dict, cells: list[dict], tag: str, group: str,
                optimizers=("sgd", "gradl1", "first-order", "hero")) -> list[dict]:
    seed = plan["scale"]["seeds"][0]
    out = []
    for optimizer in optimizers:
        chosen = [c for c in T.pick(cells, tag, group, seed=seed, **T.main_match(plan, optimizer)) if c["finished"]]
        out += chosen[:1]
    return out


def figure1(plan: dict, cells: list[dict], results_dir: Path) -> list[Path]:
    """Runtime accuracy against weight bits for every method, mean over the finished seeds, one
    figure per dataset/model and PTQ scheme."""
    paths, all_groups = [], T.groups(cells)
    for group in all_groups:
        for scheme in T.schemes(plan):
            series, baselines = {}, {}
            for optimizer in ("sgd", "gradl1", "first-order", "hero"):
                chosen = [c for c in T.pick(cells, "fig1", group, **T.main_match(plan, optimizer))
                          if scheme in c.get("reports", {})]
                if not chosen:
                    continue
                label = f"{method_label({'optimizer': optimizer})} ({len(chosen)} seed{'s' * (len(chosen) > 1)})"
                bits = [v["bits"] for v in chosen[0]["reports"][scheme]["variants"]]
                series[label] = [(b, float(np.mean([T.ptq_accuracy(c, b, scheme) for c in chosen]))) for b in bits]
                baselines[label] = float(np.mean([T.ptq_accuracy(c, None, scheme) for c in chosen]))
            if series:
                path = results_dir / f"fig1_ptq{_suffix(group, len(all_groups) > 1)}_{P.scheme_dir(scheme)}.png"
                paths.append(plot_accuracy_vs_bits(series, baselines, path,
                                                   title=f"PTQ in ONNX Runtime, {group}, {scheme}"))
    return paths


def figure2(plan: dict, cells: list[dict], results_dir: Path) -> list[Path]:
    """(a) ||Hz|| per epoch where recorded; (b) generalization gap, train − test accuracy (points;
    the train accuracy is the running one over each epoch's augmented batches)."""
    paths, all_groups = [], T.groups(cells)
    for group in all_groups:
        chosen = _main_cells(plan, cells, "fig2", group)
        if not chosen:
            continue
        fig, (ax_hz, ax_gap) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
        any_hz = False
        for cell in chosen:
            label = method_label(cell["config"])
            epochs = [m["epoch"] for m in cell["metrics"]]
            hz = [m.get("hz_norm") for m in cell["metrics"]]
            if any(v is not None for v in hz):
                any_hz = True
                ax_hz.plot([e for e, v in zip(epochs, hz) if v is not None], [v for v in hz if v is not None],
                           marker="o", label=label)
            gap = [100 * (m["train_accuracy"] - m["test_accuracy"]) for m in cell["metrics"]]
            ax_gap.plot(epochs, gap, marker="o", label=label)
        if any_hz:
            ax_hz.set(xlabel="epoch", ylabel="||H z|| (h = 1)", title="(a) ||Hz|| on training batches", yscale="log")
            ax_hz.legend(fontsize=8)
        else:
            ax_hz.text(0.5, 0.5, "||Hz|| not recorded\n(no Figure 2 cell\nhas finished an epoch)",
                       ha="center", va="center", transform=ax_hz.transAxes)
            ax_hz.set_axis_off()
        ax_gap.axhline(0.0, color="grey", linewidth=0.8)
        ax_gap.set(xlabel="epoch", ylabel="train − test accuracy (points)", title="(b) generalization gap")
        ax_gap.legend(fontsize=8)
        for ax in (ax_hz, ax_gap):
            ax.grid(alpha=0.3)
        fig.suptitle(f"{group}, seed {plan['scale']['seeds'][0]}")
        fig.tight_layout()
        path = results_dir / f"fig2_hz_gap{_suffix(group, len(all_groups) > 1)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def contour_files(cell: dict) -> tuple[Path, Path]:
    """A cell's final checkpoint and its cached contour."""
    folder = Path(cell["folder"])
    return folder / "train" / "checkpoint.pt", folder / CONTOUR_FILE


def contour_available(cell: dict) -> bool:
    """Whether a cell's contour can be drawn here: its checkpoint is on this machine or it was kept."""
    return any(path.is_file() for path in contour_files(cell))


def contour_of(cell: dict, steps: int = 11, span: float = 1.0, batches: int = 2, batch_size: int = 128) -> dict:
    """Li et al. (2018) loss contour of a cell's final checkpoint on its first training batches
    (unaugmented, BatchNorm in eval mode), cached in the cell folder per checkpoint and settings."""
    import torch

    from hero_train import data as hdata
    from hero_train.checkpoint import DataRef, load_deployable
    from hero_train.hessian import cross_entropy_loss, loss_contour

    ckpt_path, cache = contour_files(cell)
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if not ckpt_path.is_file() and cached:  # a kept cell (archive.py): its checkpoint is not kept
        settings = {k: v for k, v in cached["key"].items() if k not in ("sha256", "images")}
        if settings == {"steps": steps, "span": span, "batch_size": batch_size}:
            return cached
    trained = load_deployable(ckpt_path, data=DataRef(root=cell["config"].get("data_root")))
    train = hdata.load_dataset(trained.data.dataset, "train", root=trained.data.root)
    n = min(batches * batch_size, len(train.labels), cell["config"].get("limit_train") or len(train.labels))
    key = {"sha256": trained.sha256, "steps": steps, "span": span, "images": n, "batch_size": batch_size}
    if cached.get("key") == key:
        return cached
    x = hdata.normalize(train.images[:n], trained.input.mean, trained.input.std)
    data = [(x[i : i + batch_size], train.labels[i : i + batch_size]) for i in range(0, n, batch_size)]
    torch.manual_seed(0)
    result = loss_contour(trained.model, cross_entropy_loss, data, steps=steps, span=span, seed=0)
    out = {"key": key, "alphas": result.alphas.tolist(), "betas": result.betas.tolist(),
           "losses": result.losses.tolist()}
    cache.write_text(json.dumps(out))
    return out


def flatness(contour: dict) -> dict:
    """Summary numbers of a contour: the loss at the trained weights and the mean loss rise over the
    grid (a flatter minimum rises less)."""
    losses = np.asarray(contour["losses"])
    centre = float(losses[len(losses) // 2, len(losses) // 2])
    return {"centre": centre, "mean_rise": float(losses.mean() - centre)}


def figure3(plan: dict, cells: list[dict], results_dir: Path, steps: int = 11) -> tuple[list[Path], dict, list[str]]:
    """Loss contours of SGD and HERO (seed 0) side by side on shared contour levels, so the widths of
    the basins compare (the paper's Figure 3); returns the figure paths, the flatness numbers and the
    cells whose contour cannot be computed here (no checkpoint on this machine, none kept)."""
    paths, numbers, missing, all_groups = [], {}, [], T.groups(cells)
    for group in all_groups:
        chosen = _main_cells(plan, cells, "fig3", group, optimizers=("sgd", "hero"))
        if not chosen:
            continue
        lost = [c["name"] for c in chosen if not contour_available(c)]
        if lost:
            missing.extend(lost)
            continue
        contours = {method_label(c["config"]): contour_of(c, steps=steps) for c in chosen}
        top = max(float(np.max(c["losses"])) for c in contours.values())
        low = min(float(np.min(c["losses"])) for c in contours.values())
        levels = np.geomspace(max(low, 1e-3), top, 15)
        fig, axes = plt.subplots(1, len(contours), figsize=(5 * len(contours), 4.5), dpi=120, squeeze=False)
        for ax, (label, contour) in zip(axes[0], contours.items()):
            lines = ax.contour(contour["alphas"], contour["betas"], np.asarray(contour["losses"]).T,
                               levels=levels, cmap="viridis")
            ax.clabel(lines, inline=True, fontsize=7, fmt="%.2f")
            ax.plot([0.0], [0.0], marker="*", color="red", markersize=10)
            ax.set(xlabel="direction 1", ylabel="direction 2", title=label)
            numbers[f"{group} / {label}"] = flatness(contour)
        fig.suptitle(f"Loss contours, {group}\n(filter-normalised random directions, Li et al. 2018)", fontsize=9)
        fig.tight_layout()
        path = results_dir / f"fig3_contours{_suffix(group, len(all_groups) > 1)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths, numbers, missing
