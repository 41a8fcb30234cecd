"""Finished cells in, the paper's tables out (markdown), all numbers read from the run folders.

A cell's folder (see driver.py) holds ``cell.json``, ``train/metrics.jsonl`` (one line per epoch:
train_loss, train_accuracy, test_loss, test_accuracy, seconds and, when recorded, hz_norm),
``ptq/<scheme>/report.json`` per PTQ scheme (pipeline.report's schema), ``validation.json`` (loss and
accuracy on the held-out training images) and ``timing.json`` (wall seconds of training and of each
scheme's PTQ evaluation, and the machine). Accuracies here are fractions; tables print percent.

"Final" is the accuracy after the last epoch, the number we report. "Best" is the highest test
accuracy over the epochs, what the authors' script prints: it selects an epoch on the test set, so
it is shown only labelled as such.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

from benchmarks.paper import paper_numbers as PN
from benchmarks.paper.archive import cell_folder
from benchmarks.paper.plan import PTQ_SCHEMES, SCALES, build_plan, method_label, plan_document, scheme_dir, step_kind

MISSING = "—"
BEST_NOTE = "best over epochs (selects on the test set, as the authors' script does)"


# --------------------------------------------------------------------------- loading


def json_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_cell(cell: dict, out_root: Path, kept_root: Path | None = None) -> dict:
    """A plan cell (plan.json's form) with what its folder holds (its run folder, else its kept copy
    under `kept_root`); ``finished`` when every epoch ran."""
    folder = cell_folder(cell["name"], out_root, kept_root)
    metrics = json_lines(folder / "train" / "metrics.jsonl")
    finished = bool(metrics) and metrics[-1]["epoch"] == cell["config"]["epochs"]
    reports = {s: _json(folder / "ptq" / scheme_dir(s) / "report.json") for s in cell.get("ptq_schemes", [])}
    return dict(cell, folder=str(folder), metrics=metrics, finished=finished,
                reports={s: r for s, r in reports.items() if r}, validation=_json(folder / "validation.json"),
                timing=_json(folder / "timing.json") or {})


def load_results(out_root: Path, scale: str | None = None, kept_root: Path | None = None) -> tuple[dict, list[dict]]:
    """plan.json's header and every planned cell with its results (finished or not), from the run
    folders or, for cells not run on this machine, their kept copies under `kept_root`. Without a
    plan.json in either, the preset `scale`'s plan stands in (every cell pending)."""
    plan = _json(out_root / "plan.json") or (_json(kept_root / "plan.json") if kept_root else None)
    if plan is None and scale is not None:
        preset = SCALES[scale]
        plan = plan_document(preset, build_plan(preset))
    if plan is None:
        from exporters.device.errors import HeroError
        raise HeroError(f"{out_root / 'plan.json'} does not exist: run benchmarks/paper/driver.py first")
    plan["step_costs"] = (_json(out_root / "step_costs.json")  # the driver's last measurement, if any
                          or (_json(kept_root / "step_costs.json") if kept_root else None))
    return plan, [load_cell(c, out_root, kept_root) for c in plan["cells"]]


# --------------------------------------------------------------------------- per-cell numbers


def final_accuracy(cell: dict) -> float | None:
    return cell["metrics"][-1]["test_accuracy"] if cell["finished"] else None


def best_accuracy(cell: dict) -> float | None:
    return max(m["test_accuracy"] for m in cell["metrics"]) if cell["finished"] else None


def validation_accuracy(cell: dict) -> float | None:
    return (cell.get("validation") or {}).get("accuracy") if cell["finished"] else None


def ptq_accuracy(cell: dict, bits: int | None, scheme: str = "per-channel") -> float | None:
    """Accuracy of the exported artifact of `scheme` in ONNX Runtime; bits None is the fp32 artifact."""
    report = cell.get("reports", {}).get(scheme)
    if not report:
        return None
    if bits is None:
        return report["baseline"]["runtime_accuracy"]
    return next((v["runtime_accuracy"] for v in report["variants"] if v["bits"] == bits), None)


def seconds_per_epoch(cell: dict) -> float | None:
    """Median wall seconds of an epoch (training and test evaluation), HERO's warm-up epochs left
    out, since they take the cheaper first-order step."""
    skip = cell["config"]["hero_warmup_epochs"] if cell["config"]["optimizer"] == "hero" else 0
    seconds = [m["seconds"] for m in cell["metrics"] if m["epoch"] > skip]
    return statistics.median(seconds) if seconds else None


