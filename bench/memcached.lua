--- dogpile.cache.memcached against python3-pymemcache on the same server, in
-- one run, median ns per call.
--
--   luajit bench/memcached.lua [gets = 20000] [reps = 7]   (~35 s; BENCH_QUICK=1: ~2 s)
--
-- LUA_PATH and LUA_CPATH must reach the modules (bench/run sets them; or
-- `. .ci/lib.sh && use_stage main`). The server is MEMCACHED_PORT's when set
-- (bench/run starts it pinned to CPU 0), else a memcached of our own on a
-- free loopback port, pinned with `taskset -c 0` and stopped at the end. This
-- process pins itself to CPU 0 (sched_setaffinity through the FFI) and the
-- Python anchor inherits it: client and server share one CPU.
--
-- It stores NKEYS keys with 100-byte string values through a region, then,
-- one client, the keys in turn, every read a hit:
--   region:get              the whole hit: FFI get, envelope, codec decode
--   backend:get             the C backend's bytes, no envelope or decoding
--   region:get_multi(100)   100 keys per call, one multi-get (ns per call)
--   pymemcache get / get_many(100)   the anchor (pymemcache Client, bytes in,
--                           bytes out, values of our envelope's size)
-- Issue 8 sets no memcached target: the rows are for reference.
-- Prints ROW lines (bench/lib.lua) for bench/run's table.
local here = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$") or "."
local lib = dofile(here .. "/lib.lua")
local S = dofile(here .. "/servers_lib.lua")
local cache = require "dogpile.cache"

local N = tonumber(arg and arg[1]) or lib.count(20000, 500)
local REPS = tonumber(arg and arg[2]) or (lib.quick and 3 or 7)
local NKEYS = 1000
local VALUE = string.rep("x", 100)

local pinned = S.pin(0)
local port, stop, origin = S.memcached()
print(("memcached on 127.0.0.1:%d (%s); client %s"):format(port, origin,
      pinned and "pinned to CPU 0: client and server pinned to CPU 0" or "NOT pinned (sched_setaffinity failed)"))
print(("%d keys, %d-byte values, median of %d runs of %d calls%s"):format(
      NKEYS, #VALUE, REPS, N, lib.quick and " (quick mode: rough)" or ""))

local function bench()
    local r = cache.make_region():configure("dogpile.cache.memcached", {
        arguments = { url = "127.0.0.1:" .. port },
    })
    local keys = {}
    for i = 1, NKEYS do
        keys[i] = "bench:memcached:" .. i
        r:set(keys[i], VALUE)
    end
    local b = r.actual_backend
    local envelope = #b:get(keys[1])

    local function show(name, ns)
        print(("%-34s %12.0f ns/call"):format(name, ns))
    end

    local get_ns = lib.ns_per_op(function(n)
        local reg, ks, nk, v = r, keys, NKEYS, nil
        for i = 1, n do
            v = reg:get(ks[i % nk + 1])
        end
        assert(v == VALUE, "region:get: not a hit")
    end, N, REPS)
    show("region:get hit", get_ns)

    local bget_ns = lib.ns_per_op(function(n)
        local be, ks, nk, total = b, keys, NKEYS, 0
        for i = 1, n do
            total = total + #be:get(ks[i % nk + 1])
        end
        assert(total == n * envelope, "backend:get: not a hit")
    end, N, REPS)
    show("backend:get (bytes)", bget_ns)

    local batches = {}
    for j = 0, NKEYS / 100 - 1 do
        local batch = {}
        for i = 1, 100 do
            batch[i] = keys[j * 100 + i]
        end
        batches[j + 1] = batch
    end
    local NM = math.max(1, math.floor(N / 20))
    local multi_ns = lib.ns_per_op(function(n)
        local reg, bs, nb, vs = r, batches, #batches, nil
        for i = 1, n do
            vs = reg:get_multi(bs[i % nb + 1])
        end
        assert(vs[100] == VALUE, "region:get_multi: not all hits")
    end, NM, REPS)
    show("region:get_multi(100)", multi_ns)

    local py, why = S.python(("memcached %d %d %d %d %d"):format(port, N, NKEYS, envelope,
                                                                lib.quick and 3 or 5))
    py = py or {}
    if py.get then
        show("pymemcache get", py.get)
        show("pymemcache get_many(100)", py.get_many100)
    else
        io.stderr:write("pymemcache anchor failed: ", tostring(why), "\n")
    end

    local pin = " (client+server on CPU 0)"
    lib.row("memcached_get", "memcached region:get hit, 100 B" .. pin, get_ns, "ns/op",
            "pymemcache get", py.get, "")
    lib.row("memcached_backend_get", "memcached backend:get raw bytes" .. pin, bget_ns, "ns/op",
            "pymemcache get", py.get, "")
    lib.row("memcached_get_multi100", "memcached region:get_multi(100)" .. pin, multi_ns, "ns/call",
            "pymemcache get_many(100)", py.get_many100, "")

    for i = 1, NKEYS do
        r:delete(keys[i])
    end
end

local ok, err = xpcall(bench, debug.traceback)
stop()
if not ok then
    error(err, 0)
end
