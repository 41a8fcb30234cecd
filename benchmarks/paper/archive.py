"""Finished cells kept in the repository, so that a fresh machine continues where the last one stopped.

The driver's run folders (``runs/``) are not committed, and every session of this project starts on a
new machine: without a kept copy, each session would train the same cells again. After a cell
finishes, the driver copies its small result files into ``archive/<scale>/<cell>/`` (committed):

    cell.json  train/metrics.jsonl  validation.json  timing.json  contour.json  ptq/<scheme>/report.json
    checkpoint.json   the final checkpoint's sha256 and epochs (the reports and validation belong to it)

The checkpoint itself is not kept (1 MB for ResNet20, 9 MB for MobileNetV2, against a 2 MB
repository). A kept cell whose files cover every planned scheme counts as done on any machine; one
that lacks a scheme added later is trained again (training is deterministic per seed), then only
its PTQ runs. ``aggregate.py`` reads a cell from ``runs/`` when it is there, else from the archive.
"""

from __future__ import annotations

import json
from pathlib import Path

from exporters.device.files import sha256_file, write_atomic

ARCHIVE = Path(__file__).resolve().parent / "archive"
CELL_FILES = ("cell.json", "train/metrics.jsonl", "validation.json", "timing.json", "contour.json")
RECORD = "checkpoint.json"
TOP_FILES = ("plan.json", "step_costs.json")
INVOCATIONS = "invocations.jsonl"


def record(folder: Path) -> dict | None:
    """The kept checkpoint record of a cell folder: {"sha256", "epoch"}, or None."""
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def keep_cell(cell_dir: Path, kept_dir: Path, checkpoint: Path, epoch: int) -> list[Path]:
    """Copy a finished cell's result files (those present) and its checkpoint record; returns the
    files written. Files of an earlier copy that the cell no longer has are left alone."""
    written = []
    reports = sorted(p.relative_to(cell_dir).as_posix() for p in cell_dir.glob("ptq/*/report.json"))
    for rel in (*CELL_FILES, *reports):
        source = cell_dir / rel
        if source.is_file():
            written.append(write_atomic(kept_dir / rel, source.read_bytes()))
    written.append(write_atomic(kept_dir / RECORD, json.dumps(
        {"sha256": sha256_file(checkpoint), "epoch": epoch, "bytes": checkpoint.stat().st_size}, indent=1)))
    return written


def merged_lines(*paths: Path) -> list[str]:
    """The non-empty lines of the files, each once, in first-seen order."""
    seen: dict[str, None] = {}
    for path in paths:
        if path.is_file():
            seen.update(dict.fromkeys(line for line in path.read_text().splitlines() if line.strip()))
    return list(seen)


def keep_run(out_root: Path, kept_root: Path) -> None:
    """Copy the plan and the last step costs, and add this machine's invocation log to the kept one."""
    for name in TOP_FILES:
        if (out_root / name).is_file():
            write_atomic(kept_root / name, (out_root / name).read_bytes())
    lines = merged_lines(kept_root / INVOCATIONS, out_root / INVOCATIONS)
    if lines:
        write_atomic(kept_root / INVOCATIONS, "\n".join(lines) + "\n")


def cell_folder(name: str, out_root: Path, kept_root: Path | None) -> Path:
    """Where a cell's results are read from: its run folder once it has trained there, else its kept
    copy when there is one, else the (empty) run folder."""
    run = out_root / name
    if (run / "train" / "metrics.jsonl").is_file() or kept_root is None:
        return run
    kept = kept_root / name
    return kept if record(kept) is not None else run
