"""Source rows → Add-contacts records, compiled once per sync.

`compile_mapping` turns a sync's `fields` into one small closure per attribute, so mapping
a row costs a few function calls: no config lookups, no regex compiles, no type dispatch
that can be decided up front (a `lower` after a `strip` knows it gets a `str`).

Decisions a user of the records can rely on:

- **NULL is omitted, not sent.** The API upserts the attributes a record carries, so a
  `null` would blank an attribute the datastore already knows (or be refused as invalid
  input) just because the CRM does not know it. A field whose value is NULL after `default`
  is therefore left out of the record. The price: clearing a column in the CRM does not
  clear the datastore; set `default = ""` on a field where it should.
- **A blank string is NULL.** An empty or whitespace-only string, as read from the column
  and before any transform, is missing like NULL: left out, a dead letter when `required`,
  replaced by `default` if there is one. CRMs store "unknown" as '' (EspoCRM's first
  names); sending it would blank an attribute the datastore knows.
- **A template that renders to nothing is NULL.** NULL and blank columns render as "", a
  template whose every column is missing is missing, and so is one whose stripped result
  is empty (so `default`, `required` and omission apply to it the same way).
- **`default` and constants go through the field's transforms**, once, at compile time
  (`default = "us", transform = "upper"` sends "US"); one that cannot is a `FieldError`.
  A blank one is sent as "" untransformed: `default = ""` clears the attribute.
- **Values are JSON as the API expects it, with stable types:** str, int, bool and finite
  floats are kept; `Decimal` becomes its exact decimal text ("10.50"; never a float, which
  would round, and never int-when-integral, which would flip the type with the value);
  date / time / datetime become ISO 8601 text; UUID its canonical text. NaN, infinities,
  binary values and anything else without a flat JSON form reject the row: guessing an
  encoding would write the same garbage to every contact, a dead letter names the field.
- **Text of a non-string** (for `strip`/`lower`/`upper`/`str` and plain template fields)
  is its JSON text as above, with booleans as "true"/"false" rather than Python's "True".
- Every failure while mapping a row is a `RowRejected` naming the attribute, so the caller
  can dead-letter the row and carry on.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from functools import lru_cache
from operator import itemgetter
from typing import Any
from uuid import UUID

import orjson
import phonenumbers
import pycountry
from email_validator import EmailNotValidError, validate_email
from nameparser import HumanName
from phonenumbers import PhoneMetadata

from syncd.errors import SyncdError
from syncd.fields import FieldSpec
from syncd.values import key_text

__all__ = [
    "FieldError",
    "MappedRows",
    "Mapping",
    "RowRejected",
    "compile_mapping",
    "encode_payload",
    "map_rows",
    "payload_digester",
]

Reader = Callable[[Sequence[Any]], Any]
Convert = Callable[[Any], Any]


class RowRejected(SyncdError):
    """A row that fails local validation; it becomes a dead letter without an API call."""

    def __init__(self, attribute: str, reason: str) -> None:
        super().__init__(f"{attribute}: {reason}")
        self.attribute = attribute
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Rows may be mapped in worker processes; the default reduce would lose the fields.
        return (RowRejected, (self.attribute, self.reason))


class FieldError(ValueError):
    """A field no row could satisfy; the message starts with its key (`fields.msisdn.default: ...`)
    and the config loader adds the file and the sync."""


class _Invalid(ValueError):
    """A reason written for the operator; `Mapping` adds the attribute."""


class Mapping:
    """Maps one source row (a tuple in `columns` order) to one API record."""

    __slots__ = ("columns", "_readers")

    def __init__(self, columns: tuple[str, ...], readers: tuple[tuple[str, Reader], ...]) -> None:
        self.columns = columns
        self._readers = readers

    def __call__(self, row: Sequence[Any]) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for attribute, read in self._readers:
            try:
                value = read(row)
            except _Invalid as error:
                raise RowRejected(attribute, str(error)) from None
            except Exception as error:  # a bad row must never stop the feed
                raise RowRejected(attribute, f"{type(error).__name__}: {error}") from error
            if value is not None:
                record[attribute] = value
        return record

    def __repr__(self) -> str:
        return f"Mapping(attributes={[name for name, _ in self._readers]!r})"


def compile_mapping(fields: abc.Mapping[str, FieldSpec], columns: Sequence[str]) -> Mapping:
    """Compile `fields` (attribute → spec) for rows that arrive as tuples in `columns` order.

    Raises `FieldError` for what no row could fix: a column that is not read, a template
    that is not plain `{column}` fields, a default or constant that the field's own
    transforms reject.
    """
    index = {name: position for position, name in enumerate(columns)}
    readers = tuple((attribute, _reader(attribute, spec, index)) for attribute, spec in fields.items())
    return Mapping(tuple(columns), readers)


def encode_payload(payload: dict[str, Any]) -> bytes:
    """The record as it goes on the wire: JSON with sorted keys.

    Encoding once serves both the digest and the request body; sorted keys make the
    digest the same for any attribute order.
    """
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


def digest_target(datastore_id: str, feed_id: str) -> bytes:
    """The key of a sync's digests: where its records go (a new datastore or feed gets everything again)."""
    return hashlib.blake2b(f"{datastore_id}\0{feed_id}".encode(), digest_size=32).digest()


