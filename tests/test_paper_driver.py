"""The paper-reproduction driver (benchmarks/paper): its plan, cost estimate, resumption and tables."""

import dataclasses
import json
import statistics

import pytest

from benchmarks.paper import aggregate as A
from benchmarks.paper import driver as D
from benchmarks.paper import plan as P
from benchmarks.paper import tables as T
from exporters.device.errors import HeroError
from hero_train.config import TrainConfig

# Seconds per ResNet20 step on Fashion-MNIST at batch 128, as measured on the 2-core CPU the small
# scale is sized for (benchmarks/paper/driver.py --dry-run), and its eval forward per 1000 images.
MEASURED = {"sgd": 0.20, "first-order": 0.53, "gradl1": 0.44, "hero/authors/finite-difference": 0.77,
            "hero/paper/finite-difference": 0.81, "hero/authors/exact": 1.12}
FORWARD_1000 = 0.45
MODEL_FACTOR = {"resnet20": 1.0, "mobilenetv2": 7.0}  # a MobileNetV2 step costs about 7 ResNet20 steps here


def fixed_costs(cells):
    steps = {}
    for cell in cells:
        c = cell.config
        for config in (c, dataclasses.replace(c, optimizer="sgd"), dataclasses.replace(c, optimizer="first-order")):
            kind = P.step_kind(config)
            tail = kind.split("/", 3)[3]
            steps[kind] = MEASURED.get(tail, MEASURED.get(tail.split("/")[0])) * MODEL_FACTOR[c.model]
    return P.Costs(steps, {f"{c.config.dataset}/{c.config.model}": FORWARD_1000 * MODEL_FACTOR[c.config.model]
                           for c in cells})


def by_tag(cells, tag):
    return [c for c in cells if tag in c.tables]


# --------------------------------------------------------------------------- the plan


def test_plan_has_every_tables_cells():
    cells = P.build_plan(P.SMALL)
    assert all(by_tag(cells, tag) for tag in P.TABLES)
    assert {c.config.optimizer for c in by_tag(cells, "table1")} == {"sgd", "gradl1", "first-order", "hero"}
    assert {c.config.optimizer for c in by_tag(cells, "table3")} == {"sgd", "first-order", "gradl1", "hero"}
    noise = {(c.config.optimizer, c.config.label_noise) for c in by_tag(cells, "table2")}
    assert noise == {(o, r) for o in ("sgd", "gradl1", "hero") for r in P.SMALL.noise_ratios}
    variants = {(c.config.variant, c.config.hvp) for c in by_tag(cells, "variants")}
    assert variants == {("authors", "finite-difference"), ("paper", "finite-difference"), ("authors", "exact")}
    assert {c.config.gamma for c in by_tag(cells, "gamma")} == set(P.SMALL.gamma_grid)
    assert {c.config.optimizer for c in by_tag(cells, "fig3")} == {"sgd", "hero"}


@pytest.mark.parametrize("scale", [P.SMALL, P.FULL])
def test_gamma_grid_runs_at_the_scales_grid_seeds(scale):
    cells = P.build_plan(scale)
    pairs = {(c.config.dataset, c.config.model) for c in cells}
    pairs -= set(scale.side_pairs)
    grid = {(c.config.dataset, c.config.model, c.config.h, c.config.gamma, c.config.seed)
            for c in by_tag(cells, "gamma")}

    def points(dataset):
        return {(scale.h[dataset], g) for g in scale.gamma_grid} | {(h, scale.gamma) for h in scale.h_grid}

    assert grid == {(d, m, h, g, s) for d, m in pairs for h, g in points(d) for s in scale.seeds[:scale.grid_seeds]}


def test_h_grid_of_the_short_schedule_is_at_the_main_gamma():
    cells = by_tag(P.build_plan(P.SMALL), "gamma")
    assert {c.config.h for c in cells if c.config.gamma == P.SMALL.gamma} == {0.25, 0.5, 1.0}


def test_cell_names_are_unique_and_a_shared_config_is_one_cell():
    cells = P.build_plan(P.SMALL)
    assert len({c.name for c in cells}) == len(cells)
    main_hero = [c for c in cells if c.config.optimizer == "hero" and c.config.gamma == P.SMALL.gamma
                 and c.config.h == 1.0 and c.config.model == "resnet20" and c.config.seed == 0
                 and c.config.label_noise == 0 and c.config.hvp == P.SMALL.hvp
                 and c.config.variant == "authors"]
    assert len(main_hero) == 1 and {"table1", "table3", "variants", "gamma"} <= set(main_hero[0].tables)


