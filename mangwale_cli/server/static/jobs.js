// The jobs table (newest first, one row per job, updated in place) and the rules that merge live
// updates and REST documents into one job without ever moving it backwards.

import { TERMINAL, duration, elapsed, etaLeft, h, pct, shortId } from "./format.js";

const STAGE = { queued: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2 };
const LIVE_FIELDS = ["status", "progress", "message", "attempt", "stalled", "error", "startedAt", "finishedAt", "updatedAt", "worker", "waitingFor"];

/** What a job's message cell says: the error of a failed job, what a queued one waits for. */
export function jobMessage(job) {
  if (job.status === "failed" && job.error) return job.error;
  const msg = job.message || "";
  if (job.status === "queued" && job.waitingFor && !msg.includes(job.waitingFor)) return msg ? `${msg}; ${job.waitingFor}` : job.waitingFor;
  return msg || (job.status === "queued" ? "Queued" : "");
}

/** The REST document `doc`, keeping the live fields of `known` where live events got further. */
export function newer(doc, known) {
  const rank = (j) => [j.attempt || 0, STAGE[j.status] ?? 0, j.progress || 0];
  const [a, b] = [rank(doc), rank(known)];
  const docAhead = a[0] !== b[0] ? a[0] > b[0] : a[1] !== b[1] ? a[1] > b[1] : a[2] >= b[2];
  const out = { ...doc, eta: known.eta, etaAt: known.etaAt };
  if (!docAhead) for (const k of LIVE_FIELDS) out[k] = known[k];
  return out;
}

/** Apply a training_update to a job document. Returns false for a stale update. */
export function mergeUpdate(job, ev) {
  if ((ev.attempt ?? 0) < (job.attempt ?? 0)) return false;
  const same = (ev.attempt ?? 0) === (job.attempt ?? 0);
  if (same && TERMINAL.has(job.status) && !TERMINAL.has(ev.status)) return false;
  // Within an attempt progress never goes backwards, so an older update cannot undo a newer one.
  job.progress = same && !TERMINAL.has(ev.status) ? Math.max(job.progress || 0, ev.progress || 0) : ev.progress;
  if (ev.status === "running" && (!job.startedAt || !same)) job.startedAt = ev.timestamp;
  job.status = ev.status;
  job.attempt = ev.attempt ?? job.attempt;
  // A message that only said what the job waited for goes when the wait is over.
  if (job.waitingFor && job.message === job.waitingFor && !ev.waitingFor) job.message = ev.message ?? null;
  if (ev.message !== undefined && ev.message !== null) job.message = ev.message;
  job.waitingFor = ev.status === "queued" ? ev.waitingFor ?? null : null;
  job.stalled = Boolean(ev.stalled);
  if (ev.error) job.error = ev.error;
  job.updatedAt = Math.max(job.updatedAt || 0, ev.timestamp || 0);
  if (TERMINAL.has(ev.status)) {
    if (!job.finishedAt || !same) job.finishedAt = ev.timestamp;
    job.eta = null;
  } else if (typeof ev.eta === "number") {
    job.eta = ev.eta;
    job.etaAt = Date.now();
  }
  return true;
}

export class JobsTable {
  /** body: the <tbody>; jobs: the Map of job documents; datasetName(id); onSelect(id); selectedId(). */
  constructor({ body, count, empty, jobs, datasetName, onSelect, selectedId }) {
    Object.assign(this, { body, count, empty, jobs, datasetName, onSelect, selectedId });
  }

  row(id) {
    return this.body.querySelector(`tr[data-job-id="${CSS.escape(id)}"]`);
  }

