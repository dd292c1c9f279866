// The workers panel: the remote workers registered with this instance (GET /workers).
//
// Worker heartbeats are not events (they would push progress out of the replay window), so this
// one panel asks the API again every few seconds instead of following the event stream.

import { api } from "./api.js";
import { $, h } from "./format.js";

const REFRESH_MS = 5000;

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}

function row(w) {
  const labels = w.labels.length ? w.labels.join(", ") : "no labels";
  const running = w.running.length ? w.running.join(", ") : "idle";
  return h(
    "li",
    { class: `worker ${w.state}`, "data-id": w.id },
    h("span", { class: "worker-head" }, h("strong", {}, w.name), " ", h("span", { class: `pill ${w.state}` }, w.state)),
    h("span", { class: "muted small" }, `${labels} · ${w.running.length}/${w.concurrency} running: ${running}`),
    h("span", { class: "muted small" }, `kinds ${w.kinds.join(", ")} · heartbeat ${ago(w.lastHeartbeat)}`),
  );
}

export async function refreshWorkers() {
  const card = $("#workers-card");
  try {
    const list = await api.workers();
    $("#workers").replaceChildren(...list.map(row));
    $("#workers-empty").hidden = list.length > 0;
    card.hidden = false;
  } catch {
    card.hidden = true; // no read scope, or the server is away: the rest of the page says so
  }
}

export function startWorkersPanel() {
  refreshWorkers();
  setInterval(refreshWorkers, REFRESH_MS);
}
