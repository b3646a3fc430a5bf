-- Count pulses into the shard's current generation, exactly once and exactly (invariants 1, 2,
-- 11). KEYS: every key the script touches that is known before it runs (see Store::write):
-- generation keys, both generations' hashes, the pending set, the commit token (KEYS[9]),
-- then one dedupe marker per pulse id. ARGV[1] shard base, e.g. "{pulses:7}", ARGV[2] window length (s), ARGV[3] dedupe
-- TTL (s), ARGV[4..] quintuples: field, lo, hi (decimal limb strings, lo < LIMB), marker
-- index into KEYS ("0" when the pulse has no id), tenant placement hash (the marker's value).
-- Returns "<window start>:<flags>" with one flag per quintuple: 1 counted, 0 duplicate.
--
-- Reading the generation and incrementing into it happen here, in one script, so a toggle can
-- never interleave with an increment; the dedupe marker is set in the same script as the
-- increment, so a pulse is never claimed without being counted. A total that could leave the
-- exact range is refused before anything of the commit is written.
local done = redis.call('GET', KEYS[9])
if done then
  -- This commit already ran (its reply was lost and the client library sent it again).
  return done
end
local base = ARGV[1]
local ns = base .. ':x'
local gen, start = seal(base, ns, true, redis_now(), tonumber(ARGV[2]))
local agg = ns .. ':agg:' .. gen
local hiagg = agg .. ':hi'
local ttl = ARGV[3]
-- Overflow guard: only pulses of LIMB units or more carry a hi part; smaller ones add at most
-- one carry each, and 2^62 carries cannot happen within a window.
local his = nil
for i = 4, #ARGV, 5 do
  if ARGV[i + 2] ~= '0' then
    his = his or {}
    his[ARGV[i]] = (his[ARGV[i]] or 0) + tonumber(ARGV[i + 2]) + 1
  end
end
if his then
  for f, inc in pairs(his) do
    local cur = tonumber(redis.call('HGET', hiagg, f) or '0')
    if cur + inc >= 4611686018427387904 then
      return redis.error_reply('OVERFLOW a key total would leave the exact range')
    end
  end
end
local flags = {}
for i = 4, #ARGV, 5 do
  local m = tonumber(ARGV[i + 3])
  if m == 0 or redis.call('SET', KEYS[m], ARGV[i + 4], 'NX', 'EX', ttl) then
    add(agg, hiagg, ARGV[i], ARGV[i + 1], ARGV[i + 2])
    flags[#flags + 1] = '1'
  else
    flags[#flags + 1] = '0'
  end
end
local reply = start .. ':' .. table.concat(flags)
redis.call('SET', KEYS[9], reply, 'EX', 600)
return reply
