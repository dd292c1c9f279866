'use strict';
// The seed's training backend (../shared/seed/realtime-training-updates.md), rebuilt as the
// reference that mangwale's bench/ measures against. One Node process, as the seed runs it:
//
// - an Express app with JSON routes for datasets and training jobs, kept in in-memory arrays;
// - `http.createServer(app)` with a `ws` WebSocketServer attached on /ws/training, on the same
//   port, greeting each client with `connected`;
// - a broadcast service (the seed's TrainingWebSocketService) that serialises each update once
//   with JSON.stringify and loops `client.send(payload)` over a Set of open clients, with the
//   seed's 30 s ping/pong keepalive;
// - a simulated training loop that emits `training_update` on every status/progress change.
//
// Paths, field names and status values are mangwale's (README "REST API", mangwale_cli/wire.py),
// so one harness drives both servers. Where this goes beyond the seed, a comment says so and why;
// each addition is the cheapest thing that gives the harness the same measurement on both
// servers, and none of it is on the seed's hot path except an integer per event (`seq`).
//
// The files follow the seed's: websocket.js (src/utils/websocket.ts), training.js
// (src/routes/training.ts) and this one (src/server.ts).
//
//   PORT=8080 node server.js          (or: node server.js 8080; HOST defaults to 127.0.0.1)
//   REF_LOG=1 node server.js          the seed's per-connection and per-broadcast console logs

const http = require('http');
const express = require('express');
const { trainingWebSocket } = require('./websocket');
const { router, ApiError, jobCounts, loadSampleDataset } = require('./training');

const PORT = Number(process.env.PORT || process.argv[2] || 8080);
// The seed listens on every interface; a benchmark reference listens on loopback unless told.
const HOST = process.env.HOST || '127.0.0.1';

// --- the server (the seed's src/server.ts) ------------------------------------------------------

const app = express();
app.use(express.json());
app.use('/training', router);

// Beyond the seed, for the harness: the same liveness and counters bench/ reads from mangwale.
app.get('/healthz', (req, res) => {
  res.json({
    status: 'ok',
    version: `node-ref (node ${process.versions.node})`,
    epoch: 'node-ref',
    headSeq: trainingWebSocket.headSeq,
    jobs: jobCounts(),
    streams: trainingWebSocket.clients.size,
    store: 'memory',
  });
});

app.get('/metrics', (req, res) => {
  res.json({
    eventsLogged: trainingWebSocket.logged,
    eventsDelivered: trainingWebSocket.delivered,
    // The seed has no limit on a slow client's buffer (`ws` buffers without bound); only the
    // heartbeat ends a peer that stopped answering pings.
    clientsDroppedSlow: 0,
    connections: trainingWebSocket.clients.size,
  });
});

app.use((req, res) => {
  res.status(404).json({ error: { code: 'no_route', message: `no route ${req.method} ${req.path}`, field: null } });
});

// eslint-disable-next-line no-unused-vars
app.use((err, req, res, next) => {
  if (err instanceof ApiError) {
    res.status(err.status).json({ error: { code: err.code, message: err.message, field: err.field } });
    return;
  }
  // body-parser's errors: malformed JSON (400), a body over its 100 kB default (413)
  const status = err.status || err.statusCode || 500;
  const code = status === 413 ? 'too_large' : status < 500 ? 'invalid_json' : 'server_error';
  if (status >= 500) console.error(err);
  res.status(status).json({ error: { code, message: err.message, field: status < 500 ? 'body' : null } });
});

loadSampleDataset();
const server = http.createServer(app);
trainingWebSocket.initialize(server);
server.listen(PORT, HOST, () => {
  const { port } = server.address();
  console.log(`[server] node-ref listening on http://${HOST}:${port} (WebSocket ws://${HOST}:${port}/ws/training)`);
});

function shutdown() {
  // Like mangwale's SIGTERM close: tell WebSocket clients the server is going away (1001).
  trainingWebSocket.clients.forEach((ws) => ws.close(1001, 'server shutting down'));
  server.close();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
