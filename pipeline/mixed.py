"""Mixed-precision bit allocation: the weight bits of every layer that minimise the summed
per-layer cost under a budget on packed weight bits.

The problem is HAWQ-V3's integer program with its model-size constraint (Yao et al., "HAWQ-V3:
Dyadic Neural Network Quantization", ICML 2021): with n_i the weight count of layer i and c_i(b)
its cost at b bits (Ω_i(b) of pipeline.sensitivity, or the measured loss increase), choose one
b_i per layer from its candidates to

    minimise Σ_i c_i(b_i)   subject to   Σ_i n_i·b_i <= budget (bits),

a multiple-choice knapsack. `solve_bits` solves it exactly by dynamic programming over the
budget (Kellerer, Pferschy & Pisinger, Knapsack Problems, Sec. 11.5), in numpy, instead of an
integer-program solver: scipy is not a dependency, and the program is small enough that the DP
is both exact and fast.

How the budget is discretised, and why that is exact: every layer first pays for its cheapest
(fewest-bit) candidate, so what remains to share is the slack S = budget − Σ_i n_i·min(B_i), and
choosing b costs layer i the integer w_ib = n_i·(b − min(B_i)) bits of slack. Let g be the
greatest common divisor of all the w_ib. Every achievable total is a multiple of g, so a total
fits the budget exactly when it fits floor(S / g) units of g: the DP over 0..floor(S / g) units
sees every feasible assignment and no infeasible one, for the instance as stated (no rounding of
sizes or budget). Convolution sizes share large powers of two, so g is usually 16 or more and the
table small: ResNet20 (CIFAR, 22 layers, 0.27 M weights), candidates {8, 6, 4, 3} at 4.5 average bits,
has g = 16 and about 25 000 units. Cost: O(L·K·S/g) time and L·(S/g) bytes for the choices.

Budgets: ``{"average_bits": a}`` allows Σ n_i·b_i <= floor(a·Σ n_i) (a read as the decimal it
prints as, so 4.1 is 41/10), ``{"weight_kib": k}`` allows floor(8192·k) bits: the packed size of
exporters.quantize.packed_weight_bytes, ceil(total bits / 8) bytes. Layers named in
``keep_8bit`` (or "first" / "last": the first / last quantizable layer of the cost table's order,
which `cost_table` takes from layers.json, registration order) are held at 8 bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from exporters.device.bits import check_bits
from exporters.device.errors import HeroError, unknown_choice

OBJECTIVES = ("hessian", "measured")
BUDGETS = ("average_bits", "weight_kib")
KEEP_ALIASES = ("first", "last")
_OBJECTIVE_KEY = {"hessian": "omega", "measured": "loss_increase"}
_MAX_CELLS = 1 << 30  # the choice table, one byte a cell


def budget_bits(budget: Mapping[str, float], sizes: Mapping[str, int]) -> int:
    """The budget as a whole number of packed weight bits (see the module docstring)."""
    if not isinstance(budget, Mapping) or len(budget) != 1 or next(iter(budget)) not in BUDGETS:
        raise HeroError(f"a mixed-precision budget is one of {{average_bits: A}} or {{weight_kib: K}}, got {budget!r}")
    kind, value = next(iter(budget.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise HeroError(f"the budget's {kind} must be a positive number, got {value!r}")
    amount = Fraction(str(value))
    total = amount * sum(sizes.values()) if kind == "average_bits" else amount * 8192
    return math.floor(total)


def keep_8bit_layers(keep: Sequence[str], layers: Sequence[str]) -> set[str]:
    """The layer names `keep` asks to hold at 8 bits, "first" and "last" resolved in `layers` order."""
    resolved = set()
    for name in keep:
        if name in KEEP_ALIASES:
            resolved.add(layers[0] if name == "first" else layers[-1])
        elif name in layers:
            resolved.add(name)
        else:
            raise HeroError(unknown_choice("layer in keep_8bit", name, [*KEEP_ALIASES, *layers]))
    return resolved


def _checked(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], forced: set[str]
             ) -> dict[str, list[tuple[int, float]]]:
    """Each layer's (bits, cost) choices, ascending in bits; 8 bits alone for the forced ones."""
    if not costs or set(costs) != set(sizes):
        raise HeroError(f"costs and sizes must name the same layers, got {sorted(costs)} and {sorted(sizes)}")
    choices = {}
    for name, table in costs.items():
        size = sizes[name]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise HeroError(f"layer {name} needs a positive integer weight count, got {size!r}")
        if not table:
            raise HeroError(f"layer {name} has no candidate bit widths")
        options = sorted((check_bits(b), float(c)) for b, c in table.items())
        if not all(math.isfinite(c) for _, c in options):
            raise HeroError(f"layer {name} has a non-finite cost: rerun hero analyze --layers")
        if name in forced:
            options = [(b, c) for b, c in options if b == 8]
            if not options:
                raise HeroError(f"keep_8bit holds {name} at 8 bits, but 8 is not among its candidates: add 8")
        choices[name] = options
    return choices