def test_same_seeds_and_settings_across_methods():
    cells = P.build_plan(P.SMALL)
    clean = [c for c in by_tag(cells, "table3") if c.config.model == "resnet20"]
    seeds = {o: sorted(c.config.seed for c in clean if c.config.optimizer == o) for o in ("sgd", "first-order", "hero")}
    assert all(s == list(P.SMALL.seeds) for s in seeds.values())
    sgd, hero = (next(c.config for c in clean if c.config.optimizer == o and c.config.seed == 1) for o in ("sgd", "hero"))
    differ = {k for k, v in sgd.to_dict().items() if hero.to_dict()[k] != v}
    assert differ == {"optimizer"}


def test_plan_runs_sgd_and_hero_at_both_seeds_first_then_the_grid_then_mobilenet():
    cells = P.build_plan(P.SMALL)
    assert [c.priority for c in cells] == sorted(c.priority for c in cells)
    order = [(c.config.optimizer, c.config.seed) for c in cells[:8]]
    assert order == [("sgd", 0), ("hero", 0), ("sgd", 1), ("hero", 1), ("first-order", 0), ("first-order", 1),
                     ("gradl1", 0), ("gradl1", 1)]
    assert all(c.config.label_noise == 0 and c.config.model == "resnet20" for c in cells[:8])
    assert all(c.priority == 3 for c in cells if c.tables == ("gamma",))
    side = [c for c in cells if c.config.model == "mobilenetv2"]
    assert [(c.config.optimizer, c.config.seed, c.priority) for c in side] == [("sgd", 0, 4), ("hero", 0, 4)]
    assert all(c.priority > 4 for c in cells if c.config.label_noise or c.tables == ("variants",))


def test_every_ptq_cell_runs_the_three_schemes_and_clean_cells_hold_out_a_validation_split():
    cells = P.build_plan(P.SMALL)
    assert all(c.ptq_schemes == ("per-channel", "per-tensor fold-first", "per-tensor quantize-first")
               for c in cells if c.ptq)
    assert {c.validation for c in cells if not c.config.label_noise} == {(10_000, 15_000)}
    assert all(c.validation is None for c in cells if c.config.label_noise)
    assert all(c.config.limit_train == 10_000 for c in cells)  # training never reaches the split


def test_hz_is_recorded_on_the_figure2_cells_only():
    cells = P.build_plan(P.SMALL)
    assert all(c.config.record_hz == P.SMALL.record_hz for c in by_tag(cells, "fig2"))
    assert all(c.config.record_hz is None for c in cells if "fig2" not in c.tables)


def test_only_selects_the_cells_feeding_the_named_tables():
    cells = P.build_plan(P.SMALL)
    chosen = P.select(cells, ("table2",))
    assert chosen and all(c.tables == ("table2",) for c in chosen)
    assert P.select(cells, ()) == cells
    with pytest.raises(HeroError, match="^--only table9: not a table or figure; choose from table1,"):
        D.parse_only("table1,table9")


def test_match_picks_cells_by_name_in_the_given_order():
    cells = P.build_plan(P.SMALL)
    picked = P.match(cells, ("noise80", "noise40", "hero-authors-h1-fd-g5-noise80"))
    assert [c.name.split("/")[1] for c in picked] == [
        "sgd-noise80-n10000-e5-s0", "gradl1-fd-lam0.0005-noise80-n10000-e5-s0",
        "hero-authors-h1-fd-g5-noise80-n10000-e5-s0", "sgd-noise40-n10000-e5-s0",
        "gradl1-fd-lam0.0005-noise40-n10000-e5-s0", "hero-authors-h1-fd-g5-noise40-n10000-e5-s0"]
    assert P.match(cells, ("no-such-cell",)) == []


def test_full_scale_is_the_papers_protocol():
    cells = P.build_plan(P.FULL)
    assert {(c.config.dataset, c.config.model) for c in cells} == {
        (d, m) for d in ("cifar10", "cifar100") for m in ("resnet20", "mobilenetv2", "vgg19bn")}
    assert all(c.config.epochs == 200 and c.config.limit_train is None for c in cells)
    assert {c.config.h for c in cells if c.config.dataset == "cifar10"} == {0.5}
    assert {c.config.gamma for c in by_tag(cells, "gamma")} == set(P.PAPER_GAMMA_GRID)


