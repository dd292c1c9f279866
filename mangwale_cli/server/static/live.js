// The live stream: one WebSocket to /ws/training that resumes where it left off.
//
// It follows the replay contract in docs/protocol.md: reconnect with ?since=<last seq>&epoch=<epoch>,
// drop any event with seq <= the last one handled, and on `resync` tell the page to re-fetch.
// Reconnects back off exponentially with jitter (1 s, 2 s, 4 s ... 30 s, reset after a good
// connection); the delays come from a generator so tests can shrink them.

import { wsProtocols, wsUrl } from "./api.js";

const LOGGED = new Set(["job_created", "training_update", "dataset_update", "job_log", "job_deleted"]);

/** Delays in ms: initial, x2 each time, +/- jitter, capped at max. */
export function* backoff(initial = 1000, max = 30000, jitter = 0.2) {
  let base = initial;
  for (;;) {
    const j = 1 + (Math.random() * 2 - 1) * jitter;
    yield Math.min(max, Math.round(base * j));
    base = Math.min(max, base * 2);
  }
}

/** What to do after the socket closed with `code`: "retry", "fresh" (drop since) or "stop". */
export function afterClose(code) {
  if (code === 1008 || code === 1003) return "stop"; // origin refused / protocol misuse
  if (code === 4400) return "fresh"; // bad params or since in the future: start over
  return "retry"; // 1000/1001/1006/1011/1012/4408 and anything else
}

export class LiveStream {
  /**
   * handlers: onEvent(ev), onResync(msg), onConnected(msg, {fresh}), onState(state),
   * onWorkerUpdate(msg) (a live-only worker_update),
   * onClosed(code) -> may return false to stop reconnecting (e.g. the token was refused).
   */
  constructor(handlers, options = {}) {
    this.h = handlers;
    this.opts = { backoffInitialMs: 1000, backoffMaxMs: 30000, pingMs: 20000, ...options };
    this.lastSeq = null;
    this.epoch = null;
    this.ws = null;
    this.delays = null;
    this.timer = null;
    this.pinger = null;
    this.lastPong = 0;
    this.stopped = true;
    this.state = { name: "connecting", nextAttemptAt: null, attempt: 0 };
  }

  start() {
    this.stopped = false;
    this._connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this._stopPing();
    if (this.ws) this.ws.close(1000, "page stopped");
    this._setState({ name: "stopped", nextAttemptAt: null });
  }

  /** Forget the position: the next connection is live-only and the page re-fetches. */
  forget() {
    this.lastSeq = null;
    this.epoch = null;
  }

  /** Reconnect now (e.g. after a token was entered). */
  reconnect() {
    clearTimeout(this.timer);
    this.stopped = false;
    this.delays = null;
    const old = this.ws;
    this.ws = null; // its close event is ignored from now on
    if (old && old.readyState <= 1) old.close(1000, "reconnecting");
    this._connect();
  }

  _setState(patch) {
    this.state = { ...this.state, ...patch };
    if (this.h.onState) this.h.onState(this.state);
  }

  _connect() {
    clearTimeout(this.timer);
    if (this.stopped) return;
    const params = this.lastSeq === null ? {} : { since: this.lastSeq, epoch: this.epoch };
    const fresh = this.lastSeq === null;
    this._setState({ name: this.state.attempt ? "reconnecting" : "connecting", nextAttemptAt: null });
    let ws;
    try {
      ws = new WebSocket(wsUrl(params), wsProtocols());
    } catch (err) {
      this._scheduleRetry();
      return;
    }
    this.ws = ws;
    let greeted = false;
    ws.onmessage = (msg) => {
      let data;
      try {
        data = JSON.parse(msg.data);
      } catch {
        return;
      }
      if (!data || typeof data !== "object") return;
      if (data.type === "connected") {
        greeted = true;
        this.delays = null; // a good connection resets the backoff
        if (this.lastSeq === null) {
          this.lastSeq = data.headSeq;
          this.epoch = data.epoch;
        }
        this._setState({ name: "live", nextAttemptAt: null, attempt: 0 });
        this._startPing(ws);
        if (this.h.onConnected) this.h.onConnected(data, { fresh });
      } else if (data.type === "resync") {
        this.lastSeq = data.headSeq;
        this.epoch = data.epoch;
        if (this.h.onResync) this.h.onResync(data);
      } else if (data.type === "pong") {
        this.lastPong = Date.now();
      } else if (data.type === "error") {
        if (this.h.onServerError) this.h.onServerError(data);
      } else if (data.type === "worker_update") {
        // Live only (no seq): it never moves the resume point.
        if (this.h.onWorkerUpdate) this.h.onWorkerUpdate(data);
      } else if (LOGGED.has(data.type) && typeof data.seq === "number") {
        if (this.lastSeq !== null && data.seq <= this.lastSeq) return; // already handled
        if (this.h.onEvent) this.h.onEvent(data);
        this.lastSeq = data.seq;
        if (data.epoch) this.epoch = data.epoch;
      }
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this._stopPing();
      if (this.stopped) return;
      const what = afterClose(ev.code);
      const keepGoing = this.h.onClosed ? this.h.onClosed(ev.code, { greeted, what }) : true;
      if (what === "stop" || keepGoing === false) {
        this._setState({ name: "stopped", nextAttemptAt: null });
        return;
      }
      if (what === "fresh") this.forget();
      this._scheduleRetry();
    };
  }

  _scheduleRetry() {
    if (this.stopped) return;
    if (!this.delays) this.delays = backoff(this.opts.backoffInitialMs, this.opts.backoffMaxMs);
    const delay = this.delays.next().value;
    this._setState({ name: "reconnecting", nextAttemptAt: Date.now() + delay, attempt: this.state.attempt + 1 });
    this.timer = setTimeout(() => this._connect(), delay);
  }

  _startPing(ws) {
    this._stopPing();
    this.lastPong = Date.now();
    // The seed's keepalive; a missing pong means a dead connection the browser has not noticed.
    this.pinger = setInterval(() => {
      if (Date.now() - this.lastPong > 2 * this.opts.pingMs + 1000) {
        ws.close(4000, "no pong");
        return;
      }
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "ping" }));
    }, this.opts.pingMs);
  }

  _stopPing() {
    clearInterval(this.pinger);
    this.pinger = null;
  }
}
