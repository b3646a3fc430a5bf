-- Count pulses into their shards' current generations, exactly once and exactly (invariants 1,
-- 2, 11). One call carries a whole commit: every shard of it on one Redis, or one shard (one
-- slot) on a cluster node.
-- KEYS[1] the commit's token; on a cluster, also the shard's generation keys (declared so the
-- cluster routes and migrates them correctly; see Store::write_many).
-- ARGV[1] window length (s), ARGV[2] dedupe TTL (s), ARGV[3] Redis time (s) until which
-- markers of the previous layout (one string key per id) are still consulted (0: none, and
-- items carry no previous-layout digest), ARGV[4] number of shard sections, ARGV[5] how long
-- the commit's token is kept (s), ARGV[6] the writer's SHARDS; then per section:
-- shard base (e.g. "{pulses:7}"), count of items without id, count with id; the items without
-- id as (field, lo, hi); the items with id as (field, lo, hi, marker[, previous-layout hex
-- digest]). lo and hi are decimal limb strings (lo < 10^15); a marker is 12 bytes of digest
-- and 2 of tenant placement.
-- Returns "<window start>:<flags>" per section, joined by ";": one flag per item with id, in
-- order: 1 counted, 0 duplicate (items without id are always counted). Or, when a key's total
-- would leave the exact range, the array {"OVERFLOW", field...} and nothing written. A writer
-- whose SHARDS is not the shard's recorded count gets the error SHARDSCHANGED, nothing counted.
-- Window length and dedupe TTL are the shard's recorded settings (`conf` in seal_lib.lua);
-- ARGV[1] and ARGV[2] only initialise them.
--
-- Reading the generation and incrementing into it happen here, in one script, so a toggle can
-- never interleave with an increment; the dedupe marker is set in the same script as the
-- increment, so a pulse is never claimed without being counted. A total that could leave the
-- exact range is refused before anything of the commit is written; the caller drops the
-- requests that carry that key and calls again. A re-sent call (a client
-- library's retry after a lost reply) finds its token and answers the first reply again.
--
-- Dedupe markers are members of per-shard sets, one set per DEDUPE_TTL bucket of Redis time,
-- expiring as a whole two buckets later: an id is looked up in the current and the previous
-- bucket, so it is remembered for at least DEDUPE_TTL (at most twice that), at ~60 bytes per
-- id instead of a key of its own.
local done = redis.call('GET', KEYS[1])
if done then
  return done
end
local now = redis_now()
local shards = tonumber(ARGV[6])
local legacy_until = tonumber(ARGV[3])
local legacy = now < legacy_until
local id_stride = 4
if legacy_until > 0 then
  id_stride = 5
end
local sections = {}
local full = {}
local i = 7
for s = 1, tonumber(ARGV[4]) do
  local base = ARGV[i]
  local plain = tonumber(ARGV[i + 1])
  local ids = tonumber(ARGV[i + 2])
  i = i + 3
  local c = conf(base, ARGV[1], ARGV[2], ARGV[6])
  if c.shards ~= shards then
    return redis.error_reply('SHARDSCHANGED ' .. c.shards)
  end
  local gen, start = seal(base, base .. ':x', true, now, c.window)
  local agg = base .. ':x:agg:' .. gen
  local first_id = i + plain * 3
  local after = first_id + ids * id_stride
  -- Overflow guard: only pulses of 10^15 units (1,000 whole units) or more carry a hi part;
  -- smaller ones add at most one carry (+4,000) each, and 2^62 / 4,000 carries cannot happen
  -- within a window.
  local his = nil
  local k = i
  while k < after do
    if ARGV[k + 2] ~= '0' then
      his = his or {}
      his[ARGV[k]] = (his[ARGV[k]] or 0) + tonumber(ARGV[k + 2]) + 4000
    end
    if k < first_id then k = k + 3 else k = k + id_stride end
  end
  if his then
    for f, inc in pairs(his) do
      local cur = tonumber(redis.call('HGET', agg .. ':hi', f) or '0')
      if cur + inc >= 4611686018427387904 then
        full[#full + 1] = f
      end
    end
  end
  sections[s] = {base, i, first_id, after, agg, start, c}
  i = after
end
-- Keys that would leave the exact range: nothing of the commit is written, and the caller
-- learns which keys they are, so that it refuses only the requests carrying them and commits
-- the rest again (one tenant's full key never costs another tenant's pulses).
if #full > 0 then
  table.insert(full, 1, 'OVERFLOW')
  return full
end
local out = {}
for s = 1, #sections do
  local base, first, first_id, after, agg, start, c = unpack(sections[s])
  local len = c.window
  local hi = agg .. ':hi'
  for k = first, first_id - 1, 3 do
    if add(agg, hi, ARGV[k], ARGV[k + 1], ARGV[k + 2]) then
      index(base, start, ARGV[k], len)
    end
  end
  local flags = {}
  if first_id < after then
    local ttl = c.ttl
    local bucket = math.floor(now / ttl)
    local cur = base .. ':seen:' .. string.format('%d', bucket)
    local prev = base .. ':seen:' .. string.format('%d', bucket - 1)
    -- After a change of DEDUPE_TTL, the previous bucketing's sets are consulted until its
    -- markers have expired.
    local old1, old2 = nil, nil
    if c.prev_until > now and c.prev_ttl > 0 then
      local ob = math.floor(now / c.prev_ttl)
      old1 = base .. ':seen:' .. string.format('%d', ob)
      old2 = base .. ':seen:' .. string.format('%d', ob - 1)
    end
    local added = false
    for k = first_id, after - 1, id_stride do
      local m = ARGV[k + 3]
      local new = true
      if redis.call('SADD', cur, m) == 0 then
        new = false
      else
        added = true
        if redis.call('SISMEMBER', prev, m) == 1 then
          new = false
        elseif old1 and (redis.call('SISMEMBER', old1, m) == 1
            or redis.call('SISMEMBER', old2, m) == 1) then
          new = false
        elseif legacy and redis.call('EXISTS', base .. ':seen:' .. ARGV[k + 4]) == 1 then
          new = false
        end
      end
      if new then
        if add(agg, hi, ARGV[k], ARGV[k + 1], ARGV[k + 2]) then
          index(base, start, ARGV[k], len)
        end
        flags[#flags + 1] = '1'
      else
        flags[#flags + 1] = '0'
      end
    end
    if added then
      redis.call('EXPIREAT', cur, string.format('%d', (bucket + 2) * ttl), 'NX')
    end
  end
  out[s] = string.format('%d', start) .. ':' .. table.concat(flags)
end
local reply = table.concat(out, ';')
redis.call('SET', KEYS[1], reply, 'EX', ARGV[5])
return reply
