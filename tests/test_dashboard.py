"""The browser dashboard (``GET /``) in headless Chromium, against real ``mangwale serve`` processes.

Chromium comes from Debian's ``chromium`` package (Playwright's own browser download cannot work
here); Playwright for Python drives it through ``executable_path``. The browser tests skip, saying
so, only when /usr/bin/chromium is missing. The page exposes what it received as
``window.__mangwale`` (events in order, connection count), which the tests compare with the
server's own record. Reconnect delays are shrunk through ``window.__mangwaleConfig``.

The page's CSP forbids eval, so every wait passes Playwright a function (``"() => ..."``), never a
bare expression.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, simulate_power_loss
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "bench" / "results"  # git-ignored
FAST_RECONNECT = {"backoffInitialMs": 150, "backoffMaxMs": 800}
WAIT_MS = 20_000

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium)",
)

# A command trainer that reports loss and valAccuracy per epoch slowly enough to be caught mid-run.
SLOW_TRAINER = """\
import json, math, os, time
params = json.loads(os.environ["MANGWALE_PARAMS"])
epochs, pause = int(params.get("epochs", 12)), float(params.get("secondsPerEpoch", 0.4))
print("loaded " + str(sum(1 for _ in open(os.environ["MANGWALE_DATASET"]))) + " examples", flush=True)
for epoch in range(1, epochs + 1):
    time.sleep(pause)
    loss = round(1.5 * math.exp(-epoch / 3) + 0.06, 4)
    acc = round(0.3 + 0.62 * (1 - math.exp(-epoch / 3.2)), 4)
    print(f"epoch {epoch}/{epochs}: loss={loss} valAccuracy={acc}", flush=True)
    report = {"progress": 95 * epoch / epochs, "message": f"Training intent classifier... epoch {epoch}/{epochs}",
              "metrics": {"epoch": epoch, "epochs": epochs, "loss": loss, "valAccuracy": acc},
              "eta": round((epochs - epoch) * pause, 2)}
    print(json.dumps(report), flush=True)
"""


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module (each test gets its own context)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium)"
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Console:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(msg.text)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (no cookies, no sessionStorage) at laptop size, fast reconnects."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.add_init_script(f"window.__mangwaleConfig = {json.dumps(FAST_RECONNECT)};")
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    yield pg
    context.close()


@pytest.fixture
def console(page: Page) -> Console:
    """The page's console errors, collected from before it loads."""
    return Console(page)


def wait_js(page: Page, fn: str, arg: Any = None, timeout: float = WAIT_MS) -> Any:
    """Wait until the function ``fn`` (JS source, called with ``arg``) returns something truthy."""
    return page.wait_for_function(fn, arg=arg, timeout=timeout).json_value()


def badge(page: Page) -> str:
    return page.inner_text("#badge-text")


def open_dashboard(page: Page, server: ServerProcess) -> None:
    page.goto(server.url + "/")
    wait_js(page, "() => document.getElementById('badge-text').textContent === 'Live Updates'")


def row(job_id: str) -> str:
    return f'tr[data-job-id="{job_id}"]'


def wait_row_status(page: Page, job_id: str, status: str, timeout: float = WAIT_MS) -> None:
    wait_js(
        page,
        "([sel, status]) => document.querySelector(sel + ' .pill')?.textContent === status",
        [row(job_id), status],
        timeout,
    )


def page_events(page: Page, job_id: str) -> list[dict[str, Any]]:
    return page.evaluate("(id) => window.__mangwale.events.filter((e) => e.jobId === id)", job_id)


