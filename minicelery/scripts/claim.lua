-- claim.lua: take the next ready task under a fresh lease.
--
-- Before taking a task the claim sweeps expired results, requeues tasks whose lease expired,
-- and moves due scheduled tasks to ready. A busy worker sends it in the same pipeline as the
-- finishes of its last batch: one round trip per batch.
--
-- KEYS: the queue key set (see _common.lua), then
--   KEYS[15] inbox   this worker's inbox on the queue (only with ARGV[7])
-- ARGV[1] token      fencing token base for these leases (unique per claim)
-- ARGV[2] lease_ms   lease length
-- ARGV[3] worker     worker id (recorded in the workers set)
-- ARGV[4] held_due   future due time this worker was waiting for (ms), or 0
-- ARGV[5] batch      most tasks to claim (each gets its own lease and token ARGV[1]/i)
-- ARGV[6] woken      1 if this claim follows a wake-up from the marker, else 0
-- ARGV[7] idle       the worker's registration in the idle set (see _common.lua), or ""
--
-- Returns what claim_next returns, {'ok', task, ...} (each task as lease_tasks in _common.lua
-- describes it, the one description of that format) or {'none', next_due_delay_ms, now_ms},
-- with the tasks handed to this worker's inbox (encode_handed strings) added to an 'ok': a
-- claim takes them too, so none waits in the inbox of a worker that is busy.

-- Claim up to `batch` ready tasks for this worker, each under its own lease and fencing token
-- (token .. '/' .. i). It never takes more than half the ready backlog (rounded up), so a
-- worker that batches leaves work for the idle workers the marker wakes, nor tasks promised
-- to workers already woken (see promised()); `woken` says this claim follows a wake-up.
-- `held_due` is a future due time (ms) this worker was waiting for, or 0; a worker that goes
-- busy hands that wake-up on through the marker so an idle worker takes it over. Returns
-- lease_tasks' reply, or {'none', next_due_delay_ms (-1: nothing pending), now_ms}.
local function claim_next(now, token, lease_ms, worker, held_due, batch, woken)
  sweep_expired(now)
  reclaim_expired(now)
  promote_due(now)
  redis.call('ZADD', K_WORKERS, now, worker)
  redis.call('ZREMRANGEBYSCORE', K_WORKERS, '-inf', now - WORKER_FORGET_MS)
  if woken == 1 then
    add_promised(-1, now) -- this worker's wake-up is delivered
  end
  local ready = redis.call('LLEN', K_READY)
  local available = ready - promised(now)
  if available <= 0 and ready > 0 and woken ~= 1 then
    -- A wake-up not popped yet: take it over rather than leave a worker to wake for nothing.
    if redis.call('ZSCORE', K_MARKER, 'm') == '0' then
      unwake(now)
      available = ready - promised(now)
    end
  end
  if ready == 0 or available <= 0 then
    if ready == 0 then
      unwake(now) -- a score-0 marker left now would wake a worker for nothing
      local swept = sweep_expired(now, IDLE_SWEEP_BATCH)
      if swept == IDLE_SWEEP_BATCH then
        return { 'none', 0, now } -- more expired results wait: look again at once
      end
    end
    return { 'none', next_due_delay(now), now }
  end
  local count = math.min(batch or 1, math.max(1, math.ceil(available / 2)))
  local ids = redis.call('RPOP', K_READY, count)
  if ready - count > promised(now) then
    wake_now(now)
  else
    unwake(now)
    pass_on_wakeup(held_due, now)
  end
  return lease_tasks(ids, now, token, lease_ms)
end

local function claim(now, registration, held_due)
  local handed = {}
  if registration ~= '' then
    handed = redis.call('ZRANGE', KEYS[15], 0, -1)
    if #handed > 0 then
      redis.call('DEL', KEYS[15])
    end
  end
  local reply = claim_next(now, ARGV[1], tonumber(ARGV[2]), ARGV[3], held_due, tonumber(ARGV[5]), tonumber(ARGV[6]))
  if #handed > 0 and reply[1] == 'none' then
    reply = { 'ok' }
    pass_on_wakeup(held_due, now) -- busy now: the due time it waited for goes to an idle worker
  end
  for _, task in ipairs(handed) do
    reply[#reply + 1] = task
  end
  if reply[1] == 'ok' and registration ~= '' then
    redis.call('ZREM', K_IDLE, registration) -- busy: hand nothing more to it until it waits again
  end
  return reply
end

return claim(now_ms(), ARGV[7] or '', tonumber(ARGV[4]))
