"""The metadata_props of an ONNX file, read without onnx and without building a runtime session.

ONNX files are protocol buffers (onnx/onnx.proto): ModelProto field 14 holds the repeated
`metadata_props` (StringStringEntryProto: key = field 1, value = field 2). Top-level fields are
walked by their wire format (protobuf encoding: varint tags, length-delimited payloads skipped by
seeking), so the graph's weights are never read: the runner decides how to build its one session
from the metadata first. Standard library only: this runs on the device.
"""

from __future__ import annotations

import io
from pathlib import Path

_METADATA_PROPS = 14
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(read) -> int | None:
    """The next varint; None at the end of the file, ValueError where it ends inside one."""
    value, shift = 0, 0
    while True:
        byte = read(1)
        if not byte:
            if shift:
                raise ValueError("truncated varint")
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def _entry(payload: bytes) -> tuple[str, str]:
    """(key, value) of one StringStringEntryProto."""
    fields, read = {}, io.BytesIO(payload).read
    while (tag := _varint(read)) is not None:
        length = _varint(read)
        fields[tag >> 3] = read(length or 0).decode("utf-8", "replace")
    return fields.get(1, ""), fields.get(2, "")


def read_metadata(path) -> dict[str, str] | None:
    """{key: value} of the model's metadata_props, or None where the file is not a well-formed
    protobuf (the runtime then says what is wrong with it)."""
    props = {}
    try:
        with Path(path).open("rb") as fh:
            while (tag := _varint(fh.read)) is not None:
                field, wire = tag >> 3, tag & 7
                if wire == _VARINT:
                    if _varint(fh.read) is None:
                        return None  # a tag with no value
                elif wire == _FIXED64 or wire == _FIXED32:
                    fh.seek(8 if wire == _FIXED64 else 4, 1)
                elif wire == _LENGTH:
                    length = _varint(fh.read)
                    if length is None:
                        return None
                    if field == _METADATA_PROPS:
                        payload = fh.read(length)
                        if len(payload) != length:
                            return None
                        key, value = _entry(payload)
                        props[key] = value
                    else:
                        fh.seek(length, 1)
                else:
                    return None
    except (OSError, IndexError, ValueError):
        return None
    return props
