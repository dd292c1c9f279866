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

    python bench/fanout.py --watchers 100 --jobs 1 --steps 100 --step-ms 100    # 10 ev/s, 10 s
    python bench/fanout.py --watchers 1000 --jobs 5 --steps 200 --step-ms 100   # 50 ev/s -> 50k deliveries/s
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import httpx  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

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
    __slots__ = ("ws", "head", "last", "received", "gaps", "dupes", "lat", "measure", "closed")

    def __init__(self) -> None:
        self.ws: Any = None
        self.head = -1
        self.last = -1
        self.received = 0
        self.gaps = 0
        self.dupes = 0
        self.lat: list[float] = []
        self.closed: str | None = None

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
                ts = _int_after(msg, TS)
                if ts is not None:
                    lat.append(t - ts)
        except ConnectionClosed as exc:
            self.closed = f"{exc.rcvd.code if exc.rcvd else 'none'}"
        except asyncio.CancelledError:
            pass


async def wait_jobs_done(http: httpx.AsyncClient, ids: list[str], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    statuses: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for jid in list(pending):
            st = (await http.get(f"/training/jobs/{jid}")).json()["status"]
            if st in ("succeeded", "failed", "cancelled"):
                pending.discard(jid)
                statuses[jid] = st
        if pending:
            await asyncio.sleep(0.2)
    return [statuses.get(j, "timeout") for j in ids]


SERVER_FIGURES = (
    'mangwale_events_delivered_total{transport="websocket"}',
    'mangwale_clients_dropped_slow_total{transport="websocket"}',
    "mangwale_events_logged_total",
)


async def run(args: argparse.Namespace, server: common.Server) -> dict[str, Any]:
    me = common.CpuMeter(__import__("os").getpid())
    watchers = [Watcher() for _ in range(args.watchers)]
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
    assert health["streams"] >= args.watchers, health

    tasks = [asyncio.create_task(w.run()) for w in watchers]
    m0 = server.metrics()
    srv = common.CpuMeter(server.pid).start()
    me.start()
    t0 = time.monotonic()
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
    # every watcher should reach the final head; give the tail a moment
    deadline = time.monotonic() + args.drain
    while time.monotonic() < deadline and any(w.last < head and w.closed is None for w in watchers):
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    srv_frac = srv.stop()
    me_frac = me.stop()
    rss_end = common.rss_bytes(server.pid)
    server_side = common.metrics_delta(m0, server.metrics(), *SERVER_FIGURES)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(w.ws.close() for w in watchers), return_exceptions=True)

    lat: list[float] = []
    per_client = []
    sent_total = received_total = lost_total = 0
    accounting_ok = True
    for w in watchers:
        sent = head - w.head
        tail = max(0, head - w.last)
        losses = w.gaps + tail
        if w.received + losses != sent:
            accounting_ok = False
        sent_total += sent
        received_total += w.received
        lost_total += losses
        per_client.append(losses)
        lat.extend(w.lat)
    stats = common.summarize(lat)
    valid, verdict = common.client_verdict(me_frac)
    events = head - min(w.head for w in watchers)
    return {
        "params": vars(args),
        "watchers": args.watchers,
        "events_per_s_target": args.jobs * 1000 / args.step_ms,
        "events": events,
        "job_statuses": sorted(set(statuses)),
        "sent": sent_total,
        "received": received_total,
        "lost": lost_total,
        "duplicates": sum(w.dupes for w in watchers),
        "clients_with_loss": sum(1 for x in per_client if x),
        "clients_closed": sum(1 for w in watchers if w.closed is not None),
        "accounting_ok": accounting_ok,
        "elapsed_s": elapsed,
        "deliveries_per_s": received_total / elapsed if elapsed else 0.0,
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
        "idle_bytes_per_connection": (rss_idle - rss_before) / args.watchers,
        "kernel_tcp_mem_pages": {"before": tcp_before, "idle": tcp_idle},
        # The server's own count (GET /metrics) over the measured run: delivered should equal
        # received unless a client was dropped as slow.
        "server_metrics": server_side,
        "server_delivered": int(server_side[SERVER_FIGURES[0]]),
        "server_dropped_slow": int(server_side[SERVER_FIGURES[1]]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watchers", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=1, help="concurrent simulate jobs (events/s = jobs * 1000 / step-ms)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--step-ms", type=float, default=100.0)
    ap.add_argument("--batch", type=int, default=50, help="connect this many at a time, then pause 10 ms")
    ap.add_argument("--idle", type=float, default=1.0, help="seconds idle after connecting, before the RSS reading")
    ap.add_argument("--drain", type=float, default=5.0, help="seconds to wait for the tail after the jobs end")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server to CPU 0 and generator to CPU 1")
    ap.add_argument("--store", default=None, metavar="URL",
                    help="run the server on a Redis store (e.g. redis://127.0.0.1:6379/0; keys under a "
                         "throw-away prefix, removed afterwards) instead of the embedded one")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    pin = common.default_pin() and not args.no_pin
    common.raise_nofile(2 * args.watchers + 200)
    env = {"MANGWALE_RUNNER_CONCURRENCY": str(max(2, args.jobs)),
           "MANGWALE_WS_MAX_CONNECTIONS": str(max(10000, args.watchers + 100)),
           "MANGWALE_WS_CLIENT_QUEUE": "1000"}
    prefix = None
    if args.store:
        import secrets

        prefix = f"bench-{secrets.token_hex(4)}:"
        env |= {"MANGWALE_STORE_BACKEND": args.store, "MANGWALE_STORE_PREFIX": prefix}
    with common.Server(pin_cpu=0 if pin else None, env=env) as server:
        if pin:
            common.pin_self(1)
        gc.collect()
        res = asyncio.run(run(args, server))
    if prefix is not None:
        import redis

        r = redis.Redis.from_url(args.store)
        for key in r.scan_iter(match=prefix + "*", count=1000):
            r.delete(key)
    res["pinned"] = pin
    res["store"] = "redis" if args.store else "tinydb"
    lat = res["latency_ms"]
    rows = [{
        "store": res["store"], "watchers": res["watchers"], "ev/s": res["events_per_s_target"], "events": res["events"],
        "sent": res["sent"], "received": res["received"], "lost": res["lost"],
        "deliv/s": res["deliveries_per_s"], "p50 ms": lat["p50"], "p99 ms": lat["p99"], "max ms": lat["max"],
        "srv CPU": f"{res['server_cpu']:.0%}", "gen CPU": f"{res['client_cpu']:.0%}",
        "RSS MB": res["rss_end_bytes"] / 1e6, "KB/idle conn": res["idle_bytes_per_connection"] / 1024,
        "srv delivered": res["server_delivered"], "srv dropped": res["server_dropped_slow"],
    }]
    common.print_table(rows, list(rows[0]), "fan-out (latency: receipt - server timestamp, 1 ms resolution)")
    print(res["verdict"], "| accounting", "ok" if res["accounting_ok"] else "BROKEN")
    common.write_result(f"fanout-{args.watchers}" + ("-redis" if args.store else ""), res, args.out)
    return 0 if res["accounting_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
