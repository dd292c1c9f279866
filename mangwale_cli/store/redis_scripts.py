"""The Lua scripts of ``RedisStore``: each change that spans keys runs atomically on Redis.

Every key a script touches is passed in KEYS except job documents found through an index
(``LIST_JOBS``, the idempotency lookup), which are built from a key prefix in ARGV: fine on
one Redis, not on Redis Cluster (docs/storage.md).
"""

from __future__ import annotations

from ..wire import TERMINAL, JobStatus

STATUSES = tuple(JobStatus)  # the order of the status-set KEYS the scripts get

_TERMINAL_LUA = ", ".join(f"{s.value} = true" for s in sorted(TERMINAL, key=lambda s: s.value))

# The job's queue entry is added in the same script: an acknowledged job is always queued.
# KEYS: job, jobs, status set, meta, queue[, idem, jobidem]
# ARGV: id, doc, createdAt, schema version[, fingerprint, idem key name, job key prefix]
CREATE_JOB = """
redis.call('HSETNX', KEYS[4], 'schema', ARGV[4])
if KEYS[6] then
  local seen = redis.call('HMGET', KEYS[6], 'jobId', 'fingerprint')
  if seen[1] then
    local existing = redis.call('GET', ARGV[7] .. seen[1])
    if existing then  -- a key whose job was deleted is free again
      if seen[2] ~= ARGV[5] then return {'conflict'} end
      return {'existing', existing}
    end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
if KEYS[6] then
  redis.call('HSET', KEYS[6], 'jobId', ARGV[1], 'fingerprint', ARGV[5])
  redis.call('SET', KEYS[7], ARGV[6])
end
redis.call('XADD', KEYS[5], '*', 'job', ARGV[1])
return {'created'}
"""

# The guard is stale_reason() in base.py; keep the two in step (the contract suite checks both).
# With ARGV[8] (begin_attempt) it is a compare-and-set: the stored attempt must still be ARGV[8]
# and the job queued or running, else {'lost', status, attempt} and nothing is written.
# KEYS: job, jobs, meta, status sets in STATUSES order
# ARGV: id, doc, createdAt, status, attempt, schema version, 1-based index of the status set
#       [, the attempt the caller read]
SAVE_JOB = (
    "local terminal = {" + _TERMINAL_LUA + "}\n"
    """
local cur = redis.call('GET', KEYS[1])
if cur then
  local old = cjson.decode(cur)
  local s, a = old['status'], tonumber(old['attempt']) or 0
  local ns, na = ARGV[4], tonumber(ARGV[5])
  if ARGV[8] and (a ~= tonumber(ARGV[8]) or (s ~= 'queued' and s ~= 'running')) then
    return {'lost', s, a}
  end
  if na < a or (terminal[s] and not terminal[ns])
      or (na > a and s ~= 'queued' and s ~= 'running') then
    return {'stale', s, a}
  end
elseif ARGV[8] then
  return {'lost', 'deleted', 0}
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local want = tonumber(ARGV[7]) + 3
for i = 4, #KEYS do
  if i == want then redis.call('SADD', KEYS[i], ARGV[1]) else redis.call('SREM', KEYS[i], ARGV[1]) end
end
redis.call('HSETNX', KEYS[3], 'schema', ARGV[6])
return {'ok'}
"""
)

# KEYS: job, jobs, jobidem, artifact, lines..., status sets
# ARGV: id, number of lines keys
DELETE_JOB = """
local idem = redis.call('GET', KEYS[3])
if idem and redis.call('HGET', idem, 'jobId') == ARGV[1] then redis.call('DEL', idem) end
local last = 4 + tonumber(ARGV[2])
for i = 1, last do if i ~= 2 then redis.call('DEL', KEYS[i]) end end
redis.call('ZREM', KEYS[2], ARGV[1])
for i = last + 1, #KEYS do redis.call('SREM', KEYS[i], ARGV[1]) end
return 1
"""

# Newest first from just after ``before``; one pass on the server so a filtered page is
# consistent and costs one round trip. KEYS: jobs, then the wanted status sets (none: all).
# ARGV: job key prefix, before id or '', limit (0: no limit)
LIST_JOBS = """
local start = 0
if ARGV[2] ~= '' then
  local r = redis.call('ZREVRANK', KEYS[1], ARGV[2])
  if not r then return {} end
  start = r + 1
end
local limit = tonumber(ARGV[3])
local out = {}
while true do
  local ids = redis.call('ZREVRANGE', KEYS[1], start, start + 255)
  if #ids == 0 then return out end
  for _, id in ipairs(ids) do
    local ok = #KEYS == 1
    for i = 2, #KEYS do
      if redis.call('SISMEMBER', KEYS[i], id) == 1 then ok = true; break end
    end
    local doc = ok and redis.call('GET', ARGV[1] .. id)
    if doc then
      out[#out + 1] = doc
      if limit > 0 and #out >= limit then return out end
    end
  end
  start = start + 256
end
"""
