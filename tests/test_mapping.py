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

from syncd.config import SyncConfig
from syncd.fields import FieldSpec
from syncd.mapping import FieldError, RowRejected, compile_mapping, encode_payload, map_rows, payload_digester


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
    assert mapped.digests == [payload_digester(target)(mapped.encoded[0])]
    assert mapped.digests != [payload_digester(b"another datastore")(mapped.encoded[0])]
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


@pytest.mark.parametrize("blank", ["", "   ", "\t\n", "\u00a0"])
def test_blank_strings_are_missing(blank: str):
    """A CRM's '' never blanks an attribute: it is left out, like NULL, before any transform."""
    assert map_one(blank) == {}
    assert map_one(blank, transform="e164") == {}  # not "not a valid phone number"
    assert map_one(blank, transform="int") == {}
    assert map_one(blank, default="friend") == {"out": "friend"}
    assert map_one(blank, default="us", transform="upper") == {"out": "US"}
    assert rejected(blank, required=True).reason == "required value is empty"
    assert map_one(blank, required=True, default="n/a") == {"out": "n/a"}


@pytest.mark.parametrize("transform", ["e164", "email", "int", "first_name", "upper"])
def test_a_blank_default_clears_the_attribute_whatever_the_transforms(transform: str):
    assert map_one(None, transform=transform, default="") == {"out": ""}
    assert map_one("  ", transform=transform, default="") == {"out": ""}


def test_blank_str_subclasses_are_missing_too():
    class Text(str):
        pass

    assert map_one(Text("  ")) == {}
    assert map_one(Text(" "), transform="upper", default="x") == {"out": "X"}
    assert map_one(Text("ok")) == {"out": "ok"}


def test_strings_with_text_are_not_blank():
    assert map_one(" x ") == {"out": " x "}
    assert map_one(0) == {"out": 0}
    assert map_one(False) == {"out": False}


def test_blank_template_parts_are_missing():
    mapping = compile_mapping(field(template="{first}.{last}@example.com"), ["first", "last"])
    assert mapping(("", "  ")) == {}  # not ".@example.com"
    assert mapping((None, "")) == {}
    assert mapping(("ada", "")) == {"out": "ada.@example.com"}
    names = compile_mapping(field(template="{first} {last}", required=True), ["first", "last"])
    assert names(("", "Lovelace")) == {"out": "Lovelace"}
    with pytest.raises(RowRejected, match="required value is empty"):
        names((" ", ""))


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


@pytest.mark.parametrize("value", ["4.5", "abc", 4.5, float("nan"), float("inf"), Decimal("NaN"), date(2024, 1, 1)])
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
    where = "" if value.startswith("+") else " in region US"
    assert rejected(value, transform="e164", region="US").reason == f"{value!r} is not a valid phone number{where}"


def test_e164_unknown_region_is_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'XX' is not a region code"):
        FieldSpec(column="c", transform="e164", region="XX")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("+49 170 2345678 ext. 12", "'+49 170 2345678 ext. 12' has an extension"),
        ("030 1234567 x12", "'030 1234567 x12' has an extension"),
        ("tel:+49-30-1234567;ext=12", "'tel:+49-30-1234567;ext=12' has an extension"),
        ("+44 20 7946 0958 extension 5", "'+44 20 7946 0958 extension 5' has an extension"),
    ],
)
def test_e164_refuses_numbers_with_an_extension(value: str, reason: str):
    assert rejected(value, transform="e164", region="DE").reason.startswith(reason)


def test_e164_fixed_region_reads_german_mobiles_as_british_landlines():
    """The issue's symptom, kept as the documented price of a fixed region: the digits of a
    German mobile are also a Southend landline. A per-row region (below) is the fix."""
    assert map_one("0170 2345678", transform="e164", region="GB") == {"out": "+441702345678"}


def country_mapping(**spec: Any):
    """An e164 field "out" over columns (phone, country), region taken from the row."""
    spec = {"column": "phone", "transform": "e164", "region": "{country}", **spec}
    fields = {"out": FieldSpec(**spec)}
    assert fields["out"].columns == ("phone", "country")  # the source reads the country too
    return compile_mapping(fields, ["phone", "country"])


