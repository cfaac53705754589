-- The tier's one Redis script: push pending deltas and read fleet totals for a batch of
-- scopes (sync), or check one request against several scopes and charge all or none (exact).
--
-- Keys and window semantics are LiteLLM v3's, so proxies with and without the tier agree: per
-- scope, KEYS holds `{scope}:window` (the window start in whole seconds), `{scope}:requests`
-- and `{scope}:tokens`. A window is fixed: it opens with the first charge after the previous
-- one ended and lasts `window` seconds; opening one deletes the scope's counters.
--
-- ARGV: window, now ('' means Redis TIME), check (1 = all-or-nothing check, 0 = sync), tokens,
-- then 5 per scope: rpm, tpm (0 = no limit; only read when checking), and this process's
-- pending delta (delta_window_start, requests, tokens).
--
-- Delta rules: a delta whose own window has ended is dropped, never charged to a later window;
-- one whose window is still open is charged to the scope's open window, and when Redis has no
-- open window (it restarted empty, or the key was evicted) the delta's window is restored. A
-- delta_window_start of 0 means no delta: the scope's window is opened if none is open.
--
-- Returns: {allowed (1/0), denying scope (1-based, 0 if none), now_seconds, now_microseconds,
-- then per scope: window_start, requests, tokens}, totals after every charge.
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

local function charge(key, amount, ends, float)
  if amount == 0 then
    return
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
  end
  if redis.call('TTL', key) < 0 then
    redis.call('EXPIRE', key, ttl_until(ends))
  end
end

local n = #KEYS / 3
local starts, reqs, toks = {}, {}, {}
local denied = 0
local tcheck = math.max(cost, 1)
for i = 1, n do
  local kw, kr, kt = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local base = 4 + 5 * (i - 1)
  local rpm, tpm = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local dws, dreq, dtok = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
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
  if ws then
    if delta_open then
      charge(kr, dreq, ws + window, false)
      charge(kt, dtok, ws + window, true)
    end
    starts[i], reqs[i], toks[i] = ws, counter(kr), counter(kt)
  else
    starts[i], reqs[i], toks[i] = 0, 0, 0
  end
  if check and denied == 0 and
      ((rpm > 0 and reqs[i] + 1 > rpm) or (tpm > 0 and toks[i] + tcheck > tpm)) then
    denied = i
  end
end

local allowed = 0
if check and denied == 0 then
  allowed = 1
  for i = 1, n do
    charge(KEYS[3 * i - 1], 1, starts[i] + window, false)
    charge(KEYS[3 * i], cost, starts[i] + window, true)
    reqs[i] = reqs[i] + 1
    toks[i] = toks[i] + cost
  end
end

local out = {allowed, denied, now_s, now_us}
for i = 1, n do
  out[#out + 1] = starts[i]
  out[#out + 1] = reqs[i]
  out[#out + 1] = toks[i]
end
return out
