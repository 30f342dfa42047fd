-- dogpile.cache.memcached inside a real nginx (nginx-extras, 2 workers,
-- spec/fixtures/nginx_memcached) over cosockets, on the same memcached
-- servers as plain LuaJIT processes on the C backend (libmemcached), both
-- loading one regions file: keys placed on the server libmemcached's ketama
-- picks, one creator for a stampede of 200 requests and 2 processes, values
-- read byte for byte across, the lock held on either side excluding the
-- other, a SIGSTOPped and a restarted server, the server's size limit, and
-- the phases that cannot yield. The spec starts its own memcached servers
-- and nginx, and stops them.
local cache = require "dogpile.cache"
local support = require "support"
local ngx_support = require "ngx_support"
local nb = require "ngx_backend_support"
local ffi = require "ffi"

local now, sleep, sh, read = support.now, support.sleep, support.sh, support.read
local NO_VALUE = cache.NO_VALUE
local fresh, value_of = nb.fresh, nb.value_of

pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite);")

local FIXTURES = debug.getinfo(1, "S").source:sub(2):gsub("ngx_memcached_spec%.lua$", "")
    .. "fixtures/nginx_memcached"
local TMP = (sh("mktemp -d /tmp/dogpile-ngx-memcached-XXXXXX"):gsub("%s+$", ""))

-- -- Servers (as spec/memcached_spec.lua starts them) ----------------------------------

local port_open = support.port_open

local servers = {} -- port -> pid

