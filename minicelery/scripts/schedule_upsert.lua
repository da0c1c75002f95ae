-- schedule_upsert.lua: declare a schedule (or pause or resume it), and make sure its next
-- occurrence exists, unless it is paused. A worker calls it at start for each schedule it
-- declares; the `schedules pause|resume` commands call it with the stored spec.
--
-- The last writer wins: a spec that differs from the stored one replaces it, and an
-- occurrence still waiting for its slot (state scheduled) is replaced by the one for the new
-- spec's next slot. At most one occurrence is pending per schedule (field n), so workers that
-- race, or an old and a new version mid-upgrade, never leave two for one schedule.
--
-- KEYS: the queue key set (see _common.lua), then KEYS[15] schedules, KEYS[16] schedule_state
-- (see _schedules.lua)
-- ARGV[1] name       schedule name
-- ARGV[2] spec       spec JSON; "" to keep the stored one (the schedule must exist)
-- ARGV[3] paused     "1" pause, "0" resume, "" leave as it is
-- ARGV[4] next_id    id of the occurrence to create if none is pending (its next slot)
-- ARGV[5] next_slot  that slot (ms, Redis clock)
-- ARGV[6] payload    that occurrence's task payload (JSON)
--
-- Returns {status, pending id or false}: status 'created', 'kept' (one was pending already),
-- 'replaced' (a changed spec replaced the pending one), 'paused', 'missing' (ARGV[2] was ""
-- and there is no such schedule), or 'taken' (next_id exists and is not the pending one: it
-- ran or runs already; nothing written, and the caller asks again with a later slot).

local name, spec, paused = ARGV[1], ARGV[2], ARGV[3]
local next_id, next_slot, payload = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local now = now_ms()

if state_of(next_id) and redis.call('HGET', K_STATE, name .. ':n') ~= next_id then
  return { 'taken', false } -- that slot ran already (a clock that went back): plan a later one
end

local stored = redis.call('HGET', K_SCHEDULES, name)
if spec == '' then
  if not stored then
    return { 'missing', false }
  end
  spec = stored
end
local changed = stored ~= spec
if changed then
  redis.call('HSET', K_SCHEDULES, name, spec)
end
if paused == '1' then
  redis.call('HSET', K_STATE, name .. ':p', '1')
elseif paused == '0' then
  redis.call('HDEL', K_STATE, name .. ':p')
end

local held = redis.call('HMGET', K_STATE, name .. ':n', name .. ':p')
local pending = held[1]
local pending_state = pending and state_of(pending)

local function drop_pending()
  redis.call('ZREM', K_SCHEDULED, pending)
  forget_fields(pending) -- (an occurrence given up: nothing else of it is stored)
  redis.call('HDEL', K_STATE, name .. ':n', name .. ':d')
end

if held[2] then
  -- Paused: no occurrence waits. One already ready or running is dropped when it starts.
  if pending_state == 'scheduled' or (pending and not pending_state) then
    drop_pending()
  end
  return { 'paused', false }
end

local status = 'created'
if pending_state then
  if not changed or pending_state ~= 'scheduled' then
    return { 'kept', pending }
  end
  if pending == next_id then
    store_payload(pending, payload, now) -- same slot: the new spec's arguments
    return { 'kept', pending }
  end
  drop_pending()
  status = 'replaced'
end

store_payload(next_id, payload, now) -- (next_id is new: see 'taken' above)
make_due(next_id, math.max(now, next_slot), now, payload)
redis.call('HSET', K_STATE, name .. ':n', next_id, name .. ':d', next_slot)
return { status, next_id }
