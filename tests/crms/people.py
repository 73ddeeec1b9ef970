"""The contacts every CRM fixture is filled with, and what a correct sync delivers for each.

A `Person` is generated from a seeded random source and carries both sides of the story:
what the CRM stores (a phone as a user typed it, in the national format of the contact's
country; e-mail addresses as they arrive from mail clients and imports; blank names) and
what the datastore must receive (`expected()`), worked out from the number and address we
started from, never by syncd's mapping. A number is built as E.164 first and only then
written in one of the ways users type it, so the expected msisdn is known independently.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType

# The country column holds what each CRM stores: SuiteCRM, EspoCRM and vtiger keep free text
# (the country's English name), Odoo a res_country row whose `code` is the ISO code.
COUNTRY_NAMES = {"DE": "Germany", "GB": "United Kingdom", "FR": "France", "AT": "Austria"}

FIRST_NAMES = {
    "DE": ["Jürgen", "Anna", "Lukas", "Sophie", "Maximilian", "Lea", "Jörg", "Katrin"],
    "GB": ["Oliver", "Amelia", "George", "Isla", "Harry", "Siân", "Rhys", "Emily"],
    "FR": ["Léa", "Hugo", "Chloé", "Louis", "Élodie", "Théo", "Manon", "Gaël"],
    "AT": ["Florian", "Valentina", "Tobias", "Magdalena", "Elias", "Hannah", "Lorenz", "Theresa"],
}
LAST_NAMES = {
    "DE": ["Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker"],
    "GB": ["Smith", "Jones", "Taylor", "Brown", "Williams", "Davies", "Evans", "Wilson"],
    "FR": ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand"],
    "AT": ["Gruber", "Huber", "Bauer", "Wagner", "Pichler", "Steiner", "Moser", "Mayer"],
}
DOMAINS = ["example.com", "example.org", "example.net", "mail.example.de", "example.co.uk"]


@dataclass
class Email:
    stored: str  # what the CRM holds
    address: str | None  # the address it means, lower case; None = not one address (a dead letter)


@dataclass
class Person:
    """One contact as a CRM holds it, and what the datastore must get for it."""

    index: int
    first: str  # '' = blank (EspoCRM's default); never sent as ""
    last: str
    country: str | None  # ISO 3166 code of the contact's address; None = not filled in
    mobile: str | None  # the mobile number as stored (national format, spaces, extension, ...)
    msisdn: str | None  # the E.164 number it means; None = not a mobile number syncd may send
    landline: str | None = None  # an office number as stored (a second phone, never the msisdn)
    emails: list[Email] = field(default_factory=list)  # the first one is the primary address
    deleted: bool = False  # soft-deleted / archived: never sent
    account: str | None = None  # the account (company) name

    @property
    def country_name(self) -> str | None:
        return COUNTRY_NAMES[self.country] if self.country else None

    @property
    def primary_email(self) -> Email | None:
        return self.emails[0] if self.emails else None

    @property
    def full_name(self) -> str:
        return f"{self.first} {self.last}".strip()

    def dead_letter_reason(self) -> str | None:
        """Why this contact cannot be sent (a dead letter), or None."""
        if self.msisdn is None:
            return "msisdn"
        if self.primary_email is not None and self.primary_email.address is None:
            return "emailid"
        return None

    def expected(self) -> dict[str, str] | None:
        """The record the datastore must hold for this contact; None = never sent."""
        if self.deleted or self.dead_letter_reason():
            return None
        assert self.msisdn is not None  # dead_letter_reason() said so; for the type checker
        record = {"msisdn": self.msisdn}
        if self.first.strip():
            record["firstname"] = self.first
        if self.last.strip():
            record["lastname"] = self.last
        if self.primary_email is not None and self.primary_email.address is not None:
            record["emailid"] = self.primary_email.address
        return record


def ascii_fold(text: str) -> str:
    """'Jürgen' -> 'jurgen': what people put in the local part of an address."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


def naive_utc_now(*, precision: str = "second") -> datetime:
    """Now, as SuiteCRM, Odoo, EspoCRM and vtiger write it: naive, in UTC."""
    now = datetime.now(UTC).replace(tzinfo=None)
    return now.replace(microsecond=0) if precision == "second" else now


