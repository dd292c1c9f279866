#!/usr/bin/env python3
"""Fan-out: N WebSocket watchers on /ws/training, events from ``simulate`` jobs on a timer.

Each watcher records, for every logged event, ``receipt wall-clock ms - event["timestamp"]``.
The server stamps ``timestamp`` as integer milliseconds (``int(time.time()*1000)``, truncated) when
it builds the event, so a figure carries up to +1 ms of rounding: latencies below ~1 ms are not
resolved. (The intended-emit-time method of the anchors needs a server-side field; this script
does not modify the server.) Events come from ``--jobs`` concurrent ``simulate`` jobs with
``stepMs`` = ``--step-ms``: their timers do not wait for delivery (open loop), so a server stall
shows up as latency. Every ``seq`` gap is a loss: per watcher, sent (events logged after it
connected) = received + losses. Also reported: server and load-generator CPU, server RSS, and
server memory per idle connection ((RSS after connecting - RSS before) / N, after 1 s idle), and
the server's own count of events delivered and clients dropped as slow (``GET /metrics``).

``--target node`` runs the same scenario against the Node reference (``bench/node-ref/``, the
seed's Express + ``ws`` design), ``--target both`` against mangwale and then the Node reference
in one run, with the same pinning, and prints mangwale / node ratios. The Node reference gives
this script what it reads from mangwale: ``seq`` on every event and ``headSeq`` in the greeting
(losses), a millisecond ``timestamp`` stamped when the event is built (latency), ``/healthz``
(``headSeq``, ``streams``) and its own delivered count; the seed had none of these but the
timestamp. It has no limit on a slow client's buffer (``ws`` buffers without bound; its 30 s
heartbeat ends a peer that stops answering), so ``srv dropped`` is 0.

Watchers use a minimal asyncio WebSocket client (``--client raw``, the default) so that the load
generator stays far below its core; ``--client websockets`` uses the library's client (about 4x
the CPU per message: at 1,000 watchers most of the measured latency is then the generator
working through 1,000 receipts one after the other).

Slow consumers: ``--stalled N`` adds N watchers that connect and then stop reading (their
receive window closes, as with a hung peer). Figures are for the healthy watchers; the stalled
ones are accounted separately (``stalled``), with how their connections ended, and the server
RSS is sampled every second (``rss_samples``, ``rss_max_bytes``).

    python bench/fanout.py --watchers 100 --jobs 1 --steps 100 --step-ms 100    # 10 ev/s, 10 s
    python bench/fanout.py --watchers 1000 --jobs 5 --steps 200 --step-ms 100   # 50 ev/s -> 50k deliveries/s
    python bench/fanout.py --watchers 1000 --stalled 10 --jobs 5 --step-ms 100 --duration 60
    python bench/fanout.py --target both --watchers 1000 --jobs 10 --step-ms 1000 --duration 20  # 10 ev/s
    python bench/fanout.py --target both --watchers 1000 --jobs 20 --steps 50 --step-ms 0          # saturated
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

SEQ = b'"seq":'
TS = b'"timestamp":'
HEAD = b'"headSeq":'


def _int_after(msg: bytes, key: bytes) -> int | None:
    """The integer after the last ``key`` in ``msg`` (top-level fields come last in the JSON)."""
    i = msg.rfind(key)
    if i < 0:
        return None
    i += len(key)
    j = i
    n = len(msg)
    while j < n and 48 <= msg[j] <= 57:
        j += 1
    return int(msg[i:j]) if j > i else None


class Watcher:
    __slots__ = ("closed", "dupes", "gaps", "head", "last", "lat", "measure", "received", "t_last", "ws")

    def __init__(self) -> None:
        self.ws: Any = None
        self.head = -1
        self.last = -1
        self.received = 0
        self.gaps = 0
        self.dupes = 0
        self.lat: list[float] = []
        self.closed: str | None = None
        self.t_last = 0.0  # wall-clock ms of the last event's receipt

    async def open(self, url: str) -> None:
        self.ws = await connect(url, compression=None, ping_interval=None, max_queue=None, open_timeout=60)
        first = await self.ws.recv(decode=False)
        head = _int_after(first, HEAD)
        assert head is not None, first[:200]
        self.head = self.last = head

    async def run(self) -> None:
        recv = self.ws.recv
        lat = self.lat
        now = time.time
        try:
            while True:
                msg = await recv(decode=False)
                t = now() * 1000.0
                seq = _int_after(msg, SEQ)
                if seq is None:
                    continue  # control message (pong, ...)
                if seq <= self.last:
                    self.dupes += 1
                    continue
                self.gaps += seq - self.last - 1
                self.last = seq
                self.received += 1
                self.t_last = t
                ts = _int_after(msg, TS)
                if ts is not None:
                    lat.append(t - ts)
        except ConnectionClosed as exc:
            self.closed = f"{exc.rcvd.code if exc.rcvd else 'none'}"
        except asyncio.CancelledError:
            pass

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.run())

    def stall(self) -> None:
        self.ws.transport.pause_reading()

    async def aclose(self) -> None:
        await self.ws.close()


class RawWatcher(asyncio.Protocol):
    """A minimal WebSocket client on an asyncio Protocol: handshake, unmasked server frames,
    masked pong and close. It costs the load generator a few microseconds per message where
    the ``websockets`` client costs ~20, which at 1,000 watchers would otherwise be most of the
    measured latency (1,000 receipts are processed one after the other on one core)."""

    __slots__ = (
        "buf",
        "closed",
        "dupes",
        "gaps",
        "head",
        "last",
        "lat",
        "open_",
        "ready",
        "received",
        "stalled",
        "t_last",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: Any = None
        self.buf = bytearray()
        self.open_ = False
        self.ready: asyncio.Future[None] | None = None
        self.head = self.last = -1
        self.received = self.gaps = self.dupes = 0
        self.lat: list[float] = []
        self.closed: str | None = None
        self.stalled = False
        self.t_last = 0.0  # wall-clock ms of the last event's receipt

    async def open(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        u = urlsplit(url)
        self.ready = loop.create_future()
        await loop.create_connection(lambda: self, u.hostname, u.port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await asyncio.wait_for(self.ready, 60)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            self.closed = "reset" if exc else "lost"
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the greeting"))

    def data_received(self, data: bytes) -> None:
        t = time.time() * 1000.0
        buf = self.buf
        buf += data
        if not self.open_:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if b" 101 " not in buf[:end].split(b"\r\n", 1)[0]:
                self.transport.close()
                return
            del buf[: end + 4]
            self.open_ = True
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, size = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if size == 126:
                if n - pos < 4:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif size == 127:
                if n - pos < 10:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n - pos < head + size:
                break
            payload = bytes(buf[pos + head : pos + head + size])
            pos += head + size
            op = b0 & 0x0F
            if op == 1:
                self._text(payload, t)
            elif op == 9:
                self._send(0xA, payload)
            elif op == 8:
                self.closed = str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "1005"
                self._send(0x8, payload[:2])
                self.transport.close()
        del buf[:pos]

    def _text(self, msg: bytes, t: float) -> None:
        if self.head < 0:
            head = _int_after(msg, HEAD)
            assert head is not None, msg[:200]
            self.head = self.last = head
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
            return
        seq = _int_after(msg, SEQ)
        if seq is None:
            return  # control message (pong, ...)
        if seq <= self.last:
            self.dupes += 1
            return
        self.gaps += seq - self.last - 1
        self.last = seq
        self.received += 1
        self.t_last = t
        ts = _int_after(msg, TS)
        if ts is not None:
            self.lat.append(t - ts)

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def start(self) -> None:
        return None  # data_received does the work

    def stall(self) -> None:
        """Stop reading, as a peer that hangs does: the server's writes back up."""
        self.stalled = True
        self.transport.pause_reading()

    async def aclose(self) -> None:
        if not self.transport.is_closing():
            self._send(0x8, (1000).to_bytes(2, "big"))
            self.transport.close()