@pytest.mark.parametrize(
    "country", ["DE", "de", "DEU", "deu", "276", "Germany", "GERMANY", " germany ", "Federal Republic of Germany"]
)
def test_e164_region_from_the_rows_country(country: str):
    mapping = country_mapping()
    assert mapping(("0170 2345678", country)) == {"out": "+491702345678"}
    assert mapping(("030 1234567", country)) == {"out": "+49301234567"}


def test_e164_german_numbers_in_german_and_british_rows():
    mapping = country_mapping()
    assert mapping(("0170 2345678", "Germany")) == {"out": "+491702345678"}
    assert mapping(("0170 2345678", "United Kingdom")) == {"out": "+441702345678"}  # it is a UK number too
    assert mapping(("0171 2345678", "DE")) == {"out": "+491712345678"}
    with pytest.raises(RowRejected, match=r"'0171 2345678' is not a valid phone number in region GB"):
        mapping(("0171 2345678", "GB"))
    # an explicit +country code wins over the row's country: a German contact's UK mobile
    assert mapping(("+44 7400 123456", "DE")) == {"out": "+447400123456"}


@pytest.mark.parametrize(("country", "region"), [("United States", "US"), ("USA", "US"), ("South Korea", "KR"), ("XK", "XK")])
def test_e164_country_names_and_codes(country: str, region: str):
    example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.FIXED_LINE)
    national = phonenumbers.national_significant_number(example)
    expected = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
    assert country_mapping()((national, country)) == {"out": expected}


@pytest.mark.parametrize("country", ["Deutschland", "UK", "Germny", "Europe"])
def test_e164_unknown_country_is_a_dead_letter_naming_it(country: str):
    with pytest.raises(RowRejected) as info:
        country_mapping()(("+49 170 2345678", country))
    assert info.value.attribute == "out"
    assert info.value.reason == f"the contact's country {country!r} is not a country code or name we know"


def test_e164_country_without_a_numbering_plan():
    with pytest.raises(RowRejected, match="'Antarctica' has no phone numbering plan"):
        country_mapping()(("+49 170 2345678", "Antarctica"))


@pytest.mark.parametrize("blank", [None, "", "  "])
def test_e164_blank_country_uses_default_region(blank: Any):
    assert country_mapping(default_region="DE")(("0170 2345678", blank)) == {"out": "+491702345678"}
    with pytest.raises(RowRejected, match="not a valid phone number in region GB"):
        country_mapping(default_region="GB")(("0171 2345678", blank))
    assert country_mapping()(("+49 170 2345678", blank)) == {"out": "+491702345678"}
    with pytest.raises(RowRejected) as info:
        country_mapping()(("0170 2345678", blank))
    assert info.value.reason == (
        "'0170 2345678' is not a valid phone number; it has no +country code and the contact's country is blank"
    )


def test_e164_row_country_overrides_default_region():
    """A London number in a German contact's row is not read as British because the default
    region is GB: the row says Germany, where it is not a number, so the row is refused."""
    mapping = country_mapping(default_region="GB")
    assert mapping(("020 7946 0958", "")) == {"out": "+442079460958"}
    with pytest.raises(RowRejected, match="'020 7946 0958' is not a valid phone number in region DE"):
        mapping(("020 7946 0958", "Germany"))


def test_e164_per_row_region_with_required_default_and_blank_phone():
    mapping = country_mapping(required=True)
    with pytest.raises(RowRejected, match="required value is empty"):
        mapping(("", "DE"))
    assert country_mapping(default="+49 30 1234567")(("", "Nowhere")) == {"out": "+49301234567"}


