"""Operator metrics in the Prometheus text format: what an operator graphs and the benchmarks read.

One ``Metrics`` per app, with its own ``CollectorRegistry`` (never the process-global one), so
several apps in one test process do not clash. Two kinds of figure:

* Read at scrape time from live objects, by ``_LiveCollector``: open connections (WebSocket,
  SSE), events waiting in subscriber buffers, jobs waiting in the runner queue, running jobs,
  jobs per stored status. Nothing is updated for them on the hot paths.
* Counted where things happen: events logged (a bus listener, once per batch), events delivered
  and clients dropped as slow (``server/stream.py``, once per batch, plain integers: the fan-out
  path pays an attribute increment, no lock), job outcomes and durations (``Runner._finish``),
  REST latency (``server/app.py``'s ASGI middleware).

This module knows nothing of the web framework; the server renders ``exposition()`` at
``GET /metrics``. Nor does it import the service or the runner: the runner reports finished jobs
here, and what is read from them is stated by the ``Observed`` and ``ObservedRunner`` protocols.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .eventlog import Record
    from .events import EventBus
    from .store.base import Store
    from .wire import Job

# Version 0.0.4: the classic text format, which every Prometheus (and the parser) reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
TRANSPORTS = ("websocket", "sse")
JOB_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, float("inf"))
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, float("inf"))


class ObservedRunner(Protocol):
    """What metrics reads from the runner, and the hook it sets there (``Runner`` is one)."""

    metrics: Metrics | None  # told of every finished job
    takeovers: int

    @property
    def active(self) -> int: ...

    @property
    def waiting(self) -> int: ...


class Observed(Protocol):
    """What metrics reads from a service (``Service`` is one); bus and runner are set once it
    has started."""

    @property
    def bus(self) -> EventBus | None: ...

    @property
    def runner(self) -> ObservedRunner | None: ...

    @property
    def store(self) -> Store: ...

    @property
    def shared(self) -> bool: ...


class Metrics:
    """Every figure of one server. ``attach(service)`` wires it to a started ``Service``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.service: Observed | None = None
        self.connections = dict.fromkeys(TRANSPORTS, 0)  # open now
        self.delivered = dict.fromkeys(TRANSPORTS, 0)  # events sent, cumulative
        self.dropped = dict.fromkeys(TRANSPORTS, 0)  # clients dropped as slow, cumulative
        self.logged = 0  # events appended to the event log since start
        self._job_counts: dict[str, int] = {}
        self.jobs_finished = Counter(
            "mangwale_jobs_finished",
            "Jobs that reached a final status, by kind and status",
            ["kind", "status"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "mangwale_job_duration_seconds",
            "Run time of the final attempt of finished jobs (start to end), by kind and status",
            ["kind", "status"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "mangwale_http_request_duration_seconds",
            "REST request latency (first byte in to last byte out), by method, route template and status",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self._http_children: dict[tuple[str, str, int], Any] = {}
        self.registry.register(_LiveCollector(self))
        self.lag = LoopLag()

    def attach(self, service: Observed) -> None:
        """Read gauges from ``service`` and count its events and finished jobs (idempotent)."""
        if self.service is service:
            return
        self.service = service
        assert service.bus is not None and service.runner is not None, "attach after Service.start()"
        service.bus.add_listener(self._on_logged)
        service.runner.metrics = self

    # --- counted where it happens ---------------------------------------------------------

    def _on_logged(self, batch: list[Record]) -> None:
        self.logged += len(batch)

    def job_finished(self, job: Job) -> None:
        status = job.status.value
        self.jobs_finished.labels(job.kind, status).inc()
        if job.started_at is not None and job.finished_at is not None:
            seconds = max(0.0, (job.finished_at - job.started_at) / 1000)
            self.job_duration.labels(job.kind, status).observe(seconds)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        child = self._http_children.get(key)
        if child is None:  # labels() validates and locks: once per combination, not per request
            child = self._http_children[key] = self.http_duration.labels(method, route, str(status))
        child.observe(seconds)

    # --- scrape ---------------------------------------------------------------------------

    async def exposition(self) -> bytes:
        """The text to answer a scrape with (reads the store's job counts first)."""
        if self.service is not None:
            self._job_counts = await self.service.store.count_jobs()
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Gauges read from live objects, and the plain-integer counters, at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # names are only known at collect(); nothing here can clash with the rest

    def collect(self) -> Iterator[Metric]:
        m = self.m
        conns = GaugeMetricFamily("mangwale_connections", "Open live-event connections", labels=["transport"])
        delivered = CounterMetricFamily(
            "mangwale_events_delivered", "Events sent to live-event clients (replay and live)", labels=["transport"]
        )
        dropped = CounterMetricFamily(
            "mangwale_clients_dropped_slow",
            "Live-event clients dropped for falling behind or not reading (WebSocket close 4408)",
            labels=["transport"],
        )
        for t in TRANSPORTS:
            conns.add_metric([t], m.connections[t])
            delivered.add_metric([t], m.delivered[t])
            dropped.add_metric([t], m.dropped[t])
        yield from (conns, delivered, dropped)
        yield CounterMetricFamily("mangwale_events_logged", "Events appended to the event log", value=m.logged)
        yield GaugeMetricFamily(
            "mangwale_event_loop_lag_seconds",
            f"Worst lateness of the event loop since the previous scrape (a {LAG_TICK * 1000:.0f} ms timer, measured)",
            value=m.lag.take_recent(),
        )
        yield GaugeMetricFamily(
            "mangwale_event_loop_lag_max_seconds", "Worst lateness of the event loop since start", value=m.lag.worst
        )
        svc = m.service
        if svc is None or svc.bus is None or svc.runner is None:
            return
        fsyncs = getattr(svc.store, "fsyncs", None)
        if fsyncs is not None:  # the embedded store: how well group commit batches
            yield CounterMetricFamily("mangwale_store_fsyncs", "fsyncs of the store's log", value=fsyncs)
            yield CounterMetricFamily(
                "mangwale_store_durable_records",
                "Log records fsynced before they were answered (creates, final states...); over fsyncs: the batching",
                value=svc.store.durable_records,  # type: ignore[attr-defined]  # only the embedded store has it, as fsyncs above says
            )
        buffers = [len(s.buffer) for s in svc.bus.subscribers]
        yield GaugeMetricFamily(
            "mangwale_subscriber_queue_events", "Events waiting in all subscriber buffers", value=sum(buffers)
        )
        yield GaugeMetricFamily(
            "mangwale_subscriber_queue_max_events",
            f"Events waiting in the fullest subscriber buffer (dropped at {svc.bus.queue_size})",
            value=max(buffers, default=0),
        )
        yield GaugeMetricFamily("mangwale_event_head_seq", "Newest logged event seq", value=svc.bus.head)
        yield GaugeMetricFamily("mangwale_runner_queue_jobs", "Jobs waiting for a runner slot", value=svc.runner.waiting)
        yield GaugeMetricFamily("mangwale_running_jobs", "Jobs running now", value=svc.runner.active)
        if svc.shared:  # Redis: what an operator of several instances watches
            yield CounterMetricFamily(
                "mangwale_job_takeovers",
                "Jobs this instance took over from an instance that stopped renewing its lease (re-runs)",
                value=svc.runner.takeovers,
            )
        per_status = GaugeMetricFamily("mangwale_jobs", "Stored jobs by status", labels=["status"])
        for status, n in sorted(m._job_counts.items()):
            per_status.add_metric([status], n)
        yield per_status


LAG_TICK = 0.02  # seconds between the lag probe's wake-ups


class LoopLag:
    """How late the event loop runs: a task that asks to wake every ``LAG_TICK`` seconds and
    notes by how much it was late (a blocking call on the loop shows here at once)."""

    def __init__(self) -> None:
        self.recent = 0.0  # worst since the last scrape
        self.worst = 0.0  # worst since start
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._probe(), name="loop-lag-probe")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def take_recent(self) -> float:
        value, self.recent = self.recent, 0.0
        return value

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_TICK
            await asyncio.sleep(LAG_TICK)
            late = max(0.0, loop.time() - due)
            if late > self.recent:
                self.recent = late
                self.worst = max(self.worst, late)