def create_job(
    server: ServerProcess,
    kind: str,
    dataset: str | None = None,
    token: str | None = None,
    **params: Any,
) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, Any] = {"kind": kind, "params": params}
    if dataset:
        body["datasetId"] = dataset
    r = httpx.post(server.url + "/training/jobs", json=body, headers=headers, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def sample_dataset(server: ServerProcess, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return str(httpx.get(server.url + "/training/datasets", headers=headers).json()[0]["id"])


# --- without a browser -----------------------------------------------------------------------


def test_dashboard_routes_serve_the_page_and_stay_out_of_openapi(api: Any) -> None:
    """GET / and /static/* serve the page and its files with a strict CSP; OpenAPI lists API paths only."""
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', page.text):
        r = api.get("/" + asset)
        assert r.status_code == 200, asset
    modules, seen = ["app.js"], set()
    while modules:  # every module the page imports, transitively
        name = modules.pop()
        seen.add(name)
        js = api.get(f"/static/{name}")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript"), (
            name
        )
        modules += [m for m in re.findall(r'from "\./([\w-]+\.js)"', js.text) if m not in seen]
    assert {"app.js", "api.js", "live.js", "jobs.js", "detail.js", "chart.js"} <= seen
    assert api.get("/static/nope.js").json()["error"]["code"] == "not_found"
    assert api.get("/static/..%2Fapp.py").status_code == 404
    paths = api.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/static")]
    assert "/training/jobs" in paths


# --- in the browser --------------------------------------------------------------------------


@needs_chromium
def test_page_loads_without_console_errors(
    server: ServerProcess, page: Page, console: Console
) -> None:
    """The page loads, connects ("Live Updates"), lists kinds and datasets, and logs no console error."""
    open_dashboard(page, server)
    wait_js(
        page,
        "() => document.querySelector('#datasets li .ds-name')?.textContent === 'food-delivery-sample'",
    )
    assert "917 examples" in page.inner_text("#datasets li")
    kinds = page.eval_on_selector_all("#start-kind option", "(os) => os.map((o) => o.value)")
    assert {"nlu-train", "simulate", "fine-tune"} <= set(kinds)
    assert page.is_visible("#jobs-empty") and page.is_hidden("#auth")
    assert console.errors == []


@needs_chromium
def test_job_created_with_curl_appears_live_and_reaches_100(
    server: ServerProcess, page: Page, console: Console
) -> None:
    """A job created over REST appears at the top without a reload; its bar reaches 100 % and "succeeded"."""
    open_dashboard(page, server)
    page.evaluate("() => { window.__sameDocument = true; }")
    first = create_job(server, "simulate", steps=6, stepMs=120)
    page.wait_for_selector(row(first))
    wait_row_status(page, first, "succeeded")
    bar = page.locator(f"{row(first)} .bar")
    assert bar.get_attribute("aria-valuenow") == "100"
    assert page.inner_text(f"{row(first)} .pct") == "100 %"
    second = create_job(server, "simulate", steps=2, stepMs=50)
    wait_js(page, "(id) => document.querySelector('#jobs-body tr')?.dataset.jobId === id", second)
    order = page.eval_on_selector_all("#jobs-body tr", "(rs) => rs.map((r) => r.dataset.jobId)")
    assert order == [second, first]
    assert page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
    seen = [e["progress"] for e in page_events(page, first) if e["type"] == "training_update"]
    assert seen == sorted(seen) and seen[-1] == 100
    assert console.errors == []


@needs_chromium
def test_workers_panel_follows_live_updates_without_polling(
    server_factory: Callable[..., ServerProcess], page: Page, console: Console, tmp_path: Path
) -> None:
    """The workers panel shows a worker that registers after the page loaded, then busy with a
    job, up again, and lost when it is killed, from worker_update messages alone: after the
    GETs of the page load and the connect, the page asks GET /workers nothing more."""
    from test_workers import FAST, WorkerProcess

    srv = server_factory(env=FAST, args=["--concurrency", "0"])
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if r.url.endswith("/workers") else None)
    open_dashboard(page, srv)
    wait_js(page, "() => window.__mangwale.workers.fetches >= 2 && window.__mangwale.workers.pending === null"
                  " && !document.getElementById('workers-card').hidden")  # fmt: skip
    before = len(asked)
    assert page.is_visible("#workers-empty")
    worker = WorkerProcess(srv.url, tmp_path, "--name", "panel-box", "--concurrency", "1").start()
    try:
        up = "() => document.querySelector('#workers li[data-state=up]')?.textContent.includes('panel-box')"
        wait_js(page, up)
        assert page.is_hidden("#workers-empty")
        job_id = create_job(srv, "simulate", steps=4, stepMs=250)
        wait_js(page, "(id) => document.querySelector('#workers li[data-state=busy]')?.textContent.includes(id)", job_id)
        wait_js(page, "() => document.querySelector('#workers li[data-state=up]')?.textContent.includes('0/1 running')")
        worker.kill()
        wait_js(page, "() => document.querySelector('#workers li[data-state=lost]')?.textContent.includes('last heard')")
    finally:
        worker.kill()
    assert len(asked) == before, asked  # no poll: every change arrived on the live stream
    assert page.evaluate("() => window.__mangwale.workers.updates") >= 4
    assert console.errors == []


