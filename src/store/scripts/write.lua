-- Count pulses into their windows, exactly once and exactly (invariants 1, 2, 11). One call
-- carries a whole commit: every shard of it on one Redis, or one shard (one slot) on a cluster
-- node.
-- KEYS[1] the commit's token; on a cluster, also the shard's generation keys (declared so the
-- cluster routes and migrates them correctly; see Store::write_many).
-- ARGV[1] window length and offset ("<s>:<s>"), ARGV[2] dedupe TTL (s), ARGV[3] number of
-- shard sections, ARGV[4] how long the commit's token is kept (s), ARGV[5] the writer's
-- SHARDS, ARGV[6] LATE_MAX_AGE (s), ARGV[7] LATE_PULSES ("amend" or "refuse"), ARGV[8] Redis
-- time (s) until which the marker sets of the release before are consulted (0: none),
-- ARGV[9] markers per slot hash (see MARKS_PER_SLOT); then per section:
-- shard base (e.g. "{pulses:7}"), count of items without id whose hi is 0, count of those
-- with a hi, count with id, count stamped; the items without id as (field, lo) and, with a
-- hi, as (field, lo, hi); the items with id as (field, lo, hi, marker); the
-- rich items — stamped or metered — as (field, lo, hi, event time in ms or "", marker or "",
-- aggregations or "" (sum)); aggregations are letters: s sum, c count, x max, n min, l latest (meters.rs). lo and hi are decimal limb strings (lo < 10^15);
-- a marker is 12 bytes of digest and 2 of tenant placement.
-- Returns "<window start>+<its length>:<flags>:<stamped>" per section, joined by ";": one flag per item with
-- id, in order: 1 counted, 0 duplicate (items without id are always counted); per stamped item
-- "<flag><window start>" joined by ",", the flag 1 counted in its window, 0 duplicate, L joined
-- its sealed window before delivery, A counted in an amendment, F counted ahead in a future
-- window. Or, with nothing written: {"OVERFLOW", field...} when a key's total would leave the
-- exact range; {"CLOSED", "<section>:<stamped item>"...} when LATE_PULSES=refuse and a stamped
-- pulse's window is delivered or being delivered. A writer whose SHARDS is not the shard's
-- recorded count gets the error SHARDSCHANGED, nothing counted. Window length and dedupe TTL
-- are the shard's recorded settings (`conf` in seal_lib.lua); ARGV[1] and ARGV[2] only
-- initialise them.
--
-- Reading the generation and incrementing into it happen here, in one script, so a toggle can
-- never interleave with an increment; the dedupe marker is set in the same script as the
-- increment, so a pulse is never claimed without being counted. Placing a stamped pulse and
-- deciding whether its window is still open happen here too, against the mark the drain sets
-- (`:x:late:<start>`, field `drain`) before it first reads a window: a pulse for a window
-- whose drain has not begun joins it; after that it goes to the window's open amendment, a
-- hash sealed and drained like a window (`:x:amend:<start>:<n>`). A re-sent call (a client
-- library's retry after a lost reply) finds its token and answers the first reply again.
--
-- Dedupe markers are fields of small per-shard hashes (see marker_places below): per
-- DEDUPE_TTL bucket of Redis time a fixed number of slots, expiring as a whole two buckets
-- later; an id is looked up in the current and the previous bucket, so it is remembered for
-- at least DEDUPE_TTL (at most twice that).
local done = redis.call('GET', KEYS[1])
if done then
  return done
end
local now = redis_now()
local shards = tonumber(ARGV[5])
-- Shards whose `futures` were added to the window history in this call (see place).
local synced = {}
-- Until when the marker sets of the release before (one set per bucket) are consulted.
local sets_until = tonumber(ARGV[8])
local id_stride = 4
local ts_stride = 6
local now_ms = nil

-- Meters (see meters.rs): the field of aggregation `name` of a key.
local function suffixed(f, name)
  return string.sub(f, 1, -2) .. ',"' .. name .. '"]'
end
-- A meter's aggregation letters (meters.rs) as the names its fields carry.
local METER = {c = 'count', x = 'max', n = 'min', l = 'latest'}
-- Applies one aggregation of a pulse to hash h (a count adds 1 per pulse); returns the
-- field it wrote.
local function apply(h, f, op, lo, hi, ts)
  if op == 's' then
    add(h, key.hi(h), f, lo, hi)
    return f
  end
  local agg = METER[op]
  local g = suffixed(f, agg)
  if op == 'c' then
    lo, hi = '1000000000000', '0'
  end
  combine(h, g, agg, lo, hi, ts)
  return g
end

-- The shard's late-pulse settings (recorded by settings.lua, so every replica places alike;
-- ARGV[6] and ARGV[7] stand in until a shard has them), read once per section and only when a
-- stamped pulse is late: `max` LATE_MAX_AGE, `refuse` LATE_PULSES=refuse, and `changed`,
-- `prev`: when LATE_MAX_AGE last changed and the smallest value it had before.
local function late_conf(c)
  if not c.late then
    local v = redis.call('HMGET', c.key, 'late_max', 'late_mode', 'late_changed', 'late_prev',
      'skew_max', 'ttl_changed', 'ttl_floor', 'skew')
    local max = tonumber(v[1]) or tonumber(ARGV[6])
    -- A shard whose last DEDUPE_TTL change predates ttl_changed/ttl_floor: from prev_*.
    local ttl_changed = tonumber(v[6])
    if not ttl_changed and c.prev_ttl > 0 then
      ttl_changed = c.prev_until - 2 * c.prev_ttl
    end
    c.late = {max = max, refuse = (v[2] or ARGV[7]) == 'refuse', changed = tonumber(v[3]) or 0,
      prev = tonumber(v[4]) or max, skew = tonumber(v[5]) or tonumber(v[8]) or 0,
      ttl_changed = ttl_changed or 0,
      ttl_floor = tonumber(v[7]) or (c.prev_ttl > 0 and c.prev_ttl) or c.ttl}
  end
  return c.late
