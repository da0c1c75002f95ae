-- finish.lua: record a task's outcome, release its children, and optionally claim the next.
--
-- Only the lease holder may finish: the token must match the one its claim stored. A worker
-- that was paused past its lease (the task was reclaimed and maybe run again) gets 'late',
-- and nothing is written: no result overwritten, no child released twice.
--
-- KEYS: the queue key set (see _common.lua), then
--   KEYS[13] done      list the task's result waiters block on (BLMOVE)
-- ARGV[1] id           task id
-- ARGV[2] token        the lease token from the claim
-- ARGV[3] outcome      "succeeded" or "failed"
-- ARGV[4] envelope     result envelope (JSON)
-- ARGV[5] result_ttl   ms to keep the result; then every trace of the task is swept
-- ARGV[6] dead         "1" to record the task in the dead-letter set
-- ARGV[7] claim        "1" to claim the next task in the same call; then ARGV[8..10] are
-- ARGV[8] next_token, ARGV[9] lease_ms, ARGV[10] worker (as claim.lua's ARGV[1..3])
--
-- Returns {finish_status, claim_reply}: finish_status is 'ok' or 'late'; claim_reply is
-- claim_next's reply, or false when no claim was asked for.

local id, token, outcome, envelope = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local result_ttl, dead, claim = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local now = now_ms()

local status = 'late'
if token ~= '' and getf(id, 't') == token then
  status = 'ok'
  redis.call('ZREM', K_RUNNING, id)
  redis.call('HDEL', K_INFO, id .. ':t')
  setf(id, 's', outcome)
  redis.call('HSET', K_RESULT, id, envelope)
  redis.call('ZADD', K_EXPIRY, now + result_ttl, id)
  if dead == '1' then
    redis.call('ZADD', K_DEAD, now, id)
  end
  local key = getf(id, 'k')
  if key and redis.call('HGET', K_DEDUP, key) == id then
    redis.call('HDEL', K_DEDUP, key)
  end
  release_children(id, envelope, now)
  redis.call('LPUSH', KEYS[13], '1')
  redis.call('PEXPIRE', KEYS[13], result_ttl)
end

local next_claim = false
if claim == '1' then
  next_claim = claim_next(now, ARGV[8], tonumber(ARGV[9]), ARGV[10], 0)
end
return { status, next_claim }
