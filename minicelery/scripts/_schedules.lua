-- _schedules.lua: prepended, after _common.lua, to the schedule scripts (schedule_*.lua) and
-- to cancel.lua (see broker._script_source), so the scripts of the task hot path (claim,
-- finish) stay as they were.
--
-- KEYS after the queue key set (built by minicelery.keys.QueueKeys.schedule_keys):
--   KEYS[15] schedules       hash  schedule name -> spec (JSON, opaque to Lua)
--   KEYS[16] schedule_state  hash  "<name>:<f>" -> f one of
--                                  n pending occurrence id   d its slot (ms)
--                                  c occurrence last started s its start (ms)   S its slot (ms)
--                                  p "1" while paused         m slots missed (given up), total
--                                  r runs started, total

local K_SCHEDULES, K_STATE = KEYS[15], KEYS[16]

-- An occurrence that never finished and never will (given up: paused, removed, replaced or
-- skipped) is deleted with forget_fields (_common.lua), after the caller takes it out of its
-- sorted set.
