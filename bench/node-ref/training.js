'use strict';
// The seed's src/routes/training.ts: datasets and training jobs in in-memory arrays, the JSON
// routes under /training, and the simulated training flows that report every status and
// progress change through the broadcast service.

const fs = require('fs');
const path = require('path');
const express = require('express');
const { trainingWebSocket } = require('./websocket');

const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const ACTIVE = new Set(['queued', 'running']);

// --- errors: mangwale's body shape {"error": {"code", "message", "field"}} ---------------------

class ApiError extends Error {
  constructor(status, code, message, field = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}
const invalid = (message, field, code = 'invalid') => new ApiError(422, code, message, field);
const notFound = (message, field) => new ApiError(404, 'not_found', message, field);
const conflict = (message, field = null) => new ApiError(409, 'conflict', message, field);

// --- in-memory data (the seed keeps arrays) ----------------------------------------------------

// Oldest first, by creation. A Map beside each array finds one by id: the seed scans its
// arrays, which would charge the reference O(n) per GET /training/jobs/{id} for nothing.
const datasets = [];
const datasetsById = new Map();
const jobs = [];
const jobsById = new Map();
let created = 0; // creation order: ids stay unique past one per millisecond; the cursor's position

function newId(prefix) {
  // The seed's `job-${Date.now()}` collides under load; a counter makes it unique.
  created++;
  return { id: `${prefix}-${Date.now()}-${created.toString(36)}`, n: created };
}

function jobDoc(job) {
  // mangwale's job document (wire.Job.to_dict), field for field.
  return {
    id: job.id,
    kind: job.kind,
    datasetId: job.datasetId,
    agentId: job.agentId,
    status: job.status,
    progress: job.progress,
    message: job.message,
    params: job.params,
    attempt: job.attempt,
    createdAt: job.createdAt,
    updatedAt: job.updatedAt,
    startedAt: job.startedAt,
    finishedAt: job.finishedAt,
    error: job.error,
    metrics: job.metrics,
    stalled: false,
    jobSeq: job.jobSeq,
    lease: null,
  };
}

function datasetSummary(ds) {
  return {
    id: ds.id,
    name: ds.name,
    description: ds.description,
    size: ds.examples.length,
    intentCount: new Set(ds.examples.map((e) => e.intent)).size,
    createdAt: ds.createdAt,
    updatedAt: ds.updatedAt,
  };
}

const datasetDoc = (ds) => ({ ...datasetSummary(ds), examples: ds.examples });

// --- training (the seed's updateJobStatus and its simulated step flows) -------------------------

function updateJobStatus(job, status, progress, message) {
  const now = Date.now();
  job.status = status;
  job.progress = progress;
  job.message = message;
  job.updatedAt = now;
  if (status === 'running' && job.startedAt === null) job.startedAt = now;
  if (TERMINAL.has(status)) job.finishedAt = now;
  job.jobSeq++;
  trainingWebSocket.notifyJobUpdate(job.id, status, progress, message);
}

// setTimeout(fn, 0) waits at least 1 ms in Node; a 0 ms step yields to the event loop instead,
// as asyncio.sleep(0) does in mangwale, so "as fast as they come" means the same on both.
const sleep = (ms) => new Promise((resolve) => (ms > 0 ? setTimeout(resolve, ms) : setImmediate(resolve)));

// The seed's step flows: [progress, message] after each step.
const FLOWS = {
  'nlu-train': [[20, 'Preprocessing data...'], [30, 'Training intent classifier...'], [50, 'Training intent classifier...'],
    [70, 'Training entity extractor...'], [85, 'Validating model...'], [95, 'Saving model...']],
  'fine-tune': [[10, 'Loading base model...'], [25, 'Preprocessing data...'], [40, 'Fine-tuning...'], [60, 'Fine-tuning...'],
    [80, 'Validating model...'], [95, 'Saving model...']],
};

async function runJob(job) {
  job.attempt = 1;
  updateJobStatus(job, 'running', 0, 'Starting...');
  const p = job.params;
  let steps;
  if (job.kind === 'simulate') {
    // mangwale's simulate trainer: `steps` steps, `stepMs` apart, the last at 99 %, then the
    // final update.
    const label = p.message || 'Simulating step';
    steps = [];
    for (let i = 1; i <= p.steps; i++) {
      steps.push([i < p.steps ? Math.round((10000 * i) / p.steps) / 100 : 99, `${label} ${i}/${p.steps}`, i]);
    }
  } else {
    steps = FLOWS[job.kind].map(([pct, msg], i) => [pct, msg, i + 1]);
  }
  // Step i is due at start + i * stepMs. The seed sleeps after each update, but its broadcast
  // runs inside the update (a synchronous loop over every client), so its next step would wait
  // for the last one's delivery: a slow fan-out would lower the event rate instead of showing as
  // latency. bench/fanout.py's jobs are an open-loop schedule; mangwale's runner does not wait
  // for delivery either (its fan-out runs apart from the job).
  const stepMs = p.stepMs;
  const start = Date.now();
  for (const [pct, msg, i] of steps) {
    await sleep(stepMs > 0 ? Math.max(0, start + i * stepMs - Date.now()) : 0);
    if (job.status !== 'running') return; // cancelled while it slept
    if (p.failAt != null && i >= p.failAt) {
      job.error = `simulated failure at step ${i} of ${steps.length}`;
      updateJobStatus(job, 'failed', job.progress, job.error);
      return;
    }
    updateJobStatus(job, 'running', pct, msg);
  }
  job.metrics = { steps: steps.length };
  updateJobStatus(job, 'succeeded', 100, 'Training completed');
}

function startTrainingJob(job) {
  // The seed starts a job one second after creating it. The reference starts it at once, as
  // mangwale's runner does, so that a benchmark's jobs x stepMs is the same event rate on both.
  setImmediate(() => {
    if (job.status !== 'queued') return;
    runJob(job).catch((error) => {
      job.error = String(error && error.message);
      updateJobStatus(job, 'failed', job.progress, job.error);
    });
  });
}

// --- request checks (mangwale's rules, so both servers accept and refuse the same bodies) -------

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

function intParam(value, field, low, high, fallback) {
  if (value === undefined || value === null) return fallback;
  if (!Number.isInteger(value) || value < low || value > high) {
    throw invalid(`${field} must be an integer in ${low}..${high}, got ${JSON.stringify(value)}`, field);
  }
  return value;
}

function numParam(value, field, low, high, fallback) {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < low || value > high) {
    throw invalid(`${field} must be a number in ${low}..${high}, got ${JSON.stringify(value)}`, field);
  }
  return value;
}

