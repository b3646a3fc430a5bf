-- Seal the shard if its window has ended (the scheduler's toggle).
-- KEYS[1] shard base; ARGV[1] window length in seconds.
-- Returns {generation, window start, 1 if this call toggled else 0, Redis time}.
local now = redis_now()
local gen, start, toggled = seal(KEYS[1], now, tonumber(ARGV[1]))
return {gen, start, toggled, now}
