-- dogpile.cache.redis and dogpile.cache.redis_sentinel inside a real nginx
-- (nginx-extras, 2 workers, spec/fixtures/nginx_redis) over cosockets, on
-- the same redis-server as plain LuaJIT processes on the C backend
-- (hiredis), both loading one regions file: one creator for a stampede of
-- 200 requests and 2 processes, values read byte for byte across, waiters
-- woken by the release's PUBLISH, a Sentinel failover while nginx serves, a
-- SIGSTOPped and a restarted server, and the phases that cannot yield. The
-- spec starts its own redis-servers, sentinel and nginx, and stops them.
local cache = require "dogpile.cache"
local support = require "support"
local ngx_support = require "ngx_support"
local nb = require "ngx_backend_support"
local ffi = require "ffi"

local now, sleep, sh, write, read = support.now, support.sleep, support.sh, support.write,
    support.read
local wait_for, fresh, value_of = nb.wait_for, nb.fresh, nb.value_of

pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite);")

local FIXTURES = debug.getinfo(1, "S").source:sub(2):gsub("ngx_redis_spec%.lua$", "")
    .. "fixtures/nginx_redis"
local TMP = (sh("mktemp -d /tmp/dogpile-ngx-redis-XXXXXX"):gsub("%s+$", ""))

-- -- Servers (as spec/redis_spec.lua starts them) --------------------------------------

local free_port = support.free_port

local servers = {}

-- The pid, or nil when the port was taken between free_port and the start
-- (helpers and specs start servers side by side) and `retry` allows another.
local function wait_pid(pidfile, port, what, log, retry)
    local t0 = now()
    while true do
        local pid = (read(pidfile) or ""):match("%d+")
        if pid and sh("redis-cli -p " .. port .. " ping"):match("PONG") then
            return pid
        end
        local text = read(log) or ""
        if retry and text:match("Address already in use") then
            return nil
        end
        assert(now() - t0 < 10, what .. " did not start: " .. text)
        sleep(0.02)
    end
end

