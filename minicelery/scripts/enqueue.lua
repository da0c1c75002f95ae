-- enqueue.lua: store a new task and put it where it belongs, in one step.
--
-- KEYS: the queue key set (see _common.lua).
-- ARGV[1] id           task id
-- ARGV[2] payload      task payload (JSON)
-- ARGV[3] delay_ms     run no earlier than now + delay_ms (Redis clock); "" for none
-- ARGV[4] at_ms        run no earlier than this time (ms since epoch); "" for none
-- ARGV[5] parents      parent ids, "," list; "" for none
-- ARGV[6] dedup_key    idempotency key; "" for none
-- ARGV[7] mode         "new": store a new task, or
--                      "reschedule": only set the not-before time of a task still waiting
--                      for its parents (a child registered at creation, then .wait()/.start_at())
--
-- Returns {'ok', state} for a stored task, {'exists', state} when the id is already stored,
-- {'duplicate', existing_id} when another pending task holds dedup_key.

-- What a child gets from a parent that finished before it was registered and kept no result
-- (store_result=False; see finish.lua): the value is gone, and the child is told so.
local NOT_KEPT = '{"ok":false,"error":{"type":"ResultNotKept","message":"the parent finished before this '
  .. 'task was registered, and its result was not kept","traceback":""}}'

local id, payload, delay_ms, at_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local parents, dedup_key, mode = ARGV[5], ARGV[6], ARGV[7]
local now = now_ms()

local not_before = 0
if delay_ms ~= '' then
  not_before = now + tonumber(delay_ms)
elseif at_ms ~= '' then
  not_before = tonumber(at_ms)
end

-- Is the id stored? state_of's questions, in the order that costs a new task fewest calls:
-- a stored state, a kept result (a success), then a stored payload (a task sent straight to
-- ready or the schedule) asked by storing this one only if there is none (HSETNX).
local state = getf(id, 's') or (redis.call('HEXISTS', K_RESULT, id) == 1 and 'succeeded')
if state then
  if mode == 'reschedule' and state == 'waiting' then
    setf(id, 'n', not_before)
  end
  return { 'exists', state }
end

local holder = dedup_key ~= '' and redis.call('HGET', K_DEDUP, dedup_key)
if holder and holder ~= id then
  return { 'duplicate', holder }
end
if not store_payload(id, payload, now, true) then -- (no attempts field yet: absent means 0)
  return { 'exists', redis.call('ZSCORE', K_SCHEDULED, id) and 'scheduled' or 'ready' }
end
if dedup_key ~= '' then
  redis.call('HSET', K_DEDUP, dedup_key, id)
  setf(id, 'k', dedup_key)
end

local pending = 0
if parents ~= '' then
  for _, parent in ipairs(split(parents)) do
    local held = redis.call('HMGET', K_INFO, parent .. ':s', parent .. ':c') -- state, children
    if FINISHED[state_of(parent, held[1])] then
      local envelope = redis.call('HGET', K_RESULT, parent) or NOT_KEPT
      redis.call('HSET', K_INPUTS, id .. '|' .. parent, envelope)
    else
      -- Unfinished, or not sent yet: it lists this child and releases it when it finishes.
      pending = pending + 1
      setf(parent, 'c', held[2] and (held[2] .. ',' .. id) or id)
    end
  end
end

if pending > 0 then
  redis.call('HSET', K_INFO, id .. ':P', parents, id .. ':p', pending, id .. ':n', not_before, id .. ':s', 'waiting')
  redis.call('ZADD', K_WAITING, now, id) -- registered now: see orphans.lua
  return { 'ok', 'waiting' }
end
if parents ~= '' then
  setf(id, 'P', parents)
end
return { 'ok', make_due(id, math.max(now, not_before), now, parents == '' and payload or nil) }
