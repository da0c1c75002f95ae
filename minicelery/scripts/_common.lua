-- _common.lua: prepended to every minicelery script when it is loaded (see redis_wire.script_source).
-- It names the queue's keys and holds the steps several operations share:
-- putting a task where it belongs, releasing children, sweeping expired data, claiming.
--
-- KEYS, the same for every script (built by minicelery.keys.QueueKeys.as_list):
--   KEYS[1]  ready      list  ids ready to run; LPUSH to enqueue, RPOP to claim, RPUSH to hand back
--   KEYS[2]  scheduled  zset  id -> due time, ms on the Redis clock
--   KEYS[3]  running    zset  id -> lease deadline, ms
--   KEYS[4]  marker     zset  one member "m"; score 0 = work is ready now, else the earliest
--                             future due time. Idle workers BZPOPMIN it: one wakes per push.
--   KEYS[5]  payload    hash  id -> the time (ms, base 36) the task was stored, then its payload
--                             (JSON, opaque to Lua: it starts with '[' or '{'; see store_payload)
--   KEYS[6]  result     hash  id -> result envelope (JSON, opaque to Lua)
--   KEYS[7]  info       hash  "<id>:<f>" -> small per-task fields, f one of
--                             s state (waiting|scheduled|ready|running|succeeded|failed|
--                               cancelled); none for a task sent straight to the ready list
--                               or the schedule (its state is where it sits) or a success
--                               whose result is kept (the result says it): see state_of
--                             a attempts (claims)      l leases lost (reclaims)
--                             r retries spent (failures run again)
--                             t lease token            d time the task became due (ms; a
--                               scheduled task's due time is its score in `scheduled`, a task
--                               sent straight to the ready list keeps it in its payload)
--                             n not-before time (ms)   p count of unfinished parents
--                             P parent ids, "," list   c child ids, "," list
--                             k idempotency key       w someone waits for the result
--                             u first time a worker that lacked its task deferred it (ms)
--                             x who cancelled it ("api", "cli"): its state is cancelled
--                             and queue-wide fields: "#cancelled", how many cancelled tasks
--                             are kept (until their result TTL), "#handoffs" (hand-off tokens)
--   KEYS[8]  inputs     hash  "<child>|<parent>" -> the parent's result envelope, kept for the child
--   KEYS[9]  expiry     zset  id -> time (ms) after which a finished task's data is deleted
--   KEYS[10] dead       zset  id -> time (ms) the task was dead-lettered
--   KEYS[11] workers    zset  worker id -> last time it claimed (ms)
--   KEYS[12] dedup      hash  idempotency key -> id of the pending task that holds it
--   KEYS[13] idle       zset  "<lease_ms>|<worker id>|<inbox key>" -> time (ms) a worker, idle
--                             and blocked on that inbox, registered; a ready task is handed to
--                             the newest
--   KEYS[14] waiting    zset  id -> time (ms) since a task waits for its parents with none of them
--                             in flight: when it was registered, or when the orphan sweep
--                             (orphans.lua) last found a parent in flight. Exactly the tasks in
--                             state "waiting" (its size is the waiting depth).
--   inbox (one per idle worker, named in `idle`)
--                       zset  tasks handed to that worker, already leased to it, each member
--                             encoded by encode_handed; score: the time handed (ms)
-- Scripts that need more keys take them from KEYS[15] on; their headers say which.

local K_READY, K_SCHEDULED, K_RUNNING, K_MARKER = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_PAYLOAD, K_RESULT, K_INFO, K_INPUTS = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_EXPIRY, K_DEAD, K_WORKERS, K_DEDUP, K_IDLE = KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local K_WAITING = KEYS[14]

-- How much cleanup and recovery one call may do, so no call is ever slow.
local SWEEP_BATCH = 20
-- An idle claim (nothing ready) has time to spare: it sweeps more, so Redis memory returns to
-- its baseline soon after result TTLs pass even on a quiet queue.
local IDLE_SWEEP_BATCH = 500
-- Idle workers look again for expired results at most this long after they expire, so many
-- small expiries make one sweep, not a wake-up each.
local EXPIRY_COALESCE_MS = 5000
local PROMOTE_BATCH = 100
local RECLAIM_BATCH = 20
-- Workers not seen for a day are dropped from the workers set.
local WORKER_FORGET_MS = 86400000
-- An idle worker claims once per lease (its sweep), at most an idle block late: one not seen
-- by a claim for two leases and this long is dead, and nothing is handed to it.
local IDLE_SILENCE_MS = 10000

