"""Every TensorRT name exporters/device uses: declared in exporters.device.trt_api, and present in the real
Python bindings of each TensorRT version it is used on.

The first tests parse the code, so a new TensorRT call cannot escape the table. The others import the
real `tensorrt-cu12-bindings` wheels (10.0.1, the newest 10.x and 11.4; `.ci/run` downloads them to
$HERO_TRT_WHEELS, default ~/.cache/hero-deploy/trt-wheels), each in its own subprocess, over stand-ins for
the native libraries they link against (tests/trt_standin/standin.c, compiled here with the system C
compiler, on that subprocess's library path only). The stand-ins return null from every entry point,
so nothing is built or run: this checks the API surface and the bindings' own Python-side behaviour
(Weights, nptype, the factories' failure when TensorRT cannot start), not TensorRT's.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from exporters.device import trt_contract
from exporters.device.trt_api import NO_GPU, TRT_API, TRT_KEYWORDS
from exporters.device.trt_contract import REFIT_DTYPES, EngineConfig, build_flags

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).parent / "trt_standin"
SOURCES = [REPO / "exporters" / "device" / "tensorrt.py", REPO / "exporters" / "device" / "trt_api.py"]
# Kept in step with .ci/run, which downloads these.
BINDINGS = ("10.0.1", "10.16.1.11", "11.4.0.106")
WHEELS = Path(os.environ.get("HERO_TRT_WHEELS", Path.home() / ".cache" / "hero-deploy" / "trt-wheels"))
NATIVE_LIBRARIES = {"STANDIN_NVINFER": "libnvinfer", "STANDIN_NVINFER_PLUGIN": "libnvinfer_plugin",
                    "STANDIN_NVONNXPARSER": "libnvonnxparser"}

# Roots whose attributes are not TensorRT's: modules and the cuda-python runtime.
OTHER_ROOTS = {"np", "os", "json", "sys", "onnx", "numpy_helper", "datetime", "timezone", "cudart", "_cudart"}
# Attribute names used on values that are not TensorRT objects (numpy arrays, str, dict, list, files,
# cuda-python device properties, the logger's own list). A TensorRT name must never be added here.
NOT_TENSORRT = {"append", "astype", "clear", "ctypes", "data", "decode", "errors", "files", "get", "graph",
                "initializer", "items", "itemsize", "join", "major", "minor", "nbytes", "read", "split", "strip"}


def _root(node):
    """The Name a chain of attributes and calls starts from (None for a literal)."""
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _trt_chain(node: ast.Attribute) -> str | None:
    """"BuilderFlag.FP16" for `trt.BuilderFlag.FP16` or `self._trt.BuilderFlag.FP16`, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
        if isinstance(node, ast.Attribute) and node.attr == "_trt" and _root(node) == "self":
            return ".".join(reversed(parts))
    return ".".join(reversed(parts)) if isinstance(node, ast.Name) and node.id == "trt" else None


def _own_names(tree) -> set[str]:
    """Methods and self-attributes our classes define, and EngineConfig's fields."""
    own = set(EngineConfig.__dataclass_fields__)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            own.add(node.name)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _root(node) == "self":
            own.add(node.attr)
    return own


def used_names() -> tuple[set[str], set[str], dict[str, set[str]]]:
    """(trt.X.Y chains, other attribute names, keyword arguments by called attribute) in SOURCES."""
    chains, others, keywords = set(), set(), {}
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        own = _own_names(tree)
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.keywords:
                keywords.setdefault(node.func.attr, set()).update(k.arg for k in node.keywords)
            if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
                continue  # only whole chains: `trt.ILogger.Severity`, not its `trt.ILogger` part
            chain = _trt_chain(node)
            if chain is not None:
                chains.add(chain)
                continue
            attrs, sub = [], node
            while isinstance(sub, ast.Attribute | ast.Call | ast.Subscript):
                if isinstance(sub, ast.Attribute):
                    attrs.append(sub.attr)
                sub = sub.func if isinstance(sub, ast.Call) else sub.value
            if _root(node) in OTHER_ROOTS or OTHER_ROOTS & set(attrs):
                continue
            others.update(a for a in attrs if not a.startswith("_") and a not in own)
    return chains, others, keywords


