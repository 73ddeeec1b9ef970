"""A TCP proxy on loopback that the harness can cut and heal: the network between a daemon
and one of its databases.

Modes:
- ``pass``: bytes flow both ways;
- ``refuse``: open connections are reset and new ones are closed as soon as they arrive
  (a host that is down, a firewall that rejects);
- ``blackhole``: connections stay open and new ones are accepted, but no byte moves in
  either direction until the proxy is healed (a partition: the peers cannot tell that
  anything happened, a query simply does not answer);
- ``reset()`` aborts the connections open now and lets new ones pass (a NAT or load balancer
  forgetting its flows).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from typing import Literal

Mode = Literal["pass", "refuse", "blackhole"]
_CHUNK = 64 * 1024


class Proxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``target``, from a thread of its own."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()  # set while not blackholed; touched on the loop only
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"proxy-{target_port}", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing.set()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0, reuse_address=True)
        )
        self.port: int = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            _abort(writer)
            return
        self._writers.add(writer)
        try:
            await self._flowing.wait()  # a blackholed connect hangs, as a SYN into a partition would
            if self.mode == "refuse":
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(up_writer)
            try:
                await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
                _abort(up_writer)
        finally:
            self._writers.discard(writer)
            _abort(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ConnectionError):
            while True:
                await self._flowing.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # read before the cut: held back, delivered on heal
                writer.write(data)
                await writer.drain()
        # One side ended: end the other, so the pair goes away together.
        _abort(writer)

    # -- control, from any thread ---------------------------------------------------

    def _call(self, fn) -> None:  # type: ignore[no-untyped-def]
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def set_mode(self, mode: Mode) -> None:
        def apply() -> None:
            self.mode = mode
            if mode == "blackhole":
                self._flowing.clear()
            else:
                self._flowing.set()
            if mode == "refuse":
                self._abort_all()

        self._call(apply)

    def reset(self) -> None:
        """Abort every open connection; new ones pass (the mode is unchanged)."""
        self._call(self._abort_all)

    def heal(self) -> None:
        self.set_mode("pass")

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            _abort(writer)

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a RST rather than a FIN: the peer sees 'connection reset', as on a real cut."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
