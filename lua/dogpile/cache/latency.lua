--- Latency histograms per region (Prometheus buckets), exported by
-- cache.metrics() as dogpile_cache_get_seconds and
-- dogpile_cache_create_seconds.
--
-- Recording is one call, `observe(region, kind, seconds)`: four comparisons
-- (no loop) and three additions into a table kept per region (weakly: a
-- collected region drops out). Creations are timed on the miss path
-- (create.lua), where a creator's own run dwarfs two clock reads. Lookups
-- are timed by sampling: every region's lookup functions (read.lua) count
-- down one counter of this Lua state (`tick`) and time the lookup that
-- reaches zero (`timed`), about one in SAMPLE_EVERY; the others pay for a
-- subtraction and a store, and a hit loop stays one compiled trace (the
-- timed call is a side trace of it, with no loop of its own to abort). The
-- counts of dogpile_cache_get_seconds are then samples, not lookups: its
-- _count times SAMPLE_EVERY is about the lookups.
local ffi = require "ffi"
local lib = require "dogpile.lib"

local C = lib.C
local setmetatable, unpack, assert = setmetatable, unpack, assert

local _M = {}

-- Upper bounds in seconds: 1 us (a memory hit) to 10 s (a slow creator).
_M.BOUNDS = { 1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 10 }
_M.KINDS = { "get", "create" }
-- About one lookup in SAMPLE_EVERY is timed. A timed lookup costs two
-- reads of the monotonic clock (about 35 ns each on a KVM guest) and a side
-- exit of the hit's trace: at 1 in 256 that came to 4-10% of a memory hit,
-- at 1 in 1024 to 2-4% (bench/hit.lua, hit_histograms_*; issue 20 asks for
-- at most 5%).
_M.SAMPLE_EVERY = 1024

local BOUNDS, NB = _M.BOUNDS, #_M.BOUNDS

-- region -> {get = hist, create = hist}; hist = {counts[1..NB+1], sum, count}
local HISTS = setmetatable({}, { __mode = "k" })

-- One count per bucket, the last for +Inf. Written out, not filled in a
-- loop: a region's first timed lookup makes its histogram inside the hit's
-- trace, where a loop would abort the trace ("inner loop in root trace").
local function new_hist()
    return { counts = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }, sum = 0, count = 0 }
end

-- The bucket of `s`: the index of the first bound >= s (NB + 1 when none
-- is), by halving. Comparisons only, no loop: a loop inside the timed
-- lookup's side trace would be unrolled by the trace compiler, and aborted
-- past its unroll limit.
local B1, B2, B3, B4, B5, B6, B7, B8, B9, B10, B11, B12, B13, B14, B15 = unpack(BOUNDS)
assert(NB == 15, "latency.bucket and new_hist are written for 15 bounds")
local function bucket(s)
    if s <= B8 then
        if s <= B4 then
            if s <= B2 then
                return s <= B1 and 1 or 2
            end
            return s <= B3 and 3 or 4
        end
        if s <= B6 then
            return s <= B5 and 5 or 6
        end
        return s <= B7 and 7 or 8
    end
    if s <= B12 then
        if s <= B10 then
            return s <= B9 and 9 or 10
        end
        return s <= B11 and 11 or 12
    end
    if s <= B14 then
        return s <= B13 and 13 or 14
    end
    return s <= B15 and 15 or 16
end
_M.bucket = bucket

-- The histogram of `kind` in `region`, made when it has none.
local function hist_of(region, kind)
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
    return h
end

local function add(h, seconds)
    local counts = h.counts
    local i = bucket(seconds)
    counts[i] = counts[i] + 1
    h.sum = h.sum + seconds
    h.count = h.count + 1
end

--- Record that `kind` ("get" or "create") took `seconds` in `region`.
function _M.observe(region, kind, seconds)
    add(hist_of(region, kind), seconds)
end

-- -- Sampling lookups ------------------------------------------------------------
-- One countdown for every lookup of this Lua state (an int32 in a cell: in a
-- hit's trace it is one load and one store at a constant address, in an
-- integer register that a call to the clock does not clobber). When it runs
-- out, that lookup is timed and the countdown starts again from a length
-- drawn around SAMPLE_EVERY (between a half and one and a half times it), so
-- that regions used in a fixed rotation are each sampled in proportion to
-- their lookups rather than one of them every time.

local COUNT = ffi.new("int32_t[1]", _M.SAMPLE_EVERY)
local seed = 20260
local monotonic = C.dp_clock_monotonic
local floor = math.floor

--- Count one lookup down: true when it is the one to time (then call timed).
local function tick()
    -- Compared before the subtraction, whose result is only stored (an
    -- int32 store wraps): the trace then does it without an overflow check.
    local n = COUNT[0]
    COUNT[0] = n - 1
    return n <= 1
end
_M.tick = tick

--- `lookup(region, key, exp)` timed into the region's get histogram, and
-- the countdown started again; returns what lookup returned.
function _M.timed(lookup, region, key, exp)
    local every = _M.SAMPLE_EVERY
    -- Park and Miller's minimal standard generator, exact in doubles (not
    -- math.random: the caller's sequence stays its own).
    seed = seed * 16807 % 2147483647
    COUNT[0] = floor(every / 2) + seed % every
    local t0 = monotonic()
    local hit, value, early = lookup(region, key, exp)
    add(hist_of(region, "get"), monotonic() - t0)
    return hit, value, early
end

-- Whether regions configured from now on sample their lookups.
local sampling = true

--- Whether regions configured now sample their lookups (read.choose asks).
function _M.sampling()
    return sampling
end

--- Turn the sampling of lookups on or off for the regions configured from
-- now on (default on), to measure what it costs (bench/hit.lua). Returns
-- the previous setting.
function _M.set_sampling(on)
    local was = sampling
    sampling = on and true or false
    return was
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