def train_seconds(cell: dict) -> float:
    return sum(m["seconds"] for m in cell["metrics"])


# --------------------------------------------------------------------------- formatting


def pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.2f}"


def mean_sd(values: list[float | None], per_seed: bool = True) -> str:
    """Mean ± sample standard deviation (n − 1) in percent, with the per-seed values unless
    `per_seed` is false; values of unfinished cells are left out and a single value is printed
    alone, marked (1 seed)."""
    done = [v for v in values if v is not None]
    if not done:
        return MISSING
    if len(done) == 1:
        return pct(done[0]) + (" (1 seed)" if len(values) > 1 else "")
    seeds = f" ({' / '.join(pct(v) for v in done)})" if per_seed else ""
    return f"{100 * statistics.mean(done):.2f} ± {100 * statistics.stdev(done):.2f}{seeds}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- selection


def group_of(cell: dict) -> str:
    return f"{cell['config']['dataset']} / {cell['config']['model']}"


def groups(cells: list[dict]) -> list[str]:
    return list(dict.fromkeys(group_of(c) for c in cells))


def pick(cells: list[dict], tag: str, group: str, **match) -> list[dict]:
    """Cells feeding `tag` in `group` whose config has every `match` value, in seed order."""
    chosen = [c for c in cells if tag in c["tables"] and group_of(c) == group
              and all(c["config"].get(k) == v for k, v in match.items())]
    return sorted(chosen, key=lambda c: c["config"]["seed"])


def main_match(plan: dict, optimizer: str, label_noise: float = 0.0) -> dict:
    """The config values of a method's main cells (HERO at the scale's gamma, fd or exact as planned)."""
    scale = plan["scale"]
    match = {"optimizer": optimizer, "label_noise": label_noise}
    if optimizer == "hero":
        match.update(gamma=scale["gamma"], variant="authors", hvp=scale["hvp"])
    return match


# --------------------------------------------------------------------------- tables


def table1(plan: dict, cells: list[dict]) -> str:
    """Test accuracy (%) of SGD, Gradient-L1 and HERO after the last epoch, per seed and mean."""
    seeds = plan["scale"]["seeds"]
    header = ["dataset / model", "method"] + [f"final, seed {s}" for s in seeds] + ["final, mean ± sd",
                                                                                    "best over epochs†", "paper"]
    rows = []
    for group in groups(cells):
        model = group.split(" / ")[1]
        for optimizer in ("sgd", "gradl1", "first-order", "hero"):
            chosen = pick(cells, "table1", group, **main_match(plan, optimizer))
            if not chosen:
                continue
            by_seed = {c["config"]["seed"]: c for c in chosen}
            finals = [final_accuracy(by_seed[s]) if s in by_seed else None for s in seeds]
            rows.append([group, method_label({"optimizer": optimizer})] + [pct(f) for f in finals]
                        + [mean_sd(finals), mean_sd([best_accuracy(c) for c in chosen]),
                           PN.table1_value(model, optimizer)])
    return (markdown(header, rows) + f"\n\n† {BEST_NOTE}. paper: the paper's Table 1 for the same model on "
            "CIFAR-10 (ours is Fashion-MNIST, a training subset, a few epochs; Table 1 has no first-order row).")


def table2(plan: dict, cells: list[dict]) -> str:
    """Test accuracy (%) under symmetric label noise: final (best†) per noise ratio, seed 0."""
    ratios = plan["scale"]["noise_ratios"]
    header = ["dataset / model", "method"] + [f"{round(100 * r)}% noise" for r in ratios] + ["paper"]
    rows = []
    for group in groups(cells):
        model = group.split(" / ")[1]
        for optimizer in ("sgd", "gradl1", "hero"):
            row = [group, method_label({"optimizer": optimizer})]
            for ratio in ratios:
                chosen = pick(cells, "table2", group, **main_match(plan, optimizer, ratio))
                cell = chosen[0] if chosen else None
                row.append(MISSING if cell is None or not cell["finished"]
                           else f"{pct(final_accuracy(cell))} ({pct(best_accuracy(cell))}†)")
            rows.append(row + [" / ".join(PN.table2_value(model, optimizer, r) for r in ratios)])
    epochs = plan["scale"]["noise_epochs"]
    return (markdown(header, rows) + f"\n\nFinal accuracy after {epochs} epochs on the clean test set; "
            f"in brackets the {BEST_NOTE}. paper: the paper's Table 2 for the same model on CIFAR-10, "
            "at the same ratios in order.")


