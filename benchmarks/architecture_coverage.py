"""Which real architectures deploy: torchvision's classification zoo through our W4 and W8A8 export.

One model per family (ZOO), random weights (`weights=None`, 10 classes; BatchNorm statistics
settled on random images in train mode, then eval: `imagenet_models.settle_batchnorm`), at a small
input where the model allows (vit_b_16, swin_t and maxvit_t need 224). Per model and scheme
(SCHEMES: W4 weight-only with INT4 storage, `QuantSpec(bits=4)`; W8A8 in the onnxruntime layout,
`QuantSpec(bits=8, act_bits=8)` calibrated by `calibrate_activations` on a couple of random
batches): `quantize_model` (the emulation), `export_onnx`, ONNX Runtime (`OnnxRuntimeRunner`, CPU,
graph optimisations on), and the table says

- exported: yes, or the first line of the error (prefixed by the stage that raised it);
- float weights left: weight matrices the exported graph still reads in float (`float_weight_matrices`:
  a Conv/Gemm/MatMul operand that is a >= 2-D initializer, directly or through layout ops, rather
  than a DequantizeLinear output);
- agreement with the emulation on the same random images: top-1 agreement, relative logit error
  (RMS of the difference over the RMS of the emulation's logits) and the verdict of the tests'
  tolerance policy (`tests/agreement.py`: elementwise float tolerance for W4, the activation
  quantization's own effect for W8A8; `judge`);
- literal graph: the same policy for the artifact run with ONNX Runtime's optimisations off (the
  graph as written, no integer-kernel fusions): whether the export computes the emulation, apart
  from how the optimised kernels round;
- float32 reach: the policy assumes float rounding moves the logits little, which a chaotic
  network (random weights amplify every rounding difference; `settle_batchnorm` tames most, not
  all) does not honour. So the emulation also runs in float64 (`exact`: the same codes and scales,
  rounding points computed exactly), and the row reports the scheme's own effect on the logits
  (`effect`: against float activations for A8, against the float model for W4), how far PyTorch's
  own float32 emulation lies from `exact` (`float32_error`) and how far ONNX Runtime's output does
  (`runtime_error`, optimised and literal graph), all relative as above. Both runtime graphs are
  within float32 reach when they lie within FLOAT32_REACH times PyTorch's own float32 error of
  `exact`: the runtime is then as exact an implementation of the emulation as PyTorch is. That
  tells a wrong export only while FLOAT32_REACH * float32_error stays below ACT_FLIP_FRACTION *
  effect (`discriminates`), which chaotic A8 rows do not give;
- forced codes (A8 rows): `exporters.forced_codes`, the literal graph run with every quantization
  point fed the emulation's own codes, so no rounding flip cascades: the largest share of codes
  that differ at any point (at most FORCED_FLIP_RATE, none by more than a step, passes), which
  tells a wrong export whatever the network's chaos;
- agrees: "policy" where the policy passes on both graphs; else "float32 reach + forced codes"
  (A8) or "float32 reach" (weight-only, where it discriminates) where those hold; else "no";
- seconds for the row (calibration, emulation, export, ORT session and run).

Each model runs in its own process with a time budget (--budget), so a failure or a stall costs one
row, not the table. torchvision is imported only here, never by the project; it does not import
with the project's CPU torch wheel, so run this in its own environment (benchmarks/README.md):

    python -m venv /work/venv-tv
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= /work/venv-tv/bin/pip install torch==2.13.0 torchvision==0.28.0
    /work/venv-tv/bin/pip install -e '.[dev]'
    OMP_NUM_THREADS=1 PYTHONPATH=. /work/venv-tv/bin/python benchmarks/architecture_coverage.py --json coverage.json
    ... architecture_coverage.py --model vit_b_16 --model swin_t      # a few models
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
import onnx
import torch

from exporters.calibrate import calibrate_activations
from exporters.device.compare import compare, relative_error
from exporters.device.runtime import OnnxRuntimeRunner
from exporters.forced_codes import forced_comparison
from exporters.onnx import ExportOptions, export_onnx
from exporters.quantize import QuantSpec, quantize_model

try:
    from benchmarks import imagenet_models
except ImportError:  # run as a script (python benchmarks/architecture_coverage.py): its own folder is on sys.path
    import imagenet_models
try:
    from tests import agreement
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import agreement

NUM_CLASSES = 10
# Two float32 implementations of one function, each at distance e from the exact result with
# independent rounding, lie about sqrt(2) e apart; 2 leaves room for a runtime somewhat less exact
# than PyTorch (e.g. its fused LayerNorm/Softmax kernels) while a wrong export, which moves the
# logits by the scheme's whole effect, still lands beyond it wherever `discriminates` holds.
FLOAT32_REACH = 2.0
SMALL_INPUT = 64  # convnets: what their stride allows, and fast
# One representative per family: name -> input size. vit_b_16 fixes 224 (its position embedding),
# maxvit_t needs sides divisible by its 7x7 windows at every stage, swin_t is sized as trained.
ZOO = {
    "resnet18": SMALL_INPUT, "resnext50_32x4d": SMALL_INPUT, "mobilenet_v2": SMALL_INPUT,
    "mobilenet_v3_small": SMALL_INPUT, "efficientnet_b0": SMALL_INPUT, "efficientnet_v2_s": SMALL_INPUT,
    "regnet_y_400mf": SMALL_INPUT, "shufflenet_v2_x1_0": SMALL_INPUT, "squeezenet1_0": SMALL_INPUT,
    "densenet121": SMALL_INPUT, "mnasnet0_5": SMALL_INPUT, "googlenet": SMALL_INPUT, "convnext_tiny": SMALL_INPUT,
    "swin_t": 224, "vit_b_16": 224, "maxvit_t": 224,
}
# googlenet's auxiliary heads only run in training: a deployed googlenet is built without them.
BUILD_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}
SCHEMES = {
    "W4": (QuantSpec(bits=4), ExportOptions(int4_storage=True)),
    "W8A8": (QuantSpec(bits=8, act_bits=8), ExportOptions()),
}
WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}
# Ops that only move or reshape a tensor: a weight read through them is still that weight.
LAYOUT_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Cast", "Identity"}
TORCHVISION_MISSING = ("torchvision does not import here ({}): run this benchmark in an environment where it does "
                       "(benchmarks/README.md, 'Architecture coverage')")


@dataclass
class Row:
    """One model under one scheme; None where a stage did not get that far."""

    model: str
    scheme: str
    input_size: int
    exported: str = "not run"
    float_weights: list[str] | None = None
    top1_agreement: float | None = None
    rel_error: float | None = None
    verdict: str | None = None
    literal_verdict: str | None = None
    effect: float | None = None
    float32_error: float | None = None
    runtime_error: float | None = None
    literal_error: float | None = None
    discriminates: bool | None = None
    forced_rate: float | None = None
    forced_agrees: bool | None = None
    agrees: str | None = None
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# ---- what the graph and the runtime say -----------------------------------------------------------

def float_weight_matrices(proto: onnx.ModelProto) -> list[str]:
    """Names of the float initializers (>= 2-D) that a Conv/ConvTranspose/Gemm/MatMul reads as an
    operand, directly or through LAYOUT_OPS, in node order: weights the exporter left unquantized.
    An operand that leads back to a DequantizeLinear (or to any other computing op) is not one."""
    initializers = {t.name: t for t in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    found = []
    for node in proto.graph.node:
        for index in WEIGHT_OPS.get(node.op_type, ()):
            if index >= len(node.input):
                continue
            name = node.input[index]
            while name in producer and producer[name].op_type in LAYOUT_OPS:
                name = producer[name].input[0]
            if name in initializers and len(initializers[name].dims) >= 2 and name not in found:
                found.append(name)
    return found


def float32_reach(row: Row, emulation: np.ndarray, exact: np.ndarray, unquantized: np.ndarray,
                  got: np.ndarray, literal: np.ndarray) -> None:
    """Fill the row's float32 reach columns (module docstring) from the float32 emulation, its
    float64 run `exact`, the model without the scheme's quantization, and both runtime graphs."""
    row.effect = relative_error(unquantized, emulation)
    row.float32_error = relative_error(emulation, exact)
    row.runtime_error, row.literal_error = relative_error(got, exact), relative_error(literal, exact)
    row.discriminates = FLOAT32_REACH * row.float32_error < agreement.ACT_FLIP_FRACTION * row.effect
    reach = max(row.runtime_error, row.literal_error) <= FLOAT32_REACH * row.float32_error
    if row.verdict == row.literal_verdict == "pass":
        row.agrees = "policy"
    elif reach and row.forced_agrees:
        row.agrees = "float32 reach + forced codes"
    elif reach and row.forced_agrees is None and row.discriminates:
        row.agrees = "float32 reach"
    else:
        row.agrees = "no"


