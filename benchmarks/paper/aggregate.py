"""Tables, figures and RESULTS.md of the HERO paper reproduction, from the driver's run folders.

    python benchmarks/paper/aggregate.py                   # small scale, into benchmarks/paper/
    python benchmarks/paper/aggregate.py --scale full      # into benchmarks/paper/full/

Every number is read from the runs (unfinished cells print as —). RESULTS.md is regenerated on each
call except its "Reading" section, which is kept as written between its markers.
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root makes benchmarks.paper importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import click

from benchmarks.paper import archive as K
from benchmarks.paper import figures as Fg
from benchmarks.paper import paper_numbers as PN
from benchmarks.paper import plan as P
from benchmarks.paper import tables as T
from benchmarks.paper.plan import method_label

HERE = Path(__file__).resolve().parent
READING_BEGIN, READING_END = "<!-- reading:begin -->", "<!-- reading:end -->"
READING_TEMPLATE = """_To be completed by hand once every cell has run; aggregate.py keeps this section as written._

- **Generalization (Table 1).** TODO: does HERO beat SGD and Gradient-L1 on both seeds? By how much, against the seed spread?
- **Label noise (Table 2).** TODO: final vs best-over-epochs; does HERO's margin grow with the noise ratio as the paper reports?
- **Quantization (Table 3, Figure 1).** TODO: where HERO helps (which bit widths), where it does not; HERO vs first-order only isolates the Hessian penalty.
- **Curvature (Figures 2 and 3).** TODO: is ||Hz|| lower for HERO, and is its basin wider?
- **HERO's own choices.** TODO: authors' vs paper variant; exact vs finite-difference HVPs, and what each costs.
- **What this scale cannot show.** TODO: a few epochs on a Fashion-MNIST subset with one model is not the paper's 200 epochs on CIFAR; gamma fixed a priori; two seeds."""

PAPER_CLAIMS = (
    "The paper (CIFAR-10/100, 200 epochs, its own h and gamma grid) reports, for the models it shares with "
    "this reproduction: Table 1, ResNet20 on CIFAR-10 HERO 93.44 %, Gradient-L1 92.82 %, SGD 92.82 %; "
    "Table 3 (MobileNetV2, CIFAR-10) at 4 bits HERO 93.45 %, first-order only 91.61 %, SGD 85.88 % "
    "(full precision 95.03 / 94.06 / 92.45 %); Figure 1(b) as quoted in Section 5.3, Gradient-L1 87.34 % at "
    "4 bits on the same model; Figure 1(c), VGG19BN at 5 bits, HERO 93.57 %, Gradient-L1 89.03 %, SGD 80.22 %; "
    "Figure 1(e), MobileNetV2 on CIFAR-100 at 4 bits, HERO +10.05 points over Gradient-L1 and +16.10 over SGD. "
    "Its quantizer is the linear uniform one of its reference [19]; the paper does not say per channel or per "
    "tensor, nor how BatchNorm is handled.")


# --------------------------------------------------------------------------- generated comparisons


def verdict(pairs: list[tuple[float, float]]) -> str:
    """HERO against a baseline from per-seed (hero, baseline) accuracies: the mean difference in
    points, set against the seed spread (the larger of the two methods' seed ranges). Ahead / behind:
    the same sign on every seed and a mean difference beyond the spread; otherwise level."""
    diffs = [h - b for h, b in pairs]
    mean = sum(diffs) / len(diffs)
    if len(pairs) < 2:
        return f"{100 * mean:+.2f} (1 seed, no spread)"
    spread = max(max(p[i] for p in pairs) - min(p[i] for p in pairs) for i in (0, 1))
    word = ("ahead" if all(d > 0 for d in diffs) and mean > spread else
            "behind" if all(d < 0 for d in diffs) and -mean > spread else "level")
    per_seed = ", ".join(f"{100 * d:+.2f}" for d in diffs)
    return f"{100 * mean:+.2f} (seeds {per_seed}; spread {100 * spread:.2f}) → {word}"


