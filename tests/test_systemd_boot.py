"""The shipped syncd.service under a real systemd, booted in a container.

`systemd-nspawn --volatile=yes -D /` boots this machine's own /usr under a fresh
systemd (PID 1 of its own namespaces, an empty /etc on tmpfs, a private network with
only loopback). Bound into it:

- /etc/systemd/system: the shipped unit, verbatim, plus a drop-in for the test only
  (a 3 s watchdog and a 1 s restart delay, so a watchdog kill takes seconds);
- /etc/syncd: a config, a SQLite CRM and the API key as `credentials/api-token`
  (no crm-password: the start must not need one);
- /opt/syncd: a venv whose interpreter is Debian's /usr/bin/python3.X and whose
  site-packages are this test run's, so ExecStart=/opt/syncd/bin/syncd runs this
  checkout (an interpreter under /root, like pyenv's, is hidden by ProtectHome=).

The simulator runs inside the container as a transient service on 127.0.0.1. The test
talks to the container's systemd with `nsenter` (no machined or D-Bus needed on the
host) and checks what an operator would: start → READY, a delivery, reload (and a
refused one), a watchdog kill and restart, stop, exit 2 not restarted, priorities in
the journal, and the journalctl recipes of systemd/README.md as written.

Skips with the reason where it cannot run (not root, no systemd-nspawn, no matching
system Python); under SYNCD_REQUIRE_SERVICES=1 (CI) those are failures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from syncd.config_text import render_config

from .crm import wait_for

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "syncd.service"
GUIDE = ROOT / "systemd" / "README.md"
TOKEN = "boot-test-token"
PORT = 8080
WATCHDOG_S = 3

CONFIG = render_config(
    log={"format": "json"},
    api={
        "url": f"http://127.0.0.1:{PORT}/v1/datastores/contacts",
        "token_file": "/run/credentials/syncd.service/api-token",
        "max_attempts": 20,
    },
    sources={"crm": {"url": "sqlite:////etc/syncd/crm.db"}},
    syncs=[
        {
            "name": "contacts",
            "source": "crm",
            "table": "contacts",
            "key": "id",
            "watermark": "updated_at",
            "interval": "1s",
            "settle": "0s",
            "datastore_id": "1466",
            "feed_id": "1499",
            "fields": {"msisdn": {"column": "phone", "transform": "e164", "required": True}, "firstname": "first_name"},
        }
    ],
)


def unavailable(reason: str) -> None:
    if os.environ.get("SYNCD_REQUIRE_SERVICES") == "1":
        pytest.fail(f"SYNCD_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


class Machine:
    """A booted container and a way to run commands in it."""

    def __init__(self, nspawn: subprocess.Popen[bytes], leader: int, etc: Path, console: Path) -> None:
        self.nspawn = nspawn
        self.leader = leader
        self.etc = etc  # the host side of /etc/syncd
        self.console = console

    def run(self, *argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{argv}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-c", script, **kwargs)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties), check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "-u", "syncd", "-o", "json", "--no-pager", *args, check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def events(self, name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(syncd's JSON line, its journal entry) for every `name` event logged so far."""
        found = []
        for entry in self.journal():
            message = entry.get("MESSAGE")
            if isinstance(message, str) and message.startswith("{"):
                event = json.loads(message)
                if event.get("event") == name:
                    found.append((event, entry))
        return found

    def http_get(self, path: str) -> dict[str, Any]:
        """GET the simulator inside the container (only its network namespace is entered)."""
        code = (
            "import sys, urllib.request; "
            f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{PORT}{path}', timeout=5).read().decode())"
        )
        command = ["nsenter", "-t", str(self.leader), "-n", "--", sys.executable, "-c", code]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        def check() -> Any:
            assert self.nspawn.poll() is None, "the container exited:\n" + self.console.read_text()[-3000:]
            return condition()

        return wait_for(check, timeout, what, every=0.2)


def _system_python() -> str:
    """Debian's interpreter of our Python version: the one the service can see."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = Path(f"/usr/bin/python{version}")
    if not path.exists():
        unavailable(f"no /usr/bin/python{version} to run the service with (apt-get install python{version})")
    return str(path)


def _installed_code() -> Path:
    """Where this venv's `import syncd` leads outside the checkout's own sys.path (for an
    editable install, the checkout it was installed from): the service must see it."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", "import syncd; print(syncd.__file__)"],
        cwd="/", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip()).resolve().parent.parent