local function start_server(extra, port, tries)
    local chosen = port == nil
    port = port or free_port()
    local dir = TMP .. "/srv" .. port
    os.execute("mkdir -p " .. dir)
    local conf = dir .. "/redis.conf"
    write(conf, table.concat({
        "port " .. port, "bind 127.0.0.1", 'save ""', "appendonly no", "dir " .. dir,
        "daemonize yes", "pidfile " .. dir .. "/redis.pid", "logfile " .. dir .. "/redis.log",
        extra or "" }, "\n") .. "\n")
    os.remove(dir .. "/redis.pid")
    sh("redis-server " .. conf)
    local srv = { port = port, dir = dir }
    srv.pid = wait_pid(dir .. "/redis.pid", port, "redis-server", dir .. "/redis.log",
                       chosen and (tries or 0) < 5)
    if not srv.pid then
        os.remove(dir .. "/redis.log")
        return start_server(extra, nil, (tries or 0) + 1)
    end
    servers[#servers + 1] = srv
    return srv
end

local function start_sentinel(master_port, name)
    local port = free_port()
    local dir = TMP .. "/sentinel" .. port
    os.execute("mkdir -p " .. dir)
    local conf = dir .. "/sentinel.conf"
    write(conf, table.concat({
        "port " .. port, "bind 127.0.0.1", "dir " .. dir, "daemonize yes",
        "pidfile " .. dir .. "/sentinel.pid", "logfile " .. dir .. "/sentinel.log",
        "sentinel monitor " .. name .. " 127.0.0.1 " .. master_port .. " 1",
        "sentinel down-after-milliseconds " .. name .. " 500",
        "sentinel failover-timeout " .. name .. " 3000",
        "sentinel parallel-syncs " .. name .. " 1" }, "\n") .. "\n")
    sh("redis-server " .. conf .. " --sentinel")
    local srv = { port = port, dir = dir }
    srv.pid = wait_pid(dir .. "/sentinel.pid", port, "the sentinel", dir .. "/sentinel.log")
    servers[#servers + 1] = srv
    return srv
end

local function stop_server(srv)
    if srv.pid then
        sh("kill -CONT " .. srv.pid .. "; kill -9 " .. srv.pid)
        local t0 = now()
        while sh("kill -0 " .. srv.pid .. " 2>/dev/null && echo alive"):match("alive")
            and now() - t0 < 5 do
            sleep(0.01)
        end
        srv.pid = nil
    end
end

local function cli(port, cmd)
    return (sh("redis-cli -p " .. port .. " " .. cmd):gsub("%s+$", ""))
end

-- The backend as ngx_backend_support's checks see it (filled in by setup).
local B = {
    region = "redis", query = "", phase_region = "redis", tmp = TMP, fixtures = FIXTURES,
    -- A creator's run, counted in Redis as nginx's creators count theirs.
    count = [[
local function count(port, key)
    local p = io.popen("redis-cli -p " .. port .. " INCR count:" .. key)
    local n = tonumber(p:read("*a"))
    p:close()
    return n
end
]],
}

describe("dogpile.cache.redis inside nginx (cosockets)", function()
    if not nb.need_nginx(it) then
        return
    end

    local main, paused, master, replica, sentinel, env, regions, nginx

    setup(function()
        main = start_server()
        paused = start_server()
        master = start_server()
        replica = start_server("replicaof 127.0.0.1 " .. master.port)
        wait_for("replication", function()
            return cli(replica.port, "INFO replication"):match("master_link_status:up") ~= nil
        end, 10)
        sentinel = start_sentinel(master.port, "dpn")
        wait_for("the sentinel discovering the replica", function()
            return cli(sentinel.port, "SENTINEL replicas dpn"):match(tostring(replica.port)) ~= nil
        end, 15)
        env = { DP_REDIS_PORT = main.port, DP_PAUSED_PORT = paused.port,
                DP_SENTINEL_PORT = sentinel.port }
        for k, v in pairs(env) do
            ffi.C.setenv(k, tostring(v), 1)
        end
        -- This busted process is a plain LuaJIT process too: the C backend.
        regions = cache.load_regions(FIXTURES .. "/regions.lua")
        -- Stored before nginx starts: init_worker's get must still miss.
        regions.redis:set("iw0", "stored")
        regions.redis:set("iw1", "stored")
        nginx = ngx_support.start({ fixture = "nginx_redis", ready = "/ready", env = env })
        B.nginx, B.regions, B.port, B.env = nginx, regions, main.port, "DP_REDIS_PORT=" .. main.port
        B.paused_pid = function() return paused.pid end
        B.lock_held = function(key) return cli(main.port, "EXISTS _lock" .. key) == "1" end
        B.timeout_error = "dogpile.cache.redis: get 'p' failed: GET: no answer from 127.0.0.1:"
            .. paused.port .. " within socket_timeout (1 s)"
    end)

    teardown(function()
        local check_log = nb.stop_nginx(nginx)
        for _, srv in ipairs(servers) do
            stop_server(srv)
        end
        os.execute("rm -rf '" .. TMP .. "'")
        check_log()
    end)

    local function get(path)
        local body, status, t = nginx:get(path)
        return body, status, t
    end

    it("outside nginx the same names stay on the C backend (hiredis)", function()
        assert.are.equal(require("dogpile.cache.backends.c").CBackend,
                         getmetatable(regions.redis.actual_backend))
        assert.are.equal(require("dogpile.cache.backends.c").CBackend,
                         getmetatable(regions.sentinel.actual_backend))
    end)

    it("values written on either side are read on the other, byte for byte", function()
        nb.values_across(B)
        -- get_multi, set (plain) and delete (nginx) across.
        local k = fresh("deleted")
        regions.redis:set(k, "x")
        assert.are.equal("x", value_of(get("/get?key=" .. k)))
        assert.are.equal(200, select(2, get("/set?key=" .. k .. "&value=y")))
        assert.are.equal("y", regions.redis:get(k))
    end)

    it("a stampede of 200 requests and 2 plain processes on one missing key runs the creator once", function()
        local key = nb.stampede(B)
        assert.are.equal("1", cli(main.port, "GET count:" .. key))
        assert.are.equal("0", cli(main.port, "EXISTS _lock" .. key))
        assert.are.equal("0", (cli(main.port, "PUBSUB NUMSUB _lock" .. key):match("(%d+)%s*$")))
    end)

    it("waiters in nginx share one subscription per worker and are woken by the release's PUBLISH, not a poll, reading the value it carries without a GET", function()
        -- lock_sleep 2: a waiter that only polled (1 ms doubling to 2 s)
        -- would look at 0.511 s and then at 1.023 s; the holder, a plain
        -- process, releases at about 0.6 s.
        local key = fresh("woken")
        -- Every command the server runs, to see what the woken waiters send.
        local mon = TMP .. "/monitor.txt"
        local mon_pid = sh(("redis-cli -p %d MONITOR > %s 2>&1 & echo $!")
                           :format(main.port, mon)):match("%d+")
        wait_for("MONITOR", function() return (read(mon) or ""):match("^OK") ~= nil end, 5)
        nb.plain_holds(B, key)
        assert.are.equal("1", cli(main.port, "EXISTS _lock" .. key), read(TMP .. "/holder.out"))
        local slowest, out = nb.requests(B, "/get_or_create?region=slowpoll&key=" .. key, 40)
        -- While they wait: one subscriber per worker at most.
        local most = 0
        wait_for("a subscriber", function()
            local subs = tonumber((cli(main.port, "PUBSUB NUMSUB _lock" .. key)
                                   :match("(%d+)%s*$")))
            most = math.max(most, subs)
            return subs >= 1 or (read(out) or "") ~= ""
        end, 2)
        assert.is_true(most >= 1 and most <= 2, "subscribers: " .. most)
        local max = slowest()
        sh("kill " .. mon_pid)
        -- Started 0.1 s into the 0.6 s hold: done at ~0.5 s, well before 0.9 s.
        assert.is_true(max < 0.85, "slowest waiter: " .. max .. " s")
        for i = 1, 40 do
            assert.are.equal("from the holder", value_of(read(TMP .. "/w" .. i) or ""))
        end
        -- The release published the value ("=" and its bytes); after it no
        -- GET of the key: each woken waiter read the value it carried.
        local text = read(mon) or ""
        local at = text:find('"publish" "_lock' .. key .. '" "=', 1, true)
        assert.is_not_nil(at, "the release's PUBLISH, carrying the value:\n" .. text)
        local _, before = text:sub(1, at):gsub('%] "GET" "' .. key:gsub("%p", "%%%0") .. '"', "")
        local _, after = text:sub(at):gsub('%] "GET" "' .. key:gsub("%p", "%%%0") .. '"', "")
        assert.is_true(before >= 1, "the waiters' first GETs (misses)")
        assert.are.equal(0, after, text:sub(at))
        assert.are.equal("from the holder", value_of(get("/get?key=" .. key)))
        assert.are.equal("0", (cli(main.port, "PUBSUB NUMSUB _lock" .. key):match("(%d+)%s*$")))
    end)

    it("nginx holding the lock excludes plain processes, and its release PUBLISHes for their waits", function()
        local key = fresh("nginx-holds")
        local sub = TMP .. "/sub.txt"
        os.execute(("timeout 10 redis-cli -p %d SUBSCRIBE _lock%s > %s 2>&1 &")
                   :format(main.port, key, sub))
        nb.nginx_holds(B, key)
        assert.are.equal("1", cli(main.port, "GET count:" .. key))
        -- The release published on the lock key's channel, as the C backend's does.
        wait_for("the release's message", function()
            return (read(sub) or ""):find("message\n_lock" .. key, 1, true) ~= nil
        end, 2, function() return read(sub) end)
    end)

    it("while Redis is SIGSTOPped: other locations answer in under 10 ms, cache requests fail within socket_timeout", function()
        nb.not_blocked(B)
    end)

    it("a restarted server is used again without reloading nginx; errors name backend, operation and key", function()
        for _ = 1, 4 do -- pooled connections in both workers
            assert.are.equal(200, select(2, get("/set?region=paused&key=r&value=before")))
        end
        stop_server(paused)
        local body, status, t = get("/get?region=paused&key=r")
        assert.are.equal(500, status)
        assert.matches("dogpile.cache.redis: get 'r' failed: ", body, 1, true)
        assert.matches("127.0.0.1:" .. paused.port, body, 1, true)
        assert.is_true(t < 0.5, body)
        body = get("/set?region=paused&key=r&value=x")
        assert.matches("dogpile.cache.redis: set 'r' failed: ", body, 1, true)
        local restarted = start_server(nil, paused.port)
        paused.pid, restarted.pid = restarted.pid, nil -- stopped once, as `paused`
        for _ = 1, 10 do
            body, status = get("/set?region=paused&key=r&value=after")
            assert.are.equal(200, status, body .. "\n" .. nginx:log())
            assert.are.equal("after", value_of(get("/get?region=paused&key=r")))
        end
    end)

    it("follows a Sentinel failover while serving", function()
        local body, status = get("/set?region=sentinel&key=before&value=first")
        assert.are.equal(200, status, body)
        assert.are.equal("first", value_of(get("/get?region=sentinel&key=before")))
        assert.are.equal("first", regions.sentinel:get("before"),
                         tostring(regions.sentinel.actual_backend:get("before")))
        wait_for("replication of the key", function()
            return cli(replica.port, "EXISTS before") == "1"
        end, 5)
        stop_server(master)
        -- nginx is not reloaded: requests fail (promptly) until the sentinel
        -- has promoted the replica, then work on the new master.
        local t0 = now()
        while true do
            local b, st, t = get("/set?region=sentinel&key=after&value=second")
            assert.is_true(t < 2, "a request took " .. t .. " s during the failover")
            if st == 200 then
                break
            end
            assert.matches("dogpile.cache.redis_sentinel: set 'after' failed: ", b, 1, true)
            assert(now() - t0 < 30, "no failover within 30 s: " .. b)
            sleep(0.1)
        end
        assert.matches(tostring(replica.port),
                       cli(sentinel.port, "SENTINEL get-master-addr-by-name dpn"))
        for _ = 1, 10 do -- both workers
            assert.are.equal("first", value_of(get("/get?region=sentinel&key=before")))
            assert.are.equal("second", value_of(get("/get?region=sentinel&key=after")))
        end
        assert.are.equal("1", cli(replica.port, "EXISTS after"))
        local key = fresh("sentinel-goc")
        assert.are.equal(key .. "#1@nginx", value_of(get("/get_or_create?region=sentinel&key="
                                                          .. key)))
    end)

    it("phases that cannot yield never block: get is a miss, writes go to a timer, the creator runs without the lock", function()
        nb.phases(B)
    end)
end)
