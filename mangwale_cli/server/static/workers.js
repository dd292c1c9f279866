// The workers panel: the remote workers registered with the server (every instance, on Redis).
//
// It follows the live stream, not a timer: each `worker_update` (a GET /workers row; docs/protocol.md,
// "Live-only messages") replaces or removes one row. Those messages are not numbered nor replayed,
// so after every (re)connect the panel takes the rows from GET /workers once and then applies, in
// order, the updates that arrived while that request was on its way: each change is announced after
// it is made, so the last word on a worker is always the newest. Heartbeats are not announced.

import { api } from "./api.js";
import { $, h } from "./format.js";

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}

function row(w) {
  const labels = w.labels.length ? w.labels.join(", ") : "no labels";
  const running = w.running.length ? w.running.join(", ") : "idle";
  // A live worker's heartbeat is not announced: only a lost one says when it was last heard.
  const heard = w.state === "lost" ? ` · last heard ${ago(w.lastHeartbeat)}` : "";
  return h(
    "li",
    { class: `worker ${w.state}`, "data-id": w.id, "data-state": w.state },
    h("span", { class: "worker-head" }, h("strong", {}, w.name), " ", h("span", { class: `pill ${w.state}` }, w.state)),
    h("span", { class: "muted small" }, `${labels} · ${w.running.length}/${w.concurrency} running: ${running}`),
    h("span", { class: "muted small" }, `kinds ${w.kinds.join(", ")}${heard}`),
  );
}

export class WorkersPanel {
  constructor() {
    this.rows = new Map(); // id -> GET /workers row
    this.pending = null; // updates received while a GET is on its way, in order
    this.fetches = 0; // GET /workers requests made (window.__mangwale.workers, for tests)
    this.updates = 0; // worker_update messages applied
  }

  /** Take the rows from REST; called at start and after every (re)connect of the live stream. */
  async resync() {
    const mine = (this.pending = []);
    this.fetches++;
    let list;
    try {
      list = await api.workers();
    } catch {
      if (this.pending === mine) this.pending = null;
      $("#workers-card").hidden = true; // no read scope, or the server is away: the page says so
      return;
    }
    if (this.pending !== mine) return; // a newer resync took over
    this.pending = null;
    this.rows = new Map(list.map((w) => [w.id, w]));
    for (const w of mine) this._apply(w);
    this.render();
  }

  /** A `worker_update` from the live stream. */
  onUpdate(msg) {
    const w = msg.worker;
    if (!w || typeof w.id !== "string") return;
    this.updates++;
    if (this.pending) {
      this.pending.push(w);
      return;
    }
    this._apply(w);
    this.render();
  }

  _apply(w) {
    if (w.removed || w.state === "gone") this.rows.delete(w.id);
    else this.rows.set(w.id, w);
  }

  render() {
    const list = [...this.rows.values()].sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
    $("#workers").replaceChildren(...list.map(row));
    $("#workers-empty").hidden = list.length > 0;
    $("#workers-card").hidden = false;
  }
}