def payload_digester(target: bytes = b"") -> Callable[[bytes], bytes]:
    """The digest of encoded payloads bound for `target`: 16 bytes, the same in every process.

    `target` (at most 64 bytes) keys the digest, so the same payload bound for another
    datastore or feed counts as a change. JSON keeps types apart ("1" vs 1), which is
    what the datastore sees as a change.
    """
    keyed = hashlib.blake2b(digest_size=16, key=target)

    def digest(encoded: bytes) -> bytes:
        copy = keyed.copy()  # copying skips hashing the key per row
        copy.update(encoded)
        return copy.digest()

    return digest


@dataclass(slots=True)
class MappedRows:
    """Rows after mapping, as parallel lists: cheap to build, and to pickle across processes."""

    keys: list[str] = field(default_factory=list)  # as text, like the state database keeps them
    encoded: list[bytes] = field(default_factory=list)  # each record as it goes on the wire
    digests: list[bytes] = field(default_factory=list)  # payload_digester(target)(encoded)
    sources: list[bytes] = field(default_factory=list)  # source fingerprints of the rows
    rejected: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # key, reason, row


def map_rows(
    rows: Sequence[Sequence[Any]], mapping: Mapping, *, target: bytes, source_hash: Callable[[Sequence[Any]], bytes]
) -> MappedRows:
    """Map, encode and digest rows whose first column is the key: the per-row work of a cycle.

    Each record is encoded once; the same bytes give its digest and the request body.
    """
    mapped = MappedRows()
    keys, encoded, digests, sources = mapped.keys, mapped.encoded, mapped.digests, mapped.sources
    digest = payload_digester(target)
    for row in rows:
        key = key_text(row[0])
        try:
            payload = mapping(row)
        except RowRejected as error:
            mapped.rejected.append((key, str(error), dict(zip(mapping.columns, row, strict=False))))
            continue
        data = encode_payload(payload)
        keys.append(key)
        encoded.append(data)
        digests.append(digest(data))
        sources.append(source_hash(row))
    return mapped


# --- compiling one field -------------------------------------------------------------------