def used_calls() -> set[tuple[str, bool, int]]:
    """(TensorRT name, whether it is a whole "Class.member" chain, arguments passed) of every call in
    SOURCES: `trt.X(...)`, factories through `create(trt, trt.X, ...)`, and methods on other values."""
    members = {key.rsplit(".", 1)[-1] for key in TRT_API}
    calls = set()
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        own = _own_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            count = len(node.args) + len(node.keywords)
            if isinstance(node.func, ast.Attribute) and _trt_chain(node.func) is not None:
                if not node.func.attr == "__init__":  # ILogger.__init__(self) in our subclass
                    calls.add((_trt_chain(node.func), True, count))
            elif isinstance(node.func, ast.Name) and node.func.id == "create":
                calls.add((_trt_chain(node.args[1]), True, count - 2))
            elif (isinstance(node.func, ast.Attribute) and node.func.attr in members and node.func.attr not in own
                  and _root(node.func) not in OTHER_ROOTS):
                calls.add((node.func.attr, False, count))
    return calls


def test_every_trt_attribute_chain_in_the_code_is_declared():
    chains, _, _ = used_names()
    prefixes = {key.rsplit(".", n)[0] for key in TRT_API for n in (1, 2) if key.count(".") >= n}
    declared_or_prefix = set(TRT_API) | prefixes
    undeclared = sorted(c for c in chains if c not in declared_or_prefix and not c.endswith(".__init__"))
    assert not undeclared, f"add these TensorRT names to exporters.device.trt_api.TRT_API: {undeclared}"


def test_every_method_called_on_a_tensorrt_object_is_declared():
    _, others, _ = used_names()
    members = {key.rsplit(".", 1)[-1] for key in TRT_API}
    unknown = sorted(others - members - NOT_TENSORRT)
    assert not unknown, (f"{unknown} are used on values that may be TensorRT objects: declare them in TRT_API "
                         "(Class.member) or, if they are not TensorRT's, in this test's NOT_TENSORRT")


def test_keyword_arguments_to_tensorrt_calls_are_declared():
    _, _, keywords = used_names()
    for key, declared in TRT_KEYWORDS.items():
        assert key in TRT_API
    for method, names in keywords.items():
        keys = [k for k in TRT_API if k.rsplit(".", 1)[-1] == method]
        if keys:
            allowed = set().union(*(TRT_KEYWORDS.get(k, ()) for k in keys))
            assert names <= allowed, f"declare {sorted(names - allowed)} for {keys} in TRT_KEYWORDS"


def test_every_flag_build_flags_can_choose_is_declared_for_its_version():
    for version, major in (("10.16.1", 10), ("11.4.0", 11)):
        for precision in trt_contract.PRECISIONS:
            for refit in (False, True):
                for strip in (False, True):
                    flags = build_flags(EngineConfig(precision, refit=refit, strip_weights=strip), version)
                    names = [f"BuilderFlag.{n}" for n in flags["set"] + flags["clear"]]
                    names += [f"NetworkDefinitionCreationFlag.{n}" for n in flags["network"]]
                    for name in names:
                        assert major in TRT_API.get(name, ()), f"{name} (TensorRT {major}) is not in TRT_API"


def test_every_refit_dtype_is_a_declared_datatype():
    assert all(f"DataType.{name}" in TRT_API for name in REFIT_DTYPES)


def test_only_the_tensorrt_modules_import_tensorrt():
    importers = {path.relative_to(REPO).as_posix() for path in (REPO / "exporters").rglob("*.py")
                 if "import tensorrt as trt" in path.read_text()}
    assert importers == {"exporters/device/trt_api.py"}


# ---- the real bindings ------------------------------------------------------------------