class PhoneBook:
    """Valid numbers of a country, built as E.164 and then written as users write them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def number(self, country: str, kind: PhoneNumberType = PhoneNumberType.MOBILE) -> phonenumbers.PhoneNumber:
        example = phonenumbers.example_number_for_type(country, kind)
        digits = str(example.national_number)
        while True:
            tail = "".join(self.rng.choice("0123456789") for _ in range(4))
            head = digits[:-4]
            if country == "DE" and kind == PhoneNumberType.MOBILE:  # the common 0170/0171/0176 ranges
                head = self.rng.choice(["170", "171", "176"]) + "".join(self.rng.choice("0123456789") for _ in range(3))
            candidate = phonenumbers.parse(f"+{example.country_code}{head}{tail}")
            e164 = phonenumbers.format_number(candidate, PhoneNumberFormat.E164)
            if (
                e164 not in self.used
                and phonenumbers.is_valid_number(candidate)
                and phonenumbers.number_type(candidate) == kind
            ):
                self.used.add(e164)
                return candidate

    def written(self, number: phonenumbers.PhoneNumber, style: str) -> str:
        """The number as a user types it: `national` ('0170 1234567'), `compact`, `international`."""
        if style == "national":
            return phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
        if style == "compact":
            return "".join(ch for ch in phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL) if ch.isdigit())
        return phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)


def e164(number: phonenumbers.PhoneNumber) -> str:
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


# The cases every fixture contains, by position; the rest is random but just as seeded.
SPECIAL = (
    "german_national",  # '0170 …' with country Germany: +49 from the row's country
    "uk_national",  # '07911 …' with country United Kingdom
    "extension",  # '+44 20 … ext. 12': not a msisdn
    "blank_first_name",  # first name '' (EspoCRM's default): left out, not sent as ""
    "display_name_email",  # '"Anna Müller" <anna@…>': not an address
    "email_list",  # 'a@x, b@y': not an address
    "upper_case_email",  # 'ANNA.MUELLER@EXAMPLE.COM': an address, normalised
    "two_emails",  # a secondary address besides the primary one
    "soft_deleted",  # deleted / archived: never sent
    "landline_as_mobile",  # an office number in the mobile field: not a mobile
    "no_country_german",  # German national number, country not filled in: the default region (DE)
    "french_international",  # '+33 6 …' in international format
)


def generate(count: int = 48, *, seed: int = 20261201) -> list[Person]:
    """`count` contacts (at least len(SPECIAL)), the same ones for the same seed."""
    rng = random.Random(seed)
    phones = PhoneBook(rng)
    people = []
    for index in range(count):
        case = SPECIAL[index] if index < len(SPECIAL) else "random"
        country = {
            "german_national": "DE",
            "uk_national": "GB",
            "extension": "GB",
            "landline_as_mobile": "GB",
            "no_country_german": "DE",
            "french_international": "FR",
        }.get(case) or rng.choice(["DE", "DE", "GB", "GB", "FR", "AT"])
        first, last = rng.choice(FIRST_NAMES[country]), rng.choice(LAST_NAMES[country])
        mobile_number = phones.number(country)
        style = {
            "german_national": "national",
            "uk_national": "national",
            "no_country_german": "national",
            "french_international": "international",
        }.get(case) or rng.choice(["national", "national", "compact", "international"])
        mobile: str | None = phones.written(mobile_number, style)
        msisdn: str | None = e164(mobile_number)
        landline_number = phones.number(country, PhoneNumberType.FIXED_LINE)
        landline = phones.written(landline_number, "national")
        if case == "extension":
            mobile, msisdn = phones.written(landline_number, "international") + " ext. 12", None
        if case == "landline_as_mobile":
            mobile, msisdn = landline, None
        address = f"{ascii_fold(first)}.{ascii_fold(last)}{index}@{rng.choice(DOMAINS)}"
        primary = Email(address, address)
        if case == "display_name_email":
            primary = Email(f'"{first} {last}" <{address}>', None)
        elif case == "email_list":
            primary = Email(f"{address}, {ascii_fold(last)}{index}@example.org", None)
        elif case == "upper_case_email":
            primary = Email(address.upper(), address)
        elif case == "random" and rng.random() < 0.15:
            primary = Email(address[0].upper() + address[1:].replace("@example", "@Example"), address)
        emails = [primary]
        if case == "two_emails" or (case == "random" and rng.random() < 0.3):
            other = f"{ascii_fold(first)[0]}{ascii_fold(last)}{index}@work.example.com"
            emails.append(Email(other, other))
        people.append(
            Person(
                index=index,
                first="" if case == "blank_first_name" else first,
                last=last,
                country=None if case == "no_country_german" else country,
                mobile=mobile,
                msisdn=msisdn,
                landline=landline,
                emails=emails,
                deleted=case == "soft_deleted" or (case == "random" and rng.random() < 0.08),
                account=f"{last} {rng.choice(['GmbH', 'Ltd', 'SARL', 'AG'])}" if rng.random() < 0.7 else None,
            )
        )
    return people


def past_stamps(count: int, *, start: datetime | None = None) -> list[datetime]:
    """Naive UTC write times spread over the last days, three rows sharing each second
    (so equal watermarks straddle the readers' batches)."""
    start = start or naive_utc_now() - timedelta(days=3)
    return [start + timedelta(seconds=37 * (i // 3)) for i in range(count)]


def by_msisdn(people: list[Person]) -> dict[str, dict[str, str]]:
    """The datastore every correct sync of `people` ends with, keyed as the simulator keys it."""
    return {record["msisdn"]: record for p in people if (record := p.expected())}
