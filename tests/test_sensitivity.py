"""Per-layer sensitivity: Hessian blocks against the exact Hessian, Spearman's ρ, the measured
single-layer quantization, and ``hero analyze --layers`` end to end."""

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call

from exporters.device.errors import HeroError
from exporters.quantize import fake_quantize, quantized_layers
from hero_train import hessian as H
from hero_train.config import TrainConfig
from hero_train.train import train
from pipeline import analyze, sensitivity
from pipeline.cli import cli


def tanh_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def tanh_batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])


def exact_hessian(model, batch):
    """The full Hessian of the cross-entropy over every parameter by torch.autograd.functional.hessian,
    and the (start, end) slice of each parameter in its flat order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    ends = list(itertools.accumulate(s.numel() for s in shapes))
    slices = dict(zip(names, zip([0] + ends[:-1], ends)))

    def loss(flat):
        parts = {n: flat[a:b].reshape(s) for n, s, (a, b) in zip(names, shapes, slices.values())}
        x, y = batch
        return nn.functional.cross_entropy(functional_call(model, parts, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss, flat), slices


WEIGHTS = ["0.weight", "2.weight", "4.weight"]


def test_restricted_hvp_is_the_exact_hessian_block_times_v():
    model, batch = tanh_net(), tanh_batch()
    full, slices = exact_hessian(model, batch)
    for name in WEIGHTS:
        w = model.get_parameter(name)
        v = torch.randn(w.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (hv,) = H.hvp(model, H.cross_entropy_loss, batch, [v], params=[w])
        a, b = slices[name]
        torch.testing.assert_close(hv.reshape(-1), full[a:b, a:b] @ v.reshape(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("joint", [False, True])
def test_block_traces_match_the_exact_hessian_blocks(joint):
    model, batch = tanh_net(), tanh_batch()
    full, slices = exact_hessian(model, batch)
    samples = 800
    estimates = H.block_traces(model, H.cross_entropy_loss, [batch], [[model.get_parameter(n)] for n in WEIGHTS],
                               samples=samples, seed=0, joint=joint)
    for name, estimate in zip(WEIGHTS, estimates):
        a, b = slices[name]
        block = full[a:b, a:b]
        # Var(v'Av) = 2(||A||_F² − Σ A_ii²) for Rademacher v; joint probes add ||H_ij||_F² per other block
        variance = 2 * (float((block**2).sum()) - float((block.diagonal() ** 2).sum()))
        if joint:
            variance += sum(float((full[a:b, c:d] ** 2).sum()) for other, (c, d) in slices.items()
                            if other in WEIGHTS and other != name)
        assert estimate == pytest.approx(float(block.trace()), abs=5 * math.sqrt(variance / samples) + 1e-12)


def test_block_traces_are_exact_for_diagonal_blocks_and_joint_probes_cancel_cross_terms():
    """L(w) = ½ w'Aw with A diagonal within each of two blocks but coupled across them: every
    separate probe gives the exact trace; joint probes are only right on average."""
    A = torch.tensor([[2.0, 0.0, 0.7, 0.1], [0.0, -1.0, 0.3, 0.5], [0.7, 0.3, 4.0, 0.0], [0.1, 0.5, 0.0, 0.5]],
                     dtype=torch.float64)
    model = nn.Module()
    model.a, model.b = nn.Parameter(torch.ones(2, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float64))

    def loss(m, _):
        w = torch.cat([m.a, m.b])
        return 0.5 * w @ A @ w

    assert H.block_traces(model, loss, [None], [[model.a], [model.b]], samples=2) == pytest.approx([1.0, 4.5], rel=1e-12)
    joint = H.block_traces(model, loss, [None], [[model.a], [model.b]], samples=2000, joint=True)
    assert joint == pytest.approx([1.0, 4.5], abs=0.1)
    assert H.block_traces(model, loss, [None], [[model.a], [model.b]], samples=1, joint=True) != pytest.approx([1.0, 4.5])


def test_block_top_eigenvalue_matches_eigh_of_the_block():
    model, batch = tanh_net(), tanh_batch()
    full, slices = exact_hessian(model, batch)
    a, b = slices["2.weight"]
    eig = torch.linalg.eigvalsh(full[a:b, a:b])
    value, (vector,) = H.top_eigenvalue(model, H.cross_entropy_loss, [batch], iters=1000, tol=1e-10,
                                        params=[model.get_parameter("2.weight")])
    assert vector.shape == (3, 4)
    assert value == pytest.approx(float(eig[eig.abs().argmax()]), rel=1e-3)


def test_average_ranks_give_ties_the_mean_of_their_ranks():
    np.testing.assert_array_equal(sensitivity.average_ranks([10.0, 20.0, 20.0, 5.0, 20.0]), [2, 4, 4, 1, 4])
    np.testing.assert_array_equal(sensitivity.average_ranks([3.0, 3.0]), [1.5, 1.5])


def test_spearman_without_ties_is_the_classic_formula():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 20):
        x, y = rng.permutation(n).astype(float), rng.permutation(n).astype(float)
        d = sensitivity.average_ranks(x) - sensitivity.average_ranks(y)
        expected = 1 - 6 * float((d * d).sum()) / (n * (n * n - 1))
        assert sensitivity.spearman(x, y) == pytest.approx(expected, abs=1e-12)
    x = rng.normal(size=10)
    assert sensitivity.spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert sensitivity.spearman(x, -x) == pytest.approx(-1.0)


def test_spearman_with_ties_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(20):
        x, y = rng.integers(0, 4, 12).astype(float), rng.integers(0, 5, 12).astype(float)
        expected = stats.spearmanr(x, y).statistic
        got = sensitivity.spearman(x, y)
        assert (got is None and np.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_spearman_is_undefined_for_a_constant_ranking_or_one_pair():
    assert sensitivity.spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) is None
    assert sensitivity.spearman([1.0], [2.0]) is None
    with pytest.raises(ValueError):
        sensitivity.spearman([1.0, 2.0], [1.0])


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def small_data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    return [(x[:12], y[:12]), (x[12:], y[12:])], (x, y)


def test_layer_sensitivity_quantizes_one_layer_at_a_time_and_restores_the_model():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    model.bn1.running_var.uniform_(0.5, 2.0)
    batches, data = small_data()
    before = copy.deepcopy(model.state_dict())
    result = sensitivity.layer_sensitivity(model, batches, data, bits=[2, 4, 8], symmetric=False, per_channel=True,
                                           bound_linf=0.05, samples=2, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [e["name"] for e in result["layers"]] == ["conv1", "conv2", "fc"]
    assert [e["n_params"] for e in result["layers"]] == [36, 216, 18]
    for entry in result["layers"]:
        reference = copy.deepcopy(model)
        layer = reference.get_submodule(entry["name"])
        for row in entry["rows"]:
            with torch.no_grad():
                layer.weight.copy_(fake_quantize(model.get_submodule(entry["name"]).weight, row["bits"],
                                                 symmetric=False, per_channel=True))
                logits = reference(data[0])
                loss = sum(float(nn.functional.cross_entropy(reference(x), y)) for x, y in batches) / 2
            assert row["loss"] == pytest.approx(loss, rel=1e-6)
            assert row["loss_increase"] == pytest.approx(loss - result["float"]["loss"], abs=1e-6)
            accuracy = float((logits.argmax(1) == data[1]).float().mean())
            assert row["accuracy_drop"] == pytest.approx(result["float"]["accuracy"] - accuracy, abs=1e-6)
            assert row["safe_linf"] == (max(row["half_step"], row["linf"]) < 0.05)
        # finer grids, smaller perturbations, smaller predicted increases (same trace)
        sq = [r["perturbation_sq"] for r in entry["rows"]]
        assert sq[0] > sq[1] > sq[2] > 0
        assert [r["omega"] for r in entry["rows"]] == pytest.approx([entry["mean_trace"] * s for s in sq])
    for i, bits in enumerate([2, 4, 8]):  # the per-layer perturbations add up to the model's
        whole = analyze.quantization_perturbation(model, bits, symmetric=False, per_channel=True)
        assert whole["l2"] ** 2 == pytest.approx(sum(e["rows"][i]["perturbation_sq"] for e in result["layers"]))
    assert [c["bits"] for c in result["spearman"]] == [2, 4, 8]


def test_layer_traces_are_the_hessian_blocks_of_the_quantized_weights():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    batches, data = small_data()
    result = sensitivity.layer_sensitivity(model, batches, data, bits=[4], symmetric=True, per_channel=True,
                                           bound_linf=1.0, samples=3, seed=7, top_eigen_iters=3)
    blocks = [[m.weight] for _, m in quantized_layers(model)]
    expected = H.block_traces(model, H.cross_entropy_loss, batches, blocks, samples=3, seed=7)
    assert [e["trace"] for e in result["layers"]] == pytest.approx(expected)
    assert all(e["top_eigenvalue"] is not None for e in result["layers"])
    assert result["hessian"] == {"samples": 3, "seed": 7, "probes": "separate", "top_eigen_iters": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import make_fashion_mnist

    root = tmp_path_factory.mktemp("sens")
    data = make_fashion_mnist(root / "fmnist", n_train=48, n_test=40)
    config = TrainConfig(model="own_models:depthwise_cnn", model_kwargs={"width": 4}, dataset="fashion-mnist",
                         data_root=str(data), epochs=1, batch_size=16, optimizer="sgd", lr=0.05, augment=False, seed=0)
    return train(config, root / "run"), data


def invoke(checkpoint, *extra):
    path, data = checkpoint
    args = [str(path), "--model", "own_models:depthwise_cnn", "--data-root", str(data), "--batches", "2",
            "--batch-size", "8", "--iters", "2", "--samples", "2", "--bits", "2,4,8", *extra]
    return CliRunner().invoke(cli.commands["analyze"], args)


def test_analyze_layers_writes_layers_json_plot_and_markdown(checkpoint, tmp_path):
    out = tmp_path / "out"
    result = invoke(checkpoint, "--layers", "--top-eigen", "--limit-test", "30", "--out", str(out))
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "layers.json").read_text())
    assert {"checkpoint", "sha256", "model", "dataset", "optimizer", "scheme", "bits", "data", "float", "hessian",
            "theorem3", "layers", "spearman"} <= set(layers)
    assert layers["bits"] == [2, 4, 8] and layers["scheme"] == {"symmetric": True, "per_channel": True, "bn": "keep"}
    assert layers["data"] == {"loss": {"split": "train", "samples": 16}, "accuracy": {"split": "test", "samples": 30}}
    assert [e["name"] for e in layers["layers"]] == ["stem", "block.depthwise", "block.pointwise", "head"]
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["layers"] == "layers.json"
    assert layers["theorem3"]["linf"] == analysis["theorem3"]["linf"]
    assert all(e["top_eigenvalue"] is not None and len(e["rows"]) == 3 for e in layers["layers"])
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "analysis.md").read_text()
    assert "Theorem 3" in markdown and markdown.count("| block.pointwise |") == 4  # the trace table + one per width
    assert "Spearman" in result.output


def test_analyze_without_layers_writes_no_layer_files(checkpoint, tmp_path):
    out = tmp_path / "plain"
    result = invoke(checkpoint, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "analysis.json").read_text())["layers"] is None
    assert not (out / "layers.json").exists() and "Per-layer" not in (out / "analysis.md").read_text()


@pytest.mark.parametrize("extra", [["--top-eigen"], ["--limit-test", "10"], ["--layers", "--limit-test", "0"]])
def test_layer_options_are_checked(checkpoint, tmp_path, extra):
    result = invoke(checkpoint, *extra, "--out", str(tmp_path / "x"))
    assert isinstance(result.exception, HeroError) and ("--layers" in str(result.exception)
                                                        or "--limit-test" in str(result.exception))
