"""Shared harness for the ``bench/`` scripts: a real ``mangwale serve`` process, CPU/RSS probes,
CPU pinning, percentiles, a printed table and a JSON result in ``bench/results/`` (git-ignored).

Method: ``../shared/research/performance-anchors.md`` sections 9 and 10. The server runs with
WebSocket compression off (``mangwale serve`` always passes ``ws_per_message_deflate=False``),
logging at WARNING and no access log. With ``--pin`` (the default on a machine with two or more
cores) the server is pinned to CPU 0 and the load generator to CPU 1. Both processes' CPU time
is read from ``/proc/<pid>/stat``; a run where the load generator used more than 80 % of its
core is marked ``valid: false`` (it measured the client, not the server).
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any, Self

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
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


# --- the server under test ----------------------------------------------------------------


class Server:
    """``mangwale serve`` on a free loopback port, with a throw-away data dir unless given one."""

    def __init__(self, *, pin_cpu: int | None = None, data_dir: Path | None = None,
                 env: dict[str, str] | None = None, log_level: str = "warning") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws/training"
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="mangwale-bench-")
        self.data_dir = Path(data_dir or self._tmp)  # type: ignore[arg-type]
        self.home = self.data_dir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "MANGWALE_LOG_LEVEL": log_level, "MANGWALE_HOME": str(self.home), **(env or {})}
        for var in ("MANGWALE_URL", "MANGWALE_TOKEN", "MANGWALE_CONFIG", "MANGWALE_DATA_DIR"):
            self.env.pop(var, None)
        self.pin_cpu = pin_cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "server.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mangwale_cli", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir / "data")]
        return cmd

    def start(self, timeout: float = 30.0) -> Self:
        raise_nofile(65536)
        cpu = self.pin_cpu if self.pin_cpu is not None and self.pin_cpu < (os.cpu_count() or 1) else None
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - the server's log for its life; stop() closes it
        self.proc = subprocess.Popen(
            self.command(), env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
            # The harness starts its server before any thread of its own, and the hook is one syscall.
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,  # noqa: PLW1509 - see above
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not answer /healthz")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/healthz", timeout=10).json()

    def metrics(self) -> dict[str, float]:
        """The server's own figures (``GET /metrics``), as ``{'name{label="v"}': value}``."""
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

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
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
