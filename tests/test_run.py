"""End to end: `hero run` on a tiny model and data subset, and the rerun that redoes nothing."""

import json

import pytest
import yaml

from pipeline.cli import main


def write_config(tmp_path, root, **gate):
    config = {
        "name": "tiny",
        "model": {"name": "resnet20"},
        "data": {"dataset": "fashion-mnist", "root": str(root)},
        "train": {"epochs": 1, "batch_size": 48, "optimizer": "hero", "hvp": "finite-difference",
                  "hero_warmup_epochs": 0},
        "quantize": {"bits": [8, 4]},
        "validate": {"batch_size": 64, "latency_repeats": 2},
        "gate": gate or {"max_drop": 100.0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_hero_run_end_to_end_then_rerun_skips_work(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, tiny_fmnist)
    assert main(["run", config, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| w4 |" in printed and "gate: PASSED" in printed
    report = json.loads((out / "report.json").read_text())
    assert [v["bits"] for v in report["variants"]] == [8, 4]
    for v in report["variants"] + [report["baseline"]]:
        assert 0.0 <= v["runtime_accuracy"] <= 1.0 and v["consistent"], v
        assert v["agreement"] >= 0.999 and (out / v["artifact"]).is_file()
        assert v["file_bytes"] == (out / v["artifact"]).stat().st_size
    w8, w4 = report["variants"]
    assert w8["trt_lint"] == [] and any("INT4" in issue for issue in w4["trt_lint"])
    assert w4["packed_weight_bytes"] * 2 == w8["packed_weight_bytes"]
    assert w4["file_bytes"] < w8["file_bytes"] < report["baseline"]["file_bytes"]
    assert (out / "report.md").read_text().count("\n| w") == 2
    assert (out / "accuracy_vs_bits.png").read_bytes()[:4] == b"\x89PNG"

    stamps = {p: p.stat().st_mtime_ns for p in (out / "artifacts").iterdir()}
    stages = (out / "stages.json").read_text()
    assert main(["run", config, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "artifacts").iterdir()} == stamps
    assert (out / "stages.json").read_text() == stages

    # A gate that cannot pass: exit 1 and the failures named, with the same (cached) artifacts.
    strict = write_config(tmp_path, tiny_fmnist, min_accuracy=0.999)
    assert main(["run", strict, "--out", str(out)]) == 1
    assert "FAIL w8" in capsys.readouterr().out
    assert main(["check", str(out / "report.json"), "--max-drop", "100"]) == 0


def test_run_with_a_bad_checkpoint_is_exit_2(tmp_path, tiny_fmnist, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["run", write_config(tmp_path, tiny_fmnist), "--checkpoint", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a readable" in capsys.readouterr().err
