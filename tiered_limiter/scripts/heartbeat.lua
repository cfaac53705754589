-- Count the proxies that share the limits: each one calls this on every sync.
--
-- KEYS[1]: the sorted set of proxy ids scored by their last heartbeat.
-- ARGV: proxy id, now ('' means Redis TIME), time to live in seconds, leave (1 = remove this
-- proxy, on a clean stop). Returns the number of live proxies.
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[2])
end
local ttl = tonumber(ARGV[3])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
return redis.call('ZCARD', KEYS[1])
