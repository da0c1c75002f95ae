-- finish.lua: record a task's outcome (or schedule its retry) and release its children.
--
-- Only the lease holder may finish: the token must match the one its claim stored. A worker
-- that was paused past its lease (the task was reclaimed and maybe run again) gets 'late',
-- and nothing is written: no result overwritten, no child released twice.
--
-- A failure with retries left is not an outcome: the task goes back to the schedule, due
-- after its backoff (on the Redis clock), and keeps its children waiting. A failure with none
-- left is final: the result holds the error, the children get it, and the task goes into the
-- dead-letter set, kept for dead_ttl instead of result_ttl.
--
-- KEYS: the queue key set (see _common.lua), then
--   KEYS[13] done      list the task's result waiters block on (BLMOVE)
-- ARGV[1] id           task id
-- ARGV[2] token        the lease token from the claim
-- ARGV[3] outcome      "succeeded" or "failed"
-- ARGV[4] envelope     result envelope (JSON)
-- ARGV[5] result_ttl   ms to keep a result; then every trace of the task is swept
-- ARGV[6] dead_ttl     ms to keep a dead letter
-- ARGV[7] max_retries  retries allowed for this failure (0: no retry)
-- ARGV[8] base_ms, ARGV[9] cap_ms, ARGV[10] jitter (0.5-1), ARGV[11] fixed_ms (-1: backoff)
--                      the delay before retry r (0-based) is fixed_ms, else
--                      min(cap_ms, base_ms * 2^r) * jitter
--
-- Returns {finish_status, retry_delay_ms}: finish_status is 'ok', 'retry' or 'late';
-- retry_delay_ms is false unless the task was scheduled to run again.

local id, token, outcome, envelope = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local result_ttl, dead_ttl, max_retries = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()

local status = 'late'
local delay = false
if token ~= '' and getf(id, 't') == token then
  redis.call('ZREM', K_RUNNING, id)
  redis.call('HDEL', K_INFO, id .. ':t')
  local retries = tonumber(getf(id, 'r') or 0)
  if outcome == 'failed' and retries < max_retries then
    status = 'retry'
    local fixed = tonumber(ARGV[11])
    if fixed >= 0 then
      delay = fixed
    else
      delay = math.floor(math.min(tonumber(ARGV[9]), tonumber(ARGV[8]) * 2 ^ retries) * tonumber(ARGV[10]))
    end
    redis.call('HINCRBY', K_INFO, id .. ':r', 1)
    make_due(id, now + delay, now)
  else
    status = 'ok'
    setf(id, 's', outcome)
    redis.call('HSET', K_RESULT, id, envelope)
    local keep = result_ttl
    if outcome == 'failed' then
      redis.call('ZADD', K_DEAD, now, id)
      keep = math.max(result_ttl, dead_ttl)
    end
    redis.call('ZADD', K_EXPIRY, now + keep, id)
    local key = getf(id, 'k')
    if key and redis.call('HGET', K_DEDUP, key) == id then
      redis.call('HDEL', K_DEDUP, key)
    end
    release_children(id, envelope, now)
    redis.call('LPUSH', KEYS[13], '1')
    redis.call('PEXPIRE', KEYS[13], keep)
  end
end

return { status, delay }
