-- The tier's one Redis script: push pending deltas and read fleet totals for a batch of
-- scopes (sync), or check one request against several scopes and charge all or none (exact).
--
-- Keys and window semantics are LiteLLM v3's, so proxies with and without the tier agree: per
-- scope, KEYS holds `{scope}:window` (the window start in whole seconds), `{scope}:requests`
-- and `{scope}:tokens`. A window is fixed: it opens with the first charge after the previous
-- one ended and lasts `window` seconds; opening one deletes the scope's counters.
--
-- ARGV: window, now ('' means Redis TIME), check (1 = all-or-nothing check, 0 = sync), tokens,
-- then 7 per scope: rpm, tpm (0 = no limit; only read when checking), the requests and tokens
-- other proxies may have admitted locally and not pushed yet (kept back from the limit when
-- checking), and this process's pending delta (delta_window_start, requests, tokens).
--
-- Delta rules: a delta whose own window has ended is dropped, never charged to a later window;
-- one whose window is still open is charged to the scope's open window, and when Redis has no
-- open window (it restarted empty, or the key was evicted) the delta's window is restored. A
-- delta_window_start of 0 means no delta: the scope's window is opened if none is open.
--
-- A scope whose keys hold another type (WRONGTYPE) gets window_start -1 and no change: the
-- other scopes of the batch are still synced, and a check that names it charges nothing. Each
-- scope reads its keys before writing, so a failing scope leaves no partial charge behind. Any
-- other error (OOM, READONLY) fails the whole call, before its first write succeeds.
--
-- Returns: {allowed (1/0), denying scope (1-based, 0 if none), now_seconds, now_microseconds,
-- hard (1 when the denying scope is over its limit even without what was kept back), then per
-- scope: window_start, requests, tokens}, totals after every charge.
local window = tonumber(ARGV[1])
local check = ARGV[3] == '1'
local cost = tonumber(ARGV[4])
local now_s, now_us
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now_s, now_us = tonumber(t[1]), tonumber(t[2])
else
  local n = tonumber(ARGV[2])
  now_s = math.floor(n)
  now_us = math.floor((n - now_s) * 1000000)
end
local now = now_s + now_us / 1000000

local function counter(key)
  local v = tonumber(redis.call('GET', key))
  if not v or v < 0 then
    return 0
  end
  return math.floor(v)
end

-- Requests are integers (LiteLLM INCRs them); tokens are INCRBYFLOAT'd, as LiteLLM does.
-- Seconds from now to `ends`, at least 1: TTLs are relative to the script's clock, which is
-- Redis's own unless the caller passed one.
local function ttl_until(ends)
  return math.max(1, math.ceil(ends - now))
end

-- Adds `amount` to a counter whose current value is `current` and returns the new value.
local function charge(key, current, amount, ends, float)
  if amount == 0 then
    return current
  end
  local v
  if float then
    v = tonumber(redis.call('INCRBYFLOAT', key, amount))
  else
    v = redis.call('INCRBY', key, amount)
  end
  if v < 0 then
    -- A refund larger than what Redis holds (it restarted empty): never leave a negative count.
    redis.call('SET', key, 0, 'KEEPTTL')
    v = 0
  end
  if redis.call('TTL', key) < 0 then
    redis.call('EXPIRE', key, ttl_until(ends))
  end
  return math.floor(v)
end

local n = #KEYS / 3
local starts, reqs, toks = {}, {}, {}
local denied, failed, hard = 0, 0, 0
local tcheck = math.max(cost, 1)

local function sync_scope(i)
  local kw, kr, kt = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local base = 4 + 7 * (i - 1)
  local dws, dreq, dtok = tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6]), tonumber(ARGV[base + 7])
  local ws = tonumber(redis.call('GET', kw))
  if ws and now >= ws + window then
    ws = nil
  end
  local delta_open = dws > 0 and now < dws + window
  if not ws and (check or dws == 0 or delta_open) then
    if delta_open then
      ws = dws
    else
      ws = now_s
    end
    redis.call('SET', kw, ws, 'EX', ttl_until(ws + window))
    redis.call('DEL', kr, kt)
  end
  if not ws then
    return 0, 0, 0
  end
  local r, t = counter(kr), counter(kt)
  if delta_open then
    r = charge(kr, r, dreq, ws + window, false)
    t = charge(kt, t, dtok, ws + window, true)
  end
  return ws, r, t
end

for i = 1, n do
  local ok, ws, r, t = pcall(sync_scope, i)
  if ok then
    starts[i], reqs[i], toks[i] = ws, r, t
  else
    local msg = type(ws) == 'table' and ws.err or tostring(ws)
    if string.find(msg, 'WRONGTYPE', 1, true) == nil then
      return redis.error_reply(msg)
    end
    starts[i], reqs[i], toks[i] = -1, 0, 0
    if failed == 0 then
      failed = i
    end
  end
end

if check and failed == 0 then
  for i = 1, n do
    local base = 4 + 7 * (i - 1)
    local rpm, tpm = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
    local rreq, rtok = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
    local over = (rpm > 0 and reqs[i] + 1 > rpm) or (tpm > 0 and toks[i] + tcheck > tpm)
    if over or (rpm > 0 and reqs[i] + 1 + rreq > rpm)
        or (tpm > 0 and toks[i] + tcheck + rtok > tpm) then
      denied = i
      hard = over and 1 or 0
      break
    end
  end
end

local allowed = 0
if check and denied == 0 and failed == 0 then
  allowed = 1
  for i = 1, n do
    reqs[i] = charge(KEYS[3 * i - 1], reqs[i], 1, starts[i] + window, false)
    toks[i] = charge(KEYS[3 * i], toks[i], cost, starts[i] + window, true)
  end
end

local out = {allowed, denied, now_s, now_us, hard}
for i = 1, n do
  out[#out + 1] = starts[i]
  out[#out + 1] = reqs[i]
  out[#out + 1] = toks[i]
end
return out
