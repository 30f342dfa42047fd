-- dogpile.cache.tiered inside nginx the OpenResty way (issue 14, items 1
-- and 6): the region built in init_by_lua by a master running as root, 2
-- workers running as nobody (spec/fixtures/tiered/nginx_root).
--   memory -> lmdb: the root master creates no file (the environment and its
--   host feed are opened by each worker at its first use, the first one
--   creating them, owned by nobody); the workers and a plain LuaJIT process
--   (root) on the same environment run random operations, none of which
--   reads a value older than 100 ms.
--   memory -> ngx_shared -> redis over cosockets, the same with a plain
--   process on memory -> redis.
-- Each also checks /maxage: a memory tier's max_age holds on front hits,
-- whose loop compiles without a trace abort. (spec/tiered_spec.lua runs the
-- same layouts with regions built in each worker, under the user running it.)
local support = require "support"
local ngx_support = require "ngx_support"
local now, sleep, sh, read = support.now, support.sleep, support.sh, support.read

local SRC = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]+$") or "spec"
local FIX = SRC .. "/fixtures/tiered"
local TMP = (sh("mktemp -d /tmp/dogpile-ngx-tiered-XXXXXX"):gsub("%s+$", ""))
local T = dofile(FIX .. "/common.lua")
T.TMP = TMP

local seed = os.time() % 100000

-- Starts nginx on `layout`; a folder the workers (nobody) can create in,
-- as /var/cache/nginx would be; the participants' logs go there too.
local function start(layout, rport)
    assert.is_true(ngx_support.available(), "nginx-extras (the Lua module) is not installed")
    assert.is_truthy(sh("id -u"):match("^0"),
                     "this spec starts nginx's master as root (CI runs as root)")
    local dir = (sh("mktemp -d " .. TMP .. "/run-XXXXXX"):gsub("%s+$", ""))
    sh("chmod 1777 " .. dir .. " && chmod 755 " .. TMP)
    local srv = ngx_support.start({ fixture = "tiered/nginx_root", ready = "/ready",
        vars = { OUT = dir .. "/ops", LAYOUT = layout, RPORT = rport or 0, DATA = dir } })
    return srv, dir
end

-- One plain LuaJIT process (spec/fixtures/tiered/worker.lua) of random
-- operations on `plain_layout`, with the workers', from `at`; returns every
-- log once all are done.
local function run_with_plain(srv, dir, plain_layout, port, n)
    local at = now() + 1.0
    seed = seed + 1
    local body, code = srv:get(string.format("/start?at=%.3f&n=%d&keys=30&seed=%d", at, n, seed))
    assert.are.equal(200, code, body)
    local plain = dir .. "/plain-1"
    sh(string.format("luajit %s/worker.lua random %s %d %s %.3f %d 30 %d > %s.err 2>&1",
                     FIX, plain_layout, port or 0, plain, at, n, seed, plain))
    assert.are.equal("", read(plain .. ".err") or "", "the plain process failed")
    local t0 = now()
    while srv:get("/done") ~= "2\n" do
        assert.is_true(now() - t0 < 60, "the workers did not finish: " .. srv:log())
        sleep(0.1)
    end
    local files = { plain }
    for path in sh("ls " .. dir .. "/ops.*"):gmatch("[^\n]+") do
        files[#files + 1] = path
    end
    assert.are.equal(3, #files, "one log per worker and the plain process's")
    return T.load_ops(files)
end

local function assert_coherent(ops)
    assert.is_true(#ops >= 1000, "only " .. #ops .. " operations")
    local bad, judged = T.check(ops, 0.1)
    assert.is_true(judged >= 300, "only " .. judged .. " reads judged")
    assert.are.same({}, bad)
end

describe("dogpile.cache.tiered inside nginx, built in init_by_lua by a root master", function()
    support.no_leaks()

    teardown(function()
        for _, s in ipairs(T.servers) do
            T.stop_redis(s)
        end
        os.execute("rm -rf " .. TMP)
    end)

    it("memory -> lmdb: the workers (nobody) create the environment and its host feed; with "
       .. "a plain process on the same environment, 1,000+ random operations never read a "
       .. "value older than 100 ms; max_age holds on front hits", function()
        local srv, dir = start("lmdb")
        finally(function() srv:stop() end)
        -- The workers' first read (init_worker) made the files; the plain
        -- process (root) must come after, or it would make them root's.
        local t0 = now()
        while not sh("stat -c %U " .. dir .. "/lmdb/dogpile-feed 2>/dev/null"):match("nobody") do
            assert.is_true(now() - t0 < 10, "no worker made the host feed: " .. srv:log())
            sleep(0.05)
        end
        for _, f in ipairs({ "", "/data.mdb", "/lock.mdb", "/dogpile-locks", "/dogpile-feed" }) do
            assert.are.equal("nobody\n", sh("stat -c %U " .. dir .. "/lmdb" .. f), "lmdb" .. f)
        end
        local ops = run_with_plain(srv, dir, "ml", 0, 400)
        assert_coherent(ops)
        -- Every participant wrote and read: the coherence checked is
        -- between the workers and with the plain process, both ways.
        local by = {}
        for _, o in ipairs(ops) do
            local who = o.src:match("plain") and "plain" or o.src
            by[who] = by[who] or {}
            by[who][o.op] = true
        end
        for who, seen in pairs(by) do
            assert.is_true(seen.W and seen.R or false, who .. " did not both write and read")
        end
        T.check_max_age_in_nginx(srv)
        local log = srv:log()
        assert.is_nil(log:find("[error]", 1, true), log)
        assert.is_nil(log:find("Permission denied", 1, true), log)
    end)

    it("memory -> ngx_shared -> redis (cosockets), with a plain process on memory -> redis: "
       .. "1,000+ random operations never read a value older than 100 ms; max_age holds on "
       .. "front hits", function()
        local redis = T.start_redis()
        sh("redis-cli -p " .. redis.port .. " flushall")
        local srv, dir = start("ngx_redis", redis.port)
        finally(function() srv:stop() end)
        assert_coherent(run_with_plain(srv, dir, "mr", redis.port, 400))
        T.check_max_age_in_nginx(srv)
        local log = srv:log()
        assert.is_nil(log:find("[error]", 1, true), log)
    end)
end)
