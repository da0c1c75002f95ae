-- leave.lua: a worker leaves a queue's idle set and takes back what was handed to it meanwhile
-- (a stopping worker, or one busy on another queue). One script, not a MULTI, so on a Redis
-- Cluster it follows a slot migration (ASK, TRYAGAIN) like every other call.
--
-- KEYS: the queue key set (see _common.lua), then
--   KEYS[15] inbox   this worker's inbox on the queue
-- ARGV[1] registration  the worker's member in the idle set (broker.idle_registration)
--
-- Returns the inbox's members (encode_handed strings: tasks still leased to this worker),
-- the inbox deleted.

redis.call('ZREM', K_IDLE, ARGV[1])
local handed = redis.call('ZRANGE', KEYS[15], 0, -1)
redis.call('DEL', KEYS[15])
return handed
