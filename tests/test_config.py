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
    ("name: x\ntrain:\n  epocs: 3\n", "unknown key 'epocs'"),
    ("name: x\ntrain:\n  model: resnet9000\n", "unknown model"),
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
