-- dogpile.cache.redis and dogpile.cache.redis_sentinel against real
-- redis-server processes on loopback: region methods, multi forms as one
-- command each, the distributed lock (8-process stampede, SIGKILLed holder,
-- creation outliving lock_timeout), failures (server down, paused, restarted),
-- AUTH (password and ACL user), unix socket, and a sentinel failover.
-- The main server comes from the test command (DP_TEST_REDIS_PORT); specs
-- that kill, pause or reconfigure a server start their own.
local cache = require "dogpile.cache"
local support = require "support"
local now, sleep, sh, write, read, count_lines = support.now, support.sleep, support.sh, support.write, support.read, support.count_lines
local ffi = require "ffi"

local NO_VALUE = cache.NO_VALUE

pcall(ffi.cdef, [[ int usleep(unsigned int usec); ]])







local TMP = (sh("mktemp -d /tmp/dogpile-redis-XXXXXX"):gsub("%s+$", ""))

local free_port = support.free_port

local servers = {}

-- Start a redis-server of our own; returns {port, dir, pid, unix}. A port
-- of our choosing taken meanwhile (helpers and specs run side by side) is
-- chosen again.
local function start_server(extra, port, tries)
    local chosen = port == nil
    port = port or free_port()
    local dir = TMP .. "/srv" .. port
    os.execute("mkdir -p " .. dir)
    local conf = dir .. "/redis.conf"
    write(conf, table.concat({
        "port " .. port, "bind 127.0.0.1", 'save ""', "appendonly no",
        "dir " .. dir, "daemonize yes", "pidfile " .. dir .. "/redis.pid",
        "logfile " .. dir .. "/redis.log", "unixsocket " .. dir .. "/redis.sock",
        "unixsocketperm 700", extra or "" }, "\n") .. "\n")
    -- A server restarted in the same folder: the killed one's pidfile is
    -- still there, and its pid must not be taken for the new server's.
    os.remove(dir .. "/redis.pid")
    local out = sh("redis-server " .. conf)
    local srv = { port = port, dir = dir, unix = dir .. "/redis.sock", conf = conf }
    local t0 = now()
    while true do
        srv.pid = (read(dir .. "/redis.pid") or ""):match("%d+")
        if srv.pid and (sh("redis-cli -p " .. port .. " --no-auth-warning ping"):match("PONG")
                        or sh("redis-cli -p " .. port .. " ping"):match("NOAUTH")) then
            break
        end
        local log = read(dir .. "/redis.log") or ""
        if chosen and (tries or 0) < 5 and log:match("Address already in use") then
            os.remove(dir .. "/redis.log")
            return start_server(extra, nil, (tries or 0) + 1)
        end
        assert(now() - t0 < 10, "redis-server did not start: " .. out .. log)
        sleep(0.02)
    end
    servers[#servers + 1] = srv
    return srv
end

-- A sentinel watching `master_port` as "dp" (quorum 1, quick failover).
local function start_sentinel(master_port)
    local port = free_port()
    local dir = TMP .. "/sentinel" .. port
    os.execute("mkdir -p " .. dir)
    local conf = dir .. "/sentinel.conf"
    write(conf, table.concat({
        "port " .. port, "bind 127.0.0.1", "dir " .. dir, "daemonize yes",
        "pidfile " .. dir .. "/sentinel.pid", "logfile " .. dir .. "/sentinel.log",
        "sentinel monitor dp 127.0.0.1 " .. master_port .. " 1",
        "sentinel down-after-milliseconds dp 500",
        "sentinel failover-timeout dp 3000",
        "sentinel parallel-syncs dp 1" }, "\n") .. "\n")
    sh("redis-server " .. conf .. " --sentinel")
    local srv = { port = port, dir = dir }
    local t0 = now()
    while true do
        srv.pid = (read(dir .. "/sentinel.pid") or ""):match("%d+")
        if srv.pid and sh("redis-cli -p " .. port .. " ping"):match("PONG") then
            break
        end
        assert(now() - t0 < 10, "the sentinel did not start: " .. (read(dir .. "/sentinel.log") or ""))
        sleep(0.02)
    end
    servers[#servers + 1] = srv
    return srv
end

local function stop_server(srv)
    if srv.pid then
        sh("kill -CONT " .. srv.pid .. "; kill -9 " .. srv.pid)
        -- kill returns before the process is gone: on a loaded machine it
        -- could still answer one more request. Wait until it no longer exists.
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

local MAIN_PORT = tonumber(os.getenv("DP_TEST_REDIS_PORT"))

local function main_port()
    if not MAIN_PORT then
        MAIN_PORT = start_server().port
    end
    return MAIN_PORT
end

local function region(arguments, conf)
    conf = conf or {}
    arguments = arguments or {}
    if arguments.port == nil and arguments.url == nil then
        arguments.port = main_port()
    end
    conf.arguments = arguments
    return cache.make_region():configure("dogpile.cache.redis", conf)
end

local uniq = 0
local function fresh(prefix)
    uniq = uniq + 1
    return string.format("%s:%d:%d:%d", prefix, os.time(), math.random(1e9), uniq)
end

-- A child script: opens region `r` with the arguments in arg[1] (a Lua
-- table constructor), then runs `body`.
local PRELUDE = [[
local cache = require "dogpile.cache"
local ffi = require "ffi"
pcall(ffi.cdef, "int usleep(unsigned int usec);")
local function sleep(s) ffi.C.usleep(math.floor(math.max(s, 0) * 1e6)) end
local function now() return require("dogpile").now() end
local args = assert(loadstring("return " .. arg[1]))()
local r = cache.make_region():configure("dogpile.cache.redis", { arguments = args })
local function append(file, line)
    local f = assert(io.open(file, "a"))
    f:write(line, "\n")
    f:close()
end
]]

local function script(name, body)
    local path = TMP .. "/" .. name .. ".lua"
    write(path, PRELUDE .. body)
    return path
end

describe("dogpile.cache.redis", function()
    support.no_leaks()

    teardown(function()
        for _, srv in ipairs(servers) do
            stop_server(srv)
        end
        os.execute("rm -rf '" .. TMP .. "'")
    end)

    describe("region methods", function()
        it("get, set, delete, metadata and values of every kind", function()
            local r = region()
            local k = fresh("basic")
            assert.are.equal(NO_VALUE, r:get(k))
            r:set(k, { a = 1, nested = { "x", true }, f = 1.5 })
            assert.are.same({ a = 1, nested = { "x", true }, f = 1.5 }, r:get(k))
            r:set(k .. "nil", nil)
            assert.is_nil(r:get(k .. "nil"))
            r:set(k .. "false", false)
            assert.is_false(r:get(k .. "false"))
            local md = r:get_value_metadata(k)
            assert.is_true(math.abs(md.metadata.ct - now()) < 5)
            r:delete(k)
            assert.are.equal(NO_VALUE, r:get(k))
            assert.is_nil(r:get_value_metadata(k))
            -- binary keys and values
            local bk = k .. "\0\255 key"
            r:set(bk, "\0\1\2 value \255")
            assert.are.equal("\0\1\2 value \255", r:get(bk))
            r:delete(bk)
        end)

        it("get_or_create, expiration, invalidation and stats", function()
            local r = region({}, { expiration_time = 0.3 })
            local k = fresh("goc")
            local calls = 0
            local function creator()
                calls = calls + 1
                return "v" .. calls
            end
            assert.are.equal("v1", r:get_or_create(k, creator))
            assert.are.equal("v1", r:get_or_create(k, creator))
            assert.are.equal(1, calls)
            sleep(0.35)
            assert.are.equal("v2", r:get_or_create(k, creator))
            r:invalidate()
            assert.are.equal("v3", r:get_or_create(k, creator))
            local st = r:stats()
            assert.are.equal(3, st.creations)
            assert.is_true(st.hits >= 1)
            assert.are.equal(0, st.errors)
        end)

        it("multi forms: get_multi is one MGET, set_multi one pipeline of SETs, delete_multi one DEL", function()
            local r = region()
            local p = main_port()
            local k = fresh("multi")
            local keys, mapping = {}, {}
            for i = 1, 20 do
                keys[i] = k .. i
                if i % 2 == 0 then
                    mapping[keys[i]] = { i = i }
                end
            end
            cli(p, "CONFIG RESETSTAT")
            r:set_multi(mapping)
            local vals = r:get_multi(keys)
            assert.are.equal(20, #vals)
            for i = 1, 20 do
                if i % 2 == 0 then
                    assert.are.same({ i = i }, vals[i])
                else
                    assert.are.equal(NO_VALUE, vals[i])
                end
            end
            r:delete_multi(keys)
            local stats = cli(p, "INFO commandstats")
            assert.matches("cmdstat_mget:calls=1,", stats)
            assert.matches("cmdstat_set:calls=10,", stats)
            assert.matches("cmdstat_del:calls=1,", stats)
            assert.is_nil(stats:match("cmdstat_get:"))
            assert.are.same({ NO_VALUE, NO_VALUE }, r:get_multi({ keys[2], keys[4] }))
            -- get_or_create_multi creates only the missing keys, once each
            r:set(keys[1], "one")
            local got = r:get_or_create_multi({ keys[1], keys[2], keys[2], keys[3] }, function(...)
                local out = {}
                for i, key in ipairs({ ... }) do
                    out[i] = "made " .. key
                end
                assert.are.same({ keys[2], keys[3] }, { ... })
                return out
            end)
            assert.are.same({ "one", "made " .. keys[2], "made " .. keys[2], "made " .. keys[3] }, got)
            r:delete_multi({ keys[1], keys[2], keys[3] })
        end)

        it("decorators", function()
            local r = region()
            local ns = fresh("deco")
            local calls = 0
            local f = r:cache_on_arguments({ namespace = ns })(function(a, b)
                calls = calls + 1
                return a + b
            end)
            assert.are.equal(3, f(1, 2))
            assert.are.equal(3, f(1, 2))
            assert.are.equal(1, calls)
            f:invalidate(1, 2)
            assert.are.equal(3, f(1, 2))
            assert.are.equal(2, calls)
            f:invalidate(1, 2)
        end)

        it("redis_expiration_time makes Redis drop old entries itself", function()
            local r = region({ redis_expiration_time = 5 })
            local k = fresh("ttl")
            r:set(k, "x")
            local pttl = tonumber(cli(main_port(), "PTTL '" .. k .. "'"))
            assert.is_true(pttl > 4000 and pttl <= 5000, "PTTL " .. pttl)
            r:set_multi({ [k .. "m"] = "y" })
            pttl = tonumber(cli(main_port(), "PTTL '" .. k .. "m'"))
            assert.is_true(pttl > 4000 and pttl <= 5000, "PTTL " .. pttl)
            -- without it, entries have no TTL
            region():set(k, "x")
            assert.are.equal("-1", cli(main_port(), "PTTL '" .. k .. "'"))
            r:delete_multi({ k, k .. "m" })
        end)

        it("url, host/port and db select the server and database", function()
            local k = fresh("db")
            local r3 = region({ url = "redis://127.0.0.1:" .. main_port() .. "/3" })
            r3:set(k, "in db 3")
            assert.are.equal(NO_VALUE, region():get(k))
            assert.are.equal("in db 3", region({ db = 3 }):get(k))
            assert.are.equal("1", cli(main_port(), "-n 3 EXISTS '" .. k .. "'"))
            r3:delete(k)
        end)

        it("refuses bad arguments with clear errors", function()
            local function conf(args)
                return select(2, pcall(region, args))
            end
            assert.matches("dogpile.cache.redis: unknown argument 'prot'", conf({ prot = 1 }))
            assert.matches("lock_timeout must be a positive, finite", conf({ lock_timeout = 0 }))
            assert.matches("socket_timeout must be a positive number",
                           conf({ socket_timeout = "x" }))
            assert.matches("url 'http://x' must start with redis:// or unix://",
                           conf({ url = "http://x" }))
            assert.matches("distributed_lock must be a boolean", conf({ distributed_lock = 1 }))
            -- one place, one format (backends/redis.c's table)
            assert.matches("dogpile.cache.redis: port must be an integer from 1 to 65535, got "
                           .. "70000", conf({ port = 70000 }), 1, true)
            assert.matches("dogpile.cache.redis: url: port '70000' is out of range (1 to 65535)",
                           conf({ url = "redis://127.0.0.1:70000/0" }), 1, true)
            assert.matches("lock_timeout must be a positive, finite number of seconds (the "
                           .. "lock's expiry in Redis), got math.huge",
                           conf({ lock_timeout = math.huge }), 1, true)
            assert.matches("db must be a non-negative integer, got -1", conf({ db = -1 }), 1, true)
            assert.matches("notify_channel must be a non-empty string, got string \"\"",
                           conf({ notify_channel = "" }), 1, true)
            assert.matches("notify_feed needs notify_channel", conf({ notify_feed = "f" }), 1, true)
            -- nginx's pool settings: checked here too, accepted and unused
            assert.matches("pool_size must be a positive integer, got 0", conf({ pool_size = 0 }),
                           1, true)
            assert.matches("pool_idle_timeout must be a positive number of seconds",
                           conf({ pool_idle_timeout = -1 }), 1, true)
            local r = region({ pool_size = 5, pool_idle_timeout = 10 })
            r:set("pooled", 1)
            assert.are.equal(1, r:get("pooled"))
            r:delete("pooled")
        end)

        it("regions alike share an instance; other settings on one server, db and lock prefix "
           .. "share its lock domain, not its instance", function()
            local k = fresh("instances")
            local a, b = region({ socket_timeout = 0.5 }), region({ socket_timeout = 0.5 })
            local c = region({ socket_timeout = 0.7 })
            local u = region({ url = "redis://127.0.0.1:" .. main_port() .. "/0" })
            local A, B, Cb = a.actual_backend, b.actual_backend, c.actual_backend
            a:set(k, "v")
            local hits_a, hits_c = A:stats().hits, Cb:stats().hits
            assert.are.equal("v", b:get(k))
            assert.are.equal(hits_a + 1, A:stats().hits, "b reads through a's instance")
            assert.are.equal("v", c:get(k))
            assert.are.equal(hits_a + 1, A:stats().hits, "c has an instance of its own")
            assert.are.equal(hits_c + 1, Cb:stats().hits)
            -- one lock domain per server, db and lock prefix, however it was named
            assert.are.equal(A.lock_domain, B.lock_domain)
            assert.are.equal(A.lock_domain, Cb.lock_domain)
            assert.are.equal(A.lock_domain, u.actual_backend.lock_domain)
            assert.are_not.equal(A.lock_domain, region({ db = 2 }).actual_backend.lock_domain)
            assert.are_not.equal(A.lock_domain,
                                 region({ lock_prefix = "_l2" }).actual_backend.lock_domain)
            -- so the core's lock orders regions whose instances differ
            local m = a.backend:get_mutex(k)
            assert.is_true(m:acquire(false))
            assert.is_false(c.backend:get_mutex(k):acquire(false))
            m:release()
            local mc = c.backend:get_mutex(k)
            assert.is_true(mc:acquire(false))
            mc:release()
            a:delete(k)
        end)
    end)

    describe("the distributed lock", function()
        it("SET NX PX with a token; try-acquire is refused while held; any coroutine may release", function()
            local r = region({ lock_timeout = 7 })
            local k = fresh("lock")
            local m1, m2 = r:_mutex(k), r:_mutex(k)
            assert.is_true(m1:acquire(false))
            assert.is_false(m2:acquire(false))
            local token = cli(main_port(), "GET '_lock" .. k .. "'")
            assert.matches("^%x+$", token)
            assert.are.equal(32, #token)
            local pttl = tonumber(cli(main_port(), "PTTL '_lock" .. k .. "'"))
            assert.is_true(pttl > 6000 and pttl <= 7000, "PTTL " .. pttl)
            -- another process cannot take it either
            local other = script("try", [[io.write(tostring(r:_mutex(arg[2]):acquire(false)))]])
            assert.are.equal("false", sh(string.format("luajit %s '{port = %d}' '%s'", other,
                                                       main_port(), k)))
            -- released from another coroutine than the one that took it
            local co = coroutine.wrap(function() m1:release() end)
            co()
            assert.are.equal("0", cli(main_port(), "EXISTS '_lock" .. k .. "'"))
            assert.is_true(m2:acquire(false))
            m2:release()
        end)

        it("a creator outliving lock_timeout: the value is returned, the overrun counted and logged, the new holder's lock kept", function()
            local r = region({ lock_timeout = 0.3 })
            local k = fresh("overrun")
            local logged = {}
            local region_mod = require "dogpile.cache.region"
            local saved = region_mod.log
            region_mod.log = function(msg) logged[#logged + 1] = msg end
            local ok, v = pcall(r.get_or_create, r, k, function()
                sleep(0.5) -- the lock expired in Redis meanwhile
                -- someone else takes it now
                assert.are.equal("OK", cli(main_port(), "SET '_lock" .. k .. "' theirs PX 5000"))
                return "made anyway"
            end)
            region_mod.log = saved
            assert.is_true(ok, v)
            assert.are.equal("made anyway", v)
            assert.are.equal("made anyway", r:get(k))
            assert.are.equal("theirs", cli(main_port(), "GET '_lock" .. k .. "'"))
            assert.are.equal(1, r.actual_backend:stats().lock_overruns)
            assert.are.equal(1, r:stats().lock_overruns)
            assert.are.equal(1, #logged)
            assert.matches("longer than lock_timeout", logged[1])
            cli(main_port(), "DEL '_lock" .. k .. "'")
            r:delete(k)
        end)

        it("a lock lost before lock_timeout: the value is returned, the loss counted and logged "
           .. "with Redis's reason, the new holder's lock kept", function()
            local r = region({ lock_timeout = 5 })
            local k = fresh("lost")
            local logged = {}
            local region_mod = require "dogpile.cache.region"
            local saved = region_mod.log
            region_mod.log = function(msg) logged[#logged + 1] = msg end
            local ok, v = pcall(r.get_or_create, r, k, function()
                -- someone else's lock now (a flush, a failover)
                assert.are.equal("OK", cli(main_port(), "SET '_lock" .. k .. "' theirs PX 5000"))
                return "made"
            end)
            region_mod.log = saved
            assert.is_true(ok, v)
            assert.are.equal("made", v)
            assert.are.equal("theirs", cli(main_port(), "GET '_lock" .. k .. "'"))
            assert.are.equal(1, r.actual_backend:stats().lock_overruns)
            assert.are.equal(1, #logged)
            assert.matches("dogpile.cache.redis: the lock for key '" .. k .. "' was no longer held "
                           .. "when released after ", logged[1], 1, true)
            assert.matches("(the lock had expired (lock_timeout 5 s) and was no longer ours): "
                           .. "another caller may have created the value too", logged[1], 1, true)
            cli(main_port(), "DEL '_lock" .. k .. "'")
            r:delete(k)
        end)

        it("the holder's store of the key releases the lock in the same round trip; the release "
           .. "then only reports", function()
            local r = region({ lock_timeout = 7 })
            local k, other = fresh("setrel"), fresh("setrel_other")
            local m = r:_mutex(k)
            assert.is_true(m:acquire(false))
            r:set(other, "another key") -- not the locked one: the lock stays
            assert.are.equal("1", cli(main_port(), "EXISTS '_lock" .. k .. "'"))
            r:set(k, "v1")
            assert.are.equal("0", cli(main_port(), "EXISTS '_lock" .. k .. "'"))
            assert.are.equal("v1", r:get(k))
            -- another process may take the lock now, before release()
            local other_proc = script("try_setrel", [[
local m = r:_mutex(arg[2])
io.write(tostring(m:acquire(false)))
m:release()]])
            assert.are.equal("true", sh(string.format("luajit %s '{port = %d}' '%s'", other_proc,
                                                      main_port(), k)))
            r:set(k, "v2") -- a plain SET: the lock is no longer this holder's to release
            assert.are.equal("v2", r:get(k))
            assert.are.equal(0, r.actual_backend:stats().lock_overruns or 0)
            m:release()
            assert.are.equal(0, r.actual_backend:stats().lock_overruns or 0)
            -- taken and released again as ever
            assert.is_true(m:acquire(false))
            m:release()
            assert.are.equal("0", cli(main_port(), "EXISTS '_lock" .. k .. "'"))
            r:delete(k)
            r:delete(other)
        end)

        it("a server without the release script (SCRIPT FLUSH) is sent it once, by the store "
           .. "and by a release alone", function()
            local r = region({ lock_timeout = 7 })
            local k = fresh("noscript")
            assert.are.equal("OK", cli(main_port(), "SCRIPT FLUSH"))
            assert.are.equal("made", r:get_or_create(k, function() return "made" end))
            assert.are.equal("0", cli(main_port(), "EXISTS '_lock" .. k .. "'"))
            assert.are.equal("made", r:get(k))
            assert.are.equal("OK", cli(main_port(), "SCRIPT FLUSH"))
            local m = r:_mutex(k)
            assert.is_true(m:acquire(false))
            m:release()
            assert.are.equal("0", cli(main_port(), "EXISTS '_lock" .. k .. "'"))
            assert.are.equal(0, r.actual_backend:stats().lock_overruns or 0)
            r:delete(k)
        end)

        it("distributed_lock = false uses only this process's lock, never Redis", function()
            local r = region({ distributed_lock = false })
            local k = fresh("nolock")
            assert.are.equal("v", r:get_or_create(k, function()
                assert.are.equal("0", cli(main_port(), "EXISTS '_lock" .. k .. "'"))
                -- the threads and Lua states of this process still wait
                assert.is_false(region({ distributed_lock = false }).backend:get_mutex(k)
                                :acquire(false))
                return "v"
            end))
            r:delete(k)
        end)

        it("8 processes asking for one missing key run the creator once", function()
            local k = fresh("stampede")
            local counter = TMP .. "/creations-" .. uniq
            local f = script("stampede", [[
local key, counter, start = arg[2], arg[3], tonumber(arg[4])
while now() < start do sleep(0.001) end
local t0 = now()
local v = r:get_or_create(key, function()
    append(counter, "x")
    sleep(0.2)
    return "created"
end)
io.write(v, " ", string.format("%.3f", now() - t0), "\n")
]])
            local start = now() + 0.6
            local cmd = {}
            for i = 1, 8 do
                cmd[i] = string.format("luajit %s '{port = %d}' '%s' '%s' '%.3f' > %s/out%d &",
                                       f, main_port(), k, counter, start, TMP, i)
            end
            sh(table.concat(cmd, " ") .. " wait")
            assert.are.equal(1, count_lines(counter))
            for i = 1, 8 do
                local out = read(TMP .. "/out" .. i)
                assert.matches("^created ", out)
                assert.is_true(tonumber(out:match(" ([%d.]+)")) < 2, out)
            end
            region():delete(k)
        end)

        -- Counts, in the file arg[5], this process's waits to take the lock
        -- (acquire(true)): a waiter that reads the value when the holder
        -- releases (wait_unlocked) never takes the lock.
        local COUNT_BLOCKING = [[
local mt = getmetatable(r.backend:get_mutex("probe"))
assert(mt.wait_unlocked, "the redis mutex has no wait_unlocked")
local acquire = mt.acquire
mt.acquire = function(self, wait)
    if wait ~= false then
        append(arg[5], "x")
    end
    return acquire(self, wait)
end
]]

        it("8 processes on a missing key: the 7 waiters read the value when the holder "
           .. "releases, none takes the lock", function()
            local k = fresh("together")
            local counter, blocking = TMP .. "/creations-" .. uniq, TMP .. "/blocking-" .. uniq
            local f = script("together", COUNT_BLOCKING .. [[
local key, counter, start = arg[2], arg[3], tonumber(arg[4])
while now() < start do sleep(0.001) end
local v = r:get_or_create(key, function()
    append(counter, "x")
    sleep(0.3)
    return "created"
end)
io.write(v, "\n")
]])
            local start = now() + 0.6
            local cmd = {}
            for i = 1, 8 do
                cmd[i] = string.format("luajit %s '{port = %d, lock_timeout = 10}' '%s' '%s' "
                                       .. "'%.3f' '%s' > %s/tout%d 2>&1 &", f, main_port(), k,
                                       counter, start, blocking, TMP, i)
            end
            sh(table.concat(cmd, " ") .. " wait")
            assert.are.equal(1, count_lines(counter))
            for i = 1, 8 do
                assert.are.equal("created\n", read(TMP .. "/tout" .. i))
            end
            assert.are.equal(0, count_lines(blocking), "waiters took the lock to read the value")
            assert.are.equal("0", (cli(main_port(), "pubsub numsub _lock" .. k):match("(%d+)%s*$")))
            region():delete(k)
        end)

        it("waiters take the value from the release's message: no GET of their own after it",
           function()
            local k = fresh("carried")
            local counter = TMP .. "/ccreations-" .. uniq
            local mon = TMP .. "/monitor-" .. uniq
            local f = script("carried", [[
local key, counter, start = arg[2], arg[3], tonumber(arg[4])
while now() < start do sleep(0.001) end
local v = r:get_or_create(key, function()
    append(counter, "x")
    sleep(0.3)
    return "carried value"
end)
io.write(v, "\n")
]])
            -- Without the sanitizer preload of the ASan run, and stopped by its
            -- pid (a pkill -f also matches the shell that runs it).
            local mon_pid = sh(string.format("env -u LD_PRELOAD bash -c 'timeout 30 redis-cli -p %d "
                                             .. "monitor > %s 2>&1 & echo $!'", main_port(), mon))
                :match("%d+")
            sleep(0.2)
            local start = now() + 0.6
            local cmd = {}
            for i = 1, 5 do
                cmd[i] = string.format("luajit %s '{port = %d, lock_timeout = 10}' '%s' '%s' "
                                       .. "'%.3f' > %s/cout%d 2>&1 &", f, main_port(), k,
                                       counter, start, TMP, i)
            end
            sh(table.concat(cmd, " ") .. " wait")
            sleep(0.2)
            sh("kill " .. mon_pid .. " 2>/dev/null")
            assert.are.equal(1, count_lines(counter))
            for i = 1, 5 do
                assert.are.equal("carried value\n", read(TMP .. "/cout" .. i))
            end
            local published, gets_after = false, 0
            for line in read(mon):gmatch("[^\n]+") do
                if line:find('"publish" "_lock' .. k .. '" "=', 1, true) then
                    published = true
                elseif published and not line:find("[0 lua]", 1, true)
                    and line:find('"GET" "' .. k .. '"', 1, true) then
                    gets_after = gets_after + 1
                end
            end
            assert.is_true(published, "the release published no value:\n" .. read(mon))
            assert.are.equal(0, gets_after, "waiters read the value again after the release")
            region():delete(k)
        end)

        it("a holder whose creator fails: exactly one waiter creates after the release",
           function()
            local k = fresh("fails")
            local args = string.format("{port = %d, lock_timeout = 10}", main_port())
            local started, counter = TMP .. "/fstarted-" .. uniq, TMP .. "/fcreations-" .. uniq
            local holder = script("failing", [[
r:get_or_create(arg[2], function()
    append(arg[3], "started")
    sleep(0.3)
    error("the holder's creator failed")
end)
]])
            sh(string.format("luajit %s '%s' '%s' '%s' >/dev/null 2>&1 &", holder, args, k,
                             started))
            local t0 = now()
            while count_lines(started) == 0 do
                assert.is_true(now() - t0 < 10, "the holder never started")
                sleep(0.005)
            end
            local waiter = script("fwaiter", [[
local v = r:get_or_create(arg[2], function()
    append(arg[3], "x")
    sleep(0.1)
    return "from a waiter"
end)
io.write(v, "\n")
]])
            local cmd = {}
            for i = 1, 4 do
                cmd[i] = string.format("luajit %s '%s' '%s' '%s' > %s/fout%d 2>&1 &", waiter,
                                       args, k, counter, TMP, i)
            end
            sh(table.concat(cmd, " ") .. " wait")
            assert.are.equal(1, count_lines(counter), "waiters that created")
            for i = 1, 4 do
                assert.are.equal("from a waiter\n", read(TMP .. "/fout" .. i))
            end
            region():delete(k)
        end)

        it("a holder killed with SIGKILL delays the others by no more than lock_timeout", function()
            local k = fresh("killed")
            local args = string.format("{port = %d, lock_timeout = 1}", main_port())
            local started = TMP .. "/started-" .. uniq
            local holder = script("holder", [[
r:get_or_create(arg[2], function()
    append(arg[3], "started")
    sleep(30)
    return "from the holder"
end)
]])
            local pid = sh(string.format("luajit %s '%s' '%s' '%s' >/dev/null 2>&1 & echo $!",
                                         holder, args, k, started)):match("%d+")
            local t0 = now()
            while count_lines(started) == 0 do
                assert.is_true(now() - t0 < 10, "the holder never started")
                sleep(0.005)
            end
            local taken_at = now()
            sh("kill -9 " .. pid)
            local waiter = script("waiter", [[
local t0 = now()
local v = r:get_or_create(arg[2], function() return "from the waiter" end)
io.write(v, " ", string.format("%.3f", now() - t0), "\n")
]])
            local out = sh(string.format("luajit %s '%s' '%s'", waiter, args, k))
            local done_at = now()
            assert.matches("^from the waiter ", out)
            assert.is_true(done_at - taken_at < 1.0 + 0.5,
                           "waited " .. (done_at - taken_at) .. " s after the lock was taken")
            assert.are.equal("from the waiter", region():get(k))
            region():delete(k)
        end)

        it("a waiter in another process is woken by the release (PUBLISH), not by polling, and "
           .. "unsubscribes at its next operation", function()
            local k = fresh("wake")
            local args = string.format("{port = %d, lock_sleep = 2}", main_port())
            local started, released = TMP .. "/wstarted-" .. uniq, TMP .. "/wreleased-" .. uniq
            local holder = script("wake_holder", [[
r:get_or_create(arg[2], function()
    append(arg[3], "started")
    sleep(0.3)
    return "from the holder"
end)
append(arg[4], string.format("%.6f", now()))
]])
            sh(string.format("luajit %s '%s' '%s' '%s' '%s' >/dev/null 2>&1 &", holder, args, k,
                             started, released))
            local t0 = now()
            while count_lines(started) == 0 do
                assert.is_true(now() - t0 < 10, "the holder never started")
                sleep(0.002)
            end
            -- With lock_sleep = 2 and no wake-up, the retries after 1, 2, 4 ...
            -- 256 ms would see the release (at ~0.3 s) only at ~0.51 s.
            local r = region({ lock_sleep = 2 })
            local v = r:get_or_create(k, function() return "from the waiter" end)
            local got_at = now()
            assert.are.equal("from the holder", v)
            while count_lines(released) == 0 do
                assert.is_true(now() - t0 < 10, "the holder never finished")
                sleep(0.002)
            end
            local rel = tonumber((read(released):match("[%d.]+")))
            assert.is_true(got_at - rel < 0.15, "got the value " .. (got_at - rel) .. " s after the release")
            -- The UNSUBSCRIBE waits for the next operation, not to delay the other waiters.
            assert.are.equal("from the holder", r:get(k))
            local subs
            t0 = now()
            repeat
                subs = cli(main_port(), "pubsub numsub _lock" .. k):match("(%d+)%s*$")
            until subs == "0" or now() - t0 > 2
            assert.are.equal("0", subs)
            region():delete(k)
        end)
        it("a waiter's connection, left subscribed after its wake-up, serves the next wait at once "
           .. "(its UNSUBSCRIBE sent then)", function()
            local k1, k2 = fresh("rewait1"), fresh("rewait2")
            local started = TMP .. "/rwstarted-" .. uniq
            local released = TMP .. "/rwreleased-" .. uniq
            -- k2 is released 1.3 s after k1: a second wait that only polled
            -- (dp_backoff from 1 ms, lock_sleep 2) would see it ~0.3 s late.
            local holder = script("rewait_holder", [[
local m1, m2 = r:_mutex(arg[2]), r:_mutex(arg[3])
assert(m1:acquire(false) and m2:acquire(false))
append(arg[4], "started")
sleep(0.3)
m1:release()
sleep(1.3)
m2:release()
append(arg[5], string.format("%.6f", now()))
]])
            sh(string.format("luajit %s '{port = %d}' '%s' '%s' '%s' '%s' >/dev/null 2>&1 &",
                             holder, main_port(), k1, k2, started, released))
            local t0 = now()
            while count_lines(started) == 0 do
                assert.is_true(now() - t0 < 10, "the holder never started")
                sleep(0.002)
            end
            local r = region({ lock_sleep = 2 })
            -- no other operation between the two waits: the second takes the
            -- first one's connection with its UNSUBSCRIBE not even sent
            assert.is_true(r:_mutex(k1):wait_unlocked())
            assert.is_true(r:_mutex(k2):wait_unlocked())
            local got_at = now()
            assert.are.equal("0", cli(main_port(), "EXISTS '_lock" .. k2 .. "'"))
            while count_lines(released) == 0 do
                assert.is_true(now() - t0 < 10, "the holder never finished")
                sleep(0.002)
            end
            local rel = tonumber((read(released):match("[%d.]+")))
            assert.is_true(got_at - rel < 0.15 and got_at - rel > -0.1, "the second wait "
                           .. "returned " .. (got_at - rel) .. " s after the release")
            r:get(k1) -- the next operation unsubscribes
            local subs
            t0 = now()
            repeat
                subs = cli(main_port(), "pubsub numsub _lock" .. k1 .. " _lock" .. k2)
            until not subs:match("\n[1-9]") or now() - t0 > 2
            assert.is_nil(subs:match("\n[1-9]"), subs)
        end)
    end)

    describe("failures", function()
        it("a server that is down: a prompt error naming the backend, operation and key", function()
            local port = free_port()
            local r = region({ port = port, socket_timeout = 0.5 })
            local t0 = now()
            local ok, err = pcall(r.get, r, "somekey")
            assert.is_false(ok)
            assert.is_true(now() - t0 < 0.5)
            assert.matches("dogpile.cache.redis: get 'somekey' failed: cannot connect to 127.0.0.1:"
                           .. port, err, 1, true)
            ok, err = pcall(r.set, r, "k2", "v")
            assert.matches("dogpile.cache.redis: set 'k2' failed", err, 1, true)
            ok, err = pcall(r.get_or_create, r, "k3", function() return 1 end)
            assert.is_false(ok)
            assert.matches("dogpile.cache.redis", err, 1, true)
            assert.matches("k3", err, 1, true)
        end)

        it("fail_open: a server that is down is a miss and the creator's value is returned", function()
            local r = region({ port = free_port(), socket_timeout = 0.5 }, { fail_open = true })
            local saved = require("dogpile.cache.region").log
            require("dogpile.cache.region").log = function() end
            local calls = 0
            local v = r:get_or_create("k", function()
                calls = calls + 1
                return "made"
            end)
            assert.are.equal(NO_VALUE, r:get("k"))
            assert.are.same({ NO_VALUE }, r:get_multi({ "k" }))
            require("dogpile.cache.region").log = saved
            assert.are.equal("made", v)
            assert.are.equal(1, calls)
            assert.is_true(r:stats().errors >= 2)
        end)

        it("a lock wait whose SUBSCRIBE gets no answer fails within one socket_timeout", function()
            -- As a server stopped between the SET NX that found the lock held
            -- and the SUBSCRIBE: the call fails then, not after another
            -- socket_timeout on a fresh connection and the polls after it.
            local port, stop = support.half_answering_redis({ "SUBSCRIBE" })
            finally(stop)
            local r = region({ port = port, socket_timeout = 0.4, lock_timeout = 5 })
            local t0 = now()
            local ok, err = pcall(r.get_or_create, r, fresh("sub"), function() return "made" end)
            local took = now() - t0
            assert.is_false(ok, "the call went on without the lock")
            assert.matches("dogpile.cache.redis", tostring(err), 1, true)
            assert.matches("SUBSCRIBE (lock wait)", tostring(err), 1, true)
            assert.matches("socket_timeout", tostring(err), 1, true)
            assert.is_true(took >= 0.35 and took < 0.4 + 0.3, "took " .. took)
        end)

        it("a paused server (SIGSTOP): operations fail within socket_timeout, then work again", function()
            local srv = start_server()
            local r = region({ port = srv.port, socket_timeout = 0.4, lock_timeout = 2, circuit_cooldown = 0.1 })
            r:set("kept", "value")
            sh("kill -STOP " .. srv.pid)
            local t0 = now()
            local ok, err = pcall(r.get, r, "kept")
            local took = now() - t0
            assert.is_false(ok)
            assert.matches("dogpile.cache.redis: get 'kept' failed: ", err, 1, true)
            assert.matches("socket_timeout", err, 1, true)
            assert.is_true(took >= 0.35 and took < 0.4 + 0.3, "took " .. took)
            t0 = now()
            ok, err = pcall(r.set, r, "kept", "overwritten?")
            assert.is_false(ok)
            assert.is_true(now() - t0 < 0.7)
            sh("kill -CONT " .. srv.pid)
            sleep(0.1)
            -- Nothing stored was lost or corrupted: the paused SET ran when the
            -- server resumed (the request was sent), or not at all.
            local v = r:get("kept")
            assert.is_true(v == "value" or v == "overwritten?", tostring(v))
            stop_server(srv)
        end)

        it("reconnects by itself after the server restarts", function()
            local srv = start_server()
            local r = region({ port = srv.port, socket_timeout = 0.5 })
            -- several pooled connections, from several coroutines' calls
            r:set("a", 1)
            assert.are.equal(1, r:get("a"))
            stop_server(srv)
            local ok = pcall(r.get, r, "a")
            assert.is_false(ok)
            start_server(nil, srv.port)
            -- the first operation after the restart already works
            r:set("a", 2)
            assert.are.equal(2, r:get("a"))
            assert.are.same({ 2 }, r:get_multi({ "a" }))
        end)

        it("AUTH with a password and with an ACL user; clear errors for a wrong password and an unknown db", function()
            local srv = start_server("requirepass s3cret\nuser alice on >wonder ~* +@all")
            local k = fresh("auth")
            local r = region({ port = srv.port, password = "s3cret" })
            r:set(k, "secret value")
            assert.are.equal("secret value", r:get(k))
            local ru = region({ url = "redis://alice:wonder@127.0.0.1:" .. srv.port .. "/0" })
            assert.are.equal("secret value", ru:get(k))
            local rn = region({ port = srv.port, username = "alice", password = "wonder" })
            assert.are.equal("secret value", rn:get(k))
            local ok, err = pcall(region, { port = srv.port, password = "wrong" })
            assert.is_false(ok)
            assert.matches("AUTH with the password refused: WRONGPASS", err, 1, true)
            ok, err = pcall(region, { port = srv.port, username = "alice", password = "nope" })
            assert.matches("AUTH as user 'alice' refused", err, 1, true)
            ok, err = pcall(region, { port = srv.port })
            -- no password: the server refuses the first command
            if ok then
                ok, err = pcall(err.get, err, "x")
            end
            assert.is_false(ok)
            assert.matches("NOAUTH", err, 1, true)
            ok, err = pcall(region, { port = srv.port, password = "s3cret", db = 99 })
            assert.is_false(ok)
            assert.matches("SELECT of db 99 refused", err, 1, true)
            stop_server(srv)
        end)

        it("a unix socket", function()
            local srv = start_server()
            local r = region({ url = "unix://" .. srv.unix })
            r:set("over unix", { 1, 2 })
            assert.are.same({ 1, 2 }, r:get("over unix"))
            assert.are.same({ 1, 2 }, region({ port = srv.port }):get("over unix"))
            assert.are.equal("v", r:get_or_create("u2", function() return "v" end))
            stop_server(srv)
            local ok, err = pcall(r.get, r, "over unix")
            assert.is_false(ok)
            assert.matches("unix:" .. srv.unix, err, 1, true)
        end)
    end)
end)

describe("dogpile.cache.redis_sentinel", function()
    support.no_leaks()

    teardown(function()
        for _, srv in ipairs(servers) do
            stop_server(srv)
        end
        os.execute("rm -rf '" .. TMP .. "'")
    end)

    local started = {}
    after_each(function()
        for _, srv in ipairs(started) do
            stop_server(srv)
        end
        started = {}
    end)

    local function wait_for(what, fn, limit)
        local t0 = now()
        while not fn() do
            assert(now() - t0 < limit, what .. " did not happen within " .. limit .. " s")
            sleep(0.05)
        end
    end

    it("refuses a configuration without sentinels or service_name", function()
        local ok, err = pcall(cache.make_region().configure, cache.make_region(),
                              "dogpile.cache.redis_sentinel", { arguments = { service_name = "x" } })
        assert.is_false(ok)
        assert.matches("sentinels must be a non-empty list", err, 1, true)
        ok, err = pcall(function()
            cache.make_region():configure("dogpile.cache.redis_sentinel",
                                          { arguments = { sentinels = { { "127.0.0.1", 1 } } } })
        end)
        assert.is_false(ok)
        assert.matches("dogpile.cache.redis_sentinel: the argument 'service_name' is required",
                       err, 1, true)
        local function conf(args)
            return select(2, pcall(cache.make_region().configure, cache.make_region(),
                                   "dogpile.cache.redis_sentinel", { arguments = args }))
        end
        assert.matches("sentinels: '127.0.0.1:70000' is not host:port with a port from 1 to "
                       .. "65535", conf({ sentinels = { "127.0.0.1:70000" }, service_name = "x" }),
                       1, true)
        assert.matches("'url' is not an argument here",
                       conf({ sentinels = { { "127.0.0.1", 1 } }, service_name = "x",
                              url = "redis://h" }), 1, true)
        assert.matches("lock_timeout must be a positive, finite number",
                       conf({ sentinels = { { "127.0.0.1", 1 } }, service_name = "x",
                              lock_timeout = -1 }), 1, true)
    end)

    it("writes go to the master the sentinels name, also after a failover", function()
        local master = start_server()
        local replica = start_server("replicaof 127.0.0.1 " .. master.port)
        started[1], started[2] = master, replica
        wait_for("replication", function()
            return cli(replica.port, "INFO replication"):match("master_link_status:up") ~= nil
        end, 10)
        local sentinel = start_sentinel(master.port)
        started[3] = sentinel
        wait_for("the sentinel discovering the replica", function()
            return cli(sentinel.port, "SENTINEL replicas dp"):match(tostring(replica.port)) ~= nil
        end, 15)
        local r = cache.make_region():configure("dogpile.cache.redis_sentinel", {
            arguments = { sentinels = { { host = "127.0.0.1", port = sentinel.port } },
                          service_name = "dp", socket_timeout = 0.5 },
        })
        r:set("before", "written to the first master")
        assert.are.equal("written to the first master",
                         cli(master.port, "GET before") ~= "" and r:get("before"))
        wait_for("replication of the key", function()
            return cli(replica.port, "EXISTS before") == "1"
        end, 5)
        stop_server(master)
        -- The region is not reconfigured: its operations fail until the
        -- sentinel has promoted the replica, then work on the new master.
        wait_for("the failover", function()
            return pcall(r.set, r, "after", "written to the new master")
        end, 30)
        assert.matches(tostring(replica.port), cli(sentinel.port, "SENTINEL get-master-addr-by-name dp"))
        assert.are.equal("written to the first master", r:get("before"))
        assert.are.equal("written to the new master", r:get("after"))
        assert.are.equal("1", cli(replica.port, "EXISTS after"))
        assert.are.equal("v", r:get_or_create("created", function() return "v" end))
    end)
end)