def test_e164_mobile_only():
    mobile = {"transform": "e164", "region": "DE", "mobile_only": True}
    assert map_one("0170 2345678", **mobile) == {"out": "+491702345678"}
    assert map_one("+49 1512 3456789", **mobile) == {"out": "+4915123456789"}
    assert rejected("030 1234567", **mobile).reason == "'030 1234567' is not a mobile number (a fixed-line number)"
    assert rejected("+49 30 1234567", **mobile).reason == "'+49 30 1234567' is not a mobile number (a fixed-line number)"
    assert rejected("0800 1234567", **mobile).reason.endswith("(a toll-free number)")
    # where the plan cannot tell mobile from fixed line (NANP), every valid number passes
    assert map_one("+1 415 555 2671", **mobile) == {"out": "+14155552671"}
    assert country_mapping(mobile_only=True)(("0170 2345678", "DE")) == {"out": "+491702345678"}
    with pytest.raises(RowRejected, match="not a mobile number"):
        country_mapping(mobile_only=True)(("01702 345678", "GB"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"region": "{country"}, "neither a region code nor one {column}"),
        ({"region": "{a} {b}"}, "neither a region code nor one {column}"),
        ({"region": "{country}", "default_region": "XX"}, "'XX' is not a region code"),
        ({"region": "GB", "default_region": "DE"}, "default_region needs a per-row region"),
        ({"transform": "lower", "region": "GB"}, "region only shape"),
        ({"transform": "lower", "mobile_only": True}, "mobile_only only shape"),
    ],
)
def test_e164_option_errors(spec: dict[str, Any], message: str):
    from pydantic import ValidationError

    spec = {"column": "phone", "transform": "e164", **spec}
    with pytest.raises(ValidationError) as info:
        FieldSpec(**spec)
    assert message in str(info.value)


def test_region_column_is_read_even_when_no_other_field_names_it():
    sync = sync_config().model_copy(
        update={"fields": {"msisdn": FieldSpec(column="phone", transform="e164", region="{primary_address_country}")}}
    )
    assert "primary_address_country" in sync.columns


# --- e-mail ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("anna.schmidt@example.com", "anna.schmidt@example.com"),
        ("Anna.Schmidt@EXAMPLE.COM", "Anna.Schmidt@example.com"),  # the local part keeps its case
        ("  anna@example.com \t", "anna@example.com"),
        ("anna@Müller.DE", "anna@xn--mller-kva.de"),  # IDNA: the ASCII form
        ("anna@xn--mller-kva.de", "anna@xn--mller-kva.de"),
        ("ännä@müller.de", "ännä@müller.de"),  # a Unicode local part has no ASCII form
    ],
)
def test_email_normalises(value: str, expected: str):
    assert map_one(value, transform="email") == {"out": expected}


def test_email_then_lower_folds_the_local_part():
    assert map_one("Anna.Schmidt@EXAMPLE.COM", transform=["email", "lower"]) == {"out": "anna.schmidt@example.com"}


@pytest.mark.parametrize(
    "value",
    [
        '"Anna Schmidt" <anna@example.com>',
        "Anna Schmidt <anna@example.com>",
        "anna@example.com, bob@example.com",
        "anna@example.com; bob@example.com",
        "anna @example.com",
        "anna@example",
        "anna",
        "anna@@example.com",
    ],
)
def test_email_refuses_what_is_not_one_address(value: str):
    """Optional or not: a wrong address is worse than none, so the row is a dead letter."""
    reason = rejected(value, transform="email").reason
    assert reason.startswith(f"{value.strip()!r} is not one e-mail address: ")
    assert rejected(value, transform="email", required=True).reason == reason


def test_email_shortcut_agrees_with_email_validator(monkeypatch: pytest.MonkeyPatch):
    """Addresses put together from a cached domain verdict are what the library would say.

    Plain and odd local parts (every atext character, dots in bad places, quotes, Unicode,
    64/65 characters) times plain and odd domains (IDN, upper case, special-use, numeric
    TLD, hyphens, underscores, overlong labels), each against the library called whole.
    """
    import email_validator

    import syncd.mapping

    rng = random.Random(11)
    atext = "abcXYZ0189!#$%&'*+/=?^_`{|}~-"
    locals_ = ["anna", "Anna.Schmidt", "a.b.c", ".anna", "anna.", "an..na", '"an na"', "ännä", "a" * 64, "a" * 65, "a b"]
    locals_ += ["".join(rng.choice(atext + ".") for _ in range(rng.randint(1, 12))) for _ in range(60)]
    domains = ["example.com", "EXAMPLE.COM", "Müller.de", "xn--mller-kva.de", "example.test", "localhost", "x.local",
               "example.123", "-bad.com", "bad-.com", "my_host.com", "a" * 64 + ".com", "b" * 63 + ".com",
               "mail.example.co.uk", "example", "[127.0.0.1]", "exa mple.com", ""]  # fmt: skip
    calls = 0
    library = email_validator.validate_email

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return library(*args, **kwargs)

    monkeypatch.setattr(syncd.mapping, "validate_email", counted)
    syncd.mapping._email_domain.cache_clear()
    cases = [f"{local}@{domain}" for local in locals_ for domain in domains] + ["a" * 60 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + ".com"]
    for text in cases:
        try:
            address = library(text, check_deliverability=False)
            expected: str | None = address.ascii_email or address.normalized
        except email_validator.EmailNotValidError:
            expected = None
        if expected is None:
            with pytest.raises(RowRejected):
                map_one(text, transform="email")
        else:
            assert map_one(text, transform="email") == {"out": expected}, text
    calls = 0
    mapped = [map_one(f"Person{i}@Example.COM", transform="email") for i in range(500)]
    assert mapped[7] == {"out": "Person7@example.com"}
    assert calls <= 1  # one domain verdict serves every contact of that domain


