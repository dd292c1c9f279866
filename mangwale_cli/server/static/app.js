// The mangwale training dashboard: jobs table, connection badge, forms, and the glue.
//
// State comes from REST once (jobs, datasets, kinds) and then only from live events; the page
// never polls. window.__mangwale exposes what the page received, for tests and for debugging;
// window.__mangwaleConfig, set before the page loads, overrides backoffInitialMs, backoffMaxMs and
// jobsLimit (the tests shrink the reconnect delays with it).

import { ApiError, api, getToken, setAuthErrorHandler, setToken } from "./api.js";
import { parseExamples } from "./datafile.js";
import { JobDetail } from "./detail.js";
import { $, TERMINAL, h } from "./format.js";
import { JobsTable, mergeUpdate, newer } from "./jobs.js";
import { LiveStream } from "./live.js";
import { WorkersPanel } from "./workers.js";

const config = { backoffInitialMs: 1000, backoffMaxMs: 30000, jobsLimit: 100, ...(window.__mangwaleConfig || {}) };
const MAX_RECORDED = 20000;

const state = {
  jobs: new Map(), // id -> job document, plus eta/etaAt from the last update
  datasets: new Map(),
  kinds: [],
  loadingJobs: null, // token of the jobs fetch in flight; events wait in `pending` meanwhile
  pending: [],
  fetchingJob: new Set(),
  deleted: new Set(), // ids a job_deleted named: a REST answer in flight must not bring them back
  needToken: false,
};

const workers = new WorkersPanel();
const debug = (window.__mangwale = { events: [], control: [], state, connects: 0, resyncs: 0, workers });

// --- notices and auth ---------------------------------------------------------------------

let noticeTimer = null;
function notify(text, kind = "error") {
  const box = $("#notice");
  box.className = `notice ${kind}`;
  $("#notice-text").textContent = text;
  box.hidden = false;
  clearTimeout(noticeTimer);
  if (kind !== "error") noticeTimer = setTimeout(() => (box.hidden = true), 5000);
}

function reportError(err, what) {
  if (err instanceof ApiError && err.isAuth) return; // the token form says it
  notify(`${what ? what + ": " : ""}${err.message || err}`);
}

function showAuth(err) {
  let title;
  let text;
  if (err.status === 401) {
    state.needToken = true;
    title = "API token needed";
    text = getToken()
      ? `The server rejected this token (401 Unauthorized: ${err.message}). Paste another one.`
      : "This server requires an API token (401 Unauthorized). Paste one below; nothing is shown until you do.";
  } else {
    title = "Not allowed with this token";
    text = `This token may not do that (403 Forbidden: ${err.message}). Paste a token with more scopes, or carry on read-only.`;
  }
  $("#auth-title").textContent = title;
  $("#auth-message").textContent = text;
  $("#auth").dataset.status = String(err.status);
  $("#auth").hidden = false;
  renderBadge();
}

function renderTokenState() {
  $("#forget-token").hidden = !getToken();
}

// --- jobs table -----------------------------------------------------------------------------

function datasetName(id) {
  if (!id) return "–";
  const ds = state.datasets.get(id);
  return ds ? ds.name : id;
}

const table = new JobsTable({
  body: $("#jobs-body"),
  count: $("#jobs-count"),
  empty: $("#jobs-empty"),
  jobs: () => state.jobs,
  datasetName,
  onSelect: (id) => selectJob(id),
  selectedId: () => detail.jobId,
});

async function refreshJobs() {
  const token = {};
  state.loadingJobs = token; // events already pending stay: they apply on top of the newer list
  try {
    const list = await api.jobs(config.jobsLimit);
    if (state.loadingJobs !== token) return; // a newer refresh superseded this one
    // REST is the truth here (this may follow a resync); events queued meanwhile apply on top.
    const old = state.jobs;
    const kept = list.filter((j) => !state.deleted.has(j.id));
    state.jobs = new Map(kept.map((j) => [j.id, { ...j, eta: old.get(j.id)?.eta, etaAt: old.get(j.id)?.etaAt }]));
  } catch (err) {
    if (state.loadingJobs !== token) return;
    reportError(err, "Could not load jobs");
  }
  const pending = state.pending;
  state.loadingJobs = null;
  state.pending = [];
  for (const ev of pending) applyJobEvent(ev);
  table.renderAll();
  if (detail.jobId) detail.render();
}

