"""syncd.notify against a real AF_UNIX datagram socket owned by the test."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.notify import SystemdNotifier


@pytest.fixture(params=["path", "abstract"])
def manager(request, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A stand-in for systemd: (value for NOTIFY_SOCKET, the receiving socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
        env_value = address
    else:
        name = f"syncd-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        env_value = "@" + name
    sock.settimeout(2)
    with sock:
        yield env_value, sock


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_each_message_arrives(manager: tuple[str, socket.socket]) -> None:
    address, sock = manager
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready()
    assert receive(sock) == ["READY=1"]
    assert notifier.ready("syncing 2 syncs")
    assert receive(sock) == ["READY=1", "STATUS=syncing 2 syncs"]
    assert notifier.status("draining")
    assert receive(sock) == ["STATUS=draining"]
    assert notifier.watchdog()
    assert receive(sock) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert receive(sock) == ["STOPPING=1"]
    assert notifier.extend_timeout(2.5)
    assert receive(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]
    assert notifier.notify(STATUS="x", ERRNO=5)
    assert receive(sock) == ["STATUS=x", "ERRNO=5"]


def test_reloading_carries_monotonic_usec(manager: tuple[str, socket.socket]) -> None:
    address, sock = manager
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert SystemdNotifier({"NOTIFY_SOCKET": address}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    reloading, monotonic = receive(sock)
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_newlines_cannot_inject_assignments(manager: tuple[str, socket.socket]) -> None:
    address, sock = manager
    SystemdNotifier({"NOTIFY_SOCKET": address}).status("failed: boom\nREADY=1")
    assert receive(sock) == ["STATUS=failed: boom READY=1"]


def test_reads_os_environ_by_default(manager, monkeypatch) -> None:
    address, sock = manager
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert SystemdNotifier().watchdog()
    assert receive(sock) == ["WATCHDOG=1"]


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234"])
def test_without_a_usable_socket_every_call_is_a_no_op(value: str | None) -> None:
    notifier = SystemdNotifier({} if value is None else {"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False


def test_send_errors_never_raise(tmp_path: Path) -> None:
    gone = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled
    assert gone.ready() is False
    assert SystemdNotifier({"NOTIFY_SOCKET": "@syncd-test-nobody-listens"}).watchdog() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # someone else's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert SystemdNotifier(env).watchdog_interval() == expected


def test_extending_timeout_asks_for_more_time_until_the_block_ends(manager: tuple[str, socket.socket]) -> None:
    address, sock = manager
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    with notifier.extending_timeout(0.05, status="migrating the state database"):
        assert receive(sock) == ["STATUS=migrating the state database"]
        # Each message grants three periods, so one late tick does not time out the start.
        for _ in range(3):
            assert receive(sock) == ["EXTEND_TIMEOUT_USEC=150000"]
    # After the block: silence (at most one tick was on its way), the unit's own timeout applies.
    sock.settimeout(0.3)
    late = []
    with pytest.raises(TimeoutError):
        while len(late) < 3:
            late.append(receive(sock))
    assert len(late) <= 1


def test_extending_timeout_outside_systemd_just_runs_the_block() -> None:
    ran = []
    with SystemdNotifier({}).extending_timeout(0.01):
        ran.append(True)
    assert ran == [True]