def _reader(attribute: str, spec: FieldSpec, index: dict[str, int]) -> Reader:
    convert = _converter(attribute, spec)
    regional = None
    region_column = spec.region_column
    if region_column is not None:  # the converter takes (value, region)
        regional, default_region = convert, spec.default_region

        def convert(value: Any) -> Any:  # for the constant and the default: no row, no country
            return regional(value, default_region)

    if spec.value is not None:
        constant = _fold(attribute, "value", convert, spec.value)
        if spec.required and constant in (None, ""):
            raise FieldError(f"fields.{attribute}: required, but its value is empty")
        return lambda row: constant

    source = _source(attribute, spec, index)
    default = None if spec.default is None else _fold(attribute, "default", convert, spec.default)
    if regional is not None:
        region_at = _position(attribute, region_column or "", index)
        return _regional_reader(source, regional, region_at, default_region, default, spec.required)
    plain = convert is _jsonable  # no transforms: a str is sent as it is
    # The hot path of every cycle: a str (the usual value) costs one class test and one
    # isspace, and skips the converter when there are no transforms.

    if spec.required:

        def read_required(row: Sequence[Any]) -> Any:
            value = source(row)
            if value.__class__ is str:
                if not value or value.isspace():
                    value = default
                elif not plain:
                    value = convert(value)
            elif value is None or _blank(value):
                value = default
            else:
                value = convert(value)
            if value is None or value == "":
                raise _Invalid("required value is empty")
            return value

        return read_required

    def read(row: Sequence[Any]) -> Any:
        value = source(row)
        if value.__class__ is str:
            if not value or value.isspace():
                return default
            return value if plain else convert(value)
        if value is None or _blank(value):
            return default
        return convert(value)

    return read


def _regional_reader(
    source: Reader, convert: Callable[[Any, str | None], Any], region_at: int, default_region: str | None,
    default: Any, required: bool,
) -> Reader:
    """A field whose e164 region comes from the row's country column (blank: `default_region`)."""

    def read(row: Sequence[Any]) -> Any:
        value = source(row)
        if value is None or _blank(value):
            value = default
        else:
            country = row[region_at]
            value = convert(value, default_region if country is None or _blank(country) else _region_of(country))
        if required and (value is None or value == ""):
            raise _Invalid("required value is empty")
        return value

    return read


def _source(attribute: str, spec: FieldSpec, index: dict[str, int]) -> Reader:
    if spec.column is not None:
        return itemgetter(_position(attribute, spec.column, index))
    return _template(attribute, spec.template or "", index)


def _blank(value: Any) -> bool:
    """An empty or whitespace-only string (of any str subclass): a CRM's '' means "unknown"."""
    return isinstance(value, str) and (not value or value.isspace())


def _position(attribute: str, column: str, index: dict[str, int]) -> int:
    if column not in index:
        raise FieldError(f"fields.{attribute}: column {column!r} is not among the columns read")
    return index[column]


def _fold(attribute: str, key: str, convert: Convert, value: Any) -> Any:
    """Apply the field's transforms to a constant once, so a bad one fails at load time.

    A blank one is "" as written, past the transforms: `default = ""` is how a field is
    told to clear the attribute, and no transform (e164, email) would accept it.
    """
    if isinstance(value, str) and (not value or value.isspace()):
        return ""
    try:
        return convert(value)
    except Exception as error:
        raise FieldError(f"fields.{attribute}.{key}: {error}") from None


def _converter(attribute: str, spec: FieldSpec) -> Callable[..., Any]:
    """The field's transforms as one function; with none, the value made JSON-friendly.

    With a per-row region the function takes `(value, region)`, and hands the region to
    its e164 step. A step that finds nothing (a name without a last name) returns None,
    which ends the chain: the value is missing.
    """
    regional = spec.region_column is not None
    steps: list[tuple[Callable[..., Any], bool]] = []  # (step, takes the row's region)
    known: type | None = None  # the type the previous step is known to return
    for name in spec.transform:
        if name in ("strip", "lower", "upper", "str"):
            if known is not str:
                steps.append((_text, False))
                known = str
            if name != "str":
                steps.append((getattr(str, name), False))
        elif name == "int":
            if known is not int:
                steps.append((_to_int, False))
                known = int
        elif name == "e164":
            steps.append((_e164_converter(None if regional else spec.region, spec.mobile_only, regional), regional))
            known = str
        elif name == "email":
            steps.append((_email, False))
            known = str
        elif name in ("first_name", "last_name"):
            steps.append((_first_name if name == "first_name" else _last_name, False))
            known = str
        else:  # date / datetime
            steps.append((_date_converter(name == "datetime", spec.format), False))
            known = str
    if regional:
        regional_chain = tuple(steps)

        def convert_regional(value: Any, region: str | None) -> Any:
            for step, takes_region in regional_chain:
                value = step(value, region) if takes_region else step(value)
                if value is None:
                    return None
            return value

        return convert_regional
    if not steps:
        return _jsonable
    if len(steps) == 1:
        return steps[0][0]
    chain = tuple(step for step, _ in steps)

    def convert(value: Any) -> Any:
        for step in chain:
            value = step(value)
            if value is None:
                return None
        return value

    return convert


