-- Apply a replica's explicit settings to one shard's recorded ones (`conf` in seal_lib.lua).
-- KEYS[1] the shard's conf hash. ARGV[1] window length ('' when not set explicitly), ARGV[2]
-- dedupe TTL (same), ARGV[3] and ARGV[4] the values to record if none are, ARGV[5] SHARDS,
-- ARGV[6] window offset ('' when not set explicitly), ARGV[7] the offset to record if none is,
-- then as pairs (explicit value or '', value to record if none is): ARGV[8], ARGV[9]
-- LATE_MAX_AGE (s); ARGV[10], ARGV[11] LATE_PULSES; ARGV[12], ARGV[13] MAX_FUTURE_SKEW (s).
-- A new window length applies from the next window (the seal opens it). A new dedupe TTL keeps
-- the previous one consulted until its markers have expired (twice its length); a second
-- change before then (other than back to the previous value) is refused: TTLCHANGING.
-- A new LATE_MAX_AGE applies to windows that end after the change (`late_changed`); the ones
-- that ended before keep the smallest value they had (`late_prev`), so no window reopens after
-- the `final_at` its records carried, and a late pulse for one of them whose drain mark may
-- have been kept for a shorter time amends it rather than joins it (write.lua `place`).
local t = redis.call('TIME')
local now = tonumber(t[1])
local function pick(explicit, default)
  if explicit ~= '' then return explicit end
  return default
end
local c = redis.call('HMGET', KEYS[1], 'window', 'ttl', 'prev_ttl', 'prev_until', 'late_max',
  'late_prev', 'late_mode', 'skew', 'ttl_floor', 'skew_max')
if not c[1] then
  redis.call('HSET', KEYS[1], 'window', pick(ARGV[1], ARGV[3]), 'ttl', pick(ARGV[2], ARGV[4]),
    'shards', ARGV[5], 'offset', pick(ARGV[6], ARGV[7]), 'since', now,
    'late_max', pick(ARGV[8], ARGV[9]), 'late_mode', pick(ARGV[10], ARGV[11]),
    'skew', pick(ARGV[12], ARGV[13]), 'skew_max', pick(ARGV[12], ARGV[13]))
  return 'recorded'
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'offset', ARGV[6])
end
if ARGV[1] ~= '' and tonumber(c[1]) ~= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'window', ARGV[1])
end
local late_max = tonumber(c[5])
if not late_max then
  -- A shard recorded by a release that kept LATE_MAX_AGE per replica: marks may have been
  -- kept for any replica's value, so windows that ended before now count as changed.
  local v = pick(ARGV[8], ARGV[9])
  redis.call('HSET', KEYS[1], 'late_max', v, 'late_prev', v, 'late_changed', now)
elseif ARGV[8] ~= '' and tonumber(ARGV[8]) ~= late_max then
  local prev = math.min(late_max, tonumber(c[6]) or late_max)
  redis.call('HSET', KEYS[1], 'late_max', ARGV[8], 'late_prev', prev, 'late_changed', now)
end
if not c[7] or ARGV[10] ~= '' then
  redis.call('HSET', KEYS[1], 'late_mode', pick(ARGV[10], ARGV[11]))
end
if not c[8] or ARGV[12] ~= '' then
  -- `skew_max`, the largest MAX_FUTURE_SKEW ever recorded, is what the write script holds a
  -- stamped pulse with an id to: it may have first arrived that far before its time.
  local skew = pick(ARGV[12], ARGV[13])
  local most = math.max(tonumber(skew), tonumber(c[10]) or 0, tonumber(c[8]) or 0)
  redis.call('HSET', KEYS[1], 'skew', skew, 'skew_max', most)
end
local ttl = tonumber(c[2])
local new = tonumber(ARGV[2])
if new and ttl and new ~= ttl then
  local prev_ttl, prev_until = tonumber(c[3]) or 0, tonumber(c[4]) or 0
  if prev_until > now and prev_ttl ~= new then
    return redis.error_reply('TTLCHANGING ' .. prev_ttl .. ' ' .. prev_until .. ' ' .. ttl)
  end
  -- Pulses with ids that may have first arrived before now are held to the smallest TTL they
  -- had (write.lua `too_old_for_its_id`): their markers may be kept no longer than that.
  local floor = math.min(ttl, tonumber(c[9]) or ttl)
  redis.call('HSET', KEYS[1], 'ttl', new, 'prev_ttl', ttl, 'prev_until', now + 2 * ttl,
    'ttl_changed', now, 'ttl_floor', floor)
end
return 'ok'
