"""File helpers shared by host and device code (stdlib only): checksums and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from exporters.device.errors import HeroError


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_dirs(path: str | os.PathLike) -> Path:
    """Create `path` and its missing parents as 0755 folders (before the umask), so a run or a
    bundle copied to a device can be read by another user."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            raise HeroError(f"{folder} is a file, not a folder: choose another output folder")
    path.mkdir(parents=True, exist_ok=True, mode=0o755)
    return path


def write_atomic(path: str | os.PathLike, data: bytes | str | memoryview, mode: int = 0o644) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so readers
    never see half a file; the file gets `mode` (mkstemp's own 0600 would make a shared artifact
    unreadable to other users). Missing parent folders are created 0755."""
    path = Path(path)
    if path.is_dir():
        raise HeroError(f"{path} is a folder: name the file to write")
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not land before the data does (power loss)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_json(path: str | os.PathLike, what: str, missing_hint: str, broken_hint: str = ""):
    """Parse a JSON file; a missing or broken one is a HeroError whose message says what to do."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HeroError(f"{what} {path} does not exist{missing_hint}") from None
    except (ValueError, OSError) as exc:  # ValueError: bad JSON, bad UTF-8, an integer too long to convert
        raise HeroError(f"{what} {path} is not valid JSON ({exc}){broken_hint}") from None
    except RecursionError:  # json recurses once per nesting level
        raise HeroError(f"{what} {path} nests too deeply to be a {what}{broken_hint}") from None
