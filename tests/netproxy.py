"""A TCP proxy for tests that can break the network between a client and a server.

``NetProxy(target_port)`` listens on a free loopback port and forwards every connection to
the target. It runs its own asyncio loop in a thread, so synchronous tests that drive
subprocesses can call it:

* ``cut()``: close every open connection (FIN both ways), as a restarting load balancer does;
* ``reset()``: abort every open connection with an RST (``SO_LINGER`` 0);
* ``blackhole()``: move no more bytes, on open and on new connections, until ``restore()``.
  Nothing is closed and nothing is dropped: like a dead link, the peers only notice through
  their own timeouts (keepalive pings), and what was held flows again after ``restore()``;
* ``lose_replies(n)``: the next ``n`` answers the server sends are dropped with their
  connection (RST): the request was carried out, its reply never arrives.

Use the ``netproxy`` fixture (import it into the test module): ``proxy = netproxy(server.port)``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest


class _Conn:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]

    def close(self) -> None:
        for w in self.writers():
            w.close()

    def reset(self) -> None:
        for w in self.writers():
            sock = w.get_extra_info("socket")
            if sock is not None and sock.fileno() != -1:  # -1: the transport closed it already
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()


class NetProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._flowing: asyncio.Event | None = None
        self._lose = 0  # server answers still to drop (with their connection)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control (from the test's thread) ---------------------------------------------------

    def start(self) -> NetProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut(self) -> int:
        """Close every open connection; returns how many there were."""
        return self._call(self._each(_Conn.close))

    def reset(self) -> int:
        """Abort every open connection with an RST; returns how many there were."""
        return self._call(self._each(_Conn.reset))

    def blackhole(self) -> None:
        self._call(self._set_flowing(False))

    def restore(self) -> None:
        self._call(self._set_flowing(True))

    def lose_replies(self, n: int = 1) -> None:
        self._call(self._set_lose(n))

    def open_connections(self) -> int:
        return len(self._conns)

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # --- the loop's side ------------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self._conns):
            conn.reset()
        self._conns.clear()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _each(self, action: Callable[[_Conn], None]) -> int:
        conns = list(self._conns)
        for conn in conns:
            action(conn)
        self._conns.clear()
        return len(conns)

    async def _set_flowing(self, on: bool) -> None:
        assert self._flowing is not None
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _set_lose(self, n: int) -> None:
        self._lose = n

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            await self._flowing.wait()  # blackholed: the connection never reaches the server
            if conn not in self._conns:
                return
            try:
                up_reader, conn.upstream = await asyncio.open_connection(*self.target)
            except OSError:
                conn.reset()
                return
            await asyncio.gather(self._pipe(reader, conn.upstream, conn), self._pipe(up_reader, writer, conn, True))
        finally:
            self._conns.discard(conn)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn,
                    replies: bool = False) -> None:  # fmt: skip
        assert self._flowing is not None
        try:
            while True:
                data = await reader.read(65536)
                await self._flowing.wait()  # hold bytes (and EOF) while blackholed
                if not data:
                    break
                if replies and self._lose > 0:
                    self._lose -= 1
                    conn.reset()
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()


@pytest.fixture
def netproxy() -> Iterator[Callable[[int], NetProxy]]:
    """Make proxies to a target port (a server's port survives its restarts); stopped at the end."""
    made: list[NetProxy] = []

    def make(target_port: int) -> NetProxy:
        proxy = NetProxy(target_port).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()
