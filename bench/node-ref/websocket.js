'use strict';
// The seed's src/utils/websocket.ts: one TrainingWebSocketService that keeps a Set of clients,
// greets each with `connected`, pings every 30 s, and broadcasts an update by serialising it
// once and sending it to every open client in turn.

const { WebSocketServer, WebSocket } = require('ws');

// The seed logs every connection and every broadcast. mangwale is benchmarked at WARNING with
// no access log, so the reference is quiet unless REF_LOG=1: console.log costs per call.
const LOG = process.env.REF_LOG === '1';
const log = LOG ? (...a) => console.log(...a) : () => {};

class TrainingWebSocketService {
  constructor() {
    this.clients = new Set();
    this.wss = null;
    // Beyond the seed: a global sequence number on every broadcast event and the head in the
    // greeting (the seed lists "sequence numbers" as a Phase 6 mitigation). bench/fanout.py
    // counts losses from `seq` gaps on both servers; mangwale's events carry the same field.
    this.headSeq = 0;
    // Beyond the seed, for the harness's GET /metrics: the seed already counts sentCount per
    // broadcast; these add it up.
    this.delivered = 0;
    this.logged = 0;
  }

  initialize(server) {
    // permessage-deflate is off by default in a `ws` server, as in the seed (no option given).
    this.wss = new WebSocketServer({ server, path: '/ws/training' });
    this.wss.on('connection', (ws) => {
      log('[WebSocket] Client connected');
      ws.isAlive = true;
      this.clients.add(ws);
      ws.on('pong', () => {
        ws.isAlive = true;
      });
      ws.on('message', (data) => {
        // The seed's client keepalive: {"type": "ping"} answered with {"type": "pong"}.
        let msg;
        try {
          msg = JSON.parse(data);
        } catch {
          return;
        }
        if (msg && msg.type === 'ping' && ws.readyState === WebSocket.OPEN) {
          ws.send(JSON.stringify({ type: 'pong', timestamp: Date.now() }));
        }
      });
      ws.on('close', () => {
        log('[WebSocket] Client disconnected');
        this.clients.delete(ws);
      });
      ws.on('error', (error) => {
        log('[WebSocket] Client error:', error.message);
        this.clients.delete(ws);
      });
      ws.send(JSON.stringify({
        type: 'connected',
        message: 'Connected to training updates',
        timestamp: Date.now(),
        headSeq: this.headSeq, // beyond the seed: where this client starts counting (see above)
      }));
    });
    // The seed's "automatic ping/pong keepalive (every 30 seconds)".
    this.heartbeat = setInterval(() => {
      this.clients.forEach((ws) => {
        if (!ws.isAlive) {
          this.clients.delete(ws);
          ws.terminate();
          return;
        }
        ws.isAlive = false;
        ws.ping();
      });
    }, 30000);
    this.heartbeat.unref();
  }

  broadcast(update) {
    // `seq` goes last, after `timestamp`: the harness reads both top-level fields from the end.
    update.seq = ++this.headSeq;
    this.logged++;
    const payload = JSON.stringify(update);
    let sentCount = 0;
    this.clients.forEach((client) => {
      if (client.readyState === WebSocket.OPEN) {
        try {
          client.send(payload);
          sentCount++;
        } catch (error) {
          console.error('[WebSocket] Failed to broadcast:', error);
          this.clients.delete(client);
        }
      }
    });
    this.delivered += sentCount;
    return sentCount;
  }

  broadcastTrainingUpdate(update) {
    const sentCount = this.broadcast(update);
    if (sentCount > 0) {
      log(`[WebSocket] Broadcasted training update for job ${update.jobId} to ${sentCount} clients`);
    }
  }

  notifyJobCreated(job) {
    this.broadcast({ type: 'job_created', job, timestamp: Date.now() });
  }

  notifyJobUpdate(jobId, status, progress, message) {
    this.broadcastTrainingUpdate({ type: 'training_update', jobId, status, progress, message, timestamp: Date.now() });
  }

  notifyDatasetUpdate(datasetId, action) {
    this.broadcast({ type: 'dataset_update', datasetId, action, timestamp: Date.now() });
  }
}

const trainingWebSocket = new TrainingWebSocketService();

module.exports = { trainingWebSocket };
