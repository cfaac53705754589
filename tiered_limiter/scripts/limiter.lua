-- The tier's one Redis script: push pending deltas and read fleet totals for a batch of
-- scopes (sync), or check one request against several scopes and charge all or none (exact).
--
-- Keys and window semantics are LiteLLM v3's, so proxies with and without the tier agree: per
-- scope, KEYS holds `{scope}:window` (the window start in whole seconds), `{scope}:requests`
-- and `{scope}:tokens`. A window is fixed: it opens with the first charge after the previous
-- one ended and lasts `window` seconds; opening one deletes the scope's counters.
--
-- ARGV: window, now ('' means Redis TIME), check (1 = all-or-nothing check, 0 = sync), tokens,
-- proxies, then 7 per scope: rpm, tpm (0 = no limit), the lease wanted (requests, tokens),
-- and this process's pending delta (delta_window_start, requests, tokens).
--
-- Leases: after the charges, each scope with a limit reserves for the caller up to the lease
-- it wants, capped at its share (what remains / proxies). The lease is added to the counters
-- at once, so every proxy's local spending is already counted when any proxy checks here, and
-- the fleet cannot overshoot; the caller gives back what it did not spend at a later sync.
--
-- Delta rules: a delta whose own window has ended is dropped, never charged to a later window;
-- one whose window is still open is charged to the scope's open window, and when Redis has no
-- open window (it restarted empty, or the key was evicted) the delta's window is restored. A
-- restored window forgot every lease it held, so the negative part of a delta (a lease given
-- back, a refund) is not applied to it, and the reply says the window was restored: the caller
-- then drops the lease it still holds. A delta_window_start of 0 means no delta: the scope's
-- window is opened if none is open.
--
-- A scope whose keys hold another type (WRONGTYPE) gets window_start -1 and no change: the
-- other scopes of the batch are still synced, and a check that names it charges nothing. Each
-- scope reads its keys before writing, so a failing scope leaves no partial charge behind. Any
-- other error (OOM, READONLY) fails the whole call, before its first write succeeds.
--
-- Returns: {allowed (1/0), denying scope (1-based, 0 if none), now_seconds, now_microseconds,
-- then per scope: window_start, requests, tokens (totals after every charge and lease),
-- lease_requests, lease_tokens, restored (1 when the delta's window was restored)}.
local window = tonumber(ARGV[1])
local check = ARGV[3] == '1'
local cost = tonumber(ARGV[4])
local proxies = math.max(1, tonumber(ARGV[5]))
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
local denied, failed = 0, 0
local lease_req, lease_tok, restored = {}, {}, {}
local tcheck = math.max(cost, 1)

local function sync_scope(i)
  local kw, kr, kt = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local base = 5 + 7 * (i - 1)
  local dws, dreq, dtok = tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6]), tonumber(ARGV[base + 7])
  local ws = tonumber(redis.call('GET', kw))
  if ws and now >= ws + window then
    ws = nil
  end
  local delta_open = dws > 0 and now < dws + window
  if not ws and (check or dws == 0 or delta_open) then
    if delta_open then
      ws = dws
      restored[i] = 1
      dreq, dtok = math.max(dreq, 0), math.max(dtok, 0)
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
    local base = 5 + 7 * (i - 1)
    local rpm, tpm = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
    if (rpm > 0 and reqs[i] + 1 > rpm) or (tpm > 0 and toks[i] + tcheck > tpm) then
      denied = i
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

-- A lease of at most `want`, and at most this proxy's share of what remains.
local function lease(key, total, limit, want, ends, float)
  if limit <= 0 or want <= 0 then
    return total, 0
  end
  local grant = math.min(want, math.floor(math.max(0, limit - total) / proxies))
  return charge(key, total, grant, ends, float), grant
end

for i = 1, n do
  lease_req[i], lease_tok[i] = 0, 0
  if starts[i] > 0 and (allowed == 1 or not check) then
    local base = 5 + 7 * (i - 1)
    local rpm, tpm = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
    local wreq, wtok = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
    local ends = starts[i] + window
    reqs[i], lease_req[i] = lease(KEYS[3 * i - 1], reqs[i], rpm, wreq, ends, false)
    toks[i], lease_tok[i] = lease(KEYS[3 * i], toks[i], tpm, wtok, ends, true)
  end
end

local out = {allowed, denied, now_s, now_us}
for i = 1, n do
  out[#out + 1] = starts[i]
  out[#out + 1] = reqs[i]
  out[#out + 1] = toks[i]
  out[#out + 1] = lease_req[i]
  out[#out + 1] = lease_tok[i]
  out[#out + 1] = restored[i] or 0
end
return out
