-- The tier's one Redis script: push pending deltas and read fleet totals for a batch of
-- scopes (sync), or check one request against several scopes and charge all or none (exact).
--
-- Keys and window semantics are LiteLLM v3's, so proxies with and without the tier agree: per
-- scope, KEYS holds `{scope}:window` (the window start in whole seconds), `{scope}:requests`
-- and `{scope}:tokens`. A window is fixed: it opens with the first charge after the previous
-- one ended and lasts `window` seconds; opening one deletes the scope's counters.
--
-- ARGV: window, now ('' means Redis TIME), mode (0 = sync, 1 = all-or-nothing check of one
-- request and its tokens, 2 = the same check of tokens alone, no request counted), tokens,
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
-- Commands: each scope reads its three keys with one MGET, works out every change in the
-- script, and writes each counter at most once (its delta, this request and its lease in one
-- INCRBY), setting a TTL only on a key it creates. A busy scope costs three commands a sync.
--
-- A scope whose keys hold another type (WRONGTYPE) gets window_start -1 and no change: the
-- other scopes of the batch are still synced, and a check that names it charges nothing. MGET
-- reads such a key as missing, so a missing key is read again with GET, which raises
-- WRONGTYPE before the scope writes anything: a failing scope leaves no partial charge behind.
-- Any other error (OOM, READONLY) fails the whole call, before its first write succeeds.
--
-- Returns: {allowed (1/0), denying scope (1-based, 0 if none), now_seconds, now_microseconds,
-- then per scope: window_start, requests, tokens (totals after every charge and lease),
-- lease_requests, lease_tokens, restored (1 when the delta's window was restored)}.
local window = tonumber(ARGV[1])
local check = ARGV[3] ~= '0'
local one = ARGV[3] == '1' and 1 or 0
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

-- A counter as MGET returned it; a missing key is read again so that a key of another type
-- raises WRONGTYPE here, before any write. Returns the value (0 if none) and whether it exists.
local function counter(key, raw)
  if not raw then
    raw = redis.call('GET', key)
    if not raw then
      return 0, false
    end
  end
  local v = tonumber(raw)
  if not v or v < 0 then
    return 0, true
  end
  return v, true
end

-- Seconds from now to `ends`, at least 1: TTLs are relative to the script's clock, which is
-- Redis's own unless the caller passed one.
local function ttl_until(ends)
  return math.max(1, math.ceil(ends - now))
end

local n = #KEYS / 3
-- Per scope: window start, counters as read, whether each counter key exists, and what to add.
local starts, reqs, toks, has_r, has_t, add_r, add_t = {}, {}, {}, {}, {}, {}, {}
local denied, failed = 0, 0
local lease_req, lease_tok, restored = {}, {}, {}
local tcheck = math.max(cost, 1)

local function read_scope(i)
  local kw, kr, kt = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local base = 5 + 7 * (i - 1)
  local dws, dreq, dtok = tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6]), tonumber(ARGV[base + 7])
  local raw = redis.call('MGET', kw, kr, kt)
  local ws = raw[1]
  if not ws then
    ws = redis.call('GET', kw)
  end
  ws = tonumber(ws)
  if ws and now >= ws + window then
    ws = nil
  end
  local delta_open = dws > 0 and now < dws + window
  local r, hr, t, ht
  if not ws and (check or dws == 0 or delta_open) then
    -- Raise WRONGTYPE on the counters before opening the window.
    counter(kr, raw[2])
    counter(kt, raw[3])
    if delta_open then
      ws = dws
      restored[i] = 1
      dreq, dtok = math.max(dreq, 0), math.max(dtok, 0)
    else
      ws = now_s
    end
    redis.call('SET', kw, ws, 'EX', ttl_until(ws + window))
    redis.call('DEL', kr, kt)
    r, hr, t, ht = 0, false, 0, false
  elseif ws then
    r, hr = counter(kr, raw[2])
    t, ht = counter(kt, raw[3])
    r = math.floor(r)
  else
    return 0, 0, 0, false, false, 0, 0
  end
  if not delta_open then
    dreq, dtok = 0, 0
  end
  -- Counters never go negative: a refund larger than the count stops at 0.
  local dr = math.max(dreq, -r)
  local dt = math.max(dtok, -t)
  return ws, r, t, hr, ht, dr, dt
end

for i = 1, n do
  local ok, ws, r, t, hr, ht, dr, dt = pcall(read_scope, i)
  if ok then
    starts[i], reqs[i], toks[i], has_r[i], has_t[i], add_r[i], add_t[i] = ws, r, t, hr, ht, dr, dt
  else
    local msg = type(ws) == 'table' and ws.err or tostring(ws)
    if string.find(msg, 'WRONGTYPE', 1, true) == nil then
      return redis.error_reply(msg)
    end
    starts[i], reqs[i], toks[i], add_r[i], add_t[i] = -1, 0, 0, 0, 0
    if failed == 0 then
      failed = i
    end
  end
end

if check and failed == 0 then
  for i = 1, n do
    local base = 5 + 7 * (i - 1)
    local rpm, tpm = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
    local r, t = reqs[i] + add_r[i], toks[i] + add_t[i]
    if (rpm > 0 and r + one > rpm) or (tpm > 0 and t + tcheck > tpm) then
      denied = i
      break
    end
  end
end

local allowed = 0
if check and denied == 0 and failed == 0 then
  allowed = 1
  for i = 1, n do
    add_r[i] = add_r[i] + one
    add_t[i] = add_t[i] + cost
  end
end

-- A lease of at most `want`, and at most this proxy's share of what remains.
local function grant(total, limit, want)
  if limit <= 0 or want <= 0 then
    return 0
  end
  return math.min(want, math.floor(math.max(0, limit - total) / proxies))
end

-- Adds `amount` to a counter (one write) and returns its new value, floored.
local function write(key, amount, existed, ends, float)
  local v
  if float then
    v = tonumber(redis.call('INCRBYFLOAT', key, amount))
  else
    v = redis.call('INCRBY', key, amount)
  end
  if not existed then
    redis.call('EXPIRE', key, ttl_until(ends))
  end
  return math.floor(v)
end

for i = 1, n do
  lease_req[i], lease_tok[i] = 0, 0
  if starts[i] > 0 then
    local base = 5 + 7 * (i - 1)
    if allowed == 1 or not check then
      local rpm, tpm = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
      local wreq, wtok = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
      lease_req[i] = grant(reqs[i] + add_r[i], rpm, wreq)
      lease_tok[i] = grant(toks[i] + add_t[i], tpm, wtok)
    end
    local ends = starts[i] + window
    local dr, dt = add_r[i] + lease_req[i], add_t[i] + lease_tok[i]
    if dr ~= 0 then
      reqs[i] = write(KEYS[3 * i - 1], dr, has_r[i], ends, false)
    else
      reqs[i] = math.floor(reqs[i])
    end
    if dt ~= 0 then
      toks[i] = write(KEYS[3 * i], dt, has_t[i], ends, true)
    else
      toks[i] = math.floor(toks[i])
    end
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
