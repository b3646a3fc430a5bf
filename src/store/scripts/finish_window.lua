-- Remove a window from the pending set if, and only if, its hashes are empty — in one step, so
-- a replay adding records back cannot slip between the check and the removal.
-- KEYS[1] sealed hash, KEYS[2] its hi hash, KEYS[3] pending set. ARGV[1] window member.
-- Returns 1 when the window was finished.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
