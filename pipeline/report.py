"""report.json, report.md and accuracy_vs_bits.png in the run directory.

report.json's schema, every field's meaning included, is `exporters.device.report_schema.REPORT`
(the device report of validate_bundle shares it); `build_report` and `write_report` write it
against that declaration.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from exporters.device.files import write_atomic  # noqa: E402
from exporters.device.report_schema import REPORT, with_drops  # noqa: E402
from exporters.device.schema import conform  # noqa: E402


def build_report(rows: list[dict], meta: dict) -> dict:
    """Split the baseline row from the variants and add each variant's drop from the baseline, both
    measured by the runtime on the same samples (`REPORT`'s reference_accuracy)."""
    baseline, variants = with_drops(next(r for r in rows if r["bits"] is None), [r for r in rows if r["bits"] is not None])
    return {"meta": meta, "baseline": baseline, "variants": variants,
            "gate": {"passed": True, "gated": True, "reasons": [], "note": None}}


def gate_verdict(gate: dict) -> str:
    """PASSED, FAILED, or NOT GATED (passed with no accuracy threshold set)."""
    if not gate["passed"]:
        return "FAILED"
    return "PASSED" if gate.get("gated", True) else "NOT GATED"


def markdown_table(report: dict) -> str:
    """One row per variant; a "canonical acc" column when a variant is on the nested grid (the
    canonical grid's emulation accuracy at the same widths: the price of switching by refit)."""
    rows = [dict(report["baseline"], name="fp32", drop_points=0.0)] + report["variants"]
    nested = any("canonical_torch_accuracy" in r for r in rows)
    head = ("| variant | bits | runtime acc | torch acc |" + (" canonical acc |" if nested else "") +
            " drop (pts) | agree | latency ms | file KiB | weights KiB |\n|---|---|---|---|" + ("---|" if nested else "")
            + "---|---|---|---|---|")
    lines = [head]
    for r in rows:
        bits = "fp" if r["bits"] is None else (f"≤{r['bits']} (avg {r['average_bits']:.2f})" if r.get("layer_bits")
                                               else r["bits"])
        canonical = r.get("canonical_torch_accuracy")
        extra = (f" {100 * canonical:.2f}% |" if canonical is not None else " — |") if nested else ""
        lines.append(
            f"| {r['name']} | {bits} | {100 * r['runtime_accuracy']:.2f}% | {100 * r['torch_accuracy']:.2f}% |{extra} "
            f"{r['drop_points']:+.2f} | {r['agreement']:.4f}{'' if r['consistent'] else ' ✗'} | "
            f"{r['latency_ms']:.2f} | {r['file_bytes'] / 1024:.0f} | {r['packed_weight_bytes'] / 1024:.0f} |")
    return "\n".join(lines)


def plot_accuracy_vs_bits(series: dict[str, list[tuple[int, float]]], baselines: dict[str, float],
                          path: Path, title: str = "Post-training quantization") -> Path:
    """The paper's Figure 1 view: test accuracy (%) against weight precision, one line per model."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, points in series.items():
        points = sorted(points)
        line, = ax.plot([b for b, _ in points], [100 * a for _, a in points], marker="o", label=label)
        if label in baselines:
            ax.axhline(100 * baselines[label], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("weight bits")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="dashed: full precision", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def write_report(report: dict, run_dir: Path, label: str) -> None:
    write_atomic(run_dir / "report.json", json.dumps(conform(report, REPORT, "report.json"), indent=2))
    gate = report["gate"]
    reasons = "".join(f"\n- {r}" for r in gate["reasons"]) + (f"\n\n{gate['note']}" if gate.get("note") else "")
    write_atomic(run_dir / "report.md",
                 f"# {label}\n\n{markdown_table(report)}\n\nGate: **{gate_verdict(gate)}**{reasons}\n")
    points = [(v["average_bits"] if v.get("layer_bits") else v["bits"], v["runtime_accuracy"])
              for v in report["variants"] if v["bits"] <= 8]
    plot_accuracy_vs_bits({label: points}, {label: report["baseline"]["reference_accuracy"]},
                          run_dir / "accuracy_vs_bits.png")
