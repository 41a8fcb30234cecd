"""Mixed precision against uniform precision at equal packed weight size, in ONNX Runtime.

For each checkpoint: the per-layer sensitivity (pipeline.sensitivity.layer_sensitivity, once:
Hutchinson traces with joint probes on `--hessian-batches` training batches of 128, and each
layer alone quantized at every candidate width, measured on those batches) gives two cost
tables, HAWQ-V3's Ω (``hessian``) and the measured loss increase (``measured``). For budgets of
4 and 3.5 average weight bits, pipeline.mixed.solve_bits picks the widths from {8, 6, 4, 3, 2}
under each objective. Every variant is exported (exporters.onnx, INT4 storage where a layer is
<= 4 bits; BatchNorm folded, symmetric per-channel weights, float activations) and its top-1
accuracy measured by ONNX Runtime (CPU, one thread) on the first `--limit-test` test images:

- fp32, uniform 4 and uniform 3 bits;
- hessian and measured at 4 and 3.5 average bits;
- random at 4 and 3.5 average bits: the mean of 5 random feasible assignments (`random_bits`:
  every layer draws a width uniformly from the candidates; while the total is over the budget a
  random layer not at the lowest width drops one candidate step; then, in random order, layers
  rise one step while the total still fits, until none can, so the assignment spends the budget
  about as fully as the solver's).

Also reported: Spearman's ρ across layers between Ω and the measured loss increase, per width.

Results are cached per checkpoint label in the JSON (with the checkpoint's sha256 and the
settings): a rerun skips the finished ones, so checkpoints can be added one command at a time.
A label measured on another machine, whose checkpoint is not on this one (the paper driver keeps
results, not checkpoints), is shown with ``--cached LABEL``.

    python benchmarks/mixed_precision.py --checkpoint sgd-s0=PATH --checkpoint hero-s0=PATH
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import click

CANDIDATES = (8, 6, 4, 3, 2)
BUDGETS = (4.0, 3.5)
RANDOM_DRAWS = 5
OBJECTIVES = ("hessian", "measured")
RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------- pure parts


def total_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> int:
    return sum(sizes[n] * b for n, b in bits.items())


def random_bits(sizes: Mapping[str, int], candidates: Sequence[int], budget: int, rng: random.Random
                ) -> dict[str, int]:
    """A random assignment of `candidates` to the layers of `sizes` whose packed total is at most
    `budget` bits and that no single layer can raise one step within it (draw, repair, fill: see
    the module docstring)."""
    ladder = sorted(candidates)
    if sum(sizes.values()) * ladder[0] > budget:
        raise ValueError(f"no assignment fits {budget} bits: even {ladder[0]} bits everywhere is over it")
    step = {n: rng.randrange(len(ladder)) for n in sizes}
    used = sum(sizes[n] * ladder[k] for n, k in step.items())
    while used > budget:
        name = rng.choice([n for n, k in step.items() if k > 0])
        used -= sizes[name] * (ladder[step[name]] - ladder[step[name] - 1])
        step[name] -= 1
    while True:
        raisable = [n for n, k in step.items()
                    if k + 1 < len(ladder) and used + sizes[n] * (ladder[k + 1] - ladder[k]) <= budget]
        if not raisable:
            break
        name = rng.choice(raisable)
        used += sizes[name] * (ladder[step[name] + 1] - ladder[step[name]])
        step[name] += 1
    return {n: ladder[step[n]] for n in sizes}


def plan_variants(costs: Mapping[str, Mapping[str, Mapping[int, float]]], sizes: Mapping[str, int],
                  seed: int = 0) -> list[dict]:
    """The variants to measure: {"method", "budget", "draw", "bits"} with bits None (fp32), an
    int (uniform) or {layer: bits}; `costs` maps each objective to its cost table."""
    from pipeline.mixed import budget_bits, solve_bits

    variants = [{"method": "fp32", "budget": None, "draw": None, "bits": None},
                {"method": "uniform", "budget": 4.0, "draw": None, "bits": 4},
                {"method": "uniform", "budget": 3.0, "draw": None, "bits": 3}]
    for budget in BUDGETS:
        for objective in OBJECTIVES:
            solution = solve_bits(costs[objective], sizes, {"average_bits": budget})
            variants.append({"method": objective, "budget": budget, "draw": None, "bits": solution["bits"]})
        rng = random.Random(f"{seed}-{budget}")
        capacity = budget_bits({"average_bits": budget}, sizes)
        for draw in range(RANDOM_DRAWS):
            variants.append({"method": "random", "budget": budget, "draw": draw,
                             "bits": random_bits(sizes, CANDIDATES, capacity, rng)})
    return variants


def summarise(rows: Sequence[dict]) -> list[dict]:
    """One line per (method, budget): accuracy and size, random draws averaged (with their spread)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), group in groups.items():
        acc = [r["accuracy"] for r in group]
        mean = sum(acc) / len(acc)
        spread = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1)) if len(acc) > 1 else None
        out.append({"method": method, "budget": budget, "n": len(group), "accuracy": mean, "accuracy_std": spread,
                    "average_bits": sum(r["average_bits"] or 32 for r in group) / len(group),
                    "packed_bytes": sum(r["packed_bytes"] for r in group) / len(group)})
    return out


