-- renew.lua: extend a running task's lease (called by the worker's heartbeat thread).
--
-- KEYS: the queue key set (see _common.lua).
-- ARGV[1] id         task id
-- ARGV[2] token      the lease token from the claim
-- ARGV[3] lease_ms   new lease length, counted from now on the Redis clock
--
-- Returns 'ok'; 'cancelled' when the task was cancelled (cancel.lua: stop running it); or
-- 'late' when the lease is no longer this worker's.

local id, token = ARGV[1], ARGV[2]
if getf(id, 't') ~= token then
  return getf(id, 's') == 'cancelled' and 'cancelled' or 'late'
end
redis.call('ZADD', K_RUNNING, 'XX', now_ms() + tonumber(ARGV[3]), id)
return 'ok'
