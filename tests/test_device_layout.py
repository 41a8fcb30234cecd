"""The device boundary: every module of exporters/device imports with only numpy and the runtime."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import exporters.device

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_ONLY = ("torch", "onnx", "click", "yaml", "pydantic", "matplotlib", "hero_train", "pipeline", "tensorrt", "cuda")

_IMPORT_ALL = f"""
import importlib, sys
for blocked in {HOST_ONLY!r}:
    sys.modules[blocked] = None  # any import of these now raises ImportError
for name in sys.argv[1:]:
    importlib.import_module(name)
print(len(sys.argv) - 1)
"""


def device_modules() -> list[str]:
    return [f"exporters.device.{m.name}" for m in pkgutil.iter_modules(exporters.device.__path__)]


def test_every_device_module_imports_without_host_packages():
    modules = device_modules()
    assert {"exporters.device.runtime", "exporters.device.switch", "exporters.device.validate_bundle",
            "exporters.device.tensorrt", "exporters.device.errors"} <= set(modules)
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *modules], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(modules))


def test_hero_train_imports_from_exporters_only_the_error_and_file_helpers():
    allowed = {"exporters.device.errors", "exporters.device.files"}
    seen = set()
    for path in (REPO_ROOT / "hero_train").glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("from exporters", "import exporters")):
                module = line.split()[1]
                assert module in allowed, f"{path.name}: {line}"
                seen.add(module)
    assert seen == allowed
