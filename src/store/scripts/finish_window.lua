-- Remove a window from the pending set if, and only if, its hashes are empty — in one step, so
-- a replay adding records back cannot slip between the check and the removal. A window that
-- holds no dead letters either is gone for good: its usage index goes with it.
-- KEYS[1] sealed hash, KEYS[2] its hi hash, KEYS[3] pending set, KEYS[4] dead-letter hash,
-- KEYS[5] the window's index tenants. ARGV[1] window member, ARGV[2] shard base, ARGV[3] start.
-- Returns 1 when the window was finished.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 0 then
  for _, t in ipairs(redis.call('SMEMBERS', KEYS[5])) do
    redis.call('UNLINK', ARGV[2] .. ':x:idx:' .. ARGV[3] .. ':' .. t)
  end
  redis.call('UNLINK', KEYS[5])
end
return 1
