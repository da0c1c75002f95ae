-- release.lua: hand a claimed task back to the queue at once (the worker is stopping).
--
-- The task goes to the front of the ready list and one idle worker is woken for it. The
-- attempt is not counted: the task did not fail, its worker left.
--
-- KEYS: the queue key set (see _common.lua).
-- ARGV[1] id      task id
-- ARGV[2] token   the lease token from the claim
--
-- Returns 'ok', or 'late' when the lease is no longer this worker's.

local id, token = ARGV[1], ARGV[2]
if getf(id, 't') ~= token then
  return 'late'
end
redis.call('ZREM', K_RUNNING, id)
redis.call('HDEL', K_INFO, id .. ':t')
redis.call('HINCRBY', K_INFO, id .. ':a', -1)
redis.call('RPUSH', K_READY, id)
local now = now_ms()
set_state_due(id, 'ready', now)
wake_now(now)
return 'ok'
