-- The trending list from the Redis read models: reads per article in the 24 hourly
-- buckets that start less than 24 hours ago, published articles only, most reads first
-- (then newest publication, then highest id, as the PostgreSQL query orders them).
-- ARGV: root, category or '', limit, then (offset field, least next offset)*.
-- Answers {'cold'}, {'behind'}, or {'ok', {article hash, author name or false, reads,
-- reads in 24 h}*}.
local root, category, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local version = redis.call('GET', root .. ':active')
if not version then return { 'cold' } end
local prefix = root .. ':v' .. version .. ':'
for i = 4, #ARGV, 2 do
  if tonumber(redis.call('HGET', prefix .. '{{OFFSETS}}', ARGV[i]) or '0') < tonumber(ARGV[i + 1]) then
    return { 'behind' }
  end
end
local now = tonumber(redis.call('TIME')[1])
local hour = now - now % 3600
local buckets = {}
for k = 0, 23 do buckets[#buckets + 1] = prefix .. '{{TRENDING}}' .. (hour - k * 3600) end
local args = { 'ZUNION', #buckets }
for _, bucket in ipairs(buckets) do args[#args + 1] = bucket end
args[#args + 1] = 'WITHSCORES'
local union = redis.call(unpack(args))
local candidates = {}
for i = 1, #union, 2 do
  local id = union[i]
  local fields = redis.call('HMGET', prefix .. '{{ARTICLE}}' .. id, '{{F_STATUS}}', '{{F_CATEGORY}}', '{{F_PUBLISHED}}')
  if fields[1] == 'published' and (category == '' or fields[2] == category) then
    candidates[#candidates + 1] = { id = id, reads = tonumber(union[i + 1]), published = tonumber(fields[3]) or 0 }
  end
end
table.sort(candidates, function(a, b)
  if a.reads ~= b.reads then return a.reads > b.reads end
  if a.published ~= b.published then return a.published > b.published end
  return a.id > b.id
end)
local items = {}
for n = 1, math.min(limit, #candidates) do
  local c = candidates[n]
  local article = redis.call('HGETALL', prefix .. '{{ARTICLE}}' .. c.id)
  local author = ''
  for j = 1, #article, 2 do
    if article[j] == '{{F_AUTHOR}}' then author = article[j + 1] end
  end
  items[#items + 1] = {
    article,
    redis.call('HGET', prefix .. '{{AUTHOR_NAME}}' .. author, '{{F_NAME}}'),
    redis.call('GET', prefix .. '{{READS}}' .. c.id) or '0',
    tostring(c.reads),
  }
end
return { 'ok', items }