def test_email_blank_is_missing_not_invalid():
    assert map_one("  ", transform="email") == {}


# --- names ----------------------------------------------------------------------------------


def name_mapping():
    return compile_mapping(
        {
            "firstname": FieldSpec(column="name", transform="first_name"),
            "lastname": FieldSpec(column="name", transform="last_name"),
        },
        ["name"],
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Anna Schmidt", {"firstname": "Anna", "lastname": "Schmidt"}),
        ("Dr. Anna Maria Schmidt", {"firstname": "Anna", "lastname": "Schmidt"}),
        ("Schmidt, Anna", {"firstname": "Anna", "lastname": "Schmidt"}),
        ("Prof. Dr. Hans-Peter Müller-Lüdenscheidt", {"firstname": "Hans-Peter", "lastname": "Müller-Lüdenscheidt"}),
        ("Ursula von der Leyen", {"firstname": "Ursula", "lastname": "von der Leyen"}),
        ("John Smith Jr.", {"firstname": "John", "lastname": "Smith"}),
        ("  Anna   Schmidt ", {"firstname": "Anna", "lastname": "Schmidt"}),
        ("Anna", {"firstname": "Anna"}),  # a single name is a first name; no last name is sent
        ("", {}),
        (None, {}),
    ],
)
def test_names_split_into_first_and_last(name: str | None, expected: dict[str, str]):
    assert name_mapping()((name,)) == expected


def test_name_shortcut_agrees_with_nameparser():
    """Two plain words are split without nameparser: check that it would say the same for
    random names and for every word nameparser has a rule for, in either place."""
    from nameparser import HumanName
    from nameparser.config import CONSTANTS

    import syncd.mapping

    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))).capitalize() for _ in range(300)]
    words += ["ANNA", "schmidt", "II", "Iv", "Mix", "Vi", "Mc", "Mac", "O'Neil", "Jean-Luc", "A", "J.", "Ab.", "Ümit", "王"]
    lists = ("titles", "first_name_titles", "suffix_acronyms", "suffix_not_acronyms", "prefixes", "conjunctions")
    special = rng.sample(sorted({word for name in lists for word in getattr(CONSTANTS, name, ())}), 200)
    cases = [f"{rng.choice(words)} {rng.choice(words)}" for _ in range(600)]
    cases += [f"{word} Schmidt" for word in special] + [f"Anna {word}" for word in special]
    cases += [f"{word.capitalize()} Schmidt" for word in special] + [f"Anna {word.upper()}" for word in special]
    shortcut = 0
    for text in cases:
        name = HumanName(text)
        assert syncd.mapping._name_parts.__wrapped__(text) == (name.first or None, name.last or None), text
        shortcut += not any(syncd.mapping._special_name_word(word) for word in text.split())
    assert shortcut > 400  # the shortcut is actually taken


def test_name_parts_can_be_required_and_chained():
    mapping = compile_mapping(
        {"lastname": FieldSpec(column="name", transform=["last_name", "upper"], required=True)}, ["name"]
    )
    assert mapping(("Anna Schmidt",)) == {"lastname": "SCHMIDT"}
    with pytest.raises(RowRejected, match="lastname: required value is empty"):
        mapping(("Anna",))


