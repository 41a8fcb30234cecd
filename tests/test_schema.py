"""exporters/device/schema.py and the declarations built on it: one validator, one variant identity,
one set of mode names; the manifest and reports hero-deploy writes fit their declarations exactly."""

import json
import typing

import pytest
from bundle_helpers import built_bundle

from exporters.device import choice
from exporters.device.errors import HeroError
from exporters.device.manifest import SCHEMA as MANIFEST_SCHEMA
from exporters.device.report_schema import REPORT
from exporters.device.schema import (BITS, BN_MODES, FRACTION, GRIDS, TEXT, Field, ListOf, Record, check, conform,
                                     identity, identity_key, nullable)
from exporters.quantize import QuantSpec
from pipeline.config import QuantizeSection
from pipeline.report import build_report

ROW = Record({"name": Field(TEXT, "name", required=True), "bits": Field(nullable(BITS), "bits"),
              "accuracy": Field(FRACTION, "accuracy")})
FILE = Record({"rows": Field(ListOf(ROW, 1, 3), "rows", required=True)})


@pytest.mark.parametrize("value, message", [
    ({"rows": [{"name": "w8", "bits": 8}, {"name": "w4", "bits": "4"}]},
     "f.json: rows[1].bits (w4) must be null or one of 2, 3, 4, 5, 6, 7, 8, 16, got '4'"),
    ({"rows": [{"name": "w8", "bits": True}]}, "rows[0].bits (w8) must be"),
    ({"rows": [{"name": "w8", "accuracy": float("nan")}]}, "rows[0].accuracy (w8) must be a fraction in [0, 1]"),
    ({"rows": [{"bits": 8}]}, "f.json: rows[0] lacks name"),
    ({"rows": [{"name": "w8", "shell": "rm"}]}, "rows[0] (w8) has unknown keys 'shell'"),
    ({"rows": []}, "rows must be a list of 1 to 3 items, got []"),
    ({"rows": ["w8"]}, "rows[0] must be an object, got str"),
    ({}, "f.json: lacks rows"),
    ([], "f.json: the file must be an object, got list"),
])
def test_check_names_the_first_mismatch_and_its_variant(value, message):
    with pytest.raises(HeroError) as caught:
        check(value, FILE, "f.json", ": write it again")
    assert message in str(caught.value) and str(caught.value).endswith(": write it again")


def test_open_records_accept_undeclared_keys_but_conform_refuses_them_as_a_bug():
    report = Record({"name": Field(TEXT, "name")}, closed=False)
    assert check({"name": "r", "extra": 1}, report, "r.json") == {"name": "r", "extra": 1}
    with pytest.raises(HeroError, match="unknown keys 'extra'"):
        check({"name": "r", "extra": 1}, report, "r.json", closed=True)
    with pytest.raises(ValueError, match="would write a r.json outside its schema: has unknown keys 'extra'"):
        conform({"name": "r", "extra": 1}, report, "r.json")


def test_identity_fills_defaults_and_its_key_ignores_layer_order():
    plain = {"name": "w8", "bits": 8, "symmetric": True, "per_channel": True, "act_bits": None}
    assert identity(plain) == dict(bits=8, symmetric=True, per_channel=True, act_bits=None, bn="fold-first",
                                   grid="canonical", layer_bits=None, block_size=None)
    assert identity_key(plain) == identity_key(dict(plain, name="other", bn="fold-first"))
    assert identity_key(plain) != identity_key(dict(plain, grid="nested"))
    mixed = dict(plain, layer_bits={"a": 4, "b": 8})
    assert identity_key(mixed) == identity_key(dict(plain, layer_bits={"b": 8, "a": 4})) != identity_key(plain)


def test_quantspec_and_the_config_take_the_declared_mode_names():
    assert typing.get_args(QuantizeSection.model_fields["bn"].annotation) == BN_MODES
    assert typing.get_args(QuantizeSection.model_fields["grid"].annotation) == GRIDS
    assert (QuantSpec().bn, QuantSpec().grid) == (BN_MODES[0], GRIDS[0])
    for bn in BN_MODES:
        assert QuantSpec(bits=8, bn=bn).bn == bn
    with pytest.raises(HeroError, match="unknown bn 'fold'"):
        QuantSpec(bits=8, bn="fold")


def test_host_drops_are_measured_from_the_float_variants_runtime_accuracy():
    rows = [{"name": "fp32", "bits": None, "torch_accuracy": 0.95, "runtime_accuracy": 0.90},
            {"name": "w4", "bits": 4, "torch_accuracy": 0.80, "runtime_accuracy": 0.85}]
    report = build_report(rows, {})
    assert report["baseline"]["reference_accuracy"] == 0.90
    assert report["variants"][0]["drop"] == pytest.approx(0.05)
    assert report["variants"][0]["drop_points"] == pytest.approx(5.0)


def test_a_bundles_manifest_and_host_report_fit_their_declarations_exactly(tmp_path_factory):
    bundle = built_bundle(tmp_path_factory)["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    check(manifest, MANIFEST_SCHEMA, "manifest.json", closed=True)
    host = json.loads((bundle / "host_report.json").read_text())
    check(host, REPORT, "host_report.json", closed=True)
    for entry, row in zip(manifest["variants"], [host["baseline"], *host["variants"]]):
        assert identity(row) == identity(entry) and row["name"] == entry["name"]
    assert host["meta"]["role"] == "host"


def test_every_number_select_reads_is_a_declared_report_field():
    for path in (choice.ACCURACY, choice.LATENCY, choice.MEMORY):
        assert path[0] in REPORT.fields["variants"].type.item.fields
