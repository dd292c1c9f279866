"""Shared harness for the ``bench/`` scripts: a real ``mangwale serve`` process, CPU/RSS probes,
CPU pinning, percentiles, a printed table and a JSON result in ``bench/results/`` (git-ignored).

Method: ``../shared/research/performance-anchors.md`` sections 9 and 10. The server runs with
WebSocket compression off (``mangwale serve`` always passes ``ws_per_message_deflate=False``),
logging at WARNING and no access log. With ``--pin`` (the default on a machine with two or more
cores) the server is pinned to CPU 0 and the load generator to CPU 1. Both processes' CPU time
is read from ``/proc/<pid>/stat``; a run where the load generator used more than 80 % of its
core is marked ``valid: false`` (it measured the client, not the server).

Two servers can be measured: ``Server`` (mangwale) and ``NodeServer``, the seed's Express +
``ws`` design rebuilt in ``bench/node-ref/`` (installed with ``npm ci`` on first use). They
share one interface (``start``/``stop``, ``pid``, ``url``, ``ws_url``, ``health()``,
``stream_figures()``), so a script given ``--target both`` runs the same scenario on each in
one run, on the same core, and reports mangwale / Node ratios (``ratios()``).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NODE_REF = ROOT / "bench" / "node-ref"
TARGETS = ("mangwale", "node")
CLIENT_CPU_LIMIT = 0.80
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(n: int) -> int:
    """``ulimit -n`` >= n where the hard limit allows; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard)
    if want != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def pin_self(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def default_pin() -> bool:
    return (os.cpu_count() or 1) >= 2


# --- /proc probes -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (this process and its reaped children are not mixed in)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def profile(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on ``pid`` for ``seconds`` (collapsed stacks, one per line, to
    ``out``: sort them by count to see where the time goes). Wait on the process it returns."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "200",
                             "-f", "raw", "-o", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def tcp_mem_pages() -> int | None:
    """Kernel TCP socket memory (``/proc/net/sockstat`` ``TCP: ... mem N``), in pages."""
    try:
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1])
    except (OSError, ValueError):
        pass
    return None


class CpuMeter:
    """CPU used by a process between ``start()`` and ``stop()``, as a fraction of one core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = self.c0 = 0.0
        self.seconds = self.cpu = 0.0

    def start(self) -> CpuMeter:
        self.t0, self.c0 = time.monotonic(), cpu_seconds(self.pid)
        return self

    def stop(self) -> float:
        self.seconds = time.monotonic() - self.t0
        self.cpu = cpu_seconds(self.pid) - self.c0
        return self.fraction

    @property
    def fraction(self) -> float:
        return self.cpu / self.seconds if self.seconds > 0 else 0.0


# --- the servers under test --------------------------------------------------------------


class _ServerProcess:
    """A server process on a free loopback port, optionally pinned to one CPU, ready once
    ``/healthz`` answers 200. Subclasses say what to run (``command``, ``cwd``, ``env``)."""

    name: ClassVar[str] = ""

    def __init__(self, *, pin_cpu: int | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws/training"
        self.pin_cpu = pin_cpu
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: str | None = None
        self.log_path: Path | None = None  # a temporary file unless a subclass names one
        self._own_log = False

    def command(self) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> Path | None:
        return None

    def prepare(self) -> None:
        """Work before the first start (an install): not timed, not pinned."""

    def start(self, timeout: float = 30.0) -> Self:
        self.prepare()
        raise_nofile(65536)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        cpu = self.pin_cpu if self.pin_cpu is not None and self.pin_cpu < (os.cpu_count() or 1) else None
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - the server's log for its life; stop() closes it
        self.proc = subprocess.Popen(
            self.command(), env=self.env, cwd=self.cwd(), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
            # The harness starts its server before any thread of its own, and the hook is one syscall.
            # Affinity is inherited by every thread the server starts (Node's GC and libuv threads too).
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,  # noqa: PLW1509 - see above
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                log = self.log_path.read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}: {log}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} server did not answer /healthz")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/healthz", timeout=10).json()

    def stream_figures(self) -> dict[str, int]:
        """The server's own WebSocket counts: ``delivered`` (events sent to clients),
        ``dropped_slow`` (clients dropped as slow), ``logged`` (events) and ``connections``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ran, for the result file."""
        return {"name": self.name, "command": self.command()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Server(_ServerProcess):
    """``mangwale serve`` on a free loopback port, with a throw-away data dir unless given one."""

    name = "mangwale"

    def __init__(self, *, pin_cpu: int | None = None, data_dir: Path | None = None,
                 env: dict[str, str] | None = None, log_level: str = "warning") -> None:
        super().__init__(pin_cpu=pin_cpu, env={"MANGWALE_LOG_LEVEL": log_level, **(env or {})})
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="mangwale-bench-")
        self.data_dir = Path(data_dir or self._tmp)  # type: ignore[arg-type]
        self.home = self.data_dir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env["MANGWALE_HOME"] = str(self.home)
        for var in ("MANGWALE_URL", "MANGWALE_TOKEN", "MANGWALE_CONFIG", "MANGWALE_DATA_DIR"):
            self.env.pop(var, None)
        self.log_path = self.data_dir / "server.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mangwale_cli", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir / "data")]
        return cmd

    def metrics(self) -> dict[str, float]:
        """The server's own figures (``GET /metrics``), as ``{'name{label="v"}': value}``."""
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def stream_figures(self) -> dict[str, int]:
        m = self.metrics()
        return {
            "delivered": int(m.get('mangwale_events_delivered_total{transport="websocket"}', 0)),
            "dropped_slow": int(m.get('mangwale_clients_dropped_slow_total{transport="websocket"}', 0)),
            "logged": int(m.get("mangwale_events_logged_total", 0)),
            "connections": int(m.get('mangwale_connections{transport="websocket"}', -1)),
        }


