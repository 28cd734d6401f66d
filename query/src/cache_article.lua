-- One article from the Redis read models (see projector/src/cache.rs for the layout).
-- ARGV: root, news id, then (offset field, least next offset)* from a consistency token.
-- Answers {'cold'} (never built), {'behind'} (token not reached), {'miss'}, or
-- {'ok', article hash, author name or false, reads}.
local root = ARGV[1]
local version = redis.call('GET', root .. ':active')
if not version then return { 'cold' } end
local prefix = root .. ':v' .. version .. ':'
for i = 3, #ARGV, 2 do
  if tonumber(redis.call('HGET', prefix .. 'offsets', ARGV[i]) or '0') < tonumber(ARGV[i + 1]) then
    return { 'behind' }
  end
end
local article = redis.call('HGETALL', prefix .. 'news:' .. ARGV[2])
if #article == 0 then return { 'miss' } end
local author = ''
for j = 1, #article, 2 do
  if article[j] == 'author' then author = article[j + 1] end
end
return {
  'ok',
  article,
  redis.call('HGET', prefix .. 'name:' .. author, 'name'),
  redis.call('GET', prefix .. 'reads:' .. ARGV[2]) or '0',
}