def schemes(plan: dict) -> list[str]:
    return list(plan["scale"].get("ptq_schemes") or PTQ_SCHEMES)


def selected_setting(plan: dict, cells: list[dict], group: str) -> dict | None:
    """The HERO grid cell (first seed) of `group` with the highest validation accuracy: h and gamma
    chosen on held-out training images, never on the test set; None until a grid cell is validated."""
    seed = plan["scale"]["seeds"][0]
    grid = [c for c in pick(cells, "gamma", group, seed=seed) if validation_accuracy(c) is not None]
    return max(grid, key=validation_accuracy) if grid else None


def _ptq_rows(plan: dict, cells: list[dict], tag: str, bits_list, paper) -> list[list[str]]:
    """Rows scheme x method of runtime accuracy (mean ± sd over the seeds) at each of `bits_list`
    (None: the fp32 artifact), then HERO at the validation-selected setting (first seed) where it
    differs from the main one."""
    rows = []
    for group in groups(cells):
        methods = [(o, method_label({"optimizer": o}), pick(cells, tag, group, **main_match(plan, o)))
                   for o in ("hero", "first-order", "gradl1", "sgd")]
        methods = [m for m in methods if m[2]]
        selected = selected_setting(plan, cells, group)
        main = next((chosen for optimizer, _, chosen in methods if optimizer == "hero"), [])
        if selected is not None and all(selected["name"] != c["name"] for c in main):
            c = selected["config"]
            methods.append(("hero", f"HERO, selected (h {c['h']:g}, gamma {c['gamma']:g}; seed {c['seed']})",
                            [selected]))
        for scheme in schemes(plan):
            for optimizer, label, chosen in methods:
                rows.append([group, scheme, label]
                            + [mean_sd([ptq_accuracy(c, b, scheme) for c in chosen], per_seed=False) for b in bits_list]
                            + [paper(optimizer)])
    return rows


def table3(plan: dict, cells: list[dict], bits_list=(3, 4, 6, 8)) -> str:
    """Post-training quantization: runtime accuracy (%) at 4, 6 and 8 bits (the paper's columns),
    3 bits (ours: where the methods part) and full precision, per scheme and method, mean ± sd over
    the seeds."""
    header = (["dataset / model", "scheme", "method"] + [f"{b}-bit" for b in bits_list]
              + ["fp32 (ORT)", "paper"])
    rows = _ptq_rows(plan, cells, "table3", (*bits_list, None), PN.table3_value)
    return markdown(header, rows)


def ptq_curve_table(plan: dict, cells: list[dict], bits_list=(8, 7, 6, 5, 4, 3, 2)) -> str:
    """Figure 1's numbers: runtime accuracy (%) at every bit width, per scheme and method, mean ± sd
    over the seeds."""
    header = ["dataset / model", "scheme", "method", "fp32"] + [f"w{b}" for b in bits_list] + ["paper (Sec. 5.3)"]
    rows = _ptq_rows(plan, cells, "fig1", (None, *bits_list), PN.figure1_value)
    return markdown(header, rows)


def step_ratio(step_seconds: dict[str, float], config: dict) -> float | None:
    """One optimizer step of `config`'s method over one SGD step of the same shape, as measured."""
    step = step_seconds.get(step_kind(SimpleNamespace(**config)))
    sgd = step_seconds.get(step_kind(SimpleNamespace(**dict(config, optimizer="sgd"))))
    return step / sgd if step and sgd else None