@needs_chromium
def test_kill_and_restart_flip_the_badge_and_lose_no_event(
    server: ServerProcess, page: Page
) -> None:
    """kill -9 shows "Reconnecting..." with a countdown, a restart "Live Updates"; the page holds every event."""
    ws_urls: list[str] = []
    page.on("websocket", lambda ws: ws_urls.append(ws.url))
    open_dashboard(page, server)
    job = create_job(server, "simulate", steps=20, stepMs=100)
    wait_js(page, "(id) => window.__mangwale.events.filter((e) => e.jobId === id).length >= 4", job)
    server.kill()
    wait_js(
        page,
        "() => document.getElementById('badge-text').textContent.startsWith('Reconnecting...')",
    )
    assert re.fullmatch(r"Reconnecting\.\.\.( \d+s)?", badge(page))
    server.start()
    wait_js(page, "() => document.getElementById('badge-text').textContent === 'Live Updates'")
    wait_row_status(page, job, "succeeded")
    wait_js(
        page,
        "(id) => window.__mangwale.events.some((e) => e.jobId === id && e.status === 'succeeded')",
        job,
    )

    server_seqs = [e["seq"] for e in httpx.get(f"{server.url}/training/jobs/{job}/events").json()]
    got = page_events(page, job)
    assert [e["seq"] for e in got] == server_seqs
    assert {e["attempt"] for e in got if e["type"] == "training_update"} == {1, 2}  # the re-run too
    all_seqs = page.evaluate("() => window.__mangwale.events.map((e) => e.seq)")
    assert all_seqs == sorted(set(all_seqs)), "events out of order or repeated"
    assert page.evaluate("() => window.__mangwale.connects") >= 2
    resumed = [u for u in ws_urls if "since=" in u]
    assert resumed and all("epoch=" in u for u in resumed), ws_urls


@needs_chromium
def test_resync_after_a_new_epoch_refetches_the_job_list(server: ServerProcess, page: Page) -> None:
    """After a power loss (new epoch) the page gets a resync and re-fetches the jobs it missed."""
    open_dashboard(page, server)
    page.evaluate("() => window.__mangwale.stream.stop()")
    server.kill()
    simulate_power_loss(server.data_dir)
    server.start()
    missed = create_job(server, "simulate", steps=2, stepMs=20)
    page.evaluate("() => window.__mangwale.stream.reconnect()")
    wait_js(page, "() => window.__mangwale.resyncs === 1")
    page.wait_for_selector(row(missed))
    came_live = [e["type"] for e in page_events(page, missed)]
    assert "job_created" not in came_live  # so the row came from the REST re-fetch
    assert badge(page) == "Live Updates"


@needs_chromium
def test_refused_live_connection_is_explained(
    server_factory: Callable[..., ServerProcess], page: Page
) -> None:
    """When REST answers but the WebSocket is refused (here: the server is full) the page says what to check."""
    from websockets.sync.client import connect

    server = server_factory(env={"MANGWALE_WS_MAX_CONNECTIONS": "1"})
    with connect(server.ws_url) as occupant:  # takes the only slot
        occupant.recv(timeout=5)
        page.goto(server.url + "/")
        page.wait_for_selector("#notice:not([hidden])")
        text = page.inner_text("#notice-text")
        assert "websocket.max_connections" in text and "server.allowed_origins" in text
        assert server.url in text
        assert badge(page).startswith("Reconnecting...")
        wait_js(page, "() => document.querySelector('#datasets li') !== null")  # REST still works


