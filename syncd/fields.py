"""A datastore attribute as the config spells it: where its value comes from, how it is shaped.

The mapping owns these: `syncd.mapping` compiles a `FieldSpec` into a reader, and the
transform names below are the ones it implements. `syncd.config` only embeds `FieldSpec` in a
sync; this module imports nothing of syncd, so config → fields ← mapping has no cycle.

A spec checks its own shape here (one origin, plain `{column}` templates, a region that is a
code or one `{column}`, options that belong to the transform they shape); what needs the
transforms themselves (a `default` they reject) is checked when the mapping is compiled.
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["FieldSpec", "TRANSFORMS"]

TRANSFORMS = (
    "strip", "lower", "upper", "e164", "email", "first_name", "last_name", "str", "int", "date", "datetime",
)  # fmt: skip

_COLUMN = r"[A-Za-z_][A-Za-z0-9_$ -]*"  # what a `{column}` may name: no format specs, no indexing
_REGION_COLUMN = re.compile(r"\{(" + _COLUMN + r")\}")


class FieldSpec(BaseModel):
    """One datastore attribute: where its value comes from and how it is shaped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str | None = None
    value: str | int | float | bool | None = None  # a constant
    template: str | None = None  # "{first_name} {last_name}"
    transform: list[Literal[TRANSFORMS]] = Field(default_factory=list)  # type: ignore[valid-type]
    required: bool = False
    # e164: the region of numbers written without a country code, either fixed ("GB") or
    # per row from a column holding the contact's country ("{primary_address_country}")
    region: str | None = None
    default_region: str | None = None  # e164 with a per-row region: for rows whose country is blank
    mobile_only: bool = False  # e164: refuse numbers the numbering plan does not call mobile
    format: str | None = None  # date/datetime: strftime format of the output
    default: str | int | float | bool | None = None  # used when the value is missing (NULL or blank)

    @field_validator("transform", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("template")
    @classmethod
    def _plain_fields(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as error:
            raise ValueError(f"{value!r} is not a valid template: {error}") from None
        bad = [name for name in names if not re.fullmatch(_COLUMN, name)]
        if not names or bad:
            raise ValueError(f"{value!r}: use {{column}} fields naming source columns")
        return value

    @field_validator("region")
    @classmethod
    def _region_or_column(cls, value: str | None) -> str | None:
        if value is None or _REGION_COLUMN.fullmatch(value):
            return value
        if "{" in value or "}" in value:
            raise ValueError(
                f"{value!r} is neither a region code nor one {{column}} naming the contact's country"
            )
        return _region_code(value)

    @field_validator("default_region")
    @classmethod
    def _default_region_code(cls, value: str | None) -> str | None:
        return None if value is None else _region_code(value)

    @model_validator(mode="after")
    def _consistent(self) -> FieldSpec:
        origins = [name for name in ("column", "value", "template") if getattr(self, name) is not None]
        if len(origins) != 1:
            raise ValueError("give exactly one of column, value or template")
        phone_options = [
            name for name in ("region", "default_region", "mobile_only") if getattr(self, name) not in (None, False)
        ]
        if phone_options and "e164" not in self.transform:
            raise ValueError(f"{', '.join(phone_options)} only shape the e164 transform, which this field does not use")
        if self.default_region is not None and self.region_column is None:
            raise ValueError('default_region needs a per-row region (region = "{country_column}")')
        return self

    @property
    def region_column(self) -> str | None:
        """The column holding the contact's country, when the region comes from the row."""
        match = _REGION_COLUMN.fullmatch(self.region) if self.region is not None else None
        return match[1] if match else None

    @property
    def columns(self) -> tuple[str, ...]:
        """The source columns this attribute reads, its region's column included."""
        if self.column is not None:
            names: tuple[str, ...] = (self.column,)
        elif self.template is not None:
            names = tuple(name for _, name, _, _ in string.Formatter().parse(self.template) if name)
        else:
            names = ()
        region = self.region_column
        return names if region is None or region in names else (*names, region)


def _region_code(value: str) -> str:
    code = value.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"{value!r} is not a region code (e.g. 'US', 'GB')")
    return code
