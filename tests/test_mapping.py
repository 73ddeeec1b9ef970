"""Mapping rows to Add-contacts records: transforms, NULLs, rejection and the payload digest."""

from __future__ import annotations

import pickle
import random
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson
import phonenumbers
import pytest

from syncd.config import ConfigError, FieldSpec, SyncConfig
from syncd.mapping import RowRejected, compile_mapping, digest_encoded, map_rows, payload_digest


def field(**spec: Any) -> dict[str, FieldSpec]:
    return {"out": FieldSpec(**spec)}


def map_one(value: Any, **spec: Any) -> dict[str, Any]:
    """Map a one-column row holding `value` through one attribute called "out"."""
    spec.setdefault("column", "c")
    return compile_mapping(field(**spec), ["c"])((value,))


def rejected(value: Any, **spec: Any) -> RowRejected:
    with pytest.raises(RowRejected) as info:
        map_one(value, **spec)
    return info.value


# --- a whole sync ---------------------------------------------------------------------------


def sync_config() -> SyncConfig:
    return SyncConfig.model_validate(
        {
            "name": "contacts",
            "source": "crm",
            "table": "contacts",
            "key": "id",
            "watermark": "updated_at",
            "datastore_id": "1466",
            "feed_id": "1499",
            "fields": {
                "msisdn": {"column": "phone", "transform": "e164", "required": True},
                "firstname": "first_name",
                "emailid": {"column": "email", "transform": ["strip", "lower"]},
                "accountid": "account_id",
                "fullname": {"template": "{first_name} {last_name}"},
                "source": {"value": "crm"},
                "country": {"column": "country", "default": "us", "transform": "upper"},
            },
        }
    )


def test_maps_rows_of_a_configured_sync():
    config = sync_config()
    mapping = compile_mapping(config.fields, config.columns)
    assert mapping.columns == (
        "id", "updated_at", "phone", "first_name", "email", "account_id", "last_name", "country",
    )  # fmt: skip
    row = (7, datetime(2024, 5, 1), "+1 415-555-2671", "Ada", " Ada@Example.COM ", 42, "Lovelace", None)

    assert mapping(row) == {
        "msisdn": "+14155552671",
        "firstname": "Ada",
        "emailid": "ada@example.com",
        "accountid": 42,
        "fullname": "Ada Lovelace",
        "source": "crm",
        "country": "US",
    }


def test_map_rows_encodes_digests_and_sets_bad_rows_aside():
    config = sync_config()
    mapping = compile_mapping(config.fields, config.columns)
    good = (7, datetime(2024, 5, 1), "+1 415-555-2671", "Ada", "ada@example.com", 42, "Lovelace", None)
    bad = (8, datetime(2024, 5, 1), "not a phone", "Bob", "bob@example.com", 43, "B", None)
    target = b"datastore 1466, feed 1499"

    mapped = map_rows([good, bad], mapping, target=target, source_hash=lambda row: bytes([row[0]]))

    assert mapped.keys == ["7"]  # keys as the state database keeps them: text
    assert orjson.loads(mapped.encoded[0]) == mapping(good)
    assert mapped.digests == [digest_encoded(mapped.encoded[0], target)]
    assert mapped.digests != [digest_encoded(mapped.encoded[0], b"another datastore")]
    assert mapped.sources == [b"\x07"]
    ((key, reason, row),) = mapped.rejected
    assert key == "8" and reason.startswith("msisdn: 'not a phone' is not a valid phone number")
    assert row["phone"] == "not a phone" and row["first_name"] == "Bob"
    assert pickle.loads(pickle.dumps(mapped)) == mapped  # it crosses from the offload child


def test_null_attributes_are_left_out_of_the_record():
    config = sync_config()
    mapping = compile_mapping(config.fields, config.columns)
    row = (7, None, "+442079460958", None, None, None, None, "gb")

    assert mapping(row) == {"msisdn": "+442079460958", "source": "crm", "country": "GB"}


def test_a_bad_row_is_rejected_naming_the_attribute_and_the_value():
    config = sync_config()
    mapping = compile_mapping(config.fields, config.columns)

    with pytest.raises(RowRejected) as info:
        mapping((7, None, "12", "Ada", None, None, None, None))

    assert info.value.attribute == "msisdn"
    assert info.value.reason.startswith("'12' is not a valid phone number")
    assert str(info.value).startswith("msisdn: '12' is not a valid phone number")