@needs_chromium
def test_upload_form_creates_a_dataset(
    server: ServerProcess, page: Page, console: Console, tmp_path: Path
) -> None:
    """A CSV (text,category) uploaded through the form becomes a dataset; a bad JSONL line is named."""
    open_dashboard(page, server)
    csv = tmp_path / "support.csv"
    csv.write_text(
        'text,category\n"where is my order, it is late",track_order\nhi there,greet\n'
        'cancel my order please,cancel_order\n"he said ""hello""",greet\n',
        encoding="utf-8",
    )
    page.set_input_files("#upload-file", str(csv))
    wait_js(
        page, "() => document.getElementById('upload-msg').textContent === '4 examples, 3 intents'"
    )
    page.fill("#upload-name", "support-intents")
    page.click("#upload-form button[type=submit]")
    wait_js(
        page,
        "() => [...document.querySelectorAll('#datasets .ds-name')].some((e) => e.textContent === 'support-intents')",
    )
    assert "4 examples · 3 intents" in page.inner_text("#datasets li:has-text('support-intents')")
    created = [
        d
        for d in httpx.get(server.url + "/training/datasets").json()
        if d["name"] == "support-intents"
    ]
    examples = httpx.get(f"{server.url}/training/datasets/{created[0]['id']}").json()["examples"]
    assert examples[0] == {"text": "where is my order, it is late", "intent": "track_order"}
    assert examples[3]["text"] == 'he said "hello"'

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "intent": "greet"}\n{"text": "oops"}\n', encoding="utf-8")
    page.set_input_files("#upload-file", str(bad))
    wait_js(
        page,
        "() => document.getElementById('upload-msg').textContent.includes(\"line 2: missing 'intent'\")",
    )
    page.click("#upload-form button[type=submit]")
    assert len(httpx.get(server.url + "/training/datasets").json()) == 2
    assert console.errors == []


@needs_chromium
def test_chart_shows_one_point_per_reported_epoch(
    server: ServerProcess, page: Page, console: Console
) -> None:
    """An nlu-train job started from the form (epochs 5) charts 5 loss and 5 valAccuracy points, then final metrics."""
    open_dashboard(page, server)
    page.select_option("#start-kind", "nlu-train")
    page.select_option("#start-dataset", sample_dataset(server))
    page.fill("#start-params", '{"epochs": 5}')
    page.click("#start-form button[type=submit]")
    job = wait_js(
        page,
        "() => document.getElementById('detail').hidden ? null : document.getElementById('detail-id').textContent",
    )
    wait_js(
        page,
        "() => document.getElementById('detail-status')?.textContent === 'succeeded'",
        timeout=60_000,
    )
    metrics = httpx.get(f"{server.url}/training/jobs/{job}/metrics").json()
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    for key in ("loss", "valAccuracy"):
        sel = f'.chart-box[data-metric="{key}"] circle.pt'
        wait_js(page, "(sel) => document.querySelectorAll(sel).length === 5", sel)
        plotted = page.eval_on_selector_all(
            sel, "(cs) => cs.map((c) => [Number(c.dataset.x), Number(c.dataset.y)])"
        )
        assert plotted == [[m["epoch"], m[key]] for m in metrics]
    page.wait_for_selector('#final-metrics .tile[data-metric="accuracy"]')
    assert console.errors == []


@needs_chromium
def test_cancel_button_cancels_a_running_job(
    server: ServerProcess, page: Page, console: Console
) -> None:
    """Cancel in the job detail (click, then confirm) cancels the job on the server and in the table."""
    open_dashboard(page, server)
    job = create_job(server, "simulate", steps=300, stepMs=100)
    wait_row_status(page, job, "running")
    page.click(row(job))
    page.click("#detail-cancel")
    assert page.inner_text("#detail-cancel") == "Really cancel?"
    page.click("#detail-cancel")
    wait_row_status(page, job, "cancelled")
    assert httpx.get(f"{server.url}/training/jobs/{job}").json()["status"] == "cancelled"
    assert page.is_hidden("#detail-cancel")
    assert console.errors == []