# --------------------------------------------------------------------------- cost estimate


def test_priority_one_to_four_cells_fit_the_budget_at_the_measured_step_cost():
    cells = [c for c in P.build_plan(P.SMALL) if c.priority <= 4]
    seconds = [P.estimate_cell_seconds(c, fixed_costs(cells)) for c in cells]
    resnet = [s for c, s in zip(cells, seconds) if c.config.model == "resnet20"]
    assert sum(resnet) <= 2 * 3600 and max(resnet) <= 20 * 60
    assert sum(seconds) <= 4 * 3600  # MobileNetV2's SGD and HERO at seed 0 add about 1.8 h at 7x the step


def test_estimate_counts_only_what_remains():
    cell = next(c for c in P.build_plan(P.SMALL) if c.config.optimizer == "sgd")
    costs = fixed_costs([cell])
    whole = P.estimate_cell_seconds(cell, costs)
    half = P.estimate_cell_seconds(cell, costs, epochs_done=cell.config.epochs // 2)
    trained = P.estimate_cell_seconds(cell, costs, epochs_done=cell.config.epochs)
    steps = -(-P.SMALL.limit_train // P.SMALL.batch_size)
    per_epoch = steps * MEASURED["sgd"] + FORWARD_1000 * 10 + 3 * MEASURED["sgd"] * P.SMALL.record_hz
    assert whole - half == pytest.approx(per_epoch * (cell.config.epochs - cell.config.epochs // 2))
    one_scheme = P.estimate_cell_seconds(cell, costs, cell.config.epochs, cell.ptq_schemes[:2], validated=True)
    assert 0 < one_scheme < trained < half
    assert trained - P.estimate_cell_seconds(cell, costs, cell.config.epochs, validated=True) == pytest.approx(
        FORWARD_1000 * 5 + P.CELL_FIXED_SECONDS)
    assert P.estimate_cell_seconds(cell, costs, cell.config.epochs, cell.ptq_schemes, validated=True) == 0.0


def test_split_into_pieces_groups_consecutive_cells_under_the_budget():
    assert P.split_into_pieces([30, 20, 10, 50, 70, 5], 60) == [[0, 1, 2], [3], [4], [5]]


# --------------------------------------------------------------------------- running cells


def tiny_cell(data_root, epochs=1, name="tiny/sgd"):
    config = TrainConfig(model="resnet20", dataset="fashion-mnist", optimizer="sgd", epochs=epochs, batch_size=32,
                         limit_train=64, limit_test=16, data_root=str(data_root), augment=False)
    return P.Cell(name, config, ("table1",), 1, ptq=False)


def test_finished_cell_is_skipped(tiny_fmnist, tmp_path, monkeypatch):
    cell = tiny_cell(tiny_fmnist)
    status = D.run_cell(cell, tmp_path)
    assert status == D.CellStatus(1, (), False) and status.done(cell)
    assert json.loads((tmp_path / cell.name / "cell.json").read_text())["name"] == cell.name

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(D, "train", no_training)
    costs = P.Costs({P.step_kind(cell.config): 0.1}, {"fashion-mnist/resnet20": 0.1})
    assert D.run_plan([cell], tmp_path, budget_seconds=3600, costs=costs) == []
    longer = dataclasses.replace(cell, config=dataclasses.replace(cell.config, epochs=2))
    assert not D.cell_status(longer, tmp_path).done(longer)


def test_budget_stops_before_a_cell_that_would_end_past_it(tmp_path, monkeypatch):
    cells = [tiny_cell(tmp_path, name=f"tiny/c{i}") for i in range(4)]
    clock = {"now": 0.0}
    ran = []

    def fake_run(cell, out_root, log=print):
        ran.append(cell.name)
        clock["now"] += 600.0

    monkeypatch.setattr(D.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(D, "run_cell", fake_run)
    monkeypatch.setattr(P, "estimate_cell_seconds", lambda *a, **k: 600.0)
    remaining = D.run_plan(cells, tmp_path, budget_seconds=1500, costs=None, log=lambda *_: None)
    assert ran == ["tiny/c0", "tiny/c1"]
    assert [c.name for c in remaining] == ["tiny/c0", "tiny/c1", "tiny/c2", "tiny/c3"]  # fakes wrote nothing


def test_budget_rescales_estimates_by_the_time_cells_really_took(tmp_path, monkeypatch):
    cells = [tiny_cell(tmp_path, name=f"tiny/c{i}") for i in range(4)]
    clock = {"now": 0.0}
    ran = []

    def twice_as_slow(cell, out_root, log=print):
        ran.append(cell.name)
        clock["now"] += 600.0

    monkeypatch.setattr(D.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(D, "run_cell", twice_as_slow)
    monkeypatch.setattr(P, "estimate_cell_seconds", lambda *a, **k: 300.0)
    D.run_plan(cells, tmp_path, budget_seconds=1500, costs=None, log=lambda *_: None)
    assert ran == ["tiny/c0", "tiny/c1"]  # at face value a third 300 s cell would have fitted


@pytest.mark.parametrize("scheme", list(P.PTQ_SCHEMES))
def test_deploy_config_covers_every_bit_width_of_figure1_under_each_scheme(scheme):
    cell = P.build_plan(P.SMALL)[0]
    config = D.deploy_config(cell, scheme)
    assert config.quantize.bits == [8, 7, 6, 5, 4, 3, 2]
    spec = config.quantize.spec(4)
    assert (spec.symmetric, spec.per_channel, spec.bn) == (True, *P.PTQ_SCHEMES[scheme].values())
    assert config.data.limit_test == P.SMALL.ptq_limit_test
    assert config.runtime.name == "onnxruntime"


def test_a_new_scheme_reruns_only_its_ptq(tiny_fmnist, tmp_path, monkeypatch):
    import pipeline.run
    from exporters.device.files import sha256_file

    ran = []

    def fake_pipeline(config, run_dir, checkpoint, log=print):
        ran.append(run_dir.name)
        run_dir.mkdir(parents=True)
        (run_dir / "report.json").write_text(json.dumps({"meta": {"checkpoint_sha256": sha256_file(checkpoint)}}))

    monkeypatch.setattr(pipeline.run, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(D, "deploy_config", lambda cell, scheme: scheme)
    cell = dataclasses.replace(tiny_cell(tiny_fmnist), ptq=True, ptq_schemes=("per-channel",))
    assert D.run_cell(cell, tmp_path).done(cell) and ran == ["per-channel"]
    wider = dataclasses.replace(cell, ptq_schemes=("per-channel", "per-tensor quantize-first"))
    assert D.cell_status(wider, tmp_path).schemes_done == ("per-channel",)
    monkeypatch.setattr(D, "train", lambda *a, **k: pytest.fail("a trained cell was trained again"))
    assert D.run_cell(wider, tmp_path).done(wider)
    assert ran == ["per-channel", "per-tensor-quantize-first"]


def test_validation_evaluates_the_held_out_training_images_only(tiny_fmnist, tmp_path, monkeypatch):
    import hero_train.train as htrain
    from hero_train import data as hdata

    cell = dataclasses.replace(tiny_cell(tiny_fmnist), validation=(64, 96))  # trains on images 0..63
    status = D.run_cell(cell, tmp_path)
    assert status.validated and status.done(cell)
    result = json.loads((tmp_path / cell.name / D.VALIDATION_FILE).read_text())
    assert result["images"] == [64, 96] and 0.0 <= result["accuracy"] <= 1.0
    seen = []
    monkeypatch.setattr(htrain, "evaluate", lambda model, images, labels, device: seen.append(labels) or (0.0, 0.5))
    D.validate_cell(cell, tmp_path)
    train = hdata.load_dataset("fashion-mnist", "train", root=str(tiny_fmnist))
    assert seen[0].tolist() == train.labels[64:96].tolist()
    with pytest.raises(HeroError, match="validation images 64..200 exceed the 96 training images"):
        D.validate_cell(dataclasses.replace(cell, validation=(64, 200)), tmp_path)


# --------------------------------------------------------------------------- aggregation


def fake_results(out_root, accuracy):
    """Metrics and PTQ reports for every clean, noise-free-or-not cell of the small plan, with
    accuracies from `accuracy(cell) -> (final, best, {bits: acc})`."""
    cells = P.build_plan(P.SMALL)
    D.write_plan(P.SMALL, cells, out_root, fixed_costs(cells))
    for cell in cells:
        final, best, ptq = accuracy(cell)
        folder = out_root / cell.name
        (folder / "train").mkdir(parents=True)
        lines = [{"epoch": e, "train_loss": 0.5, "train_accuracy": 0.9, "test_loss": 0.6,
                  "test_accuracy": best if e == 1 else final, "seconds": 10.0 * (e + 1), "hz_norm": 1.0 / e}
                 for e in range(1, cell.config.epochs + 1)]
        (folder / "train" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        if cell.validation:
            (folder / D.VALIDATION_FILE).write_text(json.dumps({"accuracy": final - 0.1}))
        for i, scheme in enumerate(cell.ptq_schemes if cell.ptq else ()):  # each scheme 1 point below the last
            (folder / "ptq" / P.scheme_dir(scheme)).mkdir(parents=True)
            report = {"meta": {}, "baseline": {"runtime_accuracy": final},
                      "variants": [{"bits": b, "runtime_accuracy": a - 0.01 * i} for b, a in ptq.items()]}
            (folder / "ptq" / P.scheme_dir(scheme) / "report.json").write_text(json.dumps(report))
    return cells


def accuracy_by_method(cell):
    c = cell.config
    final = {"sgd": 0.80, "gradl1": 0.81, "first-order": 0.82, "hero": 0.83}[c.optimizer] + 0.02 * c.seed
    return final, final + 0.05, {b: final - (8 - b) * 0.01 for b in P.PTQ_BITS}


def test_tables_are_built_from_the_run_files(tmp_path):
    fake_results(tmp_path, accuracy_by_method)
    plan, cells = T.load_results(tmp_path)
    assert all(c["finished"] for c in cells)
    table1 = T.table1(plan, cells)
    sgd_row = next(line for line in table1.splitlines() if "| fashion-mnist / resnet20 | SGD |" in line)
    expected = f"{100 * statistics.mean([0.80, 0.82]):.2f} ± {100 * statistics.stdev([0.80, 0.82]):.2f}"
    assert "| 80.00 | 82.00 |" in sgd_row and expected in sgd_row and "85.00" in sgd_row
    assert sgd_row.endswith("| 92.82 (cifar10 resnet20, Table 1) |")
    table3 = T.table3(plan, cells).splitlines()
    hero = [line for line in table3 if "| fashion-mnist / resnet20 |" in line and "| HERO |" in line]
    assert [line.split(" | ")[1] for line in hero] == list(P.PTQ_SCHEMES)
    # 4-bit: 0.83 - 0.04 at seed 0, 0.02 more at seed 1; quantize-first (third scheme) 2 points lower
    assert "| 80.00 ± 1.41 |" in hero[0] and "| 78.00 ± 1.41 |" in hero[2]
    assert "93.45/94.90/95.03/95.03 (4/6/8/full; cifar10 mobilenetv2, Table 3)" in hero[0]
    side = [line for line in table3 if "mobilenetv2 |" in line and "| SGD |" in line]
    assert len(side) == 3 and "(1 seed)" not in side[0]  # one seed planned, one finished: no mark
    curve = T.ptq_curve_table(plan, cells)
    assert "1(b) cifar10 mobilenetv2 4-bit: 87.34" in curve
    assert "1(e) cifar100 mobilenetv2 4-bit: HERO +16.10 over this" in curve
    assert "83.00 (88.00†)" in T.table2(plan, cells)
    assert "| 90.63 / 88.71 / 84.61 / 72.11 |" in T.table2(plan, cells)
    variants = {line.split(" | ")[1] + "/" + line.split(" | ")[2]: line.split(" | ")[-1].rstrip(" |")
                for line in T.variants_table(plan, cells).splitlines() if line.startswith("| fashion")}
    # step x SGD from the driver's measured costs (MEASURED above): 0.77, 0.81 and 1.12 s against 0.20 s.
    assert variants == {"authors/finite-difference": "3.85", "paper/finite-difference": "4.05",
                        "authors/exact": "5.60"}
    grid = [line.split(" | ")[1:4] for line in T.gamma_table(plan, cells).splitlines()
            if line.startswith("| fashion")]
    assert grid == [["0.25", "5", "0"], ["0.5", "5", "0"], ["1", "1", "0"], ["1", "5 (main, selected)", "0"]]
    lines = A.comparisons(plan, cells)
    row = next(line for line in lines[2].splitlines() if line.startswith("| per-channel | HERO − SGD |"))
    assert "+3.00 (seeds +3.00, +3.00; spread 2.00) → ahead" in row


def test_h_and_gamma_are_selected_on_validation_never_on_test(tmp_path):
    fake_results(tmp_path, accuracy_by_method)
    grid = {c.config.h: c for c in P.build_plan(P.SMALL) if "gamma" in c.tables and c.config.gamma == 5.0
            and c.config.model == "resnet20" and c.config.seed == 0}
    for h, (validation, test) in {0.25: (0.70, 0.95), 0.5: (0.90, 0.60)}.items():
        folder = tmp_path / grid[h].name
        (folder / D.VALIDATION_FILE).write_text(json.dumps({"accuracy": validation}))
        metrics = json.loads((folder / "train" / "metrics.jsonl").read_text().splitlines()[-1])
        (folder / "train" / "metrics.jsonl").write_text(json.dumps(dict(metrics, test_accuracy=test)) + "\n")
    plan, cells = T.load_results(tmp_path)
    assert T.selected_setting(plan, cells, "fashion-mnist / resnet20")["config"]["h"] == 0.5
    table3 = T.table3(plan, cells)
    assert "| HERO, selected (h 0.5, gamma 5; seed 0) |" in table3
    assert "| 0.5 | 5 (selected) |" in T.gamma_table(plan, cells)


def test_verdict_sets_the_difference_against_the_seed_spread():
    assert A.verdict([(0.90, 0.80), (0.92, 0.81)]).endswith("→ ahead")
    assert A.verdict([(0.80, 0.81), (0.85, 0.80)]).endswith("→ level")  # signs differ
    assert A.verdict([(0.80, 0.81), (0.70, 0.72)]).endswith("→ level")  # behind on both, within the 10-point spread
    assert A.verdict([(0.70, 0.80), (0.71, 0.82)]).endswith("→ behind")
    assert A.verdict([(0.9, 0.8)]) == "+10.00 (1 seed, no spread)"


def test_aggregate_writes_results_and_keeps_the_reading(tmp_path):
    out_root, results = tmp_path / "runs", tmp_path / "results"
    fake_results(out_root, accuracy_by_method)
    path = A.aggregate(out_root, results, contours=False)
    text = path.read_text()
    assert {p.name for p in results.glob("fig1_*.png")} >= {
        f"fig1_ptq_fashion-mnist_resnet20_{P.scheme_dir(s)}.png" for s in P.PTQ_SCHEMES}
    assert (results / "fig2_hz_gap_fashion-mnist_resnet20.png").is_file()
    assert "## Table 3" in text and "not retrieved" not in text and "none: every cell finished" in text
    saved = json.loads((results / "results.json").read_text())
    assert set(saved["fashion-mnist-resnet20/hero-authors-h1-fd-g5-n10000-e8-s0"]["ptq"]) == set(P.PTQ_SCHEMES)
    path.write_text(text.replace("_To be completed by hand", "HERO wins here, narrowly. _To be completed by hand"))
    A.aggregate(out_root, results, contours=False)
    assert "HERO wins here, narrowly." in path.read_text()


def test_unfinished_cells_print_as_missing(tmp_path):
    cells = fake_results(tmp_path, accuracy_by_method)
    hero = next(c for c in cells if c.config.optimizer == "hero" and c.config.seed == 1)
    metrics = tmp_path / hero.name / "train" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    plan, loaded = T.load_results(tmp_path)
    hero_row = next(line for line in T.table1(plan, loaded).splitlines()
                    if "| fashion-mnist / resnet20 | HERO |" in line)
    assert "| 83.00 | — | 83.00 (1 seed) |" in hero_row


# --------------------------------------------------------------------------- kept cells (archive.py)


def test_a_kept_cell_is_done_on_a_fresh_machine_and_a_kept_cell_missing_a_scheme_trains_again(
        tiny_fmnist, tmp_path, monkeypatch):
    import pipeline.run
    from exporters.device.files import sha256_file

    def fake_pipeline(config, run_dir, checkpoint, log=print):
        run_dir.mkdir(parents=True)
        (run_dir / "report.json").write_text(json.dumps({"meta": {"checkpoint_sha256": sha256_file(checkpoint)}}))

    monkeypatch.setattr(pipeline.run, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(D, "deploy_config", lambda cell, scheme: scheme)
    cell = dataclasses.replace(tiny_cell(tiny_fmnist), ptq=True, ptq_schemes=("per-channel",), validation=(64, 96))
    here, kept = tmp_path / "this-machine", tmp_path / "archive"
    costs = P.Costs({P.step_kind(cell.config): 0.01}, {"fashion-mnist/resnet20": 0.01})
    assert D.run_plan([cell], here, 3600, costs, kept_root=kept, log=lambda *_: None) == []
    ckpt = D.checkpoint_path(cell, here)
    record = json.loads((kept / cell.name / "checkpoint.json").read_text())
    assert record["sha256"] == sha256_file(ckpt) and record["epoch"] == 1
    assert (kept / cell.name / "ptq" / "per-channel" / "report.json").is_file()
    assert not list(kept.rglob("*.pt")) and not list(kept.rglob("*.onnx"))  # results only

    fresh = tmp_path / "next-machine"
    assert D.cell_status(cell, fresh, kept).done(cell) and not D.cell_status(cell, fresh).done(cell)
    monkeypatch.setattr(D, "train", lambda *a, **k: pytest.fail("a kept cell was trained again"))
    assert D.run_plan([cell], fresh, 3600, costs, kept_root=kept, log=lambda *_: None) == []
    assert not fresh.exists()

    wider = dataclasses.replace(cell, ptq_schemes=("per-channel", "per-tensor quantize-first"))
    assert D.cell_status(wider, fresh, kept) == D.CellStatus(0)  # its checkpoint is not kept: train again
    (kept / cell.name / "validation.json").write_text(json.dumps({"checkpoint_sha256": "another"}))
    assert D.cell_status(cell, fresh, kept) == D.CellStatus(0)  # results that belong to another checkpoint


def test_aggregate_reads_kept_cells_where_this_machine_has_no_run(tmp_path):
    from benchmarks.paper import archive as K

    runs, kept = tmp_path / "runs", tmp_path / "archive"
    cells = fake_results(kept, accuracy_by_method)  # every cell's files, as kept by an earlier machine
    sgd = next(c for c in cells if c.config.optimizer == "sgd" and c.config.seed == 0 and c.ptq)
    for cell in cells:
        (kept / cell.name / K.RECORD).write_text(json.dumps({"sha256": "x", "epoch": cell.config.epochs}))
    metrics = runs / sgd.name / "train" / "metrics.jsonl"  # this machine re-ran one cell, better
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps({"epoch": e, "train_loss": 0.1, "train_accuracy": 0.99, "test_loss": 0.1,
                                           "test_accuracy": 0.99, "seconds": 1.0}) + "\n"
                               for e in range(1, sgd.config.epochs + 1)))
    (kept / K.INVOCATIONS).write_text(json.dumps({"argv": ["--budget-minutes", "55"], "started": "then",
                                                  "minutes": 50.0, "remaining": 3}) + "\n")
    plan, loaded = T.load_results(runs, kept_root=kept)
    assert all(c["finished"] for c in loaded)
    by_name = {c["name"]: c for c in loaded}
    assert T.final_accuracy(by_name[sgd.name]) == 0.99
    hero = next(c for c in cells if c.config.optimizer == "hero" and c.config.seed == 1)
    assert T.ptq_accuracy(by_name[hero.name], 4) == pytest.approx(0.85 - 0.04)
    text = A.aggregate(runs, tmp_path / "results", contours=False, kept_root=kept).read_text()
    assert "1 driver invocation(s) logged, 50 min" in text
    pending = text.split("## Pending cells", 1)[1].strip().splitlines()  # this machine's run, not yet PTQ'd
    assert pending == [f"- {sgd.name} (trained; PTQ 0/3 schemes)"]
    alone = T.load_results(runs, scale="small")[1]  # without the archive: only this machine's one cell
    assert [c["name"] for c in alone if c["finished"]] == [sgd.name]


def test_kept_invocation_logs_merge_without_repeats(tmp_path):
    from benchmarks.paper import archive as K

    runs, kept = tmp_path / "runs", tmp_path / "kept"
    runs.mkdir()
    (runs / K.INVOCATIONS).write_text('{"a": 1}\n{"b": 2}\n')
    K.keep_run(runs, kept)
    (runs / K.INVOCATIONS).write_text('{"a": 1}\n{"b": 2}\n{"c": 3}\n')
    K.keep_run(runs, kept)
    assert (kept / K.INVOCATIONS).read_text() == '{"a": 1}\n{"b": 2}\n{"c": 3}\n'


def test_a_kept_cells_contour_is_redrawn_from_its_cache_without_the_checkpoint(tmp_path):
    from benchmarks.paper import figures as Fg

    key = {"sha256": "kept", "steps": 11, "span": 1.0, "images": 256, "batch_size": 128}
    cached = {"key": key, "alphas": [0.0], "betas": [0.0], "losses": [[0.5]]}
    (tmp_path / Fg.CONTOUR_FILE).write_text(json.dumps(cached))
    cell = {"folder": str(tmp_path), "config": {}}
    assert Fg.contour_of(cell) == cached
    with pytest.raises(HeroError, match="does not exist"):  # other settings: the checkpoint is needed
        Fg.contour_of(cell, steps=5)


def test_figure3_without_checkpoints_or_kept_contours_keeps_the_last_drawing_and_contours_get_kept(tmp_path):
    from benchmarks.paper import archive as K
    from benchmarks.paper import figures as Fg

    runs, kept, results = tmp_path / "runs", tmp_path / "archive", tmp_path / "results"
    cells = fake_results(kept, accuracy_by_method)
    for cell in cells:
        (kept / cell.name / K.RECORD).write_text(json.dumps({"sha256": "x", "epoch": cell.config.epochs}))
    results.mkdir()
    drawn = "## Figure 3: loss contours of SGD and HERO\n\n![fig3](fig3.png)\n\n| model | loss |\n|---|---|\n| SGD | 0.262 |\n\n"
    (results / "RESULTS.md").write_text("# old\n\n" + drawn + "## HERO's own choices: x\n")
    text = A.aggregate(runs, results, contours=True, kept_root=kept).read_text()
    section = text.split("## Figure 3: loss contours of SGD and HERO", 1)[1].split("\n## ", 1)[0]
    assert "_Not redrawn: no checkpoint on this machine and no kept contour for " in section
    assert "| SGD | 0.262 |" in section and "![fig3](fig3.png)" in section
    again = A.aggregate(runs, results, contours=True, kept_root=kept).read_text()  # the note is not stacked
    assert again.split("## Figure 3", 1)[1].split("\n## ", 1)[0].count("_Not redrawn") == 1

    fig3 = [c for c in cells if "fig3" in c.tables]
    source = runs / fig3[0].name / Fg.CONTOUR_FILE  # a contour computed on this machine goes to the archive
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text('{"key": {}}')
    A.keep_contours([{"name": c.name} for c in fig3], runs, kept)
    assert (kept / fig3[0].name / Fg.CONTOUR_FILE).read_text() == '{"key": {}}'
    assert not (kept / fig3[1].name / Fg.CONTOUR_FILE).exists()


def test_write_plan_keeps_other_variants_step_costs(tmp_path):
    """A --match invocation measures only its cells' variants; the kept costs of the others stay,
    and a variant measured again takes the new value."""
    cells = P.build_plan(P.SMALL)
    resnet = [c for c in cells if c.config.model == "resnet20"]
    mobilenet = [c for c in cells if c.config.model == "mobilenetv2"]
    kept_root, out_root = tmp_path / "kept", tmp_path / "runs"
    D.write_plan(P.SMALL, cells, kept_root, fixed_costs(resnet + mobilenet[:1]))
    before = json.loads((kept_root / D.COSTS_FILE).read_text())
    again = fixed_costs(mobilenet)
    again = P.Costs({k: 2 * v for k, v in again.step_seconds.items()}, again.forward_1000_seconds)
    D.write_plan(P.SMALL, cells, out_root, again, kept_root)
    after = json.loads((out_root / D.COSTS_FILE).read_text())
    resnet_keys = [k for k in before["step_seconds"] if "/resnet20/" in k]
    assert resnet_keys and all(after["step_seconds"][k] == before["step_seconds"][k] for k in resnet_keys)
    assert all(after["step_seconds"][k] == v for k, v in again.step_seconds.items())
    assert set(after["forward_1000_seconds"]) >= {"fashion-mnist/resnet20", "fashion-mnist/mobilenetv2"}