const KINDS = {
  simulate: {
    description: 'No training: steps through progress on a timer (params: steps, stepMs, failAt)',
    requiresDataset: false,
    params: (p) => {
      const out = {
        steps: intParam(p.steps, 'params.steps', 1, 10000, 4),
        stepMs: numParam(p.stepMs, 'params.stepMs', 0, 3600000, 500),
      };
      const failAt = intParam(p.failAt, 'params.failAt', 1, 10000, null);
      if (failAt !== null) out.failAt = failAt;
      if (p.message != null) out.message = String(p.message);
      return out;
    },
  },
  'nlu-train': {
    description: "The seed's NLU flow, simulated: five steps (params: stepMs)",
    requiresDataset: true,
    params: (p) => ({ stepMs: numParam(p.stepMs, 'params.stepMs', 0, 3600000, 1000) }),
  },
  'fine-tune': {
    description: "The seed's fine-tuning flow, simulated: five steps (params: stepMs)",
    requiresDataset: true,
    params: (p) => ({ stepMs: numParam(p.stepMs, 'params.stepMs', 0, 3600000, 1000) }),
  },
};

function checkExamples(examples) {
  if (examples === undefined) return [];
  if (!Array.isArray(examples)) throw invalid('examples must be a list', 'examples');
  return examples.map((e, i) => {
    if (!isObject(e) || typeof e.text !== 'string' || !e.text.trim() || typeof e.intent !== 'string' || !e.intent.trim()) {
      throw invalid(`examples[${i}] needs a non-blank text and intent`, `examples.${i}`);
    }
    const out = { text: e.text, intent: e.intent };
    if (e.entities != null) out.entities = e.entities;
    return out;
  });
}

