-- One batch of a Redis read model (see redis_store.rs): checks, writes, offsets at once.
-- ARGV: root, version, mode ('live' | 'replay'), caught up ('1' | '0'), n, then n triples
-- (offset field, offset this consumer started from or '', next offset), then writes, each
-- an op and a key relative to the version's prefix:
--   H key version create nfields (field value)*   hash fields, guarded by the hash's version
--   I key                                         counter + 1
--   T key member expire_at                        sorted-set member + 1, key expiring then
--   F key field amount                            hash field + amount (float)
--   S key member                                  set add
--   Z key member score | X key member             sorted-set add | remove
--   V key value | D key                           string set | delete
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
  local op, key = ARGV[i], prefix .. ARGV[i + 1]
  if op == 'H' then
    local v, create, nf = tonumber(ARGV[i + 2]), ARGV[i + 3] == '1', tonumber(ARGV[i + 4])
    local current = redis.call('HGET', key, 'version')
    if (not current and create) or (current and tonumber(current) < v) then
      local args = { 'version', ARGV[i + 2] }
      for j = 0, nf - 1 do
        args[#args + 1] = ARGV[i + 5 + 2 * j]
        args[#args + 1] = ARGV[i + 6 + 2 * j]
      end
      redis.call('HSET', key, unpack(args))
    end
    i = i + 5 + 2 * nf
  elseif op == 'I' then
    redis.call('INCR', key)
    i = i + 2
  elseif op == 'T' then
    local expires = tonumber(ARGV[i + 3])
    if expires > now then
      redis.call('ZINCRBY', key, 1, ARGV[i + 2])
      redis.call('EXPIREAT', key, expires)
    end
    i = i + 4
  elseif op == 'F' then
    redis.call('HINCRBYFLOAT', key, ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'S' then
    redis.call('SADD', key, ARGV[i + 2])
    i = i + 3
  elseif op == 'Z' then
    redis.call('ZADD', key, ARGV[i + 3], ARGV[i + 2])
    i = i + 4
  elseif op == 'X' then
    redis.call('ZREM', key, ARGV[i + 2])
    i = i + 3
  elseif op == 'V' then
    redis.call('SET', key, ARGV[i + 2])
    i = i + 3
  elseif op == 'D' then
    redis.call('DEL', key)
    i = i + 2
  else
    return redis.error_reply('unknown write ' .. tostring(op))
  end
end
for j = first, first + 3 * (n - 1), 3 do
  redis.call('HSET', offsets, ARGV[j], ARGV[j + 2])
end
return 'done'
