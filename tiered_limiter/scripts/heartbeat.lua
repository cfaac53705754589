-- Count the proxies that share the limits: each one calls this on every sync.
--
-- KEYS[1]: the sorted set of proxy ids scored by their last heartbeat.
-- ARGV: proxy id, now ('' means Redis TIME), time to live in seconds, leave (1 = remove this
-- proxy, on a clean stop), prune (1 = also drop proxies silent past the time to live and
-- renew the set's own TTL; the caller asks for it on one beat in several). Returns {live proxies, 1 if this proxy was not in the set}: after
-- its first beat, a proxy missing from the set means Redis lost it (it restarted empty), or
-- other proxies pruned it after it was silent past the time to live; the proxy then drops the
-- leases it holds, which is right in the first case and only cautious in the second.
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[2])
end
local ttl = tonumber(ARGV[3])
-- ZADD goes first: a script's first write is where Redis refuses it when out of memory;
-- after a write it lets the script finish, so as not to leave it half done.
local added = 0
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  added = redis.call('ZADD', KEYS[1], now, ARGV[1])
end
if ARGV[5] == '1' or added == 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
end
return {redis.call('ZCARD', KEYS[1]), added}
