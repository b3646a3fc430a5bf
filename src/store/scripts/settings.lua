-- Apply a replica's explicit settings to one shard's recorded ones (`conf` in seal_lib.lua).
-- KEYS[1] the shard's conf hash. ARGV[1] window length ('' when not set explicitly), ARGV[2]
-- dedupe TTL (same), ARGV[3] and ARGV[4] the values to record if none are, ARGV[5] SHARDS,
-- ARGV[6] window offset ('' when not set explicitly), ARGV[7] the offset to record if none is.
-- A new window length applies from the next window (the seal opens it). A new dedupe TTL keeps
-- the previous one consulted until its markers have expired (twice its length); a second
-- change before then (other than back to the previous value) is refused: TTLCHANGING.
local t = redis.call('TIME')
local now = tonumber(t[1])
local c = redis.call('HMGET', KEYS[1], 'window', 'ttl', 'prev_ttl', 'prev_until')
if not c[1] then
  redis.call('HSET', KEYS[1], 'window', ARGV[1] ~= '' and ARGV[1] or ARGV[3],
    'ttl', ARGV[2] ~= '' and ARGV[2] or ARGV[4], 'shards', ARGV[5],
    'offset', ARGV[6] ~= '' and ARGV[6] or ARGV[7], 'since', now)
  return 'recorded'
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'offset', ARGV[6])
end
if ARGV[1] ~= '' and tonumber(c[1]) ~= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'window', ARGV[1])
end
local ttl = tonumber(c[2])
local new = tonumber(ARGV[2])
if new and ttl and new ~= ttl then
  local prev_ttl, prev_until = tonumber(c[3]) or 0, tonumber(c[4]) or 0
  if prev_until > now and prev_ttl ~= new then
    return redis.error_reply('TTLCHANGING ' .. prev_ttl .. ' ' .. prev_until .. ' ' .. ttl)
  end
  redis.call('HSET', KEYS[1], 'ttl', new, 'prev_ttl', ttl, 'prev_until', now + 2 * ttl)
end
return 'ok'
