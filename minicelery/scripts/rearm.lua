-- rearm.lua: a stopping worker passes on the future wake-up it was waiting for, so the
-- scheduled task it knew about is not left for the idle sweep.
--
-- KEYS: the queue key set (see _common.lua).
-- ARGV[1] due_ms   the due time (ms, Redis clock)
--
-- Returns 'ok'.

redis.call('ZADD', K_MARKER, 'LT', tonumber(ARGV[1]), 'm')
return 'ok'
