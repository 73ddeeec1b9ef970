"""The HTTP transport of delivery.py: each request leaves in one write, and not after its deadline.

httpcore (h11) writes a request's headers and its body in separate socket writes, with
Python code in between; a daemon paused between them (SIGSTOP, a frozen VM) would let the
rest of a request it sent under its lease land after another daemon took the sync over.
Here a connection's stream buffers the writes of one request and sends them all at once when
the response is first read (h11 writes the whole request before it reads), and right before
that send it compares the local monotonic clock with the deadline the sender set with
`send_by`: past it, nothing is sent and `LateToSend` is raised (the connection is closed).

The window left is the few interpreter steps between that comparison and the send system
call. On plain TCP the send buffer is sized for the request first, so one `send()` takes it
all; under TLS, OpenSSL writes one record (16 KiB) per system call, all within one call
into it, with no Python code in between.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import httpcore
import httpx

__all__ = ["LateToSend", "OneWriteTransport", "send_by"]

_SEND_BY: contextvars.ContextVar[float | None] = contextvars.ContextVar("syncd_send_by", default=None)

# Room in the send buffer beyond the request itself (the kernel's own accounting per packet).
_BUFFER_HEADROOM = 64 * 1024


class LateToSend(Exception):
    """The request was not sent: its deadline (a lease proof) had passed when it was to go out."""


@contextlib.contextmanager
def send_by(deadline: float | None) -> Iterator[None]:
    """Requests made in this block on this thread go out only before monotonic `deadline`."""
    token = _SEND_BY.set(deadline)
    try:
        yield
    finally:
        _SEND_BY.reset(token)


class _OneWriteStream(httpcore.NetworkStream):
    """A connection's stream: writes are held until the first read, then sent in one go."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream
        self._held: list[bytes] = []
        self._write_timeout: float | None = None

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            self._held.append(buffer)
            self._write_timeout = timeout

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            self._flush()
        return self._stream.read(max_bytes, timeout)

    def _flush(self) -> None:
        data, self._held = b"".join(self._held), []
        sock: socket.socket = self._stream.get_extra_info("socket")
        deadline = _SEND_BY.get()
        try:
            if isinstance(sock, ssl.SSLSocket):
                _fit_send_buffer(sock, len(data) + len(data) // 8)  # and TLS framing
                sock.settimeout(self._write_timeout)
                _check(deadline)
                sock.sendall(data)
                return
            _fit_send_buffer(sock, len(data))
            sock.setblocking(False)  # no poll() first: the check is followed by the send itself
            _check(deadline)
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):  # larger than the host lets a send buffer be (net.core.wmem_max)
                sock.settimeout(self._write_timeout)
                sock.sendall(memoryview(data)[sent:])
        except TimeoutError as error:  # mapped as httpcore's own write() maps them
            raise httpcore.WriteTimeout(error) from error
        except OSError as error:
            raise httpcore.WriteError(error) from error

    def close(self) -> None:
        self._held = []
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _OneWriteStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _check(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise LateToSend("not sent: its deadline had passed")


def _fit_send_buffer(sock: socket.socket, size: int) -> None:
    """Let the kernel take `size` bytes in one send (it caps the value at net.core.wmem_max)."""
    want = size + _BUFFER_HEADROOM
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * want:  # Linux reports twice the value set
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)


class _OneWriteBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _OneWriteStream(self._backend.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _OneWriteStream(self._backend.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class OneWriteTransport(httpx.HTTPTransport):
    """httpx's own transport (pooling, keep-alive, timeouts, TLS) over one-write streams."""

    def __init__(self, *, limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> None:
        # httpx.HTTPTransport takes no network backend; all its __init__ does is build the
        # pool (`_pool`) that its handle_request() and close() use, so that pool is built here
        # with one (tests/test_delivery.py fails if that stops working).
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_OneWriteBackend(),
        )
