"""The Lua scripts of ``RedisStore``: every change is one script, state and event together.

A write script is ``PRELUDE`` + helpers + its body, so each runs as one atomic unit on Redis:

1. **write id.** ``KEYS[1]`` is ``write:{id}``, unique per write. If it exists, the script ran
   already (the reply was lost and the client retried): it returns the reply it gave then and
   changes nothing.
2. **checks, before any write.** The job guard (``refusal`` / ``can_begin``, the same rules as
   ``base.py``, kept in step by the contract suite) and the epoch (``NOEPOCH`` when Redis lost
   its data: the store starts a new epoch and runs the script again). Redis does not roll a
   script back on error, so nothing is written until every check has passed.
3. **the event first.** ``XADD`` with the explicit id ``<seq>-1`` is the one write that can be
   refused (an id at or below the stream's top), so it goes before the state; ``seq`` is stored
   after it. Stream order is therefore seq order, across instances.
4. **the state**, then the reply, kept under the write id for ``write_ttl`` seconds.

Job documents are never re-encoded here (``cjson`` would round floats and turn ``[]`` into
``{}``): Python sends the document without its ``jobSeq``, the script appends
``,"jobSeq":N}``; ``cjson.decode`` only reads the stored status, attempt, lease and jobSeq. The
same goes for events: the script appends ``seq``, ``jobSeq`` and ``epoch`` to the text it got.

Every key a script touches is in KEYS except documents reached through an index (``LIST_JOBS``,
``DELETE_JOBS``, the idempotency lookup, the migration), built from the key prefix in ARGV:
fine on one Redis, not on Redis Cluster (docs/storage.md).
"""

from __future__ import annotations

from ..wire import ACTIVE, TERMINAL, JobStatus

STATUSES = tuple(JobStatus)  # the order of the status-index KEYS the scripts get

_TERMINAL_LUA = ", ".join(f"{s.value} = true" for s in sorted(TERMINAL, key=lambda s: s.value))
_ACTIVE_LUA = ", ".join(f"{s.value} = true" for s in sorted(ACTIVE, key=lambda s: s.value))
_STATUS_NAMES_LUA = ", ".join(f"'{s.value}'" for s in STATUSES)

# KEYS[1..4]: write:{id}, events, seq, epoch. ARGV[1..2]: write id TTL (s), stream MAXLEN.
PRELUDE = (
    "local TERMINAL = {" + _TERMINAL_LUA + "}\n"
    "local ACTIVE = {" + _ACTIVE_LUA + "}\n"
    "local STATUS_NAMES = {" + _STATUS_NAMES_LUA + "}\n"
    """
local W, EVENTS, SEQ, EPOCH = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local WRITE_TTL, MAXLEN = ARGV[1], ARGV[2]

local seen = redis.call('GET', W)
if seen then return cjson.decode(seen) end

local epoch

-- Before anything is written: a Redis that lost its data has no epoch.
local function need_epoch()
  epoch = redis.call('GET', EPOCH)
  if not epoch then error({err = 'NOEPOCH the event log has no epoch (Redis lost its data)'}) end
end

-- Append one event (``body``: its JSON text); kind '0' state, '1' job_log, 'd' job_deleted.
local function emit(job, kind, body, js)
  local seq = tonumber(redis.call('GET', SEQ) or '0') + 1
  local tail = ',"seq":' .. seq
  if js then tail = tail .. ',"jobSeq":' .. js end
  tail = tail .. ',"epoch":"' .. epoch .. '"}'
  redis.call('XADD', EVENTS, 'MAXLEN', '~', MAXLEN, seq .. '-1', 'j', job, 'k', kind,
    's', js or '', 'e', epoch, 'd', string.sub(body, 1, -2) .. tail)
  redis.call('SET', SEQ, seq)
  return seq
end

-- The reply, kept under the write id for a retry.
local function finish(reply)
  redis.call('SET', W, cjson.encode(reply), 'EX', WRITE_TTL)
  return reply
end
"""
)