@needs_chromium
def test_deleted_job_leaves_the_table_and_closes_its_detail(
    server: ServerProcess, page: Page, console: Console
) -> None:
    """A job deleted on the server leaves the table live (job_deleted), its open detail closes with a notice, and the other rows stay."""
    open_dashboard(page, server)
    keep = create_job(server, "simulate", steps=2, stepMs=10)
    gone = create_job(server, "simulate", steps=2, stepMs=10)
    wait_row_status(page, keep, "succeeded")
    wait_row_status(page, gone, "succeeded")
    page.click(row(gone))
    wait_js(page, "() => !document.getElementById('detail').hidden")
    assert httpx.delete(f"{server.url}/training/jobs/{gone}").status_code == 204
    wait_js(page, "(sel) => !document.querySelector(sel)", row(gone))
    assert page.is_hidden("#detail")
    assert page.eval_on_selector_all("#jobs-body tr", "(rs) => rs.map((r) => r.dataset.jobId)") == [keep]
    assert page.inner_text("#jobs-count") == "1 job"
    assert page.inner_text("#notice-text") == f"Job {gone} was deleted on the server."
    deleted = page.evaluate("() => window.__mangwale.events.filter((e) => e.type === 'job_deleted')")
    assert [(e["jobIds"], e["reason"]) for e in deleted] == [([gone], "deleted")]
    # A resync re-reads the list: the deleted job does not come back.
    page.evaluate("() => { window.__mangwale.stream.forget(); window.__mangwale.stream.reconnect(); }")
    wait_js(page, "() => window.__mangwale.connects >= 2 && !window.__mangwale.state.loadingJobs")
    assert page.eval_on_selector_all("#jobs-body tr", "(rs) => rs.map((r) => r.dataset.jobId)") == [keep]
    assert console.errors == []


@needs_chromium
def test_screenshots_mid_training(
    server_factory: Callable[..., ServerProcess], page: Page, console: Console, tmp_path: Path
) -> None:
    """Mid-training the detail shows live log lines and a growing chart; screenshots (laptop, phone) are saved."""
    (tmp_path / "slow_train.py").write_text(SLOW_TRAINER)
    config = tmp_path / "mangwale.toml"
    config.write_text(
        "[trainers.slow-train]\n"
        f'command = [{json.dumps(sys.executable)}, "slow_train.py"]\n'
        'description = "Test trainer: loss and valAccuracy per epoch, slowly"\n'
    )
    server = server_factory(args=["--config", str(config)])
    ds = sample_dataset(server)
    done = [
        create_job(server, "simulate", steps=2, stepMs=20),
        create_job(server, "nlu-train", ds, epochs=3),
    ]
    open_dashboard(page, server)
    for job in done:
        wait_row_status(page, job, "succeeded", timeout=60_000)
    slow = create_job(server, "slow-train", ds, epochs=14, secondsPerEpoch=0.45)
    other = create_job(server, "simulate", steps=60, stepMs=150, message="Simulating step")
    page.click(row(slow))
    sel = '.chart-box[data-metric="loss"] circle.pt'
    wait_js(page, "(sel) => document.querySelectorAll(sel).length >= 5", sel)
    wait_js(page, "() => document.querySelectorAll('#log .ln').length >= 5")
    page.click("#detail-title")  # focus away from the clicked row
    shots = {
        name: tmp_path / name
        for name in ("dashboard.png", "dashboard-phone.png", "dashboard-phone-detail.png")
    }
    page.screenshot(path=str(shots["dashboard.png"]), full_page=True)
    assert page.inner_text(f"{row(slow)} .pill") == "running", "the screenshot must be mid-training"
    assert page.inner_text(f"{row(other)} .pill") == "running"

    page.set_viewport_size({"width": 390, "height": 844})
    page.evaluate("() => window.scrollTo(0, 0)")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390, (
        "horizontal scroll on a phone"
    )
    page.screenshot(path=str(shots["dashboard-phone.png"]))
    # A sticky top bar would cover the top of an element screenshot.
    page.evaluate("() => { document.querySelector('.topbar').style.position = 'static'; }")
    page.locator("#detail").screenshot(path=str(shots["dashboard-phone-detail.png"]))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name, path in shots.items():
        assert path.stat().st_size > 10_000
        (ARTIFACTS / name).write_bytes(path.read_bytes())
    assert console.errors == []


# --- with tokens (issue 5) -------------------------------------------------------------------


