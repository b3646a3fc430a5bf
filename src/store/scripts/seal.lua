-- Seal the shard if its window has ended (the scheduler's toggle).
-- KEYS: the shard's generation keys (see Store::seal); KEYS[1] is `<base>:x:gen`.
-- ARGV[1] shard base, ARGV[2] window length and offset ("<s>:<s>"), ARGV[3] dedupe TTL, ARGV[4] SHARDS
-- (recorded in the shard's settings if none are yet; the recorded window length wins).
-- Returns {generation, window start, 1 if this call toggled else 0, Redis time (s), its µs,
-- the current window's end}.
local t = redis.call('TIME')
local now = tonumber(t[1])
local base = ARGV[1]
local c = conf(base, ARGV[2], ARGV[3], ARGV[4])
local gen, start, toggled, stop = seal(base, now, c)
return {gen, start, toggled, now, tonumber(t[2]), stop}
