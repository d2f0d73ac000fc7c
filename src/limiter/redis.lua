-- tiergate's limiter in Redis: one script, one call per decision, run atomically by the server.
--
-- It makes the same decisions as `limiter/core.rs`, in the same units (see that file): time in
-- microseconds, requests in nano-requests, tokens in 1/60000 units credited per millisecond.
-- Every number stays an integer below 2^53, so doubles compute them exactly. Numbers are
-- written with string.format('%d') so that no exponent notation reaches a hash.
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
--   mk gen based born base delta res
--                     the month counter: month key, generation id, whether `base` was read from
--                     the ledger, when the generation began, the ledger's total for what this
--                     generation did not count itself, what it counted (settled), what is held
--   mb:<m> md:<m> mr:<m>
--                     the same three for model <m>
-- Records (KEYS[2]):
--   L|tokens|gen|model|slot   live reservation
--   X|tokens|gen|model        its lease expired (the instance is presumed gone): its month hold
--                             and slot were released; a late settlement still counts once
--   S|gen                     settled (tombstone; a second settlement answers the same)
--   C                         cancelled before its reservation was known to the caller

local KS, KR, KE = KEYS[1], KEYS[2], KEYS[3]
local NR = 1000000000 -- nano-requests per request
local U = 60000       -- token units per token
local REAP = 64       -- expired records handled per call, at most

local function S(n) return string.format('%d', n) end
local function N(v) return tonumber(v) end
local function ceil_div(a, b) return math.floor((a + b - 1) / b) end
local function clamp(x, lo, hi)
  if x < lo then return lo elseif x > hi then return hi end
  return x
end

local function clock(arg)
  local n = tonumber(arg)
  if n and n > 0 then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The calendar month (UTC) of a microsecond, as year * 12 + month - 1 (civil_from_days).
local function month_of(now)
  local z = math.floor(now / 86400000000) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y * 12 + m - 1
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
-- Buckets (the same arithmetic as core.rs)

local function req_at(l, a, c, cap, rate, now)
  if not l then return cap, now end
  local level = math.min(l + cap - c, cap)
  if now <= a then return level, a end
  local deficit = cap - level
  if deficit <= 0 then return cap, now end
  local elapsed = now - a
  if elapsed >= ceil_div(deficit, rate) then return cap, now end
  return level + elapsed * rate, now
end

local function tok_at(l, a, c, cap, now)
  local capu = cap * U
  if not l then return capu, now end
  local level = clamp(l + (cap - c) * U, -capu, capu)
  if now <= a then return level, a end
  local deficit = capu - level
  if deficit <= 0 then return capu, now end
  local ms = math.floor((now - a) / 1000)
  if ms >= ceil_div(deficit, cap) then return capu, now end
  return level + ms * cap, a + ms * 1000
end

local function tok_available_at(level, at, cap, cost, now)
  local need = cost * U - level
  if need <= 0 then return now end
  return at + ceil_div(need, cap) * 1000
end

local function tok_full_at(level, at, cap, now)
  local missing = cap * U - level
  if missing <= 0 then return now end
  return at + ceil_div(missing, cap) * 1000
end

-- A token bucket stored under prefix p ('t' or 'mt:<m>:'): returns level, at, and whether it
-- exists.
local function tok_load(p, cap, now)
  local v = redis.call('HMGET', KS, p .. 'l', p .. 'a', p .. 'c')
  local l, a, c = N(v[1]), N(v[2]), N(v[3])
  local level, at = tok_at(l, a, c, cap, now)
  return level, at, l ~= nil
end

local function tok_store(p, level, at, cap)
  redis.call('HSET', KS, p .. 'l', S(level), p .. 'a', S(at), p .. 'c', S(cap))
end

-- Adds `tokens` (negative takes) to bucket p, within one minute of debt and the capacity.
local function tok_add(p, cap, tokens, now, create)
  local level, at, exists = tok_load(p, cap, now)
  if not exists and not create then return end
  local capu = cap * U
  tok_store(p, clamp(level + tokens * U, -capu, capu), at, cap)
end

-- ---------------------------------------------------------------------------------------------
-- The month counter