def _label(line: dict) -> str:
    if line["method"] == "fp32":
        return "fp32"
    if line["method"] == "uniform":
        return f"uniform {line['budget']:g}-bit"
    suffix = f" (mean of {line['n']})" if line["n"] > 1 else ""
    return f"{line['method']} @ {line['budget']:g} avg bits{suffix}"


def markdown(results: Mapping[str, dict]) -> str:
    """The accuracy table (one column per checkpoint) and the Spearman table."""
    labels = list(results)
    lines = ["| variant | avg bits | KiB | " + " | ".join(labels) + " |", "|---|---:|---:|" + "---:|" * len(labels)]
    order = [(l["method"], l["budget"]) for l in results[labels[0]]["summary"]]
    for key in order:
        cells, first = [], None
        for label in labels:
            line = next(l for l in results[label]["summary"] if (l["method"], l["budget"]) == key)
            first = first or line
            std = f" ± {100 * line['accuracy_std']:.2f}" if line["accuracy_std"] is not None else ""
            cells.append(f"{100 * line['accuracy']:.2f}{std}")
        lines.append(f"| {_label(first)} | {first['average_bits']:.3f} | {first['packed_bytes'] / 1024:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Spearman ρ(Ω, measured loss increase) across layers, per width:", "",
              "| bits | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for i, b in enumerate(CANDIDATES):
        rhos = [results[label]["spearman"][i]["loss_increase"] for label in labels]
        lines.append(f"| {b} | " + " | ".join("n/a" if r is None else f"{r:+.2f}" for r in rhos) + " |")
    return "\n".join(lines)


def cached_results(cache: Mapping[str, dict], labels: Sequence[str], settings: Mapping) -> dict[str, dict]:
    """The cached results of `labels`, each measured with `settings`; a HeroError names any that is not."""
    from exporters.device.errors import HeroError

    missing = [label for label in labels if cache.get(label, {}).get("settings") != dict(settings)]
    if missing:
        raise HeroError(f"--cached {' '.join(missing)}: not in the cache with these settings "
                        f"(cached: {', '.join(sorted(cache)) or 'none'}); pass --checkpoint LABEL=PATH to measure it")
    return {label: cache[label] for label in labels}


def pending(cache: Mapping[str, dict], checkpoints: Mapping[str, str], settings: Mapping, digests: Mapping[str, str]
            ) -> list[str]:
    """The labels whose cached result is missing or was measured on another file or settings."""
    return [label for label in checkpoints
            if label not in cache or cache[label].get("sha256") != digests[label]
            or cache[label].get("settings") != dict(settings)]


# --------------------------------------------------------------------------- measurement


def measure(path: Path, settings: Mapping, data_root: str | None, folder: Path) -> dict:
    import torch

    from exporters.device.runtime import OnnxRuntimeRunner, top1
    from exporters.onnx import ExportOptions, export_onnx
    from exporters.quantize import QuantSpec, average_bits, packed_weight_bytes
    from hero_train.checkpoint import DataRef, load_deployable
    from pipeline import stages
    from pipeline.mixed import cost_table, layer_sizes
    from pipeline.sensitivity import layer_sensitivity

    start = time.perf_counter()
    loaded = load_deployable(path, data=DataRef(root=data_root))
    xt, yt = stages.load_split(loaded, "train", 128 * settings["hessian_batches"])
    batches = [(torch.from_numpy(xt[i:i + 128]), torch.from_numpy(yt[i:i + 128]).long())
               for i in range(0, len(xt), 128)]
    accuracy_data = (torch.from_numpy(xt), torch.from_numpy(yt).long())
    sens = layer_sensitivity(loaded.model, batches, accuracy_data, bits=CANDIDATES, symmetric=True, per_channel=True,
                             bound_linf=float("inf"), samples=settings["samples"], seed=settings["seed"], joint=True)
    sizes = layer_sizes(sens)
    costs = {o: cost_table(sens, o, CANDIDATES) for o in OBJECTIVES}
    sensitivity_s = time.perf_counter() - start

    start = time.perf_counter()
    x, y = stages.load_split(loaded, "test", settings["limit_test"])
    rows = []
    for v in plan_variants(costs, sizes, settings["seed"]):
        bits = v["bits"]
        spec = QuantSpec(layer_bits=bits) if isinstance(bits, dict) else QuantSpec(bits=bits)
        widths = list(bits.values()) if isinstance(bits, dict) else [bits]
        int4 = bits is not None and min(widths) <= 4
        onnx_path = export_onnx(loaded.model, folder / "variant.onnx", spec, ExportOptions(int4_storage=int4),
                                input_shape=loaded.input.shape)
        runner = OnnxRuntimeRunner(onnx_path, ["CPUExecutionProvider"], intra_op_threads=1)
        accuracy = top1(runner.predict(x), y)
        rows.append({**v, "accuracy": accuracy, "average_bits": average_bits(loaded.model, spec),
                     "packed_bytes": packed_weight_bytes(loaded.model, spec)})
    return {"settings": dict(settings), "float_on_batches": sens["float"], "sizes": sizes,
            "costs": {o: {n: {str(b): c for b, c in t.items()} for n, t in table.items()} for o, table in costs.items()},
            "spearman": sens["spearman"], "rows": rows, "summary": summarise(rows),
            "seconds": {"sensitivity": sensitivity_s, "export_and_eval": time.perf_counter() - start}}


@click.command()
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="LABEL=PATH",
              help="A checkpoint and its column label; repeat.")
