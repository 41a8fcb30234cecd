"""The post-training quantizer, as the pipeline sees it.

The implementation lives in `exporters.quantize`: the ONNX exporter must compute exactly the same
quantization as the fake-quantized PyTorch model it is validated against, and `exporters` may not
import `pipeline`. This module re-exports its public names so pipeline stages and tests can write
`from pipeline.quantize import quantize_model, QuantSpec`.
"""

from exporters.quantize import (
    ACT_BITS,
    QUANTIZED_LAYER_TYPES,
    SUPPORTED_BITS,
    ActQuant,
    QuantSpec,
    activation_scales,
    asymmetric_qparams,
    calibrate_activations,
    check_bits,
    dequantize,
    fake_quantize,
    fold_bn,
    fold_conv_bn_weights,
    packed_weight_bytes,
    qrange,
    quantize_model,
    quantize_tensor,
    quantize_with_qparams,
    quantized_layers,
    symmetric_qparams,
)

__all__ = [
    "ACT_BITS",
    "QUANTIZED_LAYER_TYPES",
    "SUPPORTED_BITS",
    "ActQuant",
    "QuantSpec",
    "activation_scales",
    "asymmetric_qparams",
    "calibrate_activations",
    "check_bits",
    "dequantize",
    "fake_quantize",
    "fold_bn",
    "fold_conv_bn_weights",
    "packed_weight_bytes",
    "qrange",
    "quantize_model",
    "quantize_tensor",
    "quantize_with_qparams",
    "quantized_layers",
    "symmetric_qparams",
]
