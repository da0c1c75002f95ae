-- cancel.lua: cancel tasks that have not finished: waiting for parents, scheduled (a delay,
-- start_at, or a retry waiting out its backoff), ready, running (or leased to a worker that
-- has not started it yet), or dead-lettered.
--
-- The cancel is the task's outcome at once, kept in Redis like any result: its state becomes
-- 'cancelled', its result the Cancelled error, result waiters wake, its idempotency key is
-- freed, and it is swept after result_ttl. It is taken out of wherever it waits, so it never
-- runs; a running one loses its lease token, so the worker's heartbeat learns of the cancel
-- (renew.lua says 'cancelled') and interrupts it, and its finish changes nothing (finish.lua).
-- Its children receive the Cancelled error as that argument, as from any failed parent,
-- unless they are cancelled in the same call (a cascade: ARGV lists them after their parents).
-- A dead-lettered task's children got its error already; it only leaves the dead letters.
--
-- A schedule's pending occurrence (sched:<name>:<slot>, field n of its state) that is
-- cancelled is that one run skipped: the schedule goes on, with the next occurrence the caller
-- planned (occurrences.skip_plans: Lua has no cron calendar) created in this same step. With
-- no plan (the schedule was removed, its spec unreadable) or when paused, none is created.
--
-- KEYS: the queue key set (see _common.lua), KEYS[15] schedules, KEYS[16] schedule_state
-- (see _schedules.lua), then
--   KEYS[16 + i] done  the result-waiters list of the i-th id (pushed only if watched)
-- ARGV[1] keep_ms    how long the cancelled task is kept (result_ttl)
-- ARGV[2] envelope   the Cancelled error, as a result envelope (JSON)
-- ARGV[3] by         who cancelled: "api", "cli" (kept in the task's 'x' field)
-- ARGV[4] plans      P, how many occurrence plans follow, five values each: occurrence id,
--                    the spec it was planned from, next id, next slot (ms), next payload
-- then the ids       tasks to cancel; for a cascade, parents before their children
--
-- Returns one status per id: 'cancelled', 'finished' (succeeded, failed and not a dead
-- letter, or cancelled already: nothing changed) or 'unknown' (no such task); or {'changed'}
-- alone, with nothing written, if a pending occurrence's spec is no longer the one its plan
-- was made from (the caller plans again).

local keep, envelope, by = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local now = now_ms()
local plans = {}
local first_id = 5 + 5 * tonumber(ARGV[4])
for p = 5, first_id - 1, 5 do
  plans[ARGV[p]] = { spec = ARGV[p + 1], id = ARGV[p + 2], slot = tonumber(ARGV[p + 3]), payload = ARGV[p + 4] }
end
local cancelling = {}
for i = first_id, #ARGV do
  cancelling[ARGV[i]] = true
end

-- The schedule whose pending occurrence `id` is, or nil.
local function pending_of(id)
  local name = string.match(id, '^sched:(.+):%d+$')
  if name and redis.call('HGET', K_STATE, name .. ':n') == id then
    return name
  end
  return nil
end

for id, plan in pairs(plans) do
  local name = pending_of(id)
  if name and redis.call('HGET', K_SCHEDULES, name) ~= plan.spec then
    return { 'changed' }
  end
end

-- A pending occurrence was cancelled: create the next one, unless paused, removed or taken.
local function skip_occurrence(id)
  local name = pending_of(id)
  if not name then
    return
  end
  local plan = plans[id]
  if plan == nil or redis.call('HGET', K_STATE, name .. ':p') or state_of(plan.id) then
    redis.call('HDEL', K_STATE, name .. ':n', name .. ':d')
    return
  end
  store_payload(plan.id, plan.payload, now)
  make_due(plan.id, math.max(now, plan.slot), now, plan.payload)
  redis.call('HSET', K_STATE, name .. ':n', plan.id, name .. ':d', plan.slot)
end

-- Take the task out of the structure its state says it is in.
local function unqueue(id, state, parents)
  if state == 'waiting' then
    redis.call('ZREM', K_WAITING, id)
    redis.call('HDEL', K_INFO, id .. ':p')
    for _, parent in ipairs(split(parents)) do
      if redis.call('HEXISTS', K_INPUTS, id .. '|' .. parent) == 0 then
        forget_child(parent, id) -- its finish must not release (or recreate) this task
      end
    end
  elseif state == 'scheduled' then
    redis.call('ZREM', K_SCHEDULED, id)
  elseif state == 'ready' then
    redis.call('LREM', K_READY, 0, id)
  elseif state == 'running' then
    redis.call('ZREM', K_RUNNING, id)
  else -- a dead letter
    redis.call('ZREM', K_DEAD, id)
  end
end

local statuses, released, cancelled = {}, {}, 0
for i = first_id, #ARGV do
  local id = ARGV[i]
  local held = redis.call('HMGET', K_INFO, id .. ':s', id .. ':P', id .. ':c', id .. ':k', id .. ':w')
  local state = state_of(id, held[1])
  if not state then
    statuses[#statuses + 1] = 'unknown'
  elseif FINISHED[state] and not (state == 'failed' and redis.call('ZSCORE', K_DEAD, id)) then
    statuses[#statuses + 1] = 'finished'
  else
    unqueue(id, state, held[2])
    redis.call('HDEL', K_INFO, id .. ':t', id .. ':n')
    redis.call('HSET', K_INFO, id .. ':s', 'cancelled', id .. ':x', by)
    -- (a dead letter's children got its error when it died: not released again)
    settle(id, held, envelope, keep, now, KEYS[17 + i - first_id], state ~= 'failed', released, cancelling)
    skip_occurrence(id)
    cancelled = cancelled + 1
    statuses[#statuses + 1] = 'cancelled'
  end
end
forget_waiting(released)
if cancelled > 0 then
  redis.call('HINCRBY', K_INFO, '#cancelled', cancelled)
end
return statuses
