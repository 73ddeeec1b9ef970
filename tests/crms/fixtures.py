"""pytest fixtures: each CRM built in the throwaway database of `mysql_url` / `postgres_url`
(tests/conftest.py), and a simulator keyed by msisdn as a Webex datastore usually is.

Import them into a test module (`from tests.crms.fixtures import *`-style, by name).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from syncd.simulator import SimulatorConfig, start_in_thread

from ..crm import TOKEN
from .common import CrmFixture
from .espocrm import EspoCrm
from .odoo import Odoo
from .people import Person, generate
from .suitecrm import SuiteCrm
from .vtiger import Vtiger

CRMS: dict[str, type[CrmFixture]] = {"suitecrm": SuiteCrm, "odoo": Odoo, "espocrm": EspoCrm, "vtiger": Vtiger}
URL_FIXTURE = {"mysql": "mysql_url", "postgresql": "postgres_url"}


def build(request: pytest.FixtureRequest, name: str, people: list[Person] | None = None) -> CrmFixture:
    cls = CRMS[name]
    url = request.getfixturevalue(URL_FIXTURE[cls.dialect])
    return cls(url, people if people is not None else generate())


@pytest.fixture(params=list(CRMS))
def real_crm(request: pytest.FixtureRequest) -> Iterator[CrmFixture]:
    """Each of the four CRMs in turn, on its own database, filled with `generate()`'s people."""
    crm = build(request, request.param)
    yield crm
    crm.dispose()


@pytest.fixture
def suitecrm(request: pytest.FixtureRequest) -> Iterator[SuiteCrm]:
    crm = build(request, "suitecrm")
    assert isinstance(crm, SuiteCrm)
    yield crm
    crm.dispose()


@pytest.fixture
def odoo(request: pytest.FixtureRequest) -> Iterator[Odoo]:
    crm = build(request, "odoo")
    assert isinstance(crm, Odoo)
    yield crm
    crm.dispose()


@pytest.fixture
def espocrm(request: pytest.FixtureRequest) -> Iterator[EspoCrm]:
    crm = build(request, "espocrm")
    assert isinstance(crm, EspoCrm)
    yield crm
    crm.dispose()


@pytest.fixture
def vtiger(request: pytest.FixtureRequest) -> Iterator[Vtiger]:
    crm = build(request, "vtiger")
    assert isinstance(crm, Vtiger)
    yield crm
    crm.dispose()


@pytest.fixture
def datastore():
    """The Add-contacts simulator; records are keyed by `msisdn`."""
    with start_in_thread(SimulatorConfig(tokens=(TOKEN,))) as simulator:
        yield simulator
