"""Data-parallel training: batch shards, process-group setup, and two Gloo ranks against one process.

The two-rank checks run once per module in two spawned processes (tiny float64 MLP without
BatchNorm, so N ranks with B/N samples must reproduce one process with B to float tolerance), and
once end to end through torchrun and the `hero train` command line.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import hero_train.train as T
from exporters.device.errors import HeroError
from hero_train import distributed
from hero_train.checkpoint import load_checkpoint, model_from_checkpoint
from hero_train.distributed import Replica
from hero_train.optim import HERO, FirstOrder, GradL1

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 8
STEPS = 2
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
OPTIMIZERS = {
    "hero-exact": lambda m: HERO(m.parameters(), torch.optim.SGD, h=0.5, gamma=1.0, model=m, **SGD),
    "hero-fd": lambda m: HERO(m.parameters(), torch.optim.SGD, h=0.5, gamma=1.0, hvp="finite-difference",
                              variant="paper", model=m, **SGD),
    "first-order": lambda m: FirstOrder(m.parameters(), torch.optim.SGD, h=0.5, model=m, **SGD),
    "gradl1-exact": lambda m: GradL1(m.parameters(), torch.optim.SGD, lam=0.05, model=m, **SGD),
    "gradl1-fd": lambda m: GradL1(m.parameters(), torch.optim.SGD, lam=0.05, hvp="finite-difference",
                                  model=m, **SGD),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), **SGD),
}


def tanh_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def global_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def run_steps(name, replica):
    """STEPS steps of one optimizer on this replica's rows; the final weights, flat."""
    model = tanh_net()
    net = distributed.wrap(model, replica)
    optimizer = OPTIMIZERS[name](model)
    for x, y in global_batches():
        rows = replica.rows(len(y))
        T.take_step(optimizer, lambda: F.cross_entropy(net(x[rows]), y[rows]), net)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(root, **kw):
    base = dict(model="resnet20", data_root=str(root), limit_train=16, limit_test=8, batch_size=8, epochs=2,
                optimizer="hero", hvp="finite-difference", hero_warmup_epochs=1, seed=3)
    return T.TrainConfig(**dict(base, **kw))