def node_ref_installed() -> bool:
    """``bench/node-ref/node_modules`` holds exactly the versions ``package.json`` pins."""
    pins = json.loads((NODE_REF / "package.json").read_text())["dependencies"]
    for dep, version in pins.items():
        try:
            installed = json.loads((NODE_REF / "node_modules" / dep / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            return False
        if installed != version:
            return False
    return True


def ensure_node_ref() -> None:
    """``npm ci`` in ``bench/node-ref/`` unless its pinned packages are already installed. A
    file lock keeps concurrent harnesses (parallel tests) from installing over each other."""
    for tool in ("node", "npm"):
        if not shutil.which(tool):
            raise RuntimeError(f"the Node reference needs {tool!r} on PATH")
    if node_ref_installed():
        return
    with open(NODE_REF / ".npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if node_ref_installed():
            return
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_REF,
                              capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0 or not node_ref_installed():
            raise RuntimeError(f"npm ci in {NODE_REF} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


class NodeServer(_ServerProcess):
    """The seed's Express + ``ws`` server rebuilt (``bench/node-ref/server.js``), on a free
    loopback port: the reference mangwale is measured against. ``env`` is passed through
    (mangwale's ``MANGWALE_*`` settings mean nothing to it)."""

    name = "node"

    def __init__(self, *, pin_cpu: int | None = None, env: dict[str, str] | None = None) -> None:
        super().__init__(pin_cpu=pin_cpu, env=env)
        self.env |= {"PORT": str(self.port), "HOST": "127.0.0.1", "NODE_ENV": "production"}
        self.env.pop("REF_LOG", None)

    def command(self) -> list[str]:
        return [shutil.which("node") or "node", str(NODE_REF / "server.js")]

    def cwd(self) -> Path | None:
        return NODE_REF

    def prepare(self) -> None:
        ensure_node_ref()

    def stream_figures(self) -> dict[str, int]:
        m = httpx.get(self.url + "/metrics", timeout=10).json()
        return {"delivered": int(m["eventsDelivered"]), "dropped_slow": int(m["clientsDroppedSlow"]),
                "logged": int(m["eventsLogged"]), "connections": int(m["connections"])}

    def describe(self) -> dict[str, Any]:
        pins = json.loads((NODE_REF / "package.json").read_text())["dependencies"]
        node = subprocess.run([self.command()[0], "--version"], capture_output=True, text=True, check=False).stdout
        return {**super().describe(), "node": node.strip(), "packages": pins}


def make_server(target: str, *, pin_cpu: int | None = None, env: dict[str, str] | None = None) -> _ServerProcess:
    """``mangwale`` -> ``Server``, ``node`` -> ``NodeServer``."""
    if target == "mangwale":
        return Server(pin_cpu=pin_cpu, env=env)
    if target == "node":
        return NodeServer(pin_cpu=pin_cpu, env=env)
    raise ValueError(f"unknown target {target!r} (mangwale, node)")


def add_target_arg(ap: Any) -> None:
    ap.add_argument("--target", choices=(*TARGETS, "both"), default="mangwale",
                    help="the server to measure: mangwale, the Node reference (bench/node-ref), or both in "
                         "this run, one after the other on the same core, with mangwale / node ratios")


def targets(choice: str) -> list[str]:
    return list(TARGETS) if choice == "both" else [choice]


def ratios(results: dict[str, dict[str, Any]], measures: dict[str, Callable[[dict[str, Any]], Any]]) -> dict[str, Any]:
    """``{measure: mangwale's / node's}`` for each measure both results have (None otherwise).
    Below 1 is mangwale lower: better for a latency, worse for a rate."""
    out: dict[str, Any] = {}
    if not set(TARGETS) <= set(results):
        return out
    for name, get in measures.items():
        try:
            a, b = get(results["mangwale"]), get(results["node"])
        except (KeyError, TypeError):
            a = b = None
        out[name] = a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None
    return out


def print_ratios(r: dict[str, Any]) -> None:
    if r:
        print("mangwale / node:  " + "   ".join(f"{k} {fmt_ratio(v)}" for k, v in r.items()))


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


# --- numbers and output -------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def summarize(values: list[float]) -> dict[str, float | None]:
    v = sorted(values)
    return {
        "count": len(v),
        "p50": percentile(v, 50),
        "p90": percentile(v, 90),
        "p99": percentile(v, 99),
        "p999": percentile(v, 99.9),
        "max": v[-1] if v else None,
    }


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "mem_bytes": mem, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg": loadavg()}


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> None:
    if title:
        print(title)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_result(name: str, result: dict[str, Any], out: Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "argv": sys.argv, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine(), **result}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to ``{'name{a="x",b="y"}': value}`` (labels sorted; no braces without)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float], *names: str) -> dict[str, float]:
    """How much each named sample grew between two scrapes."""
    return {n: after.get(n, 0.0) - before.get(n, 0.0) for n in names}


def client_verdict(fraction: float) -> tuple[bool, str]:
    """A run is valid only when the load generator stayed under 80 % of its core."""
    if fraction > CLIENT_CPU_LIMIT:
        return False, f"INVALID: load generator used {fraction:.0%} of its core (> {CLIENT_CPU_LIMIT:.0%})"
    return True, f"valid: load generator used {fraction:.0%} of its core"