def test_row_rejected_survives_pickling_for_worker_processes():
    error = pickle.loads(pickle.dumps(RowRejected("msisdn", "required value is empty")))
    assert (error.attribute, error.reason, str(error)) == (
        "msisdn", "required value is empty", "msisdn: required value is empty",
    )  # fmt: skip


# --- origins, default, required -------------------------------------------------------------


def test_column_value_passes_through():
    assert map_one("Ada") == {"out": "Ada"}


def test_constant_is_sent_for_every_row():
    mapping = compile_mapping({"src": FieldSpec(value="crm"), "n": FieldSpec(value=3)}, ["c"])
    assert mapping(("x",)) == {"src": "crm", "n": 3}


def test_constant_goes_through_transforms_once():
    assert compile_mapping(field(value=" VIP ", transform=["strip", "lower"]), [])(()) == {"out": "vip"}


def test_template_renders_named_columns():
    mapping = compile_mapping(field(template="{first} {last} <{id}>"), ["id", "first", "last"])
    assert mapping((5, "Ada", "Lovelace")) == {"out": "Ada Lovelace <5>"}


def test_template_renders_null_as_empty_and_strips():
    mapping = compile_mapping(field(template="{first} {last}"), ["first", "last"])
    assert mapping((None, "Lovelace")) == {"out": "Lovelace"}
    assert mapping(("Ada", None)) == {"out": "Ada"}


def test_template_of_only_nulls_is_null():
    mapping = compile_mapping(field(template="{first} {last}", default="friend"), ["first", "last"])
    assert mapping((None, None)) == {"out": "friend"}
    assert compile_mapping(field(template="{first} {last}"), ["first", "last"])((None, None)) == {}


def test_template_keeps_literal_braces_and_format_specs():
    mapping = compile_mapping(field(template="{{{id:05d}}} {amount:.2f} {on}"), ["id", "amount", "on"])
    assert mapping((42, Decimal("3.5"), True)) == {"out": "{00042} 3.50 true"}


def test_template_then_transform():
    mapping = compile_mapping(field(template="{first}.{last}@example.com", transform="lower"), ["first", "last"])
    assert mapping(("Ada", "Lovelace")) == {"out": "ada.lovelace@example.com"}


def test_default_replaces_null():
    assert map_one(None, default="unknown") == {"out": "unknown"}
    assert map_one("known", default="unknown") == {"out": "known"}


def test_default_goes_through_transforms():
    assert map_one(None, default=" 42 ", transform="int") == {"out": 42}


def test_required_rejects_null_and_empty():
    assert rejected(None, required=True).reason == "required value is empty"
    assert rejected("   ", required=True, transform="strip").reason == "required value is empty"
    assert map_one(0, required=True) == {"out": 0}


def test_required_is_satisfied_by_default():
    assert map_one(None, required=True, default="n/a") == {"out": "n/a"}


def test_empty_string_is_sent_when_not_required():
    assert map_one("") == {"out": ""}


# --- transforms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "transform", "expected"),
    [
        ("  Ada  ", "strip", "Ada"),
        ("Ada@Example.COM", "lower", "ada@example.com"),
        ("gb", "upper", "GB"),
        (42, "str", "42"),
        (True, "str", "true"),
        (Decimal("10.50"), "str", "10.50"),
        (date(2024, 5, 1), "str", "2024-05-01"),
        (uuid.UUID(int=1), "upper", "00000000-0000-0000-0000-000000000001"),
        (12, "lower", "12"),
        ("42", "int", 42),
        (" -7 ", "int", -7),
        ("42.0", "int", 42),
        (42.0, "int", 42),
        (Decimal("42"), "int", 42),
        (True, "int", 1),
        ("  MiXeD  ", ["strip", "upper"], "MIXED"),
        (" 42 ", ["int", "str"], "42"),
        (" 0042 ", ["strip", "int"], 42),
    ],
)
def test_transform(value: Any, transform: Any, expected: Any):
    assert map_one(value, transform=transform) == {"out": expected}


@pytest.mark.parametrize("value", ["4.5", "abc", "", 4.5, float("nan"), float("inf"), Decimal("NaN"), date(2024, 1, 1)])
def test_int_rejects_non_integers(value: Any):
    assert rejected(value, transform="int").reason == f"{str(value)!r} is not an integer"


