--- memcached inside one nginx worker: dogpile.cache.memcached over cosockets
-- (dogpile.cache.mctext) against lua-resty-memcached (Debian's
-- lua-nginx-memcached, `nginx.memcached`), in the same request, each on a
-- keepalive pool (each operation connects from the pool and sets keepalive
-- after, as an application does). spec/ngx_support.lua starts nginx with
-- the fixture spec/fixtures/nginx_memcached on the memcached that bench/run
-- started (MEMCACHED_PORT), or on one of its own; GET /bench (app.lua's
-- bench()) runs the loops, taking turns.
--
--   luajit bench/ngx_memcached.lua [ops per loop] [repetitions] [rounds]
--
-- Row (bench/lib.lua), median us per operation:
--   ngx_memcached_get  region:get hit of a 100-byte value vs resty.memcached
--                      get of the same key (the stored envelope): no target
--                      given by the issue; <= 1.2, as for redis
local blib = require "lib"
local support = require "ngx_support"

local n = tonumber(arg and arg[1]) or blib.count(5000, 300)
local reps = tonumber(arg and arg[2]) or (blib.quick and 3 or 5)
local rounds = tonumber(arg and arg[3]) or (blib.quick and 1 or 3)

local port, stop_memcached = require("servers_lib").memcached()
-- Client and server on one CPU, as bench/run's other network paths.
local pin = os.getenv("BENCH_PIN")
if pin and pin ~= "" then
    support.NGINX = pin .. " " .. support.NGINX
end

local server = support.start({ fixture = "nginx_memcached", ready = "/ready",
                               env = { DP_MEMCACHED_PORT = port } })
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
stop_memcached()
assert(ok, err)

local LABELS = {
    { "resty_get", "lua-resty-memcached get, 100-byte value" },
    { "region_get", "dogpile.cache.memcached region:get hit, 100-byte value" },
}
print(("memcached in one nginx worker, one request: %d ops per loop, median of %d (%d rounds "
       .. "of %d, the paths taking turns), memcached on 127.0.0.1:%d"):format(n, reps * rounds,
                                                                             rounds, reps, port))
local failed = false
for _, l in ipairs(LABELS) do
    local r = res[l[1]]
    if r then
        print(("  %-56s %8.2f us/op  (%.2f-%.2f)%s"):format(l[2], r.us, r.lo, r.hi,
                                                           r.ok and "" or "  WRONG RESULT"))
        failed = failed or not r.ok
    else
        print(("  %-56s missing from /bench"):format(l[2]))
        failed = true
    end
end

local function us(name)
    return res[name] and res[name].us
end
blib.row("ngx_memcached_get", "nginx: memcached region:get hit, 100-byte value (cosocket)",
         us("region_get"), "us/op", "lua-resty-memcached get", us("resty_get"), "<=1.2")
if failed then
    io.stderr:write("ngx_memcached: a loop returned a wrong result or a path is missing\n")
    os.exit(1)
end