end

-- Whether a stamped pulse with an id is stamped too long ago for a re-send of it to be
-- recognised: its marker is kept at least the dedupe TTL in force at its first arrival, which
-- may have been up to MAX_FUTURE_SKEW before its time (the largest ever recorded: it may have
-- been lowered since); so its time must be within that TTL less that skew of now. A pulse
-- that may have first arrived before DEDUPE_TTL last changed
-- is held to the smallest TTL it had (`ttl_floor`). The edge checks the same with this
-- replica's settings (`timestamp_errors`); this is the deployment's.
local function too_old_for_its_id(c, t)
  local l = late_conf(c)
  local ttl = c.ttl
  if t <= l.ttl_changed + l.skew then
    ttl = math.min(ttl, l.ttl_floor)
  end
  return t < now - (ttl - l.skew)
end

-- How old a pulse for the window ending at `we` may be: LATE_MAX_AGE, or — for a window that
-- ended before it last changed — the smallest value it had, so a window is never reopened after
-- the `final_at` its records carried (`final_at` in flush/deliver.rs computes the same).
local function max_age(l, we)
  if we <= l.changed then
    return math.min(l.max, l.prev)
  end
  return l.max
end

-- Where a stamped pulse goes: {hash, window start (for the usage index), flag, then what
-- writing there records: a pending-set member and its score, the future window's member,
-- the amendment number opened, the window history's member}; or nil, why ('closed': its
-- window is delivered and LATE_PULSES=refuse; 'old': older than its window's LATE_MAX_AGE),
-- and the window's start. Nothing is written here: a commit refused as a whole leaves no trace.
local function place(base, gen, start, stop, c, t)
  if t >= start and t < stop then
    return {key.agg(base, gen), start, '1'}
  end
  if t >= stop then
    -- Ahead (within MAX_FUTURE_SKEW): the window it will be in, decided now if it is not yet
    -- (recorded in the history, so the seal opens it as placed, whatever WINDOW is then).
    if not synced[base] then
      history_of_futures(base)
      synced[base] = true
    end
    local fs, fe = decided(base, t, stop, c.window, c.offset)
    return {key.future(base, fs), fs, 'F', nil, nil, fs .. ':' .. fe, nil, fs .. ':' .. (fe - fs)}
  end
  local ws, we, known = window_at(base, t, c.window, c.offset)
  local recorded = nil
  if not known then
    recorded = ws .. ':' .. (we - ws)
  end
  local l = late_conf(c)
  if t < now - max_age(l, we) then
    return nil, 'old', ws
  end
  local st = redis.call('HMGET', key.late(base, ws), 'drain', 'open')
  local drain, open = tonumber(st[1]), tonumber(st[2])
  if not drain and (we <= c.since or we <= l.changed or we < now - (l.max + 86400)) then
    -- Possibly delivered with no mark (before marks existed, or its mark was kept for a
    -- shorter LATE_MAX_AGE than now, or it expired): amend, never join.
    drain = 0
  end
  if not drain then
    -- Sealed (or never opened here) and not yet read by a drain: it joins the window.
    return {key.sealed(base, ws), ws, 'L', key.member(ws, we), ws, nil, nil, recorded}
  end
  if l.refuse then
    return nil, 'closed', ws
  end
  local opened = nil
  if not open or open <= drain then
    open = drain + 1
    opened = open
  end
  -- Due with the current window: late pulses of one hour gather in one amendment.
  return {key.amend(base, ws, open), ws, 'A', key.amend_member(ws, we, open, stop), ws, nil,
    opened, recorded}
end

-- Records where a stamped pulse was written (see place).
local function placed(base, tg, c)
  if tg[4] then
    redis.call('ZADD', key.pending(base), tg[5], tg[4])
  end
  if tg[6] then
    redis.call('ZADD', key.futures(base), tg[2], tg[6])
  end
  if tg[8] then
    -- A window decided now (ahead, or in a stretch no write opened): recorded, so every later
    -- pulse of that time finds it.
    redis.call('ZADD', key.wins(base), 'NX', tg[2], tg[8])
  end
  if tg[7] then
    local late = key.late(base, tg[2])
    redis.call('HSET', late, 'open', tg[7])
    redis.call('EXPIRE', late, late_conf(c).max + 86400)
  end
end

-- Dedupe markers. A marker (12 bytes of the id's digest, 2 of the tenant's placement) is a
-- field of one of `slots` small hashes per shard and DEDUPE_TTL bucket, `<base>:seen:<ttl>:
-- <bucket>:<slot>`, its slot taken from its first two bytes. A bucket's slot count is fixed in
-- `<base>:x:marks` (field `<ttl>:<bucket>`) by the first commit with ids in it, from how many ids
-- the bucket before received (field `c<ttl>:<bucket>`), so that a slot holds about
-- MARKS_PER_SLOT markers (ARGV[9]: 64, or a quarter of Redis' hash-max-listpack-entries if
-- less — 512 by default), few enough for Redis to keep each hash a listpack even at twice the traffic
-- of the bucket before, and short to search — about 21 bytes an id instead of about 55 in a set. Every replica reads the
-- same count, so every replica looks in the same place; a bucket whose predecessor is unknown
-- gets DEFAULT_SLOTS.
local MARKS_PER_SLOT = tonumber(ARGV[9])
-- 1,024 slot hashes over the deployment (64 per shard with 16 shards): a first bucket of ~100,000
-- ids still fits Redis' listpack encoding, however many shards the deployment has.
local DEFAULT_SLOTS = math.max(1, math.ceil(1024 / shards))

-- The slot hash of a marker: the key prefix of its bucket and its slot number (see
-- `slot_key_names` in keys_lib.lua).
local function slot_key(prefix, mk, slots)
  return slot_key_names(prefix, (string.byte(mk, 1) * 256 + string.byte(mk, 2)) % slots)
end

-- Where a section's markers go and where earlier ones may be: {cur = key prefix, slots,
-- hashes = {{key prefix, slots}...} of the previous bucket (and, after a change of DEDUPE_TTL,
-- of the old bucketing's two), sets = the release before's sets still consulted, expire_at,
-- marks, count_field, touched = the slot hashes written}.
local function marker_places(base, c)
  local ttl = c.ttl
  local bucket = math.floor(now / ttl)
  local marks = key.marks(base)
  local f_cur = ttl .. ':' .. bucket
  local f_prev = ttl .. ':' .. (bucket - 1)
  local fields = {f_cur, f_prev, 'c' .. f_prev}
  local ob = nil
  if c.prev_until > now and c.prev_ttl > 0 then
    ob = math.floor(now / c.prev_ttl)
    fields[4] = c.prev_ttl .. ':' .. ob
    fields[5] = c.prev_ttl .. ':' .. (ob - 1)
  end
  local v = redis.call('HMGET', marks, unpack(fields))
  local slots = tonumber(v[1])
  if not slots then
    local before = tonumber(v[3])
    slots = DEFAULT_SLOTS
    if before then
      slots = math.min(65536, math.max(1, math.ceil(before / MARKS_PER_SLOT)))
    end
    redis.call('HSET', marks, f_cur, slots)
    -- The counts of buckets that can hold no live marker any more go.
    for _, f in ipairs(redis.call('HKEYS', marks)) do
      local t, b = string.match(f, '^c?(%d+):(%d+)$')
      t, b = tonumber(t), tonumber(b)
      local live = (t == ttl and b >= bucket - 1) or (ob and t == c.prev_ttl and b >= ob - 1)
      if not live then
        redis.call('HDEL', marks, f)
      end
    end
  end
  local m = {cur = key.seen(base, f_cur .. ':'), slots = slots, hashes = {}, sets = {},
    expire_at = string.format('%d', (bucket + 2) * ttl), marks = marks, count_field = 'c' .. f_cur,
    touched = {}}
  local function older(f, n)
    if n then
      m.hashes[#m.hashes + 1] = {key.seen(base, f .. ':'), tonumber(n)}
    end
  end
  older(f_prev, v[2])
  if ob then
    older(fields[4], v[4])
    older(fields[5], v[5])
  end
  if now < sets_until then
    m.sets = {key.seen(base, bucket), key.seen(base, bucket - 1)}
    if ob then
      m.sets[3] = key.seen(base, ob)
      m.sets[4] = key.seen(base, ob - 1)
    end
  end
  return m
end

-- Each section's marker places, found once (by `known` before writing, or when writing).
local places = {}
local function markers(s, base, c)
  places[s] = places[s] or marker_places(base, c)
  return places[s]
end

-- Whether a marker is remembered by an earlier bucket (the previous one, the old bucketing's
-- after a DEDUPE_TTL change, the release before's sets).
local function remembered_before(m, mk)
  for _, h in ipairs(m.hashes) do
    if redis.call('HEXISTS', slot_key(h[1], mk, h[2]), mk) == 1 then
      return true
    end
  end
  for _, set in ipairs(m.sets) do
    if redis.call('SISMEMBER', set, mk) == 1 then
      return true
    end
  end
  return false
end

-- Whether a marker is remembered already (nothing is written).
local function known(m, mk)
  return redis.call('HEXISTS', slot_key(m.cur, mk, m.slots), mk) == 1
    or remembered_before(m, mk)
end

local sections = {}
local full = {}
local closed = {}
local i = 10
for s = 1, tonumber(ARGV[3]) do
  local base = ARGV[i]
  local plain = tonumber(ARGV[i + 1])
  local big = tonumber(ARGV[i + 2])
  local ids = tonumber(ARGV[i + 3])
  local timed = tonumber(ARGV[i + 4])
  i = i + 5
  local c = conf(base, ARGV[1], ARGV[2], ARGV[5])
  if c.shards ~= shards then
    return redis.error_reply('SHARDSCHANGED ' .. c.shards)
  end
  local gen, start, _, stop = seal(base, now, c)
  local agg = key.agg(base, gen)
  local first_big = i + plain * 2
  local first_id = first_big + big * 3
  local first_ts = first_id + ids * id_stride
  local after = first_ts + timed * ts_stride
  -- Stamped pulses first find their hashes.
  local targets = timed > 0 and {} or nil
  local n = 0
  for k = first_ts, after - 1, ts_stride do
    n = n + 1
    local tg, why, ws
    if ARGV[k + 3] == '' then
      tg = {agg, start, '1'}
    else
      tg, why, ws = place(base, gen, start, stop, c, math.floor(tonumber(ARGV[k + 3]) / 1000))
    end
    local mk = ARGV[k + 4]
    if tg and mk ~= '' and ARGV[k + 3] ~= ''
        and too_old_for_its_id(c, math.floor(tonumber(ARGV[k + 3]) / 1000)) then
      tg, why, ws = nil, 'dedupe', tg[2]
    end
    if tg then
      targets[k] = tg
    elseif mk ~= '' and known(markers(s, base, c), mk) then
      -- A re-send of a pulse already counted (the retry a 503 asks for) is a duplicate, even
      -- when its window has closed since: never written (first_time says so), answered `0`.
      targets[k] = {agg, ws, '0'}
    else
      closed[#closed + 1] = s .. ':' .. n .. ':' .. why
    end
  end
  -- Overflow guard: only pulses of 10^15 units (1,000 whole units) or more carry a hi part;
  -- smaller ones add at most one carry (+4,000) each, and 2^62 / 4,000 carries cannot happen
  -- within a window.
  local his = nil
  local k = first_big
  while k < after do
    local sums = k < first_ts or ARGV[k + 5] == '' or string.find(ARGV[k + 5], 's', 1, true)
    if ARGV[k + 2] ~= '0' and sums then
      local into = agg
      if k >= first_ts then
        into = targets[k] and targets[k][1] or agg
      end
      his = his or {}
      local hk = into .. '\0' .. ARGV[k]
      his[hk] = (his[hk] or 0) + tonumber(ARGV[k + 2]) + 4000
    end
    if k < first_id then k = k + 3 elseif k < first_ts then k = k + id_stride else k = k + ts_stride end
  end
  if his then
    for hk, inc in pairs(his) do
      local into, f = string.match(hk, '^(.-)%z(.*)$')
      local cur = tonumber(redis.call('HGET', key.hi(into), f) or '0')
      if cur + inc >= 4611686018427387904 then
        full[#full + 1] = f
      end
    end
  end
  sections[s] = {base, i, first_big, first_id, first_ts, after, agg, start, c, targets, stop}
  i = after
end
-- Nothing of the commit is written when a key would leave the exact range or a stamped pulse's
-- window is closed: the caller refuses only the requests carrying them and calls again with
-- the rest (one tenant's trouble never costs another tenant's pulses).
if #full > 0 then
  table.insert(full, 1, 'OVERFLOW')
  return full
end
if #closed > 0 then
  table.insert(closed, 1, 'CLOSED')
  return closed
end

local out = {}
for s = 1, #sections do
  local base, first, first_big, first_id, first_ts, after, agg, start, c, targets, stop =
    unpack(sections[s])
  local len = c.window
  local hi = key.hi(agg)
  add_plain(ARGV, first, first_big - 1, agg, hi, base, start, len)
  for k = first_big, first_id - 1, 3 do
    if add(agg, hi, ARGV[k], ARGV[k + 1], ARGV[k + 2]) then
      index(base, start, ARGV[k], len)
    end
  end
  local flags, stamped = '', ''
  -- Pulse ids and rich items only: sections of plain pulses need none of this.
  if first_id < after then
    local m = markers(s, base, c)
    local added = 0
    -- Whether the pulse id with this marker is new (and remembered from now on).
    local function first_time(mk)
      local sk = slot_key(m.cur, mk, m.slots)
      if redis.call('HSETNX', sk, mk, '1') == 0 then
        return false
      end
      m.touched[sk] = true
      added = added + 1
      return not remembered_before(m, mk)
    end
    local flag = {}
    for k = first_id, first_ts - 1, id_stride do
      if first_time(ARGV[k + 3]) then
        if add(agg, hi, ARGV[k], ARGV[k + 1], ARGV[k + 2]) then
          index(base, start, ARGV[k], len)
        end
        flag[#flag + 1] = '1'
      else
        flag[#flag + 1] = '0'
      end
    end
    local stamp = {}
    for k = first_ts, after - 1, ts_stride do
      local tg = targets[k]
      local m = ARGV[k + 4]
      if m == '' or first_time(m) then
        placed(base, tg, c)
        local ops = ARGV[k + 5]
        if ops == '' then
          if add(tg[1], key.hi(tg[1]), ARGV[k], ARGV[k + 1], ARGV[k + 2]) then
            index(base, tg[2], ARGV[k], len)
          end
        else
          local ts = tonumber(ARGV[k + 3])
          if not ts then
            if not now_ms then
              local t = redis.call('TIME')
              now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
            end
            ts = now_ms
          end
          for o = 1, #ops do
            index(base, tg[2], apply(tg[1], ARGV[k], string.sub(ops, o, o), ARGV[k + 1], ARGV[k + 2], ts), len)
          end
        end
        stamp[#stamp + 1] = tg[3] .. string.format('%d', tg[2])
      else
        stamp[#stamp + 1] = '0' .. string.format('%d', tg[2])
      end
    end
    if added > 0 then
      for sk in pairs(m.touched) do
        redis.call('EXPIREAT', sk, m.expire_at, 'NX')
      end
      redis.call('HINCRBY', m.marks, m.count_field, string.format('%d', added))
    end
    flags, stamped = table.concat(flag), table.concat(stamp, ',')
  end
  out[s] = string.format('%d', start) .. '+' .. string.format('%d', stop - start) .. ':'
    .. flags .. ':' .. stamped
end
local reply = table.concat(out, ';')
redis.call('SET', KEYS[1], reply, 'EX', ARGV[4])
return reply