def comparisons(plan: dict, cells: list[dict], bits_list=(8, 6, 4, 3, 2)) -> list[str]:
    """HERO minus each baseline per scheme and bit width, over the seeds both have finished
    (points), as a markdown table per dataset/model."""
    out = []
    seeds = plan["scale"]["seeds"]
    for group in T.groups(cells):
        by = {o: {c["config"]["seed"]: c for c in T.pick(cells, "fig1", group, **T.main_match(plan, o))}
              for o in ("hero", "sgd", "first-order", "gradl1")}
        rows = []
        for scheme in T.schemes(plan):
            for baseline in ("sgd", "first-order", "gradl1"):
                row = [scheme, f"HERO − {method_label({'optimizer': baseline})}"]
                for bits in (None, *bits_list):
                    pairs = [(T.ptq_accuracy(by["hero"][s], bits, scheme),
                              T.ptq_accuracy(by[baseline][s], bits, scheme))
                             for s in seeds if s in by["hero"] and s in by[baseline]]
                    pairs = [p for p in pairs if None not in p]
                    row.append(verdict(pairs) if pairs else "pending")
                rows.append(row)
        out += [f"**{group}** (ONNX Runtime accuracy, points; mean over seeds)", "",
                T.markdown(["scheme", "difference", "fp32"] + [f"{b}-bit" for b in bits_list], rows), ""]
    return out


def side_by_side(plan: dict, cells: list[dict]) -> str:
    """The paper's quantization gains next to ours at the same bit width, per scheme."""
    rows = []
    t3, fig1b, t1 = PN.TABLE3, PN.FIGURE1[0][4], PN.TABLE1[("cifar10", "resnet20")]
    table3 = "Table 3 (MobileNetV2, CIFAR-10)"
    claims = [("4-bit, HERO − SGD", 4, "sgd", t3["hero"][4] - t3["sgd"][4], table3),
              ("4-bit, HERO − first-order only", 4, "first-order", t3["hero"][4] - t3["first-order"][4], table3),
              ("4-bit, HERO − Gradient-L1", 4, "gradl1", fig1b["hero"] - fig1b["gradl1"],
               "Fig. 1(b) as quoted in Sec. 5.3 (MobileNetV2, CIFAR-10)"),
              ("6-bit, HERO − SGD", 6, "sgd", t3["hero"][6] - t3["sgd"][6], table3),
              ("8-bit, HERO − SGD", 8, "sgd", t3["hero"][8] - t3["sgd"][8], table3),
              ("full precision, HERO − SGD", None, "sgd", t1["hero"] - t1["sgd"], "Table 1 (ResNet20, CIFAR-10)")]
    for group in T.groups(cells):
        by = {o: {c["config"]["seed"]: c for c in T.pick(cells, "fig1", group, **T.main_match(plan, o))}
              for o in ("hero", "sgd", "first-order", "gradl1")}
        for name, bits, baseline, paper, source in claims:
            row = [group, name, f"{paper:+.2f}, {source}"]
            for scheme in T.schemes(plan):
                pairs = [(T.ptq_accuracy(by["hero"][s], bits, scheme),
                          T.ptq_accuracy(by[baseline][s], bits, scheme)) for s in by["hero"] if s in by[baseline]]
                pairs = [p for p in pairs if None not in p]
                row.append(verdict(pairs) if pairs else "pending")
            rows.append(row)
    header = ["ours: dataset / model", "difference (points)", "paper"] + [f"ours, {s}" for s in T.schemes(plan)]
    return T.markdown(header, rows)


# --------------------------------------------------------------------------- RESULTS.md