def solve_bits(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], budget: Mapping[str, float],
               keep_8bit: Sequence[str] = ()) -> dict:
    """The exact minimum of Σ_i costs[i][b_i] subject to Σ_i sizes[i]·b_i <= the budget.

    `costs` maps each layer (in layer order) to {bits: cost} over its candidates, `sizes` each
    layer to its weight count. Returns ``{"bits": {layer: bits}, "cost", "average_bits",
    "packed_bytes", "budget_bits"}``. Ties go to fewer bits in total. A budget below every layer's
    cheapest candidate (8 for those kept at 8) is a HeroError naming the smallest achievable.
    """
    names = list(costs)
    choices = _checked(costs, sizes, keep_8bit_layers(keep_8bit, names))
    capacity, n_total = budget_bits(budget, sizes), sum(sizes.values())
    base = sum(sizes[n] * options[0][0] for n, options in choices.items())
    if capacity < base:
        raise HeroError(f"the budget {dict(budget)} is below the smallest packed size these candidates reach, "
                        f"{base / n_total:.4g} average bits ({math.ceil(base / 8) / 1024:.4g} KiB): raise it or add "
                        "a lower candidate")
    extra = {n: [sizes[n] * (b - options[0][0]) for b, _ in options] for n, options in choices.items()}
    unit = math.gcd(*(w for ws in extra.values() for w in ws)) or 1
    units = min(capacity - base, sum(max(ws) for ws in extra.values())) // unit
    if len(names) * (units + 1) > _MAX_CELLS:
        raise HeroError(f"the budget spans {units + 1} steps of {unit} bits over {len(names)} layers, too many for "
                        "the exact solver: offer fewer candidates or a tighter budget")
    best = np.full(units + 1, np.inf)
    best[0] = 0.0
    picked = np.zeros((len(names), units + 1), dtype=np.uint8)
    for i, name in enumerate(names):
        new = np.full(units + 1, np.inf)
        for k, ((_, cost), w) in enumerate(zip(choices[name], extra[name])):
            shift = w // unit
            if shift > units:
                continue
            candidate = np.full(units + 1, np.inf)
            candidate[shift:] = best[: units + 1 - shift] + cost
            better = candidate < new
            new[better] = candidate[better]
            picked[i, better] = k
        best = new
    at = int(np.argmin(best))  # the first minimum: the fewest bits among equal costs
    bits = {}
    for i in reversed(range(len(names))):
        k = int(picked[i, at])
        bits[names[i]] = choices[names[i]][k][0]
        at -= extra[names[i]][k] // unit
    bits = {n: bits[n] for n in names}
    total = sum(sizes[n] * b for n, b in bits.items())
    return {"bits": bits, "cost": sum(dict(choices[n])[b] for n, b in bits.items()),
            "average_bits": total / n_total, "packed_bytes": math.ceil(total / 8), "budget_bits": capacity}


def cost_table(layers: dict, objective: str, candidates: Sequence[int] | None = None
               ) -> dict[str, dict[int, float]]:
    """{layer: {bits: cost}} from a layers.json dict: Ω (``hessian``) or the measured loss increase
    (``measured``) at each candidate width (default: every width layers.json holds)."""
    if objective not in OBJECTIVES:
        raise HeroError(unknown_choice("mixed-precision objective", objective, OBJECTIVES))
    key, table = _OBJECTIVE_KEY[objective], {}
    for entry in layers["layers"]:
        rows = {r["bits"]: r[key] for r in entry["rows"]}
        wanted = list(rows) if candidates is None else [check_bits(b) for b in candidates]
        missing = [b for b in wanted if b not in rows]
        if missing:
            raise HeroError(f"layers.json has no {missing}-bit rows for {entry['name']}: rerun hero analyze --layers "
                            f"with --bits covering {sorted(set(wanted))}")
        table[entry["name"]] = {b: float(rows[b]) for b in wanted}
    return table


def layer_sizes(layers: dict) -> dict[str, int]:
    """{layer: weight count} from a layers.json dict, in its layer order."""
    return {entry["name"]: int(entry["n_params"]) for entry in layers["layers"]}


def assign_bits(model, batches, mixed, *, symmetric: bool, per_channel: bool, seed: int = 0) -> dict:
    """The mixed variant's widths for `model`: per-layer costs measured on `batches` (training
    (x, y) tensors; pipeline.sensitivity, one Hutchinson probe over all layers per sample), then
    `solve_bits` under the MixedSection `mixed`'s budget. Returns the solution dict of `solve_bits`
    plus "objective" and the "costs" table it minimised."""
    import torch

    from pipeline.sensitivity import layer_sensitivity

    accuracy = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    layers = {"layers": layer_sensitivity(model, batches, accuracy, bits=mixed.candidates, symmetric=symmetric,
                                          per_channel=per_channel, bound_linf=float("inf"),
                                          samples=mixed.hessian_samples, seed=seed, joint=True)["layers"]}
    costs = cost_table(layers, mixed.objective, mixed.candidates)
    solution = solve_bits(costs, layer_sizes(layers), mixed.budget.as_dict(), mixed.keep_8bit)
    return {**solution, "objective": mixed.objective, "costs": {n: {str(b): c for b, c in t.items()}
                                                               for n, t in costs.items()}}
