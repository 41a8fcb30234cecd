"""Your own model and your own data, from training to the device: two networks outside the zoo
(own_models.py) through train → run → bundle → exporters.device.validate_bundle, on an image
folder and an .npz; the state_dict and save_for_deploy routes; the factories that are refused."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from exporters.device.validate_bundle import validate_bundle
from hero_train.checkpoint import DataRef, load_checkpoint, load_deployable, save_for_deploy
from hero_train.models import create_model, ModelRef
from pipeline.cli import main

CLASSES = ["cat", "dog", "emu"]


def _pattern(label: int, rng, h: int, w: int) -> np.ndarray:
    """A learnable image: class c is bright in channel c, plus noise."""
    image = rng.integers(0, 50, (h, w, 3)).astype(np.uint8)
    image[..., label] = rng.integers(180, 255, (h, w))
    return image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowers")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_pattern(label, rng, 20, 24)).save(folder / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("npz") / "data.npz"
    y_train, y_test = rng.integers(0, 3, 48), rng.integers(0, 3, 24)
    x_train = np.stack([_pattern(int(c), rng, 16, 16) for c in y_train])
    x_test = np.stack([_pattern(int(c), rng, 16, 16) for c in y_test])
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def _config(tmp_path, model: dict, data: dict, **extra) -> str:
    config = {"name": "own", "model": model, "data": data,
              "train": {"epochs": 1, "batch_size": 16, "optimizer": "hero", "hvp": "finite-difference",
                        "hero_warmup_epochs": 0, "lr": 0.05},
              "quantize": {"bits": [8, 4]},
              "validate": {"batch_size": 16, "latency_repeats": 1, "unoptimized_samples": 8},
              "gate": {"max_drop": 100.0},
              "bundle": {"enabled": True, "test_samples": 12}, **extra}
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _host_equals_device(bundle):
    host = json.loads((bundle / "host_report.json").read_text())
    device = validate_bundle(bundle, "onnxruntime", ["CPUExecutionProvider"], latency_batch=4, latency_repeats=1)
    for h, d in zip([host["baseline"], *host["variants"]], [device["baseline"], *device["variants"]]):
        assert h["name"] == d["name"] and h["runtime_accuracy"] == d["runtime_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("factory,kwargs", [("own_models:depthwise_cnn", {"width": 8}),
                                            ("own_models:tiny_attention", {"dim": 16, "patch": 4})])
def test_own_network_on_an_image_folder_trains_deploys_and_validates_on_the_device(
        image_folder, tmp_path, factory, kwargs, capsys):
    config = _config(tmp_path, {"factory": factory, "kwargs": kwargs}, {"dataset": str(image_folder), "image_size": 16})
    out = tmp_path / "run"
    assert main(["run", config, "--out", str(out)]) == 0
    assert "skipped 1 file(s) that are not images" in capsys.readouterr().err
    ckpt = load_checkpoint(out / "train" / "checkpoint.pt")
    assert ckpt["model"]["factory"] == factory and ckpt["model"]["kwargs"] == kwargs
    assert ckpt["classes"] == CLASSES and ckpt["input_shape"] == [3, 16, 16]
    assert ckpt["normalization"]["samples"] == 48 and ckpt["normalization"]["mean"][0] > 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["classes"] == CLASSES and report["meta"]["model"] == factory
    assert all(v["consistent"] for v in [report["baseline"], *report["variants"]])
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["classes"] == CLASSES and manifest["input_shape"] == [3, 16, 16]
    _host_equals_device(out / "bundle")
    # a rerun with the same inputs reuses the training run and the bundle
    stamp = (out / "bundle" / "manifest.json").stat().st_mtime_ns
    assert main(["run", config, "--out", str(out)]) == 0
    assert (out / "bundle" / "manifest.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_an_npz_dataset_trains_and_deploys(arrays, tmp_path):
    config = _config(tmp_path, {"factory": "own_models:tiny_attention", "kwargs": {"dim": 8}}, {"dataset": str(arrays)})
    out = tmp_path / "run"
    assert main(["run", config, "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["meta"]["classes"] == ["0", "1", "2"]
    _host_equals_device(out / "bundle")


def _trained_elsewhere(tmp_path):
    torch.manual_seed(0)
    return create_model(ModelRef(factory="own_models:depthwise_cnn", kwargs={"width": 4}), num_classes=3, in_channels=3)


def test_a_plain_state_dict_deploys_with_a_model_and_data_section(image_folder, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(_trained_elsewhere(tmp_path).state_dict(), weights)
    config = _config(tmp_path, {"factory": "own_models:depthwise_cnn", "kwargs": {"width": 4}},
                     {"dataset": str(image_folder), "image_size": 16}, bundle={"enabled": False})
    assert main(["run", config, "--checkpoint", str(weights), "--out", str(tmp_path / "run")]) == 0
    meta = json.loads((tmp_path / "run" / "report.json").read_text())["meta"]
    assert meta["classes"] == CLASSES and meta["model"] == "own_models:depthwise_cnn"


def test_a_plain_state_dict_takes_its_input_from_the_model_section(image_folder, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    torch.save(_trained_elsewhere(tmp_path).state_dict(), weights)
    model = {"factory": "own_models:depthwise_cnn", "kwargs": {"width": 4}, "input_shape": [3, 16, 16],
             "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "classes": CLASSES}
    config = _config(tmp_path, model, {}, bundle={"enabled": False})
    out = tmp_path / "run"
    # the model section says what the input is; the test images still come from a dataset
    assert main(["run", config, "--checkpoint", str(weights), "--out", str(out)]) == 2
    assert "pass --dataset" in capsys.readouterr().err
    assert main(["run", config, "--checkpoint", str(weights), "--out", str(out), "--dataset", str(image_folder)]) == 0


def test_save_for_deploy_writes_a_checkpoint_hero_run_takes_with_no_model_section(image_folder, tmp_path, capsys):
    ckpt = save_for_deploy(_trained_elsewhere(tmp_path), tmp_path / "mine.pt", factory="own_models:depthwise_cnn",
                           kwargs={"width": 4}, input_shape=(3, 16, 16),
                           normalization={"mean": [0.4] * 3, "std": [0.3] * 3}, classes=CLASSES)
    config = _config(tmp_path, {}, {"dataset": str(image_folder)}, bundle={"enabled": False})
    text = yaml.safe_load(open(config))
    del text["model"]
    open(config, "w").write(yaml.safe_dump(text))
    out = tmp_path / "run"
    assert main(["run", config, "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "pass --model own_models:depthwise_cnn" in capsys.readouterr().err
    assert main(["run", config, "--checkpoint", str(ckpt), "--out", str(out), "--model", "own_models:depthwise_cnn"]) == 0
    assert json.loads((out / "report.json").read_text())["meta"]["classes"] == CLASSES


@pytest.mark.parametrize("model,needle", [
    (None, "pass --model own_models:depthwise_cnn"),
    ("own_models:tiny_attention", "holds model own_models:depthwise_cnn, not own_models:tiny_attention"),
    ("resnet20", "not resnet20: pass --model own_models:depthwise_cnn"),
])
def test_a_checkpoint_recording_a_factory_is_refused_unless_that_factory_is_named(tmp_path, capsys, model, needle):
    ckpt = save_for_deploy(_trained_elsewhere(tmp_path), tmp_path / "mine.pt", factory="own_models:depthwise_cnn",
                           kwargs={"width": 4}, input_shape=(3, 16, 16),
                           normalization={"mean": [0.4] * 3, "std": [0.3] * 3}, classes=CLASSES)
    args = ["quantize", str(ckpt), "--bits", "8"] + (["--model", model] if model else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


@pytest.mark.parametrize("factory,needle", [
    ("no_such_module_here:build", "cannot import no_such_module_here"),
    ("own_models:missing", "own_models has no missing"),
    ("own_models:NOT_CALLABLE", "is not callable"),
    ("own_models:not_a_module", "returned a str, not a torch.nn.Module"),
    ("own_models", "unknown model 'own_models'"),
])
def test_a_factory_that_cannot_build_a_model_is_a_one_line_error(tmp_path, capsys, factory, needle, tiny_fmnist):
    code = main(["train", "--model", factory, "--data-root", str(tiny_fmnist), "--epochs", "1",
                 "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "t" / "checkpoint.pt").exists()


def test_kwargs_that_differ_from_the_recorded_ones_are_refused(tmp_path, capsys):
    ckpt = save_for_deploy(_trained_elsewhere(tmp_path), tmp_path / "mine.pt", factory="own_models:depthwise_cnn",
                           kwargs={"width": 4}, input_shape=(3, 16, 16),
                           normalization={"mean": [0.4] * 3, "std": [0.3] * 3}, classes=CLASSES)
    assert main(["quantize", str(ckpt), "--model", "own_models:depthwise_cnn", "--model-kwargs", '{"width": 8}']) == 2
    assert "built with model kwargs {'width': 4}" in capsys.readouterr().err


def test_a_test_folder_too_large_for_memory_streams_and_validates_the_same(image_folder, tmp_path, monkeypatch):
    from hero_train import data as hdata
    from pipeline import stages

    ckpt = save_for_deploy(_trained_elsewhere(tmp_path), tmp_path / "mine.pt", factory="own_models:depthwise_cnn",
                           kwargs={"width": 4}, input_shape=(3, 16, 16),
                           normalization={"mean": [0.4] * 3, "std": [0.3] * 3}, classes=CLASSES)
    config = _config(tmp_path, {"factory": "own_models:depthwise_cnn"}, {"dataset": str(image_folder)},
                     quantize={"bits": [8]}, bundle={"enabled": False})
    rows, batches = {}, {}
    for mode, budget in (("memory", hdata.IN_MEMORY_BYTES), ("streamed", 0)):
        monkeypatch.setattr(hdata, "IN_MEMORY_BYTES", budget)
        loaded = load_deployable(ckpt, ModelRef(factory="own_models:depthwise_cnn"), DataRef(str(image_folder)))
        split = stages.EvalSplit(loaded, None)
        batches[mode] = list(split.batches(5)())
        assert sum(len(y) for _, y in batches[mode]) == 24
        assert isinstance(split._split, hdata.StreamedSplit) == (mode == "streamed")
        assert main(["run", config, "--checkpoint", str(ckpt), "--out", str(tmp_path / mode)]) == 0
        report = json.loads((tmp_path / mode / "report.json").read_text())
        rows[mode] = [r for r in [report["baseline"], *report["variants"]]]
    # Decoding is deterministic: streaming hands validation the very same normalised images, bit for bit.
    for (x, y), (xs, ys) in zip(batches["memory"], batches["streamed"], strict=True):
        np.testing.assert_array_equal(x, xs)
        np.testing.assert_array_equal(y, ys)
    # The same images give the same measurements; floats compared at float tolerance (tests/agreement.py),
    # counts exactly, so nothing here rests on two sessions summing in the same order.
    for memory, streamed in zip(rows["memory"], rows["streamed"], strict=True):
        assert memory["test_samples"] == streamed["test_samples"] == 24
        for key in ("torch_accuracy", "runtime_accuracy", "agreement"):
            assert abs(memory[key] - streamed[key]) <= 1 / 24, key  # at most one image on a float-level tie
        assert memory["max_logit_diff"] == pytest.approx(streamed["max_logit_diff"], abs=1e-4)


def test_a_training_folder_too_large_for_memory_streams_to_the_same_weights(image_folder, tmp_path, monkeypatch):
    from hero_train import data as hdata
    from hero_train.config import TrainConfig
    from hero_train.train import train

    config = TrainConfig(model="own_models:depthwise_cnn", model_kwargs={"width": 4}, dataset=str(image_folder),
                         image_size=16, epochs=1, batch_size=16, optimizer="sgd", augment=False, limit_test=8)
    weights = {}
    for mode, budget in (("memory", hdata.IN_MEMORY_BYTES), ("streamed", 0)):
        monkeypatch.setattr(hdata, "IN_MEMORY_BYTES", budget)
        weights[mode] = load_checkpoint(train(config, tmp_path / mode))
    a, b = weights["memory"], weights["streamed"]
    assert a["normalization"] == b["normalization"] and a["input_shape"] == b["input_shape"] == [3, 16, 16]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