def setup_lines(plan: dict) -> list[str]:
    s = plan["scale"]
    subset = "all" if s["limit_train"] is None else f"the first {s['limit_train']}"
    ptq_test = "all" if s["ptq_limit_test"] is None else f"the first {s['ptq_limit_test']}"
    h = ", ".join(f"{s['h'][d]} ({d})" for d in dict.fromkeys(d for d, _ in s["pairs"]))
    hz = "||Hz|| recorded every epoch on the seed-0 clean cells"
    side = ", ".join(f"{d} / {m}" for d, m in s.get("side_pairs", []))
    v = s.get("validation")
    return [
        f"- Scale `{s['name']}`: {', '.join(f'{d} / {m}' for d, m in s['pairs'])}; {subset} training images, "
        f"the whole test set for the per-epoch test accuracy."
        + (f" Side model: {side}, SGD and HERO at seed {s['seeds'][0]}." if side else ""),
        (f"- Validation split: the {v} training images after the first {s['limit_train']} (Fashion-MNIST training "
         f"indices {s['limit_train']}..{s['limit_train'] + v - 1}), which no cell trains on. h and gamma are "
         f"selected there (highest full-precision validation accuracy of the grid, first seed), never on the "
         f"test set." if v else "- No validation split at this scale: h and gamma are the paper's, not selected."),
        f"- {s['epochs']} epochs on clean labels, {s['noise_epochs']} under label noise; batch {s['batch_size']}, "
        f"SGD lr {s['lr']} with cosine decay, momentum 0.9, weight decay 1e-4, standard crop+flip augmentation.",
        f"- HERO: authors' variant, main setting h = {h}, gamma = {s['gamma']} (the authors' published ResNet20 "
        f"command, fixed before the runs); grid: gamma {list(s['gamma_grid'])} at the main h and h "
        f"{list(s.get('h_grid', []))} at the main gamma, at the first {s.get('grid_seeds', 1)} seed(s) (the paper's "
        f"gamma grid is {{0.01, 0.05, 0.1, 0.5, 1, 5}}, its h 0.5 on CIFAR-10); Hessian-vector products "
        f"`{s['hvp']}`; {s['hero_warmup_epochs']} warm-up epoch(s) without the penalty, as the authors do. "
        f"Paper variant at gamma = {s['paper_variant_gamma']}.",
        f"- First-order only: HERO's perturbation without the penalty (same h). Gradient-L1 (Alizadeh et al., "
        f"ICLR 2020): lambda = {s['lam']}, fixed before the runs so that lambda·||grad L||_1 is about 8% of the "
        f"loss at initialisation (||grad L||_1 ≈ 420 for ResNet20 on Fashion-MNIST; lambda 0.01 made the penalty "
        f"1.6× the loss and training from scratch collapsed to 30% test accuracy in a first run); the paper's own "
        f"values could not be retrieved; not tuned on the test set; same Hessian-vector product mode as HERO.",
        f"- Seeds {list(s['seeds'])} for every method on clean labels; seed {s['seeds'][0]} for the grid, under "
        "label noise and for HERO's variant/HVP choices; every method sees the same data order and "
        "initialisation per seed.",
        f"- PTQ through `pipeline.run.run_pipeline`, once per scheme: symmetric weights at 8..2 bits, activations "
        f"float, exported to ONNX and run in ONNX Runtime on {ptq_test} test images; accuracies are the "
        "runtime's. Schemes: per-channel (BatchNorm folded first; the fold order does not change per-channel "
        "codes), per-tensor fold-first (BatchNorm folded, then one scale per folded tensor), per-tensor "
        "quantize-first (one scale per tensor of the weights HERO trained, BatchNorm folded into the "
        "DequantizeLinear scales and a bias afterwards).",
        f"- {hz}.",
    ]


def machine_lines(invocations: list[dict], cells: list[dict]) -> list[str]:
    machines = [c["timing"]["machine"] for c in cells if c["timing"].get("machine")]
    m = machines[0] if machines else {}
    total = sum(i.get("minutes", 0.0) for i in invocations)
    return [f"- Machine: {m.get('host', '—')}, {m.get('cpu_count', '—')} CPUs ({m.get('processor', '—')}), "
            f"GPU {m.get('cuda') or 'none'}, torch {m.get('torch', '—')}, Python {m.get('python', '—')}.",
            f"- {len(invocations)} driver invocation(s) logged, {total:.0f} min of wall time summed over them "
            f"(side-by-side invocations count twice; cells run before invocations were logged are not in "
            f"it). The table gives each cell's own minutes."]


