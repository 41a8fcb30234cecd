"""Deploy configs: shipped ones validate, mistakes name the key and the file."""

from pathlib import Path

import pytest

from exporters.device.errors import HeroError
from pipeline.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "deploy_configs").glob("*.yaml"))


def test_every_shipped_config_validates():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "x86-onnxruntime", "jetson-orin-tensorrt"} <= names
    for path in CONFIGS:
        config = load_config(path)
        assert config.name == path.stem


def test_quickstart_trains_resnet20_on_fashion_mnist_and_gates():
    config = load_config(Path(__file__).parent.parent / "deploy_configs" / "quickstart.yaml")
    train = config.train_config()
    assert (train.model, train.dataset, train.optimizer) == ("resnet20", "fashion-mnist", "hero")
    assert config.quantize.bits == [8, 6, 5, 4, 3]
    assert config.runtime.name == "onnxruntime" and config.gate.max_drop is not None


@pytest.mark.parametrize("text,needle", [
    ("name: x\nquantize:\n  bitz: [4]\n", "quantize.bitz: unknown key"),
    ("name: x\nquantize:\n  bits: [9]\n", "quantize.bits"),
    ("name: x\nquantize:\n  symmetric: maybe\n", "quantize.symmetric"),
    ("name: x\ntrain:\n  epocs: 3\n", "train.epocs: unknown key"),
    ("name: x\ntrain:\n  epochs: many\n", "train.epochs"),
    ("name: x\ntrain:\n  optimizer: adam\n", "unknown optimizer 'adam'"),
    ("name: x\nmodel:\n  name: resnet9000\n", "model: unknown model 'resnet9000'"),
    ("name: x\ndata:\n  dataset: mnist-ish\n", "data.dataset: unknown dataset"),
    ("name: x\ndata:\n  limit_test: 0\n", "data.limit_test"),
    ("name: x\ntrain:\n  model: resnet20\n", "the model section says it (model: {name: ...})"),
    ("name: x\ntrain:\n  data_root: /data\n", "the data section says it (data: {root: ...})"),
    ("name: x\nvalidate:\n  limit_test: 10\n", "validate.limit_test: unknown key"),
    ("name: x\ntarget:\n  batch_sizes: [1]\n", "target.batch_sizes: unknown key"),
    ("name: x\ngate:\n  max_drop: .inf\n", "gate.max_drop"),
    ("name: x\nvalidate:\n  batch_size: 0\n", "validate.batch_size"),
    ("quantize: {}\n", "name"),
    ("name: x\n  bad: : indentation\n", "not valid YAML"),
    ("- a list\n", "YAML mapping"),
])
def test_config_errors_name_the_key_and_the_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(HeroError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(HeroError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_train_section_takes_trainconfig_types_and_defaults_and_joins_model_and_data(tmp_path):
    import dataclasses

    from hero_train.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("name: c\nmodel: {name: resnet32}\ndata: {root: /d, limit_train: 64, limit_test: 32}\n"
                    "train: {epochs: 3, gamma: 1}\n")
    train = load_config(path).train_config()
    expected = dataclasses.replace(TrainConfig(), model="resnet32", data_root="/d", limit_train=64, limit_test=32,
                                   epochs=3, gamma=1.0)
    assert train == expected and isinstance(train.gamma, float)
    path.write_text("name: c\n")
    assert load_config(path).train_config() is None


def test_the_data_and_model_sections_say_what_load_deployable_takes():
    from hero_train.checkpoint import DataRef, InputSpec
    from pipeline.config import DataSection, ModelSection

    assert DataSection().ref() == DataRef()  # the default dataset replaces no checkpoint's own
    assert DataSection(dataset="cifar10", root="/d", image_size=32).ref() == DataRef("cifar10", "/d", None, 32)
    assert ModelSection(name="resnet20", input_shape=[1, 28, 28], classes=["a", "b"]).described_input() is None
    section = ModelSection(name="resnet20", input_shape=[1, 28, 28], classes=["a", "b"],
                           normalization={"mean": [0.5], "std": [0.25]})
    assert section.described_input() == InputSpec((1, 28, 28), (0.5,), (0.25,), ("a", "b"))
