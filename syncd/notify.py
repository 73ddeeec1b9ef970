"""The systemd notification protocol (sd_notify(3)), without a dependency.

systemd promises this protocol is stable and publishes a self-contained Python
example of it (man/notify-selfcontained-example.py); this module follows that
example instead of pulling in ``sdnotify`` (unmaintained since 2017) or
``systemd-python`` (a C extension that needs libsystemd headers to install).

The protocol: ``$NOTIFY_SOCKET`` names an ``AF_UNIX``/``SOCK_DGRAM`` socket (a path,
or an abstract name written with a leading ``@``); a message is one datagram of
newline-separated ``KEY=VALUE`` assignments. Outside systemd the variable is unset
and every call here is a cheap no-op, so callers never have to ask first.

Sending never raises: a daemon must not die because its supervisor's socket went
away (``systemctl daemon-reexec``, a test harness that closed its end, ...).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Talks to the service manager named by ``$NOTIFY_SOCKET``.

    The environment is read once, at construction: systemd sets it before exec and
    it does not change afterwards. Each message opens, sends on and closes its own
    socket, like the reference example; that costs microseconds, keeps no state to
    guard between threads, and survives the manager re-creating its socket.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (we run under a ``Type=notify`` unit)."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram with ``KEY=VALUE`` for each field, in order.

        ``notify(READY=1, STATUS="syncing")``. Returns whether it was sent. A newline
        inside a value would start a new assignment (a STATUS built from an error
        message could otherwise smuggle in ``READY=1`` or ``MAINPID=``), so newlines
        in values are folded into spaces.
        """
        if self._address is None or not fields:
            return False
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message.encode())
        except OSError as error:
            log.debug("sd_notify failed: %s (%s)", error, message.split("\n", 1)[0])
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) finished: ``READY=1``, optionally with a STATUS."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping; send it every :meth:`watchdog_interval` seconds."""
        return self.notify(WATCHDOG=1)

    def reloading(self) -> bool:
        """A reload started. ``MONOTONIC_USEC`` is required by ``Type=notify-reload``
        (without it ``systemctl reload`` hangs until its timeout) and ignored by older
        systemd, so it is always sent. Follow with :meth:`ready` when done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> bool:
        """Shutdown started (send as soon as SIGTERM is seen, before draining)."""
        return self.notify(STOPPING=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start/stop timeout fires (slow
        migrations at start, a long drain at stop)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    @contextmanager
    def extending_timeout(self, every: float, status: str | None = None) -> Iterator[None]:
        """While the block runs, ask for more time every ``every`` seconds.

        For work of unknown length before ``READY=1`` (a state database migration):
        each message grants ``3 * every`` seconds from now, so one late tick is not
        fatal, and once the block ends the messages stop and the unit's own timeout
        applies again. ``status`` is shown by ``systemctl status`` meanwhile. A no-op
        outside systemd.
        """
        if not self.enabled:
            yield
            return
        done = threading.Event()

        def tick() -> None:
            while True:
                self.extend_timeout(3 * every)
                if done.wait(every):
                    return

        if status is not None:
            self.status(status)
        thread = threading.Thread(target=tick, name="extend-timeout", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings, or None when no watchdog is armed for us.

        Half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends, so one late
        ping is not yet fatal.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000


def _socket_address(value: str) -> str | None:
    """The ``connect()`` address for ``$NOTIFY_SOCKET``, or None when unusable."""
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        return "\0" + value[1:]  # the abstract namespace: a leading NUL byte
    if value:
        # e.g. "vsock:..." inside VMs; the reference example rejects it too.
        log.debug("unsupported NOTIFY_SOCKET %r; notifications disabled", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` when it is set, valid and (per ``WATCHDOG_PID``) ours."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # inherited from a parent that is the one being watched
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _one_line(value: str | int) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")