# The guard: refusal() and can_begin() in base.py, line for line (the reasons read the same).
GUARD = """
local function job_state(doc)
  local d = cjson.decode(doc)
  local h, t
  if type(d['lease']) == 'table' then h, t = d['lease']['holder'], tonumber(d['lease']['token']) end
  return d['status'], tonumber(d['attempt']) or 0, h, t, tonumber(d['jobSeq']) or 0
end

local function lease_text(h, t)
  if h == nil then return '' end
  return h .. '|' .. tostring(t)
end

local function one_of(list, s)
  return string.find(',' .. list .. ',', ',' .. s .. ',', 1, true) ~= nil
end

-- ex: attempt, statuses (comma-separated), holder, token; '' = no condition
local function refusal(s, a, h, t, live, ns, na, ex_attempt, ex_statuses, ex_holder, ex_token)
  if ex_attempt ~= '' and a ~= tonumber(ex_attempt) then
    return 'it is at attempt ' .. a .. ', not ' .. ex_attempt
  end
  if ex_statuses ~= '' and not one_of(ex_statuses, s) then return 'it is ' .. s end
  if ex_holder ~= '' then
    local tok = ex_token == '' and 'None' or ex_token
    if h ~= ex_holder or t ~= tonumber(ex_token) then
      local held = 'nobody'
      if h ~= nil then held = h .. ' (token ' .. tostring(t) .. ')' end
      return 'its lease is held by ' .. held .. ', not ' .. ex_holder .. ' (token ' .. tok .. ')'
    end
    if not live then return 'the lease of ' .. ex_holder .. ' (token ' .. tok .. ') expired' end
  end
  if TERMINAL[s] then return 'the job already ' .. s end
  if na < a then return 'attempt ' .. na .. ' is older than the stored attempt ' .. a end
  if na > a and not ACTIVE[s] then return 'attempt ' .. na .. ' cannot start: the job already ' .. s end
  return nil
end

local function can_begin(s, a, live, previous)
  return a == previous and (s == 'queued' or (s == 'running' and not live))
end
"""

# An Idempotency-Key outlives its job (it keeps its TTL when the job is deleted): the same
# request again creates the job anew, another request with the key is a conflict.
# KEYS: 1-4 (PRELUDE), job, jobs, status index, meta, queue[, idem]
# ARGV: 1-2 (PRELUDE), id, doc without jobSeq, createdAt, schema version, job_created text,
#       queue it ('1'/''), [fingerprint, job key prefix, idem TTL (ms)]
CREATE_JOB = PRELUDE + """
local id, doc, created = ARGV[3], ARGV[4], ARGV[5]
if KEYS[10] then
  local known = redis.call('HMGET', KEYS[10], 'jobId', 'fingerprint')
  if known[1] then
    if known[2] ~= ARGV[9] then return {'conflict'} end
    local existing = redis.call('GET', ARGV[10] .. known[1])
    if existing then return {'existing', existing} end
  end
end
if redis.call('EXISTS', KEYS[5]) == 1 then return {'exists'} end
need_epoch()
emit(id, '0', ARGV[7], 1)
redis.call('SET', KEYS[5], string.sub(doc, 1, -2) .. ',"jobSeq":1}')
redis.call('ZADD', KEYS[6], created, id)
redis.call('ZADD', KEYS[7], created, id)
redis.call('HSETNX', KEYS[8], 'schema', ARGV[6])
if KEYS[10] then
  redis.call('HSET', KEYS[10], 'jobId', id, 'fingerprint', ARGV[9])
  redis.call('PEXPIRE', KEYS[10], ARGV[11])
end
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[9] .. ':entries', id, redis.call('XADD', KEYS[9], '*', 'job', id))
end
return finish({'created'})
"""

