"""contrib/: the alert rules pass promtool's checks and unit tests, and every metric the
rules and the dashboard use is one that syncd really exports.

promtool comes from Debian's `prometheus` package (.ci/run installs it). Without it the
promtool tests skip, naming why, unless SYNCD_REQUIRE_SERVICES=1 (as in CI), where they fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from syncd.config import load_config
from syncd.metrics import STATES
from syncd.runtime import Runtime
from syncd.simulator import RunningSimulator, SimulatorConfig, start_in_thread

from .conftest import REQUIRE_SERVICES
from .crm import TOKEN, Crm, contact, write_config

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "contrib" / "prometheus"
RULES = PROMETHEUS / "syncd-rules.yml"
RULE_TESTS = PROMETHEUS / "syncd-rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "syncd-dashboard.json"
# Series that are not syncd's: Prometheus makes `up` for every target.
FROM_PROMETHEUS = {"up"}
OUR_PREFIXES = ("syncd_", "process_", "python_")


# ---------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed (Debian: apt-get install --no-install-recommends prometheus)"
        if REQUIRE_SERVICES:
            pytest.fail(f"SYNCD_REQUIRE_SERVICES=1 but {reason}")
        pytest.skip(reason)
    return path


def run_promtool(promtool: str, *args: str) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_checks_the_rules(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", RULES.name)
    assert f"SUCCESS: {len(alerts())} rules found" in out


def test_promtool_unit_tests_pass(promtool: str) -> None:
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", RULE_TESTS.name)


def test_every_alert_is_shown_firing_and_shown_quiet_on_a_healthy_night() -> None:
    """The unit tests cover each alert both ways, so none can be added untested."""
    text = RULE_TESTS.read_text()
    assert re.search(r"^rule_files:\n  - syncd-rules.yml$", text, re.M)
    firing, quiet_at_night = set(), set()
    for case in re.split(r"^  - name: ", text, flags=re.M)[1:]:
        # `alertname: X, exp_alerts: []` (quiet) or `alertname: X` then `exp_alerts:` and a list
        for name, quiet in re.findall(r"alertname: (\w+)(?:, |\n\s*)exp_alerts:( \[\])?", case):
            if not quiet:
                firing.add(name)
            elif case.startswith("an idle healthy sync all night"):
                quiet_at_night.add(name)
    assert firing == set(alerts())
    assert quiet_at_night == set(alerts())


# ---------------------------------------------------------------------------- what syncd exports


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names a wired `Metrics` exports after cycles that pushed, failed and dead-lettered."""
    tmp = tmp_path_factory.mktemp("exported")
    crm = Crm(f"sqlite:///{tmp / 'crm.db'}")
    crm.insert([contact(1), contact(2), contact(3, phone="not a phone")])
    config = write_config(
        tmp / "syncd.toml", source_url=crm.url, api_url="", state_url=f"sqlite:///{tmp / 'state.db'}"
    )
    with start_in_thread(SimulatorConfig(tokens=(TOKEN,), key_attribute="accountid")) as api:
        config.write_text(config.read_text().replace('url = ""', f'url = "{api.url}"'))
        text = _scrape_after_cycles(config, api)
    crm.dispose()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def _scrape_after_cycles(config: Path, api: RunningSimulator) -> str:
    with Runtime.open(load_config(config)) as runtime:
        api.queue_faults({"status": 500})  # one failed push, then the retry lands
        runtime.runners["contacts"].run_cycle()
        return generate_latest(runtime.metrics.registry).decode()


def alerts() -> dict[str, str]:
    """Alert name → the rule's name, expr and `for` as written in the rules file (its
    labels and annotations left out). Plain text: the docs quote it verbatim."""
    rules = re.split(r"^ *- alert: ", RULES.read_text(), flags=re.M)[1:]
    assert rules, "no alert in the rules file"
    found = {}
    for rule in rules:
        head = re.split(r"^ *labels:", rule, flags=re.M)[0]
        found[rule.split()[0]] = re.sub(r"^ *#.*\n", "", "- alert: " + head, flags=re.M)
    return found


def dashboard_exprs() -> Iterator[str]:
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["definition"]


def metric_names(expr: str) -> set[str]:
    """The series names in a PromQL expression (label matchers and strings left out)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings, e.g. label values
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare))
    return {word for word in words if word.startswith(OUR_PREFIXES) or word in FROM_PROMETHEUS}


def test_every_metric_in_the_rules_is_exported(exported: set[str]) -> None:
    used = set().union(*(metric_names(rule.split("expr:", 1)[1]) for rule in alerts().values()))
    assert {"syncd_sync_state", "syncd_last_success_timestamp_seconds", "syncd_backlog_rows"} <= used
    assert used - FROM_PROMETHEUS - exported == set()


def test_every_metric_on_the_dashboard_is_exported(exported: set[str]) -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    assert {"syncd_push_duration_seconds_bucket", "process_resident_memory_bytes", "syncd_build_info"} <= used
    assert used - FROM_PROMETHEUS - exported == set()


def test_states_the_rules_name_are_states_syncd_exports() -> None:
    named = set()
    for expr in [*alerts().values(), *dashboard_exprs()]:
        for values in re.findall(r'state=~?"([^"]*)"', expr):
            named.update(values.split("|"))
    assert named and named <= set(STATES)


def test_the_dashboard_is_a_grafana_dashboard_over_a_chosen_prometheus() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "job", "instance", "sync"} <= variables
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], panel["title"]
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used)


# ---------------------------------------------------------------------------- the docs quote the rules


@pytest.mark.parametrize("doc", ["README.md", "systemd/README.md"])
def test_alert_examples_in_the_docs_are_the_tested_rules(doc: str) -> None:
    """Each rule a doc shows (name, expr, for) is that rule of the rules file, verbatim."""
    quoted = []
    for block in re.findall(r"```yaml\n(.*?)```", (ROOT / doc).read_text(), re.S):
        quoted.extend(re.split(r"^ *(?=- alert: )", block, flags=re.M)[1:])
    assert quoted, f"{doc} shows no alert rule"
    rules = alerts()
    for example in quoted:
        name = example.split()[2]
        assert name in rules, f"{doc} shows an alert {name} that the rules file does not have"
        assert _same(example) == _same(rules[name]), f"{doc}'s {name} is not the tested rule"


def _same(text: str) -> str:
    return " ".join(text.split())
