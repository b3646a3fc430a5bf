-- The key layout, the one place the scripts name keys (prepended to every script that does;
-- `Keys` in store/keys.rs builds the same names for Rust, and a test holds the two equal).
-- `base` is a shard's hash tag, "{<prefix>:<shard>}": every key of the shard starts with it, so
-- a script touches one cluster slot (invariant 10). The layout's own keys live under
-- `<base>:x` — "x" for exact, the fixed-point layout that replaced the float one.
local key = {}
-- Settings and generation state (seal_lib.lua `conf`); the plain keys below mirror the latter.
function key.conf(base) return base .. ':x:conf' end
function key.gen(base) return base .. ':x:gen' end
function key.window(base) return base .. ':x:window' end
function key.window_len(base) return base .. ':x:window_len' end
-- The window history and the windows stamped pulses wait for.
function key.wins(base) return base .. ':x:wins' end
function key.futures(base) return base .. ':x:futures' end
function key.future(base, start) return base .. ':x:future:' .. start end
-- Aggregates: the generation written, sealed windows, amendments, dead letters. Each has its
-- twins: `hi(h)` (high limbs) and `ts(h)` (`latest` meters' times).
function key.agg(base, gen) return base .. ':x:agg:' .. gen end
function key.sealed(base, start) return base .. ':x:sealed:' .. start end
function key.amend(base, start, n) return base .. ':x:amend:' .. start .. ':' .. n end
function key.dead(base, start) return base .. ':x:dead:' .. start end
function key.dead_amend(base, start, n) return base .. ':x:dead:' .. start .. ':a' .. n end
function key.hi(h) return h .. ':hi' end
function key.ts(h) return h .. ':ts' end
-- A window's late-pulse state (`drain`, `open`).
function key.late(base, start) return base .. ':x:late:' .. start end
-- The usage index: a tenant's fields in a window, and the window's tenants.
function key.idx(base, start, tenant) return base .. ':x:idx:' .. start .. ':' .. tenant end
function key.idxt(base, start) return base .. ':x:idxt:' .. start end
-- Windows awaiting delivery, as members "<start>:<end>:x" (amendment n, due at `due`:
-- "<start>:<end>:x:a<n>:<due>").
function key.pending(base) return base .. ':pending' end
function key.member(s, e) return s .. ':' .. e .. ':x' end
function key.amend_member(s, e, n, due) return s .. ':' .. e .. ':x:a' .. n .. ':' .. due end
-- Dedupe markers: slot hashes `seen:<ttl>:<bucket>:<slot>` (and the release before's sets,
-- `seen:<bucket>`), with each bucket's slot and id counts in `marks`.
function key.seen(base, suffix) return base .. ':seen:' .. suffix end
function key.marks(base) return base .. ':x:marks' end

-- A marker slot hash's key name, `<prefix><slot>`, built once: a number concatenated into a
-- string goes through sprintf('%.14g'), ~2,500 instructions (string.format('%d') ~1,000) — a
-- few % of a pulse with an id. Where the scripts run as a Functions library the names
-- outlive a call: the names of the last few buckets are kept (at most 65,536 each); as a
-- script, of one call.
local slot_names = {}
local slot_prefixes = 0
local function slot_key_names(prefix, n)
  local names = slot_names[prefix]
  if not names then
    if slot_prefixes >= 8 then
      slot_names = {}
      slot_prefixes = 0
    end
    names = {}
    slot_names[prefix] = names
    slot_prefixes = slot_prefixes + 1
  end
  local k = names[n]
  if not k then
    k = prefix .. string.format('%d', n)
    names[n] = k
  end
  return k
end
