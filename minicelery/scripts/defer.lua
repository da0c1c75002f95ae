-- defer.lua: give a claimed task back to run a little later, for another worker: this one
-- cannot run it because its task name is not registered here (during a rolling deploy, a task
-- sent by new code may reach a worker still running the old code). Not counted as an attempt
-- or a retry. Deferring is bounded: once `grace_ms` has passed since the first deferral (on the
-- Redis clock, whichever worker made it) the task is left leased and 'expired' is returned, and
-- the worker dead-letters it through finish.lua as usual.
--
-- KEYS: the queue key set (see _common.lua).
-- ARGV[1] id         task id
-- ARGV[2] token      the lease token from the claim
-- ARGV[3] delay_ms   how long from now until it is due again
-- ARGV[4] grace_ms   how long after its first deferral a task may still be deferred
--
-- Returns {status, first_deferred_ms}: status 'deferred' (scheduled again), 'expired' (nothing
-- changed: dead-letter it) or 'late' (the lease is no longer this worker's; first_deferred 0).

local id, token = ARGV[1], ARGV[2]
if getf(id, 't') ~= token then
  return { 'late', 0 }
end
local now = now_ms()
local first = tonumber(getf(id, 'u') or now)
if now - first >= tonumber(ARGV[4]) then
  return { 'expired', first }
end
setf(id, 'u', first)
redis.call('ZREM', K_RUNNING, id)
redis.call('HDEL', K_INFO, id .. ':t')
redis.call('HINCRBY', K_INFO, id .. ':a', -1)
make_due(id, now + tonumber(ARGV[3]), now)
return { 'deferred', first }
