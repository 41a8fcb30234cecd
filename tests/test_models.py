import pytest
import torch

from exporters.device.errors import HeroError
from hero_train.models import MODELS, build_model


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Published sizes: He et al. 2016 Table 6 (ResNet-20/32/56), kuangliu/pytorch-cifar (the rest).
@pytest.mark.parametrize(
    "name, published",
    [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6), ("resnet18", 11.17e6),
     ("mobilenetv2", 2.30e6), ("vgg19bn", 20.04e6)],
)
def test_parameter_count_within_two_percent_of_published(name, published):
    count = _parameter_count(build_model(name, num_classes=10, in_channels=3))
    assert abs(count - published) / published < 0.02, count


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_on_fashion_mnist_and_cifar_shapes(name):
    torch.manual_seed(0)
    with torch.no_grad():
        gray = build_model(name, num_classes=10, in_channels=1).eval()(torch.randn(2, 1, 28, 28))
        color = build_model(name, num_classes=100, in_channels=3).eval()(torch.randn(2, 3, 32, 32))
    assert gray.shape == (2, 10) and torch.isfinite(gray).all()
    assert color.shape == (2, 100) and torch.isfinite(color).all()


def test_first_conv_follows_in_channels():
    convs = [m for m in build_model("resnet20", in_channels=1).modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].in_channels == 1


def test_unknown_name_error_lists_valid_names():
    with pytest.raises(HeroError) as info:
        build_model("resnet1000")
    assert "resnet1000" in str(info.value)
    for name in MODELS:
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": 0}, {"num_classes": -3}, {"in_channels": 2.5}])
def test_bad_num_classes_or_in_channels_raise(kwargs):
    with pytest.raises(HeroError):
        build_model("resnet20", **kwargs)


def test_resnet20_exports_to_onnx_with_plain_ops_only(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = build_model("resnet20", in_channels=1).eval()
    path = tmp_path / "resnet20.onnx"
    torch.onnx.export(model, (torch.randn(1, 1, 28, 28),), str(path))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    plain = {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "ReduceMean", "Flatten", "Reshape",
             "Gemm"}
    assert ops <= plain, ops
