-- Move dead-lettered records back into their sealed window for another delivery. Runs under
-- the shard's drain lock, so no drain can finish the window in between.
-- KEYS[1] dead-letter hash, KEYS[2] sealed hash, KEYS[3] its hi hash, KEYS[4] pending set,
-- KEYS[5] dead-letter index. ARGV[1] window member, ARGV[2] window start, ARGV[3] "1" for the
-- exact layout. Returns records moved.
local kv = redis.call('HGETALL', KEYS[1])
local moved = 0
for i = 1, #kv, 2 do
  local d = cjson.decode(kv[i + 1])
  if ARGV[3] == '1' then
    add(KEYS[2], KEYS[3], kv[i], d['lo'], d['hi'])
  else
    redis.call('HINCRBYFLOAT', KEYS[2], kv[i], d['amount'])
  end
  moved = moved + 1
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if moved > 0 then
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
end
return moved
