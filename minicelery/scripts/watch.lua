-- watch.lua: read a task's state and result, and if it is still pending, ask its finish to
-- wake result waiters. The finish pushes the task's done list only for a watched task, so the
-- many tasks nobody waits on cost no list and no expiry. Atomic: a finish either ran before
-- (the result is returned) or runs after and sees the watch.
--
-- KEYS: the queue key set (see _common.lua).
-- ARGV[1] id
--
-- Returns {state|false, envelope|false}.

local id = ARGV[1]
local state = state_of(id)
if state then
  setf(id, 'w', '1')
end
return { state, redis.call('HGET', K_RESULT, id) }