# write_job and begin_attempt. Replies: {'ok', jobSeq}, {'stale', reason, status, attempt},
# {'lost'} (begin_attempt: another runner got there first, or the job ended or is gone).
# KEYS: 1-4 (PRELUDE), job, lease, lines (or the job key again: none), status indexes (STATUSES)
# ARGV: 1-2 (PRELUDE), id, doc without jobSeq, status, attempt, createdAt, expect (4 args),
#       event text ('' none), lease 'holder|token' ('' none), lease ms, previous attempt
#       ('' = write_job; a number = begin_attempt), then lines to append
SAVE_JOB = PRELUDE + GUARD + """
local id, doc, ns, na, created = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local body, lease, lease_ms, begin = ARGV[12], ARGV[13], ARGV[14], ARGV[15]
local cur = redis.call('GET', KEYS[5])
if not cur then
  if begin ~= '' then return {'lost'} end
  return {'stale', 'the job does not exist', 'deleted', 0}
end
local s, a, h, t, js = job_state(cur)
local live = redis.call('GET', KEYS[6])
if begin ~= '' then
  if not can_begin(s, a, live, tonumber(begin)) then return {'lost'} end
else
  local why = refusal(s, a, h, t, live, ns, na, ARGV[8], ARGV[9], ARGV[10], ARGV[11])
  if why then return {'stale', why, s, a} end
end
if body ~= '' then
  need_epoch()
  js = js + 1
  emit(id, '0', body, js)
end
redis.call('SET', KEYS[5], string.sub(doc, 1, -2) .. ',"jobSeq":' .. js .. '}')
if s ~= ns then
  for i, name in ipairs(STATUS_NAMES) do
    if name == s then redis.call('ZREM', KEYS[7 + i], id) end
    if name == ns then redis.call('ZADD', KEYS[7 + i], created, id) end
  end
end
if lease ~= lease_text(h, t) then  -- granted for a lease from now, or released
  if lease == '' then redis.call('DEL', KEYS[6]) else redis.call('SET', KEYS[6], lease, 'PX', lease_ms) end
end
if #ARGV >= 16 then redis.call('RPUSH', KEYS[7], unpack(ARGV, 16, #ARGV)) end
return finish({'ok', js})
"""

# One log line and its job_log. Replies: {'ok'}, {'stale', reason, status, attempt}.
# KEYS: 1-4 (PRELUDE), job, lease, lines:{job}:logs
# ARGV: 1-2 (PRELUDE), id, line JSON, job_log text, guarded ('1': check the expect, as a write
#       of the stored status and attempt; '': no check), expect (4 args)
APPEND_LOG = PRELUDE + GUARD + """
local id = ARGV[3]
if ARGV[6] == '1' then
  local cur = redis.call('GET', KEYS[5])
  if not cur then return {'stale', 'the job does not exist', 'deleted', 0} end
  local s, a, h, t = job_state(cur)
  local why = refusal(s, a, h, t, redis.call('GET', KEYS[6]), s, a, ARGV[7], ARGV[8], ARGV[9], ARGV[10])
  if why then return {'stale', why, s, a} end
end
need_epoch()
emit(id, '1', ARGV[5], nil)
redis.call('RPUSH', KEYS[7], ARGV[4])
return finish({'ok'})
"""

# Finished jobs and their lines, leases, artifacts and queue entries, with one job_deleted
# naming them. Reply: the ids deleted (none: nothing written, no event).
# KEYS: 1-4 (PRELUDE), jobs, status indexes (STATUSES)
# ARGV: 1-2 (PRELUDE), key prefix, event text before the ids, after the ids, then per job:
#       its id and its id as a JSON string
DELETE_JOBS = PRELUDE + """
local prefix = ARGV[3]
-- The base model of a queued or running fine-tune is never deleted. Checked here, in the unit
-- that deletes: a fine-tune created after the caller chose what to delete still keeps its base.
-- Only the documents naming a base are decoded.
local in_use = {}
for i, name in ipairs(STATUS_NAMES) do
  if ACTIVE[name] then
    for _, id in ipairs(redis.call('ZRANGE', KEYS[5 + i], 0, -1)) do
      local doc = redis.call('GET', prefix .. 'job:' .. id)
      if doc and string.find(doc, '"baseJobId"', 1, true) then
        local params = cjson.decode(doc)['params']
        if type(params) == 'table' and type(params['baseJobId']) == 'string' then
          in_use[params['baseJobId']] = true
        end
      end
    end
  end
end
local gone, quoted, where = {}, {}, {}
for i = 6, #ARGV, 2 do
  local id = ARGV[i]
  local doc = not in_use[id] and redis.call('GET', prefix .. 'job:' .. id)
  if doc then
    local s = cjson.decode(doc)['status']
    if TERMINAL[s] and not where[id] then
      gone[#gone + 1], quoted[#quoted + 1], where[id] = id, ARGV[i + 1], s
    end
  end
end
if #gone == 0 then return {} end
need_epoch()
emit('', 'd', ARGV[4] .. table.concat(quoted, ',') .. ARGV[5], nil)
for _, id in ipairs(gone) do
  for i, name in ipairs(STATUS_NAMES) do
    if name == where[id] then redis.call('ZREM', KEYS[5 + i], id) end
  end
  redis.call('ZREM', KEYS[5], id)
  redis.call('DEL', prefix .. 'job:' .. id, prefix .. 'lease:' .. id,
    prefix .. 'lines:' .. id .. ':logs', prefix .. 'lines:' .. id .. ':metrics', prefix .. 'artifact:' .. id)
  local entry = redis.call('HGET', prefix .. 'queue:entries', id)
  if entry then  -- the queue entry of a finished job nobody read (redisqueue.RedisQueue.forget)
    redis.call('HDEL', prefix .. 'queue:entries', id)
    redis.call('XDEL', prefix .. 'queue', entry)
  end
end
return finish(gone)
"""

