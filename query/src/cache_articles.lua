-- Several articles from the cache model, in the order asked, as cache_article.lua gives one
-- (no token check: the caller checked its own model). ARGV: root, news id*.
-- Answers {'cold'} or {'ok', {article hash (empty if unknown), author name, reads}*}.
local root = ARGV[1]
local version = redis.call('GET', root .. ':active')
if not version then return { 'cold' } end
local prefix = root .. ':v' .. version .. ':'
local items = {}
for i = 2, #ARGV do
  local article = redis.call('HGETALL', prefix .. 'news:' .. ARGV[i])
  local author = ''
  for j = 1, #article, 2 do
    if article[j] == 'author' then author = article[j + 1] end
  end
  items[#items + 1] = {
    article,
    redis.call('HGET', prefix .. 'name:' .. author, 'name'),
    redis.call('GET', prefix .. 'reads:' .. ARGV[i]) or '0',
  }
end
return { 'ok', items }
