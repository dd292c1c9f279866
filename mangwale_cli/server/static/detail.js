// The job detail panel: status history, live log, metric charts and final metrics of one job.
//
// REST fills it when it opens (events, logs, metrics); live events keep it current. Both paths
// meet in maps keyed by seq, lineNo and (attempt, epoch), so a line or point seen twice counts once.

import { api } from "./api.js";
import { lineChart } from "./chart.js";
import { jobMessage } from "./jobs.js";
import { $, TERMINAL, clock, dateTime, duration, elapsed, etaLeft, h, metric, pct } from "./format.js";

const MAX_LOG_LINES = 2000;
const SERIES_LABELS = { loss: "Loss", valAccuracy: "Validation accuracy", accuracy: "Accuracy", valLoss: "Validation loss" };
const PREFERRED = ["loss", "valAccuracy"];
const NOT_SERIES = new Set(["epoch", "epochs", "progress", "attempt", "timestamp", "pointNo", "step", "steps"]);
const REST_ONLY = new Set(["progress", "attempt", "timestamp", "pointNo"]); // added by the server to /metrics

function pointKey(attempt, m) {
  return `${attempt}:${m.epoch ?? JSON.stringify(m)}`;
}

export class JobDetail {
  constructor(root, { getJob, datasetName, onCancel, onClose, onError }) {
    this.root = root;
    this.getJob = getJob;
    this.datasetName = datasetName;
    this.onCancel = onCancel;
    this.onError = onError;
    this.id = null;
    this.generation = 0;
    this.confirmTimer = null;
    $("#detail-close", root).addEventListener("click", () => onClose());
    $("#detail-cancel", root).addEventListener("click", () => this._cancelClicked());
  }

  get jobId() {
    return this.id;
  }

  open(id) {
    this.id = id;
    this.generation++;
    this.events = new Map();
    this.logs = new Map();
    this.metrics = new Map();
    this.renderedLog = 0;
    this.renderedLogUpTo = 0;
    this.loaded = false;
    this.root.hidden = false;
    $("#detail-id", this.root).textContent = id;
    $("#log", this.root).replaceChildren();
    this._resetCancel();
    this.render();
    return this.reload();
  }

  close() {
    this.id = null;
    this.generation++;
    this.root.hidden = true;
  }

  /** Re-read everything over REST (on open and after a resync). */
  async reload() {
    const gen = this.generation;
    const id = this.id;
    try {
      const [events, logs, metrics] = await Promise.all([api.jobEvents(id), api.jobLogs(id), api.jobMetrics(id)]);
      if (gen !== this.generation) return;
      for (const ev of events) this._take(ev);
      for (const line of logs) this.logs.set(line.lineNo, line);
      for (const m of metrics) {
        const values = Object.fromEntries(Object.entries(m).filter(([k]) => !REST_ONLY.has(k)));
        this.metrics.set(pointKey(m.attempt, values), { attempt: m.attempt, m: values });
      }
      this.loaded = true;
      this.render();
    } catch (err) {
      if (gen === this.generation) this.onError(err);
    }
  }

  /** A live event about this job. */
  applyEvent(ev) {
    if (ev.jobId !== this.id) return;
    this._take(ev);
    if (ev.type === "job_log") this._renderLog();
    else this.render();
  }

  _take(ev) {
    if (ev.type === "job_log") {
      this.logs.set(ev.lineNo, { lineNo: ev.lineNo, stream: ev.stream, line: ev.line, attempt: ev.attempt, timestamp: ev.timestamp });
      return;
    }
    if (ev.type !== "job_created" && ev.type !== "training_update") return;
    this.events.set(ev.seq, ev);
    // Terminal updates repeat the final metrics; the curve holds the reports made while running.
    if (ev.type === "training_update" && ev.metrics && !TERMINAL.has(ev.status)) {
      this.metrics.set(pointKey(ev.attempt, ev.metrics), { attempt: ev.attempt, m: ev.metrics });
    }
  }

  render() {
    if (!this.id) return;
    const job = this.getJob(this.id);
    this._renderSummary(job);
    this._renderCharts(job);
    this._renderHistory(job);
    this._renderFinal(job);
    this._renderLog();
  }