local INFO_FIELDS = { 's', 'a', 'l', 'r', 't', 'd', 'n', 'p', 'P', 'c', 'k', 'w', 'u', 'x' }

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A task in one of these states has its outcome in the result hash.
local FINISHED = { succeeded = true, failed = true, cancelled = true }

local function getf(id, f)
  return redis.call('HGET', K_INFO, id .. ':' .. f)
end

local function setf(id, f, v)
  redis.call('HSET', K_INFO, id .. ':' .. f, v)
end

-- A task's state. A task sent straight to the ready list or the schedule (enqueue with no
-- parent in flight) stores none: a stored payload with no state field is scheduled if it is
-- in the schedule, else ready. That is two hash fields fewer per pending task, about 160
-- bytes (see bench/README.md, memory). Nor does a success whose result is kept (finish.lua):
-- a stored result with no state field and no payload is a success (a failure or a cancel
-- keeps its state). Any later move stores the state again (promote_due,
-- the claim, a cancel...), so a stored state is always the true one. `stored`: the s field,
-- if the caller read it already (false if absent).
local function state_of(id, stored)
  if stored == nil then
    stored = getf(id, 's')
  end
  if stored then
    return stored
  end
  if redis.call('HEXISTS', K_PAYLOAD, id) == 0 then
    -- A success whose result is kept stores no state either: its result says it.
    return redis.call('HEXISTS', K_RESULT, id) == 1 and 'succeeded'
  end
  return redis.call('ZSCORE', K_SCHEDULED, id) and 'scheduled' or 'ready'
end

-- A stored payload starts with the time it was stored, base 36 (8 digits until 2059), so a
-- task sent straight to the ready list needs no due-time field (88 bytes) for the queue
-- latency its claim reports: it became due when it was stored. The payload itself is JSON,
-- an array or an object (transport.py), so it starts with '[' or '{'; one stored before this
-- prefix existed is the payload alone.
local BASE36 = '0123456789abcdefghijklmnopqrstuvwxyz'

-- (`only_new`: store it only if the id has no payload yet; returns whether it stored it.)
local function store_payload(id, payload, now, only_new)
  local digits, n = {}, now
  repeat
    local d = n % 36
    table.insert(digits, 1, string.sub(BASE36, d + 1, d + 1))
    n = (n - d) / 36
  until n == 0
  return redis.call(only_new and 'HSETNX' or 'HSET', K_PAYLOAD, id, table.concat(digits) .. payload) == 1
    or not only_new
end

-- A stored payload as {payload, time stored (ms) or nil}; false stays false.
local function split_payload(stored)
  if not stored then
    return false, nil
  end
  local brace = string.find(stored, '[%[{]')
  if brace == nil or brace == 1 then
    return stored, nil
  end
  return string.sub(stored, brace), tonumber(string.sub(stored, 1, brace - 1), 36)
end

-- A task's state and the time it became (or becomes) due, which change together.
local function set_state_due(id, state, due)
  redis.call('HSET', K_INFO, id .. ':s', state, id .. ':d', due)
end

