"""``hero analyze`` on a tiny trained checkpoint: analysis.json, the contour plot, clear errors."""

import json

import pytest
from click.testing import CliRunner

from exporters.errors import HeroError
from hero_train.train import TrainConfig, train
from pipeline.analyze import analyze_command


@pytest.fixture
def checkpoint(tiny_fmnist, tmp_path):
    config = TrainConfig(model="resnet20", dataset="fashion-mnist", data_root=str(tiny_fmnist), epochs=1,
                         batch_size=48, optimizer="sgd", lr=0.05, augment=False, seed=0)
    return train(config, tmp_path / "run")


def invoke(checkpoint, tiny_fmnist, *extra):
    args = [str(checkpoint), "--data-root", str(tiny_fmnist), "--batches", "2", "--batch-size", "4",
            "--iters", "2", "--samples", "1", "--bits", "2,4,8", *extra]
    return CliRunner().invoke(analyze_command, args)


@pytest.mark.slow
def test_analyze_writes_analysis_json_and_contour_next_to_the_checkpoint(checkpoint, tiny_fmnist):
    result = invoke(checkpoint, tiny_fmnist, "--contour", "--steps", "3", "--loss-increase", "0.5")
    assert result.exit_code == 0, result.output
    out = checkpoint.parent / "analysis"
    analysis = json.loads((out / "analysis.json").read_text())
    assert {"checkpoint", "sha256", "model", "dataset", "optimizer", "data", "loss", "grad_norm", "n_params",
            "top_eigenvalue", "hessian_trace", "hz_norm", "theorem3", "quantization", "contour"} <= set(analysis)
    assert analysis["data"] == {"split": "train", "batches": 2, "batch_size": 4, "samples": 8, "bn_mode": "eval"}
    assert analysis["theorem3"]["loss_increase"] == 0.5
    assert analysis["theorem3"]["l2"] > analysis["theorem3"]["linf"] > 0
    rows = analysis["quantization"]["rows"]
    assert [r["bits"] for r in rows] == [2, 4, 8]
    assert {"half_step", "linf", "l2", "bound_linf", "bound_l2", "verdict"} <= set(rows[0])
    assert rows[0]["half_step"] > rows[1]["half_step"] > rows[2]["half_step"]
    losses = analysis["contour"]["losses"]
    assert len(losses) == 3 and losses[1][1] == pytest.approx(analysis["loss"], rel=1e-5)
    assert (out / "loss_contour.png").read_bytes()[:4] == b"\x89PNG"
    assert "Theorem 3" in result.output and "verdict" in result.output


def test_analyze_refuses_a_non_positive_loss_increase(tmp_path):
    result = CliRunner().invoke(analyze_command, [str(tmp_path / "checkpoint.pt"), "--loss-increase", "0"])
    assert isinstance(result.exception, HeroError) and "--loss-increase" in str(result.exception)


def test_analyze_reports_a_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(analyze_command, [str(tmp_path / "nothing.pt")])
    assert isinstance(result.exception, HeroError) and "does not exist" in str(result.exception)
