-- Move dead-lettered records back into their sealed window for another delivery. Runs under
-- the shard's drain lock, so no drain can finish the window in between.
-- KEYS[1] dead-letter hash, KEYS[2] sealed hash, KEYS[3] its hi hash, KEYS[4] pending set,
-- KEYS[5] dead-letter index, KEYS[6] the sealed hash's ts hash. ARGV[1] window member, ARGV[2]
-- window start, ARGV[3] (optional) the one field to move. Each record goes back by its
-- aggregation (`combine`: a max is never added) with a latest meter's event time, so it is
-- delivered as it was refused. Returns records moved.
local kv
if ARGV[3] then
  -- One record only.
  local v = redis.call('HGET', KEYS[1], ARGV[3])
  kv = v and {ARGV[3], v} or {}
else
  kv = redis.call('HGETALL', KEYS[1])
end
local moved = 0
for i = 1, #kv, 2 do
  local d = cjson.decode(kv[i + 1])
  combine(KEYS[2], kv[i], aggregation_of(kv[i]), d['lo'], d['hi'], d['ts'])
  redis.call('HDEL', KEYS[1], kv[i])
  moved = moved + 1
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[5], ARGV[1])
end
if moved > 0 then
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
end
return moved