local function split(csv)
  local out = {}
  if csv then
    for item in string.gmatch(csv, '[^,]+') do
      out[#out + 1] = item
    end
  end
  return out
end

-- Promised wake-ups: how many idle workers were woken for ready work and have not claimed
-- yet. A claim by a worker that was not woken (a busy worker finishing-and-claiming, an idle
-- sweep) leaves that many tasks for them, so no woken worker finds its task gone. A woken
-- worker that dies before claiming must not hold tasks back for long: promises older than
-- PROMISE_TTL_MS (a claim normally follows its wake-up within milliseconds) count as none.
local PROMISE_TTL_MS = 1000

-- (Read once per script call: a claim asks up to three times.)
local promised_count, promised_read_at = 0, nil

local function promised(now)
  if promised_read_at ~= now then
    local held = redis.call('HMGET', K_INFO, '#promised_at', '#promised')
    promised_count = now - tonumber(held[1] or 0) > PROMISE_TTL_MS and 0 or tonumber(held[2] or 0)
    promised_read_at = now
  end
  return promised_count
end

local function add_promised(delta, now)
  local count = math.max(0, promised(now) + delta)
  if count == 0 then
    redis.call('HDEL', K_INFO, '#promised', '#promised_at')
  else
    redis.call('HSET', K_INFO, '#promised', count, '#promised_at', now)
  end
  promised_count, promised_read_at = count, now
end

-- What this script call already knows, so a batch that releases many children does not ask
-- Redis again for each: a marker at 0 stays at 0 until unwake() takes it back (the other
-- writes, ZADD LT, only lower it), and an idle set found empty stays empty (only workers add
-- themselves, between script calls).
local marker_at_zero, idle_set_empty = false, false

-- Wake one idle worker now (ZADD of the single member: many pushes still wake one worker;
-- the claim that takes a task re-arms the marker while work remains, waking the next).
local function wake_now(now)
  if not marker_at_zero and redis.call('ZSCORE', K_MARKER, 'm') ~= '0' then
    redis.call('ZADD', K_MARKER, 0, 'm')
    add_promised(1, now)
  end
  marker_at_zero = true
end

-- Take back a wake-up no worker has popped yet (nothing is ready for it any more).
local function unwake(now)
  if redis.call('ZSCORE', K_MARKER, 'm') == '0' then
    redis.call('ZREM', K_MARKER, 'm')
    add_promised(-1, now)
  end
  marker_at_zero = false
end

-- A worker going busy passes on the future wake-up it was waiting for (`held_due`), so an
-- idle worker takes it over. If that time has come, this claim promoted what was due then:
-- what is left to pass on is the next scheduled time (a past one would only wake a worker,
-- this one included, to find nothing: a wasted wake-up per delayed task on a lone worker).
local function pass_on_wakeup(held_due, now)
  if held_due > now then
    redis.call('ZADD', K_MARKER, 'LT', held_due, 'm')
  elseif held_due > 0 then
    local first = redis.call('ZRANGE', K_SCHEDULED, 0, 0, 'WITHSCORES')
    if first[2] then
      redis.call('ZADD', K_MARKER, 'LT', first[2], 'm')
    end
  end
end

-- Tell idle workers about a due time that is earlier than any scheduled before it.
local function wake_at(due)
  local first = redis.call('ZRANGE', K_SCHEDULED, 0, 0, 'WITHSCORES')
  if first[2] == nil or due <= tonumber(first[2]) then
    redis.call('ZADD', K_MARKER, 'LT', due, 'm')
  end
end

-- Lease ready tasks (already taken off the ready list), the i-th under token .. '/' .. i.
-- The writes all tasks share are one command each: Lua calls into Redis are a busy queue's
-- main cost. Returns {'ok', task...}, each task
--   {id, payload|false, attempts, leases_lost, due_ms, now_ms, parent_ids_csv|false, env1, ...}
local function lease_tasks(ids, now, token, lease_ms)
  local wanted = {}
  for _, id in ipairs(ids) do
    wanted[#wanted + 1] = id .. ':a'
    wanted[#wanted + 1] = id .. ':l'
    wanted[#wanted + 1] = id .. ':d'
    wanted[#wanted + 1] = id .. ':P'
  end
  local held = redis.call('HMGET', K_INFO, unpack(wanted))
  local payloads = redis.call('HMGET', K_PAYLOAD, unpack(ids))
  local leases, fields, reply = {}, {}, { 'ok' }
  for i, id in ipairs(ids) do
    local at = (i - 1) * 4
    local attempts = tonumber(held[at + 1] or 0) + 1
    leases[#leases + 1] = now + lease_ms
    leases[#leases + 1] = id
    fields[#fields + 1] = id .. ':t'
    fields[#fields + 1] = token .. '/' .. i
    fields[#fields + 1] = id .. ':s'
    fields[#fields + 1] = 'running'
    fields[#fields + 1] = id .. ':a'
    fields[#fields + 1] = attempts
    local parents = held[at + 4]
    local payload, stored_at = split_payload(payloads[i])
    local due = tonumber(held[at + 3] or stored_at or now)
    local task = { id, payload, attempts, tonumber(held[at + 2] or 0), due, now, parents }
    for _, parent in ipairs(split(parents)) do
      task[#task + 1] = redis.call('HGET', K_INPUTS, id .. '|' .. parent)
    end
    reply[i + 1] = task
  end
  redis.call('ZADD', K_RUNNING, unpack(leases))
  redis.call('HSET', K_INFO, unpack(fields))
  return reply
end

-- A leased task as one string, for an inbox: each field as "<length>:<bytes>", false as "-:",
-- the token first, then the fields of a lease_tasks task (decoded by broker._decode_handed).
local function encode_handed(token, task)
  local parts = { #token .. ':' .. token }
  for i = 1, #task do
    local v = task[i]
    if v then
      v = tostring(v)
      parts[#parts + 1] = #v .. ':' .. v
    else
      parts[#parts + 1] = '-:'
    end
  end
  return table.concat(parts)
end

-- Give a ready task straight to the idle worker that registered last (it blocks on its inbox,
-- so it starts the task without claiming it: one wake-up, no second round trip). The task is
-- leased to it at once, as a claim would; if that worker died idle, the lease expires and any
-- worker's claim reclaims the task (only for a worker dead less than two leases: see
-- IDLE_SILENCE_MS). `fresh_payload` is given for a task just enqueued with no
-- parents: nothing about it needs reading back (the idle path's latency is mostly Redis
-- calls). False if no worker is registered idle.
local function hand_off(id, now, fresh_payload)
  if idle_set_empty then
    return false
  end
  local lease_ms, inbox, worker
  repeat
    local newest = redis.call('ZPOPMAX', K_IDLE)
    if newest[1] == nil then
      idle_set_empty = true
      return false
    end
    lease_ms, worker, inbox = string.match(newest[1], '^(%d+)|([^|]+)|(.+)$')
    lease_ms = tonumber(lease_ms)
    local seen = worker and tonumber(redis.call('ZSCORE', K_WORKERS, worker) or 0) -- nil: junk
    -- A worker not seen alive lately died idle, and a malformed entry is no worker: dropped.
  until seen and now - seen <= 2 * lease_ms + IDLE_SILENCE_MS
  -- Fencing: a token must never be issued twice, even across a failover that loses the last
  -- increments of '#handoffs' (replication is asynchronous: the new primary's counter can be
  -- behind). So the counter alone is not the token: the receiving worker's id (host, pid and
  -- a random part, never reused) makes two workers' tokens differ whatever the counter says,
  -- and the Redis time makes one worker's differ unless the new primary repeats the counter at
  -- the very millisecond. (Claim tokens are made by the worker: its id and its own count.)
  local token = 'h' .. redis.call('HINCRBY', K_INFO, '#handoffs', 1) .. '.' .. now .. '@' .. worker
  local task
  if fresh_payload then -- lease_tasks' writes, for a first attempt
    redis.call('ZADD', K_RUNNING, now + lease_ms, id)
    redis.call('HSET', K_INFO, id .. ':t', token .. '/1', id .. ':s', 'running', id .. ':a', 1)
    task = { id, fresh_payload, 1, 0, now, now, false }
  else
    setf(id, 'd', now)
    task = lease_tasks({ id }, now, token, lease_ms)[2]
  end
  redis.call('ZADD', inbox, now, encode_handed(token .. '/1', task))
  redis.call('PEXPIRE', inbox, 2 * lease_ms) -- a dead worker's inbox goes; its tasks are reclaimed
  return true
end

-- Put a task whose parents are all done where it belongs: handed to an idle worker, ready
-- now, or scheduled; returns its state. `fresh_payload` is given for a task just stored by
-- store_payload (now) with no parents: it has no state field, and gets none while it is ready
-- or scheduled (see state_of), nor a due-time field (its payload holds it); see hand_off too.
local function make_due(id, due, now, fresh_payload)
  if due <= now then
    if hand_off(id, now, fresh_payload) then
      return 'running'
    end
    redis.call('LPUSH', K_READY, id)
    if not fresh_payload then
      set_state_due(id, 'ready', now)
    end
    wake_now(now)
    return 'ready'
  end
  wake_at(due)
  redis.call('ZADD', K_SCHEDULED, due, id)
  if not fresh_payload then
    setf(id, 's', 'scheduled') -- (its due time is its score: d is written when it is promoted)
  end
  return 'scheduled'
end

-- Give each waiting child (`children`: the parent's "c" field) this parent's envelope;
-- release those with no parent left, adding their ids to `released`: the caller takes them
-- out of the waiting set with forget_waiting, once for a whole batch.
local function release_children(id, children, envelope, now, released, skip)
  for _, child in ipairs(split(children)) do
    if not (skip and skip[child]) then -- (skip: cancelled with its parent, cancel.lua's cascade)
      redis.call('HSET', K_INPUTS, child .. '|' .. id, envelope)
      local left = redis.call('HINCRBY', K_INFO, child .. ':p', -1)
      local held = left <= 0 and redis.call('HMGET', K_INFO, child .. ':s', child .. ':n')
      if held and held[1] == 'waiting' then
        redis.call('HDEL', K_INFO, child .. ':p')
        released[#released + 1] = child
        make_due(child, math.max(now, tonumber(held[2] or 0)), now)
      end
    end
  end
end

-- Take `child` off a parent's list of children (the list goes when empty), so the parent's
-- finish no longer touches it (orphans.lua, cancel.lua).
local function forget_child(parent, child)
  local kept = {}
  for _, other in ipairs(split(getf(parent, 'c'))) do
    if other ~= child then
      kept[#kept + 1] = other
    end
  end
  if #kept == 0 then
    redis.call('HDEL', K_INFO, parent .. ':c')
  else
    setf(parent, 'c', table.concat(kept, ','))
  end
end

-- Give a task that will not run its outcome now, outside finish.lua (an orphan's error in
-- orphans.lua, a cancel in cancel.lua): the result, kept `keep` ms; its idempotency key freed;
-- its children given the envelope when `release` (skipping those in `skip`) and forgotten;
-- its result waiters woken through `done`, its done list. `held`: HMGET of the task's
-- s, P, c, k, w fields.
local function settle(id, held, envelope, keep, now, done, release, released, skip)
  redis.call('HSET', K_RESULT, id, envelope)
  redis.call('ZADD', K_EXPIRY, now + keep, id)
  local key = held[4]
  if key and redis.call('HGET', K_DEDUP, key) == id then
    redis.call('HDEL', K_DEDUP, key)
  end
  if held[3] then
    if release then
      release_children(id, held[3], envelope, now, released, skip)
    end
    redis.call('HDEL', K_INFO, id .. ':c')
  end
  if held[5] then
    redis.call('LPUSH', done, '1')
    redis.call('PEXPIRE', done, keep)
  end
end

-- Take tasks that no longer wait for parents out of the waiting set (in slices: unpack has
-- a limit, and one parent may release thousands of children).
local function forget_waiting(ids)
  for first = 1, #ids, 1000 do
    redis.call('ZREM', K_WAITING, unpack(ids, first, math.min(first + 999, #ids)))
  end
end

-- Delete a task's small fields and its payload (what every task has; callers delete the rest).
local function forget_fields(id)
  local fields = {}
  for i, f in ipairs(INFO_FIELDS) do
    fields[i] = id .. ':' .. f
  end
  redis.call('HDEL', K_INFO, unpack(fields))
  redis.call('HDEL', K_PAYLOAD, id)
end

-- Delete everything stored for finished tasks whose result TTL has passed.
local function sweep_expired(now, batch)
  local ids = redis.call('ZRANGEBYSCORE', K_EXPIRY, '-inf', now, 'LIMIT', 0, batch or SWEEP_BATCH)
  for _, id in ipairs(ids) do
    local held = redis.call('HMGET', K_INFO, id .. ':P', id .. ':s')
    for _, parent in ipairs(split(held[1])) do
      redis.call('HDEL', K_INPUTS, id .. '|' .. parent)
    end
    if held[2] == 'cancelled' then
      redis.call('HINCRBY', K_INFO, '#cancelled', -1)
    end
    forget_fields(id)
    redis.call('HDEL', K_RESULT, id)
    redis.call('ZREM', K_DEAD, id)
    redis.call('ZREM', K_EXPIRY, id)
  end
  return #ids
end

-- Move scheduled tasks whose time has come to the ready list.
local function promote_due(now)
  local ids = redis.call('ZRANGEBYSCORE', K_SCHEDULED, '-inf', now, 'WITHSCORES', 'LIMIT', 0, PROMOTE_BATCH)
  for i = 1, #ids, 2 do
    local id = ids[i]
    redis.call('ZREM', K_SCHEDULED, id)
    redis.call('LPUSH', K_READY, id)
    set_state_due(id, 'ready', ids[i + 1])
  end
end

-- Requeue tasks whose lease expired (their worker died or hung); they go first in line.
local function reclaim_expired(now)
  local ids = redis.call('ZRANGEBYSCORE', K_RUNNING, '-inf', now, 'LIMIT', 0, RECLAIM_BATCH)
  for _, id in ipairs(ids) do
    redis.call('ZREM', K_RUNNING, id)
    redis.call('HDEL', K_INFO, id .. ':t')
    redis.call('HINCRBY', K_INFO, id .. ':l', 1)
    redis.call('RPUSH', K_READY, id)
    set_state_due(id, 'ready', now)
  end
  return #ids
end

-- The earliest time a worker should look again: next scheduled task, next lease to expire,
-- or (coalesced) next result to sweep.
local function next_due_delay(now)
  local best = nil
  for _, key in ipairs({ K_SCHEDULED, K_RUNNING, K_EXPIRY }) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] ~= nil then
      local at = tonumber(first[2])
      if key == K_EXPIRY then
        at = at + EXPIRY_COALESCE_MS
      end
      if best == nil or at < best then
        best = at
      end
    end
  end
  if best == nil then
    return -1
  end
  return math.max(0, best - now)
end
