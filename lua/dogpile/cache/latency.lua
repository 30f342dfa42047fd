--- Latency histograms per region (Prometheus buckets), exported by
-- cache.metrics() as dogpile_cache_get_seconds and
-- dogpile_cache_create_seconds.
--
-- Recording is one call, `observe(region, kind, seconds)`: a scan of 15
-- bounds and three additions into a table kept per region (weakly: a
-- collected region drops out). Nothing here reads a clock: the caller
-- times what it times. Creations are timed on the miss path, where a
-- creator's own run dwarfs two clock reads. Gets are timed by sampling:
-- one lookup in SAMPLE_EVERY, chosen with the hits and misses counters the
-- region already keeps, so that the hit's cost does not change on the
-- other SAMPLE_EVERY - 1; the counts of dogpile_cache_get_seconds are
-- then samples, not lookups (its _count times SAMPLE_EVERY is about the
-- lookups).
local setmetatable = setmetatable

local _M = {}

-- Upper bounds in seconds: 1 us (a memory hit) to 10 s (a slow creator).
_M.BOUNDS = { 1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 10 }
_M.KINDS = { "get", "create" }
_M.SAMPLE_EVERY = 64

local BOUNDS, NB = _M.BOUNDS, #_M.BOUNDS

-- region -> {get = hist, create = hist}; hist = {counts[1..NB+1], sum, count}
local HISTS = setmetatable({}, { __mode = "k" })

local function new_hist()
    local counts = {}
    for i = 1, NB + 1 do
        counts[i] = 0
    end
    return { counts = counts, sum = 0, count = 0 }
end

--- Record that `kind` ("get" or "create") took `seconds` in `region`.
function _M.observe(region, kind, seconds)
    local hs = HISTS[region]
    if hs == nil then
        hs = {}
        HISTS[region] = hs
    end
    local h = hs[kind]
    if h == nil then
        h = new_hist()
        hs[kind] = h
    end
    local i = 1
    while i <= NB and seconds > BOUNDS[i] do
        i = i + 1
    end
    local counts = h.counts
    counts[i] = counts[i] + 1
    h.sum = h.sum + seconds
    h.count = h.count + 1
end

--- The histograms of `region`: {kind = {counts = {per bucket, not
-- cumulative; the last is +Inf}, sum =, count =}}, or nil.
function _M.of(region)
    return HISTS[region]
end

--- Forget `region`'s histograms (its stats restart at configure).
function _M.reset(region)
    HISTS[region] = nil
end

return _M