def judge(got: np.ndarray, emulation: np.ndarray, without_act_quant: np.ndarray | None = None) -> str:
    """"pass", or "fail: <why>", by the tests' tolerance policy (`tests/agreement.py`): with
    `without_act_quant` (A8: the same weights, float activations) `assert_matches_act_quantized`,
    else `assert_float_close` (weight-only graphs: float arithmetic)."""
    try:
        if without_act_quant is None:
            agreement.assert_float_close(got, emulation)
        else:
            agreement.assert_matches_act_quantized(got, emulation, without_act_quant)
    except AssertionError as exc:
        return f"fail: {first_line(exc).removeprefix('AssertionError: ')}"
    return "pass"


# ---- one model, one scheme ------------------------------------------------------------------------

def run_scheme(model: torch.nn.Module, row: Row, spec: QuantSpec, options: ExportOptions, images: np.ndarray,
               calibration_batches: list[torch.Tensor], folder: Path, threads: int | None = 1) -> Row:
    """Fill `row` for `model` (eval mode) under `spec`: each stage in turn, the first error ends it."""
    start = time.perf_counter()
    stage = "calibrate"
    try:
        calibration = calibrate_activations(model, calibration_batches, spec) if spec.act_bits else None
        stage = "emulate"
        x = torch.from_numpy(images)
        with torch.no_grad():
            emulated = quantize_model(model, spec, calibration)
            emulation = emulated(x).numpy()
            plain = (quantize_model(model, QuantSpec(bits=spec.bits))(x).numpy() if spec.act_bits else None)
            unquantized = plain if spec.act_bits else quantize_model(model, QuantSpec())(x).numpy()
            exact = copy.deepcopy(emulated).double()(x.double()).numpy()
        stage = "export"
        path = export_onnx(model, folder / f"{row.model}_{row.scheme}.onnx", spec, options, calibration,
                           input_shape=tuple(images.shape[1:]))
        row.exported = "yes"
        row.float_weights = float_weight_matrices(onnx.load(path, load_external_data=False))
        stage = "ort"
        got = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], intra_op_threads=threads).predict(images)
        row.top1_agreement = compare(emulation, got).agreement.rate
        row.rel_error = relative_error(got, emulation)
        row.verdict = judge(got, emulation, plain)
        stage = "ort literal"
        literal = OnnxRuntimeRunner(path, ["CPUExecutionProvider"], optimization="disabled",
                                    intra_op_threads=threads).predict(images)
        row.literal_verdict = judge(literal, emulation, plain)
        if spec.act_bits:
            stage = "forced codes"
            forced = forced_comparison(path, emulated, images)
            row.forced_rate, row.forced_agrees = (forced.worst.rate if forced.worst else 0.0), forced.agrees
        float32_reach(row, emulation, exact, unquantized, got, literal)
    except Exception as exc:  # a row records any failure; the table goes on
        row.errors[stage] = first_line(exc)
        if row.exported != "yes":
            row.exported = f"{stage}: {first_line(exc)}"
        else:
            row.verdict = f"{stage}: {first_line(exc)}"
    row.seconds = time.perf_counter() - start
    return row


