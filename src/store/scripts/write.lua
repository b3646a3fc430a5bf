-- Count pulses into the shard's current generation, exactly once.
-- KEYS[1]  shard base, e.g. "{pulses:7}" (every key below shares its hash tag)
-- ARGV[1]  window length in seconds
-- ARGV[2]  dedupe TTL in seconds
-- ARGV[3..] triples: field, amount, dedupe digest ("" when the pulse has no id)
-- Returns "<window start>:<flags>" with one flag per triple: 1 counted, 0 duplicate.
--
-- Reading the generation and incrementing into it happen here, in one script, so a toggle can
-- never interleave with an increment; the dedupe marker is set in the same script as the
-- increment, so a pulse is never claimed without being counted.
local base = KEYS[1]
local gen, start = seal(base, redis_now(), tonumber(ARGV[1]))
local agg = base .. ':agg:' .. gen
local ttl = ARGV[2]
local flags = {}
for i = 3, #ARGV, 3 do
  local digest = ARGV[i + 2]
  if digest == '' or redis.call('SET', base .. ':seen:' .. digest, start, 'NX', 'EX', ttl) then
    redis.call('HINCRBYFLOAT', agg, ARGV[i], ARGV[i + 1])
    flags[#flags + 1] = '1'
  else
    flags[#flags + 1] = '0'
  end
end
return start .. ':' .. table.concat(flags)