def command_lines(plan: dict, invocations: list[dict]) -> list[str]:
    scale = plan["scale"]["name"]
    lines = ["```bash", f"python benchmarks/paper/driver.py --scale {scale} --dry-run     # plan and estimate",
             f"python benchmarks/paper/driver.py --scale {scale} --budget-minutes 55   # repeat until nothing remains",
             f"python benchmarks/paper/aggregate.py --scale {scale}", "```", "", "Invocations recorded:", ""]
    for inv in invocations:
        lines.append(f"- `python benchmarks/paper/driver.py {' '.join(inv['argv'])}` at {inv['started']}: "
                     f"{inv['minutes']:.1f} min, {inv['remaining']} cells left after it")
    return lines


def kept_reading(path: Path) -> str:
    if path.is_file():
        text = path.read_text()
        if READING_BEGIN in text and READING_END in text:
            return text.split(READING_BEGIN, 1)[1].split(READING_END, 1)[0].strip("\n")
    return READING_TEMPLATE


def keep_contours(cells: list[dict], out_root: Path, kept_root: Path) -> None:
    """Copy each contour computed here into its cell's kept copy: the checkpoint is not kept, so a
    later machine draws Figure 3 from it."""
    for cell in cells:
        source, kept = out_root / cell["name"] / Fg.CONTOUR_FILE, kept_root / cell["name"]
        if source.is_file() and kept.is_dir():
            shutil.copy2(source, kept / Fg.CONTOUR_FILE)


def kept_figure3(path: Path, missing: list[str]) -> str:
    """The Figure 3 section when some contours cannot be computed on this machine: the previous
    RESULTS.md's section under a note naming the cells, else the note alone."""
    note = (f"_Not redrawn: no checkpoint on this machine and no kept contour for {', '.join(missing)}; "
            "retrain those cells to redraw.")
    previous = path.read_text() if path.is_file() else ""
    marker = "## Figure 3: loss contours of SGD and HERO"
    if marker not in previous:
        return note + "_"
    body = previous.split(marker, 1)[1].split("\n## ", 1)[0].strip("\n")
    body = "\n".join(line for line in body.splitlines() if not line.startswith("_Not redrawn:")).strip("\n")
    return note + " The section below is the last one drawn._\n\n" + body


