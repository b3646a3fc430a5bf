-- Mark that the delivery of a window (ARGV[1] = 0) or of its amendment ARGV[1] begins, before
-- the drain first reads it: the write script sends later late pulses to the next amendment.
-- KEYS[1] the window's late-pulse state, KEYS[2] the shard's conf hash. ARGV[2] how long the
-- mark is kept (s) when the shard has no recorded LATE_MAX_AGE; with one, that plus a day —
-- the deployment's value, whichever replica drains.
local cur = tonumber(redis.call('HGET', KEYS[1], 'drain'))
if not cur or cur < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'drain', ARGV[1])
end
local late_max = tonumber(redis.call('HGET', KEYS[2], 'late_max'))
redis.call('EXPIRE', KEYS[1], late_max and (late_max + 86400) or ARGV[2])
