"""What runs on the device: numpy, the standard library and the runtime (ONNX Runtime, OpenVINO or TensorRT), no torch.

`errors` (HeroError), `files` (checksums, atomic writes, JSON), `memory` (the VmRSS reader),
`runtime` (ONNX Runtime runner, latency timer), `onnx_metadata` (an ONNX file's metadata read from
its wire format, without onnx), `compare` (when a run agrees with a reference: the one
comparator and tolerance policy), `openvino_runtime` (the OpenVINO runner), `switch`
(PrecisionSwitcher over a bundle), `choice` (which precision fits a budget, from a device report),
`trt_switch` (switching TensorRT engines by proven refit), `validate_bundle` (on-device validation,
``python -m exporters.device.validate_bundle``), `manifest` (the bundle manifest's schema, checked as
untrusted input), `report_schema` (report.json's and the device report's), `schema` (how a written
file is declared and checked; a variant's identity; the bn, grid and layout names), `bits` (bit
widths and their integer grid), `nested_grid` (every width as INT8 codes on the 8-bit scale),
`tensorrt`, `trt_api` (the TensorRT names used, per major version, and the wrappers that turn its
failures into one-line errors) and `trt_contract` (engine build/load/refit and its pure rules). A
test imports every module here in a process where torch, onnx, click, yaml and pydantic cannot be
imported.
"""

import importlib.metadata


def _installed_version() -> str:
    try:
        return importlib.metadata.version("hero-deploy")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


TOOL_VERSION = _installed_version()
"""hero-deploy's version, from the installed package's metadata (pyproject.toml is its one source)."""
