-- Shared by every script that may toggle the generation (prepended with include_str!).
--
-- seal(base, now, window_len) brings the shard's generation up to date with Redis time:
-- if the current generation belongs to a window that has ended, the generation flips, the old
-- hash is renamed to `<base>:sealed:<start>` and its start is added to `<base>:pending`.
-- Idempotent: for a given window only the first caller toggles. Returns gen, start, toggled.
local function seal(base, now, window_len)
  local current = now - (now % window_len)
  local gen = redis.call('GET', base .. ':gen')
  local start = tonumber(redis.call('GET', base .. ':window'))
  if not gen or not start then
    gen = gen or 'A'
    redis.call('SET', base .. ':gen', gen)
    redis.call('SET', base .. ':window', current)
    redis.call('SET', base .. ':window_len', window_len)
    return gen, current, 0
  end
  if start >= current then
    -- Same window (or Redis time went back after a failover): keep writing where we are.
    return gen, start, 0
  end
  local len = tonumber(redis.call('GET', base .. ':window_len')) or window_len
  local old = base .. ':agg:' .. gen
  if redis.call('EXISTS', old) == 1 then
    local sealed = base .. ':sealed:' .. start
    if redis.call('EXISTS', sealed) == 0 then
      redis.call('RENAME', old, sealed)
    else
      -- Cannot happen while windows only move forward; merged rather than overwritten, so
      -- nothing is lost if it ever does.
      local kv = redis.call('HGETALL', old)
      for i = 1, #kv, 2 do
        redis.call('HINCRBYFLOAT', sealed, kv[i], kv[i + 1])
      end
      redis.call('DEL', old)
    end
    -- The member carries the window's end, so a later change of WINDOW cannot mislabel it.
    redis.call('ZADD', base .. ':pending', start, start .. ':' .. (start + len))
  end
  if gen == 'A' then gen = 'B' else gen = 'A' end
  redis.call('SET', base .. ':gen', gen)
  redis.call('SET', base .. ':window', current)
  redis.call('SET', base .. ':window_len', window_len)
  return gen, current, 1
end

local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1])
end
