-- orphans.lua: dead-letter waiting tasks whose parents were never started.
--
-- A task given another task's handle as an argument is registered at once, waiting for that
-- parent; the parent is stored only when someone starts it (.start(), .wait(), .start_at(),
-- or starting the child). A child whose parents nobody starts would wait forever. This sweep
-- fails such a child once it has waited orphan_ttl: its result is a ParentNeverStarted error
-- naming the parents, it goes into the dead-letter set (shown by `minicelery inspect`, put
-- back by `retry-dead`, deleted after dead_ttl like any dead letter), result waiters wake,
-- and its own children get the error as their argument, as with any failed parent.
--
-- Only a child none of whose unfinished parents was ever sent is swept. A parent that is
-- waiting, scheduled, ready or running keeps its child, however long it takes: the sweep
-- restarts that child's clock (its score in `waiting`) and looks again orphan_ttl later.
-- A never-started parent forgets the swept child, so starting it later releases nothing.
-- A dead-lettered orphan put back by retry-dead runs with the error in that parent's place.
--
-- The worker calls this once per lease period per queue, with the oldest waiting tasks
-- (broker.sweep_orphans); a task given here that is no longer waiting, or not waiting that
-- long, is left alone.
--
-- KEYS: the queue key set (see _common.lua), then
--   KEYS[14 + i] done  the result-waiters list of ARGV[3 + i] (pushed only if watched)
-- ARGV[1] orphan_ttl_ms  how long a task waits for never-started parents before it is swept
-- ARGV[2] keep_ms        how long a swept task stays a dead letter (as finish.lua keeps one)
-- ARGV[3] ttl_seconds    orphan_ttl as written in the settings, for the error message
-- ARGV[3 + i] id         a waiting task (oldest first)
--
-- Returns the ids dead-lettered.

local orphan_ttl, keep, ttl_text = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now = now_ms()

-- The parents `id` still waits for, if none of them was ever sent (a parent sent and not
-- finished has a state; a finished one has given `id` its result). Nil if one is in flight.
local function never_started(id, parents)
  local unsent = {}
  for _, parent in ipairs(split(parents)) do
    if redis.call('HEXISTS', K_INPUTS, id .. '|' .. parent) == 0 then
      if state_of(parent) then
        return nil
      end
      unsent[#unsent + 1] = parent
    end
  end
  if #unsent == 0 then
    return nil
  end
  return unsent
end

local function error_envelope(unsent)
  local which = #unsent == 1 and ('parent task ' .. unsent[1] .. ' was')
    or ('parent tasks ' .. table.concat(unsent, ', ') .. ' were')
  local message = which .. ' never started within orphan_ttl (' .. ttl_text .. ' s) of this task'
    .. "'s creation: start a parent with .start(), .wait() or .start_at(), or start the child"
  return cjson.encode({
    ok = false,
    error = { type = 'ParentNeverStarted', message = message, args = { message }, traceback = '' },
  })
end

local swept, released = {}, {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local since = redis.call('ZSCORE', K_WAITING, id)
  if since and tonumber(since) <= now - orphan_ttl then
    local held = redis.call('HMGET', K_INFO, id .. ':s', id .. ':P', id .. ':c', id .. ':k', id .. ':w')
    local unsent = held[1] == 'waiting' and never_started(id, held[2])
    if held[1] ~= 'waiting' then
      redis.call('ZREM', K_WAITING, id) -- released by an orphan swept earlier in this call
    elseif not unsent then
      redis.call('ZADD', K_WAITING, now, id) -- a parent is in flight: look again orphan_ttl later
    else
      local envelope = error_envelope(unsent)
      for _, parent in ipairs(unsent) do
        redis.call('HSET', K_INPUTS, id .. '|' .. parent, envelope) -- (for a retry-dead run)
        forget_child(parent, id)
      end
      redis.call('ZREM', K_WAITING, id)
      redis.call('HDEL', K_INFO, id .. ':p')
      setf(id, 's', 'failed')
      redis.call('ZADD', K_DEAD, now, id)
      settle(id, held, envelope, keep, now, KEYS[11 + i], true, released) -- (ARGV[3 + j]: KEYS[14 + j])
      swept[#swept + 1] = id
    end
  end
end
forget_waiting(released)
return swept