def results_markdown(plan: dict, cells: list[dict], invocations: list[dict], figures: dict, flat: dict,
                     reading: str, figure3: str | None = None) -> str:
    scale = plan["scale"]["name"]
    pending = [f"{c['name']}" + ("" if not c["finished"] else
                                 f" (trained; PTQ {len(c['reports'])}/{len(c['ptq_schemes'])} schemes)")
               for c in cells if not c["finished"] or (c["ptq"] and len(c["reports"]) < len(c["ptq_schemes"]))]
    fig = lambda key: "\n\n".join(f"![{p.stem}]({p.name})" for p in figures.get(key, [])) or "_not drawn yet_"  # noqa: E731
    flat_rows = [[k, f"{v['centre']:.3f}", f"{v['mean_rise']:.3f}"] for k, v in flat.items()]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
    block = "\n".join
    sections = [
        f"# HERO (Yang et al., DAC 2022) reproduced at the `{scale}` scale",
        f"<!-- generated by benchmarks/paper/aggregate.py at {now}; edit only the Reading section -->",
        "## Setup", block(setup_lines(plan)),
        "## Machine and wall time", block(machine_lines(invocations, cells)), T.wall_time_table(cells),
        "## Commands", block(command_lines(plan, invocations)),
        "## Table 1: test accuracy (%)", T.table1(plan, cells),
        "## Table 2: test accuracy (%) under symmetric label noise", T.table2(plan, cells),
        "## Table 3: accuracy (%) after post-training quantization, mean ± sd over seeds", T.table3(plan, cells),
        "The paper's Table 3 has 4, 6 and 8 bits (MobileNetV2 on CIFAR-10 only); the 3-bit column is added here, "
        "where the methods part. A single value is one finished seed.",
        "## Figure 1: accuracy vs weight bits (exported ONNX, ONNX Runtime), mean ± sd over seeds", fig("fig1"),
        T.ptq_curve_table(plan, cells),
        "## Figure 2: ||Hz|| and the generalization gap over epochs", fig("fig2"),
        "## Figure 3: loss contours of SGD and HERO", figure3 or fig("fig3"),
        "" if figure3 else (T.markdown(["model", "loss at the trained weights", "mean rise over the grid"], flat_rows)
                            if flat_rows else ""),
        "## HERO's own choices: variant and Hessian-vector products", T.variants_table(plan, cells),
        "## h and gamma grid (HERO, authors' variant), selected on the validation split", T.gamma_table(plan, cells),
        "## Side by side with the paper", PAPER_CLAIMS, side_by_side(plan, cells),
        "HERO minus each baseline, every scheme and bit width (generated from the runs; the verdict rule is "
        "in `aggregate.verdict`: ahead/behind only with the same sign on every seed and a mean difference "
        "larger than the seed spread):", block(comparisons(plan, cells)),
        "## Reading", block([READING_BEGIN, reading, READING_END]),
        "## Pending cells", block(f"- {n}" for n in pending) or "none: every cell finished",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def aggregate(out_root: Path, results_dir: Path, contours: bool = True, scale: str | None = None,
              kept_root: Path | None = None) -> Path:
    """Write the figures and RESULTS.md into `results_dir`; returns RESULTS.md's path. Cells not run
    on this machine come from their kept copies under `kept_root` (archive.py). Without runs yet,
    `scale`'s preset plan gives a skeleton with every number pending."""
    plan, cells = T.load_results(out_root, scale, kept_root)
    logs = [out_root / K.INVOCATIONS] if kept_root is None else [kept_root / K.INVOCATIONS, out_root / K.INVOCATIONS]
    invocations = [json.loads(line) for line in K.merged_lines(*logs)]
    results_dir.mkdir(parents=True, exist_ok=True)
    figures = {"fig1": Fg.figure1(plan, cells, results_dir), "fig2": Fg.figure2(plan, cells, results_dir)}
    flat, missing = {}, []
    if contours:
        figures["fig3"], flat, missing = Fg.figure3(plan, cells, results_dir)
        if kept_root is not None:
            keep_contours(cells, out_root, kept_root)
    path = results_dir / "RESULTS.md"
    figure3 = kept_figure3(path, missing) if missing else None
    path.write_text(results_markdown(plan, cells, invocations, figures, flat, kept_reading(path), figure3))
    if any(c["finished"] for c in cells):
        (results_dir / "results.json").write_text(json.dumps(
            {c["name"]: {"final": T.final_accuracy(c), "best": T.best_accuracy(c),
                         "validation": T.validation_accuracy(c),
                         "ptq": {scheme: {"fp32" if b is None else f"w{b}": T.ptq_accuracy(c, b, scheme)
                                          for b in (None, 8, 7, 6, 5, 4, 3, 2)} for scheme in c["reports"]}}
             for c in cells if c["finished"]}, indent=1))
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scale", type=click.Choice(["small", "full"]), default="small", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=HERE / "runs", show_default=True,
              help="the driver's --out")
@click.option("--archive", type=click.Path(path_type=Path), default=K.ARCHIVE, show_default=True,
              help="the driver's --archive: cells not in --out are read from ARCHIVE/SCALE")
@click.option("--results-dir", type=click.Path(path_type=Path), default=None,
              help="default: benchmarks/paper (small) or benchmarks/paper/full")
@click.option("--no-contours", is_flag=True, help="skip Figure 3 (the only part that evaluates models)")
def main(scale, out, archive, results_dir, no_contours):
    """Build the tables, figures and RESULTS.md from the cells the driver finished."""
    results_dir = results_dir or (HERE if scale == "small" else HERE / "full")
    path = aggregate(out / scale, results_dir, contours=not no_contours, scale=scale, kept_root=archive / scale)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    P.run_command(main, "aggregate")