def _wheel(version: str) -> Path | None:
    found = sorted(WHEELS.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[int, Path]:
    """Stand-in native libraries per TensorRT major, under the SONAMEs the bindings need."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc) to build the TensorRT stand-in libraries")
    folders = {}
    for major in (10, 11):
        folder = tmp_path_factory.mktemp(f"standin{major}")
        for macro, library in NATIVE_LIBRARIES.items():
            soname = f"{library}.so.{major}"
            subprocess.run([compiler, "-shared", "-fPIC", f"-D{macro}", f"-Wl,-soname,{soname}", "-o",
                            str(folder / soname), str(STANDIN / "standin.c")], check=True, timeout=60)
        folders[major] = folder
    return folders


@pytest.fixture(scope="module")
def probes(standins, tmp_path_factory) -> dict:
    """version -> what tests/trt_standin/probe.py found with those bindings (memoized per module)."""
    cache = {}

    def probe(version: str) -> dict:
        if version in cache:
            return cache[version]
        wheel = _wheel(version)
        if wheel is None:
            pytest.skip(f"no tensorrt-cu12-bindings {version} wheel in {WHEELS} (.ci/run downloads it; set "
                        "HERO_TRT_WHEELS to another folder)")
        site = tmp_path_factory.mktemp(f"bindings{version}")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        # As NVIDIA's `tensorrt` metapackage does: the module users import re-exports the bindings.
        (site / "tensorrt").mkdir()
        (site / "tensorrt" / "__init__.py").write_text(
            "from tensorrt_bindings import *  # noqa: F403\nfrom tensorrt_bindings import __version__\n")
        env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}",
               "LD_LIBRARY_PATH": str(standins[int(version.split('.')[0])])}
        done = subprocess.run([sys.executable, str(STANDIN / "probe.py")], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        cache[version] = json.loads(done.stdout)
        return cache[version]

    return probe


@pytest.mark.parametrize("version", BINDINGS)
def test_declared_names_exist_in_every_version_they_are_used_on(probes, version):
    found, major = probes(version), int(version.split(".")[0])
    assert found["version"] == version
    missing = sorted(name for name, majors in TRT_API.items() if major in majors and not found["api"][name])
    assert not missing, f"TensorRT {version} bindings lack {missing}"
    unused_here = {name: found["api"][name] for name, majors in TRT_API.items() if major not in majors}
    print(f"TensorRT {version}: all {len(TRT_API) - len(unused_here)} names used on {major} present; "
          f"not used on {major} (present?): {unused_here}")


@pytest.mark.parametrize("version", BINDINGS)
def test_declared_keyword_arguments_are_parameters_of_the_real_signatures(probes, version):
    found = probes(version)
    for name, keywords in TRT_KEYWORDS.items():
        assert set(keywords) <= set(found["keywords"][name]), (name, found["keywords"][name])


@pytest.mark.parametrize("version", BINDINGS)
def test_every_tensorrt_call_passes_as_many_arguments_as_a_real_signature_takes(probes, version):
    found, major = probes(version), int(version.split(".")[0])
    for name, whole, count in sorted(used_calls()):
        keys = [name] if whole else [k for k, majors in TRT_API.items()
                                     if k.rsplit(".", 1)[-1] == name and major in majors]
        overloads = [arity for key in keys for arity in found["arities"].get(key, [])]
        assert any(low <= count <= high for low, high in overloads), (
            f"{name}(...) is called with {count} arguments; TensorRT {version} takes {overloads} ({keys})")


def test_tensorrt_11_removed_the_weak_typing_flag_the_code_uses_on_10_only(probes):
    assert probes("10.16.1.11")["api"]["BuilderFlag.FP16"] is True
    assert probes("11.4.0.106")["api"]["BuilderFlag.FP16"] is False


@pytest.mark.parametrize("version", BINDINGS)
def test_refit_dtype_table_matches_the_bindings_nptype_and_datatype_names(probes, version):
    found = probes(version)
    assert found["nptype"] == {name: dtype for name, dtype in REFIT_DTYPES.items() if name != "INT4"}
    assert found["datatype_names"] == {name: name for name in REFIT_DTYPES}


@pytest.mark.parametrize("version", BINDINGS)
def test_refit_arrays_become_weights_of_their_type_and_bad_dtypes_a_one_line_error(probes, version):
    weights, raw = probes(version)["weights"], probes(version)["raw_weights"]
    for dtype, trt_type in (("float32", "FLOAT"), ("float16", "HALF"), ("int8", "INT8"), ("int32", "INT32")):
        assert weights[dtype]["returns"]["dtype"] == trt_type and raw[dtype] == {"returns": trt_type}
    # tensorrt.Weights refuses float64 and ml_dtypes.int4 arrays with ValueError ...
    assert raw["float64"]["raises"] == raw["int4"]["raises"] == "ValueError"
    # ... which the refit path reports as one line naming the weight, and INT4 goes in packed.
    for error in (weights["float64"]["hero_error"], probes(version)["int4_as_int8"]["hero_error"]):
        assert error.startswith("weight 'w' is ") and "\n" not in error
    assert weights["int4"]["returns"] == {"dtype": "INT4", "size": 5}


@pytest.mark.parametrize("version", BINDINGS)
def test_every_entry_point_reports_no_gpu_in_one_line(probes, version):
    entry = probes(version)["entry_points"]
    assert entry["available"]["returns"][0] is False and NO_GPU in entry["available"]["returns"][1]
    for name in ("build_engine", "load_engine", "TensorRTRunner"):
        assert NO_GPU in entry[name]["hero_error"] and "\n" not in entry[name]["hero_error"], (name, entry[name])