  tick() {
    if (!this.id) return;
    const job = this.getJob(this.id);
    if (!job) return;
    const e = $("#detail-elapsed", this.root);
    if (e) e.textContent = duration(elapsed(job));
    const t = $("#detail-eta", this.root);
    if (t) t.textContent = TERMINAL.has(job.status) ? "–" : duration(etaLeft(job));
  }

  _renderSummary(job) {
    const cancel = $("#detail-cancel", this.root);
    const summary = $("#detail-summary", this.root);
    if (!job) {
      summary.replaceChildren(h("p", { class: "muted" }, "Loading…"));
      cancel.hidden = true;
      return;
    }
    cancel.hidden = TERMINAL.has(job.status);
    const p = pct(job.progress);
    const bar = h("div", { class: `bar ${job.status}`, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": p });
    const fill = h("div", { class: "fill" });
    fill.style.width = `${p}%`;
    bar.append(fill);
    const facts = [
      ["Kind", job.kind],
      ["Dataset", this.datasetName(job.datasetId)],
      ["Attempt", String(job.attempt || 0)],
      ["Created", dateTime(job.createdAt)],
      ["Elapsed", h("span", { id: "detail-elapsed" }, duration(elapsed(job)))],
      ["ETA", h("span", { id: "detail-eta" }, TERMINAL.has(job.status) ? "–" : duration(etaLeft(job)))],
    ];
    // One line, with spaces where it may wrap.
    const params = Object.keys(job.params || {}).length ? JSON.stringify(job.params, null, 1).replace(/\n\s*/g, " ") : "{}";
    facts.push(["Params", h("code", {}, params)]);
    const parts = [
      h(
        "div",
        { class: "detail-progress" },
        h("span", { class: `pill ${job.status}`, id: "detail-status" }, job.status),
        job.stalled ? h("span", { class: "pill stalled" }, "stalled") : null,
        bar,
        h("span", { class: "pct" }, `${p} %`),
      ),
      h("p", { class: "step-msg" }, job.status === "queued" && job.waitingFor ? jobMessage(job) : job.message || (job.status === "queued" ? "Waiting for a runner…" : "")),
      job.error ? h("p", { class: "error-text" }, job.error) : null,
      h("dl", { class: "facts" }, ...facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))),
    ];
    summary.replaceChildren(...parts.filter(Boolean));
  }

  _points() {
    const all = [...this.metrics.values()];
    if (!all.length) return [];
    const attempt = Math.max(...all.map((p) => p.attempt || 0));
    const pts = all.filter((p) => (p.attempt || 0) === attempt);
    pts.forEach((p, i) => (p.x = typeof p.m.epoch === "number" ? p.m.epoch : i + 1));
    return pts.sort((a, b) => a.x - b.x);
  }

  _renderCharts(job) {
    const box = $("#charts", this.root);
    const pts = this._points();
    const keys = new Set();
    for (const p of pts) for (const [k, v] of Object.entries(p.m)) if (typeof v === "number" && !NOT_SERIES.has(k)) keys.add(k);
    let series = PREFERRED.filter((k) => keys.has(k));
    if (!series.length) series = [...keys].slice(0, 2);
    if (!series.length) {
      if (job && TERMINAL.has(job.status) && this.loaded) {
        box.replaceChildren(h("p", { class: "muted" }, "This job reported no metrics."));
        return;
      }
      series = PREFERRED; // empty charts, waiting for the first epoch
    }
    const xMax = Math.max(0, ...pts.map((p) => p.m.epochs || 0));
    box.replaceChildren(
      ...series.map((key) => {
        const div = h("div", { class: "chart-box", dataset: { metric: key } });
        const data = pts.filter((p) => typeof p.m[key] === "number").map((p) => ({ x: p.x, y: p.m[key], label: `epoch ${p.x}` }));
        const isRatio = /acc|f1|precision|recall/i.test(key);
        lineChart(div, data, {
          title: SERIES_LABELS[key] || key,
          series: key === "loss" ? "s-loss" : isRatio ? "s-acc" : "s-other",
          xMax,
          yMin: isRatio ? 0 : undefined,
          yMax: isRatio ? 1 : undefined,
          format: (v) => metric(key, v),
        });
        return div;
      }),
    );
  }

