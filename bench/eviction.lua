--- Hit ratio of the shared_memory backend's eviction policies, "s3fifo" (the
-- default) against exact "lru", with lua-resty-lrucache as an LRU anchor, on
-- synthetic traces:
--
--  - Zipf: NKEYS distinct keys, NREQ requests, popularity rank r drawn with
--    probability proportional to 1 / r^alpha, for alpha 0.8, 1.0 and 1.2;
--  - scan-polluted: the same Zipf requests with, every SCAN_EVERY of them, a
--    sequential scan of SCAN_LEN keys that are never used again (a batch job
--    or a crawler walking the key space).
--
-- Each request is a read; a miss stores the key (a read-through cache). The
-- cache is bounded by max_items at 1% and 10% of NKEYS. The PRNG is
-- splitmix64 with a fixed seed, so every run replays the same traces.
--
--   luajit bench/eviction.lua [requests=1e6] [keys=1e5] [seed=42]
local ffi = require "ffi"
local bit = require "bit"

local format, floor = string.format, math.floor

local NREQ = tonumber(arg and arg[1]) or 1e6
local NKEYS = tonumber(arg and arg[2]) or 1e5
local SEED = tonumber(arg and arg[3]) or 42
local ALPHAS = { 0.8, 1.0, 1.2 }
local SIZES = { 0.01, 0.10 }
local SCAN_EVERY = 10000 -- Zipf requests between two scans
local SCAN_LEN = 20000   -- keys per scan, each used once

-- -- Deterministic PRNG: splitmix64 -------------------------------------------------

local rng_state = ffi.new("uint64_t[1]")
local function seed(s)
    rng_state[0] = s
end

--- A uniform double in [0, 1) from the top 53 bits.
local function uniform()
    local z = rng_state[0] + 0x9E3779B97F4A7C15ULL
    rng_state[0] = z
    z = bit.bxor(z, bit.rshift(z, 30)) * 0xBF58476D1CE4E5B9ULL
    z = bit.bxor(z, bit.rshift(z, 27)) * 0x94D049BB133111EBULL
    z = bit.bxor(z, bit.rshift(z, 31))
    return tonumber(bit.rshift(z, 11)) * (1 / 9007199254740992)
end

-- -- Traces -------------------------------------------------------------------------------
-- A trace is an int32 array: >= 1 is a Zipf rank, < 0 a scan key (used once).

local function zipf_cdf(n, alpha)
    local cdf = ffi.new("double[?]", n + 1)
    local sum = 0
    for r = 1, n do
        sum = sum + 1 / r ^ alpha
        cdf[r] = sum
    end
    for r = 1, n do
        cdf[r] = cdf[r] / sum
    end
    return cdf
end

local function zipf_draw(cdf, n)
    local u = uniform()
    local lo, hi = 1, n
    while lo < hi do
        local mid = floor((lo + hi) / 2)
        if cdf[mid] < u then
            lo = mid + 1
        else
            hi = mid
        end
    end
    return lo
end

--- The Zipf trace for `alpha`, and the same requests with scans inserted.
local function make_traces(alpha)
    seed(SEED)
    local cdf = zipf_cdf(NKEYS, alpha)
    local zipf = ffi.new("int32_t[?]", NREQ)
    for i = 0, NREQ - 1 do
        zipf[i] = zipf_draw(cdf, NKEYS)
    end
    local nscans = floor(NREQ / SCAN_EVERY)
    local len = NREQ + nscans * SCAN_LEN
    local scan = ffi.new("int32_t[?]", len)
    local j, next_scan_key = 0, 1
    for i = 0, NREQ - 1 do
        if i > 0 and i % SCAN_EVERY == 0 then
            for _ = 1, SCAN_LEN do
                scan[j] = -next_scan_key
                next_scan_key = next_scan_key + 1
                j = j + 1
            end
        end
        scan[j] = zipf[i]
        j = j + 1
    end
    return { zipf = { t = zipf, n = NREQ }, scan = { t = scan, n = j } }
end

-- -- Key strings --------------------------------------------------------------------------

local zkeys = {}
for r = 1, NKEYS do
    zkeys[r] = "key:" .. r
end
local skeys = {}
local function key_of(x)
    if x > 0 then
        return zkeys[x]
    end
    local k = skeys[-x]
    if not k then
        k = "scan:" .. -x
        skeys[-x] = k
    end
    return k
