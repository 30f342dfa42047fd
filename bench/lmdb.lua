--- dogpile.cache.lmdb get hits against the C LMDB floor and python3-lmdb, in
-- one run (median ns per get), and the hit throughput of 1 and 2 processes.
--
--   luajit bench/lmdb.lua [gets = 1e6] [reps = 7] [rounds = 3]   (~30 s; BENCH_QUICK=1: ~3 s)
--
-- LUA_PATH and LUA_CPATH must reach the modules (bench/run sets them; or
-- `. .ci/lib.sh && use_stage main`). The environment lives in a temporary
-- folder (map_size 64m, sync "none"), removed at the end. NKEYS keys hold a
-- 16-byte string each; every get is a hit, the keys in turn. Paths:
--   region:get        the whole hit: FFI get, envelope, codec decode
--   backend:get       the C backend's bytes, no envelope or decoding
--   floor_lmdb        bench/floor_lmdb.c: mdb_txn_renew + mdb_get +
--                     mdb_txn_reset per get, on the same kind of environment
--                     (flags, unnamed database, 'v'-prefixed keys, 16-byte
--                     header) with values of our envelope's size
--   python3-lmdb      one read transaction per get (bench/servers_anchors.py)
--   2 processes       region:get and backend:get from two processes started
--                     together on one environment (million gets/s, summed),
--                     next to one process measured the same way
-- Ours and the floor take turns `rounds` times (each a median of `reps` runs
-- after a warm-up); each figure is the median over the turns. Prints ROW
-- lines (bench/lib.lua) for bench/run's table.
local ffi = require "ffi"
local here = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$") or "."
local lib = dofile(here .. "/lib.lua")

local NKEYS = 1000
local VALUE = string.rep("x", 16)

local function keys()
    local ks = {}
    for i = 1, NKEYS do
        ks[i] = "bench:key:" .. i
    end
    return ks
end

local function open(path)
    local cache = require "dogpile.cache"
    return cache.make_region():configure("dogpile.cache.lmdb", {
        arguments = { path = path, map_size = "64m", sync = "none" },
    })
end

-- -- A measuring process (2-process figures) ------------------------------------------

pcall(ffi.cdef, "int usleep(unsigned int usec);")

