-- One batch of a Redis read model (see redis_store.rs): checks, writes, offsets at once.
-- ARGV: root, version, mode ('live' | 'replay'), caught up ('1' | '0'), the model's layout
-- number (recorded by the first batch of a version built from scratch), whether a live
-- batch announces the keys it wrote ('1' | '0', read_models.rs `CHANGED`), n, then n triples
-- (offset field, offset this consumer started from or '', next offset), then writes, each
-- an op and a key relative to the version's prefix:
--   H key version create nfields (field value)*   hash fields, guarded by the hash's version
--   I key                                         counter + 1
--   T key member expire_at                        sorted-set member + 1, key expiring then
--   F key field amount                            hash field + amount (float)
--   S key member                                  set add
--   G key member n                                the next n writes (S or F) are skipped
--                                                 if member is in set key
--   D key member nkeys key*                       set add, then the keys deleted
--   L doc member score | W doc member             list | withdraw a document in its indexes
--   E doc member version nfields (field value)*   H for a listed document, reindexed
--   C doc version nfields (field value)* field from from_field members
--                                                 H with create, and doc joins set members:
--                                                 its field copies from's from_field (read
--                                                 once per batch while no other write runs)
--   P from from_field field members               every member copies from's from_field
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
local offsets = prefix .. '{{OFFSETS}}'
local layout = ARGV[5]
local announces = mode == 'live' and ARGV[6] == '1'
local n = tonumber(ARGV[7])
local first = 8
for i = first, first + 3 * (n - 1), 3 do
  if (redis.call('HGET', offsets, ARGV[i]) or '') ~= ARGV[i + 1] then return 'reopen' end
end
if activate then redis.call('SET', root .. ':active', version) end
-- A version's first batch: it is built with this layout (a version built before layouts
-- were numbered has offsets and no layout; layout 1 is not recorded).
if layout ~= '1' and redis.call('EXISTS', offsets) == 0 then
  redis.call('SET', prefix .. '{{LAYOUT}}', layout)
