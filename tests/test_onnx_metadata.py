"""exporters/device/onnx_metadata.py: metadata_props read from the file's wire format alone."""

import onnx
from onnx import helper
from torch import nn

from exporters.device.onnx_metadata import read_metadata
from exporters.onnx import ExportOptions, export_onnx
from exporters.quantize import QuantSpec


def test_reads_what_onnx_reads_without_the_graph(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    metadata = {"hero.variant": "w4 — ünïcode", "empty": ""}
    path = export_onnx(model, tmp_path / "m.onnx", QuantSpec(bits=4), ExportOptions(metadata=metadata), input_shape=(3, 8, 8))
    want = {entry.key: entry.value for entry in onnx.load(path).metadata_props}
    assert read_metadata(path) == want and want["hero.variant"] == "w4 — ünïcode" and "hero.quantization" in want


def test_a_model_without_metadata_reads_empty_and_garbage_reads_none(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    assert read_metadata(tmp_path / "plain.onnx") == {}
    (tmp_path / "bad.onnx").write_bytes(b"\xff" * 7)  # a varint that never ends, then wire type 7
    assert read_metadata(tmp_path / "bad.onnx") is None
    (tmp_path / "cut.onnx").write_bytes(b"\x72\x10key")  # metadata_props announcing 16 bytes, holding 3
    assert read_metadata(tmp_path / "cut.onnx") is None
    assert read_metadata(tmp_path / "missing.onnx") is None
