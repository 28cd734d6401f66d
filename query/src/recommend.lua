-- A user's recommendations from the recommender's Redis model (projector/src/recommend.rs):
-- the newest published articles they have not read, ranked by the sum of their affinity
-- to each article's category and tags, then newest publication, then highest id.
-- ARGV: root, user, limit, candidates, then (offset field, least next offset)*.
-- Answers {'cold'}, {'behind'}, or {'ok', {id, score, {reason}*}*} (raw scores, relative to
-- the model's epoch; reasons by weight, highest first).
local root, user, limit, pool = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local version = redis.call('GET', root .. ':active')
if not version then return { 'cold' } end
local prefix = root .. ':v' .. version .. ':'
for i = 5, #ARGV, 2 do
  if tonumber(redis.call('HGET', prefix .. 'offsets', ARGV[i]) or '0') < tonumber(ARGV[i + 1]) then
    return { 'behind' }
  end
end
local affinity = {}
local flat = redis.call('HGETALL', prefix .. 'aff:' .. user)
for i = 1, #flat, 2 do affinity[flat[i]] = tonumber(flat[i + 1]) end
local read = prefix .. 'read:' .. user
local candidates = redis.call('ZREVRANGE', prefix .. 'published', 0, pool - 1, 'WITHSCORES')
local scored = {}
for i = 1, #candidates, 2 do
  local id = candidates[i]
  if redis.call('SISMEMBER', read, id) == 0 then
    local article = redis.call('HMGET', prefix .. 'art:' .. id, 'category', 'tags')
    local score, reasons, seen = 0, {}, {}
    local function add(name, weight)
      if weight and not seen[name] then
        seen[name] = true
        score = score + weight
        reasons[#reasons + 1] = { name = name, weight = weight }
      end
    end
    if article[1] then add(article[1], affinity['cat:' .. article[1]]) end
    if article[2] then
      for _, tag in ipairs(cjson.decode(article[2])) do add(tag, affinity['tag:' .. tag]) end
    end
    table.sort(reasons, function(a, b)
      if a.weight ~= b.weight then return a.weight > b.weight end
      return a.name < b.name
    end)
    local names = {}
    for _, r in ipairs(reasons) do names[#names + 1] = r.name end
    scored[#scored + 1] = { id = id, score = score, published = tonumber(candidates[i + 1]), reasons = names }
  end
end
table.sort(scored, function(a, b)
  if a.score ~= b.score then return a.score > b.score end
  if a.published ~= b.published then return a.published > b.published end
  return a.id > b.id
end)
local items = {}
for n = 1, math.min(limit, #scored) do
  local s = scored[n]
  items[#items + 1] = { s.id, string.format('%.17g', s.score), s.reasons }
end
return { 'ok', items }
