-- Shared by every script that may toggle a generation (prepended with include_str!).
--
-- The exact layout (key names: keys_lib.lua, prepended before this; the float layout it
-- replaced is refused at start, see Store::float_layout_left): amounts as two integer limbs
-- per key — `<hash>` holds lo and
-- `<hash>:hi` multiples of 10^15 (see add below), both added with HINCRBY, so sums are exact
-- (invariant 11). Pending members "<s>:<e>:x".

-- A total is hi × 10^15 + lo units of 10^-12. Redis adds both limbs exactly (int64 HINCRBY);
-- Lua only compares lo with a threshold, so the double it sees need not be exact. An increment's
-- lo is below 10^15; once lo reaches 4 × 10^18 (4,000,000 whole units), 4 × 10^18 moves into hi
-- (+4,000), so lo never nears int64's 9.2 × 10^18 — and a key carries once per 4 million units,
-- not on every few pulses.
local CARRY_AT = 4e18
local CARRY_LO = '-4000000000000000000'
local CARRY_HI = '4000'

-- Adds an exact amount, given as decimal limb strings, to one field of (lohash, hihash).
-- Returns true when the field may be new (its lo equals this increment).
local function add(lohash, hihash, field, lo, hi)
  local v = redis.call('HINCRBY', lohash, field, lo)
  local fresh = v == tonumber(lo)
  if v >= CARRY_AT then
    redis.call('HINCRBY', lohash, field, CARRY_LO)
    redis.call('HINCRBY', hihash, field, CARRY_HI)
  end
  if hi ~= '0' then
    redis.call('HINCRBY', hihash, field, hi)
  end
  return fresh
end

-- The usage index: per shard, window and tenant, the set of a tenant's fields, so that "what has
-- tenant T used" reads T's keys only (GET /v1/usage), whatever the other tenants hold, in every
-- state of the window. A field joins when it is first counted in the window; the window's
-- tenants are listed in `:x:idxt:<start>`, so that the index goes as a whole when the window is
-- delivered and holds no dead letters (finish_window.lua, set_aside.lua) — nothing of it stays
-- behind for data already delivered.
local start_text = {}
local function index(base, start, field, len)
  -- A tenant without quote or backslash is its JSON text (serde_json writes other characters
  -- as they are): no decoding needed.
  local tenant = string.match(field, '^%["([^"\\]*)",')
  if not tenant then
    tenant = cjson.decode(field)[1]
  end
  local s = start_text[start]
  if not s then
    s = string.format('%d', start)
    start_text[start] = s
  end
  if redis.call('SADD', key.idx(base, s, tenant), field) == 1 then
    redis.call('SADD', key.idxt(base, s), tenant)
  end
end