async def wait_jobs_done(http: httpx.AsyncClient, ids: list[str], timeout: float) -> list[str]:
    """Wait until no job is queued or running (the server holds only this run's jobs), asking
    ``/healthz`` five times a second: one cheap request, not one per job, so the wait costs the
    servers the same small load whatever the number of jobs. Then each job's final status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = (await http.get("/healthz")).json()["jobs"]
        if counts.get("queued", 0) + counts.get("running", 0) == 0:
            break
        await asyncio.sleep(0.2)
    statuses = [(await http.get(f"/training/jobs/{jid}")).json()["status"] for jid in ids]
    return [st if st in ("succeeded", "failed", "cancelled") else "timeout" for st in statuses]


async def _sample_rss(pid: int, out: list[tuple[float, int]], t0: float) -> None:
    while True:
        out.append((time.monotonic() - t0, common.rss_bytes(pid)))
        await asyncio.sleep(1.0)


async def run(args: argparse.Namespace, server: Any) -> dict[str, Any]:
    me = common.CpuMeter(__import__("os").getpid())
    kind = RawWatcher if args.client == "raw" else Watcher
    watchers: list[Any] = [kind() for _ in range(args.watchers + args.stalled)]
    rss_before = common.rss_bytes(server.pid)
    tcp_before = common.tcp_mem_pages()
    t_conn = time.monotonic()
    for i in range(0, len(watchers), args.batch):
        await asyncio.gather(*(w.open(server.ws_url) for w in watchers[i:i + args.batch]))
        await asyncio.sleep(0.01)
    connect_s = time.monotonic() - t_conn
    await asyncio.sleep(args.idle)
    rss_idle = common.rss_bytes(server.pid)
    tcp_idle = common.tcp_mem_pages()
    health = server.health()
    assert health["streams"] >= len(watchers), health

    stalled = watchers[args.watchers:]
    for w in stalled:
        w.stall()
    tasks = [t for t in (w.start() for w in watchers) if t is not None]
    m0 = server.stream_figures()
    spy = common.profile(server.pid, args.profile, args.steps * args.step_ms / 1000) if args.profile and server.name == "mangwale" else None
    srv = common.CpuMeter(server.pid).start()
    me.start()
    t0 = time.monotonic()
    t0_wall_ms = time.time() * 1000.0
    rss_samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(_sample_rss(server.pid, rss_samples, t0))
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        body = {"kind": "simulate", "params": {"steps": args.steps, "stepMs": args.step_ms}}
        for k in range(args.jobs):
            r = await http.post("/training/jobs", json=body)
            r.raise_for_status()
            ids.append(r.json()["id"])
            if k + 1 < args.jobs:
                await asyncio.sleep(args.step_ms / 1000 / args.jobs)  # spread the timers evenly
        expect_s = args.steps * args.step_ms / 1000
        statuses = await wait_jobs_done(http, ids, timeout=expect_s * 3 + 30)
        head = (await http.get("/healthz")).json()["headSeq"]
    # every healthy watcher should reach the final head; give the tail a moment
    deadline = time.monotonic() + args.drain
    while time.monotonic() < deadline and any(w.last < head and w.closed is None for w in watchers[: args.watchers]):
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    srv_frac = srv.stop()
    if spy is not None:
        spy.wait(60)
    me_frac = me.stop()
    sampler.cancel()
    rss_end = common.rss_bytes(server.pid)
    m1 = server.stream_figures()
    server_side = {k: m1[k] - m0[k] for k in ("delivered", "dropped_slow", "logged")}
    ended = sorted({str(w.closed) for w in stalled})  # "None": still open when the run ended
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(w.aclose() for w in watchers), return_exceptions=True)

    def account(group: list[Any]) -> dict[str, Any]:
        lat: list[float] = []
        sent_total = received_total = lost_total = with_loss = 0
        ok = True
        for w in group:
            sent = head - w.head
            losses = w.gaps + max(0, head - w.last)
            ok = ok and w.received + losses == sent
            sent_total += sent
            received_total += w.received
            lost_total += losses
            with_loss += bool(losses)
            lat.extend(w.lat)
        return {"sent": sent_total, "received": received_total, "lost": lost_total, "clients_with_loss": with_loss,
                "accounting_ok": ok, "lat": lat}

    healthy = account(watchers[: args.watchers])
    to_last = (max((w.t_last for w in watchers[: args.watchers]), default=0.0) - t0_wall_ms) / 1000.0
    stuck = account(stalled)
    stats = common.summarize(healthy.pop("lat"))
    stuck.pop("lat")
    valid, verdict = common.client_verdict(me_frac)
    events = head - min(w.head for w in watchers)
    received_total = healthy["received"] + stuck["received"]
    return {
        "params": vars(args),
        "client": args.client,
        "watchers": args.watchers,
        "events_per_s_target": args.jobs * 1000 / args.step_ms if args.step_ms > 0 else None,  # None: as fast as they come
        "events": events,
        "job_statuses": sorted(set(statuses)),
        # healthy watchers only; the stalled ones are under "stalled"
        "sent": healthy["sent"],
        "received": healthy["received"],
        "lost": healthy["lost"],
        "duplicates": sum(w.dupes for w in watchers),
        "clients_with_loss": healthy["clients_with_loss"],
        "clients_closed": sum(1 for w in watchers[: args.watchers] if w.closed is not None),
        "accounting_ok": healthy["accounting_ok"] and stuck["accounting_ok"],
        "stalled": {**stuck, "clients": len(stalled), "closed": ended},
        "elapsed_s": elapsed,
        "deliveries_per_s": healthy["received"] / elapsed if elapsed else 0.0,
        # The same count over the time to the last event's receipt (not to the end of the
        # harness's polling): the saturated scenario's rate.
        "deliveries_per_s_to_last": healthy["received"] / to_last if to_last > 0 else 0.0,
        "latency_ms": stats,
        "latency_resolution_ms": 1,
        "latency_basis": "receipt wall clock - server event timestamp (integer ms, truncated)",
        "server_cpu": srv_frac,
        "server_cpu_us_per_delivery": (srv.cpu / received_total * 1e6) if received_total else None,
        "client_cpu": me_frac,
        "valid": valid,
        "verdict": verdict,
        "connect_s": connect_s,
        "rss_before_bytes": rss_before,
        "rss_idle_bytes": rss_idle,
        "rss_end_bytes": rss_end,
        "rss_max_bytes": max([b for _, b in rss_samples] + [rss_end]),
        "rss_samples": rss_samples,
        "idle_bytes_per_connection": (rss_idle - rss_before) / len(watchers),
        "kernel_tcp_mem_pages": {"before": tcp_before, "idle": tcp_idle},
        # The server's own count (GET /metrics) over the measured run: delivered should equal
        # received unless a client was dropped as slow.
        "server_metrics": server_side,
        "server_delivered": server_side["delivered"],
        "server_dropped_slow": server_side["dropped_slow"],
        # Open at the end, as the server counts them: a stalled watcher cannot see its connection
        # reset (it does not read), so this is where dropping the stalled ones shows.
        "server_connections_end": m1["connections"],
    }


RATIOS = {
    "p50": lambda r: r["latency_ms"]["p50"],
    "p99": lambda r: r["latency_ms"]["p99"],
    "deliveries/s": lambda r: r["deliveries_per_s"],
    "deliveries/s to last": lambda r: r["deliveries_per_s_to_last"],
    "srv us/delivery": lambda r: r["server_cpu_us_per_delivery"],
    "idle B/conn": lambda r: r["idle_bytes_per_connection"],
    "connect s": lambda r: r["connect_s"],
}


def run_target(target: str, args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    env = {"MANGWALE_RUNNER_CONCURRENCY": str(max(2, args.jobs)),
           "MANGWALE_WS_MAX_CONNECTIONS": str(max(10000, args.watchers + args.stalled + 100)),
           "MANGWALE_WS_CLIENT_QUEUE": "1000"}
    prefix = None
    load = common.loadavg()
    if args.store:
        import secrets

        prefix = f"bench-{secrets.token_hex(4)}:"
        env |= {"MANGWALE_STORE_BACKEND": args.store, "MANGWALE_STORE_PREFIX": prefix}
    with common.make_server(target, pin_cpu=0 if pin else None, env=env) as server:
        if pin:
            common.pin_self(1)
        gc.collect()
        res = asyncio.run(run(args, server))
        res["server"] = server.describe()
    if prefix is not None:
        import redis

        r = redis.Redis.from_url(args.store)
        for key in r.scan_iter(match=prefix + "*", count=1000):
            r.delete(key)
    res["target"] = target
    res["loadavg_before"] = load
    res["pinned"] = pin
    res["store"] = "redis" if args.store else ("tinydb" if target == "mangwale" else "memory")
    return res


def row(res: dict[str, Any], stalled: int) -> dict[str, Any]:
    lat = res["latency_ms"]
    out = {
        "target": res["target"], "store": res["store"], "watchers": res["watchers"], "ev/s": res["events_per_s_target"],
        "events": res["events"], "sent": res["sent"], "received": res["received"], "lost": res["lost"],
        "deliv/s": res["deliveries_per_s"], "to last": res["deliveries_per_s_to_last"], "p50 ms": lat["p50"], "p99 ms": lat["p99"], "max ms": lat["max"],
        "srv CPU": f"{res['server_cpu']:.0%}", "gen CPU": f"{res['client_cpu']:.0%}",
        "RSS MB": res["rss_end_bytes"] / 1e6, "KB/idle conn": res["idle_bytes_per_connection"] / 1024,
        "connect s": res["connect_s"], "srv delivered": res["server_delivered"], "srv dropped": res["server_dropped_slow"],
        "max RSS MB": res["rss_max_bytes"] / 1e6,
    }
    if stalled:
        out["stalled"] = stalled
        out["srv conns end"] = res["server_connections_end"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watchers", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=1, help="concurrent simulate jobs (events/s = jobs * 1000 / step-ms)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--step-ms", type=float, default=100.0)
    ap.add_argument("--batch", type=int, default=50, help="connect this many at a time, then pause 10 ms")
    ap.add_argument("--idle", type=float, default=1.0, help="seconds idle after connecting, before the RSS reading")
    ap.add_argument("--drain", type=float, default=5.0, help="seconds to wait for the tail after the jobs end")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of events (sets --steps to duration * 1000 / step-ms)")
    ap.add_argument("--stalled", type=int, default=0,
                    help="extra watchers that connect, then stop reading (slow-consumer scenario)")
    ap.add_argument("--client", choices=("raw", "websockets"), default="raw",
                    help="raw: a minimal asyncio WebSocket client (cheap); websockets: the library's client")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server to CPU 0 and generator to CPU 1")
    ap.add_argument("--store", default=None, metavar="URL",
                    help="run the server on a Redis store (e.g. redis://127.0.0.1:6379/0; keys under a "
                         "throw-away prefix, removed afterwards) instead of the embedded one (mangwale only)")
    common.add_target_arg(ap)
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="py-spy record mangwale while it is measured, collapsed stacks to FILE")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.duration is not None:
        args.steps = max(1, round(args.duration * 1000 / args.step_ms)) if args.step_ms > 0 else args.steps
    if args.store and args.target != "mangwale":
        ap.error("--store is a mangwale setting: use it with --target mangwale")
    pin = common.default_pin() and not args.no_pin
    common.raise_nofile(2 * (args.watchers + args.stalled) + 200)
    results = {t: run_target(t, args, pin) for t in common.targets(args.target)}
    common.print_table([row(r, args.stalled) for r in results.values()], list(row(next(iter(results.values())),
                       args.stalled)), "fan-out (latency: receipt - server timestamp, 1 ms resolution)")
    for r in results.values():
        print(f"{r['target']}: {r['verdict']} | accounting", "ok" if r["accounting_ok"] else "BROKEN")
    name = f"fanout-{args.watchers}" + ("-redis" if args.store else "")
    ok = all(r["accounting_ok"] for r in results.values())
    if args.target != "both":
        common.write_result(name if args.target == "mangwale" else f"{name}-node", results[args.target], args.out)
        return 0 if ok else 1
    ratios = common.ratios(results, RATIOS)
    common.print_ratios(ratios)
    common.write_result(f"{name}-both", {
        "target": "both", "targets": results, "ratios": ratios, "ratio_basis": "mangwale / node",
        "accounting_ok": ok, "valid": all(r["valid"] for r in results.values()),
    }, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
