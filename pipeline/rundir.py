"""A run folder holds one run: what `hero run` checks before it starts and tidies after it ends.

A finished run (``report.json``) records what it was run from, ``meta.run_inputs``: the whole
config as loaded (command-line overrides included) and the sha256 of the checkpoint given with
``--checkpoint`` (null when the run trained its own). A new run into that folder:

- with the same inputs reuses every stage, as before; the gate section is not an input (it
  produces nothing: a rerun with other thresholds re-gates the same artifacts);
- with other inputs is refused, naming the config keys (``quantize.bits``) or the checkpoint that
  differ, unless ``--overwrite``: then the earlier run's report, artifacts, bundle and stage
  records are removed first (its training folder too when the train section differs);
- a report that records no inputs (written by an older version) counts as another run.

After a run, files in ``artifacts/`` that it did not produce (variants no longer asked for) are
removed, and so is a bundle when the config no longer asks for one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from exporters.device.errors import HeroError
from exporters.device.files import read_json, sha256_file

REPORT = "report.json"
# What a run writes at the top of its folder, besides artifacts/, bundle/ and train/.
_RUN_FILES = ("report.json", "report.md", "accuracy_vs_bits.png", "stages.json")


def run_inputs(config, checkpoint: Path | None) -> dict:
    """What a run is of: the loaded config and the given checkpoint's sha256 (None: trained here)."""
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise HeroError(f"--checkpoint {checkpoint}: no such file")
    return {"config": config.model_dump(mode="json", exclude={"gate"}),
            "checkpoint_sha256": sha256_file(checkpoint) if checkpoint is not None else None}


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(old: dict, new: dict) -> list[str]:
    """The config keys (dotted) and 'checkpoint' where two run_inputs differ."""
    a, b = _flat(old.get("config") or {}), _flat(new.get("config") or {})
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    if old.get("checkpoint_sha256") != new.get("checkpoint_sha256"):
        keys.append("checkpoint")
    return keys


def _recorded_inputs(run_dir: Path) -> dict | None:
    report = read_json(run_dir / REPORT, "the finished run's report", "",
                       ": delete it, or pass --overwrite to replace the run")
    meta = report.get("meta") if isinstance(report, dict) else None
    inputs = meta.get("run_inputs") if isinstance(meta, dict) else None
    return inputs if isinstance(inputs, dict) else None


def claim(run_dir: Path, inputs: dict, overwrite: bool) -> None:
    """Refuse (or, with overwrite, clear) a run folder holding a finished run of other inputs."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise HeroError(f"--out {run_dir} is a file, not a folder")
    if not (run_dir / REPORT).is_file():
        return
    recorded = _recorded_inputs(run_dir)
    if recorded == inputs:
        return
    differ = differences(recorded, inputs) if recorded is not None else ["(the report records no inputs)"]
    if not overwrite:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise HeroError(f"{run_dir} holds a finished run of other inputs (differs in {shown}): "
                        "choose another --out, or pass --overwrite to replace it")
    retrain = recorded is None or any(k.startswith("train.") or k == "train" for k in differ)
    for name in _RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder in ("artifacts", "bundle") + (("train",) if retrain else ()):
        if (run_dir / folder).is_dir():
            shutil.rmtree(run_dir / folder)


def prune(run_dir: Path, produced: list[Path], bundled: bool) -> list[Path]:
    """Remove what this run did not produce from artifacts/ (and bundle/ when no bundle was
    asked for); returns the removed paths."""
    run_dir, keep = Path(run_dir), {Path(p).resolve() for p in produced}
    removed = []
    folder = run_dir / "artifacts"
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.resolve() not in keep:
                path.unlink()
                removed.append(path)
    if not bundled and (run_dir / "bundle").is_dir():
        shutil.rmtree(run_dir / "bundle")
        removed.append(run_dir / "bundle")
    return removed
