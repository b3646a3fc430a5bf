-- Move records the Processor rejected from a sealed hash to the window's dead-letter hash.
-- KEYS[1] sealed hash, KEYS[2] dead-letter hash, KEYS[3] dead-letter index (sorted set)
-- ARGV[1] reason (JSON text), ARGV[2] window member "<start>:<end>", ARGV[3] start,
-- ARGV[4..] fields. Each dead-letter value is {"amount":"...","reason":...}; the amount is
-- copied as Redis holds it, so nothing is rounded on the way. Returns records moved.
local moved = 0
for i = 4, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    redis.call('HSET', KEYS[2], ARGV[i], '{"amount":"' .. v .. '","reason":' .. ARGV[1] .. '}')
    redis.call('HDEL', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
if moved > 0 then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
end
return moved
