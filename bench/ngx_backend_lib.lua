--- What bench/ngx_redis.lua and bench/ngx_memcached.lua share: nginx with
-- the backend's fixture (spec/ngx_support.lua) on the server that bench/run
-- started, or on one of its own (servers_lib); GET /bench runs the loops in
-- one worker, taking turns (the fixture's bench(), through
-- spec/fixtures/nginx_backend/backend_app.lua); the medians are printed,
-- then the ROW lines (bench/lib.lua).
local blib = require "lib"
local support = require "ngx_support"

local M = {}

--- Ops per loop, repetitions, rounds: from the command line, or bench/run's.
function M.counts()
    return tonumber(arg and arg[1]) or blib.count(5000, 300),
        tonumber(arg and arg[2]) or (blib.quick and 3 or 5),
        tonumber(arg and arg[3]) or (blib.quick and 1 or 3)
end

--- Run the benchmark `b`: server ("redis" or "memcached", a servers_lib
-- function), fixture, port_env (the variable the fixture reads the port
-- from), title (printed with the counts and the port), labels ({loop,
-- text}), width (of the text column), rows ({name, what, ours, anchor
-- text, anchor loop, target}). Exits 1 when a loop was wrong or missing.
function M.run(b)
    local n, reps, rounds = M.counts()
    local port, stop_server = require("servers_lib")[b.server]()
    -- Client and server on one CPU, as bench/run's other network paths.
    local pin = os.getenv("BENCH_PIN")
    if pin and pin ~= "" then
        support.NGINX = pin .. " " .. support.NGINX
    end
    local server = support.start({ fixture = b.fixture, ready = "/ready",
                                   env = { [b.port_env] = port } })
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
    stop_server()
    assert(ok, err)

    print(("%s in one nginx worker, one request: %d ops per loop, median of %d (%d rounds of "
           .. "%d, the paths taking turns), %s on 127.0.0.1:%d"):format(b.title, n, reps * rounds,
                                                                      rounds, reps, b.server_name,
                                                                      port))
    local failed = false
    local fmt = "  %-" .. b.width .. "s %8.2f us/op  (%.2f-%.2f)%s"
    for _, l in ipairs(b.labels) do
        local r = res[l[1]]
        if r then
            print(fmt:format(l[2], r.us, r.lo, r.hi, r.ok and "" or "  WRONG RESULT"))
            failed = failed or not r.ok
        else
            print(("  %-" .. b.width .. "s missing from /bench"):format(l[2]))
            failed = true
        end
    end
    local function us(name)
        return res[name] and res[name].us
    end
    for _, row in ipairs(b.rows) do
        blib.row(row[1], row[2], us(row[3]), "us/op", row[4], us(row[5]), row[6])
    end
    if failed then
        io.stderr:write((b.fixture:gsub("^nginx_", "ngx_")), ": a loop returned a wrong result or "
                        .. "a path is missing\n")
        os.exit(1)
    end
end

return M
