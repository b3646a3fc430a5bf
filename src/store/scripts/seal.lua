-- Seal the shard if its window has ended (the scheduler's toggle).
-- KEYS[1] shard base; ARGV[1] window length in seconds.
-- Returns {generation, window start, 1 if this call toggled else 0, Redis time (s), its µs}.
local t = redis.call('TIME')
local now = tonumber(t[1])
local gen, start, toggled = seal(KEYS[1], now, tonumber(ARGV[1]))
return {gen, start, toggled, now, tonumber(t[2])}