def test_a_failing_step_in_a_chain_rejects_the_row():
    assert rejected(" 4.5 ", transform=["strip", "int"]).reason == "'4.5' is not an integer"


# --- e164 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("+14155552671", "+14155552671"),
        ("+1 (415) 555-2671", "+14155552671"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+44 (0) 20 7946 0958", "+442079460958"),  # the library drops the trunk 0
        ("+33 6 12 34 56 78", "+33612345678"),
        ("+49 151 23456789", "+4915123456789"),
        (" +14155552671 ", "+14155552671"),
    ],
)
def test_e164_of_international_numbers(value: str, expected: str):
    assert map_one(value, transform="e164") == {"out": expected}


def test_e164_with_region_reads_national_numbers():
    assert map_one("(415) 555-2671", transform="e164", region="US") == {"out": "+14155552671"}
    assert map_one("020 7946 0958", transform="e164", region="gb") == {"out": "+442079460958"}
    assert map_one(4155552671, transform="e164", region="US") == {"out": "+14155552671"}
    assert map_one("+33612345678", transform="e164", region="US") == {"out": "+33612345678"}


def test_e164_without_region_needs_a_country_code():
    error = rejected("(415) 555-2671", transform="e164")
    assert error.attribute == "out"
    assert error.reason == (
        "'(415) 555-2671' is not a valid phone number; "
        "it has no +country code and the field sets no region"
    )


@pytest.mark.parametrize("value", ["12", "+1 415 555 267", "+1 123 555 2671", "+999 1234567", "not a phone", "+"])
def test_e164_rejects_invalid_numbers(value: str):
    assert rejected(value, transform="e164", region="US").reason == f"{value!r} is not a valid phone number"


def test_e164_unknown_region_is_a_config_error():
    with pytest.raises(ConfigError, match="fields.out.region: 'XX' is not a region code"):
        compile_mapping(field(column="c", transform="e164", region="XX"), ["c"])


def test_e164_fast_path_agrees_with_phonenumbers():
    """The precompiled "+digits" path may only accept what the library accepts, unchanged.

    Every region's example numbers, and near misses of them, against parse + is_valid_number.
    """
    from phonenumbers import PhoneMetadata

    from syncd.mapping import _fast_e164

    rng = random.Random(7)
    kinds = ("fixed_line", "mobile", "toll_free", "premium_rate", "shared_cost", "voip", "personal_number", "uan")
    cases = set()
    for code, regions in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items():
        for region in regions:
            metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
            for kind in kinds:
                example = (getattr(metadata, kind, None) and getattr(metadata, kind).example_number) or ""
                if example:
                    changed = example[:-1] + str(rng.randint(0, 9))
                    for national in (example, example[:-1], example + "5", "0" + example, changed):
                        cases.add(f"+{code}{national}")
    accepted = 0
    for text in sorted(cases):
        fast = _fast_e164(text)
        if fast is None:
            continue
        accepted += 1
        number = phonenumbers.parse(text, None)
        assert phonenumbers.is_valid_number(number), text
        assert fast == phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), text
    assert accepted > len(cases) / 4  # the fast path is actually taken


# --- date / datetime ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (date(2024, 5, 1), "2024-05-01"),
        (datetime(2024, 5, 1, 23, 30), "2024-05-01"),
        ("2024-05-01", "2024-05-01"),
        ("20240501", "2024-05-01"),
        ("2024-05-01T23:30:00+02:00", "2024-05-01"),
    ],
)
def test_date(value: Any, expected: str):
    assert map_one(value, transform="date") == {"out": expected}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2024, 5, 1, 23, 30, 5), "2024-05-01T23:30:05"),
        (datetime(2024, 5, 1, 23, 30, tzinfo=UTC), "2024-05-01T23:30:00+00:00"),
        (date(2024, 5, 1), "2024-05-01T00:00:00"),
        ("2024-05-01 23:30:05", "2024-05-01T23:30:05"),
        ("2024-05-01T23:30:05Z", "2024-05-01T23:30:05+00:00"),
    ],
)
def test_datetime(value: Any, expected: str):
    assert map_one(value, transform="datetime") == {"out": expected}


