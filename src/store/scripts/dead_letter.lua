-- Move records the Processor rejected from a sealed hash to the window's dead-letter hash.
-- KEYS[1] sealed hash, KEYS[2] its hi hash, KEYS[3] dead-letter hash, KEYS[4] dead-letter index,
-- KEYS[5] the sealed hash's ts hash (a `latest` meter's event times).
-- ARGV[1] reason (JSON text), ARGV[2] window member, ARGV[3] start, ARGV[4..] fields. A
-- dead-letter value is {"lo":"..","hi":"..","reason":..} (and "ts":".." for a latest meter, so
-- a replayed record keeps its `latest_at`): the limbs are copied as Redis holds them, as
-- strings, so nothing is rounded on the way. Returns records moved.
local moved = 0
for i = 4, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local hi = redis.call('HGET', KEYS[2], ARGV[i]) or '0'
    local ts = redis.call('HGET', KEYS[5], ARGV[i])
    local entry = '{"lo":"' .. v .. '","hi":"' .. hi .. '"'
    if ts then
      entry = entry .. ',"ts":"' .. ts .. '"'
    end
    entry = entry .. ',"reason":' .. ARGV[1] .. '}'
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[5], ARGV[i])
    redis.call('HSET', KEYS[3], ARGV[i], entry)
    redis.call('HDEL', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
if moved > 0 then
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
end
return moved
