--- The cost of a cache hit, against the floor (DESIGN.md, "The hot path"):
-- a plain Lua table and lua-resty-lrucache. One run measures every path.
--
--   luajit bench/hit.lua [iterations] [repetitions] [rounds]
--
-- Besides its own table, it prints ROW lines for bench/run (bench/lib.lua):
-- the memory region's get_or_create and get hits against lua-resty-lrucache
-- (target <= 1.3x, issue 21, in keys order and shuffled; the loop must
-- compile without a trace abort), against a plain
-- table, and against Python dogpile.cache's memory get_or_create hit
-- (measured by bench/anchors.py in the same run); and the same region's
-- shuffled hits with and without the get histogram's sampling
-- (dogpile.cache.latency), whose cost must stay within 5%.
--
-- Each path runs its own loop over NKEYS keys cycled through (in KEYS order,
-- and for the "shuffled" rows in a fixed random order), summing the
-- values so the loop cannot be optimised away; the reported time is the
-- median of the repetitions, in nanoseconds per hit (loop overhead included,
-- for every path alike).
local ffi = require "ffi"
local jit = require "jit"

local format, floor, sort = string.format, math.floor, table.sort

local blib = require "lib" -- bench/lib.lua (bench/run puts bench/ on LUA_PATH)

local N = tonumber(arg and arg[1]) or blib.count(2e6, 2e5)
local REPS = tonumber(arg and arg[2]) or (blib.quick and 3 or 5)
local ROUNDS = tonumber(arg and arg[3]) or (blib.quick and 1 or 3)
local WARMUP = blib.quick and 2e4 or 1e5
local NKEYS = 1000
local HOTLOOP = 56  -- LuaJIT's default; setting it resets the hot counters

-- -- Clock -------------------------------------------------------------------------

-- CPU time of this process: the machine is shared (2 cores, other work
-- running), and time spent descheduled is no part of a hit. Two reads per
-- repetition of 2e6 hits, so the cost of the read itself (a system call) is
-- lost in the noise. Wall time (CLOCK_MONOTONIC) where it is not available.
local clock, clock_name
do
    local ok = pcall(ffi.cdef, [[
        typedef struct { long tv_sec; long tv_nsec; } dp_bench_timespec;
        int clock_gettime(int clk_id, dp_bench_timespec *tp);
    ]])
    local CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID = 1, 2  -- Linux
    if ok and ffi.os == "Linux" then
        local ts = ffi.new("dp_bench_timespec")
        local id = ffi.C.clock_gettime(CLOCK_PROCESS_CPUTIME_ID, ts) == 0
            and CLOCK_PROCESS_CPUTIME_ID or CLOCK_MONOTONIC
        clock_name = id == CLOCK_MONOTONIC and "clock_gettime(CLOCK_MONOTONIC)"
            or "clock_gettime(CLOCK_PROCESS_CPUTIME_ID), CPU time"
        clock = function()
            ffi.C.clock_gettime(id, ts)
            return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
        end
    else
        clock, clock_name = os.clock, "os.clock (CPU time)"
    end
end

-- -- The caches ------------------------------------------------------------------

-- lua-resty-lrucache reads ngx.now when it loads; outside nginx, give it a
-- stand-in for the load only (it is only called for entries with a ttl).
local lrucache
do
    local shim = rawget(_G, "ngx") == nil
    if shim then
        _G.ngx = { now = function() return clock() end }
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

local cache = require "dogpile.cache"

local KEYS = {}
for i = 1, NKEYS do
    KEYS[i] = "key:" .. i
end

local plain = {}
for i = 1, NKEYS do
    plain[KEYS[i]] = i
end

local lru
if lrucache then
    lru = assert(lrucache.new(2 * NKEYS))
    for i = 1, NKEYS do
        lru:set(KEYS[i], i)
    end
end

local function region(conf)
    local r = cache.make_region():configure("dogpile.cache.memory", conf)
    for i = 1, NKEYS do
        r:set(KEYS[i], i)
    end
    return r
end

-- r_nohist is r_exp with the get histogram's sampling off (latency.lua):
-- what the sampling costs the hit, measured against it in this run. The two
-- are filled key by key in turn, so that their values lie alike in memory
-- (two regions filled one after the other differ by a few per cent with the
-- same code).
local latency = require "dogpile.cache.latency"
local r_exp = cache.make_region():configure("dogpile.cache.memory", { expiration_time = 3600 })
local was = latency.set_sampling(false)
local r_nohist = cache.make_region():configure("dogpile.cache.memory", { expiration_time = 3600 })
latency.set_sampling(was)
for i = 1, NKEYS do
    r_exp:set(KEYS[i], i)
    r_nohist:set(KEYS[i], i)