@click.option("--cached", "cached", multiple=True, metavar="LABEL",
              help="A column measured earlier whose checkpoint is not on this machine (its cached result); repeat.")
@click.option("--data-root", default=None, help="Dataset folder (default: found by hero_train.data).")
@click.option("--limit-test", type=click.IntRange(min=1), default=5000, show_default=True,
              help="First N test images for every accuracy.")
@click.option("--hessian-batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Training batches of 128 for the traces and the measured costs.")
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True, help="Hutchinson probes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=str(RESULTS), show_default=True)
def main(checkpoints, cached, data_root, limit_test, hessian_batches, samples, seed, out_dir):
    from exporters.device.errors import HeroError
    from exporters.device.files import sha256_file, write_atomic

    paths = {}
    for item in checkpoints:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            raise click.BadParameter(f"{item!r}: give LABEL=PATH with an existing checkpoint file", param_hint="--checkpoint")
        paths[label] = path
    if not paths and not cached:
        raise click.UsageError("give at least one --checkpoint LABEL=PATH or --cached LABEL")
    settings = {"limit_test": limit_test, "hessian_batches": hessian_batches, "samples": samples, "seed": seed,
                "candidates": list(CANDIDATES)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "mixed_precision.json"
    cache = json.loads(json_path.read_text())["checkpoints"] if json_path.exists() else {}
    try:
        earlier = cached_results(cache, [label for label in cached if label not in paths], settings)
    except HeroError as exc:
        raise click.BadParameter(str(exc), param_hint="--cached") from None
    digests = {label: sha256_file(p) for label, p in paths.items()}
    todo = pending(cache, paths, settings, digests)
    print(f"{len(paths) - len(todo)} cached, measuring {todo}; load average {os.getloadavg()[0]:.2f}")
    for label in todo:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(Path(paths[label]), settings, data_root, Path(tmp))
        cache[label] = {"checkpoint": paths[label], "sha256": digests[label], **result}
        write_atomic(json_path, json.dumps({"checkpoints": cache}, indent=1))
        s = result["seconds"]
        print(f"{label}: sensitivity {s['sensitivity']:.0f} s, export + eval {s['export_and_eval']:.0f} s")
    shown = {**earlier, **{label: cache[label] for label in paths}}
    table = markdown(shown)
    write_atomic(out / "mixed_precision.md", f"# Mixed precision (first {limit_test} test images, ONNX Runtime)\n\n"
                 f"{table}\n")
    print(table)


if __name__ == "__main__":
    main()