function checkName(name, required) {
  if (name === undefined || name === null) {
    if (required) throw invalid('name is required', 'name');
    return null;
  }
  if (typeof name !== 'string' || !name.trim()) throw invalid('name must not be blank', 'name');
  return name.trim();
}

// --- routes ------------------------------------------------------------------------------------

const training = express.Router();

training.get('/datasets', (req, res) => {
  res.json(datasets.map(datasetSummary));
});

training.post('/datasets', (req, res) => {
  const body = isObject(req.body) ? req.body : {};
  const name = checkName(body.name, true);
  const examples = checkExamples(body.examples);
  const now = Date.now();
  const { id } = newId('ds');
  const ds = { id, name, description: body.description ?? null, examples, createdAt: now, updatedAt: now };
  datasets.push(ds);
  datasetsById.set(id, ds);
  trainingWebSocket.notifyDatasetUpdate(id, 'created');
  res.status(201).json(datasetDoc(ds));
});

function findDataset(id) {
  const ds = datasetsById.get(id);
  if (!ds) throw notFound(`dataset ${id} not found`, 'datasetId');
  return ds;
}

training.get('/datasets/:id', (req, res) => {
  res.json(datasetDoc(findDataset(req.params.id)));
});

training.put('/datasets/:id', (req, res) => {
  const ds = findDataset(req.params.id);
  const body = isObject(req.body) ? req.body : {};
  const name = checkName(body.name, false);
  if (name !== null) ds.name = name;
  if (body.examples != null) ds.examples = checkExamples(body.examples);
  if (body.description !== undefined) ds.description = body.description;
  ds.updatedAt = Date.now();
  trainingWebSocket.notifyDatasetUpdate(ds.id, 'updated');
  res.json(datasetDoc(ds));
});

training.delete('/datasets/:id', (req, res) => {
  const ds = findDataset(req.params.id);
  if (jobs.some((j) => j.datasetId === ds.id && ACTIVE.has(j.status))) {
    throw conflict(`dataset ${ds.id} is used by a queued or running job`, 'datasetId');
  }
  datasets.splice(datasets.indexOf(ds), 1);
  datasetsById.delete(ds.id);
  trainingWebSocket.notifyDatasetUpdate(ds.id, 'deleted');
  res.status(204).end();
});

training.get('/kinds', (req, res) => {
  res.json(Object.entries(KINDS).map(([kind, k]) => ({ kind, description: k.description, requiresDataset: k.requiresDataset })));
});

function queryStatuses(raw) {
  if (raw === undefined) return null;
  const parts = (Array.isArray(raw) ? raw : [raw]).flatMap((s) => String(s).split(',')).map((s) => s.trim()).filter(Boolean);
  for (const s of parts) {
    if (!STATUSES.includes(s)) throw invalid(`status '${s}' is not one of ${STATUSES.join(', ')}`, 'status');
  }
  return parts.length ? new Set(parts) : null;
}

function queryInt(raw, field, low, high) {
  if (raw === undefined) return null;
  if (typeof raw !== 'string' || !/^[+-]?[0-9]+$/.test(raw)) throw invalid(`${field}: Input should be a valid integer`, field);
  const n = Number(raw);
  if (n < low || n > high) throw invalid(`${field}: Input should be between ${low} and ${high}`, field);
  return n;
}

// Beyond the seed, which returns the whole array: `limit`, `status` and `cursor`, as mangwale
// serves them, so the REST mix (a 20-job page, ?status=, cursor pages) compares like for like.
// The cursor is the creation number of the last job on the previous page; a binary search finds
// where the next page starts, then the page is read newest first, skipping other statuses.
training.get('/jobs', (req, res) => {
  const statuses = queryStatuses(req.query.status);
  const limit = queryInt(req.query.limit, 'limit', 1, 1000);
  let end = jobs.length; // exclusive: the page starts at jobs[end - 1]
  if (req.query.cursor !== undefined) {
    const c = req.query.cursor;
    if (typeof c !== 'string' || !/^[0-9a-z]{1,20}$/.test(c)) throw invalid('cursor: not a cursor from X-Next-Cursor', 'cursor');
    const before = parseInt(c, 36);
    let lo = 0;
    let hi = jobs.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (jobs[mid].n < before) lo = mid + 1;
      else hi = mid;
    }
    end = lo;
  }
  const want = limit === null ? Infinity : limit + 1;
  const page = [];
  for (let i = end - 1; i >= 0 && page.length < want; i--) {
    const j = jobs[i];
    if (statuses === null || statuses.has(j.status)) page.push(j);
  }
  if (limit !== null && page.length > limit) {
    page.length = limit;
    const position = page[limit - 1].n.toString(36);
    res.set('X-Next-Cursor', position);
    const q = new URLSearchParams(req.query);
    q.set('cursor', position);
    res.set('Link', `<${req.protocol}://${req.get('host')}${req.baseUrl}${req.path}?${q}>; rel="next"`);
  }
  res.json(page.map(jobDoc));
});

