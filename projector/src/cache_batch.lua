-- One batch of the Redis read models (see cache.rs for the key layout).
-- ARGV: root, version, mode ('live' | 'replay'), caught up ('1' | '0'), n, then n triples
-- (offset field, offset this consumer started from or '', next offset), then writes:
--   H kind id version create nfields (field value)*   hash write guarded by version
--   R news_id hour                                     a read: counter and trending bucket
local root, version, mode, caught_up = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local activate = false
if mode == 'live' then
  local active = redis.call('GET', root .. ':active')
  if active and active ~= version then return 'reopen' end
  if redis.call('EXISTS', root .. ':switching') == 1 then return 'paused' end
  -- A version built from scratch (first start, or Redis lost its data) is served once
  -- its consumer has caught up with the log (set below, once the offsets are checked).
  activate = not active and caught_up == '1'
elseif redis.call('GET', root .. ':building') ~= version then
  return 'reopen'
end
local prefix = root .. ':v' .. version .. ':'
local offsets = prefix .. 'offsets'
local n = tonumber(ARGV[5])
local first = 6
for i = first, first + 3 * (n - 1), 3 do
  if (redis.call('HGET', offsets, ARGV[i]) or '') ~= ARGV[i + 1] then return 'reopen' end
end
if activate then redis.call('SET', root .. ':active', version) end
local now = tonumber(redis.call('TIME')[1])
local i = first + 3 * n
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'H' then
    local key = prefix .. ARGV[i + 1] .. ':' .. ARGV[i + 2]
    local v, create, nf = tonumber(ARGV[i + 3]), ARGV[i + 4] == '1', tonumber(ARGV[i + 5])
    local current = redis.call('HGET', key, 'version')
    if (not current and create) or (current and tonumber(current) < v) then
      local args = { 'version', ARGV[i + 3] }
      for j = 0, nf - 1 do
        args[#args + 1] = ARGV[i + 6 + 2 * j]
        args[#args + 1] = ARGV[i + 7 + 2 * j]
      end
      redis.call('HSET', key, unpack(args))
    end
    i = i + 6 + 2 * nf
  elseif op == 'R' then
    local id, hour = ARGV[i + 1], tonumber(ARGV[i + 2])
    redis.call('INCR', prefix .. 'reads:' .. id)
    local expires = hour + 25 * 3600
    if expires > now then
      local key = prefix .. 'trending:' .. hour
      redis.call('ZINCRBY', key, 1, id)
      redis.call('EXPIREAT', key, expires)
    end
    i = i + 3
  else
    return redis.error_reply('unknown write ' .. tostring(op))
  end
end
for j = first, first + 3 * (n - 1), 3 do
  redis.call('HSET', offsets, ARGV[j], ARGV[j + 2])
end
return 'done'
