-- schedule_begin.lua: a worker has claimed a schedule's occurrence and is about to run it.
-- In one step: check the schedule still exists, is not paused and that no earlier run of it
-- still runs (unless it allows overlap); create the occurrence of the next slot (once: only
-- the occurrence pending in field n advances the schedule, so a re-run of a reclaimed one, or
-- a second worker, creates nothing); record the start.
--
-- The next slot and its payload come from the worker (periodic.py: croniter on the claim's
-- Redis time), planned from the spec in ARGV[5]; if the stored spec differs (it was just
-- replaced), nothing is written and the worker plans again from the one returned.
--
-- KEYS: the queue key set (see _common.lua), then KEYS[15] schedules, KEYS[16] schedule_state
-- (see _schedules.lua)
-- ARGV[1] id         the occurrence claimed
-- ARGV[2] token      the claim's lease token
-- ARGV[3] name       its schedule
-- ARGV[4] slot       its slot (ms); "" for a run by hand (`schedules run NAME`), which is
--                    only recorded as the last run (ARGV[5..] unused)
-- ARGV[5] spec       the spec JSON the plan was made from
-- ARGV[6] run        "1" run it, "0" give it up (catch-up "skip": it is too late)
-- ARGV[7] next_id    the next slot's occurrence id
-- ARGV[8] next_slot  the next slot (ms)
-- ARGV[9] payload    the next occurrence's payload (JSON)
-- ARGV[10] missed    slots given up by this plan (counted in field m)
-- ARGV[11] overlap   "1" if a run may start while an earlier one still runs
-- ARGV[12] recheck   ms after which an occurrence held back by a running one looks again
-- ARGV[13] until     optional: the plan assumed the occurrence starts before this (ms); if
--                    not, 'changed' (nothing written), and the worker plans it again. A begin
--                    sent with the claim (periodic.Schedules.begin_with_claim) is planned so.
--
-- Returns {status, detail}:
--   {'run', now, advanced}  run it; advanced is 1 if this start created the next occurrence
--   {'wait', due}       an earlier run still runs: given back, due again then (not run)
--   {'changed', spec}   the stored spec differs: plan again with it (nothing written)
--   {'taken', false}    the next slot's occurrence exists already (it ran: Redis's clock went
--                       back): plan a later one (nothing written)
--   {'late', false}     the lease is no longer this worker's (nothing written)
--   {'removed', false}, {'paused', false}, {'skipped', false}, {'stale', false}: dropped, not run
--                       (stale: an occurrence neither pending nor started before)

local id, token, name, slot = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()

if getf(id, 't') ~= token then
  return { 'late', false }
end

-- Drop the occurrence this worker holds: it does not run, and nothing is left of it.
local function drop()
  redis.call('ZREM', K_RUNNING, id)
  forget_fields(id) -- (an occurrence given up: nothing else of it is stored)
end

local stored = redis.call('HGET', K_SCHEDULES, name)
if slot == '' then
  -- A run by hand: it runs (the operator asked for it, besides the schedule), and is the
  -- schedule's last run in the listing; it has no slot and creates no occurrence.
  if stored then
    redis.call('HSET', K_STATE, name .. ':c', id, name .. ':s', now)
    redis.call('HDEL', K_STATE, name .. ':S')
    redis.call('HINCRBY', K_STATE, name .. ':r', 1)
  end
  return { 'run', now, 0 }
end
if not stored then
  drop()
  return { 'removed', false }
end
if stored ~= ARGV[5] then
  return { 'changed', stored }
end

local held = redis.call('HMGET', K_STATE, name .. ':n', name .. ':c', name .. ':p')
local pending, current = held[1], held[2]
if held[3] then
  drop()
  if pending == id then
    redis.call('HDEL', K_STATE, name .. ':n', name .. ':d')
  end
  return { 'paused', false }
end

if pending ~= id and current ~= id and not getf(id, 'l') and tonumber(getf(id, 'a') or 0) <= 1 then
  -- Neither the pending occurrence nor a re-run: a stray left ready when its schedule was
  -- removed (or paused) and declared again, which made a new pending one. It does not run.
  drop()
  return { 'stale', false }
end

if ARGV[11] ~= '1' and current and current ~= id then
  local state = state_of(current)
  if state == 'running' or state == 'ready' or state == 'scheduled' then
    -- An earlier run is unfinished (running, reclaimed, or waiting to retry): this one waits,
    -- given back as if never claimed, and looks again when that lease or retry falls due.
    local due = now + tonumber(ARGV[12])
    local at = redis.call('ZSCORE', K_RUNNING, current) or redis.call('ZSCORE', K_SCHEDULED, current)
    if at then
      due = math.min(due, math.max(tonumber(at), now + 1))
    end
    redis.call('ZREM', K_RUNNING, id)
    redis.call('HDEL', K_INFO, id .. ':t')
    redis.call('HINCRBY', K_INFO, id .. ':a', -1)
    make_due(id, due, now)
    return { 'wait', due }
  end
end

if pending == id and ARGV[13] and now >= tonumber(ARGV[13]) then
  return { 'changed', stored }
end

if pending == id then
  local next_id, next_slot = ARGV[7], tonumber(ARGV[8])
  if state_of(next_id) then
    return { 'taken', false } -- that slot ran or runs already (a clock that went back): plan a later one
  end
  store_payload(next_id, ARGV[9], now)
  make_due(next_id, math.max(now, next_slot), now, ARGV[9])
  redis.call('HSET', K_STATE, name .. ':n', next_id, name .. ':d', next_slot)
  if tonumber(ARGV[10]) > 0 then
    redis.call('HINCRBY', K_STATE, name .. ':m', ARGV[10])
  end
  if ARGV[6] ~= '1' then
    drop()
    return { 'skipped', false }
  end
end

redis.call('HSET', K_STATE, name .. ':c', id, name .. ':s', now, name .. ':S', slot)
redis.call('HINCRBY', K_STATE, name .. ':r', 1)
return { 'run', now, pending == id and 1 or 0 }
