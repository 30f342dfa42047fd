--- dogpile.cache.redis against its floors: the hiredis C loop, Python's
-- dogpile.cache and redis-benchmark, in one run, median ns per call.
--
--   luajit bench/redis.lua [gets = 10000] [reps = 5] [rounds = 4]  (~40 s; BENCH_QUICK=1: ~2 s)
--
-- LUA_PATH and LUA_CPATH must reach the modules (bench/run sets them; or
-- `. .ci/lib.sh && use_stage main`). The server is REDIS_PORT's when set
-- (bench/run starts it pinned to CPU 0), else a redis-server of our own on a
-- free loopback port, pinned with `taskset -c 0` and stopped at the end. This
-- process pins itself to CPU 0 too (sched_setaffinity through the FFI), and
-- the floor, Python and redis-benchmark it starts inherit that: client and
-- server share one CPU, as in issue 8's anchor table.
--
-- It stores NKEYS keys with 100-byte string values through a region, then,
-- one connection, no pipelining, the keys in turn, every read a hit:
--   region:get            the whole hit: GET round trip, envelope, decode
--   backend:get           the C backend's bytes, no envelope or decoding
--   region:get_multi(100) one MGET of 100 keys, decoded (ns per call)
--   floor_hiredis         bench/floor_hiredis.c: redisCommand GET / MGET of
--                         100 in a plain C loop, values of our envelope's size
--   Python dogpile.cache  dogpile.cache.redis region.get (python3-redis)
--   redis-benchmark -c 1  GET / MGET of 100 keys
-- Ours and the floor take turns `rounds` times (each a median of `reps` runs
-- after a warm-up); each figure is the median over the turns. Next to wall
-- time it shows CPU time per call, client and server together (the client's
-- CLOCK_PROCESS_CPUTIME_ID plus the server's INFO cpu), which other load on
-- CPU 0 hardly changes: on a busy machine compare those (reference rows
-- redis_*_cpu). Prints ROW lines (bench/lib.lua) for bench/run's table.
local here = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$") or "."
local lib = dofile(here .. "/lib.lua")
local S = dofile(here .. "/servers_lib.lua")
local ffi = require "ffi"
local cache = require "dogpile.cache"

local N = tonumber(arg and arg[1]) or lib.count(10000, 500)
local REPS = tonumber(arg and arg[2]) or (lib.quick and 3 or 5)
local ROUNDS = tonumber(arg and arg[3]) or (lib.quick and 1 or 4)
local NKEYS = 1000
local VALUE = string.rep("x", 100)

local pinned = S.pin(0)
local port, stop, origin = S.redis()
print(("redis on 127.0.0.1:%d (%s); client %s"):format(port, origin,
      pinned and "pinned to CPU 0: client and server pinned to CPU 0" or "NOT pinned (sched_setaffinity failed)"))
print(("%d keys, %d-byte values; ours and the floor take turns %d times, each a median of %d"
       .. " runs of %d calls (MGET: %d); figures: median over the turns%s"):format(
      NKEYS, #VALUE, ROUNDS, REPS, N, math.max(1, math.floor(N / 10)),
      lib.quick and " (quick mode: rough)" or ""))

local function bench()
    local r = cache.make_region():configure("dogpile.cache.redis", { arguments = { port = port } })
    local keys = {}
    for i = 1, NKEYS do
        keys[i] = "bench:redis:" .. i
        r:set(keys[i], VALUE)
    end
    local b = r.actual_backend
    local envelope = #b:get(keys[1])

    local function show(name, ns)
        print(("%-34s %12.0f"):format(name, ns))
    end

    local batches = {}
    for j = 0, NKEYS / 100 - 1 do
        local batch = {}
        for i = 1, 100 do
            batch[i] = keys[j * 100 + i]
        end
        batches[j + 1] = batch
    end
    local NM = math.max(1, math.floor(N / 10))

    local function region_get(n)
        local reg, ks, nk, v = r, keys, NKEYS, nil
        for i = 1, n do
            v = reg:get(ks[i % nk + 1])
        end
        assert(v == VALUE, "region:get: not a hit")
    end
    local function backend_get(n)
        local be, ks, nk, total = b, keys, NKEYS, 0
        for i = 1, n do
            total = total + #be:get(ks[i % nk + 1])
        end
        assert(total == n * envelope, "backend:get: not a hit")
    end
    local function region_get_multi(n)
        local reg, bs, nb, vs = r, batches, #batches, nil
        for i = 1, n do
            vs = reg:get_multi(bs[i % nb + 1])
        end
        assert(vs[100] == VALUE, "region:get_multi: not all hits")
    end

    -- Ours and the C floor take turns, ROUNDS times, and each figure is the
    -- median over the rounds: the load of a shared machine drifts over
    -- seconds, and a ratio of figures taken a minute apart would measure it.
    -- CPU time of client and server together, over the warm-up and the runs
    -- (the floor measures the same way): what a call costs the machine,
    -- which the load of other processes on CPU 0 barely changes.
    local ts = ffi.new("dp_bench_timespec")
    local function cpu_ns()
        ffi.C.clock_gettime(2, ts) -- CLOCK_PROCESS_CPUTIME_ID
        local info = S.sh("redis-cli -p " .. port .. " info cpu")
        local server = (tonumber(info:match("used_cpu_sys:([%d.]+)")) or 0)
            + (tonumber(info:match("used_cpu_user:([%d.]+)")) or 0)
        return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec) + server * 1e9
    end
    local function measure(fn, n)
        local c0 = cpu_ns()
        local wall = lib.ns_per_op(fn, n, REPS)
        return wall, (cpu_ns() - c0) / (n * (REPS + 1))
    end

    local floors = S.floors()
    local names = { "get", "bget", "multi", "fget", "fmget" }
    local runs, cpus = {}, {}
    for _, k in ipairs(names) do
        runs[k], cpus[k] = {}, {}
    end
    for round = 1, ROUNDS do
        runs.get[round], cpus.get[round] = measure(region_get, N)
        runs.bget[round], cpus.bget[round] = measure(backend_get, N)
        runs.multi[round], cpus.multi[round] = measure(region_get_multi, NM)
        local floor, why = S.figures(("%s/floor_hiredis %d %d %d %d %d 100"):format(
            floors, port, N, envelope, NKEYS, REPS))
        if not (floor and floor.get_ns and floor.mget_ns) then
            error("floor_hiredis failed: " .. tostring(why))
        end
        runs.fget[round], runs.fmget[round] = floor.get_ns, floor.mget_ns
        cpus.fget[round], cpus.fmget[round] = floor.get_cpu_ns, floor.mget_cpu_ns
    end
    local med, cpu = {}, {}
    for _, k in ipairs(names) do
        med[k], cpu[k] = lib.median(runs[k]), lib.median(cpus[k])
    end
    local get_ns, bget_ns, multi_ns = med.get, med.bget, med.multi
    local floor = { get_ns = med.fget, mget_ns = med.fmget }
    local function spread(xs)
        local lo, hi = math.huge, 0
        for _, x in ipairs(xs) do
            lo, hi = math.min(lo, x), math.max(hi, x)
        end
        return ("(%.0f-%.0f)"):format(lo, hi)
    end
    print(("%-34s %12s %12s  %s"):format("path", "wall ns/call", "CPU ns/call", "(wall: range over the turns)"))
    local function line(name, k)
        print(("%-34s %12.0f %12.0f  %s"):format(name, med[k], cpu[k], spread(runs[k])))
    end
    line("region:get hit", "get")
    line("backend:get (bytes)", "bget")
    line("region:get_multi(100)", "multi")
    line("floor_hiredis GET", "fget")
    line("floor_hiredis MGET(100)", "fmget")

    -- Python dogpile.cache on redis-py (slow: fewer calls, same median).
    local py, pwhy = S.python(("redis %d %d %d %d %d"):format(port, math.max(100, math.floor(N / 4)),
                                                             NKEYS, #VALUE, lib.quick and 3 or 5))
    py = py or {}
    if py.dogpile_get then
        show("Python dogpile.cache redis get", py.dogpile_get)
        show("Python redis-py get", py.redis_py_get)
    else
        io.stderr:write("Python anchor failed: ", tostring(pwhy), "\n")
    end

    -- redis-benchmark -c 1, one connection like ours.
    local function rb(n, args)
        local out = S.sh(("redis-benchmark -p %d -c 1 -n %d -q %s"):format(port, n, args))
        local rps = tonumber(out:match("([%d.]+) requests per second"))
        return rps and 1e9 / rps
    end
    local rb_get = rb(N, "GET " .. keys[1])
    local rb_mget = rb(NM, "MGET " .. table.concat(batches[1], " "))
    if rb_get then show("redis-benchmark -c 1 GET", rb_get) end
    if rb_mget then show("redis-benchmark -c 1 MGET(100)", rb_mget) end

    local pin = " (client+server on CPU 0)"
    lib.row("redis_get", "redis region:get hit, 100 B" .. pin, get_ns, "ns/op",
            "hiredis C GET (floor_hiredis)", floor.get_ns, "<=1.2")
    lib.row("redis_get_multi100", "redis region:get_multi(100)" .. pin, multi_ns, "ns/call",
            "hiredis C MGET of 100 (floor_hiredis)", floor.mget_ns, "<=1.3")
    lib.row("redis_backend_get", "redis backend:get raw bytes" .. pin, bget_ns, "ns/op",
            "hiredis C GET (floor_hiredis)", floor.get_ns, "")
    lib.row("redis_get_cpu", "redis region:get hit, CPU time client+server", cpu.get, "ns/op",
            "hiredis C GET (floor_hiredis), CPU time", cpu.fget, "")
    lib.row("redis_get_multi100_cpu", "redis region:get_multi(100), CPU time client+server",
            cpu.multi, "ns/call", "hiredis C MGET of 100, CPU time", cpu.fmget, "")
    lib.row("redis_get_vs_py", "redis region:get hit" .. pin, get_ns, "ns/op",
            "Python dogpile.cache redis get", py.dogpile_get, "")
    lib.row("redis_get_vs_rb", "redis region:get hit" .. pin, get_ns, "ns/op",
            "redis-benchmark -c 1 GET", rb_get, "")
    lib.row("redis_get_multi100_vs_rb", "redis region:get_multi(100)" .. pin, multi_ns, "ns/call",
            "redis-benchmark -c 1 MGET of 100", rb_mget, "")

    for i = 1, NKEYS do
        r:delete(keys[i])
    end
end

local ok, err = xpcall(bench, debug.traceback)
stop()
if not ok then
    error(err, 0)
end