training.post('/jobs', (req, res) => {
  const body = isObject(req.body) ? req.body : {};
  const { kind } = body;
  if (typeof kind !== 'string' || !kind) throw invalid('kind is required', 'kind');
  const spec = KINDS[kind];
  if (!spec) throw invalid(`unknown job kind '${kind}' (known: ${Object.keys(KINDS).sort().join(', ')})`, 'kind', 'unknown_kind');
  const datasetId = body.datasetId ?? null;
  if (spec.requiresDataset) {
    if (datasetId === null) throw invalid(`${kind} needs a datasetId`, 'datasetId');
    findDataset(datasetId);
  }
  if (body.params !== undefined && !isObject(body.params)) throw invalid('params must be an object', 'params');
  const params = spec.params(body.params || {});
  const now = Date.now();
  const { id, n } = newId('job');
  const job = {
    id, n, kind, datasetId, agentId: body.agentId ?? null, status: 'queued', progress: 0, message: null, params,
    attempt: 0, createdAt: now, updatedAt: now, startedAt: null, finishedAt: null, error: null, metrics: null, jobSeq: 1,
  };
  jobs.push(job);
  jobsById.set(id, job);
  const doc = jobDoc(job);
  trainingWebSocket.notifyJobCreated(doc);
  startTrainingJob(job);
  res.status(201).json(doc);
});

function findJob(id) {
  const job = jobsById.get(id);
  if (!job) throw notFound(`job ${id} not found`, 'jobId');
  return job;
}

training.get('/jobs/:id', (req, res) => {
  res.json(jobDoc(findJob(req.params.id)));
});

training.post('/jobs/:id/cancel', (req, res) => {
  const job = findJob(req.params.id);
  if (TERMINAL.has(job.status)) throw conflict(`job ${job.id} already ${job.status}`);
  updateJobStatus(job, 'cancelled', job.progress, 'Cancelled');
  res.json(jobDoc(job));
});

training.delete('/jobs/:id', (req, res) => {
  const job = findJob(req.params.id);
  if (ACTIVE.has(job.status)) throw conflict(`job ${job.id} is ${job.status}; cancel it first`);
  jobs.splice(jobs.indexOf(job), 1);
  jobsById.delete(job.id);
  res.status(204).end();
});

function jobCounts() {
  const counts = Object.fromEntries(STATUSES.map((s) => [s, 0]));
  for (const j of jobs) counts[j.status]++;
  return counts;
}

// The seed's store starts with datasets in it; mangwale loads its shipped sample into an empty
// store. The reference loads the same file (SAMPLE_DATASET= to name another, or none), so
// GET /training/datasets returns the same bytes on both and event seq starts after the same event.
function loadSampleDataset() {
  const file = process.env.SAMPLE_DATASET ?? path.join(__dirname, '..', '..', 'mangwale_cli', 'sample_data', 'food_delivery.jsonl');
  if (!file || !fs.existsSync(file)) return;
  const examples = checkExamples(fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l)));
  const now = Date.now();
  const { id } = newId('ds');
  const ds = {
    id, name: 'food-delivery-sample', description: 'Sample food-delivery intents shipped with mangwale (20 intents x 15)',
    examples, createdAt: now, updatedAt: now,
  };
  datasets.push(ds);
  datasetsById.set(id, ds);
  trainingWebSocket.notifyDatasetUpdate(id, 'created');
}

module.exports = { router: training, ApiError, jobCounts, loadSampleDataset };
