-- tiergate's limiter in Redis: one script, one call per decision, run atomically by the server.
--
-- It makes the same decisions as `limiter/core.rs`, in the same units (see that file): time in
-- microseconds, requests in nano-requests, tokens in 1/60000 units credited per millisecond.
-- Every number stays an integer below 2^53, so doubles compute them exactly. Numbers are
-- written with string.format('%d') so that no exponent notation reaches a hash.
--
-- Cost: Redis runs one call at a time, so each call reads the workspace's hash once (one
-- HMGET of the fields its limits need), parses each field as it is read, computes in Lua, and
-- writes what changed once (one HSET; a PEXPIRE only when the key's life runs short): about six
-- commands per call, and expired records are looked for at most ten times a second. Measured in
-- Redis 7.0 (bench/redis-lua/in_redis.py): an HMGET of 21 fields about 3.5 µs, an HGET or a
-- ZADD about 0.6 µs, tonumber about 0.11 µs and string.format about 0.16 µs each; making the
-- helpers below costs about 6 µs per call as a script (hence the function library, which makes
-- them once).
--
-- KEYS[1] {P:W}     hash: the workspace's buckets, concurrency, and month counter
-- KEYS[2] {P:W}:r   hash: reservation id -> record
-- KEYS[3] {P:W}:e   sorted set: reservation id -> expiry (lease of a live record, or the end of
--                   a tombstone's life)
-- All three share the hash tag {P:W}, so in a cluster they live on one slot. The heartbeat op
-- uses KEYS[1] = {P}:instances alone.
--
-- State fields (KEYS[1]):
--   rl ra rc          request bucket: level (nano-requests), at (µs), capacity it was computed with
--   tl ta tc          token bucket: level (units), at (µs, moves by whole ms), capacity (tokens)
--   mt:<m>:l/a/c      the same for model <m> (an id hashed from the model name, never the name)
--   inflight          requests holding a concurrency slot
--   rp                when (µs) expired records were last looked for (see `reap`)
--   keep              the µs until which the key must live (every bucket full again by then)
--   mk gen based born base delta res
--                     the month counter: month key, generation id, whether `base` was read from
--                     the ledger, when the generation began, the ledger's total for what this
--                     generation did not count itself, what it counted (settled), what is held
--   mb:<m> md:<m> mr:<m>
--                     the same three for model <m>
--   k<id>:rl/ra/rc k<id>:tl/ta/tc
--                     the request and token buckets of API key <id>'s own limits
--   kb:<id> kd:<id> kr:<id>
--                     key <id>'s month counter in this generation: the ledger's total for what
--                     the generation did not count (present once based), counted, held
-- Records (KEYS[2]):
--   L|tokens|gen|model|slot|key   live reservation (key: the key with limits of its own, or '')
--   X|tokens|gen|model|key    its lease expired (the instance is presumed gone): its month hold
--                             and slot were released; a late settlement still counts once
--   S|gen                     settled (tombstone; a second settlement answers the same)
--   C                         cancelled before its reservation was known to the caller; under
--                             a generation's id, a carry taken in (`newgen`)
--
-- ARGV, every op: op, now (µs; 0 = the server's TIME), idle ms (the key's life after the last
-- write), records ms (the records' keys' life after a write: the longest lease or tombstone),
-- tombstone ms; then the op's own.

-- The chunk defines `run(KEYS, ARGV)` and ends there: redis.rs appends how it is called, as a
-- script (`return run(KEYS, ARGV)`: every helper below is made again on every call) or as a
-- function library (registered once, its helpers made once at load). Per-call state lives in
-- the locals below, set at the start of every call by `run`.
local KS, KR, KE, op, now, IDLE, RECORDS, TOMB
local state, dirty, dirty_list, ndirty, dropped, records_written, touched, bucket_names, model_names
-- The three lives as sent (ARGV 3 to 5: the same on every call of an instance), parsed when
-- they change. (A table: `run` may not have more than 60 upvalues.)
local sent = {}

local NR = 1000000000 -- nano-requests per request
local U = 60000       -- token units per token
local REAP = 64       -- expired records handled per call, at most
-- Expired records are looked for at most this often (µs): a lease that ends is acted on up to
-- this late, and a tombstone lives up to this much longer. Looking costs a call or four of the
-- server's commands; at this cadence a busy workspace reaps its tombstones in batches, not one
-- per call. `REAP_LATENESS` in redis.rs says the same.
local REAP_EVERY = 100000

-- tonumber and string.format, set by `run`: a library's code may not read globals while it
-- loads.
local N, F
local function S(n) return F('%d', n) end
local function ceil_div(a, b) return math.floor((a + b - 1) / b) end
local function clamp(x, lo, hi)
  if x < lo then return lo elseif x > hi then return hi end
  return x
end

-- The calendar month (UTC) of a microsecond, as year * 12 + month - 1 (civil_from_days). The
-- last day's answer is kept: most calls fall on the day before them.
local last_day, last_month
local function month_of(t)
  local day = math.floor(t / 86400000000)
  if day == last_day then return last_month end
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  last_day, last_month = day, y * 12 + m - 1
  return last_month
end

local function split(s)
  local out, from = {}, 1
  while true do
    local bar = string.find(s, '|', from, true)
    if not bar then
      out[#out + 1] = string.sub(s, from)
      return out
    end
    out[#out + 1] = string.sub(s, from, bar - 1)
    from = bar + 1
  end
end

-- ---------------------------------------------------------------------------------------------
-- The workspace's hash, read once and written once

-- state: the fields read or put (false: missing); dirty: put since read; dropped: to delete;
-- records_written: KR/KE written; touched: whether any field was put (a put of the value a field
-- already holds writes nothing, but the key's life is still given as if it had been written).

-- The fields held as text: every other field holds a number, parsed as it is read.
local TEXT = {gen = true, based = true}

-- Reads the fields not read yet (one HMGET). A missing field reads as false.
local function load(fields)
  local need, n = fields, #fields
  if next(state) ~= nil then
    need, n = {}, 0
    for i = 1, #fields do
      local f = fields[i]
      if state[f] == nil then
        n = n + 1
        need[n] = f
      end
    end
    if n == 0 then return end
  end
  local v = redis.call('HMGET', KS, unpack(need))
  for i = 1, n do
    local f, x = need[i], v[i]
    if x and not TEXT[f] then x = N(x) or x end
    state[f] = x
  end
end

local function put(f, v)
  touched = true
  -- The same value as read, or as put already: nothing more to write.
  if state[f] == v then return end
  state[f] = v
  if not dirty[f] then
    dirty[f] = true
    ndirty = ndirty + 1
    dirty_list[ndirty] = f
  end
  dropped[f] = nil
end

local function drop(f)
  state[f] = false
  dirty[f] = nil
  dropped[f] = true
end

-- Field names, made once per call: a token bucket's under prefix p ('t' or 'mt:<m>:'), and a
-- model's month fields.
local function bucket(p)
  local n = bucket_names[p]
  if not n then
    n = {p .. 'l', p .. 'a', p .. 'c'}
    bucket_names[p] = n
  end
  return n
end
local function month_names(m)
  local n = model_names[m]
  if not n then
    n = {b = 'mb:' .. m, d = 'md:' .. m, r = 'mr:' .. m, t = 'mt:' .. m .. ':'}
    model_names[m] = n
  end
  return n
end

-- Reads the fields an op needs: the month counter, the key's life, and the buckets of the
-- limits given (a model's when there is one).
local function load_for(rate, tpm, m, mtpm)
  local fields = {'keep', 'exp', 'rexp', 'rp', 'inflight', 'mk', 'gen', 'based', 'base', 'delta',
    'res'}
  if rate > 0 then
    fields[#fields + 1] = 'rl'
    fields[#fields + 1] = 'ra'
    fields[#fields + 1] = 'rc'
    fields[#fields + 1] = 'rq'
  end
  if tpm > 0 then
    fields[#fields + 1] = 'tl'
    fields[#fields + 1] = 'ta'
    fields[#fields + 1] = 'tc'
  end
  if m ~= '' then
    local mn = month_names(m)
    fields[#fields + 1] = 'mn'
    fields[#fields + 1] = mn.b
    fields[#fields + 1] = mn.d
    fields[#fields + 1] = mn.r
    if mtpm > 0 then
      local b = bucket(mn.t)
      fields[#fields + 1] = b[1]
      fields[#fields + 1] = b[2]
      fields[#fields + 1] = b[3]
    end
  end
  load(fields)
end

-- The key must live until `t` (µs): every bucket written is full again by then.
local function keep_until(t)
  if t > (state.keep or 0) then put('keep', t) end
end

-- Writes what changed (one HSET, one HDEL) and gives the keys their life: at least IDLE after
-- the last write, and until every bucket is full again (`keep`); the records' keys as long as
-- their longest lease or tombstone. When the life a key was last given (`exp`, `rexp`) still
-- covers what is needed by a good margin, it is not given again: most calls set no expiry.
-- A key that expires loses nothing the ledger does not have.
local function finish()
  if records_written then
    local rexp = state.rexp or 0
    if rexp < now + RECORDS * 1000 or redis.call('PTTL', KE) < 0 then
      redis.call('PEXPIRE', KR, S(2 * RECORDS))
      redis.call('PEXPIRE', KE, S(2 * RECORDS))
      put('rexp', now + 2 * RECORDS * 1000)
    end
  end
  if not touched and next(dropped) == nil then return end
  local keep = state.keep or 0
  local exp = state.exp or 0
  if exp < now + IDLE * 500 or exp < keep then
    local life = math.max(now + IDLE * 1000, keep)
    put('exp', life)
    redis.call('PEXPIRE', KS, S(ceil_div(life - now, 1000)))
  end
  local args, n = {}, 0
  for i = 1, ndirty do
    local f = dirty_list[i]
    -- Listed once, when first put; dropped since when no longer dirty.
    if dirty[f] then
      dirty[f] = nil
      local v = state[f]
      args[n + 1] = f
      args[n + 2] = TEXT[f] and v or F('%d', v)
      n = n + 2
    end
  end
  if next(dropped) ~= nil then
    local gone = {}
    for f in pairs(dropped) do gone[#gone + 1] = f end
    redis.call('HDEL', KS, unpack(gone))
  end
  if n > 0 then redis.call('HSET', KS, unpack(args)) end
end

-- ---------------------------------------------------------------------------------------------
-- Buckets (the same arithmetic as core.rs)

-- Level l at a of capacity c, seen under limits cap and rate: moved by the change of capacity,
-- and refilled at r, the rate of the limits it was last taken from under, until it is next
-- taken from (r missing, as an older version stored it: the current rate). Returns the level,
-- its time, and the rate it refills at from there.
local function req_at(l, a, c, r, cap, rate)
  if not l then return cap, now, rate end
  r = r or rate
  local level = math.min(l + cap - c, cap)
  if now <= a then return level, a, r end
  local deficit = cap - level
  if deficit <= 0 then return cap, now, r end
  local elapsed = now - a
  if elapsed >= ceil_div(deficit, r) then return cap, now, r end
  return level + elapsed * r, now, r
end

-- The request bucket under prefix p ('' for the workspace's, 'k<id>:' for a key's).
local function req_load(cap, rate, p)
  p = p or ''
  return req_at(state[p .. 'rl'], state[p .. 'ra'], state[p .. 'rc'], state[p .. 'rq'], cap, rate)
end

-- As core.rs's `TokenBucket`: moved by the change of capacity, and refilled at its own
-- capacity c a minute (the limit it was used under) until it is next taken from or added to.
local function tok_at(l, a, c, cap)
  local capu = cap * U
  if not l then return capu, now end
  local level = clamp(l + (cap - c) * U, -capu, capu)
  if now <= a then return level, a end
  local deficit = capu - level
  if deficit <= 0 then return capu, now end
  local ms = math.floor((now - a) / 1000)
  if ms >= ceil_div(deficit, c) then return capu, now end
  return level + ms * c, a + ms * 1000
end

-- When cost tokens are available, refilling at r a millisecond.
local function tok_available_at(level, at, r, cost)
  local need = cost * U - level
  if need <= 0 then return now end
  return at + ceil_div(need, r) * 1000
end

-- When a bucket of capacity cap is full, refilling at r (cap when left out) a millisecond.
local function tok_full_at(level, at, cap, r)
  local missing = cap * U - level
  if missing <= 0 then return now end
  return at + ceil_div(missing, r or cap) * 1000
end

-- A token bucket under prefix p ('t' or 'mt:<m>:'): level, at, whether it exists, and the
-- rate it refills at (its own capacity).
local function tok_load(p, cap)
  local b = bucket(p)
  local l = state[b[1]] or nil
  local c = state[b[3]] or cap
  local level, at = tok_at(l, state[b[2]], c, cap)
  return level, at, l ~= nil, l and c or cap
end

local function tok_store(p, level, at, cap)
  local b = bucket(p)
  put(b[1], level)
  put(b[2], at)
  put(b[3], cap)
  keep_until(tok_full_at(level, at, cap))
end

-- Adds `tokens` (negative takes) to bucket p, within one minute of debt and the capacity.
local function tok_add(p, cap, tokens, create)
  local level, at, exists = tok_load(p, cap)
  if not exists and not create then return end
  local capu = cap * U
  tok_store(p, clamp(level + tokens * U, -capu, capu), at, cap)
end

-- ---------------------------------------------------------------------------------------------
-- The month counter

local function new_generation(mk, gen)
  local function month_field(f)
    local p = string.sub(f, 1, 3)
    return p == 'mb:' or p == 'md:' or p == 'mr:' or p == 'kb:' or p == 'kd:' or p == 'kr:'
  end
  for _, f in ipairs(redis.call('HKEYS', KS)) do
    if month_field(f) then drop(f) end
  end
  for f in pairs(dirty) do
    if month_field(f) then drop(f) end
  end
  put('mn', 0)
  put('mk', mk)
  put('gen', gen)
  put('based', '0')
  put('born', now)
  put('base', 0)
  put('delta', 0)
  put('res', 0)
end

-- The counter of the month of `now`: starts a new, unbased generation when there is none (a
-- flushed or expired key) or it belongs to an earlier month. Returns gen, based, month.
local function month_counter(candidate)
  local mk = month_of(now)
  if state.mk ~= mk or not state.gen then
    new_generation(mk, candidate)
    return candidate, false, mk
  end
  return state.gen, state.based == '1', mk
end

local function add(f, n)
  if n ~= 0 then put(f, (state[f] or 0) + n) end
end

-- Models counted apart at most (`MAX_TRACKED_MODELS` in core.rs): models with limits of their
-- own always count; others only while fewer are tracked. `mn` counts the models tracked.
local MAX_MODELS = 256

-- Adds n to a model's month field, dropping the model's fields once all three are 0, so that
-- names a client makes up (and the upstream refuses) leave nothing behind.
local function model_add(kind, m, n, limited)
  if m == '' or n == 0 then return end
  local mn = month_names(m)
  local fb, fd, fr = mn.b, mn.d, mn.r
  if state[fb] == nil or state[fd] == nil or state[fr] == nil or state.mn == nil then
    load({fb, fd, fr, 'mn'})
  end
  local tracked = state[fb] or state[fd] or state[fr]
  if not tracked then
    -- Nothing to take back from a model that was not counted; a new one needs room.
    if n < 0 or (not limited and (state.mn or 0) >= MAX_MODELS) then return end
    put('mn', (state.mn or 0) + 1)
  end
  local f = mn[kind]
  local after = (state[f] or 0) + n
  put(f, after)
  if (state[fb] or 0) == 0 and (state[fd] or 0) == 0 and (state[fr] or 0) == 0 then
    drop(fb)
    drop(fd)
    drop(fr)
    put('mn', math.max((state.mn or 1) - 1, 0))
  end
end

local function month_used()
  return (state.base or 0) + (state.delta or 0), (state.res or 0)
end

local function model_used(m)
  local mn = month_names(m)
  return (state[mn.b] or 0) + (state[mn.d] or 0) + (state[mn.r] or 0)
end

-- A key's own limits: its fields' prefix, and reading the fields an op needs.
local function key_prefix(kid) return 'k' .. kid .. ':' end
local function load_key(kid, krate, ktpm)
  if kid == '' then return end
  local kp = key_prefix(kid)
  local fields = {'kb:' .. kid, 'kd:' .. kid, 'kr:' .. kid}
  if krate > 0 then
    fields[#fields + 1] = kp .. 'rl'
    fields[#fields + 1] = kp .. 'ra'
    fields[#fields + 1] = kp .. 'rc'
    fields[#fields + 1] = kp .. 'rq'
  end
  if ktpm > 0 then
    local b = bucket(kp .. 't')
    fields[#fields + 1] = b[1]
    fields[#fields + 1] = b[2]
    fields[#fields + 1] = b[3]
  end
  load(fields)
end

-- Adds n to one of a key's month fields ('kd' counted, 'kr' held).
local function key_add(kind, kid, n)
  if kid == nil or kid == '' or n == 0 then return end
  local f = kind .. ':' .. kid
  load({f})
  put(f, math.max((state[f] or 0) + n, 0))
end

local function key_used(kid)
  return (state['kb:' .. kid] or 0) + (state['kd:' .. kid] or 0) + (state['kr:' .. kid] or 0)
end

-- ---------------------------------------------------------------------------------------------
-- Records and leases

-- Releases what a live record holds in the month counter and its slot.
local function release_hold(tokens, gen, m, slot, kid)
  if state.gen == gen then
    add('res', -tokens)
    model_add('r', m, -tokens, true)
    key_add('kr', kid, -tokens)
  end
  if slot == '1' then put('inflight', math.max((state.inflight or 0) - 1, 0)) end
end

-- Expired leases: the instance that holds them is presumed gone. Their month hold and slot are
-- released; the record stays as X (with what it took from the buckets) until its tombstone
-- ends, so that a late settlement still counts once. Other expired records go.
local function reap()
  -- The records' keys outlived by the workspace's hash (no call came between a lease's end and
  -- their expiry, `rexp`, as after an instance was killed): their leases can no longer be
  -- reaped, so what they held goes with them, rather than for as long as the hash lives (an
  -- outside audit: a slot held for ten minutes, renewed by every refusal). Looked at only once
  -- `rexp` has passed with something held: one EXISTS then, none on other calls.
  local rexp = state.rexp
  if rexp and now >= rexp and ((state.inflight or 0) > 0 or (state.res or 0) > 0)
      and redis.call('EXISTS', KR) == 0 then
    for _, f in ipairs(redis.call('HKEYS', KS)) do
      local p = string.sub(f, 1, 3)
      if f == 'inflight' or f == 'res' or p == 'mr:' or p == 'kr:' then put(f, 0) end
    end
  end
  local last = state.rp
  if last and now >= last and now < last + REAP_EVERY then return end
  local ids = redis.call('ZRANGEBYSCORE', KE, '-inf', S(now), 'LIMIT', 0, REAP)
  -- A full batch may have left more behind: the next call looks again.
  if #ids < REAP then put('rp', now) end
  if #ids == 0 then return end
  local recs = redis.call('HMGET', KR, unpack(ids))
  local gone, expired, until_ = {}, {}, {}
  for i, id in ipairs(ids) do
    local rec = recs[i]
    if rec and string.sub(rec, 1, 1) == 'L' then
      local r = split(rec)
      release_hold(N(r[2]), r[3], r[4], r[5], r[6])
      expired[#expired + 1] = id
      expired[#expired + 1] = 'X|' .. r[2] .. '|' .. r[3] .. '|' .. r[4] .. '|' .. (r[6] or '')
      until_[#until_ + 1] = S(now + TOMB)
      until_[#until_ + 1] = id
    else
      gone[#gone + 1] = id
    end
  end
  if #gone > 0 then
    redis.call('HDEL', KR, unpack(gone))
    redis.call('ZREM', KE, unpack(gone))
  end
  if #expired > 0 then
    redis.call('HSET', KR, unpack(expired))
    redis.call('ZADD', KE, unpack(until_))
    records_written = true
  end
end

local function record(id, value, expiry)
  redis.call('HSET', KR, id, value)
  redis.call('ZADD', KE, S(expiry), id)
  records_written = true
end

-- ---------------------------------------------------------------------------------------------
-- Views

-- Requests window: remaining, full_at.
local function req_view(level, at, cap, rate)
  return math.floor(math.max(level, 0) / NR), at + ceil_div(cap - level, rate)
end

-- Tokens window: remaining, full_at, balance (whole tokens, truncated toward zero).
local function tok_view(tpm, p)
  if tpm == 0 then return 0, 0, 0 end
  local level, at, _, r = tok_load(p or 't', tpm)
  local balance
  if level >= 0 then balance = math.floor(level / U) else balance = -math.floor(-level / U) end
  return math.floor(math.max(level, 0) / U), tok_full_at(level, at, tpm, r), balance
end

-- A key's windows: requests remaining, full at, tokens remaining, full at, month used; nothing
-- without a key. A reserve's answer ends with them, and its caller reads them only when it sent
-- a key: most answers are then a third shorter, and parsed that much faster.
local function key_view(kid, krate, krcap, ktpm)
  if kid == '' then return end
  local kp = key_prefix(kid)
  local rr, rf = 0, 0
  if krate > 0 then
    local level, at, r = req_load(krcap, krate, kp)
    rr, rf = req_view(level, at, krcap, r)
  end
  local tr, tf = tok_view(ktpm, kp .. 't')
  return rr, rf, tr, tf, key_used(kid)
end

-- Ends a reserve's answer: the key's windows (`key_view`), then, for a model with limits of its
-- own, its tokens left this minute, when whole again, and its use this month. Its caller reads
-- each part only when it sent it. (`run` calls this, never `key_view`: a Lua function may use
-- at most 60 locals of the chunk, and `run` is near that.)
local function views(reply, kid, krate, krcap, ktpm, m, mtpm, mmcap)
  if kid ~= '' then
    local rr, rf, tr, tf, used = key_view(kid, krate, krcap, ktpm)
    reply[#reply + 1] = rr
    reply[#reply + 1] = rf
    reply[#reply + 1] = tr
    reply[#reply + 1] = tf
    reply[#reply + 1] = used
  end
  if m ~= '' and (mtpm > 0 or mmcap > 0) then
    local tr, tf = tok_view(mtpm, month_names(m).t)
    reply[#reply + 1] = tr
    reply[#reply + 1] = tf
    reply[#reply + 1] = model_used(m)
  end
  return reply
end

-- ---------------------------------------------------------------------------------------------
-- The cause of a denial: the most important of the candidates (kind: 0 waits, 1 the month, 2 can
-- never fit; then the longest wait), as core.rs chooses. Reset by each reserve.

local best_kind, best_limit, best_at
local function candidate(kind, limit, at)
  -- On a tie, a key's own limit (7, 8, 9: checked last) does not replace the workspace's.
  if kind > best_kind or (kind == best_kind and (at > best_at or (at == best_at and limit < 7))) then
    best_kind, best_limit, best_at = kind, limit, at
  end
end

-- ---------------------------------------------------------------------------------------------
-- Operations

local function run(KEYS, ARGV)
N, F = tonumber, string.format
KS, KR, KE = KEYS[1], KEYS[2], KEYS[3]
op = ARGV[1]
now = tonumber(ARGV[2])
if not now or now <= 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
if ARGV[3] ~= sent[3] or ARGV[4] ~= sent[4] or ARGV[5] ~= sent[5] then
  sent[3], sent[4], sent[5] = ARGV[3], ARGV[4], ARGV[5]
  IDLE, RECORDS = N(ARGV[3]), N(ARGV[4])
  TOMB = N(ARGV[5]) * 1000 -- µs
end
state, dirty, dirty_list, ndirty, dropped = {}, {}, {}, 0, {}
records_written, touched = false, false
bucket_names, model_names = {}, {}

if op == 'heartbeat' then
  -- ARGV 6..: instance id, ttl ms. Answers {now, instances, rank of this one, 1 if this one
  -- was not there (its first heartbeat; or Redis restarted empty, was flushed, or let it expire)}.
  local id, ttl = ARGV[6], N(ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KS, '-inf', S(now))
  local added = redis.call('ZADD', KS, S(now + ttl * 1000), id)
  redis.call('PEXPIRE', KS, S(ttl * 10))
  local members = redis.call('ZRANGE', KS, 0, -1)
  table.sort(members)
  local rank = 0
  for i, m in ipairs(members) do if m == id then rank = i - 1 end end
  return {now, #members, rank, added}
end

if op == 'leave' then
  -- ARGV 6: instance id. A stopped instance is no longer live at once, not when its heartbeat
  -- expires: the others' shares are counted without it.
  redis.call('ZREM', KS, ARGV[6])
  return {now}
end

if op == 'reserve' then
  -- ARGV 6..: id, lease ms, gen candidate, rate, burst capacity, tpm, month cap, concurrency,
  -- model, model tpm, model month, prompt, estimate, need base (1: the month must be exact),
  -- then the key's: id ('' without limits of its own), rate, burst capacity, tpm, month cap
  local id, lease, cand = ARGV[6], N(ARGV[7]), ARGV[8]
  local rate, rcap, tpm, mcap, conc = N(ARGV[9]), N(ARGV[10]), N(ARGV[11]), N(ARGV[12]), N(ARGV[13])
  local m, mtpm, mmcap = ARGV[14], N(ARGV[15]), N(ARGV[16])
  local prompt, estimate = N(ARGV[17]), N(ARGV[18])
  local kid, krate, krcap, ktpm, kmcap = ARGV[20] or '', 0, 0, 0, 0
  if kid ~= '' then
    krate, krcap, ktpm, kmcap = N(ARGV[21]), N(ARGV[22]), N(ARGV[23]), N(ARGV[24])
  end
  load_for(rate, tpm, m, mtpm)
  load_key(kid, krate, ktpm)
  reap()
  local known = redis.call('HGET', KR, id)
  if known then
    -- The same reservation again (a client that re-sent the call after losing the answer):
    -- it was admitted once and is answered so, taking nothing more. A cancelled id is refused.
    finish()
    if string.sub(known, 1, 1) ~= 'L' then return {3, now} end
    local r = split(known)
    local rr, rf = 0, 0
    if rate > 0 then
      local level, at, rq = req_load(rcap, rate)
      rr, rf = req_view(level, at, rcap, rq)
    end
    local tr, tf = tok_view(tpm)
    local settled, reserved = month_used()
    return views({1, now, N(r[2]), r[3], rr, rf, tr, tf, settled + reserved, month_of(now)},
      kid, krate, krcap, ktpm, m, mtpm, mmcap)
  end
  local gen, based, mk = month_counter(cand)
  if (not based and (mcap > 0 or mmcap > 0 or ARGV[19] == '1'))
      or (kid ~= '' and kmcap > 0 and not state['kb:' .. kid]) then
    finish()
    return {2, now, gen, mk}
  end

  -- What may be reserved: the estimate, capped by the smallest token capacity.
  best_kind, best_limit, best_at = -1, 0, 0
  local tokens = math.max(estimate, prompt)
  -- (tpm, 2), (mcap, 3), (mtpm, 5), (mmcap, 6), in that order, without a table per call.
  if tpm > 0 then
    if prompt > tpm then candidate(2, 2, 0) end
    tokens = math.min(tokens, tpm)
  end
  if mcap > 0 then
    if prompt > mcap then candidate(2, 3, 0) end
    tokens = math.min(tokens, mcap)
  end
  if mtpm > 0 then
    if prompt > mtpm then candidate(2, 5, 0) end
    tokens = math.min(tokens, mtpm)
  end
  if mmcap > 0 then
    if prompt > mmcap then candidate(2, 6, 0) end
    tokens = math.min(tokens, mmcap)
  end
  if ktpm > 0 then
    if prompt > ktpm then candidate(2, 8, 0) end
    tokens = math.min(tokens, ktpm)
  end
  if kmcap > 0 then
    if prompt > kmcap then candidate(2, 9, 0) end
    tokens = math.min(tokens, kmcap)
  end
  tokens = math.max(tokens, prompt)

  -- Each bucket refills at the rate it was last taken from under (rq, trq…) until this call
  -- takes from it: after a change of limits, what had refilled under the old ones stays.
  local rlevel, rat, rq
  if rate > 0 then
    rlevel, rat, rq = req_load(rcap, rate)
    local need = NR - rlevel
    if need > 0 then candidate(0, 1, rat + ceil_div(need, rq)) end
  end
  local inflight = state.inflight or 0
  if conc > 0 and inflight >= conc then candidate(0, 4, now + 1000000) end
  local tlevel, tat
  if tpm > 0 then
    local trq, _
    tlevel, tat, _, trq = tok_load('t', tpm)
    local at = tok_available_at(tlevel, tat, trq, tokens)
    if at > now and tokens <= tpm then candidate(0, 2, at) end
  end
  local settled, reserved = month_used()
  if mcap > 0 and settled + reserved + tokens > mcap and tokens <= mcap then
    candidate(1, 3, 0)
  end
  local mp = m ~= '' and month_names(m).t
  local mlevel, mat
  if m ~= '' and mtpm > 0 then
    local mrq, _
    mlevel, mat, _, mrq = tok_load(mp, mtpm)
    local at = tok_available_at(mlevel, mat, mrq, tokens)
    if at > now and tokens <= mtpm then candidate(0, 5, at) end
  end
  if m ~= '' and mmcap > 0 and model_used(m) + tokens > mmcap and tokens <= mmcap then
    candidate(1, 6, 0)
  end
  -- The key's own limits.
  local kp = kid ~= '' and key_prefix(kid)
  local krlevel, krat, klevel, kat
  if kid ~= '' then
    if krate > 0 then
      local krq
      krlevel, krat, krq = req_load(krcap, krate, kp)
      local need = NR - krlevel
      if need > 0 then candidate(0, 7, krat + ceil_div(need, krq)) end
    end
    if ktpm > 0 then
      local ktrq, _
      klevel, kat, _, ktrq = tok_load(kp .. 't', ktpm)
      local at = tok_available_at(klevel, kat, ktrq, tokens)
      if at > now and tokens <= ktpm then candidate(0, 8, at) end
    end
    if kmcap > 0 and key_used(kid) + tokens > kmcap and tokens <= kmcap then
      candidate(1, 9, 0)
    end
  end

  if best_kind >= 0 then
    finish()
    local rr, rf = 0, 0
    if rate > 0 then rr, rf = req_view(rlevel, rat, rcap, rq) end
    local tr, tf = tok_view(tpm)
    return views({0, now, best_kind, best_limit, best_at, rr, rf, tr, tf, settled + reserved, mk},
      kid, krate, krcap, ktpm, m, mtpm, mmcap)
  end

  -- Admit: take from every limit.
  local rr, rf = 0, 0
  if rate > 0 then
    rlevel = rlevel - NR
    put('rl', rlevel)
    put('ra', rat)
    put('rc', rcap)
    put('rq', rate)
    rr, rf = req_view(rlevel, rat, rcap, rate)
    keep_until(rf)
  end
  local slot = '0'
  if conc > 0 then
    put('inflight', inflight + 1)
    slot = '1'
  end
  local tr, tf = 0, 0
  if tpm > 0 then
    local capu = tpm * U
    local level = clamp(tlevel - tokens * U, -capu, capu)
    tok_store('t', level, tat, tpm)
    tr, tf = math.floor(math.max(level, 0) / U), tok_full_at(level, tat, tpm)
  end
  add('res', tokens)
  if m ~= '' then
    model_add('r', m, tokens, mtpm > 0 or mmcap > 0)
    if mtpm > 0 then
      local capu = mtpm * U
      tok_store(mp, clamp(mlevel - tokens * U, -capu, capu), mat, mtpm)
    end
  end
  if kid ~= '' then
    if krate > 0 then
      krlevel = krlevel - NR
      put(kp .. 'rl', krlevel)
      put(kp .. 'ra', krat)
      put(kp .. 'rc', krcap)
      put(kp .. 'rq', krate)
      local _, full_at = req_view(krlevel, krat, krcap, krate)
      keep_until(full_at)
    end
    if ktpm > 0 then
      local capu = ktpm * U
      tok_store(kp .. 't', clamp(klevel - tokens * U, -capu, capu), kat, ktpm)
    end
    key_add('kr', kid, tokens)
  end
  record(id, 'L|' .. S(tokens) .. '|' .. gen .. '|' .. m .. '|' .. slot .. '|' .. kid,
    now + lease * 1000)
  finish()
  return views({1, now, tokens, gen, rr, rf, tr, tf, settled + reserved + tokens, mk},
    kid, krate, krcap, ktpm, m, mtpm, mmcap)
end

if op == 'settle' or op == 'cancel' then
  -- ARGV 6..: id, gen candidate, actual, tpm, model, model tpm, key ('' none), key tpm
  -- Settles once: a live record is replaced by its actual usage; an expired one (X) counts its
  -- usage and returns what it took from the buckets; one the server no longer knows (flushed)
  -- counts its usage as new. `cancel` settles a live record to 0 and, when there is none,
  -- leaves a tombstone so that a reservation arriving late is refused.
  local id, cand = ARGV[6], ARGV[7]
  local actual, tpm, m, mtpm = N(ARGV[8]), N(ARGV[9]), ARGV[10], N(ARGV[11])
  local kid, ktpm = ARGV[12] or '', N(ARGV[13] or '0')
  load_for(0, tpm, m, mtpm)
  load_key(kid, 0, ktpm)
  reap()
  local rec = redis.call('HGET', KR, id)
  local kind = rec and string.sub(rec, 1, 1)
  if kind == 'S' then
    finish()
    return {1, now, string.sub(rec, 3)}
  end
  if kind == 'C' or (op == 'cancel' and kind ~= 'L') then
    if not kind then record(id, 'C', now + TOMB) end
    finish()
    return {1, now, ''}
  end
  if op == 'cancel' then actual = 0 end
  local gen = month_counter(cand)
  local delta, create = -actual, true
  if kind == 'L' or kind == 'X' then
    local r = split(rec)
    local held = N(r[2])
    delta, create = held - actual, false
    -- An expired record (X) released its hold when it was reaped.
    if kind == 'L' then release_hold(held, r[3], r[4], r[5], r[6]) end
  end
  if tpm > 0 then tok_add('t', tpm, delta, create) end
  if m ~= '' and mtpm > 0 then tok_add(month_names(m).t, mtpm, delta, create) end
  if kid ~= '' and ktpm > 0 then tok_add(key_prefix(kid) .. 't', ktpm, delta, create) end
  add('delta', actual)
  model_add('d', m, actual, mtpm > 0)
  key_add('kd', kid, actual)
  if op == 'cancel' then
    record(id, 'C', now + TOMB)
  else
    record(id, 'S|' .. gen, now + TOMB)
  end
  finish()
  return {1, now, gen}
end

if op == 'release' then
  -- ARGV 6: id. Frees a live record's concurrency slot now.
  local id = ARGV[6]
  local rec = redis.call('HGET', KR, id)
  if rec and string.sub(rec, 1, 1) == 'L' then
    local r = split(rec)
    if r[5] == '1' then
      load({'inflight', 'gen'})
      release_hold(0, r[3], r[4], '1', r[6])
      redis.call('HSET', KR, id,
        'L|' .. r[2] .. '|' .. r[3] .. '|' .. r[4] .. '|0|' .. (r[6] or ''))
      finish()
    end
  end
  return {1, now}
end

if op == 'renew' then
  -- ARGV 6: lease ms, 7: gen candidate; then six for each of the calling instance's
  -- reservations not yet settled (as `newgen`'s): id, tokens, model id ('' none), 1 if the
  -- model has limits of its own, 1 if it holds a concurrency slot, key id ('' none).
  -- Extends the leases of live records. One that Redis no longer holds live, its lease having
  -- run out while Redis stalled (let go as an instance's that died: `X`) or Redis having lost
  -- it (restarted or flushed), is held again, in the current generation: the instance still
  -- runs its request, and without its hold the month and the concurrency limit were used again
  -- on top of it (an outside audit: 1.35 times a quota after a 33 s stall). A settled or
  -- cancelled one (its tombstone) is left alone.
  local lease, cand = N(ARGV[6]), ARGV[7]
  local until_ = now + lease * 1000
  local ids = {}
  for i = 8, #ARGV - 5, 6 do ids[#ids + 1] = ARGV[i] end
  local renewed = 0
  if #ids > 0 then
    -- What expired is reaped first, and the holds of records whose keys expired with no call
    -- since are dropped (`reap`): held again on top of those (the first call after an outage
    -- longer than the records' life, as Redis answers again, is this one), requests already
    -- ended held slots and tokens for two records' lives more (an outside audit: every
    -- request refused `concurrent_requests` for a minute after a 70 s outage).
    load({'keep', 'exp', 'rexp', 'rp', 'inflight', 'gen', 'mk', 'based', 'res'})
    reap()
    local recs = redis.call('HMGET', KR, unpack(ids))
    local scores = {}
    local loaded = false
    for k, id in ipairs(ids) do
      local kind = recs[k] and string.sub(recs[k], 1, 1)
      if kind == 'L' then
        scores[#scores + 1] = S(until_)
        scores[#scores + 1] = id
        renewed = renewed + 1
      elseif not kind or kind == 'X' then
        if not loaded then
          load({'keep', 'inflight', 'gen', 'mk', 'based', 'res'})
          loaded = true
        end
        local gen = month_counter(cand)
        local i = 8 + (k - 1) * 6
        local tokens, m, limited = N(ARGV[i + 1]) or 0, ARGV[i + 2], ARGV[i + 3] == '1'
        local slot, kid = ARGV[i + 4] == '1' and '1' or '0', ARGV[i + 5]
        add('res', tokens)
        model_add('r', m, tokens, limited)
        key_add('kr', kid, tokens)
        if slot == '1' then add('inflight', 1) end
        record(id, 'L|' .. S(tokens) .. '|' .. gen .. '|' .. m .. '|' .. slot .. '|' .. kid, until_)
        renewed = renewed + 1
      end
    end
    if #scores > 0 then
      redis.call('ZADD', KE, 'XX', unpack(scores))
      records_written = true
    end
    if renewed > 0 then
      load({'keep'})
      keep_until(until_)
      finish()
    end
  end
  return {1, now, renewed}
end

if op == 'usage' then
  -- ARGV 6..: gen candidate, rate, burst capacity, tpm, need base, the key's id ('' none),
  -- rate, burst capacity, tpm, month cap, then model/model tpm pairs (the models with limits of
  -- their own)
  local cand = ARGV[6]
  local rate, rcap, tpm = N(ARGV[7]), N(ARGV[8]), N(ARGV[9])
  local kid, krate, krcap, ktpm, kmcap = ARGV[11], N(ARGV[12]), N(ARGV[13]), N(ARGV[14]), N(ARGV[15])
  load_for(rate, tpm, '', 0)
  load_key(kid, krate, ktpm)
  if #ARGV > 15 then
    local fields = {}
    for i = 16, #ARGV - 1, 2 do
      local mn = month_names(ARGV[i])
      fields[#fields + 1] = mn.b
      fields[#fields + 1] = mn.d
      fields[#fields + 1] = mn.r
      if N(ARGV[i + 1]) > 0 then
        local b = bucket(mn.t)
        fields[#fields + 1] = b[1]
        fields[#fields + 1] = b[2]
        fields[#fields + 1] = b[3]
      end
    end
    load(fields)
  end
  reap()
  local gen, based, mk = month_counter(cand)
  finish()
  if (not based and ARGV[10] == '1') or (kid ~= '' and kmcap > 0 and not state['kb:' .. kid]) then
    return {2, now, gen, mk}
  end
  local rr, rf = 0, 0
  if rate > 0 then
    local level, at, rq = req_load(rcap, rate)
    rr, rf = req_view(level, at, rcap, rq)
  end
  local tr, tf, balance = tok_view(tpm)
  local settled, reserved = month_used()
  local reply = views({1, now, rr, rf, tr, tf, balance, settled, reserved, state.inflight or 0, mk,
    gen}, kid, krate, krcap, ktpm, '', 0, 0)
  -- The key's five numbers are always there: zeros without a key.
  if kid == '' then for _ = 1, 5 do reply[#reply + 1] = 0 end end
  -- Then, per model asked about: tokens left this minute, when whole again, used this month.
  for i = 16, #ARGV - 1, 2 do
    local m = ARGV[i]
    local mr, mf = tok_view(N(ARGV[i + 1]), month_names(m).t)
    reply[#reply + 1] = mr
    reply[#reply + 1] = mf
    reply[#reply + 1] = model_used(m)
  end
  return reply
end

if op == 'base' then
  -- ARGV 6..: gen, window ms, tokens, the number of keys, key/tokens pairs (keys with limits of
  -- their own), then model/tokens/limited triples (limited models first, each counted apart
  -- whatever the bound). Sets the ledger's total for what generation `gen` did not count; later
  -- calls within the window may only raise it (the ledger only grows, and what lagged behind a
  -- flush arrives). A key not based yet in this generation is based whatever the window.
  local gen, window, base, nkeys = ARGV[6], N(ARGV[7]), N(ARGV[8]), N(ARGV[9])
  local first = 10 + 2 * nkeys
  local fields = {'gen', 'based', 'born', 'base', 'keep', 'mn'}
  for i = 10, first - 1, 2 do fields[#fields + 1] = 'kb:' .. ARGV[i] end
  for i = first, #ARGV - 2, 3 do
    fields[#fields + 1] = 'mb:' .. ARGV[i]
    fields[#fields + 1] = 'md:' .. ARGV[i]
    fields[#fields + 1] = 'mr:' .. ARGV[i]
  end
  load(fields)
  if state.gen ~= gen then return {0, now} end
  local may_raise = not (state.based == '1' and now - (state.born or 0) > window * 1000)
  for i = 10, first - 1, 2 do
    local f = 'kb:' .. ARGV[i]
    if not state[f] then
      put(f, N(ARGV[i + 1]))
    elseif may_raise then
      put(f, math.max(state[f] or 0, N(ARGV[i + 1])))
    end
  end
  if not may_raise then
    finish()
    return {0, now}
  end
  put('base', math.max(state.base or 0, base))
  put('based', '1')
  for i = first, #ARGV - 2, 3 do
    local m = ARGV[i]
    local want = N(ARGV[i + 1])
    local had = state['mb:' .. m] or 0
    if want > had then model_add('b', m, want - had, ARGV[i + 2] == '1') end
  end
  finish()
  return {1, now}
end

if op == 'newgen' then
  -- ARGV 6: gen candidate; then what this instance used on its own (Redis down) that the shared
  -- state is to take in (`Carry` in redis.rs): 7: how long (ms) to hold its requests still
  -- running; 8, 9: the request bucket's rate and capacity, 10: the nano-requests to take from
  -- it; 11: tokens per minute, 12: the tokens to take from it; 13: n, the requests still
  -- running, then six for each: its reservation id, its tokens, its model's id ('' none), 1 if
  -- the model has limits of its own, 1 if it holds a concurrency slot, its key's id ('' none);
  -- then, five at a time, what to take from a key's or a model's own buckets: kind (`kr` a
  -- key's requests, `kt` a key's tokens, `mt` a model's tokens), the key's or model's id, the
  -- rate (or tokens per minute), the capacity (requests; 0 for tokens), and what to take
  -- (nano-requests or tokens).
  -- Starts a new generation of the month counter (after this instance enforced limits on its
  -- own for a while, or to rebuild it from the ledger). Each request still running becomes a
  -- live reservation of the new generation under its own id, as if Redis had admitted it (its
  -- lease renewed by the instance as its own are): the ledger has none of its tokens yet, and
  -- without it the shared counter would let the month be used again while it runs. It is
  -- settled (or its slot freed) through Redis like any other, its usage counted once, in this
  -- generation. The buckets, refilled while Redis was away, lose what the instance's share of
  -- them lacks.
  -- A carry is sent again under the same id when its call failed (it timed out on its way, or
  -- while Redis stalled, and may have been run all the same): the id's record, left by the one
  -- that ran for a tombstone's life, says it was taken in, and it is not taken in twice.
  if redis.call('HEXISTS', KR, ARGV[6]) == 1 then return {1, now, ARGV[6]} end
  local rate, rcap, rtake = N(ARGV[8] or '0') or 0, N(ARGV[9] or '0') or 0, N(ARGV[10] or '0') or 0
  local tpm, ttake = N(ARGV[11] or '0') or 0, N(ARGV[12] or '0') or 0
  local running = N(ARGV[13] or '0') or 0
  load({'keep', 'exp', 'rexp', 'rp', 'rl', 'ra', 'rc', 'rq', 'tl', 'ta', 'tc', 'inflight', 'gen', 'mk',
    'res', 'base', 'delta'})
  -- As `renew`: what expired, and the holds of records gone with their keys, go first.
  reap()
  -- The new generation keeps the holds of the reservations still live (the month's, the
  -- models', the keys'), and the live records are counted in it from now on: every instance
  -- that served the workspace on its own starts a generation at its switch back, and each
  -- one dropping the holds let the month be used again on top of requests still running (an
  -- outside audit: 1.5 times a quota at one switch back, 2.2 times with a breaker tripping
  -- again and again). Their settlements then count in the new generation's `delta` and are
  -- recorded in the ledger under it, which its `base` leaves out: each once, as before.
  -- It also starts from what the old one counted (its base and what it settled; the models'
  -- and the keys' alike), which the ledger's totals, read again for the new one, may only
  -- raise: settlements of the old generation that the ledger has not had yet (they wait a
  -- flush, up to 250 ms) were lost from the counter until they were, and another instance
  -- admitted a request past the month quota (an outside audit: a carry after one timed-out
  -- call landed right after a request's settlement, 6,080 of 6,000). Nothing of it is counted
  -- twice: the ledger's totals for the new generation leave out only its own settlements.
  local old, mk = state.gen, month_of(now)
  local keeps = old and state.mk == mk
  local held, res = {}, keeps and (state.res or 0) or 0
  local counted, prior = {}, keeps and ((state.base or 0) + (state.delta or 0)) or 0
  if keeps then
    local all = redis.call('HGETALL', KS)
    for i = 1, #all, 2 do
      local p = string.sub(all[i], 1, 3)
      if p == 'mr:' or p == 'kr:' then held[all[i]] = N(all[i + 1]) end
      if p == 'mb:' or p == 'md:' or p == 'kb:' or p == 'kd:' then
        -- `mb:`/`md:` into `mb:`, `kb:`/`kd:` into `kb:`.
        local f = string.sub(p, 1, 1) .. 'b:' .. string.sub(all[i], 4)
        counted[f] = (counted[f] or 0) + (N(all[i + 1]) or 0)
      end
    end
  end
  new_generation(mk, ARGV[6])
  if keeps then
    put('res', res)
    if prior > 0 then put('base', prior) end
    local models = {}
    for f, v in pairs(held) do
      if v > 0 then
        put(f, v)
        if string.sub(f, 1, 3) == 'mr:' then models[string.sub(f, 4)] = true end
      end
    end
    for f, v in pairs(counted) do
      if v > 0 then
        put(f, v)
        if string.sub(f, 1, 3) == 'mb:' then models[string.sub(f, 4)] = true end
      end
    end
    local n = 0
    for _ in pairs(models) do n = n + 1 end
    put('mn', n)
    local records = redis.call('HGETALL', KR)
    local retag = {}
    local function flush()
      if #retag > 0 then
        redis.call('HSET', KR, unpack(retag))
        records_written = true
        retag = {}
      end
    end
    for i = 1, #records, 2 do
      local rec = records[i + 1]
      if string.sub(rec, 1, 1) == 'L' then
        local r = split(rec)
        if r[3] == old then
          retag[#retag + 1] = records[i]
          retag[#retag + 1] = 'L|' .. r[2] .. '|' .. ARGV[6] .. '|' .. r[4] .. '|' .. r[5] .. '|' .. (r[6] or '')
          -- `unpack` takes a few thousand values at most.
          if #retag >= 1000 then flush() end
        end
      end
    end
    flush()
  end
  local until_ = now + (N(ARGV[7] or '0') or 0) * 1000
  for i = 14, 13 + running * 6, 6 do
    local id, tokens, m, limited = ARGV[i], N(ARGV[i + 1]) or 0, ARGV[i + 2], ARGV[i + 3] == '1'
    local slot, kid = ARGV[i + 4] == '1' and '1' or '0', ARGV[i + 5]
    -- A record live already (this instance's own, or a retry of this call that landed) is left
    -- as it is; one let go when its lease ran out (`X`) is held again.
    local rec = redis.call('HGET', KR, id)
    if not rec or string.sub(rec, 1, 1) == 'X' then
      add('res', tokens)
      model_add('r', m, tokens, limited)
      key_add('kr', kid, tokens)
      if slot == '1' then add('inflight', 1) end
      record(id, 'L|' .. S(tokens) .. '|' .. ARGV[6] .. '|' .. m .. '|' .. slot .. '|' .. kid, until_)
    end
  end
  if rate > 0 and rtake > 0 then
    local level, at = req_load(rcap, rate)
    level = math.max(level - rtake, 0)
    put('rl', level)
    put('ra', at)
    put('rc', rcap)
    put('rq', rate)
    local _, full = req_view(level, at, rcap, rate)
    keep_until(full)
  end
  if tpm > 0 and ttake > 0 then tok_add('t', tpm, -ttake, true) end
  for i = 14 + running * 6, #ARGV - 4, 5 do
    local kind, id, a, b, take = ARGV[i], ARGV[i + 1], N(ARGV[i + 2]), N(ARGV[i + 3]), N(ARGV[i + 4])
    if kind == 'kr' and a > 0 and take > 0 then
      local p = key_prefix(id)
      load({p .. 'rl', p .. 'ra', p .. 'rc', p .. 'rq'})
      local level, at = req_load(b, a, p)
      level = math.max(level - take, 0)
      put(p .. 'rl', level)
      put(p .. 'ra', at)
      put(p .. 'rc', b)
      put(p .. 'rq', a)
      local _, full = req_view(level, at, b, a)
      keep_until(full)
    elseif (kind == 'kt' or kind == 'mt') and a > 0 and take > 0 then
      local p = kind == 'kt' and key_prefix(id) .. 't' or month_names(id).t
      load(bucket(p))
      tok_add(p, a, -take, true)
    end
  end
  record(ARGV[6], 'C', now + TOMB)
  finish()
  return {1, now, ARGV[6]}
end

return redis.error_reply('tiergate: unknown op ' .. tostring(op))
end