local function worker(layer, path, n, start)
    local r = open(path)
    local b = r.actual_backend
    local ks = keys()
    local function loop(count)
        local total = 0
        if layer == "region" then
            local reg = r
            for i = 1, count do
                total = total + #reg:get(ks[i % NKEYS + 1])
            end
        else
            local be = b
            for i = 1, count do
                total = total + #be:get(ks[i % NKEYS + 1])
            end
        end
        return total
    end
    loop(math.min(n, 2e5))
    while lib.wall() < start do
        ffi.C.usleep(1000)
    end
    local t0 = lib.clock()
    local total = loop(n)
    local dt = lib.clock() - t0
    assert(total >= n * #VALUE, "a get missed")
    io.write(string.format("%.0f\n", n / dt))
end

if arg and arg[1] == "worker" then
    worker(arg[2], arg[3], tonumber(arg[4]), tonumber(arg[5]))
    os.exit(0)
end

-- -- The driver ------------------------------------------------------------------------

local S = dofile(here .. "/servers_lib.lua")
local N = tonumber(arg and arg[1]) or lib.count(1e6, 1e5)
local REPS = tonumber(arg and arg[2]) or (lib.quick and 3 or 7)
local ROUNDS = tonumber(arg and arg[3]) or (lib.quick and 1 or 3)
local NPROC = lib.quick and 1e5 or 2e6

local dir = (S.sh("mktemp -d /tmp/dogpile-bench-lmdb-XXXXXX")):gsub("%s+$", "")
local script = debug.getinfo(1, "S").source:sub(2)

local function show(name, ns, unit)
    print(("%-34s %12.1f %s"):format(name, ns, unit or "ns/get"))
end

-- Throughput of `nprocs` processes started together (gets/s, summed).
local function run_procs(layer, nprocs)
    local start = lib.wall() + (lib.quick and 0.3 or 1.0)
    local cmd = {}
    for i = 1, nprocs do
        cmd[i] = ("luajit %s worker %s %s %d %.3f > %s/out%d &"):format(
            script, layer, dir .. "/lmdb", NPROC, start, dir, i)
    end
    S.sh(table.concat(cmd, " ") .. " wait")
    local sum = 0
    for i = 1, nprocs do
        local f = assert(io.open(dir .. "/out" .. i))
        local s = f:read("*a")
        f:close()
        local v = tonumber(s:match("^%d+"))
        if not v then
            error("a worker failed: " .. s)
        end
        sum = sum + v
    end
    return sum
end

local function bench()
    local r = open(dir .. "/lmdb")
    local ks = keys()
    for i = 1, NKEYS do
        r:set(ks[i], VALUE)
    end
    local b = r.actual_backend
    local envelope = #b:get(ks[1])
    print(("%d keys, %d-byte values (%d-byte envelopes); ours and the floor take turns %d times,"
           .. " each a median of %d runs of %d gets%s; %d CPUs")
          :format(NKEYS, #VALUE, envelope, ROUNDS, REPS, N,
                  lib.quick and " (quick mode: rough)" or "", tonumber((S.sh("nproc"))) or 0))

    local function region_get(n)
        local reg, k, nk, total = r, ks, NKEYS, 0
        for i = 1, n do
            total = total + #reg:get(k[i % nk + 1])
        end
        assert(total == n * #VALUE, "region:get: not a hit")
    end
    local function backend_get(n)
        local be, k, nk, total = b, ks, NKEYS, 0
        for i = 1, n do
            total = total + #be:get(k[i % nk + 1])
        end
        assert(total == n * envelope, "backend:get: not a hit")
    end

    -- Ours and the C floor take turns ROUNDS times; each figure is the median
    -- over the turns (the load of a shared machine drifts).
    local floors = S.floors()
    local runs = { get = {}, bget = {}, floor = {} }
    for round = 1, ROUNDS do
        runs.get[round] = lib.ns_per_op(region_get, N, REPS)
        runs.bget[round] = lib.ns_per_op(backend_get, N, REPS)
        local floor, why = S.figures(("%s/floor_lmdb %d %d %d %d"):format(floors, N, envelope,
                                                                          NKEYS, REPS))
        if not (floor and floor.get_ns) then
            error("floor_lmdb failed: " .. tostring(why))
        end
        runs.floor[round] = floor.get_ns
    end
    local function spread(xs)
        local lo, hi = math.huge, 0
        for _, x in ipairs(xs) do
            lo, hi = math.min(lo, x), math.max(hi, x)
        end
        return ("  (rounds: %.1f-%.1f)"):format(lo, hi)
    end
    local get_ns, bget_ns = lib.median(runs.get), lib.median(runs.bget)
    local floor = { get_ns = lib.median(runs.floor) }
    show("region:get hit", get_ns, "ns/get" .. spread(runs.get))
    show("backend:get (bytes)", bget_ns, "ns/get" .. spread(runs.bget))
    show("floor_lmdb (C, one read txn/get)", floor.get_ns, "ns/get" .. spread(runs.floor))

    local py, pwhy = S.python(("lmdb %d %d %d %d"):format(math.max(1000, math.floor(N / 5)),
                                                         NKEYS, envelope, lib.quick and 3 or 5))
    py = py or {}
    if py.get then
        show("python3-lmdb get (one txn/get)", py.get)
    else
        io.stderr:write("python3-lmdb anchor failed: ", tostring(pwhy), "\n")
    end

    lib.row("lmdb_get", "lmdb region:get hit, 16 B", get_ns, "ns/op",
            "C LMDB get, one read txn per op (floor_lmdb)", floor.get_ns, "<=1.5")
    lib.row("lmdb_backend_get", "lmdb backend:get raw bytes", bget_ns, "ns/op",
            "C LMDB get, one read txn per op (floor_lmdb)", floor.get_ns, "")
    lib.row("lmdb_get_vs_py", "lmdb region:get hit, 16 B", get_ns, "ns/op",
            "python3-lmdb get, one txn per op", py.get, "")

    -- 1 and 2 processes, each started fresh (quick mode: region only).
    print(("%s gets per process; million gets/s (sum over processes)"):format(NPROC))
    print(("%-34s %12s %12s %8s"):format("path", "1 process", "2 processes", "scaling"))
    for _, layer in ipairs(lib.quick and { "region" } or { "region", "backend" }) do
        local one = run_procs(layer, 1)
        local two = run_procs(layer, 2)
        print(("%-34s %12.2f %12.2f %7.2fx"):format(layer .. ":get lmdb", one / 1e6, two / 1e6,
                                                    two / one))
        lib.row("lmdb_" .. layer .. "_get_2proc", "lmdb " .. layer .. ":get hits, 2 processes",
                two / 1e6, "M/s", "1 process", one / 1e6, "")
    end
end

local ok, err = xpcall(bench, debug.traceback)
S.sh("rm -rf '" .. dir .. "'")
if not ok then
    error(err, 0)
end
