--- dogpile.cache.tiered (issue 14, item 7), in one run:
--   1. an L1 hit of a tiered region (memory -> redis) against a plain memory
--      region's hit: region:get on NKEYS keys cycled through, median ns per
--      hit; target <= 1.2x, and the loop compiles with no trace abort;
--   2. the coherence delay: this process sets a key, another process (a
--      reader polling region:get on its memory tier) reports when it first
--      sees the new value; p50 and p99 over the sets; target p99 <= 100 ms;
--   3. a Zipf workload (s = 1.0 over ZKEYS keys, get_or_create, every key
--      stored first): hit rate of the memory tier and ns per call, memory ->
--      redis (memory tier bounded to 0.1%, 1%, 10% and 30% of the keys; the
--      table's row is 10%) against redis alone.
-- The hit loops' traces are compared by IR instruction count (jit.util:
-- wall time is noisy on a shared machine). The coherence delays (as a
-- cumulative distribution) and the Zipf comparison are written as CSV and
-- drawn with gnuplot (bench/tiered.gp) into $BENCH_OUT/curves/tiered_*.png,
-- as bench/curves.lua does.
--
--   luajit bench/tiered.lua [hits = 2e6] [sets = 200]  (BENCH_QUICK=1: small counts)
--   (hits: the warm-up's; each timed run is hits / 20)
--
-- LUA_PATH and LUA_CPATH must reach the modules (bench/run sets them; or
-- `. .ci/lib.sh && use_stage NAME`). The server is REDIS_PORT's when set,
-- else a redis-server of our own (bench/servers_lib.lua). Prints ROW lines
-- (bench/lib.lua) for bench/run's table.
local here = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$") or "."
local lib = dofile(here .. "/lib.lua")
local S = dofile(here .. "/servers_lib.lua")
local jit = require "jit"
local cache = require "dogpile.cache"
pcall(cache.register_backend, "dogpile.cache.tiered", "dogpile.cache.backends.tiered")

local format = string.format
local NO_VALUE = cache.NO_VALUE

local HITS = tonumber(arg and arg[1]) or lib.count(2e6, 2e4)
local SETS = tonumber(arg and arg[2]) or lib.count(200, 20)
local NKEYS = 1000
local ZKEYS, ZOPS = lib.count(100000, 5000), lib.count(200000, 5000)

local port, stop_server, origin = S.redis()
io.write(format("redis-server: %s, port %d\n", origin, port))

local REDIS = { port = port, socket_timeout = 1, connect_timeout = 1 }
local function tiered(l1_args, prefix)
    return cache.make_region():configure("dogpile.cache.tiered", {
        expiration_time = 3600,
        arguments = { prefix = prefix or "bench-tiered:", tiers = {
            { backend = "dogpile.cache.memory", arguments = l1_args },
            { backend = "dogpile.cache.redis", arguments = REDIS },
        } },
    })
end

-- -- 1. L1 hit vs a plain memory region hit ----------------------------------------

local vmdef = require "jit.vmdef"
local jutil = require "jit.util"
local aborts = {}
-- IR instructions per iteration of each hit loop: the body after LOOP of the
-- trace that closes the loop (what runs per hit, without the entry checks).
local ir = {}
local shr = require("bit").rshift
local function loop_body(tr, nins)
    for ins = 1, nins do
        local _, ot = jutil.traceir(tr, ins)
        if not ot then
            break
        end
        local oidx = 6 * shr(ot, 8)
        if vmdef.irnames:sub(oidx + 1, oidx + 4) == "LOOP" then
            return nins - ins
        end
    end
    return nil
end
local phase -- which loop is warming up, for the abort messages
local function on_trace(what, tr, func, pc, otr, oex)
    if what == "stop" then
        local info = jutil.traceinfo(tr)
        if info and phase and info.linktype == "loop" then
            ir[phase] = loop_body(tr, info.nins) or ir[phase]
        end
    elseif what == "abort" then
        local msg = vmdef.traceerr[otr] or tostring(otr)
        if type(oex) ~= "nil" then
            msg = pcall(string.format, msg, oex) and string.format(msg, oex) or msg
        end
        local info = require("jit.util").funcinfo(func, pc)
        aborts[#aborts + 1] = format("trace %d: %s at %s (%s)", tr, msg, tostring(info.loc), tostring(phase))
    end
end

local keys = {}
for i = 1, NKEYS do
    keys[i] = "key" .. i
end

-- One loop per region, so that each compiles to its own trace.
local function make_loop()
    return loadstring([[
        local r, keys, nkeys = ...
        return function(n)
            local sum, j = 0, 1
            for _ = 1, n do
                sum = sum + r:get(keys[j])
                j = j + 1
                if j > nkeys then j = 1 end
            end
            return sum
        end
    ]])
end

local mem = cache.make_region():configure("dogpile.cache.memory", { expiration_time = 3600 })
local tr = tiered(nil, "bench-tiered-hit:")
for i = 1, NKEYS do
    mem:set(keys[i], i)
    tr:set(keys[i], i)
end
-- Only the hit loops' traces are watched, while they warm up and compile
-- (the stores above, and the timing harness, are no concern of the hit).
jit.flush()
-- Each loop is warmed with every hot counter reset (as spec/jit_spec.lua
-- does): a counter left near zero by the stores above can root a trace at
-- the entry of a function the loop calls, which then unrolls the loop and
-- aborts -- the harness's artefact, not the hit's. Counters are shared by
-- PCs that hash alike, so where the loop's code lands decides whether the
-- loop or a function it calls gets hot first: a warm-up with aborts is
-- retried (up to 3 times) on a new copy of the loop, at another address.
-- Aborts that come from the hit itself come back every time.
local retried = {}
local function warm(name, r)
    local loop
    for attempt = 1, 3 do
        loop = make_loop()(r, keys, NKEYS)
        local before = #aborts
        jit.opt.start("hotloop=56")
        phase = name
        jit.attach(on_trace, "trace")
        -- (No enclosing loop here: a trace started in it would record the
        -- hit loop inside it and abort on the unroll limit.)
        loop(1e5)
        loop(lib.count(1e6, 1e5))
        jit.attach(on_trace)
        if #aborts == before or attempt == 3 then
            return loop
        end
        for i = before + 1, #aborts do
            retried[#retried + 1] = aborts[i]
            aborts[i] = nil
        end
    end
end
local mem_loop = warm("mem", mem)
local tr_loop = warm("tiered", tr)
phase = nil
-- The two loops take turns in short runs (CHUNK hits, a few ms: less than
-- a scheduler's time slice, so that a pair mostly runs undisturbed), the
-- first of each pair alternating; the ratio is the median of the pairs'
-- ratios. The ratio of the two loops' fastest runs is printed beside it (on
-- a loaded machine the fastest run is the least disturbed one).
local CHUNK = HITS / 20
local PAIRS = lib.quick and 20 or 300
local mem_t, tr_t, ratios = {}, {}, {}
local function timed(loop)
    local t0 = lib.clock()
    loop(CHUNK)
    return (lib.clock() - t0) * 1e9 / CHUNK
end
for i = 1, PAIRS do
    local m, t
    if i % 2 == 1 then
        m = timed(mem_loop)
        t = timed(tr_loop)
    else
        t = timed(tr_loop)
        m = timed(mem_loop)
    end
    mem_t[i], tr_t[i], ratios[i] = m, t, t / m
end
local mem_ns, tr_ns = lib.median(mem_t), lib.median(tr_t)
local ratio = lib.median(ratios)
local mem_min, tr_min = math.min(unpack(mem_t)), math.min(unpack(tr_t))
local front_hits = tr:stats().front_hits
io.write(format("L1 hit: tiered %.1f ns, memory region %.1f ns (median ratio of %d pairs "
                .. "%.2fx; fastest runs %.1f ns / %.1f ns = %.2fx); front hits %s; trace aborts: %d\n",
                tr_ns, mem_ns, PAIRS, ratio, tr_min, mem_min, tr_min / mem_min,
                tostring(front_hits), #aborts))
io.write(format("L1 hit loop body: %s IR instructions (tiered) vs %s (memory region)\n",
                tostring(ir.tiered), tostring(ir.mem)))
for _, a in ipairs(aborts) do
    io.write("  ", a, "\n")
end
for _, a in ipairs(retried) do
    io.write("  (a warm-up retried on another copy of the loop) ", a, "\n")
end
lib.row("tiered_l1_hit", "tiered (memory -> redis) L1 get hit vs memory region get hit",
        mem_ns * ratio, "ns/op", "memory region", mem_ns, "<=1.2")
lib.row("tiered_l1_aborts", "trace aborts in the hit loops", #aborts, "n", "-", nil, "abs<=0")
lib.row("tiered_l1_ir", "IR instructions per tiered L1 hit (loop body) vs per memory region hit",
        ir.tiered or 0 / 0, "n", "memory region", ir.mem or 0 / 0, "")

-- -- Plots (CSV + PNG in $BENCH_OUT/curves) ----------------------------------------

local bench_dir = here
local OUT = (os.getenv("BENCH_OUT") or (bench_dir .. "/results")) .. "/curves"
os.execute("mkdir -p '" .. OUT .. "'")

local function write_plot(name, header, rows)
    local csv, png = OUT .. "/" .. name .. ".csv", OUT .. "/" .. name .. ".png"
    local f = assert(io.open(csv, "w"))
    f:write(table.concat(header, ","), "\n")
    for _, r in ipairs(rows) do
        f:write(table.concat(r, ","), "\n")
    end
    f:close()
    local cmd = format("gnuplot -e \"name='%s'; csv='%s'; png='%s'; quick=%d\" '%s/tiered.gp' 2>&1",
                       name, csv, png, lib.quick and 1 or 0, bench_dir)
    local p = io.popen(cmd)
    local err = p:read("*a")
    local ok = p:close()
    if ok and err == "" then
        io.write("  -> ", csv, ", ", png, "\n")
    else
        io.write("  -> ", csv, " (no PNG: ", err, ")\n")
    end
end

-- -- 2. Coherence delay ------------------------------------------------------------

local reader = os.tmpname()
do
    local f = assert(io.open(reader, "w"))
    f:write([[
local cache = require "dogpile.cache"
pcall(cache.register_backend, "dogpile.cache.tiered", "dogpile.cache.backends.tiered")
local dogpile = require "dogpile"
local port, key, n, deadline = tonumber(arg[1]), arg[2], tonumber(arg[3]), tonumber(arg[4])
local r = cache.make_region():configure("dogpile.cache.tiered", { expiration_time = 3600,
    arguments = { prefix = "bench-tiered:", tiers = { { backend = "dogpile.cache.memory" },
    { backend = "dogpile.cache.redis", arguments = { port = port, socket_timeout = 1,
      connect_timeout = 1 } } } } })
io.write("ready\n") io.flush()
local last = -1
local now = dogpile.now
while last < n and now() < deadline do
    local v = r:get(key)
    if v ~= cache.NO_VALUE and v ~= last then
        last = v
        io.write(v, " ", string.format("%.6f", now()), "\n")
        io.flush()
    end
end
]])
    f:close()
end

local key = "coherence:" .. os.time()
local w = tiered(nil)
w:set(key, 0)
local deadline = lib.wall() + 30 + SETS * 0.05
local p = assert(io.popen(format("luajit %s %d '%s' %d %.3f", reader, port, key, SETS, deadline)))
assert(p:read("*l") == "ready", "the reader did not start")
local set_at = {}
local ffi = require "ffi"
pcall(ffi.cdef, "int usleep(unsigned int usec);")
for i = 1, SETS do
    ffi.C.usleep(20000)
    set_at[i] = lib.wall()
    w:set(key, i)
end
-- A reader that sees set v has dropped the copies of every set before it:
-- a set it never saw (the next one came first) counts as seen then, which
-- only makes its delay longer.
local delays, upto = {}, 0
for line in p:lines() do
    local v, t = line:match("^(%d+) ([%d.]+)$")
    v = tonumber(v)
    if v and v > upto and set_at[v] then
        for i = upto + 1, v do
            delays[#delays + 1] = (tonumber(t) - set_at[i]) * 1e3
        end
        upto = v
    end
end
p:close()
os.remove(reader)
table.sort(delays)
local function pct(q)
    return delays[math.max(1, math.ceil(q * #delays))] or 0 / 0
end
io.write(format("coherence delay over %d sets (%d seen): p50 %.3f ms, p99 %.3f ms, max %.3f ms\n",
                SETS, #delays, pct(0.5), pct(0.99), delays[#delays] or 0 / 0))
do
    -- The cumulative distribution: one point per set seen.
    local rows = {}
    for i, d in ipairs(delays) do
        rows[i] = { format("%.4f", d), format("%.5f", i / #delays) }
    end
    write_plot("tiered_coherence", { "delay_ms", "fraction of sets seen" }, rows)
end
lib.row("tiered_coherence_p50", "tiered coherence delay p50 (set in one process -> seen in another)",
        pct(0.5), "ms", "-", nil, "")
lib.row("tiered_coherence_p99", "tiered coherence delay p99", pct(0.99), "ms", "-", nil, "abs<=100")
lib.row("tiered_coherence_seen", "sets seen by the other process", #delays, "n", "-", nil,
        "abs>=" .. SETS)

-- -- 3. Zipf: memory -> redis vs redis alone -------------------------------------------

-- Zipf(1.0) over ZKEYS keys by inverse CDF on a precomputed table.
local cdf = {}
do
    local h = 0
    for i = 1, ZKEYS do
        h = h + 1 / i
        cdf[i] = h
    end
    for i = 1, ZKEYS do
        cdf[i] = cdf[i] / h
    end
end
local function zipf()
    local u = math.random()
    local lo, hi = 1, ZKEYS
    while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        if cdf[mid] < u then
            lo = mid + 1
        else
            hi = mid
        end
    end
    return lo
end

local function zipf_run(r, seed, n)
    n = n or ZOPS
    math.randomseed(seed)
    local creations = 0
    local function creator()
        creations = creations + 1
        return "v"
    end
    local t0 = lib.clock()
    for _ = 1, n do
        r:get_or_create("z" .. zipf(), creator)
    end
    return (lib.clock() - t0) * 1e9 / n, creations
end

-- The measured pass: the same ZOPS keys (seed 2) for both regions, read in
-- chunks that alternate between them, so that the machine's load weighs on
-- both alike; ns per call is the median over the chunks.
local ZSEQ = {}
math.randomseed(2)
for i = 1, ZOPS do
    ZSEQ[i] = "z" .. zipf()
end
local ZCHUNK = lib.quick and 500 or 2000
local function zipf_paired(a, b)
    local ta, tb, ca, cb = {}, {}, 0, 0
    local function creator_a() ca = ca + 1 return "v" end
    local function creator_b() cb = cb + 1 return "v" end
    for from = 1, ZOPS, ZCHUNK do
        local to = math.min(ZOPS, from + ZCHUNK - 1)
        local t0 = lib.clock()
        for i = from, to do
            a:get_or_create(ZSEQ[i], creator_a)
        end
        local t1 = lib.clock()
        for i = from, to do
            b:get_or_create(ZSEQ[i], creator_b)
        end
        local t2 = lib.clock()
        ta[#ta + 1] = (t1 - t0) * 1e9 / (to - from + 1)
        tb[#tb + 1] = (t2 - t1) * 1e9 / (to - from + 1)
    end
    return lib.median(ta), lib.median(tb), ca, cb
end

local prefix = "zipf:" .. os.time() .. ":"
local function mangle(k) return prefix .. k end
local alone = cache.make_region():configure("dogpile.cache.redis", {
    expiration_time = 3600, arguments = REDIS })
alone.key_mangler = mangle
-- Every key stored first (in batches), so that the measured passes are all
-- hits: from the memory tier where its LRU kept the key, else from redis.
-- The tiered regions read the same keys (their bottom holds the envelope
-- any redis region reads).
for i = 1, ZKEYS, 1000 do
    local batch = {}
    for j = i, math.min(ZKEYS, i + 999) do
        batch["z" .. j] = "v"
    end
    alone:set_multi(batch)
end
-- memory -> redis with a memory tier of 0.1% to 30% of the keys, each
-- against redis alone in the same pass; the 10% point is the table's.
local points, head = {}, nil
for _, pct in ipairs({ 0.1, 1, 10, 30 }) do
    local limit = math.max(1, math.floor(ZKEYS * pct / 100))
    local layered = tiered({ max_items = limit }, "bench-tiered-zipf:")
    layered.key_mangler = mangle
    zipf_run(layered, 1, ZOPS / 2) -- the memory tier settles on the popular keys
    local th = layered.actual_backend:tier_hits(layered:stats().front_hits or 0)
    local ns, alone_ns, created, alone_created = zipf_paired(layered, alone)
    local th2 = layered.actual_backend:tier_hits(layered:stats().front_hits or 0)
    local p = { pct = pct, limit = limit, ns = ns, created = created, alone_ns = alone_ns,
                l1_rate = (th2[1] - th[1]) / ZOPS, l2 = th2[2] - th[2] }
    points[#points + 1] = p
    if pct == 10 then
        head = p
    end
    io.write(format("zipf(1.0), %d keys, %d gets, memory tier %d items (%g%%): memory -> redis "
                    .. "%.0f ns/op (memory tier hit rate %.1f%%, redis %d, created %d); redis "
                    .. "alone %.0f ns/op (created %d)\n", ZKEYS, ZOPS, limit, pct, ns,
                    100 * p.l1_rate, p.l2, created, alone_ns, alone_created))
    layered.actual_backend:close()
    layered = nil
    -- The next point's passes should not pay for collecting this one's tier.
    collectgarbage()
    collectgarbage()
end
do
    local rows = {}
    for i, p in ipairs(points) do
        rows[i] = { format("%g", p.pct), tostring(p.limit), format("%.2f", p.ns / 1e3),
                    format("%.2f", p.alone_ns / 1e3), format("%.1f", 100 * p.l1_rate) }
    end
    write_plot("tiered_zipf", { "memory tier (% of keys)", "items", "memory -> redis (us/call)",
                                "redis alone (us/call)", "memory tier hit rate (%)" }, rows)
end
lib.row("tiered_zipf_latency", "zipf get_or_create hits: memory -> redis (10% of keys in memory) "
        .. "vs redis alone", head.ns, "ns/op", "redis alone", head.alone_ns, "")
lib.row("tiered_zipf_l1_rate", "zipf: memory tier hit rate (10% of keys held)", 100 * head.l1_rate,
        "%", "-", nil, "")

stop_server()
