-- A tenant's usage in one shard, read in one step: the current window's totals and each
-- pending window's, with its state. Reads only the tenant's own keys (the usage index, then
-- HMGET of those fields): its cost does not grow with other tenants' data.
-- KEYS[1] :x:gen, KEYS[2] :x:window, KEYS[3] :x:window_len, KEYS[4] pending set,
-- KEYS[5] drain lock, KEYS[6] dead-letter index. ARGV[1] shard base, ARGV[2] tenant.
-- Returns JSON: {now, current = window or false, windows = {member: window}} where a window is
-- {start, end, pending, dead_lettered, busy, keys = {field: {lo, hi, dead}}}.
local base, tenant = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local out = {now = t[1], windows = {}}
-- HMGET in chunks: unpacking a big tenant's fields at once passes Lua's stack limit.
local CHUNK = 1000
local function hmget(hash, fields, from, to)
  return redis.call('HMGET', hash, unpack(fields, from, to))
end
local function read(hash, dead, start)
  local w = {start = tostring(start), keys = {}}
  local idx = key.idx(base, start, tenant)
  local fields = redis.call('SMEMBERS', idx)
  for from = 1, #fields, CHUNK do
    local to = math.min(from + CHUNK - 1, #fields)
    local lo = hmget(hash, fields, from, to)
    local hi = hmget(key.hi(hash), fields, from, to)
    local dl = hmget(dead, fields, from, to)
    for i = from, to do
      local k = i - from + 1
      w.keys[fields[i]] = {lo = lo[k] or '0', hi = hi[k] or '0', dead = dl[k] or false}
    end
  end
  return w
end
local gen = redis.call('GET', KEYS[1])
local start = redis.call('GET', KEYS[2])
if gen and start then
  local w = read(key.agg(base, gen), key.dead(base, 'none'), start)
  w['end'] = tostring(tonumber(start) + (tonumber(redis.call('GET', KEYS[3])) or 0))
  out.current = w
else
  out.current = false
end
-- Members of the dead-letter index (not to be confused with a window's dead-letter hash).
local dead = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[6], 0, -1)) do
  dead[m] = true
end
local busy = redis.call('EXISTS', KEYS[5]) == 1
local members = redis.call('ZRANGE', KEYS[4], 0, -1)
local seen = {}
local function window(m, pending)
  local s, e = string.match(m, '^(%d+):(%d+):x$')
  local a, due = nil, nil
  if not s then
    -- An amendment: late pulses of window s counted after its delivery began.
    s, e, a, due = string.match(m, '^(%d+):(%d+):x:a(%d+):(%d+)$')
  end
  if not s or seen[m] then
    return
  end
  seen[m] = true
  local hash, dead_hash = key.sealed(base, s), key.dead(base, s)
  if a then
    hash, dead_hash = key.amend(base, s, a), key.dead_amend(base, s, a)
  end
  local w = read(hash, dead_hash, s)
  w.amendment = tonumber(a or '0')
  w.due = due or e
  w['end'] = e
  w.member = m
  w.pending = pending
  w.dead_lettered = dead[m] or false
  w.busy = busy
  out.windows[m] = w
end
for _, m in ipairs(members) do
  window(m, true)
end
for m, _ in pairs(dead) do
  window(m, false)
end
return cjson.encode(out)
