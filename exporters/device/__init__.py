"""What runs on the device: numpy, the standard library and the runtime (ONNX Runtime or TensorRT), no torch.

`errors` (HeroError), `files` (checksums, atomic writes, JSON), `runtime` (ONNX Runtime runner,
latency timer), `switch` (PrecisionSwitcher over a bundle), `validate_bundle` (on-device
validation, ``python -m exporters.device.validate_bundle``), `tensorrt` and `trt_contract`
(engine build/load/refit and its pure rules). A test imports every module here in a process
where torch, onnx, click, yaml and pydantic cannot be imported.
"""
