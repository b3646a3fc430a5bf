-- Mark that the delivery of a window (ARGV[1] = 0) or of its amendment ARGV[1] begins, before
-- the drain first reads it: the write script sends later late pulses to the next amendment.
-- KEYS[1] the window's late-pulse state. ARGV[2] how long the mark is kept (s).
local cur = tonumber(redis.call('HGET', KEYS[1], 'drain'))
if not cur or cur < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'drain', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