end

-- -- Caches -----------------------------------------------------------------------------

local cbackend = require "dogpile.cache.backends.c"
require "dogpile.backends.shared_memory"
local NO_VALUE = require("dogpile.cache.api").NO_VALUE

local lrucache
do
    -- lua-resty-lrucache reads ngx.now when it loads; outside nginx, give it a
    -- stand-in for the load only (it is only called for entries with a ttl).
    local shim = rawget(_G, "ngx") == nil
    if shim then
        _G.ngx = { now = os.time }
    end
    local ok, mod = pcall(require, "resty.lrucache")
    if shim then
        _G.ngx = nil
    end
    if ok then
        lrucache = mod
    else
        io.stderr:write("resty.lrucache not available (", tostring(mod), "); skipping it\n")
    end
end

local instance = 0

--- Replays `trace` against a read-through cache; returns hits over all
--- requests and over the Zipf (non-scan) requests, and the evictions.
local function run_shm(policy, size, trace)
    instance = instance + 1
    local b = cbackend.open("dogpile.cache.shared_memory", {
        name = "bench.eviction." .. instance, max_items = size, eviction = policy,
    })
    local t, n = trace.t, trace.n
    local hits, zhits, zreq = 0, 0, 0
    for i = 0, n - 1 do
        local x = t[i]
        local key = key_of(x)
        local hit = b:get(key) ~= NO_VALUE
        if hit then
            hits = hits + 1
        else
            b:set(key, "v")
        end
        if x > 0 then
            zreq = zreq + 1
            if hit then zhits = zhits + 1 end
        end
    end
    local st = b:stats()
    assert(st.items <= size, "the bound was not kept")
    b:close()
    return hits / n, zhits / zreq, st.evictions
end

local function run_lrucache(size, trace)
    local c = assert(lrucache.new(size))
    local t, n = trace.t, trace.n
    local hits, zhits, zreq = 0, 0, 0
    for i = 0, n - 1 do
        local x = t[i]
        local key = key_of(x)
        local hit = c:get(key) ~= nil
        if hit then
            hits = hits + 1
        else
            c:set(key, "v")
        end
        if x > 0 then
            zreq = zreq + 1
            if hit then zhits = zhits + 1 end
        end
    end
    return hits / n, zhits / zreq
end

-- -- Report -------------------------------------------------------------------------------

print(format("%s; %d requests over %d keys, seed %d; read-through, bounded by max_items",
             jit and jit.version or _VERSION, NREQ, NKEYS, SEED))
print(format("scan-polluted: every %d Zipf requests, a scan of %d keys used once "
             .. "(hit ratio over the Zipf requests; scan requests never hit)", SCAN_EVERY, SCAN_LEN))
print()
print(format("%-14s %6s %8s | %8s %8s %10s | %8s %8s", "trace", "alpha", "size",
             "s3fifo", "lru", "lrucache", "s3f/lru", "miss red."))
print(string.rep("-", 88))

local t0 = os.clock()
for _, alpha in ipairs(ALPHAS) do
    local traces = make_traces(alpha)
    for _, kind in ipairs({ "zipf", "scan" }) do
        for _, frac in ipairs(SIZES) do
            local size = floor(NKEYS * frac)
            local tr = traces[kind]
            local pick = kind == "zipf" and 1 or 2
            local s = { run_shm("s3fifo", size, tr) }
            local l = { run_shm("lru", size, tr) }
            local r = lrucache and { run_lrucache(size, tr) } or {}
            local hs, hl, hr = s[pick], l[pick], r[pick]
            -- miss reduction: how much of LRU's misses s3fifo avoids
            local red = (1 - hl) > 0 and (1 - (1 - hs) / (1 - hl)) or 0
            print(format("%-14s %6.1f %7d%% | %8.4f %8.4f %10s | %8.3f %+7.1f%%",
                         kind == "zipf" and "zipf" or "zipf+scans", alpha, floor(frac * 100 + 0.5), hs, hl,
                         hr and format("%.4f", hr) or "-", hs / hl, red * 100))
        end
    end
end
print()
print("s3f/lru: s3fifo's hit ratio over lru's. miss red.: share of lru's misses that s3fifo avoids.")
print(format("(%.1f s of CPU)", os.clock() - t0))
