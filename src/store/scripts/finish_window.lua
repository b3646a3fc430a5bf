-- Remove a window (or amendment) from the pending set if, and only if, its hashes are empty —
-- in one step, so a replay adding records back cannot slip between the check and the removal.
-- Once nothing of the window is pending or dead-lettered (no member of its start in either
-- set), its usage index goes too.
-- KEYS[1] sealed hash, KEYS[2] its hi hash, KEYS[3] pending set, KEYS[4] dead-letter index,
-- KEYS[5] the window's index tenants. ARGV[1] member, ARGV[2] shard base, ARGV[3] start.
-- Returns 1 when it was finished.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('UNLINK', key.ts(KEYS[1]))
if redis.call('ZCOUNT', KEYS[3], ARGV[3], ARGV[3]) == 0
    and redis.call('ZCOUNT', KEYS[4], ARGV[3], ARGV[3]) == 0 then
  for _, t in ipairs(redis.call('SMEMBERS', KEYS[5])) do
    redis.call('UNLINK', key.idx(ARGV[2], ARGV[3], t))
  end
  redis.call('UNLINK', KEYS[5])
end
return 1
