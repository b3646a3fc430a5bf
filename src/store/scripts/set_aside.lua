-- Set one dead-lettered record aside for good, on an operator's explicit request: it leaves the
-- dead-letter hash and an audit entry (who, when, why, the exact amount, the record) is pushed
-- onto the shard's audit list, in one step — never a silent drop. A window that no longer
-- holds dead letters and is not pending loses its usage index too.
-- KEYS[1] dead-letter hash, KEYS[2] dead-letter index, KEYS[3] audit list, KEYS[4] pending set,
-- KEYS[5] the window's index tenants. ARGV[1] field, ARGV[2] window member, ARGV[3] audit
-- entry (JSON object text without the stored value), ARGV[4] shard base, ARGV[5] window start.
-- Returns the stored dead-letter value, or false when there is none.
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  return false
end
redis.call('HDEL', KEYS[1], ARGV[1])
local t = redis.call('TIME')
redis.call('LPUSH', KEYS[3], '{"time":' .. t[1] .. ',"entry":' .. ARGV[3] .. ',"dead_letter":' .. v .. '}')
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[2])
  if redis.call('ZCOUNT', KEYS[4], ARGV[5], ARGV[5]) == 0
      and redis.call('ZCOUNT', KEYS[2], ARGV[5], ARGV[5]) == 0 then
    for _, tenant in ipairs(redis.call('SMEMBERS', KEYS[5])) do
      redis.call('UNLINK', key.idx(ARGV[4], ARGV[5], tenant))
    end
    redis.call('UNLINK', KEYS[5])
  end
end
return v
