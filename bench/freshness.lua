--- early_refresh (XFetch) against plain expiry, simulated (issue 16): 50
-- requests a second on one key whose creator takes 100 ms and whose
-- expiration time is 2 s, for 20 seconds of a virtual clock, over SEEDS
-- seeds (spec/fixtures/freshness/xfetch.lua runs it; spec/freshness_spec.lua
-- checks the same simulation). Modes: no early_refresh, early_refresh = 1,
-- and early_refresh = 1 with an async_creation_runner.
--
--   luajit bench/freshness.lua [seeds]
--
-- Writes $BENCH_OUT/freshness/xfetch.csv (per 0.5 s of simulated time, the
-- mean cumulative count of requests that waited for a missing or expired
-- value after the first one was stored, and of requests that got an expired
-- value, per mode) and draws xfetch.png with bench/freshness.gp. ROW lines:
-- the waits per run with and without early_refresh, the regenerations per
-- expiration period, and the cost of early_refresh's draw on a memory hit.
local blib = require "lib" -- bench/lib.lua (bench/run puts bench/ on LUA_PATH)

local bench_dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = bench_dir .. "/../spec/?.lua;" .. package.path
local vclock = require "fixtures.freshness.vclock"
local xfetch = require "fixtures.freshness.xfetch"

local format = string.format
local SEEDS = tonumber(arg and arg[1]) or (blib.quick and 5 or 40)
local DURATION, BIN = 20, 0.5

local function sh(cmd)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    return out
end