local function model_fields_of_month()
  local fields = {}
  for _, f in ipairs(redis.call('HKEYS', KS)) do
    local p = string.sub(f, 1, 3)
    if p == 'mb:' or p == 'md:' or p == 'mr:' then fields[#fields + 1] = f end
  end
  return fields
end

-- A call that creates the key here may write nothing else (a read, a denial), so a key without
-- a TTL gets `idle` ms.
local function new_generation(mk, gen, now, idle)
  local old = model_fields_of_month()
  if #old > 0 then redis.call('HDEL', KS, unpack(old)) end
  redis.call('HSET', KS, 'mk', S(mk), 'gen', gen, 'based', '0', 'born', S(now),
    'base', '0', 'delta', '0', 'res', '0')
  if redis.call('PTTL', KS) < 0 then redis.call('PEXPIRE', KS, S(idle)) end
end

-- The counter of the month of `now`: starts a new, unbased generation when there is none (a
-- flushed or expired key) or it belongs to an earlier month. Returns gen, based.
local function month_counter(now, candidate, idle)
  local mk = month_of(now)
  local v = redis.call('HMGET', KS, 'mk', 'gen', 'based')
  if N(v[1]) ~= mk or not v[2] then
    new_generation(mk, candidate, now, idle)
    return candidate, false, mk
  end
  return v[2], v[3] == '1', mk
end

local function hincr(field, n)
  if n ~= 0 then redis.call('HINCRBY', KS, field, S(n)) end
end

-- Adds n to a model's month field, dropping the model's fields once all three are 0, so that
-- names a client makes up (and the upstream refuses) leave nothing behind.
local function model_incr(kind, m, n)
  if m == '' or n == 0 then return end
  local after = redis.call('HINCRBY', KS, 'm' .. kind .. ':' .. m, S(n))
  if after == 0 then
    local f = {'mb:' .. m, 'md:' .. m, 'mr:' .. m}
    local v = redis.call('HMGET', KS, f[1], f[2], f[3])
    if (N(v[1]) or 0) == 0 and (N(v[2]) or 0) == 0 and (N(v[3]) or 0) == 0 then
      redis.call('HDEL', KS, f[1], f[2], f[3])
    end
  end
end

local function month_used()
  local v = redis.call('HMGET', KS, 'base', 'delta', 'res')
  return (N(v[1]) or 0) + (N(v[2]) or 0), N(v[3]) or 0
end

local function model_used(m)
  local v = redis.call('HMGET', KS, 'mb:' .. m, 'md:' .. m, 'mr:' .. m)
  return (N(v[1]) or 0) + (N(v[2]) or 0) + (N(v[3]) or 0)
end

-- ---------------------------------------------------------------------------------------------
-- Records and leases

-- Releases what a live record holds in the month counter and its slot.
local function release_hold(tokens, gen, m, slot)
  local current = redis.call('HGET', KS, 'gen')
  if current == gen then
    hincr('res', -tokens)
    model_incr('r', m, -tokens)
  end
  if slot == '1' then
    local left = redis.call('HINCRBY', KS, 'inflight', -1)
    if left < 0 then redis.call('HSET', KS, 'inflight', '0') end
  end
end

-- The records live until the last of them expires, and a second more.
local function expire_records(now)
  local last = redis.call('ZRANGE', KE, -1, -1, 'WITHSCORES')
  if last[2] then
    local rttl = math.max(1000, ceil_div(N(last[2]) - now, 1000) + 1000)
    redis.call('PEXPIRE', KR, S(rttl))
    redis.call('PEXPIRE', KE, S(rttl))
  end
end

-- Expired leases: the instance that holds them is presumed gone. Their month hold and slot are
-- released; the record stays as X (with what it took from the buckets) until its tombstone
-- ends, so that a late settlement still counts once. The keys are kept that long here, since
-- the call that reaps may be one that writes nothing else (a read, a denial).
local function reap(now, tomb)
  local ids = redis.call('ZRANGEBYSCORE', KE, '-inf', S(now), 'LIMIT', 0, REAP)
  local kept = false
  for _, id in ipairs(ids) do
    local rec = redis.call('HGET', KR, id)
    if rec and string.sub(rec, 1, 1) == 'L' then
      local r = split(rec)
      release_hold(N(r[2]), r[3], r[4], r[5])
      redis.call('HSET', KR, id, 'X|' .. r[2] .. '|' .. r[3] .. '|' .. r[4])
      redis.call('ZADD', KE, S(now + tomb), id)
      kept = true
    else
      redis.call('HDEL', KR, id)
      redis.call('ZREM', KE, id)
    end
  end
  if kept then expire_records(now) end
end

-- Keys live while anything in them matters: at least `idle` ms after the last call, at least
-- until every bucket written is full again (`until_us`), and the records until their last
-- expiry. A key that expires loses nothing the ledger does not have.
local function expire(now, idle, until_us)
  local ttl = math.max(idle, ceil_div(until_us - now, 1000))
  local current = redis.call('PTTL', KS)
  if current > ttl then ttl = current end
  redis.call('PEXPIRE', KS, S(ttl))
  expire_records(now)
end

-- ---------------------------------------------------------------------------------------------
-- Views

-- Requests window: remaining, full_at.
local function req_view(rate, cap, now)
  if rate == 0 then return 0, 0 end
  local v = redis.call('HMGET', KS, 'rl', 'ra', 'rc')
  local level, at = req_at(N(v[1]), N(v[2]), N(v[3]), cap, rate, now)
  return math.floor(math.max(level, 0) / NR), at + ceil_div(cap - level, rate)
end

-- Tokens window: remaining, full_at, balance (whole tokens, truncated toward zero).
local function tok_view(tpm, now)
  if tpm == 0 then return 0, 0, 0 end
  local level, at = tok_load('t', tpm, now)
  local balance
  if level >= 0 then balance = math.floor(level / U) else balance = -math.floor(-level / U) end
  return math.floor(math.max(level, 0) / U), tok_full_at(level, at, tpm, now), balance
end

-- ---------------------------------------------------------------------------------------------
-- Operations

local op = ARGV[1]
local now = clock(ARGV[2])

if op == 'heartbeat' then
  -- ARGV: op, now, instance id, ttl ms. Answers {now, instances, rank of this one}.
  local id, ttl = ARGV[3], N(ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KS, '-inf', S(now))
  redis.call('ZADD', KS, S(now + ttl * 1000), id)
  redis.call('PEXPIRE', KS, S(ttl * 10))
  local members = redis.call('ZRANGE', KS, 0, -1)
  table.sort(members)
  local rank = 0
  for i, m in ipairs(members) do if m == id then rank = i - 1 end end
  return {now, #members, rank}
end

if op == 'reserve' then
  -- ARGV: op, now, id, lease ms, tomb ms, idle ms, gen candidate,
  --       rate, burst capacity, tpm, month cap, concurrency, model, model tpm, model month,
  --       prompt, estimate, need base (1 when the caller wants the month exact)
  local id, lease, tomb, idle, cand = ARGV[3], N(ARGV[4]), N(ARGV[5]), N(ARGV[6]), ARGV[7]
  local rate, rcap, tpm, mcap, conc = N(ARGV[8]), N(ARGV[9]), N(ARGV[10]), N(ARGV[11]), N(ARGV[12])
  local m, mtpm, mmcap = ARGV[13], N(ARGV[14]), N(ARGV[15])
  local prompt, estimate = N(ARGV[16]), N(ARGV[17])
  reap(now, tomb * 1000)
  local known = redis.call('HGET', KR, id)
  if known then
    -- The same reservation again (a client that re-sent the call after losing the answer):
    -- it was admitted once and is answered so, taking nothing more. A cancelled id is refused.
    if string.sub(known, 1, 1) ~= 'L' then return {3, now} end
    local r = split(known)
    local rr, rf = req_view(rate, rcap, now)
    local tr, tf = tok_view(tpm, now)
    local settled, reserved = month_used()
    return {1, now, N(r[2]), r[3], rr, rf, tr, tf, settled + reserved, month_of(now)}
  end
  local gen, based, mk = month_counter(now, cand, idle)
  if not based and (mcap > 0 or mmcap > 0 or ARGV[18] == '1') then
    return {2, now, gen, mk}
  end

  -- What may be reserved: the estimate, capped by the smallest token capacity.
  local best_kind, best_limit, best_at = -1, 0, 0
  local function candidate(kind, limit, at)
    if kind > best_kind or (kind == best_kind and at >= best_at) then
      best_kind, best_limit, best_at = kind, limit, at
    end
  end
  local tokens = math.max(estimate, prompt)
  local caps = {{tpm, 2}, {mcap, 3}, {mtpm, 5}, {mmcap, 6}}
  for _, c in ipairs(caps) do
    if c[1] > 0 then
      if prompt > c[1] then candidate(2, c[2], 0) end
      tokens = math.min(tokens, c[1])
    end
  end
  tokens = math.max(tokens, prompt)

  local rlevel, rat
  if rate > 0 then
    local v = redis.call('HMGET', KS, 'rl', 'ra', 'rc')
    rlevel, rat = req_at(N(v[1]), N(v[2]), N(v[3]), rcap, rate, now)
    local need = NR - rlevel
    if need > 0 then candidate(0, 1, rat + ceil_div(need, rate)) end
  end
  local inflight = N(redis.call('HGET', KS, 'inflight')) or 0
  if conc > 0 and inflight >= conc then candidate(0, 4, now + 1000000) end
  local tlevel, tat
  if tpm > 0 then
    tlevel, tat = tok_load('t', tpm, now)
    local at = tok_available_at(tlevel, tat, tpm, tokens, now)
    if at > now and tokens <= tpm then candidate(0, 2, at) end
  end
  local settled, reserved = month_used()
  if mcap > 0 and settled + reserved + tokens > mcap and tokens <= mcap then
    candidate(1, 3, 0)
  end
  local mlevel, mat
  if m ~= '' and mtpm > 0 then
    mlevel, mat = tok_load('mt:' .. m .. ':', mtpm, now)
    local at = tok_available_at(mlevel, mat, mtpm, tokens, now)
    if at > now and tokens <= mtpm then candidate(0, 5, at) end
  end
  if m ~= '' and mmcap > 0 and model_used(m) + tokens > mmcap and tokens <= mmcap then
    candidate(1, 6, 0)
  end

  if best_kind >= 0 then
    local rr, rf = req_view(rate, rcap, now)
    local tr, tf = tok_view(tpm, now)
    return {0, now, best_kind, best_limit, best_at, rr, rf, tr, tf, settled + reserved, mk}
  end

  -- Admit: take from every limit.
  local until_us = now
  if rate > 0 then
    redis.call('HSET', KS, 'rl', S(rlevel - NR), 'ra', S(rat), 'rc', S(rcap))
    until_us = math.max(until_us, rat + ceil_div(rcap - rlevel + NR, rate))
  end
  local slot = '0'
  if conc > 0 then
    redis.call('HSET', KS, 'inflight', S(inflight + 1))
    slot = '1'
  end
  if tpm > 0 then
    local capu = tpm * U
    local level = clamp(tlevel - tokens * U, -capu, capu)
    tok_store('t', level, tat, tpm)
    until_us = math.max(until_us, tok_full_at(level, tat, tpm, now))
  end
  hincr('res', tokens)
  if m ~= '' then
    model_incr('r', m, tokens)
    if mtpm > 0 then
      local capu = mtpm * U
      local level = clamp(mlevel - tokens * U, -capu, capu)
      tok_store('mt:' .. m .. ':', level, mat, mtpm)
      until_us = math.max(until_us, tok_full_at(level, mat, mtpm, now))
    end
  end
  redis.call('HSET', KR, id, 'L|' .. S(tokens) .. '|' .. gen .. '|' .. m .. '|' .. slot)
  redis.call('ZADD', KE, S(now + lease * 1000), id)
  expire(now, idle, until_us)
  local rr, rf = req_view(rate, rcap, now)
  local tr, tf = tok_view(tpm, now)
  settled, reserved = month_used()
  return {1, now, tokens, gen, rr, rf, tr, tf, settled + reserved, mk}
end

if op == 'settle' or op == 'cancel' then
  -- ARGV: op, now, id, tomb ms, idle ms, gen candidate, actual, tpm, model, model tpm
  -- Settles once: a live record is replaced by its actual usage; an expired one (X) counts its
  -- usage and returns what it took from the buckets; one the server no longer knows (flushed)
  -- counts its usage as new. `cancel` settles a live record to 0 and, when there is none,
  -- leaves a tombstone so that a reservation arriving late is refused.
  local id, tomb, idle, cand = ARGV[3], N(ARGV[4]), N(ARGV[5]), ARGV[6]
  local actual, tpm, m, mtpm = N(ARGV[7]), N(ARGV[8]), ARGV[9], N(ARGV[10])
  reap(now, tomb * 1000)
  local rec = redis.call('HGET', KR, id)
  local kind = rec and string.sub(rec, 1, 1)
  if kind == 'S' then return {1, now, string.sub(rec, 3)} end
  if kind == 'C' then return {1, now, ''} end
  if op == 'cancel' then
    if kind ~= 'L' then
      redis.call('HSET', KR, id, 'C')
      redis.call('ZADD', KE, S(now + tomb * 1000), id)
      expire(now, idle, now)
      return {1, now, ''}
    end
    actual = 0
  end
  local gen = month_counter(now, cand, idle)
  local held, delta, create = 0, -actual, true
  if kind == 'L' or kind == 'X' then
    local r = split(rec)
    held, create = N(r[2]), false
    delta = held - actual
    if kind == 'L' then release_hold(held, r[3], r[4], r[5]) end
    if r[4] ~= '' then m = r[4] end
  end
  if tpm > 0 then tok_add('t', tpm, delta, now, create) end
  if m ~= '' and mtpm > 0 then tok_add('mt:' .. m .. ':', mtpm, delta, now, create) end
  hincr('delta', actual)
  model_incr('d', m, actual)
  if op == 'cancel' then
    redis.call('HSET', KR, id, 'C')
  else
    redis.call('HSET', KR, id, 'S|' .. gen)
  end
  redis.call('ZADD', KE, S(now + tomb * 1000), id)
  expire(now, idle, now + 120000000)
  return {1, now, gen}
end

if op == 'release' then
  -- ARGV: op, now, id: frees a live record's concurrency slot now.
  local rec = redis.call('HGET', KR, ARGV[3])
  if rec and string.sub(rec, 1, 1) == 'L' then
    local r = split(rec)
    if r[5] == '1' then
      release_hold(0, r[3], r[4], '1')
      redis.call('HSET', KR, ARGV[3], 'L|' .. r[2] .. '|' .. r[3] .. '|' .. r[4] .. '|0')
    end
  end
  return {1, now}
end

if op == 'renew' then
  -- ARGV: op, now, lease ms, idle ms, ids...: extends the leases of live records.
  local lease, idle = N(ARGV[3]), N(ARGV[4])
  local renewed = 0
  for i = 5, #ARGV do
    local rec = redis.call('HGET', KR, ARGV[i])
    if rec and string.sub(rec, 1, 1) == 'L' then
      redis.call('ZADD', KE, S(now + lease * 1000), ARGV[i])
      renewed = renewed + 1
    end
  end
  if renewed > 0 then expire(now, idle, now) end
  return {1, now, renewed}
end

if op == 'usage' then
  -- ARGV: op, now, tomb ms, gen candidate, rate, burst capacity, tpm, need base, idle ms
  local tomb, cand = N(ARGV[3]), ARGV[4]
  local rate, rcap, tpm = N(ARGV[5]), N(ARGV[6]), N(ARGV[7])
  reap(now, tomb * 1000)
  local gen, based, mk = month_counter(now, cand, N(ARGV[9]))
  if not based and ARGV[8] == '1' then return {2, now, gen, mk} end
  local rr, rf = req_view(rate, rcap, now)
  local tr, tf, balance = tok_view(tpm, now)
  local settled, reserved = month_used()
  local inflight = N(redis.call('HGET', KS, 'inflight')) or 0
  return {1, now, rr, rf, tr, tf, balance, settled, reserved, inflight, mk, gen}
end

if op == 'base' then
  -- ARGV: op, now, gen, window ms, tokens, then model/tokens pairs. Sets the ledger's total for
  -- what generation `gen` did not count; later calls within the window may only raise it (the
  -- ledger only grows, and what lagged behind a flush arrives).
  local gen, window, base = ARGV[3], N(ARGV[4]), N(ARGV[5])
  local v = redis.call('HMGET', KS, 'gen', 'based', 'born')
  if v[1] ~= gen then return {0, now} end
  if v[2] == '1' and now - (N(v[3]) or 0) > window * 1000 then return {0, now} end
  local current = N(redis.call('HGET', KS, 'base')) or 0
  redis.call('HSET', KS, 'base', S(math.max(current, base)), 'based', '1')
  for i = 6, #ARGV - 1, 2 do
    local f = 'mb:' .. ARGV[i]
    local had = N(redis.call('HGET', KS, f)) or 0
    local want = N(ARGV[i + 1])
    if want > had then redis.call('HSET', KS, f, S(want)) end
  end
  return {1, now}
end

if op == 'newgen' then
  -- ARGV: op, now, gen candidate, idle ms: starts a new generation of the month counter (after
  -- this instance enforced limits on its own for a while, or to rebuild from the ledger).
  local mk = month_of(now)
  new_generation(mk, ARGV[3], now, N(ARGV[4]))
  return {1, now, ARGV[3]}
end

return redis.error_reply('tiergate: unknown op ' .. tostring(op))