def test_date_and_datetime_with_format():
    assert map_one(datetime(2024, 5, 1, 9, 5), transform="date", format="%d/%m/%Y") == {"out": "01/05/2024"}
    assert map_one("2024-05-01T09:05:00", transform="datetime", format="%Y%m%d %H%M") == {"out": "20240501 0905"}


@pytest.mark.parametrize("transform", ["date", "datetime"])
def test_unparseable_dates_are_rejected(transform: str):
    assert rejected("01/05/2024", transform=transform).reason == "'01/05/2024' is not an ISO 8601 date or datetime"
    assert rejected(20240501, transform=transform).reason.startswith("expected a date")


# --- JSON-friendly values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("10.50"), "10.50"),
        (Decimal("1E+2"), "100"),
        (datetime(2024, 5, 1, 9, 5, tzinfo=UTC), "2024-05-01T09:05:00+00:00"),
        (date(2024, 5, 1), "2024-05-01"),
        (time(9, 5), "09:05:00"),
        (uuid.UUID(int=255), "00000000-0000-0000-0000-0000000000ff"),
        (True, True),
        (7, 7),
        (1.5, 1.5),
        ("x", "x"),
    ],
)
def test_values_are_json_friendly(value: Any, expected: Any):
    assert map_one(value) == {"out": expected}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\x00\x01", "a binary value (bytes) has no text form; select a text column or cast it in the source"),
        (memoryview(b"ab"), "a binary value (memoryview) has no text form; select a text column or cast it in the source"),
        (float("nan"), "nan is not a number JSON can carry"),
        (Decimal("Infinity"), "Infinity is not a number JSON can carry"),
        ({"a": 1}, "a dict value has no flat JSON form"),
        (timedelta(1), "a timedelta value has no flat JSON form"),
    ],
)
def test_values_without_a_json_form_are_rejected(value: Any, reason: str):
    assert rejected(value).reason == reason


def test_subclasses_of_plain_types_become_plain_values():
    import enum

    class Tier(str, enum.Enum):
        GOLD = "gold"

    class Count(enum.IntEnum):
        THREE = 3

    assert map_one(Tier.GOLD) == {"out": "gold"}
    assert map_one(Count.THREE) == {"out": 3}


def test_unexpected_errors_still_reject_the_row():
    mapping = compile_mapping({"a": FieldSpec(column="c"), "b": FieldSpec(column="d")}, ["c", "d"])
    with pytest.raises(RowRejected) as info:
        mapping(("only one column",))
    assert info.value.attribute == "b"
    assert info.value.reason.startswith("IndexError")


# --- config errors at compile time ----------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"column": "missing"}, "fields.out: column 'missing' is not among the columns read"),
        ({"template": "{c} {missing}"}, "fields.out: column 'missing' is not among the columns read"),
        ({"column": "c", "default": "x", "transform": "int"}, "fields.out.default: 'x' is not an integer"),
        ({"value": "", "required": True}, "fields.out: required, but its value is empty"),
    ],
)
def test_config_errors_are_found_when_compiling(spec: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as info:
        compile_mapping(field(**spec), ["c"])
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("template", ["{c.attr}", "{}", "{c", "no fields at all"])
def test_malformed_templates_are_refused_when_the_config_loads(template: str):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="template"):
        FieldSpec(template=template)


# --- payload digest -------------------------------------------------------------------------


def test_digest_ignores_key_order():
    assert payload_digest({"a": 1, "b": "x"}) == payload_digest({"b": "x", "a": 1})


def test_digest_is_16_bytes_and_fixed_across_processes():
    digest = payload_digest({"msisdn": "+14155552671", "firstname": "Ada"})
    assert len(digest) == 16
    # A constant, so a change of serialisation (which would resend every row) fails here.
    assert digest.hex() == "0a396b89f41322be3c1e308dc3252eaa"


@pytest.mark.parametrize(
    "changed",
    [
        {"a": "1", "b": "x"},  # type
        {"a": 2, "b": "x"},  # value
        {"a": 1, "b": "x", "c": None},  # an extra key
        {"a": 1},  # a missing key
        {"a": 1, "B": "x"},  # a key's name
    ],
)
def test_digest_changes_with_the_payload(changed: dict[str, Any]):
    assert payload_digest(changed) != payload_digest({"a": 1, "b": "x"})