def build(name: str) -> torch.nn.Module:
    """torchvision's `name` with random weights and NUM_CLASSES classes, BatchNorm settled, eval mode.
    Dropout and stochastic depth get p = 0 (identities in eval anyway), so the settled statistics
    are those of the eval-mode network; a Conv/Linear torchvision initialises to zero (ViT's head)
    gets PyTorch's default initialisation instead, or every logit would be 0 whatever the input."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **BUILD_KWARGS.get(name, {}))
    for module in model.modules():
        if isinstance(module, (torch.nn.modules.dropout._DropoutNd, torchvision.ops.StochasticDepth)):
            module.p = 0.0
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not module.weight.detach().any():
            module.reset_parameters()
    return imagenet_models.settle_batchnorm(model, ZOO[name], batch_size=4)


def run_model(name: str, schemes: list[str], images: int, calibration_batches: int, batch_size: int,
              threads: int, out_dir: str, rows) -> None:
    """Every scheme on one model, each Row sent on `rows` (a Connection) as it is done (the worker's body)."""
    torch.set_num_threads(threads)
    size = ZOO[name]
    generator = np.random.default_rng(0)
    x = generator.standard_normal((images, 3, size, size), dtype=np.float32)
    batches = [torch.from_numpy(generator.standard_normal((batch_size, 3, size, size), dtype=np.float32))
               for _ in range(calibration_batches)]
    try:
        model = build(name)
    except Exception as exc:
        for scheme in schemes:
            rows.send(asdict(Row(name, scheme, size, exported=f"build: {first_line(exc)}")))
        return
    for scheme in schemes:
        spec, options = SCHEMES[scheme]
        rows.send(asdict(run_scheme(model, Row(name, scheme, size), spec, options, x, batches, Path(out_dir), threads)))


def run_in_process(name: str, schemes: list[str], budget: float, **kwargs) -> list[dict]:
    """`run_model` in a fresh process; the schemes it has not finished within `budget` seconds are rows
    that say so."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    worker = context.Process(target=run_model, args=(name, schemes), kwargs={**kwargs, "rows": writer})
    start = time.perf_counter()
    worker.start()
    writer.close()  # the worker holds the only write end: its exit ends the pipe
    rows = []
    while len(rows) < len(schemes) and reader.poll(max(0.0, budget - (time.perf_counter() - start))):
        try:
            rows.append(reader.recv())
        except EOFError:
            break
    if worker.is_alive():
        worker.terminate()
    worker.join()
    reader.close()
    elapsed = time.perf_counter() - start
    done = {row["scheme"] for row in rows}
    for scheme in schemes:
        if scheme not in done:
            reason = (f"timed out: not done within the {budget:.0f} s budget" if elapsed >= budget
                      else f"worker died (exit code {worker.exitcode})")
            rows.append(asdict(Row(name, scheme, ZOO[name], exported=reason, seconds=elapsed)))
    return sorted(rows, key=lambda r: schemes.index(r["scheme"]))


# ---- the table ------------------------------------------------------------------------------------

MAX_CELL = 150  # characters of an error in the table; --json keeps it whole


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _text(value: str | None) -> str:
    text = (value or "—").replace("|", "/")
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def format_table(rows: list[dict]) -> str:
    lines = ["| model | input | scheme | exported | float weights left | top-1 agreement | rel. logit error "
             "| tolerance policy | literal graph | effect | float32 error (torch / ORT / literal) | forced codes "
             "| agrees | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floats = None if r["float_weights"] is None else len(r["float_weights"])
        lines.append(f"| {r['model']} | {r['input_size']} | {r['scheme']} | {_text(r['exported'])} "
                     f"| {_cell(floats, 'd')} | {_cell(r['top1_agreement'], '.2f')} | {_cell(r['rel_error'], '.1e')} "
                     f"| {_text(r['verdict'])} | {_text(r.get('literal_verdict'))} | {_cell(r['effect'], '.1e')} "
                     f"| {_cell(r['float32_error'], '.0e')} / {_cell(r['runtime_error'], '.0e')} / "
                     f"{_cell(r['literal_error'], '.0e')} | {_forced(r)} | {r['agrees'] or '—'} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _forced(r: dict) -> str:
    if r["forced_agrees"] is None:
        return "—"
    return f"{'pass' if r['forced_agrees'] else 'fail'} ({r['forced_rate']:.0e})"


def torchvision_missing() -> str | None:
    """Why torchvision cannot be used here (the first line of its import error), or None."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # beside the project's CPU wheel it raises RuntimeError, not ImportError
        return first_line(exc)
    return None


@click.command()
@click.option("--model", "model_names", type=click.Choice(list(ZOO)), multiple=True,
              help="Model(s) to run (repeatable; default: the whole zoo, in its order).")
@click.option("--scheme", "scheme_names", type=click.Choice(list(SCHEMES)), multiple=True,
              help="Scheme(s) to run (repeatable; default: W4 and W8A8).")
@click.option("--images", type=click.IntRange(min=1), default=8, show_default=True,
              help="Random images the runtime and the emulation are compared on.")
@click.option("--calibration-batches", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per calibration batch.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch and ONNX Runtime intra-op threads.")
@click.option("--budget", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Seconds per model (all its schemes) before its unfinished rows say 'timed out'.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the ONNX files here (default: a temporary folder).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write results here.")
def main(model_names, scheme_names, images, calibration_batches, batch_size, threads, budget, out_dir, json_path):
    """Export torchvision's classification zoo at W4 and W8A8 and check each artifact in ONNX Runtime."""
    missing = torchvision_missing()
    if missing:
        click.echo(f"error: {TORCHVISION_MISSING.format(missing)}", err=True)
        sys.exit(2)
    names, schemes = list(model_names or ZOO), list(scheme_names or SCHEMES)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            model_rows = run_in_process(name, schemes, budget, images=images, calibration_batches=calibration_batches,
                                        batch_size=batch_size, threads=threads, out_dir=str(folder))
            for r in model_rows:
                print(f"{r['model']} {r['scheme']}: {r['exported']}, {r['seconds']:.0f} s", flush=True)
            rows += model_rows
    print()
    print(format_table(rows))
    if json_path:
        settings = {"images": images, "calibration_batches": calibration_batches, "batch_size": batch_size,
                    "threads": threads, "budget": budget, "float32_reach": FLOAT32_REACH, "torch": torch.__version__,
                    "schemes": {k: s.to_dict() for k, (s, _) in SCHEMES.items() if k in schemes}}
        Path(json_path).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
