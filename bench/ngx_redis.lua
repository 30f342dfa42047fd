--- Redis inside one nginx worker: dogpile.cache.redis over cosockets
-- (dogpile.cache.resp) against lua-resty-redis (Debian's lua-nginx-redis,
-- `nginx.redis`), in the same request, on the same keepalive pool (each
-- operation connects from the pool and sets keepalive after, as an
-- application does). spec/ngx_support.lua starts nginx with the fixture
-- spec/fixtures/nginx_redis on the redis-server that bench/run started
-- (REDIS_PORT), or on one of its own; GET /bench (app.lua's bench()) runs
-- the loops, taking turns.
--
--   luajit bench/ngx_redis.lua [ops per loop] [repetitions] [rounds]
--
-- Rows (bench/lib.lua), median us per operation:
--   ngx_redis_get        region:get hit of a 100-byte value vs resty.redis
--                        GET of the same key: target <= 1.2
--   ngx_redis_get_multi  region:get_multi of 100 such keys vs resty.redis
--                        MGET of them: target <= 1.3
local blib = require "lib"
local support = require "ngx_support"

local n = tonumber(arg and arg[1]) or blib.count(5000, 300)
local reps = tonumber(arg and arg[2]) or (blib.quick and 3 or 5)
local rounds = tonumber(arg and arg[3]) or (blib.quick and 1 or 3)

local port, stop_redis = require("servers_lib").redis()
-- Client and server on one CPU, as bench/run's other network paths.
local pin = os.getenv("BENCH_PIN")
if pin and pin ~= "" then
    support.NGINX = pin .. " " .. support.NGINX
end

local server = support.start({ fixture = "nginx_redis", ready = "/ready",
                               env = { DP_REDIS_PORT = port } })
local res = {}
local ok, err = pcall(function()
    local out = support.read(support.CURL .. " -s -m 600 -w '\\n%{http_code}' "
                             .. support.q(server:url(("/bench?n=%d&reps=%d&rounds=%d")
                                                     :format(n, reps, rounds))))
    local body, code = out:match("^(.*)\n(%d+)$")
    assert(code == "200", "GET /bench failed: " .. out .. "\n" .. server:log())
    for line in body:gmatch("[^\n]+") do
        local name, med, lo, hi, good = line:match("^(%S+)\t(%S+)\t(%S+)\t(%S+)\t(%S+)$")
        assert(name, "bad line from /bench: " .. line)
        res[name] = { us = tonumber(med), lo = tonumber(lo), hi = tonumber(hi),
                      ok = good == "true" }
    end
end)
server:stop()
stop_redis()
assert(ok, err)

local LABELS = {
    { "resty_get", "lua-resty-redis GET, 100-byte value" },
    { "region_get", "dogpile.cache.redis region:get hit, 100-byte value" },
    { "resty_mget", "lua-resty-redis MGET of 100 keys" },
    { "region_get_multi", "dogpile.cache.redis region:get_multi(100)" },
}
print(("redis in one nginx worker, one request: %d ops per loop, median of %d (%d rounds of %d, "
       .. "the paths taking turns), redis-server on 127.0.0.1:%d"):format(n, reps * rounds,
                                                                        rounds, reps, port))
local failed = false
for _, l in ipairs(LABELS) do
    local r = res[l[1]]
    if r then
        print(("  %-52s %8.2f us/op  (%.2f-%.2f)%s"):format(l[2], r.us, r.lo, r.hi,
                                                           r.ok and "" or "  WRONG RESULT"))
        failed = failed or not r.ok
    else
        print(("  %-52s missing from /bench"):format(l[2]))
        failed = true
    end
end

local function us(name)
    return res[name] and res[name].us
end
blib.row("ngx_redis_get", "nginx: redis region:get hit, 100-byte value (cosocket)",
         us("region_get"), "us/op", "lua-resty-redis GET", us("resty_get"), "<=1.2")
blib.row("ngx_redis_get_multi", "nginx: redis region:get_multi(100) (cosocket)",
         us("region_get_multi"), "us/op", "lua-resty-redis MGET of 100", us("resty_mget"),
         "<=1.3")
if failed then
    io.stderr:write("ngx_redis: a loop returned a wrong result or a path is missing\n")
    os.exit(1)
end