def two_rank_worker(rank, port, out, data_root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    out = Path(out)
    result = {"steps": {}, "reducer_calls": {}}
    replica = Replica(rank, WORLD, "cpu")
    for name in OPTIMIZERS:
        result["steps"][name] = run_steps(name, replica)
    # DDP's reducer sends through its comm hook; count how often it does per optimizer.
    for name in ("hero-exact", "sgd"):
        model = tanh_net()
        net = distributed.wrap(model, replica)
        sent = []

        def counting_hook(state, bucket, sent=sent):
            sent.append(bucket.buffer().numel())
            return default_hooks.allreduce_hook(None, bucket)

        net.register_comm_hook(None, counting_hook)
        optimizer = OPTIMIZERS[name](model)
        for x, y in global_batches():
            rows = replica.rows(len(y))
            T.take_step(optimizer, lambda: F.cross_entropy(net(x[rows]), y[rows]), net)
        result["reducer_calls"][name] = len(sent)
    # hero train inside this group: uninterrupted, interrupted in epoch 2 and resumed, refused rerun.
    config = tiny_config(data_root)
    T.train(config, out / "full")
    original = T.train_one_epoch

    def die_in_epoch_two(*args, **kw):
        if args[4] == 1:
            raise KeyboardInterrupt
        return original(*args, **kw)

    T.train_one_epoch = die_in_epoch_two
    try:
        T.train(config, out / "cut")
    except KeyboardInterrupt:
        result["interrupted"] = True
    T.train_one_epoch = original
    T.train(config, out / "cut", resume=True)
    try:
        T.train(config, out / "full")
    except HeroError as exc:
        result["rerun_error"] = str(exc)
    dist.destroy_process_group()
    torch.save(result, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Results of two Gloo ranks, one dict per rank (see two_rank_worker)."""
    from conftest import make_fashion_mnist

    out = tmp_path_factory.mktemp("two_ranks")
    data_root = make_fashion_mnist(out / "fmnist", n_train=16, n_test=8)
    mp.start_processes(two_rank_worker, args=(free_port(), str(out), str(data_root)), nprocs=WORLD,
                       start_method="spawn")
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# --------------------------------------------------------------------------- one process


def test_rows_split_a_global_batch_into_equal_strided_shards():
    shards = [Replica(r, 3).rows(9) for r in range(3)]
    assert [s.tolist() for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_a_batch_that_does_not_split_is_padded_with_its_first_rows():
    shards = [Replica(r, 4).rows(5) for r in range(4)]
    assert {len(s) for s in shards} == {2}
    together = sorted(torch.cat(shards).tolist())
    assert together == [0, 0, 1, 1, 2, 2, 3, 4]


def test_single_process_rows_are_the_whole_batch_in_order():
    assert torch.equal(Replica().rows(7), torch.arange(7))


def test_global_batch_size_must_split_evenly_over_ranks():
    assert distributed.local_batch_size(128, Replica(0, 4)) == 32
    with pytest.raises(HeroError, match="multiple of 3"):
        distributed.local_batch_size(128, Replica(0, 3))


def test_cuda_means_the_gpu_of_the_local_rank():
    assert distributed.rank_device("cpu", 3, 4) == "cpu"
    if not torch.cuda.is_available():
        assert distributed.rank_device("cuda", 3, 4) == "cuda:3"
    with pytest.raises(HeroError, match="pass --device cuda"):
        distributed.rank_device("cuda:1", 0, 2)


def test_without_torchrun_variables_it_is_one_process(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with distributed.process_group("cpu") as replica:
        assert replica == Replica(0, 1, "cpu") and not dist.is_initialized()


def test_torchrun_variables_bring_a_gloo_group_up_and_down(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with distributed.process_group("cpu") as replica:
        assert replica.is_main and dist.is_initialized() and dist.get_backend() == "gloo"
    assert not dist.is_initialized()


def test_on_main_hands_back_the_result_or_the_error_of_rank_zero():
    def refuse():
        raise HeroError("nope")

    assert distributed.on_main(lambda: 7, Replica(0, 1)) == 7
    with pytest.raises(HeroError, match="nope"):
        distributed.on_main(refuse, Replica(0, 1))


@pytest.mark.parametrize("kw,message", [
    (dict(sync_bn=True), "needs --device cuda"),
    (dict(sync_bn=True, device="cuda", optimizer="hero", hvp="exact"), "--hvp finite-difference"),
    (dict(sync_bn=True, device="cuda", optimizer="gradl1", hvp="exact"), "--hvp finite-difference"),
])
def test_sync_bn_needs_cuda_and_a_finite_difference_hvp(kw, message):
    with pytest.raises(HeroError, match=message):
        T.TrainConfig(**kw)
    T.TrainConfig(sync_bn=True, device="cuda", optimizer="first-order")


# --------------------------------------------------------------------------- two ranks


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_ranks_with_half_batches_step_like_one_process_with_the_whole(two_ranks, name):
    _, ranks = two_ranks
    reference = run_steps(name, Replica())
    start = torch.cat([p.detach().reshape(-1) for p in tanh_net().parameters()])
    moved = float((reference - start).abs().max())
    # Two half-batch means averaged by the all-reduce sum the same products in another order: a few
    # ulps (eps = 2^-52) per gradient, so the steps agree to ~1e4 eps of how far they move the weights.
    # A forward difference divides that round-off by its step r = sqrt(eps)(1 + ||U||)/||v||
    # (hero_train.optim.fd_step_size): its result is only good to ~sqrt(eps) relative, and so is the
    # agreement, taken with a factor 100. A rank that skipped the reduction would differ by ~moved.
    eps = torch.finfo(torch.float64).eps
    tolerance = moved * (100 * eps**0.5 if name.endswith("-fd") else 1e4 * eps)
    for result in ranks:
        got = result["steps"][name]
        assert torch.allclose(got, reference, rtol=0, atol=tolerance), (name, float((got - reference).abs().max()))


def test_ddp_reducer_stays_idle_for_hero_and_reduces_for_sgd(two_ranks):
    _, ranks = two_ranks
    for result in ranks:
        assert result["reducer_calls"]["hero-exact"] == 0
        assert result["reducer_calls"]["sgd"] == STEPS


def test_resumed_two_rank_run_ends_with_identical_weights(two_ranks):
    out, ranks = two_ranks
    assert all(r.get("interrupted") for r in ranks)
    full = load_checkpoint(out / "full" / "checkpoint.pt")["state_dict"]
    cut = load_checkpoint(out / "cut" / "checkpoint.pt")["state_dict"]
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)
    lines = [json.loads(l) for l in (out / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]


def test_an_error_on_rank_zero_reaches_every_rank(two_ranks):
    _, ranks = two_ranks
    for result in ranks:
        assert "exists: pass --resume" in result.get("rerun_error", "")


@pytest.mark.slow
def test_torchrun_hero_train_writes_one_checkpoint_the_deploy_side_loads(tiny_fmnist, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "pipeline.cli", "train", "--data-root", str(tiny_fmnist), "--limit-train", "16",
               "--limit-test", "8", "--batch-size", "8", "--epochs", "1", "--optimizer", "gradl1",
               "--hvp", "finite-difference", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert done.stdout.count("epoch 1/1:") == 1  # rank 0 logs alone
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert model_from_checkpoint(ckpt)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