  _rowFor(job) {
    let tr = this.row(job.id);
    if (tr) return tr;
    tr = h("tr", { class: "job-row", tabindex: 0, dataset: { jobId: job.id } });
    const bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-label": "progress" }, h("div", { class: "fill" }));
    tr.append(
      h("td", { class: "c-id", dataset: { label: "ID" } }, h("code", { title: job.id }, shortId(job.id))),
      h("td", { class: "c-kind", dataset: { label: "Kind" } }),
      h("td", { class: "c-dataset", dataset: { label: "Dataset" } }),
      h("td", { class: "c-status", dataset: { label: "Status" } }, h("span", { class: "pill" })),
      h("td", { class: "c-progress", dataset: { label: "Progress" } }, bar, h("div", { class: "step" }, h("span", { class: "pct" }), h("span", { class: "msg" }))),
      h("td", { class: "c-elapsed", dataset: { label: "Elapsed" } }),
      h("td", { class: "c-eta", dataset: { label: "ETA" } }),
    );
    tr.addEventListener("click", () => this.onSelect(job.id));
    tr.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        this.onSelect(job.id);
      }
    });
    return tr;
  }

  _fill(tr, job, now = Date.now()) {
    const p = pct(job.progress);
    tr.className = `job-row status-${job.status}${this.selectedId() === job.id ? " selected" : ""}`;
    tr.querySelector(".c-kind").textContent = job.worker ? `${job.kind} · ${job.worker}` : job.kind;
    tr.querySelector(".c-dataset").textContent = this.datasetName(job.datasetId);
    const pill = tr.querySelector(".pill");
    pill.className = `pill ${job.status}`;
    pill.textContent = job.stalled && job.status === "running" ? "running (stalled)" : job.status;
    const bar = tr.querySelector(".bar");
    bar.className = `bar ${job.status}`;
    bar.setAttribute("aria-valuenow", String(p));
    bar.firstChild.style.width = `${p}%`;
    tr.querySelector(".pct").textContent = `${p} %`;
    const msg = jobMessage(job);
    const m = tr.querySelector(".msg");
    m.textContent = msg;
    m.title = msg;
    this._times(tr, job, now);
  }

  _times(tr, job, now) {
    tr.querySelector(".c-elapsed").textContent = duration(elapsed(job, now));
    tr.querySelector(".c-eta").textContent = TERMINAL.has(job.status) ? "–" : duration(etaLeft(job, now));
  }

  /** Fill one job's row, inserting it where createdAt says (newest first). */
  render(job) {
    const tr = this._rowFor(job);
    this._fill(tr, job);
    if (!tr.isConnected) {
      let before = null;
      for (const other of this.body.children) {
        const o = this.jobs().get(other.dataset.jobId);
        if (o && (o.createdAt < job.createdAt || (o.createdAt === job.createdAt && o.id < job.id))) {
          before = other;
          break;
        }
      }
      this.body.insertBefore(tr, before);
    }
    this._count();
  }

  renderAll() {
    const jobs = [...this.jobs().values()].sort((a, b) => b.createdAt - a.createdAt || (a.id < b.id ? 1 : -1));
    this.body.replaceChildren(
      ...jobs.map((j) => {
        const tr = this._rowFor(j);
        this._fill(tr, j);
        return tr;
      }),
    );
    this._count();
  }

  /** Elapsed and ETA of running jobs move with the clock, not with events. */
  tick(now = Date.now()) {
    for (const tr of this.body.children) {
      const job = this.jobs().get(tr.dataset.jobId);
      if (job && !TERMINAL.has(job.status)) this._times(tr, job, now);
    }
  }

  /** Dataset names arrived or changed. */
  relabel() {
    for (const tr of this.body.children) {
      const job = this.jobs().get(tr.dataset.jobId);
      if (job) tr.querySelector(".c-dataset").textContent = this.datasetName(job.datasetId);
    }
  }

  /** Drop a deleted job's row. */
  remove(id) {
    this.row(id)?.remove();
    this._count();
  }

  select(id) {
    for (const tr of this.body.querySelectorAll("tr.selected")) tr.classList.remove("selected");
    if (id) this.row(id)?.classList.add("selected");
  }

  _count() {
    const jobs = [...this.jobs().values()];
    const active = jobs.filter((j) => !TERMINAL.has(j.status)).length;
    this.count.textContent = jobs.length ? `${jobs.length} job${jobs.length === 1 ? "" : "s"}${active ? ` · ${active} active` : ""}` : "";
    this.empty.hidden = jobs.length > 0;
  }
}