@pytest.mark.parametrize("mobile_only", [False, True])
def test_e164_fast_path_agrees_with_phonenumbers(mobile_only: bool):
    """The precompiled "+digits" path may only accept what the library accepts, unchanged.

    Every region's example numbers, and near misses of them, against parse + is_valid_number
    (and, for `mobile_only`, number_type MOBILE or FIXED_LINE_OR_MOBILE).
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
    accepted = refused = wanted = 0
    for text in sorted(cases):
        fast = _fast_e164(text, mobile_only)
        number = phonenumbers.parse(text, None)
        mobile = phonenumbers.number_type(number) in (
            phonenumbers.PhoneNumberType.MOBILE,
            phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
        )
        valid = phonenumbers.is_valid_number(number)
        wanted += valid and (mobile or not mobile_only)
        if fast is None:
            refused += valid and not mobile
            continue
        accepted += 1
        assert phonenumbers.is_valid_number(number), text
        assert not mobile_only or mobile, text
        assert fast == phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), text
    assert accepted > wanted * 0.75  # the fast path is actually taken
    assert not mobile_only or refused > len(cases) / 8  # and mobile_only refuses landlines


@pytest.mark.parametrize("mobile_only", [False, True])
def test_e164_national_fast_path_agrees_with_phonenumbers(mobile_only: bool):
    """National numbers read in their region: every region's example numbers as the library
    writes them nationally (and written with the international prefix, without the
    trunk prefix, and near misses), against parse(text, region)."""
    from syncd.mapping import _fast_national

    rng = random.Random(3)
    types = (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE,
             phonenumbers.PhoneNumberType.TOLL_FREE, phonenumbers.PhoneNumberType.VOIP)  # fmt: skip
    cases = set()
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in types:
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
            significant = phonenumbers.national_significant_number(example)
            out_of = phonenumbers.format_out_of_country_calling_number(example, region)
            changed = national[:-1] + str(rng.randint(0, 9))
            for text in (national, significant, out_of, changed, national[:-1], national + "1", "0" + significant):
                cases.add((region, text))
    accepted = wanted = 0
    for region, text in sorted(cases):
        fast = _fast_national(text, region, mobile_only)
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            assert fast is None, (region, text)
            continue
        valid = phonenumbers.is_valid_number(number) and not number.extension
        mobile = phonenumbers.number_type(number) in (
            phonenumbers.PhoneNumberType.MOBILE,
            phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
        )
        wanted += valid and (mobile or not mobile_only)
        if fast is None:
            continue
        accepted += 1
        assert valid and (mobile or not mobile_only), (region, text)
        assert fast == phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), (region, text)
    assert accepted > wanted * 0.5  # the fast path is actually taken


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

    class Tier(str, enum.Enum):  # noqa: UP042  (the old spelling is the case under test)
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
    with pytest.raises(FieldError) as info:
        compile_mapping(field(**spec), ["c"])
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("template", ["{c.attr}", "{}", "{c", "no fields at all"])
def test_malformed_templates_are_refused_when_the_config_loads(template: str):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="template"):
        FieldSpec(template=template)


# --- payload digest -------------------------------------------------------------------------


def payload_digest(payload: dict[str, Any]) -> bytes:
    """As map_rows digests a record (with no target)."""
    return payload_digester()(encode_payload(payload))


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


# --- module structure -----------------------------------------------------------------------


def test_syncd_modules_import_each_other_without_cycles():
    """The mapping owns its field specs and transforms; config uses them, never the reverse.

    Every `syncd` import counts, late ones in functions too: a cycle hidden in a function
    still means neither module can be understood (or imported first) alone.
    """
    import ast
    from pathlib import Path

    import syncd

    package = Path(syncd.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        names = graph.setdefault(f"syncd.{path.stem}", set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "syncd":
                names.update(f"syncd.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("syncd."):
                names.add(str(node.module))
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names if alias.name.startswith("syncd."))
    assert {"syncd.fields"} <= graph["syncd.config"] and "syncd.config" not in graph["syncd.mapping"]

    def cycle_from(module: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                return (*path[path.index(imported) :], imported)
            if imported not in done and (found := cycle_from(imported, (*path, imported))):
                return found
        done.add(module)
        return None

    done: set[str] = set()
    cycles = [cycle for module in sorted(graph) if (cycle := cycle_from(module, (module,)))]
    assert not cycles, f"import cycle: {' -> '.join(cycles[0])}"