def variants_table(plan: dict, cells: list[dict]) -> str:
    """HERO's own choices at full precision and 4 bits, with their training cost against SGD's."""
    seed = plan["scale"]["seeds"][0]
    header = ["dataset / model", "HERO variant", "hvp", "gamma", "final test acc", "fp32 (ORT)",
              "4-bit per-tensor quantize-first",
              "s / epoch", "x SGD", "step x SGD‡"]
    costs = plan.get("step_costs") or {}
    rows = []
    for group in groups(cells):
        sgd = pick(cells, "table1", group, seed=seed, **main_match(plan, "sgd"))
        sgd_s = seconds_per_epoch(sgd[0]) if sgd else None
        for cell in pick(cells, "variants", group, seed=seed):
            c = cell["config"]
            s = seconds_per_epoch(cell)
            ratio = step_ratio(costs.get("step_seconds", {}), c)
            rows.append([group, c["variant"], c["hvp"], f"{c['gamma']:g}", pct(final_accuracy(cell)),
                         pct(ptq_accuracy(cell, None)), pct(ptq_accuracy(cell, 4, "per-tensor quantize-first")),
                         MISSING if s is None else f"{s:.1f}",
                         MISSING if s is None or not sgd_s else f"{s / sgd_s:.2f}",
                         MISSING if ratio is None else f"{ratio:.2f}"])
    measured = costs.get("measured", "never")
    return (markdown(header, rows) + "\n\ns / epoch: median wall seconds of an epoch (training and test "
            "evaluation) after HERO's warm-up epoch, on the machine below; runs that shared the machine "
            "are slower, so compare this column only between cells run alike. ‡ one optimizer step against "
            "SGD's, interleaved in one process on random data of the cells' shape, fastest of 3 rounds: the "
            f"driver's measurement at its last invocation ({measured}), comparable across rows.")


def gamma_table(plan: dict, cells: list[dict], bits_list=(4, 3)) -> str:
    """HERO (authors' variant) at each (h, gamma) of the grid, a row per seed: the validation accuracy
    the setting is selected on, and the test numbers it is reported with."""
    seeds = plan["scale"]["seeds"][:plan["scale"].get("grid_seeds", 1)]
    header = (["dataset / model", "h", "gamma", "seed", "validation acc", "final test acc", "fp32 (ORT)"]
              + [f"{b}-bit {scheme}" for scheme in schemes(plan) for b in bits_list])
    rows = []
    for group in groups(cells):
        dataset = group.split(" / ")[0]
        selected = selected_setting(plan, cells, group)
        grid = [c for c in pick(cells, "gamma", group) if c["config"]["seed"] in seeds]
        for cell in sorted(grid, key=lambda c: (c["config"]["h"], c["config"]["gamma"], c["config"]["seed"])):
            c = cell["config"]
            marks = [m for m, hit in (("main", c["gamma"] == plan["scale"]["gamma"]
                                       and c["h"] == plan["scale"]["h"][dataset]),
                                      ("selected", selected is not None and selected["name"] == cell["name"])) if hit]
            rows.append([group, f"{c['h']:g}", f"{c['gamma']:g}" + (f" ({', '.join(marks)})" if marks else ""),
                         str(c["seed"]), pct(validation_accuracy(cell)), pct(final_accuracy(cell)),
                         pct(ptq_accuracy(cell, None))]
                        + [pct(ptq_accuracy(cell, b, scheme)) for scheme in schemes(plan) for b in bits_list])
    v = plan["scale"].get("validation")
    split = (f"the {v} training images after the first {plan['scale']['limit_train']}, which no cell trains on"
             if v else "no validation split at this scale")
    return (markdown(header, rows) + f"\n\nvalidation acc: full precision (PyTorch, eval mode) on {split}. "
            "selected: the highest validation accuracy of the grid at the first seed, the rule fixed before "
            "the runs; the test columns are reported, never used to choose. main: the a-priori setting of "
            "the other tables.")


def wall_time_table(cells: list[dict]) -> str:
    """Per cell: epochs run, wall minutes of training (from timing.json, else the metrics' sum) and PTQ."""
    header = ["cell", "epochs", "train min", "PTQ min"]
    rows, train_total, ptq_total = [], 0.0, 0.0
    for cell in cells:
        if not cell["metrics"]:
            continue
        train_s = cell["timing"].get("train_wall_seconds") or train_seconds(cell)
        ptq = cell["timing"].get("ptq_wall_seconds") or {}
        ptq_s = sum(ptq.values()) if isinstance(ptq, dict) else ptq
        train_total, ptq_total = train_total + train_s, ptq_total + ptq_s
        rows.append([cell["name"], f"{cell['metrics'][-1]['epoch']}/{cell['config']['epochs']}",
                     f"{train_s / 60:.1f}", f"{ptq_s / 60:.1f}" if ptq_s else MISSING])
    rows.append(["**total**", "", f"{train_total / 60:.1f}", f"{ptq_total / 60:.1f}"])
    return markdown(header, rows)
