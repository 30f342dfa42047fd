--- Throughput of dogpile.cache.redis against redis-benchmark, in one run.
--
--   luajit bench/redis.lua [gets = 100000]
--
-- Starts its own redis-server on a free loopback port (data in a temporary
-- folder, removed at the end), stores NKEYS keys of 100-byte values, then
-- measures, from one client and one connection, no pipelining:
--   region:get hit          the whole hit: GET round trip, envelope, decode
--   backend:get             the C backend's bytes, no envelope or decoding
--   region:get_multi(100)   one MGET of 100 keys, decoded (keys per second)
--   redis-benchmark GET     `redis-benchmark -c 1 GET key` (the anchor)
--   redis-benchmark MGET    `redis-benchmark -c 1 MGET k1..k100` (keys/s)
-- LUA_PATH and LUA_CPATH must reach the modules (see bench/README.md).
local cache = require "dogpile.cache"
local dogpile = require "dogpile"

local N = tonumber(arg and arg[1]) or 1e5
local NKEYS = 1000
local VALUE = string.rep("x", 100)

local function sh(cmd)
    local p = assert(io.popen(cmd .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    return out
end

local dir = (sh("mktemp -d /tmp/dogpile-bench-redis-XXXXXX"):gsub("%s+$", ""))
local port
repeat
    port = 20000 + math.random(0, 19999)
until sh("(exec 3<>/dev/tcp/127.0.0.1/" .. port .. ") 2>/dev/null && echo busy") == ""
sh(string.format("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s "
                 .. "--daemonize yes --pidfile %s/redis.pid --logfile %s/redis.log",
                 port, dir, dir, dir))
local t0 = dogpile.now()
while not sh("redis-cli -p " .. port .. " ping"):match("PONG") do
    assert(dogpile.now() - t0 < 10, "redis-server did not start")
end

local ok, err = pcall(function()
    local r = cache.make_region():configure("dogpile.cache.redis",
                                             { arguments = { port = port } })
    local keys = {}
    for i = 1, NKEYS do
        keys[i] = "bench:" .. i
        r:set(keys[i], VALUE)
    end
    local function rate(label, n, unit, fn)
        fn(math.floor(n / 10)) -- warm-up
        local t = dogpile.now()
        fn(n)
        local per = n / (dogpile.now() - t)
        print(string.format("%-26s %12.0f %s/s", label, per, unit))
    end
    rate("region:get hit", N, "gets", function(n)
        for i = 1, n do
            local v = r:get(keys[i % NKEYS + 1])
            assert(v == VALUE)
        end
    end)
    local b = r.actual_backend
    rate("backend:get", N, "gets", function(n)
        for i = 1, n do
            b:get(keys[i % NKEYS + 1])
        end
    end)
    local batch = {}
    for i = 1, 100 do
        batch[i] = keys[i]
    end
    rate("region:get_multi(100)", N * 5, "keys", function(n)
        for _ = 1, n / 100 do
            local vs = r:get_multi(batch)
            assert(vs[100] == VALUE)
        end
    end)
    local function anchor(label, n, args, mult)
        local out = sh(string.format("redis-benchmark -p %d -c 1 -n %d -q %s", port, n, args))
        local per = tonumber(out:match(":%s*([%d.]+) requests per second"))
        assert(per, "redis-benchmark: " .. out)
        print(string.format("%-26s %12.0f %s/s", label, per * mult, mult > 1 and "keys" or "gets"))
    end
    anchor("redis-benchmark GET", N, "GET " .. keys[1], 1)
    anchor("redis-benchmark MGET(100)", N / 20, "MGET " .. table.concat(batch, " "), 100)
end)
sh("kill $(cat " .. dir .. "/redis.pid); rm -rf " .. dir)
assert(ok, err)