/** Fetch one job we have an update for but no row (older than the first page, or created while away). */
async function fetchJob(id) {
  if (state.fetchingJob.has(id)) return;
  state.fetchingJob.add(id);
  try {
    const job = await api.job(id);
    if (state.deleted.has(id)) return; // deleted while the answer was on its way
    const known = state.jobs.get(id);
    state.jobs.set(id, known ? newer(job, known) : job);
    table.render(state.jobs.get(id));
    if (detail.jobId === id) detail.render();
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      if (state.jobs.has(id) || detail.jobId === id) removeJobs([id]); // deleted, and its event missed
    } else {
      reportError(err);
    }
  } finally {
    state.fetchingJob.delete(id);
  }
}

/** Jobs deleted on the server (DELETE or pruning): drop their rows and close their detail. */
function removeJobs(ids) {
  for (const id of ids) {
    state.deleted.add(id);
    state.jobs.delete(id);
    table.remove(id);
    if (detail.jobId === id) {
      selectJob(null);
      notify(`Job ${id} was deleted on the server.`, "info");
    }
  }
}

function applyJobEvent(ev) {
  if (ev.type === "job_deleted") {
    removeJobs(Array.isArray(ev.jobIds) ? ev.jobIds : []);
  } else if (ev.type === "job_created") {
    if (!state.jobs.has(ev.jobId)) {
      state.jobs.set(ev.jobId, { ...ev.job });
      table.render(state.jobs.get(ev.jobId));
    }
  } else if (ev.type === "training_update") {
    const job = state.jobs.get(ev.jobId);
    if (!job) {
      fetchJob(ev.jobId);
      return;
    }
    const wasTerminal = TERMINAL.has(job.status);
    if (mergeUpdate(job, ev)) {
      table.render(job);
      // The final metrics live on the job document, not on the last update: read it once.
      if (!wasTerminal && TERMINAL.has(job.status) && detail.jobId === job.id) fetchJob(job.id);
    }
  }
}

// --- live events ----------------------------------------------------------------------------

function onEvent(ev) {
  debug.events.push(ev);
  if (debug.events.length > MAX_RECORDED) debug.events.splice(0, debug.events.length - MAX_RECORDED);
  if (ev.type === "dataset_update") {
    refreshDatasets();
  } else if (state.loadingJobs && ev.type !== "job_log") {
    state.pending.push(ev);
  } else {
    applyJobEvent(ev);
  }
  if (detail.jobId && ev.jobId === detail.jobId) detail.applyEvent(ev);
}

const stream = new LiveStream(
  {
    onEvent,
    onWorkerUpdate: (msg) => workers.onUpdate(msg),
    onConnected(msg, { fresh }) {
      debug.connects++;
      state.refusedHandshakes = 0;
      debug.control.push(msg);
      hideAuthIfOk();
      // A live-only connection starts from "now": take the state as of now over REST.
      if (fresh) resyncAll();
      workers.resync(); // worker updates are not replayed: take the rows again on every connect
    },
    onResync(msg) {
      debug.resyncs++;
      debug.control.push(msg);
      resyncAll();
    },
    onServerError(msg) {
      debug.control.push(msg);
      notify(`Live updates: ${msg.message}`);
    },
    onState: renderBadge,
    onClosed(code, { greeted }) {
      debug.control.push({ type: "closed", code, greeted });
      // A browser cannot see why a handshake failed: ask REST whether it is the token.
      if (!greeted) probeAuth();
      return true;
    },
  },
  { backoffInitialMs: config.backoffInitialMs, backoffMaxMs: config.backoffMaxMs },
);
debug.stream = stream;

function resyncAll() {
  refreshJobs();
  refreshDatasets();
  if (detail.jobId) detail.reload();
}

async function probeAuth() {
  try {
    await api.jobs(1);
  } catch (err) {
    if (err instanceof ApiError && err.isAuth) stream.stop(); // waits for a (better) token
    return;
  }
  // REST answers but the WebSocket does not: say why that usually is, once.
  state.refusedHandshakes = (state.refusedHandshakes || 0) + 1;
  if (state.refusedHandshakes === 3) {
    notify(
      `The server answers REST calls but refuses the live connection. It may be at ` +
        `websocket.max_connections; or, if a proxy in front of it rewrites the Host header, add ` +
        `${location.origin} to server.allowed_origins.`,
    );
  }
}

function hideAuthIfOk() {
  if (state.needToken) {
    state.needToken = false;
    $("#auth").hidden = true;
  }
}