def _auth_support() -> bool:
    """Whether this checkout's server has API tokens (an [auth] tokens setting or docs/security.md)."""
    settings_src = (ROOT / "mangwale_cli" / "settings.py").read_text()
    return (ROOT / "docs" / "security.md").exists() or re.search(
        r"\btokens\b", settings_src
    ) is not None


def _mint_token() -> tuple[str, str]:
    """A token with the read and write scopes, and the config text that admits it.

    Uses issue 5's ``mangwale tokens create NAME --scope ...``, which prints the token once and the
    TOML line to add "under [auth.tokens]".
    """
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mangwale_cli",
            "tokens",
            "create",
            "dashboard-test",
            "--scope",
            "read",
            "--scope",
            "write",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, f"mangwale tokens create failed: {out.stderr}"
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    entries = [ln for ln in lines if re.match(r"^[\w.-]+\s*=\s*\{", ln)]
    tokens = [ln for ln in lines if re.fullmatch(r"[A-Za-z0-9_\-.~]{20,}", ln)]
    table = re.search(r"under (\[[\w.]+\])", out.stdout)
    if len(entries) != 1 or len(tokens) != 1:
        pytest.fail(
            f"could not read the token and its config line from `mangwale tokens create`:\n{out.stdout}"
        )
    return tokens[0], f"{table.group(1) if table else '[auth.tokens]'}\n{entries[0]}\n"


@needs_chromium
@pytest.mark.skipif(
    not _auth_support(), reason="the server has no API tokens yet (issue 5: [auth] tokens setting)"
)
def test_page_without_token_gets_no_data(
    server_factory: Callable[..., ServerProcess], page: Page, tmp_path: Path
) -> None:
    """With tokens on, the page without a token shows the token form and no data; with one it goes live."""
    token, config_text = _mint_token()
    config = tmp_path / "auth.toml"
    config.write_text(config_text)
    server = server_factory(args=["--config", str(config)])
    job = create_job(server, "simulate", token=token, steps=2, stepMs=20)
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.on("websocket", lambda ws: urls.append(ws.url))
    page.goto(server.url + "/")
    page.wait_for_selector("#auth:not([hidden])")
    assert "401" in page.inner_text("#auth-message")
    assert page.locator("#jobs-body tr").count() == 0
    assert page.locator("#datasets li").count() == 0
    assert page.evaluate("() => window.__mangwale.events.length") == 0
    assert badge(page) != "Live Updates"

    page.fill("#auth-token", token)
    page.click("#auth-form button[type=submit]")
    wait_js(page, "() => document.getElementById('badge-text').textContent === 'Live Updates'")
    page.wait_for_selector(row(job))
    assert page.evaluate("() => sessionStorage.getItem('mangwale.token')") == token
    assert not [u for u in urls if token in u], "the token went into a URL"


@needs_chromium
def test_a_queued_job_says_what_it_waits_for(server_factory: Callable[..., ServerProcess], page: Page,
                                             console: Console, tmp_path: Path) -> None:  # fmt: skip
    """serve --concurrency 0: a job labelled gpu says "waiting for a worker with labels gpu" in its
    row and its detail, live; a gpu worker joins and the row reaches succeeded, the wait gone."""
    from test_workers import WorkerProcess

    wait = "waiting for a worker with labels gpu"
    server = server_factory(args=["--concurrency", "0"], env={"MANGWALE_RUNNER_SAMPLE_DATASET": "false"})
    open_dashboard(page, server)
    resp = httpx.post(server.url + "/training/jobs", json={"kind": "simulate", "labels": ["gpu"],
                                                             "params": {"steps": 3, "stepMs": 50}}, timeout=10)  # fmt: skip
    job_id = resp.json()["id"]
    wait_js(page, "([sel, text]) => document.querySelector(sel + ' .msg')?.textContent === text", [row(job_id), wait])
    page.click(row(job_id))
    wait_js(page, "(text) => document.querySelector('.step-msg')?.textContent === text", wait)
    worker = WorkerProcess(server.url, tmp_path, "--label", "gpu").start()
    try:
        wait_row_status(page, job_id, "succeeded")
    finally:
        worker.kill()
    assert wait not in page.inner_text(f"{row(job_id)} .msg")
    assert console.errors == []
