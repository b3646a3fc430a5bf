-- Move dead-lettered records back into their sealed window for another delivery.
-- KEYS[1] dead-letter hash, KEYS[2] sealed hash, KEYS[3] pending set, KEYS[4] dead-letter index
-- ARGV[1] window member "<start>:<end>", ARGV[2] window start. Returns records moved.
local kv = redis.call('HGETALL', KEYS[1])
local moved = 0
for i = 1, #kv, 2 do
  local amount = cjson.decode(kv[i + 1])['amount']
  redis.call('HINCRBYFLOAT', KEYS[2], kv[i], amount)
  moved = moved + 1
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if moved > 0 then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
end
return moved
