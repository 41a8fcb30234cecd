"""How the files hero-deploy writes are declared, and the one validator of them.

A schema is a `Record` of `Field`s; every field has one type and one meaning, stated in its
``doc``. The declarations live beside their files' device-side readers:
`exporters.device.manifest.SCHEMA` (a bundle's manifest.json) and
`exporters.device.report_schema.REPORT` (the report.json of ``hero run`` and the device report of
``validate_bundle``). Writers check what they write with `conform`, readers what they read with
`check`. The names a variant is told apart by (`IDENTITY`) and the BatchNorm and grid modes
(`BN_MODES`, `GRIDS`, `ACT_LAYOUTS`) are declared here once, for QuantSpec, the config, the reports and the
manifest alike.

Standard library only: the device reads manifests and reports without numpy or torch.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from exporters.device.bits import SUPPORTED_BITS
from exporters.device.errors import HeroError

# QuantSpec.bn and QuantSpec.grid (their meanings: exporters.quantize.QuantSpec); the first is the default.
BN_MODES = ("fold-first", "quantize-first", "keep")
GRIDS = ("canonical", "nested")
ACT_BITS = 8  # the one activation width (QuantSpec.act_bits is null or this)
ACT_LAYOUTS = ("onnxruntime", "tensorrt")  # QuantSpec.act_layout

# What tells two variants of one model apart: a report row, a manifest entry and a QuantSpec agree
# on these. A row that omits one of the last five has its default here.
IDENTITY_DEFAULTS = {"act_bits": None, "bn": BN_MODES[0], "grid": GRIDS[0], "layer_bits": None, "block_size": None}
IDENTITY = ("bits", "symmetric", "per_channel", *IDENTITY_DEFAULTS)


def identity(row: Mapping) -> dict:
    """The identity fields of a report row or manifest entry, defaults filled in."""
    return {k: row.get(k, IDENTITY_DEFAULTS.get(k)) for k in IDENTITY}


def identity_key(row: Mapping) -> tuple:
    """`identity` as a hashable key (a mixed variant's widths sorted by layer)."""
    fields = identity(row)
    layers = fields["layer_bits"]
    fields["layer_bits"] = tuple(sorted(layers.items())) if isinstance(layers, Mapping) else None
    return tuple(fields.values())


# ---- types ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Type:
    """A JSON value's type: `accepts` says whether a value is one, `expected` says what one is."""

    expected: str
    accepts: Callable[[object], bool]


@dataclass(frozen=True)
class Field:
    type: Type | Record | ListOf
    doc: str
    required: bool = False


@dataclass(frozen=True)
class Record:
    """A JSON object of declared fields. `closed`: a key not declared is refused (untrusted input)."""

    fields: dict[str, Field]
    closed: bool = True

    def replace(self, **fields: Field) -> Record:
        """This record with some fields declared otherwise."""
        return Record({**self.fields, **fields}, self.closed)


@dataclass(frozen=True)
class ListOf:
    item: Type | Record
    lo: int = 0
    hi: int = 100_000

    @property
    def expected(self) -> str:
        return f"a list of {self.lo} to {self.hi} items"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int | None = None) -> Type:
    return Type(f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}",
                lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi))


def one_of(*choices) -> Type:
    """Exactly one of `choices` (a bool is not the integer 1)."""
    return Type(" or ".join(map(repr, choices)) if len(choices) < 5 else f"one of {', '.join(map(str, choices))}",
                lambda v: any(type(v) is type(c) and v == c for c in choices))


def nullable(t: Type) -> Type:
    return Type(f"null or {t.expected}", lambda v: v is None or t.accepts(v))


def map_of(value: Type) -> Type:
    return Type(f"an object of names to {value.expected}", lambda v: isinstance(v, dict) and len(v) <= 100_000 and all(
        TEXT.accepts(k) and value.accepts(x) for k, x in v.items()))


TEXT = Type("a non-empty string", lambda v: isinstance(v, str) and 0 < len(v) <= 4096)
BOOL = Type("true or false", lambda v: isinstance(v, bool))
NUMBER = Type("a finite number", _is_real)
FRACTION = Type("a fraction in [0, 1]", lambda v: _is_real(v) and 0.0 <= v <= 1.0)
BITS = one_of(*SUPPORTED_BITS)
SHA256 = Type("64 lowercase hex digits", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None)
OBJECT = Type("an object", lambda v: isinstance(v, dict))
TEXTS = Type("a list of strings", lambda v: isinstance(v, list) and len(v) <= 100_000 and all(
    isinstance(s, str) and len(s) <= 4096 for s in v))
ANY = Type("any JSON value", lambda v: True)


# ---- the validator --------------------------------------------------------------------------------

class _Mismatch(Exception):
    pass


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _walk(value, t, path: str, label: str, closed: bool | None) -> None:
    """Raise _Mismatch at the first part of `value` that is not of type `t`; `path` names the
    part ("variants[1].bits"), `label` the variant it is in (" (w4)")."""
    if isinstance(t, Record):
        if not isinstance(value, dict):
            raise _Mismatch(f"{path or 'the file'}{label} must be an object, got {type(value).__name__}")
        if isinstance(value.get("name"), str):
            label = f" ({value['name']})"
        where = f"{path}{label} " if path else ""
        unknown = sorted(set(value) - set(t.fields)) if (t.closed if closed is None else closed) else []
        if unknown:
            raise _Mismatch(f"{where}has unknown keys {', '.join(map(repr, unknown[:5]))}")
        missing = [k for k, f in t.fields.items() if f.required and k not in value]
        if missing:
            raise _Mismatch(f"{where}lacks {', '.join(missing)}")
        for key, item in value.items():
            if key in t.fields:
                _walk(item, t.fields[key].type, f"{path}.{key}" if path else key, label, closed)
    elif isinstance(t, ListOf):
        if not isinstance(value, list) or not t.lo <= len(value) <= t.hi:
            raise _Mismatch(f"{path}{label} must be {t.expected}, got {_shown(value)}")
        for i, item in enumerate(value):
            _walk(item, t.item, f"{path}[{i}]", label, closed)
    elif not t.accepts(value):
        raise _Mismatch(f"{path}{label} must be {t.expected}, got {_shown(value)}")


def check(value, schema: Record, where: str, hint: str = "", closed: bool | None = None):
    """`value` if it is of `schema`, else a HeroError "`where`: <what is wrong>`hint`". `closed`
    True or False overrides every record's own `closed`. Returns `value`."""
    try:
        _walk(value, schema, "", "", closed)
    except _Mismatch as exc:
        raise HeroError(f"{where}: {exc}{hint}") from None
    return value


def conform(value, schema: Record, what: str):
    """`value`, which hero-deploy is about to write as `what`; not of `schema` (every key declared)
    is a bug in the writer, not bad input, so it is a ValueError."""
    try:
        _walk(value, schema, "", "", True)
    except _Mismatch as exc:
        raise ValueError(f"hero-deploy would write a {what} outside its schema: {exc}") from None
    return value
