-- A user's recommendations from the recommender's Redis model (projector/src/recommend.rs):
-- published articles they have not read, ranked by the sum of their affinity to each
-- article's category and tags (a tag named like the category counts once), then newest
-- publication, then highest id; articles matching nothing follow, newest first.
-- Reads only the newest `candidates` articles of each category and tag the user has an
-- affinity to, and as many of the newest published ones.
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
local read = {}
for _, id in ipairs(redis.call('SMEMBERS', prefix .. 'read:' .. user)) do read[id] = true end
local affinities = {}
local flat = redis.call('HGETALL', prefix .. 'aff:' .. user)
for i = 1, #flat, 2 do affinities[#affinities + 1] = { key = flat[i], weight = tonumber(flat[i + 1]) } end
-- Categories ('cat:') before tags ('tag:').
table.sort(affinities, function(a, b) return a.key < b.key end)
local found, scored = {}, {}
for _, a in ipairs(affinities) do
  local name = string.sub(a.key, 5)
  local ids = redis.call('ZREVRANGE', prefix .. 'by:' .. a.key, 0, pool - 1, 'WITHSCORES')
  for i = 1, #ids, 2 do
    local id = ids[i]
    if not read[id] then
      local f = found[id]
      if not f then
        f = { id = id, score = 0, published = tonumber(ids[i + 1]), reasons = {}, seen = {} }
        found[id] = f
        scored[#scored + 1] = f
      end
      if not f.seen[name] then
        f.seen[name] = true
        f.score = f.score + a.weight
        f.reasons[#f.reasons + 1] = { name = name, weight = a.weight }
      end
    end
  end
end
local recent = redis.call('ZREVRANGE', prefix .. 'published', 0, pool - 1, 'WITHSCORES')
local fillers = 0
for i = 1, #recent, 2 do
  if fillers >= limit then break end
  local id = recent[i]
  if not read[id] and not found[id] then
    scored[#scored + 1] = { id = id, score = 0, published = tonumber(recent[i + 1]), reasons = {} }
    fillers = fillers + 1
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
  table.sort(s.reasons, function(a, b)
    if a.weight ~= b.weight then return a.weight > b.weight end
    return a.name < b.name
  end)
  local names = {}
  for _, r in ipairs(s.reasons) do names[#names + 1] = r.name end
  items[#items + 1] = { s.id, string.format('%.17g', s.score), names }
end
return { 'ok', items }
