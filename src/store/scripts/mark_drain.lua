-- Mark that the delivery of a window (ARGV[1] = 0) or of its amendment ARGV[1] begins, before
-- the drain first reads it: the write script sends later late pulses to the next amendment.
-- The window's `final_at` is fixed by its first mark and kept beside it, so every delivery of
-- every record of the window carries the same one, whatever LATE_MAX_AGE becomes.
-- KEYS[1] the window's late-pulse state, KEYS[2] the shard's conf hash. ARGV[2] how long the
-- mark is kept (s) when the shard has no recorded LATE_MAX_AGE (with one: that plus a day — the
-- deployment's value, whichever replica drains); ARGV[3] the window's end (s); ARGV[4] this
-- replica's LATE_MAX_AGE (s), for a shard that recorded none.
-- Returns the window's final_at (s): its end plus its LATE_MAX_AGE (`max_age` in write.lua).
local cur = tonumber(redis.call('HGET', KEYS[1], 'drain'))
if not cur or cur < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'drain', ARGV[1])
end
local c = redis.call('HMGET', KEYS[2], 'late_max', 'late_prev', 'late_changed')
local late_max = tonumber(c[1])
local max = late_max or tonumber(ARGV[4])
local stop = tonumber(ARGV[3])
local age = max
if stop <= (tonumber(c[3]) or 0) then
  age = math.min(max, tonumber(c[2]) or max)
end
redis.call('HSETNX', KEYS[1], 'final', string.format('%d', stop + age))
redis.call('EXPIRE', KEYS[1], late_max and (late_max + 86400) or ARGV[2])
return tonumber(redis.call('HGET', KEYS[1], 'final'))