  _renderHistory(job) {
    const list = $("#history", this.root);
    const evs = [...this.events.values()].sort((a, b) => a.seq - b.seq);
    const items = [];
    let last = null;
    for (const ev of evs) {
      const status = ev.type === "job_created" ? ev.job.status : ev.status;
      const attempt = ev.type === "job_created" ? ev.job.attempt : ev.attempt;
      const at = ev.type === "job_created" ? ev.job.createdAt : ev.timestamp;
      if (last && last.status === status && last.attempt === attempt) continue;
      last = { status, attempt, at, message: ev.type === "job_created" ? "created" : ev.message, error: ev.error };
      items.push(last);
    }
    if (!items.length && job) items.push({ status: job.status, attempt: job.attempt, at: job.updatedAt, message: job.message });
    list.replaceChildren(
      ...items.map((it) =>
        h(
          "li",
          { dataset: { status: it.status } },
          h("time", {}, clock(it.at)),
          h("span", { class: `pill ${it.status}` }, it.status),
          it.attempt ? h("span", { class: "muted" }, ` attempt ${it.attempt}`) : null,
          it.error || it.message ? h("span", { class: "hist-msg" }, it.error || it.message) : null,
        ),
      ),
    );
  }

  _renderFinal(job) {
    const box = $("#final-metrics", this.root);
    const wrap = $("#final-wrap", this.root);
    if (!job || !TERMINAL.has(job.status) || !job.metrics || !Object.keys(job.metrics).length) {
      wrap.hidden = true;
      return;
    }
    wrap.hidden = false;
    const scalars = Object.entries(job.metrics).filter(([, v]) => typeof v !== "object" || v === null);
    const nested = Object.entries(job.metrics).filter(([, v]) => v && typeof v === "object");
    box.replaceChildren(
      h("div", { class: "tiles" }, ...scalars.map(([k, v]) => h("div", { class: "tile", dataset: { metric: k } }, h("span", { class: "tile-v" }, metric(k, v)), h("span", { class: "tile-k" }, k)))),
      ...nested.map(([k, obj]) =>
        h(
          "details",
          {},
          h("summary", {}, k),
          h("table", { class: "kv" }, h("tbody", {}, ...Object.entries(obj).map(([kk, vv]) => h("tr", {}, h("td", {}, kk), h("td", {}, typeof vv === "object" ? JSON.stringify(vv) : metric(k, vv)))))),
        ),
      ),
    );
  }

  _renderLog() {
    const pre = $("#log", this.root);
    const all = [...this.logs.values()].sort((a, b) => a.lineNo - b.lineNo);
    $("#log-count", this.root).textContent = all.length ? `${all.length} line${all.length === 1 ? "" : "s"}` : "";
    if (!all.length) {
      pre.replaceChildren(h("span", { class: "muted" }, this.loaded ? "No log lines yet." : "Loading…"));
      this.renderedLog = 0;
      return;
    }
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
    const fresh = all.filter((l) => l.lineNo > this.renderedLogUpTo);
    if (this.renderedLog > 0 && this.renderedLog + fresh.length === all.length) {
      pre.append(...fresh.map(logLine)); // only newer lines came: append
      while (pre.childElementCount > MAX_LOG_LINES) pre.firstElementChild.remove();
    } else {
      pre.replaceChildren(...all.slice(-MAX_LOG_LINES).map(logLine)); // first render, or a late line
    }
    this.renderedLog = all.length;
    this.renderedLogUpTo = all[all.length - 1].lineNo;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  _cancelClicked() {
    const btn = $("#detail-cancel", this.root);
    if (!btn.classList.contains("confirm")) {
      // Two clicks: a stray tap on a phone must not kill an hour of training.
      btn.classList.add("confirm");
      btn.textContent = "Really cancel?";
      this.confirmTimer = setTimeout(() => this._resetCancel(), 4000);
      return;
    }
    this._resetCancel();
    this.onCancel(this.id);
  }

  _resetCancel() {
    clearTimeout(this.confirmTimer);
    const btn = $("#detail-cancel", this.root);
    btn.classList.remove("confirm");
    btn.textContent = "Cancel job";
  }
}

function logLine(l) {
  return h("span", { class: `ln ${l.stream || ""}`, dataset: { line: l.lineNo } }, h("span", { class: "ln-t" }, clock(l.timestamp)), ` ${l.line}\n`);
}