# (finishedAt, id) of finished jobs, for choosing what to prune: the caller sends ids from the
# status indexes in batches, so Redis decodes a few hundred documents per call and the reply is
# the pairs, not the documents. A job deleted meanwhile is left out.
# ARGV: job key prefix, then job ids. Reply: id, finishedAt (updatedAt if none), id, ...
FINISH_TIMES = """
local out = {}
for i = 2, #ARGV do
  local doc = redis.call('GET', ARGV[1] .. ARGV[i])
  if doc then
    local d = cjson.decode(doc)
    local t = tonumber(d['finishedAt']) or tonumber(d['updatedAt']) or 0
    out[#out + 1] = ARGV[i]
    out[#out + 1] = string.format('%d', t)
  end
end
return out
"""

# A dataset and its dataset_update. Replies: {'ok'}, {'exists'} (create), {'none'} (delete of
# a missing one: nothing written, no event).
# KEYS: 1-4 (PRELUDE), dataset, datasets, meta
# ARGV: 1-2 (PRELUDE), id, action (created/updated/deleted), doc, createdAt, event text, schema
DATASET = PRELUDE + """
local id, action = ARGV[3], ARGV[4]
local exists = redis.call('EXISTS', KEYS[5]) == 1
if action == 'created' and exists then return {'exists'} end
if action == 'deleted' and not exists then return {'none'} end
need_epoch()
emit('', '0', ARGV[7], nil)
if action == 'deleted' then
  redis.call('DEL', KEYS[5])
  redis.call('ZREM', KEYS[6], id)
else
  redis.call('SET', KEYS[5], ARGV[5])
  redis.call('ZADD', KEYS[6], ARGV[6], id)
  redis.call('HSETNX', KEYS[7], 'schema', ARGV[8])
end
return finish({'ok'})
"""

# KEYS: write:{id}, meta. ARGV: write id TTL, field, value. 1 if this call set it.
CLAIM_META = """
local seen = redis.call('GET', KEYS[1])
if seen then return tonumber(seen) end
local won = redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
redis.call('SET', KEYS[1], won, 'EX', ARGV[1])
return won
"""

# KEYS: lease:{job}. ARGV: 'holder|token', lease ms. 1 if it was still theirs (and is renewed).
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: epoch, seq counter. ARGV: a candidate epoch, the highest seq the caller has seen.
# Returns the epoch in force: the existing one, or the candidate when there was none (Redis
# lost its data) or when the counter is below a seq the caller saw (Redis came back from an
# older snapshot, so those seqs would be issued again): the new epoch continues above them.
ENSURE_EPOCH = """
local e = redis.call('GET', KEYS[1])
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
local seen = tonumber(ARGV[2])
if e and cur >= seen then return e end
redis.call('SET', KEYS[1], ARGV[1])
if cur < seen then redis.call('SET', KEYS[2], seen) end
return ARGV[1]
"""