end
local now = tonumber(redis.call('TIME')[1])
-- Listed documents (the articles of both models, read_models.rs `index`): a hash with a
-- category, tags (JSON) and perhaps an author, indexed by publication time in `published`,
-- `by:cat:<category>`, `by:tag:<tag>` and `by:author:<author>`.
local function index_keys(doc)
  local f = redis.call('HMGET', doc, '{{F_CATEGORY}}', '{{F_TAGS}}', '{{F_AUTHOR}}')
  local keys = { prefix .. '{{PUBLISHED}}' }
  if f[1] then keys[#keys + 1] = prefix .. '{{BY}}{{CATEGORY}}' .. f[1] end
  if f[2] then
    for _, t in ipairs(cjson.decode(f[2])) do keys[#keys + 1] = prefix .. '{{BY}}{{TAG}}' .. t end
  end
  if f[3] then keys[#keys + 1] = prefix .. '{{BY}}{{BY_AUTHOR}}' .. f[3] end
  return keys
end
-- `listing` counts the changes to these indexes (a ranking computed before the last
-- change is stale).
local function list(doc, member, score)
  redis.call('HSET', doc, '{{F_LISTED}}', score)
  for _, k in ipairs(index_keys(doc)) do redis.call('ZADD', k, score, member) end
  redis.call('INCR', prefix .. '{{LISTING}}')
end
local function withdraw(doc, member)
  if redis.call('HDEL', doc, '{{F_LISTED}}') == 1 then
    for _, k in ipairs(index_keys(doc)) do redis.call('ZREM', k, member) end
    redis.call('INCR', prefix .. '{{LISTING}}')
  end
end
local i = first + 3 * n
local skip = 0
-- A live batch of a model that announces names the keys of documents and counters it
-- wrote, once each (read_models.rs `CHANGED`): query processes forget what they kept of
-- them. A document C creates is not named: no query process kept it.
local changed = { version }
local seen = {}
local function wrote(key)
  if not seen[key] then
    seen[key] = true
    changed[#changed + 1] = key
  end
end
local announce = {}
if announces then
  announce = { H = true, E = true, L = true, W = true, I = true }
end
-- What C read of its `from` hashes in this batch (hash relative to the prefix -> field ->
-- value); forgotten on any write other than C, I and T (which write counters and sorted
-- sets, never such a hash), and a C forgets what it read of the document it writes.
local joined = {}
-- The documents C has yet to add to sets (set relative to the prefix -> documents): one
-- SADD per set, before any write that reads or writes a set (P, S, G, D: a P reads such
-- a set) and at the end.
local joining = {}
local function join()
  for set, docs in pairs(joining) do
    for k = 1, #docs, 512 do
      redis.call('SADD', prefix .. set, unpack(docs, k, math.min(k + 511, #docs)))
    end
  end
  joining = {}
end
local nargs = #ARGV
while i <= nargs do
  local op, key = ARGV[i], prefix .. ARGV[i + 1]
  if announce[op] then wrote(ARGV[i + 1]) end
  if op ~= 'C' and op ~= 'I' and op ~= 'T' and next(joined) then joined = {} end
  if (op == 'P' or op == 'S' or op == 'G' or op == 'D') and next(joining) then join() end
  if op == 'H' then
    local v, create, nf = tonumber(ARGV[i + 2]), ARGV[i + 3] == '1', tonumber(ARGV[i + 4])
    local current = redis.call('HGET', key, '{{F_VERSION}}')
    if (not current and create) or (current and tonumber(current) < v) then
      redis.call('HSET', key, '{{F_VERSION}}', ARGV[i + 2], unpack(ARGV, i + 5, i + 4 + 2 * nf))
    end
    i = i + 5 + 2 * nf
  elseif op == 'L' then
    list(key, ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'W' then
    withdraw(key, ARGV[i + 2])
    i = i + 3
  elseif op == 'E' then
    -- An edit of a listed document moves it between indexes.
    local member, v, nf = ARGV[i + 2], tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    local current = redis.call('HGET', key, '{{F_VERSION}}')
    if current and tonumber(current) < v then
      local listed = redis.call('HGET', key, '{{F_LISTED}}')
      if listed then withdraw(key, member) end
      redis.call('HSET', key, '{{F_VERSION}}', ARGV[i + 3], unpack(ARGV, i + 5, i + 4 + 2 * nf))
      if listed then list(key, member, listed) end
    end
    i = i + 5 + 2 * nf
  elseif op == 'C' then
    local v, nf = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    local j = i + 4 + 2 * nf
    local field, from, from_field = ARGV[j], ARGV[j + 1], ARGV[j + 2]
    local docs = joining[ARGV[j + 3]]
    if not docs then
      docs = {}
      joining[ARGV[j + 3]] = docs
    end
    docs[#docs + 1] = ARGV[i + 1]
    joined[ARGV[i + 1]] = nil
    local read = joined[from] or {}
    local value = read[from_field]
    if not value then
      value = redis.call('HGET', prefix .. from, from_field) or ''
      read[from_field] = value
      joined[from] = read
    end
    local current = redis.call('HGET', key, '{{F_VERSION}}')
    if current and announces then wrote(ARGV[i + 1]) end
    if not current or tonumber(current) < v then
      redis.call('HSET', key, '{{F_VERSION}}', ARGV[i + 2], field, value, unpack(ARGV, i + 4, j - 1))
    else
      redis.call('HSET', key, field, value)
    end
    i = j + 4
  elseif op == 'P' then
    local value = redis.call('HGET', key, ARGV[i + 2]) or ''
    for _, doc in ipairs(redis.call('SMEMBERS', prefix .. ARGV[i + 4])) do
      if redis.call('EXISTS', prefix .. doc) == 1 then
        redis.call('HSET', prefix .. doc, ARGV[i + 3], value)
        if announces then wrote(doc) end
      end
    end
    i = i + 5
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
    if skip > 0 then skip = skip - 1 else redis.call('HINCRBYFLOAT', key, ARGV[i + 2], ARGV[i + 3]) end
    i = i + 4
  elseif op == 'S' then
    if skip > 0 then skip = skip - 1 else redis.call('SADD', key, ARGV[i + 2]) end
    i = i + 3
  elseif op == 'G' then
    skip = 0
    if redis.call('SISMEMBER', key, ARGV[i + 2]) == 1 then skip = tonumber(ARGV[i + 3]) end
    i = i + 4
  elseif op == 'D' then
    redis.call('SADD', key, ARGV[i + 2])
    local nk = tonumber(ARGV[i + 3])
    for j = 1, nk do redis.call('DEL', prefix .. ARGV[i + 3 + j]) end
    i = i + 4 + nk
  else
    return redis.error_reply('unknown write ' .. tostring(op))
  end
end
join()
for j = first, first + 3 * (n - 1), 3 do
  redis.call('HSET', offsets, ARGV[j], ARGV[j + 2])
end
if #changed > 1 then
  redis.call('PUBLISH', root .. ':{{CHANGED}}', table.concat(changed, ' '))
end
return 'done'
