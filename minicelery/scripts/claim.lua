-- claim.lua: take the next ready task under a fresh lease.
--
-- The steps are claim_next() in _common.lua, because finish.lua also claims the next task in
-- the same call (one round trip per task). Before taking a task the claim sweeps expired
-- results, requeues tasks whose lease expired, and moves due scheduled tasks to ready.
--
-- KEYS: the queue key set (see _common.lua).
-- ARGV[1] token      fencing token base for these leases (unique per claim)
-- ARGV[2] lease_ms   lease length
-- ARGV[3] worker     worker id (recorded in the workers set)
-- ARGV[4] held_due   future due time this worker was waiting for (ms), or 0
-- ARGV[5] batch      most tasks to claim (each gets its own lease and token ARGV[1]/i)
-- ARGV[6] woken      1 if this claim follows a wake-up from the marker, else 0
--
-- Returns what claim_next returns: {'ok', {task}, ...} or {'none', next_due_delay_ms, now_ms}.

return claim_next(now_ms(), ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6]))