-- The shard's settings, agreed through Redis (`<base>:x:conf`): `window`, the length of the
-- next window; `ttl`, the dedupe bucket length, with `prev_ttl` consulted until `prev_until`
-- after a change; `shards`, the deployment's count (a writer with another count must not
-- write: its pulse ids would be looked up in other shards). Recorded from the first caller's
-- values; changed only by `settings.lua` (at a replica's start with an explicit setting) and
-- `reshard`; `since`, when the shard first recorded settings: windows that ended before it
-- may have been delivered without a drain mark, so a late pulse for one goes to an amendment,
-- never into a window whose record id the Processor already holds. Every replica writes by
-- these, whatever its own configuration says.
-- How long the window history is kept: longer than LATE_MAX_AGE may be (60 days).
local HISTORY_KEEP = 61 * 86400

-- `window` is "<length>:<offset>" (seconds): windows start at offset + k × length. The same
-- hash holds the exact layout's generation state — `gen`, `start`, `len` of the current window
-- — so that one HMGET per shard is all a commit reads before it writes (the plain keys
-- `:x:gen`, `:x:window`, `:x:window_len` are kept in step for readers, and are read only by a
-- shard whose hash predates this).
local function conf(base, window, ttl, shards)
  local ck = key.conf(base)
  local c = redis.call('HMGET', ck, 'window', 'ttl', 'prev_ttl', 'prev_until', 'shards', 'since',
    'offset', 'gen', 'start', 'len')
  if not c[1] then
    local len, off = string.match(window, '^(%d+):?(%d*)$')
    off = tonumber(off) or 0
    local now = redis.call('TIME')[1]
    redis.call('HSET', ck, 'window', len, 'offset', off, 'ttl', ttl, 'shards', shards,
      'since', now)
    return {key = ck, window = tonumber(len), offset = off, ttl = tonumber(ttl), prev_ttl = 0,
      prev_until = 0, shards = tonumber(shards), since = tonumber(now)}
  end
  return {key = ck, window = tonumber(c[1]), offset = tonumber(c[7]) or 0,
    ttl = tonumber(c[2]) or tonumber(ttl), prev_ttl = tonumber(c[3]) or 0,
    prev_until = tonumber(c[4]) or 0, shards = tonumber(c[5]) or tonumber(shards),
    since = tonumber(c[6]) or 0, gen = c[8] or nil, start = tonumber(c[9]),
    len = tonumber(c[10])}
end

-- The start of the window of length `len` (starting at `off` + k × len) that holds `t`.
local function align(t, len, off)
  return t - ((t - off) % len)
end

-- seal(base, now, c) brings the shard's generation up to date with Redis
-- time: if the current generation's window has ended — at its start plus the length it was
-- opened with, whatever WINDOW says now — the generation flips, the old hash is renamed to
-- `<ns>:sealed:<start>` and the window is added to `<base>:pending` as `<start>:<end>`.
-- The next window is aligned to `window_len`; after a change of WINDOW, a shorter window fills
-- the gap up to the first aligned boundary, so every window's label holds the time of every
-- pulse counted in it. Idempotent: for a given window only the first caller toggles.
-- Returns gen, start, toggled, end.
-- Adds every total of exact hash `from` (both limbs) into `into`, exactly, and deletes `from`.
local function merge_exact(from, into)
  local kv = redis.call('HGETALL', from)
  for i = 1, #kv, 2 do
    add(into, key.hi(into), kv[i], kv[i + 1], '0')
  end
  local kh = redis.call('HGETALL', key.hi(from))
  for i = 1, #kh, 2 do
    redis.call('HINCRBY', key.hi(into), kh[i], kh[i + 1])
  end
  redis.call('DEL', from, key.hi(from))
end

-- Records the current window, in the conf hash and the plain keys.
local function keep(base, c, g, s, l)
  redis.call('SET', key.gen(base), g)
  redis.call('SET', key.window(base), s)
  redis.call('SET', key.window_len(base), l)
  redis.call('HSET', c.key, 'gen', g, 'start', s, 'len', l)
end

-- `c` is the shard's `conf`, which holds its generation state.
local function seal(base, now, c)
  local window_len, offset = c.window, c.offset
  local gen, start, len
  if c.gen and c.start and c.len then
    gen, start, len = c.gen, c.start, c.len
  else
    gen = redis.call('GET', key.gen(base))
    start = tonumber(redis.call('GET', key.window(base)))
  end
  if not gen or not start then
    local current = align(now, window_len, offset)
    gen = gen or 'A'
    keep(base, c, gen, current, window_len)
    redis.call('ZADD', key.wins(base), current, current .. ':' .. window_len)
    return gen, current, 0, current + window_len
  end
  len = len or tonumber(redis.call('GET', key.window_len(base))) or window_len
  local stop = start + len
  if now < stop then
    -- Same window (or Redis time went back after a failover): keep writing where we are.
    return gen, start, 0, stop
  end
  local old = key.agg(base, gen)
  local sealed = key.sealed(base, start)
  if redis.call('EXISTS', old) == 1 then
    if redis.call('EXISTS', sealed) == 0 then
      redis.call('RENAME', old, sealed)
      for _, suffix in ipairs({':hi', ':ts'}) do
        if redis.call('EXISTS', old .. suffix) == 1 then
          redis.call('RENAME', old .. suffix, sealed .. suffix)
        end
      end
    else
      -- Cannot happen while windows only move forward; merged rather than overwritten, so
      -- nothing is lost if it ever does — and merged exactly: both are one record id at the
      -- Processor, which would keep only one of two deliveries.
      merge_exact(old, sealed)
    end
    -- The member carries the window's end, so a later change of WINDOW cannot mislabel it.
    redis.call('ZADD', key.pending(base), start, key.member(start, stop))
  else
    -- A hi (or ts) hash never exists without its lo hash; drop a stray one rather than let
    -- it leak into a later window.
    redis.call('DEL', key.hi(old), key.ts(old))
  end
  if gen == 'A' then gen = 'B' else gen = 'A' end
  local aligned = align(now, window_len, offset)
  local next_start, next_len = aligned, window_len
  if aligned < stop then
    -- WINDOW changed: the window up to the first boundary of the new length.
    next_start, next_len = stop, aligned + window_len - stop
  end
  keep(base, c, gen, next_start, next_len)
  -- The window history (for placing event-stamped pulses), kept as long as a late pulse
  -- may need it.
  redis.call('ZADD', key.wins(base), next_start, next_start .. ':' .. next_len)
  redis.call('ZREMRANGEBYSCORE', key.wins(base), '-inf', '(' .. (now - HISTORY_KEEP))
  -- Pulses stamped ahead of their window wait in `:future:<start>` hashes: the one for the
  -- window opening now becomes its generation; one whose window was skipped (no write came
  -- while it ran) or that no longer fits the windows (WINDOW changed) is sealed as it was
  -- placed — its label holds its pulses' times either way.
  local futures = redis.call('ZRANGEBYSCORE', key.futures(base), '-inf', '(' .. (next_start + next_len))
  for _, m in ipairs(futures) do
    local fs, fe = string.match(m, '^(%d+):(%d+)$')
    local fhash = key.future(base, fs)
    if redis.call('EXISTS', fhash) == 0 then
      -- nothing was written there
      redis.call('DEL', key.hi(fhash))
    elseif tonumber(fs) == next_start and tonumber(fe) == next_start + next_len then
      redis.call('RENAME', fhash, key.agg(base, gen))
      for _, suffix in ipairs({':hi', ':ts'}) do
        if redis.call('EXISTS', fhash .. suffix) == 1 then
          redis.call('RENAME', fhash .. suffix, key.agg(base, gen) .. suffix)
        end
      end
    else
      merge_exact(fhash, key.sealed(base, fs))
      redis.call('ZADD', key.pending(base), fs, key.member(fs, fe))
    end
    redis.call('ZREM', key.futures(base), m)
  end
  return gen, next_start, 1, next_start + next_len
end

-- window_at(base, t, len, off): the window [start, end) that holds Redis second t, from the shard's
-- window history: the recorded window containing t, or — in a stretch with no recorded window
-- (no write came) — the window of the length then in force aligned like the seal aligns,
-- clipped to its recorded neighbours.
local function window_at(base, t, len, off)
  local before = redis.call('ZREVRANGEBYSCORE', key.wins(base), t, '-inf', 'LIMIT', 0, 1)[1]
  local lo, l = nil, len
  if before then
    local s, wl = string.match(before, '^(%d+):(%d+)$')
    s, wl = tonumber(s), tonumber(wl)
    if t < s + wl then
      return s, s + wl
    end
    lo, l = s + wl, wl
  end
  local ws = align(t, l, off)
  local we = ws + l
  if lo and ws < lo then
    ws = lo
  end
  local after = redis.call('ZRANGEBYSCORE', key.wins(base), '(' .. t, '+inf', 'LIMIT', 0, 1)[1]
  if after then
    local s = tonumber(string.match(after, '^(%d+):'))
    if s < we then
      we = s
    end
  end
  return ws, we
end

local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1])
end
