-- schedule_remove.lua: delete a schedule for good (`minicelery schedules remove NAME`): its
-- spec, its state and its pending occurrence, if that still waits for its slot. One already
-- ready or running is dropped when it starts (schedule_begin.lua finds no spec). A worker
-- that still declares the schedule creates it again when it starts.
--
-- KEYS: the queue key set (see _common.lua), then KEYS[15] schedules, KEYS[16] schedule_state
-- (see _schedules.lua)
-- ARGV[1] name  schedule name
--
-- Returns 1 if the schedule existed, else 0.

local name = ARGV[1]
local existed = redis.call('HDEL', K_SCHEDULES, name)
local pending = redis.call('HGET', K_STATE, name .. ':n')
if pending and state_of(pending) == 'scheduled' then
  redis.call('ZREM', K_SCHEDULED, pending)
  forget_fields(pending) -- (an occurrence given up: nothing else of it is stored)
end
local fields = {}
for i, f in ipairs({ 'n', 'd', 'c', 's', 'S', 'p', 'm', 'r' }) do
  fields[i] = name .. ':' .. f
end
redis.call('HDEL', K_STATE, unpack(fields))
return existed
