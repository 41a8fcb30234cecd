"""A run folder holds one run: `hero run` into a finished run of other inputs is refused (naming what
differs) unless --overwrite, which removes what the new run does not produce; the same inputs reuse."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import one_error, snapshot

from pipeline.cli import main


@pytest.fixture(scope="module")
def pair(trained, trained_seed1):
    """Two checkpoints of one model and data (seeds 0 and 1)."""
    return {"data": trained["data"], "a": trained["checkpoint"], "b": trained_seed1}


def config_file(tmp_path, data, bits, gate=None, bundle=False, **quantize) -> str:
    config = {"name": "folder", "data": {"dataset": "fashion-mnist", "root": data, "limit_test": 16},
              "quantize": {"bits": bits, **quantize}, "validate": {"batch_size": 16, "latency_repeats": 1},
              "bundle": {"enabled": bundle, "test_samples": 16}, "gate": gate or {"max_drop": 100.0}}
    path = tmp_path / f"c{'-'.join(map(str, bits))}{'-strict' if gate else ''}{'-b' if bundle else ''}{len(quantize)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_a_finished_run_is_never_silently_replaced(pair, tmp_path, capsys):
    out = tmp_path / "run"
    first = config_file(tmp_path, pair["data"], [8, 4], bundle=True)
    assert main(["run", first, "--checkpoint", pair["a"], "--out", str(out)]) == 0
    assert {p.name for p in (out / "artifacts").iterdir()} == {"fp32.onnx", "w8.onnx", "w4.onnx"}
    assert (out / "bundle" / "manifest.json").is_file()
    capsys.readouterr()
    finished = snapshot(out)

    # Another checkpoint, then another config: refused, naming what differs, nothing touched.
    assert main(["run", first, "--checkpoint", pair["b"], "--out", str(out)]) == 2
    one_error(capsys, "holds a finished run of other inputs", "checkpoint", "--overwrite")
    other = config_file(tmp_path, pair["data"], [8])
    assert main(["run", other, "--checkpoint", pair["a"], "--out", str(out)]) == 2
    one_error(capsys, "quantize.bits", "bundle.enabled")
    assert snapshot(out) == finished

    # The same inputs with another gate re-gate the cached artifacts: nothing is rewritten but the report.
    strict = config_file(tmp_path, pair["data"], [8, 4], gate={"min_accuracy": 0.999}, bundle=True)
    assert main(["run", strict, "--checkpoint", pair["a"], "--out", str(out)]) == 1
    capsys.readouterr()
    unchanged = {k: v for k, v in finished.items() if "/report." not in k and not k.endswith(".png")}
    assert {k: v for k, v in snapshot(out).items() if k in unchanged} == unchanged

    # --overwrite: the new run's artifacts only; the stale w4 and the bundle no longer asked for are gone.
    assert main(["run", other, "--checkpoint", pair["a"], "--out", str(out), "--overwrite"]) == 0
    assert {p.name for p in (out / "artifacts").iterdir()} == {"fp32.onnx", "w8.onnx"}
    assert not (out / "bundle").exists()
    report = json.loads((out / "report.json").read_text())
    assert [v["bits"] for v in report["variants"]] == [8]
    assert report["meta"]["run_inputs"]["config"]["quantize"]["bits"] == [8]


def test_a_report_without_recorded_inputs_counts_as_another_run(pair, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"meta": {"config": "folder"}, "variants": []}))
    before = snapshot(out)
    config = config_file(tmp_path, pair["data"], [8])
    assert main(["run", config, "--checkpoint", pair["a"], "--out", str(out)]) == 2
    one_error(capsys, "records no inputs")
    assert snapshot(out) == before


def test_out_that_is_a_file_is_one_line(pair, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("keep me")
    assert main(["run", config_file(tmp_path, pair["data"], [8]), "--checkpoint", pair["a"],
                 "--out", str(out)]) == 2
    one_error(capsys, "is a file")
    assert Path(out).read_text() == "keep me"


@pytest.mark.slow
def test_a_nested_grid_run_reports_the_canonical_price_and_bundles_one_refit_group(pair, tmp_path, capsys):
    out = tmp_path / "nested"
    config = config_file(tmp_path, pair["data"], [8, 4], bundle=True, grid="nested", bn="quantize-first",
                         per_channel=False)
    assert main(["run", config, "--checkpoint", pair["a"], "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for v in report["variants"]:
        assert v["grid"] == "nested" and v["bn"] == "quantize-first" and v["consistent"], v
        assert 0.0 <= v["canonical_torch_accuracy"] <= 1.0 and v["trt_lint"] == []
    assert "canonical acc" in (out / "report.md").read_text()
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    groups = {v["name"]: v["refit_group"] for v in manifest["variants"]}
    assert groups["w8"] == groups["w4"] != groups["fp32"]