# Newest first by (createdAt, id), strictly after the cursor position (which need not exist:
# its job may have been deleted). One pass on the server: a consistent page, one round trip.
# KEYS: the index zsets to merge (``jobs``, or the wanted ``status:*``)
# ARGV: job key prefix, cursor createdAt ('' = from the newest), cursor id, limit (0: none)
LIST_JOBS = """
local c, cid, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
-- byte order, as Redis orders members (Lua's < on strings follows the locale)
local function before(x, y)
  for i = 1, math.min(#x, #y) do
    local p, q = string.byte(x, i), string.byte(y, i)
    if p ~= q then return p < q end
  end
  return #x < #y
end
local rows = {}
for _, key in ipairs(KEYS) do
  local n = 0
  if c ~= '' then  -- the same createdAt as the cursor: only smaller ids
    local same = redis.call('ZRANGEBYSCORE', key, c, c)
    for i = #same, 1, -1 do
      if before(same[i], cid) and (limit == 0 or n < limit) then
        rows[#rows + 1] = {tonumber(c), same[i]}
        n = n + 1
      end
    end
  end
  local top = c == '' and '+inf' or '(' .. c
  local got
  if limit == 0 then
    got = redis.call('ZREVRANGEBYSCORE', key, top, '-inf', 'WITHSCORES')
  elseif n < limit then
    got = redis.call('ZREVRANGEBYSCORE', key, top, '-inf', 'WITHSCORES', 'LIMIT', 0, limit - n)
  else
    got = {}
  end
  for i = 1, #got, 2 do rows[#rows + 1] = {tonumber(got[i + 1]), got[i]} end
end
if #KEYS > 1 then
  table.sort(rows, function(x, y)
    if x[1] ~= y[1] then return x[1] > y[1] end
    return before(y[2], x[2])
  end)
end
local out = {}
for _, row in ipairs(rows) do
  if limit > 0 and #out >= limit then break end
  local doc = redis.call('GET', ARGV[1] .. row[2])
  if doc then out[#out + 1] = doc end
end
return out
"""

# Schema 1 (mangwale before the record) to 2, in one script: every job document gains its
# ``jobSeq`` (the counter schema 1 kept in ``jobseq``) and ``lease`` (null: a job running on an
# old instance is taken over once its queue entry goes idle), the status sets become zsets,
# idempotency keys get their TTL (found through ``jobidem:{id}``, which goes), ``jobseq`` goes.
# Returns the number of jobs, or -1 when the store is not at schema 1 (another instance
# migrated it first).
# KEYS: meta, jobs, jobseq, status indexes (STATUSES)
# ARGV: key prefix, idem TTL (ms), the new schema version
MIGRATE_1_TO_2 = """
if redis.call('HGET', KEYS[1], 'schema') ~= '1' then return -1 end
local index = {}
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
""" + "local STATUS_NAMES = {" + _STATUS_NAMES_LUA + "}\n" + """
for i, name in ipairs(STATUS_NAMES) do index[name] = KEYS[3 + i] end
local rows = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local n = 0
for i = 1, #rows, 2 do
  local id, score = rows[i], rows[i + 1]
  local key = ARGV[1] .. 'job:' .. id
  local doc = redis.call('GET', key)
  if doc then
    local d = cjson.decode(doc)
    local add = ''
    if d['jobSeq'] == nil then add = add .. ',"jobSeq":' .. (tonumber(redis.call('HGET', KEYS[3], id)) or 0) end
    if d['lease'] == nil then add = add .. ',"lease":null' end
    if add ~= '' then
      local head = string.match(doc, '^(.*)}%s*$')
      redis.call('SET', key, head .. add .. '}')
    end
    if index[d['status']] then redis.call('ZADD', index[d['status']], score, id) end
    local idem = redis.call('GET', ARGV[1] .. 'jobidem:' .. id)
    if idem then
      redis.call('PEXPIRE', idem, ARGV[2])
      redis.call('DEL', ARGV[1] .. 'jobidem:' .. id)
    end
    n = n + 1
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[1], 'schema', ARGV[3])
return n
"""