local function q(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- -- The simulation ----------------------------------------------------------------

local MODES = {
    { id = "off", title = "no early_refresh" },
    { id = "early", title = "early_refresh = 1", beta = 1 },
    { id = "async", title = "early_refresh = 1 + async runner", beta = 1, async = true },
}

local env = vclock.enter()
local nbins = math.floor(DURATION / BIN)
for _, m in ipairs(MODES) do
    m.waited, m.stale = {}, {}
    for b = 1, nbins do
        m.waited[b], m.stale[b] = 0, 0
    end
    m.total_waited, m.total_stale, m.regen, m.refreshed = 0, 0, 0, 0
    for seed = 1, SEEDS do
        local res = xfetch.run(env, { seed = seed, beta = m.beta, async = m.async,
                                      duration = DURATION })
        local first = res.stored[1] - res.first
        for _, r in ipairs(res.requests) do
            local b = math.floor(r.t / BIN) + 1
            if r.t > first and r.kind == "waited" then
                m.waited[b] = m.waited[b] + 1 / SEEDS
            elseif r.kind == "stale" then
                m.stale[b] = m.stale[b] + 1 / SEEDS
            end
        end
        m.total_waited = m.total_waited + res.waited_after_first / SEEDS
        m.total_stale = m.total_stale + res.counts.stale / SEEDS
        m.refreshed = m.refreshed + res.counts.refreshed / SEEDS
        m.regen = m.regen + res.regenerations_per_period / SEEDS
    end
end

-- The cost of the draw on a hit: a memory region's get_or_create hit, with
-- early_refresh and without, on values far from their expiry (the common
-- case: one subtraction and a comparison decide there is no draw).
local cache = env.cache
local NK = 1000
local KEYS = {}
for i = 1, NK do
    KEYS[i] = "key:" .. i
end
local function region(conf)
    local r = cache.make_region():configure("dogpile.cache.memory", conf)
    for i = 1, NK do
        r:get_or_create(KEYS[i], function() return i end)
    end
    return r
end
vclock.leave()
-- The real clock for the timing: a fresh region module, as any program has.
cache = require "dogpile.cache"
local r_plain = region({ expiration_time = 3600 })
local r_early = region({ expiration_time = 3600, early_refresh = 1 })
local function creator()
    error("bench: a miss")
end
local LOOP = [[
local KEYS, NK, r, creator = ...
return function(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r:get_or_create(KEYS[i %% NK + 1], creator)
    end
    return acc
end]]
local loops = {}
for name, r in pairs({ plain = r_plain, early = r_early }) do
    loops[name] = loadstring(LOOP:format(), "=freshness_" .. name)(KEYS, NK, r, creator)
end
-- Each loop from a clean compiler state, as bench/hit.lua measures. Then
-- pairs of short runs (each well inside a scheduler time slice), the order
-- alternating, and the median of each pair's ratio, as bench/tiered.lua's L1
-- hit: a change of the machine's load between two long runs moved the
-- ratio of 9 alternated 1e6-hit runs by +-10%.
jit.flush()
local N = blib.count(1e5, 1e4)
local PAIRS = blib.quick and 20 or 200
loops.plain(N)
loops.early(N)
local times, ratios = { plain = {}, early = {} }, {}
local function timed(name)
    local t0 = blib.clock()
    loops[name](N)
    local ns = (blib.clock() - t0) * 1e9 / N
    times[name][#times[name] + 1] = ns
    return ns
end
for i = 1, PAIRS do
    local p, e
    if i % 2 == 1 then
        p = timed("plain")
        e = timed("early")
    else
        e = timed("early")
        p = timed("plain")
    end
    ratios[i] = e / p
end
local ns_plain, ns_early = blib.median(times.plain), blib.median(times.early)
local ratio = blib.median(ratios)

-- -- Report ----------------------------------------------------------------------

print(format("XFetch simulation: 50 requests/s on one key, creator 100 ms, expiration 2 s, "
             .. "%d s, %d seeds (means per run)", DURATION, SEEDS))
print(format("%-34s %8s %8s %10s %12s", "mode", "waited", "expired", "refreshed", "regen/period"))
for _, m in ipairs(MODES) do
    print(format("%-34s %8.2f %8.2f %10.2f %12.2f", m.title, m.total_waited, m.total_stale,
                 m.refreshed, m.regen))
end
print("waited: requests that waited for a missing or expired value after the first value;")
print("expired: requests that got an expired value at once (another caller regenerating);")
print("refreshed: requests that ran the creator on a fresh value (early_refresh, no runner).")
print(format("memory get_or_create hit: %.2f ns without early_refresh, %.2f ns with it (medians; "
             .. "median ratio of %d pairs %.3f)", ns_plain, ns_early, PAIRS, ratio))

local OUT = (os.getenv("BENCH_OUT") or (bench_dir .. "/results")) .. "/freshness"
sh("mkdir -p " .. q(OUT))
local csv = OUT .. "/xfetch.csv"
local f = assert(io.open(csv, "w"))
local header = { "t" }
for _, m in ipairs(MODES) do
    header[#header + 1] = "waited: " .. m.title
end
for _, m in ipairs(MODES) do
    header[#header + 1] = "expired: " .. m.title
end
f:write(table.concat(header, ","), "\n")
local cum = {}
for b = 1, nbins do
    local row = { format("%.1f", b * BIN) }
    for i, m in ipairs(MODES) do
        cum[i] = (cum[i] or 0) + m.waited[b]
        row[#row + 1] = format("%.3f", cum[i])
    end
    for i, m in ipairs(MODES) do
        cum[#MODES + i] = (cum[#MODES + i] or 0) + m.stale[b]
        row[#row + 1] = format("%.3f", cum[#MODES + i])
    end
    f:write(table.concat(row, ","), "\n")
end
f:close()
local png = OUT .. "/xfetch.png"
os.remove(png)
local out = sh(format("gnuplot -e %s %s 2>&1",
    q(format("csv='%s'; png='%s'; seeds=%d; quick=%d", csv, png, SEEDS, blib.quick and 1 or 0)),
    q(bench_dir .. "/freshness.gp")))
if io.open(png) then
    print(format("  -> %s, %s", csv, png))
else
    print(format("  -> %s (no PNG: %s)", csv, out))
end

local off, early = MODES[1], MODES[2]
blib.row("xfetch_waited", "XFetch sim: requests waiting after the first value (early_refresh = 1)",
         early.total_waited, "per 20 s", "no early_refresh", off.total_waited, "abs<=0")
blib.row("xfetch_waited_async", "XFetch sim: requests waiting, early_refresh + async runner",
         MODES[3].total_waited + MODES[3].refreshed, "per 20 s", "no early_refresh",
         off.total_waited, "abs<=0")
blib.row("xfetch_regenerations", "XFetch sim: regenerations per expiration period (early_refresh = 1)",
         early.regen, "per 2 s", "no early_refresh", off.regen, "abs<=2")
blib.row("hit_memory_early_refresh", "memory get_or_create hit with early_refresh", ns_plain * ratio,
         "ns/op", "the same without early_refresh", ns_plain, "<=1.1")
