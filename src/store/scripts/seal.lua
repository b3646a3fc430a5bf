-- Seal the shard if its window has ended (the scheduler's toggle), in both layouts.
-- KEYS: the shard's generation keys (see Store::seal); KEYS[1] is `<base>:x:gen`.
-- ARGV[1] shard base, ARGV[2] window length in seconds.
-- Returns {generation, window start, 1 if this call toggled else 0, Redis time (s), its µs}.
local t = redis.call('TIME')
local now = tonumber(t[1])
local base = ARGV[1]
local len = tonumber(ARGV[2])
seal(base, base, false, now, len)
local gen, start, toggled = seal(base, base .. ':x', true, now, len)
return {gen, start, toggled, now, tonumber(t[2])}
