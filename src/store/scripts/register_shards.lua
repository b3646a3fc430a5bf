-- Record this replica's shard count in the deployment's meta hash.
-- KEYS[1] meta hash. ARGV[1] SHARDS. Returns {largest count ever used, the deployment's count}.
-- The first replica of a deployment sets `shards`; later ones must match it (see
-- `pulse-ingestor reshard` for changing it). A fresh deployment (nothing recorded) also records
-- that no marker of an earlier layout exists (`marker_sets_since`, `marker_sets_until` 0).
local m = tonumber(redis.call('HGET', KEYS[1], 'shards_max')) or 0
local n = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'shards'))
if not current then
  redis.call('HSET', KEYS[1], 'shards', n)
  current = n
  if m == 0 then
    -- A fresh deployment: no previous marker layout to consult, ever.
    redis.call('HSETNX', KEYS[1], 'marker_sets_since', 0)
    redis.call('HSETNX', KEYS[1], 'marker_sets_until', 0)
  end
end
if n > m then
  redis.call('HSET', KEYS[1], 'shards_max', n)
  m = n
end
return {m, current}
