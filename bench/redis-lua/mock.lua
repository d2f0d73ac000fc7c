-- Runs tiergate's Redis limiter code (src/limiter/redis.lua) in plain Lua 5.1, with an in-memory
-- stand-in for `redis.call`, to time and profile the Lua work of a call apart from Redis's own
-- commands. The stand-in keeps hashes; sorted sets, expiries and TTLs answer as if nothing had
-- expired. It is a measuring tool, not a test of the code: tests/redis_limiter.rs runs the code
-- in Redis.
--
--   lua5.1 bench/redis-lua/mock.lua [calls]             # µs per call, allocation per call
--   lua5.1 bench/redis-lua/mock.lua [calls] profile     # VM instructions by function
--
-- Each round is one reserve (every limit set, one model) and its settle, with the server's clock,
-- as the gateway calls them.

local here = (arg[0]:match('^(.*)/[^/]*$') or '.')
local n = tonumber(arg[1] or '10000')
local profile = arg[2] == 'profile'

local DB = {}
local calls = 0
local function hash(k)
  local h = DB[k]
  if not h then h = {}; DB[k] = h end
  return h
end
local clock = 1796435277000000
redis = {}
function redis.call(cmd, ...)
  calls = calls + 1
  local a = {...}
  if cmd == 'TIME' then
    clock = clock + 1000
    return {tostring(math.floor(clock / 1000000)), tostring(clock % 1000000)}
  elseif cmd == 'HMGET' then
    local h, out = hash(a[1]), {}
    for i = 2, #a do out[i - 1] = h[a[i]] or false end
    return out
  elseif cmd == 'HGET' then
    return hash(a[1])[a[2]] or false
  elseif cmd == 'HSET' then
    local h = hash(a[1])
    for i = 2, #a, 2 do h[a[i]] = tostring(a[i + 1]) end
    return 1
  elseif cmd == 'HDEL' then
    local h = hash(a[1])
    for i = 2, #a do h[a[i]] = nil end
    return 1
  elseif cmd == 'HKEYS' then
    local out = {}
    for k in pairs(hash(a[1])) do out[#out + 1] = k end
    return out
  elseif cmd == 'ZRANGEBYSCORE' then
    return {}
  elseif cmd == 'PTTL' then
    return 100000
  elseif cmd == 'ZADD' or cmd == 'ZREM' or cmd == 'PEXPIRE' then
    return 1
  end
  error('mock: no ' .. cmd)
end
function redis.error_reply(s) return {err = s} end

-- The code defines `local function run(KEYS, ARGV)`; made global here to be called.
local f = assert(io.open(here .. '/../../src/limiter/redis.lua')):read('*a')
f = f:gsub('\nlocal function run%(KEYS, ARGV%)', '\nfunction run(KEYS, ARGV)')
assert(loadstring(f, '=redis.lua'))()

local M = '5311023b2dd66fb0'
local K = {'{b:1}', '{b:1}:r', '{b:1}:e'}
local function reserve(i)
  return run(K, {'reserve', '0', '600000', '31000', '10000', 'id' .. i, '30000', 'cand' .. i,
    '1000000000', '1000000000000000', '10000000000', '1000000000000000', '100000', M, '0', '0',
    '9', '33', '0', '', '0', '0', '0', '0'})
end
local function settle(i)
  return run(K, {'settle', '0', '600000', '31000', '10000', 'id' .. i, 'cand' .. i, '106',
    '10000000000', M, '0', '', '0'})
end
local r = reserve(0)
if r[1] == 2 then
  run(K, {'base', '0', '600000', '31000', '10000', r[3], '60000', '0', '0', M, '0', '0'})
  r = reserve(0)
end
assert(r[1] == 1, 'not admitted: ' .. tostring(r[1]))

local counts = {}
if profile then
  debug.sethook(function()
    local info = debug.getinfo(2, 'Sn')
    if info then
      local k = string.format('%s:%d %s', info.short_src, info.linedefined or 0, tostring(info.name))
      counts[k] = (counts[k] or 0) + 1
    end
  end, '', 37)
end
calls = 0
collectgarbage('collect')
local kb0 = collectgarbage('count')
collectgarbage('stop')
local t0 = os.clock()
for i = 1, n do
  assert(reserve(i)[1] == 1)
  settle(i)
end
local dt = os.clock() - t0
local kb = collectgarbage('count') - kb0
collectgarbage('restart')
debug.sethook()
if not profile then
  print(string.format('%.2f µs per call (GC stopped), %.1f KB allocated and %.1f redis.call per call',
    dt / (2 * n) * 1e6, kb / (2 * n), calls / (2 * n)))
else
  -- The sampling hook's own work would be counted in time and allocation: not printed.
  local list, total = {}, 0
  for k, v in pairs(counts) do list[#list + 1] = {k, v}; total = total + v end
  table.sort(list, function(a, b) return a[2] > b[2] end)
  print('VM instructions by function (sampled; C functions such as tonumber are not counted):')
  for i = 1, math.min(25, #list) do
    print(string.format('%5.1f%%  %s', list[i][2] * 100 / total, list[i][1]))
  end
end
