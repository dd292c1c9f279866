"""Ports for the tests' own servers (mangwale, redis-server, proxies).

Each pytest-xdist worker hands out ports from a range of its own, below Linux's ephemeral range
(32768-60999, where the OS picks ports for outgoing connections), walking through it instead of
asking the OS for "any free port": so two workers never pick the same port between choosing it
and binding it, and a port a test is about to bind is never one the OS just gave a client.
``MANGWALE_TEST_PORT_BASE`` moves the ranges, for two suites running side by side on one machine
(two checkouts): give each its own base, 1,500 ports per pytest-xdist worker apart, below 32768.
"""

from __future__ import annotations

import itertools
import os
import socket

BASE = int(os.environ.get("MANGWALE_TEST_PORT_BASE", "20000"))
PER_WORKER = 1_500


def _worker_index() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw3"
    digits = name.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


_start = BASE + (_worker_index() % 8) * PER_WORKER
_cycle = itertools.cycle(range(_start, _start + PER_WORKER))


def free_port() -> int:
    """A port no one listens on now, not handed out lately by this worker."""
    for _ in range(PER_WORKER):
        port = next(_cycle)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {_start}..{_start + PER_WORKER - 1}")
