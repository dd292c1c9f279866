// Small DOM and formatting helpers shared by the dashboard's modules.

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export const $ = (sel, root = document) => root.querySelector(sel);

/** Create an element: h("td", {class: "x", dataset: {a: 1}}, "text", child...). */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

/** 75 -> "1m 15s", 3700 -> "1h 01m". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

export function clock(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

export function dateTime(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  return `${d.toLocaleDateString()} ${clock(ms)}`;
}

export function pct(progress) {
  const p = Math.max(0, Math.min(100, Number(progress) || 0));
  return p >= 99.95 ? 100 : p < 10 ? Math.round(p * 10) / 10 : Math.round(p);
}

/** Seconds the job has run (so far, or in total once it ended). */
export function elapsed(job, now = Date.now()) {
  if (!job.startedAt) return null;
  const end = TERMINAL.has(job.status) ? job.finishedAt || job.updatedAt : now;
  return Math.max(0, (end - job.startedAt) / 1000);
}

/** Seconds left: the last reported ETA minus the time since it arrived. */
export function etaLeft(job, now = Date.now()) {
  if (TERMINAL.has(job.status) || job.eta === null || job.eta === undefined) return null;
  return Math.max(0, job.eta - (now - (job.etaAt || now)) / 1000);
}

const PERCENT_KEYS = /acc|f1|precision|recall/i;

/** A metric value for people: accuracies as percentages, floats to 4 significant digits. */
export function metric(key, value) {
  if (typeof value !== "number") return String(value);
  if (PERCENT_KEYS.test(key) && value >= 0 && value <= 1) return `${(value * 100).toFixed(1)} %`;
  if (Number.isInteger(value)) return value.toLocaleString();
  const a = Math.abs(value);
  return a !== 0 && (a < 0.001 || a >= 1e6) ? value.toExponential(2) : String(+value.toPrecision(4));
}

export function shortId(id) {
  const tail = String(id).split("-").pop();
  return tail && tail.length < String(id).length ? `…${tail}` : String(id);
}
