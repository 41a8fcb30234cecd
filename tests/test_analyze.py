"""``hero analyze`` on a tiny trained checkpoint: analysis.json, the contour plot, clear errors."""

import json
import math

import pytest
import torch
from torch import nn
from click.testing import CliRunner

from exporters.device.errors import HeroError
from exporters.quantize import quantize_tensor
from pipeline import analyze
from hero_train.config import TrainConfig
from hero_train.train import train
from pipeline.cli import cli

analyze_command = cli.commands["analyze"]


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


def test_quantization_safety_half_step_is_the_quantizer_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    rows = analyze.quantization_safety(model, {"l2": 1.0, "linf": 0.01}, [4])
    scales = [quantize_tensor(m.weight, 4)[1].max() for m in (model[0], model[2])]
    assert rows[0]["half_step"] == pytest.approx(float(max(scales)) / 2)
    assert rows[0]["linf"] <= rows[0]["half_step"] + 1e-7
    with torch.no_grad():
        deltas = [m.weight - quantize_tensor(m.weight, 4)[0] * quantize_tensor(m.weight, 4)[1][:, None]
                  for m in (model[0], model[2])]
    assert rows[0]["l2"] == pytest.approx(math.sqrt(sum(float((d * d).sum()) for d in deltas)), rel=1e-5)


def test_finer_bits_are_safer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 3))
    rows = analyze.quantization_safety(model, {"l2": 0.05, "linf": 0.002}, [2, 4, 8, 16])
    assert all(a["half_step"] > b["half_step"] and a["l2"] > b["l2"] for a, b in zip(rows, rows[1:]))
    verdicts = [r["verdict"] for r in rows]
    assert verdicts[0] == "not guaranteed" and verdicts[-1] == "safe"
    assert verdicts == sorted(verdicts, key=lambda v: v == "safe")  # once safe, safe for every finer width
    assert "bits" in analyze.safety_table(rows).splitlines()[0]


@pytest.mark.parametrize("change, message", [
    ({"batches": 0}, "--batches and --batch-size must be >= 1"),
    ({"loss_increase": 0.0}, "--loss-increase must be > 0"),
    ({"loss_increase": float("nan")}, "--loss-increase must be > 0"),
    ({"samples": 0}, "--iters and --samples must be >= 1"),
    ({"contour": (1, 0.5)}, "--steps must be >= 2 and --span > 0"),
])
def test_analysis_options_refuse_what_the_cli_types_refuse(change, message):
    from pipeline.analyze import AnalysisOptions

    good = dict(batches=1, batch_size=2, loss_increase=0.1, bits=(8,), symmetric=True, per_channel=True, iters=1,
                samples=1, seed=0, contour=None, device="cpu")
    AnalysisOptions(**good)
    with pytest.raises(HeroError, match=message):
        AnalysisOptions(**{**good, **change})
