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
-- Lua sees a total as a double, whose step near 4 × 10^18 is 512: a total up to 256 below 4 ×
-- 10^18 reads as 4 × 10^18, and carrying then would leave a negative lo (an adversarial review's
-- finding: such a record was unreadable, so dead-lettered). The carry starts 1,024 above it,
-- where every total that reads as past the threshold is.
local CARRY_AT = 4e18 + 1024
local CARRY_LO = '-4000000000000000000'
local CARRY_HI = '4000'

-- 10^n for n digits: a total with more digits than an increment cannot equal it.
local POW10 = {}
for n = 1, 18 do POW10[n] = 10 ^ n end

-- Adds an exact amount, given as decimal limb strings, to one field of (lohash, hihash).
-- Returns true when the field may be new (its lo equals this increment). The digit count is
-- compared first: a total that has grown past the increment's digits (the usual case) is told
-- apart without turning the text into a number (`tonumber` costs Redis two strtod calls, ~9 %
-- of a single pulse).
-- Moves 4 × 10^18 of a field's lo into its hi (see above).
local function carry(lohash, hihash, field)
  redis.call('HINCRBY', lohash, field, CARRY_LO)
  redis.call('HINCRBY', hihash, field, CARRY_HI)
end

local function add(lohash, hihash, field, lo, hi)
  local v = redis.call('HINCRBY', lohash, field, lo)
  local p = POW10[#lo]
  local fresh = (not p or v < p) and v == lo + 0
  if v >= CARRY_AT then
    carry(lohash, hihash, field)
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

-- `add` and `index` for a run of plain items — (field, lo) pairs of `args[from..to]`, no high
-- limb — in one loop: the write path's common case, without a Lua call per pulse around its
-- `HINCRBY` (~5 % of a pulse of a 1,000-pulse batch).
local function add_plain(args, from, to, lohash, hihash, base, start, len)
  local rcall = redis.call
  for k = from, to, 2 do
    local f, lo = args[k], args[k + 1]
    local v = rcall('HINCRBY', lohash, f, lo)
    if v >= CARRY_AT then
      carry(lohash, hihash, f)
    end
    local p = POW10[#lo]
    if (not p or v < p) and v == lo + 0 then
      index(base, start, f, len)
    end
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

-- (hi1, lo1) > (hi2, lo2) for canonical decimal limb strings (lo < 10^15): exact, no doubles.
local function greater(hi1, lo1, hi2, lo2)
  if #hi1 ~= #hi2 then return #hi1 > #hi2 end
  if hi1 ~= hi2 then return hi1 > hi2 end
  if #lo1 ~= #lo2 then return #lo1 > #lo2 end
  return lo1 > lo2
end

-- Sets one field of (h, h:hi) to an exact amount.
local function put(h, f, lo, hi)
  redis.call('HSET', h, f, lo)
  if hi ~= '0' then
    redis.call('HSET', key.hi(h), f, hi)
  else
    redis.call('HDEL', key.hi(h), f)
  end
end

-- A field's aggregation, from its fourth element (meters.rs): sum when it has none. Decoded,
-- not matched: a key whose unit is "max" ends like a max meter's field.
local function aggregation_of(f)
  local ok, v = pcall(cjson.decode, f)
  if ok and type(v) == 'table' and #v == 4 then
    return v[4]
  end
  return 'sum'
end

-- Combines one record's value (lo, hi limb strings; ts, a `latest` meter's event time in ms or
-- nil) into field f of hash h by its aggregation `agg` (sum, count, max, min, latest;
-- invariant 18): sums and counts add, a max or min keeps the larger or smaller, a latest keeps
-- the later event time (a tie: the value combined last, which arrived later). The write
-- script's meters, a seal's merge and a replay all go through here, so a max is never added.
local function combine(h, f, agg, lo, hi, ts)
  if agg == 'sum' or agg == 'count' then
    add(h, key.hi(h), f, lo, hi)
    return
  end
  local cl = redis.call('HGET', h, f)
  if agg == 'latest' then
    local ct = tonumber(redis.call('HGET', key.ts(h), f))
    if not cl or not ct or (ts and tonumber(ts) >= ct) then
      put(h, f, lo, hi)
      if ts then redis.call('HSET', key.ts(h), f, string.format('%d', tonumber(ts))) end
    end
    return
  end
  local better = true
  if cl then
    local ch = redis.call('HGET', key.hi(h), f) or '0'
    if agg == 'max' then better = greater(hi, lo, ch, cl) else better = greater(ch, cl, hi, lo) end
  end
  if better then put(h, f, lo, hi) end
end

-- Combines every record of hash `from` (both limbs, and a latest meter's time) into `into` by
-- its aggregation, then deletes `from`.
local function merge_exact(from, into)
  local kv = redis.call('HGETALL', from)
  for i = 1, #kv, 2 do
    local f = kv[i]
    local hi = redis.call('HGET', key.hi(from), f) or '0'
    local ts = redis.call('HGET', key.ts(from), f)
    combine(into, f, aggregation_of(f), kv[i + 1], hi, ts)
  end
  redis.call('DEL', from, key.hi(from), key.ts(from))
end

-- Records the current window, in the conf hash and the plain keys.
local function keep(base, c, g, s, l)
  redis.call('SET', key.gen(base), g)
  redis.call('SET', key.window(base), s)
  redis.call('SET', key.window_len(base), l)
  redis.call('HSET', c.key, 'gen', g, 'start', s, 'len', l)
end

-- Windows decided ahead (a pulse stamped ahead was placed in them) are in the window history;
-- the release before listed them only in `futures`: adds any such (a handful of members).
local function history_of_futures(base)
  for _, m in ipairs(redis.call('ZRANGE', key.futures(base), 0, -1)) do
    local fs, fe = string.match(m, '^(%d+):(%d+)$')
    if fs then
      redis.call('ZADD', key.wins(base), 'NX', fs, fs .. ':' .. (tonumber(fe) - tonumber(fs)))
    end
  end
end

-- The window that holds Redis second `t` (at or after `lo`, the end of the window written
-- now) as it is or will be opened: the window already decided there — a pulse stamped ahead
-- was placed in it, and it was recorded in the history (`wins`) then — or the window of length
-- `len` aligned to `off`, starting no earlier than `lo` or the end of the decided window before
-- it and ending no later than the start of the one after. So windows never overlap, no two
-- share a start (a record id names one window, invariant 18), and a pulse's window always holds
-- its time, whatever WINDOW was when it was placed (invariant 3). Returns start, end, and
-- whether it was decided already.
local function decided(base, t, lo, len, off)
  local wins = key.wins(base)
  local before = redis.call('ZREVRANGEBYSCORE', wins, t, '-inf', 'LIMIT', 0, 1)[1]
  if before then
    local s, wl = string.match(before, '^(%d+):(%d+)$')
    s, wl = tonumber(s), tonumber(wl)
    if t < s + wl then
      return s, s + wl, true
    end
    if s + wl > lo then
      lo = s + wl
    end
  end
  local ws = align(t, len, off)
  local we = ws + len
  if ws < lo then
    ws = lo
  end
  local after = redis.call('ZRANGEBYSCORE', wins, '(' .. t, '(' .. we, 'LIMIT', 0, 1)[1]
  if after then
    we = tonumber(string.match(after, '^(%d+):'))
  end
  return ws, we, false
end

-- seal(base, now, c) brings the shard's generation up to date with Redis
-- time: if the current generation's window has ended — at its start plus the length it was
-- opened with, whatever WINDOW says now — the generation flips, the old hash is renamed to
-- `<ns>:sealed:<start>` and the window is added to `<base>:pending` as `<start>:<end>`.
-- The next window is the one decided there (see `decided`): aligned to `window_len`; after a
-- change of WINDOW, a shorter window fills the gap up to the first aligned boundary; a window
-- a pulse stamped ahead was placed in is opened as it was placed. So every window's label
-- holds the time of every pulse counted in it. Idempotent: for a given window only the first caller toggles.
-- Returns gen, start, toggled, end.
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
  local wins = key.wins(base)
  history_of_futures(base)
  local next_start, next_stop = decided(base, now, stop, window_len, offset)
  local next_len = next_stop - next_start
  keep(base, c, gen, next_start, next_len)
  -- The window history (for placing event-stamped pulses), kept as long as a late pulse
  -- may need it.
  redis.call('ZADD', wins, next_start, next_start .. ':' .. next_len)
  redis.call('ZREMRANGEBYSCORE', wins, '-inf', '(' .. (now - HISTORY_KEEP))
  -- Pulses stamped ahead of their window wait in `:future:<start>` hashes: the one for the
  -- window opening now becomes its generation (the seal opens the window they were placed
  -- in); one whose window was skipped (no write came while it ran) is sealed as it was
  -- placed — its own window, which holds its pulses' times.
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
      -- Skipped: combined by aggregation (merge_exact), should a late pulse have reached it.
      merge_exact(fhash, key.sealed(base, fs))
      redis.call('ZADD', key.pending(base), fs, key.member(fs, fe))
    end
    redis.call('ZREM', key.futures(base), m)
  end
  return gen, next_start, 1, next_start + next_len
end

-- window_at(base, t, len, off): the window [start, end) that holds Redis second t, from the
-- shard's window history, and whether it is recorded there: `decided` with no floor — the
-- recorded window containing t, or, in a stretch with no recorded window (no write came, or
-- before the shard's first), the window of length `len` aligned to `off`, clipped to its
-- recorded neighbours. A caller that writes into a window not yet recorded records it
-- (write.lua `placed`), so every later pulse of that time finds the same window, whatever
-- WINDOW or WINDOW_OFFSET are by then: a start never gets two ends.
local function window_at(base, t, len, off)
  return decided(base, t, 0, len, off)
end

local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1])
end
