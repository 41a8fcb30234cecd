"""Skip a stage whose inputs have not changed: records in ``<run>/stages.json``.

A record maps (stage, item) to the sha256 of its inputs (a canonical JSON of everything the output
depends on) and the outputs it produced. It is reused only while the key matches and every output
file listed still exists with the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from exporters.device.files import sha256_file, write_atomic


def input_key(**parts) -> str:
    """sha256 of the canonical JSON of a stage's inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class StageCache:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "stages.json"
        try:
            self.records = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (json.JSONDecodeError, OSError):
            self.records = {}  # a damaged cache only costs recomputation

    def get(self, stage: str, item: str, key: str) -> dict | None:
        record = self.records.get(f"{stage}/{item}")
        if not record or record.get("key") != key:
            return None
        for path, digest in record.get("files", {}).items():
            if not Path(path).is_file() or sha256_file(path) != digest:
                return None
        return record["value"]

    def put(self, stage: str, item: str, key: str, value, files: list[Path] = ()) -> None:
        self.records[f"{stage}/{item}"] = {
            "key": key, "value": value, "files": {str(p): sha256_file(p) for p in files},
        }
        write_atomic(self.path, json.dumps(self.records, indent=1))