-- `port` nil: a free one (another is tried when memcached cannot bind it:
-- a loopback port may be some connection's local port).
local function start_server(port)
    for attempt = 1, port and 1 or 5 do
        local p = port or support.free_port()
        local pidfile = TMP .. "/memcached-" .. p .. ".pid"
        os.remove(pidfile)
        sh(("memcached -d -P %s -l 127.0.0.1 -p %d -U 0 -m 64 -u root"):format(pidfile, p))
        local t0 = now()
        while not port_open(p) or not (read(pidfile) or ""):match("%d+") do
            if now() - t0 > (port and 10 or 2) then
                assert(not port and attempt < 5, "memcached on port " .. p .. " did not start")
                p = nil
                break
            end
            sleep(0.02)
        end
        if p then
            servers[p] = read(pidfile):match("%d+")
            return p
        end
    end
end

local function stop_server(port)
    local pid = servers[port]
    if pid then
        sh("kill -CONT " .. pid .. "; kill -9 " .. pid)
        servers[port] = nil
        local t0 = now()
        while port_open(port) and now() - t0 < 5 do
            sleep(0.02)
        end
    end
end

-- One command line to a server, its whole reply (through bash's /dev/tcp).
local function mc(port, cmd)
    return sh(("bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d; printf \"%s\\r\\nquit\\r\\n\" >&3; "
               .. "cat <&3'"):format(port, cmd:gsub("\r\n", "\\r\\n")))
end

local function counted(port, key)
    return (mc(port, "get count:" .. key):match("VALUE %S+ %d+ %d+\r\n(%d+)\r\n"))
end

-- The backend as ngx_backend_support's checks see it (filled in by setup).
local B = {
    region = "ring", query = "region=ring&", phase_region = "mc", tmp = TMP,
    fixtures = FIXTURES,
    -- A creator's run, counted in memcached as nginx's creators count theirs.
    count = [[
local function count(port, key)
    local k = "count:" .. key
    local p = io.popen(("bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d; printf \"add %s 0 0 1\\r\\n0\\r\\n"
                        .. "incr %s 1\\r\\nquit\\r\\n\" >&3; cat <&3'"):format(port, k, k))
    local out = p:read("*a")
    p:close()
    return tonumber(out:match("(%d+)%s*$"))
end
]],
}

describe("dogpile.cache.memcached inside nginx (cosockets)", function()
    if not nb.need_nginx(it) then
        return
    end

    local main, r2, r3, paused, env, regions, nginx, envs

    setup(function()
        main, r2, r3, paused = start_server(), start_server(), start_server(), start_server()
        env = { DP_MEMCACHED_PORT = main, DP_PAUSED_PORT = paused,
                DP_RING_URLS = ("127.0.0.1:%d,127.0.0.1:%d,127.0.0.1:%d"):format(main, r2, r3) }
        envs = ""
        for k, v in pairs(env) do
            ffi.C.setenv(k, tostring(v), 1)
            envs = envs .. k .. "=" .. v .. " "
        end
        -- This busted process is a plain LuaJIT process too: the C backend.
        regions = cache.load_regions(FIXTURES .. "/regions.lua")
        -- Stored before nginx starts: init_worker's get must still miss.
        regions.mc:set("iw0", "stored")
        regions.mc:set("iw1", "stored")
        nginx = ngx_support.start({ fixture = "nginx_memcached", ready = "/ready", env = env })
        B.nginx, B.regions, B.port, B.env = nginx, regions, main, envs
        B.paused_pid = function() return servers[paused] end
        B.lock_held = function(key)
            return regions.ring.actual_backend:get("dogpile-lock:" .. key) ~= NO_VALUE
        end
        B.timeout_error = "dogpile.cache.memcached: get 'p' failed: get on server 127.0.0.1:"
            .. paused .. ": no answer within socket_timeout (1 s)"
    end)

    teardown(function()
        local check_log = nb.stop_nginx(nginx)
        for port in pairs(servers) do
            stop_server(port)
        end
        os.execute("rm -rf '" .. TMP .. "'")
        check_log()
    end)

    local function get(path)
        local body, status, t = nginx:get(path)
        return body, status, t
    end

    it("outside nginx the same name stays on the C backend (libmemcached)", function()
        assert.are.equal(require("dogpile.cache.backends.c").CBackend,
                         getmetatable(regions.mc.actual_backend))
        assert.are.equal(require("dogpile.cache.backends.c").CBackend,
                         getmetatable(regions.ring.actual_backend))
    end)

    it("checks arguments as the C backend does (its messages), and takes the pool arguments", function()
        local body, status = get("/bad_args")
        assert.are.equal(200, status, body)
        local lines = {}
        for line in body:gmatch("[^\n]+") do
            lines[#lines + 1] = line
        end
        local cases = { { socket_timeout = -1 }, { no_such = 1 }, { url = "127.0.0.1:99999" } }
        for i, a in ipairs(cases) do
            local ok, err = pcall(function()
                cache.make_region():configure("dogpile.cache.memcached", { arguments = a })
            end)
            assert.is_false(ok)
            assert.are.equal((err:gsub("^[^:]*:%d+: ", "")), lines[i])
            assert.matches("^dogpile.cache.memcached: ", lines[i])
        end
        assert.matches("^dogpile.cache.memcached: pool_size must be a positive integer", lines[4])
        assert.are.equal("cosocket", lines[5])
    end)

    it("places every key on the server libmemcached's ketama picks for it", function()
        -- Stored by libmemcached on 3 servers; nginx looks on each server.
        -- Some keys hold bytes above 127 (hashed as C's signed chars).
        local raw = regions.ring.actual_backend
        local plain, accented = fresh("pl") .. "-", fresh("pl\195\169") .. "-"
        for i = 1, 300 do
            raw:set(plain .. i, "x")
            raw:set(accented .. i, "y")
        end
        for _, prefix in ipairs({ plain, accented }) do
            local q = prefix:gsub("[^%w%-]", function(c) return ("%%%02X"):format(c:byte()) end)
            local body, status = get("/placement?region=ring&n=300&prefix=" .. q)
            assert.are.equal(200, status, body)
            local a, b, c = body:match("^ok (%d+) (%d+) (%d+)$")
            assert.is_truthy(a, body)
            -- spread over all three, 300 in all
            assert.are.equal(300, a + b + c)
            assert.is_true(tonumber(a) > 30 and tonumber(b) > 30 and tonumber(c) > 30, body)
        end
    end)

    it("values written on either side are read on the other, byte for byte", function()
        nb.values_across(B)
        -- Flags 0, as libmemcached's set.
        local k = fresh("flags")
        assert.are.equal(200, select(2, get("/set?key=" .. k .. "&value=f")))
        assert.matches("^VALUE " .. k:gsub("%-", "%%-") .. " 0 %d+\r\n", mc(main, "get " .. k))
        -- get (nginx), set (plain), then set (nginx) and delete (plain) across.
        k = fresh("deleted")
        regions.ring:set(k, "x")
        assert.are.equal("x", value_of(get("/get?region=ring&key=" .. k)))
        assert.are.equal(200, select(2, get("/set?region=ring&key=" .. k .. "&value=y")))
        assert.are.equal("y", regions.ring:get(k))
        regions.ring:delete(k)
        assert.are.equal("NO_VALUE", value_of(get("/get?region=ring&key=" .. k)))
    end)

    it("multi forms: set_multi, get_multi (one get per server) and delete_multi across the ring", function()
        local prefix = fresh("multi") .. "-"
        assert.are.equal("ok", get("/multi?region=ring&op=set&n=40&prefix=" .. prefix))
        local expect = {}
        for i = 1, 40 do
            assert.are.equal("v" .. i, regions.ring:get(prefix .. i))
            expect[i] = "v" .. i
        end
        regions.ring:set(prefix .. 41, "plain")
        expect[41], expect[42], expect[43] = "plain", "NO_VALUE", "v1"
        local body, status = get("/multi?region=ring&op=get&n=40&prefix=" .. prefix)
        assert.are.equal(200, status, body)
        local got = {}
        for line in body:gmatch("[^\n]+") do
            got[#got + 1] = line
        end
        assert.are.same(expect, got)
        assert.are.equal("ok", get("/multi?region=ring&op=delete&n=40&prefix=" .. prefix))
        for i = 1, 40 do
            assert.are.equal(NO_VALUE, regions.ring:get(prefix .. i))
        end
        assert.are.equal("plain", regions.ring:get(prefix .. 41))
    end)

    it("a stampede of 200 requests and 2 plain processes on one missing key runs the creator once", function()
        local key = nb.stampede(B)
        assert.are.equal("1", counted(main, key))
        -- released: the lock key is gone (libmemcached looks on its server)
        assert.are.equal(NO_VALUE, regions.ring.actual_backend:get("dogpile-lock:" .. key))
    end)

    it("a plain process holding the lock makes nginx wait for its value, without blocking", function()
        local key = fresh("plain-holds")
        nb.plain_holds(B, key)
        assert.are_not.equal(NO_VALUE, regions.ring.actual_backend:get("dogpile-lock:" .. key),
                             read(TMP .. "/holder.out"))
        local slowest = nb.requests(B, "/get_or_create?region=ring&key=" .. key, 40)
        -- While they wait, the workers answer other requests at once.
        local _, status, t = get("/plain")
        assert.are.equal(200, status)
        assert.is_true(t < 0.1, "/plain took " .. t .. " s")
        local max = slowest()
        for i = 1, 40 do
            assert.are.equal("from the holder", value_of(read(TMP .. "/w" .. i)))
        end
        -- Started 0.1 s into the 0.6 s hold; polls at most 50 ms apart.
        assert.is_true(max < 0.85, "slowest waiter: " .. max .. " s")
        assert.is_nil(counted(main, key), "no creator ran in nginx")
    end)

    it("nginx holding the lock excludes a plain process, which gets nginx's value", function()
        local key = fresh("nginx-holds")
        nb.nginx_holds(B, key)
        assert.are.equal("1", counted(main, key))
        assert.are.equal(NO_VALUE, regions.ring.actual_backend:get("dogpile-lock:" .. key))
    end)

    it("refuses a value above the server's item size limit, giving the limit it reports", function()
        local body = get("/too_big?key=" .. fresh("big") .. "&bytes=2000000")
        assert.matches("dogpile.cache.memcached: set '[^']+' failed: a value of 20000%d%d bytes "
                       .. "is larger than the item size limit of server 127%.0%.0%.1:" .. main
                       .. " %(item_size_max = 1048576 bytes", body)
        assert.are.equal("stored", get("/too_big?key=" .. fresh("fits") .. "&bytes=1000000"))
    end)

    it("while memcached is SIGSTOPped: other locations answer in under 10 ms, cache requests fail within socket_timeout", function()
        nb.not_blocked(B)
    end)

    it("a restarted server is used again without reloading nginx; errors name backend, operation, key and server", function()
        for _ = 1, 4 do -- pooled connections in both workers
            assert.are.equal(200, select(2, get("/set?region=paused&key=r&value=before")))
        end
        stop_server(paused)
        local body, status, t = get("/get?region=paused&key=r")
        assert.are.equal(500, status)
        assert.matches("dogpile.cache.memcached: get 'r' failed: get on server 127.0.0.1:"
                       .. paused .. ": ", body, 1, true)
        assert.is_true(t < 0.5, body)
        body = get("/set?region=paused&key=r&value=x")
        assert.matches("dogpile.cache.memcached: set 'r' failed: set on server 127.0.0.1:"
                       .. paused .. ": ", body, 1, true)
        -- The C backend says the same of it.
        local ok, err = pcall(regions.paused.get, regions.paused, "r")
        assert.is_false(ok)
        assert.matches("dogpile.cache.memcached: get 'r' failed: get on server 127.0.0.1:"
                       .. paused .. ": ", err, 1, true)
        start_server(paused)
        -- Each worker tries it again retry_timeout (1 s) after its own last
        -- failure: then every request works, in both workers.
        -- Timed to the moment both workers have used it again (each request
        -- on a loaded machine takes its own time: the 20 in a row are not
        -- part of the bound).
        local t0, good, pids, workers, took = now(), 0, {}, 0, nil
        repeat
            body, status = get("/set?region=paused&key=r&value=after")
            if status == 200 then
                good = good + 1
                local pid = body:match("(%d+)$")
                if not pids[pid] then
                    pids[pid] = true
                    workers = workers + 1
                    if workers == 2 then
                        took = now() - t0
                    end
                end
            else
                good = 0
                sleep(0.1)
            end
        until (good >= 20 and workers == 2) or now() - t0 > 10
        assert.are.equal(2, workers, "both workers answered")
        assert.is_true(good >= 20, body .. "\n" .. nginx:log())
        assert.is_true(took < 3, "took " .. took .. " s for both workers to use it again")
        for _ = 1, 10 do
            assert.are.equal("after", value_of(get("/get?region=paused&key=r")))
        end
    end)

    it("phases that cannot yield never block: get is a miss, writes go to a timer, the creator runs without the lock", function()
        nb.phases(B)
    end)
end)