let badgeTimer = null;
function renderBadge() {
  const s = stream.state;
  const badge = $("#badge");
  const text = $("#badge-text");
  clearInterval(badgeTimer);
  badgeTimer = null;
  if (s.name === "live") {
    badge.className = "badge live";
    text.textContent = "Live Updates";
    badge.title = "Connected: changes appear as they happen";
  } else if (s.name === "stopped") {
    badge.className = "badge stopped";
    text.textContent = state.needToken ? "Token needed" : "Not connected";
    badge.title = state.needToken ? "Enter an API token to connect" : "Live updates are off";
  } else if (s.name === "connecting") {
    badge.className = "badge connecting";
    text.textContent = "Connecting...";
  } else {
    badge.className = "badge reconnecting";
    const update = () => {
      const left = s.nextAttemptAt ? Math.max(0, Math.ceil((s.nextAttemptAt - Date.now()) / 1000)) : 0;
      text.textContent = s.nextAttemptAt && left > 0 ? `Reconnecting... ${left}s` : "Reconnecting...";
      badge.title = `Connection lost; attempt ${s.attempt}`;
    };
    update();
    if (s.nextAttemptAt) badgeTimer = setInterval(update, 250);
  }
}

// --- datasets and kinds ---------------------------------------------------------------------

let datasetsInFlight = null;
async function refreshDatasets() {
  if (datasetsInFlight) {
    datasetsInFlight.again = true; // coalesce bursts of dataset_update
    return;
  }
  datasetsInFlight = { again: false };
  try {
    const list = await api.datasets();
    state.datasets = new Map(list.map((d) => [d.id, d]));
    renderDatasets();
  } catch (err) {
    reportError(err, "Could not load datasets");
  }
  const again = datasetsInFlight.again;
  datasetsInFlight = null;
  if (again) refreshDatasets();
}

function renderDatasets() {
  const list = $("#datasets");
  const items = [...state.datasets.values()].sort((a, b) => b.createdAt - a.createdAt);
  list.replaceChildren(
    ...items.map((d) =>
      h(
        "li",
        { dataset: { datasetId: d.id } },
        h("span", { class: "ds-name", title: d.id }, d.name),
        h("span", { class: "ds-size" }, `${d.size.toLocaleString()} example${d.size === 1 ? "" : "s"} · ${d.intentCount} intent${d.intentCount === 1 ? "" : "s"}`),
      ),
    ),
  );
  $("#datasets-empty").hidden = items.length > 0;
  // Keep the start form's choice, offer the rest.
  const sel = $("#start-dataset");
  const keep = sel.value;
  sel.replaceChildren(h("option", { value: "" }, "— none —"), ...items.map((d) => h("option", { value: d.id }, `${d.name} (${d.size})`)));
  sel.value = state.datasets.has(keep) ? keep : items.find((d) => d.size > 0)?.id || "";
  table.relabel(); // the table shows dataset names
}

const PARAM_HINTS = {
  "nlu-train": '{"epochs": 8}',
  "fine-tune": '{"baseJobId": "job-…", "epochs": 4}',
  simulate: '{"steps": 10, "stepMs": 500}',
};

async function loadKinds() {
  try {
    state.kinds = await api.kinds();
  } catch (err) {
    reportError(err, "Could not load job kinds");
    return;
  }
  const sel = $("#start-kind");
  const keep = sel.value;
  sel.replaceChildren(...state.kinds.map((k) => h("option", { value: k.kind }, k.kind)));
  sel.value = state.kinds.some((k) => k.kind === keep) ? keep : state.kinds.some((k) => k.kind === "nlu-train") ? "nlu-train" : state.kinds[0]?.kind || "";
  kindChanged();
}

function kindChanged() {
  const k = state.kinds.find((x) => x.kind === $("#start-kind").value);
  $("#kind-desc").textContent = k ? k.description : "";
  $("#start-params").placeholder = PARAM_HINTS[k?.kind] || "{}";
  const sel = $("#start-dataset");
  sel.required = Boolean(k?.requiresDataset);
  if (k && !k.requiresDataset) sel.value = "";
  else if (!sel.value) sel.value = [...state.datasets.values()].find((d) => d.size > 0)?.id || "";
}

// --- forms ----------------------------------------------------------------------------------

function formMessage(el, text, kind) {
  el.textContent = text;
  el.className = `form-msg ${kind || ""}`;
}

async function startTraining(e) {
  e.preventDefault();
  const msg = $("#start-msg");
  const raw = $("#start-params").value.trim();
  let params = {};
  if (raw) {
    try {
      params = JSON.parse(raw);
    } catch (err) {
      formMessage(msg, `Params are not valid JSON: ${err.message}`, "error");
      return;
    }
    if (!params || typeof params !== "object" || Array.isArray(params)) {
      formMessage(msg, "Params must be a JSON object, like {\"epochs\": 5}", "error");
      return;
    }
  }
  const body = { kind: $("#start-kind").value, params };
  const ds = $("#start-dataset").value;
  if (ds) body.datasetId = ds;
  const button = e.submitter || $("#start-form button[type=submit]");
  button.disabled = true;
  formMessage(msg, "Starting…");
  try {
    const job = await api.createJob(body);
    formMessage(msg, `Queued ${job.id}`, "ok");
    if (!state.jobs.has(job.id)) {
      state.jobs.set(job.id, job);
      table.render(job);
    }
    selectJob(job.id);
  } catch (err) {
    formMessage(msg, err.isAuth ? `${err.status}: ${err.message}` : `${err.field ? err.field + ": " : ""}${err.message}`, "error");
  } finally {
    button.disabled = false;
  }
}