def _template(attribute: str, template: str, index: dict[str, int]) -> Reader:
    """Compile `template` to a positional `str.format`: C-speed, no dict per row.

    A field with a format spec or conversion ("{amount:.2f}") gets the raw value; a plain
    field gets the value's JSON text, so "{active}" reads "true" as everywhere else.
    """
    parts: list[str] = []
    sources: list[tuple[int, Convert]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise FieldError(f"fields.{attribute}.template: {error}") from None
    for literal, name, spec, conversion in parsed:
        parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        if not name or name.isdigit() or "." in name or "[" in name or "{" in (spec or ""):
            raise FieldError(
                f"fields.{attribute}.template: {{{name}}} is not a plain {{column}} field"
            )
        plain = not spec and not conversion
        sources.append((_position(attribute, name, index), _text if plain else _same))
        parts.append(
            "{" + str(len(sources) - 1) + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        )
    render = "".join(parts).format
    fields = tuple(sources)

    def rendered(row: Sequence[Any]) -> str | None:
        values = []
        present = False
        for position, prepare in fields:
            value = row[position]
            if value is None or _blank(value):
                values.append("")
            else:
                values.append(prepare(value))
                present = True
        return (render(*values).strip() or None) if present else None  # every part blank: missing

    return rendered


def _same(value: Any) -> Any:
    return value


# --- JSON-friendly values ------------------------------------------------------------------

_NATIVE = frozenset({str, int, bool})


def _jsonable(value: Any) -> Any:
    """`value` as the API should see it; see the module docstring for the choices."""
    kind = type(value)
    if kind in _NATIVE:
        return value
    convert = _JSON.get(kind) or _json_converter(kind)
    return convert(value)


def _text(value: Any) -> str:
    """The JSON text of a value: what a string transform or a template field works on."""
    if type(value) is str:
        return value
    value = _jsonable(value)
    if type(value) is str:
        return value
    if type(value) is bool:
        return "true" if value else "false"
    return str(value)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise _Invalid(f"{value} is not a number JSON can carry")
    return value


def _decimal(value: Decimal) -> str:
    if not value.is_finite():
        raise _Invalid(f"{value} is not a number JSON can carry")
    return format(value, "f")  # "1E+2" would be read as text by nobody; "100" is


def _binary(value: Any) -> Any:
    raise _Invalid(
        f"a binary value ({type(value).__name__}) has no text form; "
        "select a text column or cast it in the source"
    )


_JSON: dict[type, Convert] = {
    float: _finite,
    Decimal: _decimal,
    datetime: datetime.isoformat,
    date: date.isoformat,
    time: time.isoformat,
    UUID: str,
    bytes: _binary,
    bytearray: _binary,
    memoryview: _binary,
}


def _json_converter(kind: type) -> Convert:
    """Find the converter for a subclass (a str enum, a driver's datetime), and remember it."""
    for base in kind.__mro__:
        if base in _JSON:
            convert = _JSON[base]
            break
        if base in (str, int):
            convert = base.__str__ if base is str else base  # the plain value, not an enum's repr
            break
    else:

        def convert(value: Any) -> Any:
            raise _Invalid(f"a {kind.__name__} value has no flat JSON form")

    _JSON[kind] = convert
    return convert


# --- int, date, datetime -------------------------------------------------------------------


def _to_int(value: Any) -> int:
    if type(value) is int:
        return value
    try:
        number = Decimal(value) if isinstance(value, str) else value  # "42", " 42 ", "42.0"
        integral = int(number)
        if integral == number:
            return integral
    except (ValueError, TypeError, ArithmeticError):
        pass
    raise _Invalid(f"{str(value)!r} is not an integer")


def _date_converter(with_time: bool, format: str | None) -> Convert:
    parse = _as_datetime if with_time else _as_date
    if format is None:
        return lambda value: parse(value).isoformat()
    return lambda value: parse(value).strftime(format)


def _as_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            return _as_datetime(value).date()  # "2024-05-01T10:00:00" is a date too
    raise _Invalid(f"expected a date or an ISO 8601 string, got {type(value).__name__} {value!r}")


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime.combine(value, time())
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            raise _Invalid(f"{value!r} is not an ISO 8601 date or datetime") from None
    raise _Invalid(f"expected a datetime or an ISO 8601 string, got {type(value).__name__} {value!r}")


# --- e164 ----------------------------------------------------------------------------------


def _e164_converter(region: str | None, mobile_only: bool, regional: bool) -> Callable[..., str]:
    """The e164 step: `to_e164(value)` for a fixed region (or none), `to_e164(value, region)`
    when the region comes from the row.

    A "+digits" number carries its country, so the region only reads national numbers: a
    German contact's +44 mobile stays British, but their "0170 …" is read as German and
    never as the UK landline the same digits would be.
    """

    if regional:

        def to_e164_in(value: Any, region: str | None) -> str:
            text = value if type(value) is str else _text(value)
            return (
                _fast_e164(text, mobile_only)
                or (region and _fast_national(text, region, mobile_only))
                or _e164_slow(text, region, mobile_only, _NO_COUNTRY)
            )

        return to_e164_in

    hint = "" if region else _NO_REGION

    def to_e164(value: Any) -> str:
        text = value if type(value) is str else _text(value)
        return (
            _fast_e164(text, mobile_only)
            or (region and _fast_national(text, region, mobile_only))
            or _e164_slow(text, region, mobile_only, hint)
        )

    return to_e164


_NO_REGION = "; it has no +country code and the field sets no region"
_NO_COUNTRY = "; it has no +country code and the contact's country is blank"
# phonenumbers types that `mobile_only` accepts: FIXED_LINE_OR_MOBILE too, because where a
# plan cannot tell the two apart (the US and Canada, among others) every number has that type
_MOBILE = frozenset({phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE})
_TYPE_NAMES = {
    getattr(phonenumbers.PhoneNumberType, name): name.lower().replace("_", "-")
    for name in dir(phonenumbers.PhoneNumberType)
    if name.isupper()
}


def _e164_slow(text: str, region: str | None, mobile_only: bool, hint: str) -> str:
    """The library's verdict, for every number the fast path did not prove valid."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        number = None
    if number is not None and number.extension:
        raise _Invalid(f"{text!r} has an extension; a msisdn reaches one phone, not an extension behind it")
    if number is None or not phonenumbers.is_valid_number(number):
        national = not text.lstrip().startswith(("+", "\uff0b"))  # read in `region`, if any
        why = (f" in region {region}" if region else hint) if national else ""
        raise _Invalid(f"{text!r} is not a valid phone number{why}")
    if mobile_only:
        kind = phonenumbers.number_type(number)
        if kind not in _MOBILE:
            raise _Invalid(f"{text!r} is not a mobile number (a {_TYPE_NAMES.get(kind, 'unknown')} number)")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@lru_cache(maxsize=4096)
def _country_region(text: str) -> str | None:
    """The phone region of a country as CRMs write it, or None if it is not one we know.

    Accepted, case-insensitively and exactly (pycountry's `lookup`): ISO 3166 alpha-2,
    alpha-3 and numeric codes, the English short name ("Germany"), the official name
    ("Federal Republic of Germany") and the common name ("South Korea"). Nothing fuzzier:
    no native names ("Deutschland"), no prefixes, no "UK" (not an ISO code); a guess that
    is wrong sends a wrong msisdn, a dead letter naming the value can be fixed in the CRM.
    Region codes the phone library knows but ISO does not (XK) count as codes too.
    """
    code = text.strip()
    if code.upper() in phonenumbers.SUPPORTED_REGIONS:
        return code.upper()
    try:
        country = pycountry.countries.lookup(code)
    except LookupError:
        return None
    return country.alpha_2 if country.alpha_2 in phonenumbers.SUPPORTED_REGIONS else ""


def _region_of(country: Any) -> str:
    """The row's region for its e164 step; a country we cannot place rejects the row."""
    region = _country_region(country if type(country) is str else _text(country))
    if not region:
        known = "has no phone numbering plan" if region == "" else "is not a country code or name we know"
        raise _Invalid(f"the contact's country {country!r} {known}")
    return region


# --- e-mail and names ----------------------------------------------------------------------


def _email(value: Any) -> str:
    """An address as email-validator normalises it, or the row is rejected.

    `"Name" <a@b>`, lists (`a@x, b@y`, `a@x; b@y`) and anything else that is not one
    address are refused, required or not: sending to a wrong address is worse than not
    sending. Surrounding spaces are dropped. The domain is lowercased and an
    internationalised one sent in its ASCII (IDNA) form, which every mail system accepts.
    The local part keeps its case: only the receiving host may read it case-insensitively
    (add "lower" after "email" to fold it). No DNS look-up (`check_deliverability=False`).
    """
    text = (value if type(value) is str else _text(value)).strip()
    # The library spends ~25 µs an address, most of it on the domain, and contacts share
    # domains: a plain ASCII local part (RFC 5322 dot-atom, which the library accepts as it
    # is) with a domain the library has already accepted is put together from that verdict.
    # Everything else goes to the library whole; tests/test_mapping.py compares the two.
    local, _, domain = text.rpartition("@")
    if len(text) <= 200 and len(local) <= 64 and _DOT_ATOM.match(local):
        ascii_domain = _email_domain(domain)
        if ascii_domain is not None:
            return f"{local}@{ascii_domain}"
    try:
        address = validate_email(text, check_deliverability=False)
    except EmailNotValidError as error:
        raise _Invalid(f"{text!r} is not one e-mail address: {error}") from None
    return address.ascii_email or address.normalized  # no ASCII form: a Unicode local part


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


@lru_cache(maxsize=4096)
def _email_domain(domain: str) -> str | None:
    """The ASCII form of `domain` if email-validator accepts it after a plain local part."""
    try:
        return str(validate_email(f"a@{domain}", check_deliverability=False).ascii_domain)
    except EmailNotValidError:
        return None


@lru_cache(maxsize=1024)  # first_name and last_name of one row parse the same text
def _name_parts(text: str) -> tuple[str | None, str | None]:
    """First and last name as nameparser reads a full name, either missing as None.

    Titles, middle names and suffixes are dropped ("Dr. Anna Maria Schmidt" → Anna,
    Schmidt); "Schmidt, Anna" is read last-name-first; particles stay with the last name
    ("van Beethoven"). A single word is a first name only: the last name is missing.
    """
    # nameparser spends ~100 µs a name. Two plain words that none of its word lists
    # (titles, suffixes, particles, conjunctions) or its roman numerals claim are first and
    # last name, as it would say; tests/test_mapping.py compares the two.
    words = text.split()
    if len(words) == 2 and not any(_special_name_word(word) for word in words):
        return words[0], words[1]
    name = HumanName(text)
    return name.first or None, name.last or None


@lru_cache(maxsize=1)
def _name_words() -> frozenset[str]:
    """Every word nameparser treats specially, lowercased (its lists differ between versions)."""
    from nameparser.config import CONSTANTS

    lists = ("titles", "first_name_titles", "suffix_acronyms", "suffix_not_acronyms", "suffix_acronyms_ambiguous",
             "prefixes", "non_first_name_prefixes", "conjunctions", "bound_first_names")  # fmt: skip
    return frozenset(word.lower() for name in lists for word in getattr(CONSTANTS, name, ()))


def _special_name_word(word: str) -> bool:
    """Whether nameparser might read `word` as more than a plain name: anything but ASCII
    letters, initials, roman numerals ("II", "Vi") and the words of its lists."""
    return (
        len(word) < 2
        or not (word.isascii() and word.isalpha())
        or _ROMAN.match(word) is not None
        or word.lower() in _name_words()
    )


_ROMAN = re.compile(r"(?i)[ivxlcdm]+\Z")  # wider than nameparser's numerals: these go to it


def _first_name(value: Any) -> str | None:
    return _name_parts(value if type(value) is str else _text(value))[0]


def _last_name(value: Any) -> str | None:
    return _name_parts(value if type(value) is str else _text(value))[1]


# --- e164 fast path ------------------------------------------------------------------------


# phonenumbers.parse + is_valid_number cost 25-50 µs a number, most of it re-running a
# dozen metadata regexes through re's cache. For the usual CRM form, "+" and digits
# (optionally spaced " -()."), the library's parse is fully determined by the digits: the
# calling code is the first 1-3 digit prefix it knows, and the national number is the
# rest unless the region's national-prefix pattern matches it. For that case we replay
# `is_valid_number` (region choice, then "any number type matches") with each region's
# patterns precompiled into one regex. Anything else, and every number not proven valid,
# goes to the library, so this path can only say "valid" where the library says so too.
# tests/test_mapping.py checks it against the library on every region's example numbers.

_SEPARATORS = str.maketrans("", "", " -().")
_CALLING_CODES = frozenset(str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
# Any type matching makes a number valid, so the order only decides speed: contact lists
# are mostly mobile and fixed-line numbers, tried first (about twice as fast as last).
_NUMBER_TYPES = (
    "mobile", "fixed_line", "premium_rate", "toll_free", "shared_cost", "voip",
    "personal_number", "pager", "uan", "voicemail",
)  # fmt: skip
# calling code → a proven-valid (or proven-mobile) test, or None to ask the library
_validators: dict[str, Callable[[str], bool] | None] = {}
_mobile_validators: dict[str, Callable[[str], bool] | None] = {}


def _fast_e164(text: str, mobile_only: bool = False) -> str | None:
    """`text` in E.164 if it is a "+digits" number proven valid (and, with `mobile_only`,
    proven mobile), else None (ask the library)."""
    if text[:1] != "+":
        return None
    digits = text[1:]
    if not (digits.isdigit() and digits.isascii()):
        digits = digits.translate(_SEPARATORS)
        if not (digits.isdigit() and digits.isascii()):
            return None
    if digits[0] == "0":
        return None
    for size in (1, 2, 3):
        code = digits[:size]
        if code in _CALLING_CODES:
            break
    else:
        return None
    validators = _mobile_validators if mobile_only else _validators
    try:
        valid = validators[code]
    except KeyError:
        valid = validators[code] = _validator(code, mobile_only)
    national = digits[size:]
    if valid is None or not 2 <= len(national) <= 17 or not valid(national):
        return None
    return "+" + digits


def _fast_national(text: str, region: str, mobile_only: bool = False) -> str | None:
    """`text`, a national number of `region`, in E.164 if the fast path proves it valid.

    `parse(text, region)` strips the region's national prefix ("0") when what follows is a
    viable number, which a valid one is; so "+<country code><the rest>" is what the library
    would read, and `_fast_e164` decides it. Regions whose prefix rule captures carrier codes
    or rewrites the number, and digits that begin with the international call prefix ("00",
    read as a country code), are left to the library.
    """
    try:
        rule = _national_rules[region]
    except KeyError:
        rule = _national_rules[region] = _national_rule(region)
    if rule is None:
        return None
    code, national_prefix, international_prefix = rule
    digits = text if text.isdigit() else text.translate(_SEPARATORS)
    if not (digits.isdigit() and digits.isascii()) or international_prefix.match(digits):
        return None
    prefix = national_prefix.match(digits)
    return _fast_e164(f"+{code}{digits[prefix.end() :] if prefix else digits}", mobile_only)


_national_rules: dict[str, tuple[int, re.Pattern[str], re.Pattern[str]] | None] = {}


def _national_rule(region: str) -> tuple[int, re.Pattern[str], re.Pattern[str]] | None:
    """(country code, national prefix, international prefix) of `region`, or None when its
    prefix rule is more than a plain strip."""
    metadata = PhoneMetadata.metadata_for_region(region, None)
    if (
        metadata is None
        or metadata.country_code is None
        or metadata.national_prefix_transform_rule
        or not metadata.international_prefix
    ):
        return None
    try:
        national_prefix = re.compile(metadata.national_prefix_for_parsing or "(?!)")
        international_prefix = re.compile(metadata.international_prefix)
    except re.error:
        return None
    if national_prefix.groups:
        return None
    return metadata.country_code, national_prefix, international_prefix


def _validator(code: str, mobile_only: bool = False) -> Callable[[str], bool] | None:
    """A test replaying `is_valid_number` (and with `mobile_only`, `number_type` in
    `_MOBILE`) for national numbers under `code`, or None to leave the calling code to
    the library (odd metadata we do not replay)."""
    calling_code = int(code)
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE[calling_code]
    main = PhoneMetadata.metadata_for_region_or_calling_code(
        calling_code, phonenumbers.region_code_for_country_code(calling_code)
    )
    if main is None:
        return None
    try:
        national_prefix = re.compile(main.national_prefix_for_parsing or "(?!)")
        if len(regions) == 1:  # the library picks the only region without looking
            metadata = PhoneMetadata.metadata_for_region_or_calling_code(calling_code, regions[0])
            if metadata is None or metadata.country_code != calling_code:
                return None
            only = _mobile_pattern(metadata) if mobile_only else _valid_pattern(metadata)
            return lambda national: not national_prefix.match(national) and bool(only.match(national))
        choices = []
        for region in regions:  # the first region that claims the number decides
            metadata = PhoneMetadata.metadata_for_region(region, None)
            if metadata is None:
                continue
            if metadata.country_code != calling_code:
                return None
            leading = re.compile(metadata.leading_digits) if metadata.leading_digits else None
            accept = _mobile_pattern(metadata) if mobile_only else None
            choices.append((leading, _valid_pattern(metadata), accept))
    except re.error:
        return None
    lookup = tuple(choices)

    def valid(national: str) -> bool:
        if national_prefix.match(national):
            return False
        for leading, pattern, accept in lookup:
            if leading is not None:
                if not leading.match(national):
                    continue
                if not pattern.match(national):
                    return False  # the region its leading digits name says "invalid"
            elif not pattern.match(national):
                continue
            return accept is None or bool(accept.match(national))
        return False

    return valid


def _valid_pattern(metadata: Any) -> re.Pattern[str]:
    """One regex for "matches the general description and some number type", as
    `phonenumbers._number_type_helper(...) != UNKNOWN` decides it."""
    names = [name for name in _NUMBER_TYPES if name != "mobile" or not metadata.same_mobile_and_fixed_line_pattern]
    general = _desc_pattern(metadata.general_desc)
    types = [pattern for name in names if (pattern := _desc_pattern(getattr(metadata, name)))]
    if general is None or not types:
        return re.compile("(?!)")
    return re.compile(f"(?={general})(?:{'|'.join(types)})")


def _mobile_pattern(metadata: Any) -> re.Pattern[str]:
    """One regex for "`_number_type_helper` says MOBILE or FIXED_LINE_OR_MOBILE": the general
    description, none of the types it tries first, then the mobile description (or the
    fixed-line one, where the plan says the two are the same)."""
    general = _desc_pattern(metadata.general_desc)
    first = [
        pattern
        for name in _NUMBER_TYPES
        if name not in ("mobile", "fixed_line") and (pattern := _desc_pattern(getattr(metadata, name)))
    ]
    mobile = _desc_pattern(metadata.fixed_line if metadata.same_mobile_and_fixed_line_pattern else metadata.mobile)
    if general is None or mobile is None:
        return re.compile("(?!)")
    excluded = f"(?!{'|'.join(first)})" if first else ""
    return re.compile(f"(?={general}){excluded}(?:{mobile})")


def _desc_pattern(desc: Any) -> str | None:
    """A number description as a full-match pattern, its possible lengths included."""
    if desc is None or not desc.national_number_pattern:
        return None
    pattern = f"(?:{desc.national_number_pattern})\\Z"
    if desc.possible_length:
        lengths = "|".join(f"\\d{{{length}}}" for length in desc.possible_length)
        pattern = f"(?=(?:{lengths})\\Z){pattern}"
    return pattern