def _hidden_from_the_service(path: Path) -> bool:
    """Under ProtectHome= (/root, /home) or PrivateTmp= (/tmp, /var/tmp): the service sees none of it."""
    return any(path.resolve().is_relative_to(top) for top in ("/root", "/home", "/tmp", "/var/tmp"))


def _write_venv(opt: Path, python: str) -> None:
    """/opt/syncd: bin/python → Debian's, site-packages → this run's (a symlink, bound too)."""
    site = Path(sysconfig.get_paths()["purelib"])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (opt / "bin").mkdir(parents=True)
    (opt / "lib" / version).mkdir(parents=True)
    (opt / "bin" / "python").symlink_to(python)
    (opt / "lib" / version / "site-packages").symlink_to(site)
    (opt / "pyvenv.cfg").write_text(f"home = {Path(python).parent}\ninclude-system-site-packages = false\n")
    script = opt / "bin" / "syncd"
    script.write_text("#!/opt/syncd/bin/python\nimport sys\nfrom syncd.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)


def _write_crm(path: Path, rows: int) -> None:
    from syncd.demo import _create_crm

    _create_crm(f"sqlite:///{path}", rows)


def _readable(*paths: Path) -> None:
    """pytest's temporary directories are 0700; the service's dynamic user must read these."""
    for top in paths:
        for path in [top, *top.rglob("*")]:
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o444 | (0o111 if path.is_dir() or mode & 0o100 else 0))


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    if os.geteuid() != 0:
        unavailable("booting a container needs root")
    nspawn = shutil.which("systemd-nspawn")
    if nspawn is None:
        unavailable("systemd-nspawn is not installed (Debian: apt-get install systemd-container)")
    if shutil.which("nsenter") is None:
        unavailable("nsenter is not installed (util-linux)")
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    code = _installed_code()
    shared = sorted({ROOT, site, code}, key=str)  # seen by the container at the same paths
    python = _system_python()

    base = tmp_path_factory.mktemp("boot")
    opt, etc, units = base / "opt", base / "etc-syncd", base / "units"
    _write_venv(opt, python)
    (etc / "credentials").mkdir(parents=True)
    (etc / "syncd.toml").write_text(CONFIG)
    _write_crm(etc / "crm.db", 5)
    (units / "syncd.service.d").mkdir(parents=True)
    shutil.copy(UNIT, units / "syncd.service")  # as shipped
    # A checkout under /root, /home or /tmp (a CI clone, say): ProtectHome= and PrivateTmp=
    # would hide the code itself, and /root is 0700 anyway. Bring back just those paths.
    hidden = [f"BindReadOnlyPaths={path}" for path in shared if _hidden_from_the_service(path)]
    properties = ["ProtectHome=tmpfs", *hidden] if hidden else []
    test_settings = [f"WatchdogSec={WATCHDOG_S}", "RestartSec=1", *properties]
    (units / "syncd.service.d" / "test.conf").write_text("[Service]\n" + "\n".join(test_settings) + "\n")
    (base / "machine-id").write_text(uuid.uuid4().hex + "\n")  # not a first boot: no presets enabling services
    _readable(opt, etc, units)
    token = etc / "credentials" / "api-token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    (etc / "credentials").chmod(0o700)

    binds = [f"--bind-ro={path}" for path in shared if not any(path.is_relative_to(p) and path != p for p in shared)]
    binds += [f"--bind-ro={opt}:/opt/syncd", f"--bind-ro={etc}:/etc/syncd"]
    console = base / "console.log"
    command = [
        nspawn, "--quiet", "--volatile=yes", "--directory=/", "--boot", "--register=no", "--keep-unit",
        f"--machine=syncd-boot-{os.getpid()}", "--console=passive", "--private-network",
        f"--bind-ro={base / 'machine-id'}:/etc/machine-id", f"--bind={units}:/etc/systemd/system", *binds,
        "--", "systemd.firstboot=off",
    ]  # fmt: skip
    with console.open("wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        def leader() -> int | None:
            if process.poll() is not None:
                unavailable(f"systemd-nspawn exited with {process.returncode}: " + console.read_text()[-1500:])
            # nspawn forks helpers before exec'ing the container's init: wait for systemd itself.
            children = psutil.Process(process.pid).children()
            return next((c.pid for c in children if c.name() == "systemd"), None)

        box = Machine(process, wait_for(leader, 30, "the container's init"), etc, console)
        # "degraded" is fine: a volatile root fails units like systemd-machine-id-commit.
        box.wait_for(
            lambda: box.run("systemctl", "is-system-running", "--wait", timeout=60).stdout.strip()
            in ("running", "degraded"),
            "the container's boot",
            timeout=90,
        )
        simulator = box.run(
            "systemd-run", "--unit=syncd-simulator", "--property=DynamicUser=yes",
            *(f"--property={p}" for p in properties),
            "/opt/syncd/bin/syncd", "simulate-api", "--port", str(PORT), "--token", TOKEN,
        )  # fmt: skip
        assert simulator.returncode == 0, simulator.stderr
        try:
            box.wait_for(lambda: _health(box), "the simulator")
        except AssertionError as error:
            log = box.run("journalctl", "-u", "syncd-simulator", "--no-pager").stdout
            raise AssertionError(f"{error}\n{log}") from None
        yield box
    finally:
        _power_off(process)


def _health(box: Machine) -> bool:
    try:
        return box.http_get("/_sim/health")["status"] == "ok"
    except AssertionError:
        return False


def _power_off(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM makes nspawn shut the container down in order; SIGKILL if that hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait(timeout=10)


def delivered(box: Machine) -> int:
    return len(box.http_get("/_sim/records?datastore-id=1466")["records"])


# ---------------------------------------------------------------------------- tests
# In file order, on one container: each test leaves the service running unless it says so.


def test_start_returns_at_ready_and_the_sync_delivers(machine: Machine) -> None:
    # No crm-password file exists: the shipped unit must start without one.
    machine.run("systemctl", "start", "syncd", check=True)  # Type=notify: returns after READY=1
    unit = machine.show("syncd", "Type", "ActiveState", "SubState", "StatusText", "Documentation")
    assert (unit["Type"], unit["ActiveState"], unit["SubState"]) == ("notify", "active", "running")
    assert unit["StatusText"].startswith("1 sync")  # what the daemon reports, e.g. "1 sync: 1 ok"
    assert unit["Documentation"] == "file:/opt/syncd/share/doc/syncd/README.md"
    machine.wait_for(lambda: delivered(machine) == 5, "5 records at the simulator")

    [(started, entry)] = machine.events("started")
    assert started["pid"] == int(machine.show("syncd", "MainPID")["MainPID"])
    assert started["version"] not in ("", "unknown")
    assert entry["PRIORITY"] == "6" and entry["SYSLOG_IDENTIFIER"] == "syncd"
    assert not machine.journal("-p", "err")  # a clean start has nothing at err
    # The first start created the state database, extending the start timeout meanwhile.
    assert machine.events("migrating_state_database") and machine.events("state_database_migrated")


def test_the_log_recipes_of_the_guide_run_as_written(machine: Machine) -> None:
    if machine.run("sh", "-c", "command -v jq").returncode != 0:
        unavailable("jq is not installed (apt-get install jq)")
    # Every journalctl line in the shell blocks of the guide and of README's Operations.
    text = GUIDE.read_text() + (ROOT / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in text.split("```sh")[1:]]
    recipes = [
        line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.startswith("journalctl")
    ]
    assert len(recipes) >= 7, recipes
    for recipe in recipes:
        result = machine.sh(recipe.replace(" -f ", " --no-pager "))  # -f would follow forever
        assert result.returncode == 0, f"{recipe}\n{result.stderr}"
        assert result.stderr == "", f"{recipe}\n{result.stderr}"
    # The pretty-printing recipe shows syncd's lines although systemd's own are plain text.
    pretty = machine.sh("journalctl -u syncd -o cat | jq -cR 'fromjson?'", check=True).stdout
    assert '"event":"started"' in pretty
    # (What the README used to say: jq stops at systemd's "Starting syncd.service..." line.)
    assert machine.sh("journalctl -u syncd -o cat | jq -c .").returncode != 0


def test_reload_applies_a_config_and_refuses_a_broken_one_with_the_reason_at_err(machine: Machine) -> None:
    pid = machine.show("syncd", "MainPID")["MainPID"]
    config = machine.etc / "syncd.toml"
    # A drain longer than the unit's TimeoutStopSec=30 is applied, with a warning.
    config.write_text('drain_timeout = "40s"\n' + CONFIG.replace('interval = "1s"', 'interval = "2s"'))
    machine.run("systemctl", "reload", "syncd", check=True)
    machine.wait_for(lambda: machine.events("config_reloaded"), "config_reloaded")
    [(warning, entry)] = machine.wait_for(lambda: machine.events("drain_timeout_exceeds_stop_timeout"), "the warning")
    assert (warning["drain_timeout_s"], warning["stop_timeout_s"], entry["PRIORITY"]) == (40, 30, "4")

    config.write_text(CONFIG + "\nnot_a_setting = 1\n")
    try:
        refused = machine.run("systemctl", "reload", "syncd")
        assert refused.returncode != 0
        unit = machine.show("syncd", "ActiveState", "MainPID")
        assert (unit["ActiveState"], unit["MainPID"]) == ("active", pid)  # still running, same process
        errors = machine.run("journalctl", "-u", "syncd", "-p", "err", "-o", "cat", "--no-pager", check=True).stdout
        assert "not_a_setting" in errors, errors  # the reason, not only systemd's "Reload failed"
    finally:
        config.write_text(CONFIG)


def test_a_hung_daemon_is_killed_by_the_watchdog_with_its_stacks_at_err_and_restarted(machine: Machine) -> None:
    before = machine.show("syncd", "MainPID", "NRestarts")
    # ("kill -STOP 0" would stop this test's own process group.)
    assert int(before["MainPID"]) > 1, "syncd is not running"
    machine.run("kill", "-STOP", before["MainPID"], check=True)  # a main loop that stops pinging

    def restarted() -> dict[str, str] | None:
        unit = machine.show("syncd", "MainPID", "NRestarts", "ActiveState")
        fresh = unit["MainPID"] not in ("0", before["MainPID"]) and unit["ActiveState"] == "active"
        return unit if fresh else None

    unit = machine.wait_for(restarted, "a restart after the watchdog kill", timeout=WATCHDOG_S * 10)
    assert int(unit["NRestarts"]) == int(before["NRestarts"]) + 1
    errors = machine.run("journalctl", "-u", "syncd", "-p", "err", "-o", "cat", "--no-pager", check=True).stdout
    assert "Watchdog timeout" in errors
    assert "Fatal Python error: Aborted" in errors  # PYTHONFAULTHANDLER's dump, at err
    assert re.search(r'File ".*/syncd/daemon\.py", line \d+ in _loop', errors), errors


def test_stop_drains_and_exits_cleanly(machine: Machine) -> None:
    machine.run("systemctl", "stop", "syncd", check=True)
    unit = machine.show("syncd", "ActiveState", "Result", "ExecMainStatus")
    assert (unit["ActiveState"], unit["Result"], unit["ExecMainStatus"]) == ("inactive", "success", "0")
    assert machine.events("stopped")


def test_a_config_error_is_not_restarted(machine: Machine) -> None:
    config = machine.etc / "syncd.toml"
    config.write_text(CONFIG.replace('url = "sqlite:////etc/syncd/crm.db"', 'url = "nonsense"'))
    try:
        machine.run("systemctl", "reset-failed", "syncd")
        assert machine.run("systemctl", "start", "syncd").returncode != 0
        unit = machine.show("syncd", "ActiveState", "ExecMainStatus")
        # "failed", not "activating (auto-restart)": RestartPreventExitStatus=2.
        assert (unit["ActiveState"], unit["ExecMainStatus"]) == ("failed", "2")
        errors = machine.run("journalctl", "-u", "syncd", "-p", "err", "-o", "cat", "--no-pager", check=True).stdout
        assert "sources.crm.url" in errors or "nonsense" in errors, errors
    finally:
        config.write_text(CONFIG)