let parsedUpload = null;
async function readUpload() {
  const msg = $("#upload-msg");
  const file = $("#upload-file").files[0];
  parsedUpload = null;
  if (!file) return null;
  try {
    const examples = parseExamples(await file.text(), file.name);
    const intents = new Set(examples.map((x) => x.intent)).size;
    parsedUpload = { file, examples };
    formMessage(msg, `${examples.length} examples, ${intents} intents`, "");
    if (!$("#upload-name").value) $("#upload-name").placeholder = file.name.replace(/\.[^.]+$/, "");
  } catch (err) {
    formMessage(msg, `${file.name}: ${err.message}`, "error");
  }
  return parsedUpload;
}

async function uploadDataset(e) {
  e.preventDefault();
  const msg = $("#upload-msg");
  const parsed = parsedUpload || (await readUpload());
  if (!parsed) {
    if (!$("#upload-msg").textContent) formMessage(msg, "Choose a JSONL or CSV file", "error");
    return;
  }
  const name = $("#upload-name").value.trim() || parsed.file.name.replace(/\.[^.]+$/, "");
  const button = e.submitter || $("#upload-form button[type=submit]");
  button.disabled = true;
  formMessage(msg, "Uploading…");
  try {
    const ds = await api.createDataset({ name, examples: parsed.examples });
    formMessage(msg, `Created ${ds.name} (${ds.size} examples)`, "ok");
    state.datasets.set(ds.id, ds);
    renderDatasets();
    $("#upload-form").reset();
    $("#upload-name").placeholder = "from the file name";
    parsedUpload = null;
  } catch (err) {
    formMessage(msg, err.isAuth ? `${err.status}: ${err.message}` : `${err.field ? err.field + ": " : ""}${err.message}`, "error");
  } finally {
    button.disabled = false;
  }
}

async function cancelJob(id) {
  try {
    const job = await api.cancelJob(id);
    const known = state.jobs.get(id);
    if (known) mergeUpdate(known, { ...job, timestamp: job.updatedAt });
    else state.jobs.set(id, job);
    table.render(state.jobs.get(id));
    detail.render();
  } catch (err) {
    reportError(err, "Cancel failed");
  }
}

// --- detail ---------------------------------------------------------------------------------

const detail = new JobDetail($("#detail"), {
  getJob: (id) => state.jobs.get(id),
  datasetName,
  onCancel: cancelJob,
  onClose: () => selectJob(null),
  onError: (err) => {
    if (err instanceof ApiError && err.status === 404 && detail.jobId) removeJobs([detail.jobId]); // deleted while away
    else reportError(err, "Could not load the job");
  },
});

function selectJob(id) {
  table.select(id);
  if (!id) {
    detail.close();
    return;
  }
  detail.open(id);
  fetchJob(id); // the document has what events do not carry (final metrics)
  if (window.matchMedia("(max-width: 980px)").matches) $("#detail").scrollIntoView({ behavior: "smooth", block: "start" });
}

// --- start-up -------------------------------------------------------------------------------

function tick() {
  table.tick();
  detail.tick();
}

function init() {
  setAuthErrorHandler(showAuth);
  $("#auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("#auth-token").value.trim();
    if (!token) return;
    setToken(token);
    $("#auth-token").value = "";
    $("#auth").hidden = true;
    state.needToken = false;
    renderTokenState();
    loadKinds();
    resyncAll();
    stream.reconnect();
  });
  $("#forget-token").addEventListener("click", () => {
    setToken("");
    renderTokenState();
    stream.reconnect();
  });
  $("#notice-close").addEventListener("click", () => ($("#notice").hidden = true));
  $("#auth-close").addEventListener("click", () => ($("#auth").hidden = true));
  $("#start-kind").addEventListener("change", kindChanged);
  $("#start-form").addEventListener("submit", startTraining);
  $("#upload-file").addEventListener("change", readUpload);
  $("#upload-form").addEventListener("submit", uploadDataset);
  renderTokenState();
  renderBadge();
  loadKinds();
  refreshDatasets();
  refreshJobs(); // shows the list even if the WebSocket cannot connect; redone once it does
  workers.resync(); // shows the panel even if the WebSocket cannot connect; redone once it does
  stream.start();
  setInterval(tick, 1000);
  debug.ready = true;
}

init();
