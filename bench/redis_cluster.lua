--- dogpile.cache.redis_cluster against hiredis floors to one node, in one run,
-- median ns per call.
--
--   luajit bench/redis_cluster.lua [gets = 10000] [reps = 5] [rounds = 3]  (~30 s; BENCH_QUICK=1: ~15 s)
--
-- LUA_PATH and LUA_CPATH must reach the modules (bench/run sets them; or
-- `. .ci/lib.sh && use_stage main`). It starts a cluster of its own (3
-- masters, no replicas: spec/fixtures/redis_cluster/cluster.lua) and one
-- plain redis-server for the floor, on free loopback ports, and stops them
-- all at the end, whatever failed. Nothing is pinned: three masters on one
-- CPU could not answer a pipeline at once.
--
-- It stores NKEYS keys with 100-byte string values through a region (the
-- keys spread over all slots, so over the three masters), then, the keys in
-- turn, every read a hit:
--   region:get             the whole hit: the slot, GET on its master, decode
--   region:get_multi(100)  100 consecutive keys: one pipeline of GETs to each
--                          master, all written before any is read (a cluster
--                          refuses an MGET across slots)
--   floor_hiredis          bench/floor_hiredis.c on the plain server: GET,
--                          and MGET of 100, values of our envelope's size
-- Targets (issue 15): get <= 1.2x the floor's GET, get_multi(100) <= 1.5x
-- the floor's MGET of 100. Prints ROW lines (bench/lib.lua).
local here = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$") or "."
local lib = dofile(here .. "/lib.lua")
local S = dofile(here .. "/servers_lib.lua")
package.path = here .. "/../spec/?.lua;" .. package.path
local CL = require "fixtures.redis_cluster.cluster"
local cache = require "dogpile.cache"

local N = tonumber(arg and arg[1]) or lib.count(10000, 1000)
local REPS = tonumber(arg and arg[2]) or (lib.quick and 3 or 5)
local ROUNDS = tonumber(arg and arg[3]) or (lib.quick and 1 or 3)
local NKEYS = 1000
local VALUE = string.rep("x", 100)

-- A plain redis-server for the floor, unpinned like the cluster.
local function plain_server()
    local dir = (S.sh("mktemp -d /tmp/dogpile-bench-rc-XXXXXX")):gsub("%s+$", "")
    local port
    for _ = 1, 100 do
        port = math.random(20000, 39999)
        if S.sh("(exec 3<>/dev/tcp/127.0.0.1/" .. port .. ") 2>/dev/null && echo busy") == "" then
            break
        end
    end
    local out, ok = S.sh(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no "
        .. "--dir %s --daemonize yes --pidfile %s/redis.pid --logfile %s/redis.log")
        :format(port, dir, dir, dir))
    assert(ok, "redis-server: " .. out)
    for _ = 1, 200 do
        if S.sh("redis-cli -p " .. port .. " ping"):match("PONG") then
            break
        end
        S.sleep(0.02)
    end
    return port, function()
        local pid = (io.open(dir .. "/redis.pid") or io.open("/dev/null")):read("*a"):match("%d+")
        if pid then
            S.sh("kill -9 " .. pid)
        end
        os.execute("rm -rf '" .. dir .. "'")
    end
end

local function bench(cl, fport)
    local r = cache.make_region():configure("dogpile.cache.redis_cluster",
                                            { arguments = { startup_nodes = cl:startup_nodes() } })
    local keys = {}
    for i = 1, NKEYS do
        keys[i] = "bench:redis_cluster:" .. i
        r:set(keys[i], VALUE)
    end
    local envelope = #r.actual_backend:get(keys[1])
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
    local function region_get_multi(n)
        local reg, bs, nb, vs = r, batches, #batches, nil
        for i = 1, n do
            vs = reg:get_multi(bs[i % nb + 1])
        end
        assert(vs[1] == VALUE and vs[100] == VALUE, "region:get_multi: not all hits")
    end

    local floors = S.floors()
    local runs = { get = {}, multi = {}, fget = {}, fmget = {} }
    for round = 1, ROUNDS do
        runs.get[round] = lib.ns_per_op(region_get, N, REPS)
        runs.multi[round] = lib.ns_per_op(region_get_multi, NM, REPS)
        local floor, why = S.figures(("%s/floor_hiredis %d %d %d %d %d 100"):format(
            floors, fport, N, envelope, NKEYS, REPS))
        if not (floor and floor.get_ns and floor.mget_ns) then
            error("floor_hiredis failed: " .. tostring(why))
        end
        runs.fget[round], runs.fmget[round] = floor.get_ns, floor.mget_ns
    end
    local med = {}
    for k, xs in pairs(runs) do
        med[k] = lib.median(xs)
    end
    local function show(name, ns)
        print(("%-46s %12.0f"):format(name, ns))
    end
    show("cluster region:get (ns/op)", med.get)
    show("cluster region:get_multi(100) (ns/call)", med.multi)
    show("floor_hiredis GET, one node (ns/op)", med.fget)
    show("floor_hiredis MGET of 100, one node (ns/call)", med.fmget)
    print(("ratios: get %.2fx (target <= 1.2), get_multi(100) %.2fx (target <= 1.5)"):format(
        med.get / med.fget, med.multi / med.fmget))
    lib.row("redis_cluster_get", "redis_cluster region:get hit, 100 B, 3 masters", med.get, "ns/op",
            "hiredis C GET to one node (floor_hiredis)", med.fget, "<=1.2")
    lib.row("redis_cluster_get_multi100", "redis_cluster region:get_multi(100), 3 masters",
            med.multi, "ns/call", "hiredis C MGET of 100 to one node (floor_hiredis)", med.fmget,
            "<=1.5")
    r:delete_multi(keys)
end

local cl = CL.start({ masters = 3, replicas = 0 })
local fport, fstop
local ok, err = pcall(function()
    fport, fstop = plain_server()
    print(("cluster of 3 masters on 127.0.0.1:%s; floor server on 127.0.0.1:%d; nothing pinned"):format(
        table.concat((function()
            local p = {}
            for _, n in ipairs(cl.nodes) do
                p[#p + 1] = n.port
            end
            return p
        end)(), ","), fport))
    bench(cl, fport)
end)
if fstop then
    fstop()
end
cl:stop()
if not ok then
    error(err, 0)
end