end
local r_noexp = region({})
local r_lru = region({ expiration_time = 3600, arguments = { max_items = 2 * NKEYS } })
local r_lru_noexp = region({ arguments = { max_items = 2 * NKEYS } })

local function creator()
    error("bench: the creator ran, so a get_or_create was not a hit")
end

-- -- The loops: one per path, so that each compiles to its own trace ---------------

local function loop_plain(n)
    local acc = 0
    for i = 1, n do
        acc = acc + plain[KEYS[i % NKEYS + 1]]
    end
    return acc
end

local function loop_lrucache(n)
    local acc = 0
    for i = 1, n do
        acc = acc + lru:get(KEYS[i % NKEYS + 1])
    end
    return acc
end

local function loop_get(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r_exp:get(KEYS[i % NKEYS + 1])
    end
    return acc
end

local function loop_get_or_create(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r_exp:get_or_create(KEYS[i % NKEYS + 1], creator)
    end
    return acc
end

local function loop_get_lru(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r_lru:get(KEYS[i % NKEYS + 1])
    end
    return acc
end

local function loop_get_noexp(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r_noexp:get(KEYS[i % NKEYS + 1])
    end
    return acc
end

-- Extra rows, to split the costs: the LRU without the clock, and the clock
-- alone (one FFI call per hit when the region has an expiration_time).
local function loop_get_lru_noexp(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r_lru_noexp:get(KEYS[i % NKEYS + 1])
    end
    return acc
end

local C = require("dogpile.lib").C
local function loop_clock(n)
    local acc = 0
    for i = 1, n do
        local now = C.dp_clock_now()
        acc = acc + plain[KEYS[i % NKEYS + 1]] + (now - now)
    end
    return acc
end

-- Four regions served by one call site, in turn (as a decorator's call
-- serves every decorated function's region): the hit's functions must be
-- the same for every region, or the site takes a side trace per region.
local R4 = {}
for j = 1, 4 do
    R4[j] = region({ expiration_time = 3600 })
end
local function loop_goc_4_regions(n)
    local acc = 0
    for i = 1, n do
        acc = acc + R4[i % 4 + 1]:get_or_create(KEYS[i % NKEYS + 1], creator)
    end
    return acc
end

-- The same 1,000 keys in a shuffled order (fixed seed): consecutive hits
-- land on unrelated hash slots and cache lines, as a server's keys do,
-- rather than walking KEYS and its strings in memory order.
local ORDER = {}
do
    for i = 1, NKEYS do
        ORDER[i] = i
    end
    local seed = 12345
    for i = NKEYS, 2, -1 do
        seed = (seed * 1103515245 + 12345) % 2147483648
        local j = seed % i + 1
        ORDER[i], ORDER[j] = ORDER[j], ORDER[i]
    end
end
local SHUFFLED = {}
for i = 1, NKEYS do
    SHUFFLED[i] = KEYS[ORDER[i]]
end

local function loop_lrucache_shuffled(n)
    local acc = 0
    for i = 1, n do
        acc = acc + lru:get(SHUFFLED[i % NKEYS + 1])
    end
    return acc
end

local function loop_get_shuffled(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r_exp:get(SHUFFLED[i % NKEYS + 1])
    end
    return acc
end

local function loop_get_or_create_shuffled(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r_exp:get_or_create(SHUFFLED[i % NKEYS + 1], creator)
    end
    return acc
end

local function loop_get_shuffled_nohist(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r_nohist:get(SHUFFLED[i % NKEYS + 1])
    end
    return acc
end

local function loop_get_or_create_shuffled_nohist(n)
    local acc = 0
    for i = 1, n do
        acc = acc + r_nohist:get_or_create(SHUFFLED[i % NKEYS + 1], creator)
    end
    return acc
end

local PATHS = {
    { "plain table t[key]", loop_plain },
    { "resty.lrucache :get", lru and loop_lrucache },
    { "region:get (expiration_time)", loop_get },
    { "region:get_or_create hit", loop_get_or_create },
    { "region:get (LRU max_items)", loop_get_lru },
    { "region:get (no expiration)", loop_get_noexp },
    { "(extra) region:get (LRU, no exp.)", loop_get_lru_noexp },
    { "(extra) t[key] + dp_clock_now()", loop_clock },
    { "shuffled: resty.lrucache :get", lru and loop_lrucache_shuffled, shuffled = true },
    { "shuffled: region:get (exp.)", loop_get_shuffled, shuffled = true },
    { "shuffled: get_or_create hit", loop_get_or_create_shuffled, shuffled = true },
    { "shuffled: get, no histograms", loop_get_shuffled_nohist, shuffled = true },
    { "shuffled: get_or_create, no histo.", loop_get_or_create_shuffled_nohist, shuffled = true },
    { "(extra) get_or_create, 4 regions", loop_goc_4_regions },
}

-- -- Measuring -------------------------------------------------------------------

local function expected_sum(n, shuffled)
    -- key i % NKEYS + 1 holds i % NKEYS + 1; whole cycles sum to NKEYS(NKEYS+1)/2
    local full, rest = floor(n / NKEYS), n % NKEYS
    local s = full * NKEYS * (NKEYS + 1) / 2
    for i = 1, rest do
        local k = i % NKEYS + 1
        s = s + (shuffled and ORDER[k] or k)
    end
    return s
end

local function median(xs)
    sort(xs)
    local m = #xs
    if m % 2 == 1 then
        return xs[(m + 1) / 2]
    end
    return (xs[m / 2] + xs[m / 2 + 1]) / 2
end

local vmdef = require "jit.vmdef"
local jutil = require "jit.util"

local function where(func, pc)
    local fi = func and jutil.funcinfo(func, pc) or {}
    return fi.loc or (fi.ffid and vmdef.ffnames[fi.ffid]) or "?"
end

--- ns per hit (median), min and max over REPS runs of n iterations, and
-- what the trace compiler did meanwhile: root and side traces compiled,
-- and the reasons of any abort. jit.attach holds one handler per event, so
-- this replaces -jv's while it runs: the aborts are reported here instead.
local function measure(loop, n, shuffled)
    local roots, sides, aborts = 0, 0, {}
    local function on_trace(what, tr, func, pc, otr, oex)
        if what == "start" then
            if otr then
                sides = sides + 1
            else
                roots = roots + 1
            end
        elseif what == "abort" then
            local msg = vmdef.traceerr[otr] or tostring(otr)
            if type(oex) == "function" then
                oex = where(oex)
            end
            local ok, m = pcall(format, msg, oex)
            aborts[#aborts + 1] = format("trace %d: %s at %s", tr, ok and m or msg, where(func, pc))
        end
    end
    -- Each path starts from a clean compiler state: what one path compiled
    -- (or blacklisted) must not help or hurt the next.
    jit.flush()
    jit.opt.start("hotloop=" .. HOTLOOP)
    jit.attach(on_trace, "trace")
    local want = expected_sum(n, shuffled)
    local want_warm = expected_sum(WARMUP, shuffled)
    if loop(WARMUP) ~= want_warm then  -- warm up: compile the trace and its side traces
        jit.attach(on_trace)
        error("bench: wrong checksum while warming up (a miss?)")
    end
    local times = {}
    for r = 1, REPS do
        collectgarbage()
        local t0 = clock()
        local acc = loop(n)
        local t1 = clock()
        if acc ~= want then
            jit.attach(on_trace)
            error(format("bench: checksum %s, expected %s (a miss?)", tostring(acc), tostring(want)))
        end
        times[r] = (t1 - t0) / n * 1e9
    end
    jit.attach(on_trace)
    local lo, hi = math.huge, 0
    for r = 1, #times do
        lo, hi = math.min(lo, times[r]), math.max(hi, times[r])
    end
    return { ns = median(times), lo = lo, hi = hi, aborts = aborts, times = times,
             traces = format("%d+%d", roots, sides) }
end

--- The paths of `group` measured in turns: the traces flushed once, each
-- path warmed up, then K rounds in which every path runs n iterations, in
-- an order that rotates each round. A change in the machine's load then
-- falls on every path of the group alike, which a path's repetitions in a
-- row do not give on a shared machine. Returns, per path, {ns = median, lo,
-- hi, aborts = {...}, traces = "roots+sides"} (traces and aborts counted
-- while that path ran).
local function measure_turns(group, n, k)
    local current
    local stats = {}
    for i = 1, #group do
        stats[i] = { roots = 0, sides = 0, aborts = {}, times = {} }
    end
    local function on_trace(what, tr, func, pc, otr, oex)
        local st = stats[current]
        if what == "start" then
            if otr then
                st.sides = st.sides + 1
            else
                st.roots = st.roots + 1
            end
        elseif what == "abort" then
            local msg = vmdef.traceerr[otr] or tostring(otr)
            if type(oex) == "function" then
                oex = where(oex)
            end
            local ok, m = pcall(format, msg, oex)
            st.aborts[#st.aborts + 1] = format("trace %d: %s at %s", tr, ok and m or msg,
                                               where(func, pc))
        end
    end
    jit.flush()
    jit.opt.start("hotloop=" .. HOTLOOP)
    jit.attach(on_trace, "trace")
    local function run(i, iters)
        current = i
        local p = group[i]
        local t0 = clock()
        local acc = p[2](iters)
        local t1 = clock()
        if acc ~= expected_sum(iters, p.shuffled) then
            jit.attach(on_trace)
            error(format("bench: %s: checksum %s (a miss?)", p[1], tostring(acc)))
        end
        return (t1 - t0) / iters * 1e9
    end
    for i = 1, #group do
        run(i, WARMUP)
    end
    for round = 1, k do
        collectgarbage()
        -- Reset the hot counters: a loop's function called round after
        -- round would otherwise become hot itself, and a trace rooted at its
        -- entry aborts at the loop inside (inner loop in root trace).
        jit.opt.start("hotloop=" .. HOTLOOP)
        for j = 0, #group - 1 do
            local i = (round + j) % #group + 1
            local st = stats[i]
            st.times[#st.times + 1] = run(i, n)
        end
    end
    jit.attach(on_trace)
    local out = {}
    for i, st in ipairs(stats) do
        local lo, hi = math.huge, 0
        for _, t in ipairs(st.times) do
            lo, hi = math.min(lo, t), math.max(hi, t)
        end
        out[i] = { name = group[i][1], ns = median(st.times), lo = lo, hi = hi,
                   aborts = st.aborts, traces = format("%d+%d", st.roots, st.sides) }
    end
    return out
end

-- -- Report ----------------------------------------------------------------------

print(format("%s (%s %s), JIT %s", jit.version, jit.os, jit.arch,
             jit.status() and "on" or "OFF"))
print(format("dogpile %s; %d keys cycled; %d iterations x %d repetitions x %d rounds, median",
             tostring(cache._VERSION), NKEYS, N, REPS, ROUNDS))
print(format("clock: %s", clock_name))
print()

-- The paths take turns ROUNDS times, so that a change in the machine's load
-- (other processes) falls on all of them alike; each path's figure is the
-- median of all its repetitions, its aborts those of every round.
local results = {}
for round = 1, ROUNDS do
    for i, p in ipairs(PATHS) do
        if p[2] then
            local res = measure(p[2], N, p.shuffled)
            local acc = results[i]
            if not acc then
                acc = { name = p[1], all = {}, aborts = {}, lo = math.huge, hi = 0,
                        traces = res.traces }
                results[i] = acc
            end
            for _, t in ipairs(res.times) do acc.all[#acc.all + 1] = t end
            for _, a in ipairs(res.aborts) do acc.aborts[#acc.aborts + 1] = a end
            acc.lo, acc.hi = math.min(acc.lo, res.lo), math.max(acc.hi, res.hi)
            if res.traces ~= acc.traces and not acc.traces:find(res.traces, 1, true) then
                acc.traces = acc.traces .. "," .. res.traces
            end
            acc.ns = median(acc.all)
        else
            results[i] = results[i] or { name = p[1] }
        end
    end
end

local base = results[1].ns
local lru_ns = results[2].ns
print(format("%-34s %8s %11s %8s %10s %7s %6s", "path", "ns/hit", "min-max", "x table",
             "x lrucache", "traces", "aborts"))
print(string.rep("-", 90))
for _, r in ipairs(results) do
    if r.ns then
        print(format("%-34s %8.2f %5.1f-%-5.1f %8.2f %10s %7s %6d", r.name, r.ns, r.lo, r.hi,
                     r.ns / base, lru_ns and format("%.2f", r.ns / lru_ns) or "-", r.traces,
                     #r.aborts))
    else
        print(format("%-34s %8s", r.name, "skipped"))
    end
end
for _, r in ipairs(results) do
    for _, a in ipairs(r.aborts or {}) do
        print(format("abort in %s: %s", r.name, a))
    end
end
print()
print("traces: root+side traces compiled for the path (1+0: the hit runs in one loop trace).")
print("Absolute times vary with the machine and its load; the ratios are what matter.")

-- -- ROW lines for bench/run ------------------------------------------------------

-- Python dogpile.cache's memory get_or_create hit, from bench/anchors.py
-- (Debian's python3-dogpile.cache, so /usr/bin/python3), in this same run.
local function python_anchor(case)
    local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
    local p = io.popen("/usr/bin/python3 " .. dir .. "/anchors.py " .. case .. " 2>&1")
    local out = p and p:read("*a") or ""
    if p then p:close() end
    local v = tonumber(out:match("^%s*([%d.]+)%s*$"))
    if not v then
        io.stderr:write("bench/anchors.py ", case, " failed: ", out, "\n")
    end
    return v
end

local goc, plain_r, get_r = results[4], results[1], results[3]
local function label(name, r)
    if r.aborts and #r.aborts > 0 then
        return name .. " (ABORTED)"
    end
    return name .. " (compiled, 0 aborts)"
end

-- The ratios of the ROW lines come from the paths measured in turns
-- (measure_turns): each group's paths ran interleaved, round after round.
local TURNS = ROUNDS * REPS * 4
local turns_n = math.max(floor(N / 4), 1000)
local seq, shuf
if lrucache then
    seq = measure_turns({ PATHS[2], PATHS[3], PATHS[4] }, turns_n, TURNS)
    shuf = measure_turns({ PATHS[9], PATHS[10], PATHS[11], PATHS[12], PATHS[13] }, turns_n, TURNS)
    print()
    print(format("In turns (%d rounds of %d iterations, the paths of a group interleaved):", TURNS,
                 turns_n))
    print(format("%-34s %8s %11s %10s %7s %6s", "path", "ns/hit", "min-max", "x lrucache",
                 "traces", "aborts"))
    print(string.rep("-", 81))
    for _, g in ipairs({ seq, shuf }) do
        for _, r in ipairs(g) do
            print(format("%-34s %8.2f %5.1f-%-5.1f %10.2f %7s %6d", r.name, r.ns, r.lo, r.hi,
                         r.ns / g[1].ns, r.traces, #r.aborts))
        end
    end
    for _, g in ipairs({ seq, shuf }) do
        for _, r in ipairs(g) do
            for _, a in ipairs(r.aborts) do
                print(format("abort in %s (in turns): %s", r.name, a))
            end
        end
    end
    print(format("with/without histograms: get %.3f, get_or_create %.3f", shuf[2].ns / shuf[4].ns,
                 shuf[3].ns / shuf[5].ns))
    print()
    local lru_t, get_t, goc_t = seq[1], seq[2], seq[3]
    blib.row("hit_memory", label("memory region get_or_create hit", goc_t), goc_t.ns, "ns/op",
             "resty.lrucache get", lru_t.ns, "<=1.3")
    blib.row("hit_memory_get", label("memory region get hit", get_t), get_t.ns, "ns/op",
             "resty.lrucache get", lru_t.ns, "<=1.3")
    local s_lru, s_get, s_goc, s_get_nh, s_goc_nh = shuf[1], shuf[2], shuf[3], shuf[4], shuf[5]
    blib.row("hit_memory_shuffled", label("memory region get_or_create hit, shuffled keys", s_goc),
             s_goc.ns, "ns/op", "resty.lrucache get, shuffled keys", s_lru.ns, "<=1.3")
    blib.row("hit_memory_get_shuffled", label("memory region get hit, shuffled keys", s_get),
             s_get.ns, "ns/op", "resty.lrucache get, shuffled keys", s_lru.ns, "<=1.3")
    -- The get histogram's sampling (about one lookup in latency.SAMPLE_EVERY
    -- timed): the same region with and without it (issue 20: within 5%).
    blib.row("hit_histograms_get", label("memory region get hit with histograms, shuffled",
                                         s_get), s_get.ns, "ns/op", "the same without histograms",
             s_get_nh.ns, "<=1.05")
    blib.row("hit_histograms_goc", label("memory region get_or_create hit with histograms, "
                                         .. "shuffled", s_goc), s_goc.ns, "ns/op",
             "the same without histograms", s_goc_nh.ns, "<=1.05")
else
    blib.row("hit_memory", label("memory region get_or_create hit", goc) .. " [no lrucache]",
             goc.ns, "ns/op", "resty.lrucache get", nil, "<=1.3")
end
do
    local h = latency.of(r_exp)
    local samples = h and h.get and h.get.count or 0
    local nh = latency.of(r_nohist)
    print(format("get histogram samples: %d (region with histograms), %d (without)", samples,
                 nh and nh.get and nh.get.count or 0))
    if samples == 0 or (nh and nh.get) then
        error("bench: the get histogram was not sampled as configured")
    end
end
blib.row("hit_memory_vs_table", "memory region get_or_create hit vs plain table", goc.ns, "ns/op",
         "plain table t[key]", plain_r.ns, "")
blib.row("hit_memory_vs_python", "memory region get_or_create hit vs Python", goc.ns, "ns/op",
         "Python dogpile.cache memory get_or_create", python_anchor("memory_hit"), "")
