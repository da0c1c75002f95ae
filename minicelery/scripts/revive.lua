-- revive.lua: put dead letters back in the queue (`minicelery retry-dead`). Each runs again
-- as if just enqueued: result cleared, attempt, lease-loss and retry counts and the unknown-task
-- deferral time reset. Its children
-- got its error when it died and were released then; they are not run again.
--
-- KEYS: the queue key set (see _common.lua), then
--   KEYS[14 + i]  done   the result-waiters list of ARGV[i], cleared so waiters wait again
-- ARGV[i]  id           a dead task's id
--
-- Returns the ids put back (a task no longer in the dead-letter set is skipped).

local now = now_ms()
local revived = {}
for i, id in ipairs(ARGV) do
  if redis.call('ZSCORE', K_DEAD, id) and redis.call('HEXISTS', K_PAYLOAD, id) == 1 then
    redis.call('ZREM', K_DEAD, id)
    redis.call('ZREM', K_EXPIRY, id)
    redis.call('HDEL', K_RESULT, id)
    redis.call('HDEL', K_INFO, id .. ':a', id .. ':l', id .. ':r', id .. ':u')
    redis.call('DEL', KEYS[14 + i])
    make_due(id, now, now)
    revived[#revived + 1] = id
  end
end
return revived
