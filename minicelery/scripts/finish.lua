-- finish.lua: record the outcomes of one or more tasks of a queue (or schedule their retries)
-- and release their children. A busy worker finishes a whole batch in one call.
--
-- Only the lease holder may finish: the token must match the one its claim stored. A worker
-- that was paused past its lease (the task was reclaimed and maybe run again) gets 'late',
-- and nothing is written for that task: no result overwritten, no child released twice.
--
-- A failure with retries left is not an outcome: the task goes back to the schedule, due
-- after its backoff (on the Redis clock), and keeps its children waiting. A failure with none
-- left is final: the result holds the error, the children get it, and the task goes into the
-- dead-letter set, kept for dead_ttl instead of result_ttl.
--
-- A success keeps its result until result_ttl, and its attempts and leases lost if they are
-- not the usual one and none; its payload, inputs, parents and due time go at once (it never
-- runs again: only a dead letter is put back, by revive.lua), and so does its state field: a
-- stored result with no state is a success (state_of in _common.lua). A success not kept
-- (keep 0: store_result=False) stores no result, and keeps only its state, so `.state` and
-- `.result()` can say it succeeded; its children still get the envelope.
--
-- KEYS: the queue key set (see _common.lua), then
--   KEYS[14 + i] done  list the i-th task's result waiters block on (BLMOVE); pushed only if
--                      a waiter watches the task (see watch.lua)
-- ARGV[1] result_ttl   ms to keep a result; then every trace of the task is swept
-- ARGV[2] dead_ttl     ms to keep a dead letter
-- then FIELDS values per task, from ARGV[3]:
--   id, token, outcome ("succeeded" or "failed"), envelope (JSON),
--   max_retries (retries allowed for this failure; 0: no retry),
--   base_ms, cap_ms, jitter (0.5-1), fixed_ms (-1: backoff): the delay before retry r
--   (0-based) is fixed_ms, else min(cap_ms, base_ms * 2^r) * jitter,
--   keep (1: store the envelope as the result; 0: a success whose result is not kept)
--
-- Returns one finish status per task: 'ok', 'retry', 'late', 'gone' (the task no longer
-- exists: nothing written) or 'cancelled' (cancelled meanwhile: nothing written).

local FIELDS = 10
local result_ttl, dead_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()

-- Writes every recorded task needs, gathered into one command each: Lua calling into Redis
-- is the main cost, so a task costs one HMGET plus its share of five batch-wide writes
-- (13 calls per task before batching), more only for dead letters, idempotency keys,
-- children and watched results.
local running_done, info_deleted, states, results, expiries = {}, {}, {}, {}, {}
local payloads_deleted = {} -- successes not kept: nothing but their state stays

local function retry_delay(base, retries)
  local base_ms, cap_ms, jitter, fixed = ARGV[base + 6], ARGV[base + 7], ARGV[base + 8], tonumber(ARGV[base + 9])
  if fixed >= 0 then
    return fixed
  end
  return math.floor(math.min(tonumber(cap_ms), tonumber(base_ms) * 2 ^ retries) * tonumber(jitter))
end

local statuses, seen = {}, {}
local released = {} -- children released: one update of the waiting set for the batch
for i = 1, (#ARGV - 2) / FIELDS do
  local base = 2 + (i - 1) * FIELDS
  local id, token, outcome, envelope = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
  local held =
    redis.call('HMGET', K_INFO, id .. ':t', id .. ':r', id .. ':k', id .. ':c', id .. ':w', id .. ':s', id .. ':P', id .. ':a')
  if not held[6] and redis.call('HEXISTS', K_RESULT, id) == 0 then
    statuses[i] = 'gone' -- no trace of the task: purged, or Redis lost its data (a restart
    -- without persistence, a flush); writing a result now would leave an orphan
  elseif held[6] == 'cancelled' then
    statuses[i] = 'cancelled' -- cancel.lua won the race: its outcome stands, this run's is dropped
  elseif token == '' or held[1] ~= token or seen[id] then
    statuses[i] = 'late' -- (a repeat in this batch: its token is deleted only at the end)
  else
    seen[id] = true
    local retries = tonumber(held[2] or 0)
    if outcome == 'failed' and retries < tonumber(ARGV[base + 5]) then
      statuses[i] = 'retry'
      -- The lease ends before make_due, which may hand the task to an idle worker at once.
      redis.call('ZREM', K_RUNNING, id)
      redis.call('HDEL', K_INFO, id .. ':t')
      redis.call('HINCRBY', K_INFO, id .. ':r', 1)
      make_due(id, now + retry_delay(base, retries), now)
    else
      running_done[#running_done + 1] = id
      info_deleted[#info_deleted + 1] = id .. ':t'
      statuses[i] = 'ok'
      if outcome == 'failed' then
        states[#states + 1] = id .. ':s'
        states[#states + 1] = outcome
        results[#results + 1] = id
        results[#results + 1] = envelope
      else -- a success will not run again: its payload, inputs and due time are no use now
        payloads_deleted[#payloads_deleted + 1] = id
        info_deleted[#info_deleted + 1] = id .. ':d'
        if held[8] == '1' then -- claimed once: absent attempts say so
          info_deleted[#info_deleted + 1] = id .. ':a'
        end
        if held[7] then
          info_deleted[#info_deleted + 1] = id .. ':P'
          for _, parent in ipairs(split(held[7])) do
            redis.call('HDEL', K_INPUTS, id .. '|' .. parent)
          end
        end
        if ARGV[base + 10] ~= '0' then -- the result says it succeeded: no state field
          info_deleted[#info_deleted + 1] = id .. ':s'
          results[#results + 1] = id
          results[#results + 1] = envelope
        else -- not kept: only its state is left (attempts and leases lost go too)
          states[#states + 1] = id .. ':s'
          states[#states + 1] = outcome
          info_deleted[#info_deleted + 1] = id .. ':a'
          info_deleted[#info_deleted + 1] = id .. ':l'
        end
      end
      local keep = result_ttl
      if outcome == 'failed' then
        redis.call('ZADD', K_DEAD, now, id)
        keep = math.max(result_ttl, dead_ttl)
      end
      expiries[#expiries + 1] = now + keep
      expiries[#expiries + 1] = id
      local key = held[3]
      if key and redis.call('HGET', K_DEDUP, key) == id then
        redis.call('HDEL', K_DEDUP, key)
      end
      if held[4] then
        release_children(id, held[4], envelope, now, released)
        -- Released once for good: a dead letter put back and finished again must not do it twice.
        info_deleted[#info_deleted + 1] = id .. ':c'
      end
      if held[5] then
        redis.call('LPUSH', KEYS[14 + i], '1')
        redis.call('PEXPIRE', KEYS[14 + i], keep)
      end
    end
  end
end

if #running_done > 0 then
  redis.call('ZREM', K_RUNNING, unpack(running_done))
  redis.call('HDEL', K_INFO, unpack(info_deleted))
end
if #released > 0 then
  forget_waiting(released)
end
if #expiries > 0 then
  if #states > 0 then
    redis.call('HSET', K_INFO, unpack(states))
  end
  if #results > 0 then
    redis.call('HSET', K_RESULT, unpack(results))
  end
  if #payloads_deleted > 0 then
    redis.call('HDEL', K_PAYLOAD, unpack(payloads_deleted))
  end
  redis.call('ZADD', K_EXPIRY, unpack(expiries))
end
return statuses
