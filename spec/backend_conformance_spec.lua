-- The backend contract (docs/BACKENDS.md), one spec for every backend that
-- shares its instances through the core: the same cases run against each
-- entry of BACKENDS below, through regions as users use them and through
-- region.actual_backend where the interface itself matters. A new backend
-- adds one entry; its own spec keeps only what is specific to it.
--
-- dogpile.cache.template is docs/template/template.c, built (not installed)
-- into the build directory of the stage under test.
local support = require "support"
local dogpile = require "dogpile"
local cache = require "dogpile.cache"
local lib = require "dogpile.lib"

local NO_VALUE = cache.NO_VALUE
local C = lib.C
local raises_here = support.raises_here

local function load_template()
    local build = "_build/" .. (os.getenv("DP_STAGE") or "main")
    local path = build .. "/template.so"
    -- The core is loaded already (dogpile.lib): the module's libdogpile.so.0
    -- resolves to that same copy, so it registers where regions look.
    local open, err = package.loadlib(path, "luaopen_dogpile_backends_template")
    assert(open, "cannot load the template backend from " .. path .. " (build the stage "
                 .. "with -Dtests=true): " .. tostring(err))
    open()
end

local serial = 0
local function fresh(what)
    serial = serial + 1
    return ("spec.conf.%s.%d.%d"):format(what, serial, math.floor(C.dp_clock_now() * 1e3) % 1e6)
end

local sh, read, now, sleep = support.sh, support.read, support.now, support.sleep
local RUN = ("%d%04d"):format(os.time(), math.random(0, 9999))

-- lmdb: environments under one temporary folder, removed at the end.
local LMDB_ROOT = (sh("mktemp -d /tmp/dogpile-conformance-XXXXXX"):gsub("%s+$", ""))

-- memcached: the two servers .ci/test starts (DP_TEST_MEMCACHED_PORTS), or
-- one of this file's own on a free loopback port, stopped at the end.
local MEMCACHED_URL, memcached_pid
do
    local env = os.getenv("DP_TEST_MEMCACHED_PORTS")
    if env and env ~= "" then
        local urls = {}
        for p in env:gmatch("%d+") do
            urls[#urls + 1] = "127.0.0.1:" .. p
        end
        MEMCACHED_URL = table.concat(urls, ",")
    else
        local port = support.free_port()
        local pidfile = os.tmpname()
        sh(("memcached -d -P %s -l 127.0.0.1 -p %d -U 0 -m 64 -u root"):format(pidfile, port))
        local t0 = now()
        while not (read(pidfile) or ""):match("%d+") or os.execute("bash -c '(exec 3<>/dev/tcp/"
                .. "127.0.0.1/" .. port .. ") 2>/dev/null'") ~= 0 do
            assert(now() - t0 < 10, "memcached did not start on port " .. port)
            sleep(0.02)
        end
        memcached_pid = read(pidfile):match("%d+")
        os.remove(pidfile)
        MEMCACHED_URL = "127.0.0.1:" .. port
    end
end

-- redis: the server .ci/test starts (DP_TEST_REDIS_PORT), or one of this
-- file's own, stopped at the end.
local REDIS_PORT, redis_pid = tonumber(os.getenv("DP_TEST_REDIS_PORT"))
if not REDIS_PORT then
    local dir = (sh("mktemp -d /tmp/dogpile-conformance-redis-XXXXXX"):gsub("%s+$", ""))
    for _ = 1, 5 do
        REDIS_PORT = support.free_port()
        sh(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s "
            .. "--daemonize yes --pidfile %s/redis.pid --logfile %s/redis.log"):format(
            REDIS_PORT, dir, dir, dir))
        local t0 = now()
        while not sh("redis-cli -p " .. REDIS_PORT .. " ping"):match("PONG")
            and now() - t0 < 10 and not (read(dir .. "/redis.log") or ""):match("in use") do
            sleep(0.02)
        end
        redis_pid = (read(dir .. "/redis.pid") or ""):match("%d+")
        if redis_pid and sh("redis-cli -p " .. REDIS_PORT .. " ping"):match("PONG") then
            break
        end
        redis_pid = nil
        os.remove(dir .. "/redis.log")
    end
    assert(redis_pid, "redis-server did not start: " .. (read(dir .. "/redis.log") or ""))
    os.execute("rm -rf '" .. dir .. "'")
end

local function realpath(path)
    return (sh("realpath '" .. path .. "'"):gsub("%s+$", ""))
end

-- Each entry: the backend's name, how to load it, arguments naming a fresh
-- instance, two settings that cannot share one instance, and a refused
-- argument with the message the core writes for it. Optional: `domain(id)`,
-- the lock domain's exact name; `key(k)`, the key a test stores `k` under
-- (a server's keys outlive the run); `shared_store`, instances see each
-- other's keys and locks (one set of servers); `differ` without a message:
-- every argument names the instance, so other settings make another one;
-- `items = false`: the store's item count is not the backend's to report;
-- `store_domain`: the lock domain is named by the store (DP_SPEC_DOMAIN),
-- so instances on it with other settings share it.
local BACKENDS = {
    {
        name = "dogpile.cache.shared_memory",
        load = function() require "dogpile.backends.shared_memory" end,
        args = function(id) return { name = id } end,
        domain = function(id) return id end,
        differ = { { max_items = 10 }, { max_items = 20 }, "max_items 10, not 20" },
        bad = { "max_items", "10", 'max_items must be a positive integer, got string "10"' },
        first_arg = "name",
        own_lock = false,
    },
    {
        name = "dogpile.cache.template",
        load = load_template,
        args = function(id) return { name = id } end,
        domain = function(id) return id end,
        differ = { { max_value_bytes = "1k" }, { max_value_bytes = 2048 },
                   "max_value_bytes 1024, not 2048" },
        bad = { "max_value_bytes", true, "max_value_bytes must be a positive number of bytes "
                .. 'or a size such as "64m", got true' },
        first_arg = "name",
        own_lock = true,
    },
    {
        name = "dogpile.cache.lmdb",
        load = function() require "dogpile.backends.lmdb" end,
        args = function(id) return { path = LMDB_ROOT .. "/" .. id, map_size = "8m" } end,
        domain = function(id) return realpath(LMDB_ROOT .. "/" .. id) end,
        differ = { { max_bytes = "1m" }, { max_bytes = "2m" }, "max_bytes 1048576, not 2097152" },
        bad = { "max_readers", 0, "max_readers must be an integer from 1 to 1000000, got 0" },
        first_arg = "path",
        own_lock = true,
    },
    {
        name = "dogpile.cache.memcached",
        load = function() require "dogpile.backends.memcached" end,
        -- memcached has no name: every argument names the instance, so a
        -- distinct expiry (an hour and more) makes a distinct one.
        args = function(id)
            local n = tonumber(id:match("%.(%d+)%.%d+$"))
            return { url = MEMCACHED_URL, memcached_expire_time = 3600 + n }
        end,
        key = function(k) return RUN .. ":" .. k:gsub("[%c ]", "_") end,
        domain = function() return MEMCACHED_URL end,
        shared_store = true,
        store_domain = true,
        differ = { { lock_backoff_max = 0.01 }, { lock_backoff_max = 0.02 } },
        bad = { "server_failure_limit", "2",
                'server_failure_limit must be a positive integer, got string "2"' },
        first_arg = "url",
        items = false,
        own_lock = true,
    },
    {
        name = "dogpile.cache.redis",
        load = function() require "dogpile.backends.redis" end,
        -- no name either: a distinct expiry makes a distinct instance, on
        -- one server, db and lock prefix (each length-prefixed: the domain)
        args = function(id)
            local n = tonumber(id:match("%.(%d+)%.%d+$"))
            return { port = REDIS_PORT, redis_expiration_time = 3600 + n }
        end,
        domain = function()
            local port = tostring(REDIS_PORT)
            return ("9:127.0.0.1%d:%s1:05:_lock"):format(#port, port)
        end,
        key = function(k) return RUN .. ":" .. k end,
        shared_store = true,
        store_domain = true,
        differ = { { lock_sleep = 0.05 }, { lock_sleep = 0.06 } },
        bad = { "port", 70000, "port must be an integer from 1 to 65535, got 70000" },
        first_arg = "url",
        items = false,
        own_lock = true,
    },
}

local function with(t, extra)
    local out = {}
    for k, v in pairs(t) do
        out[k] = v
    end
    for k, v in pairs(extra or {}) do
        out[k] = v
    end
    return out
end

for _, B in ipairs(BACKENDS) do
    local NAME = B.name
    B.load()
    local K = B.key or function(k) return k end

    local function region(arguments)
        return cache.make_region():configure(NAME, { arguments = arguments })
    end

    describe(NAME .. " conformance", function()
        support.no_leaks()

        it("get, set and delete bytes of any kind; a miss is NO_VALUE", function()
            local b = region(B.args(fresh("bytes"))).actual_backend
            assert.are.equal(NO_VALUE, b:get(K("missing")))
            local all = {}
            for i = 0, 255 do
                all[#all + 1] = string.char(i)
            end
            local values = { "", "v", "\0a\0", table.concat(all), ("x"):rep(100000) }
            for i, v in ipairs(values) do
                b:set(K("k" .. i), v)
            end
            for i, v in ipairs(values) do
                assert.are.equal(v, b:get(K("k" .. i)))
            end
            b:set(K("k1"), "again")
            assert.are.equal("again", b:get(K("k1")))
            b:delete(K("k1"))
            b:delete(K("never-set"))
            assert.are.equal(NO_VALUE, b:get(K("k1")))
            b:set(K("\0key\255"), "binary key")
            assert.are.equal("binary key", b:get(K("\0key\255")))
        end)

        it("the multi forms keep key order and report misses", function()
            local b = region(B.args(fresh("multi"))).actual_backend
            local a_, b_, c_, x_ = K("a"), K("b"), K("c"), K("x")
            b:set_multi({ [a_] = "1", [b_] = "2", [c_] = "3" })
            assert.are.same({ "1", NO_VALUE, "3", "2" }, b:get_multi({ a_, x_, c_, b_ }))
            b:delete_multi({ a_, c_ })
            assert.are.same({ NO_VALUE, "2", NO_VALUE }, b:get_multi({ a_, b_, c_ }))
            assert.are.same({}, b:get_multi({}))
        end)

        it("regions round-trip values and run a creator once per key", function()
            local r = region(B.args(fresh("region")))
            local calls = 0
            local function creator()
                calls = calls + 1
                return { n = calls, list = { 1, 2.5, "three" }, flag = false }
            end
            local k = K("k")
            local v = r:get_or_create(k, creator)
            assert.are.same({ n = 1, list = { 1, 2.5, "three" }, flag = false }, v)
            assert.are.same(v, r:get_or_create(k, creator))
            assert.are.equal(1, calls)
            r:delete(k)
            assert.are.equal(NO_VALUE, r:get(k))
        end)

        it("one instance per identity: regions on it share values and one lock per key", function()
            local id = fresh("shared")
            local a, b = region(B.args(id)), region(B.args(id))
            local other = region(B.args(fresh("other")))
            local k = K("k")
            a:set(k, "from a")
            assert.are.equal("from a", b:get(k))
            -- one set of servers: another instance reads the same keys
            assert.are.equal(B.shared_store and "from a" or NO_VALUE, other:get(k))
            local dom = a.actual_backend.lock_domain
            if B.domain then
                local full = NAME .. ":" .. B.domain(id)
                assert.are.equal(C.dp_lock_domain(full, #full), dom)
            end
            assert.are.equal(dom, b.actual_backend.lock_domain)
            -- a store's domain is the store's, whichever instance is on it
            assert.are.equal(B.store_domain or false, dom == other.actual_backend.lock_domain)
            local m = a.backend:get_mutex(k)
            assert.is_true(m:acquire(false))
            assert.is_false(b.backend:get_mutex(k):acquire(false))
            -- another instance meets the lock only where it is the servers'
            local mo = other.backend:get_mutex(k)
            assert.are.equal(not B.shared_store, mo:acquire(false))
            if not B.shared_store then
                mo:release()
            end
            m:release()
            local mb = b.backend:get_mutex(k)
            assert.is_true(mb:acquire(false))
            mb:release()
            if B.shared_store then
                assert.is_true(mo:acquire(false))
                mo:release()
            end
            a:delete(k)
        end)

        it("get_or_create from coroutines on two regions of one instance: the creator runs once", function()
            local sched = support.scheduler()
            dogpile.set_sleep(sched.sleep)
            finally(function() dogpile.set_sleep(nil) end)
            local id = fresh("goc")
            local a, b = region(B.args(id)), region(B.args(id))
            local calls, got = 0, {}
            local function creator()
                calls = calls + 1
                sched.sleep(0.05)
                return { made = calls }
            end
            local k = K("k")
            for i = 1, 6 do
                local r = i % 2 == 1 and a or b
                sched.spawn(function() got[i] = r:get_or_create(k, creator) end)
            end
            sched.run()
            assert.are.equal(1, calls)
            for i = 1, 6 do
                assert.are.same({ made = 1 }, got[i])
            end
            a:delete(k)
        end)

        if B.differ[3] then
            it("the same identity with other settings is refused, naming both values", function()
                local id = fresh("mismatch")
                local first = region(with(B.args(id), B.differ[1]))
                raises_here(NAME .. ":", function() region(with(B.args(id), B.differ[2])) end, id, "is already open with " .. B.differ[3])
                -- once every handle is closed, the identity opens with the other settings
                first.actual_backend:close()
                first = nil
                collectgarbage()
                collectgarbage()
                local second = region(with(B.args(id), B.differ[2]))
                second:set(K("k"), "v")
                assert.are.equal("v", second:get(K("k")))
                second:delete(K("k"))
            end)
        else
            it("every argument names the instance: other settings open another one"
               .. (B.store_domain and ", in the store's lock domain" or ""), function()
                local id = fresh("differ")
                local first = region(with(B.args(id), B.differ[1]))
                local second = region(with(B.args(id), B.differ[2]))
                local again = region(with(B.args(id), B.differ[1]))
                local F, S = first.actual_backend, second.actual_backend
                local k = K("k")
                second:set(k, "v")
                -- an instance is one set of counters
                local hits_f, hits_s = F:stats().hits, S:stats().hits
                assert.are.equal("v", again:get(k))
                assert.are.equal(hits_f + 1, F:stats().hits, "again is first's instance")
                assert.are.equal(hits_s, S:stats().hits, "second is another")
                assert.are.equal(F.lock_domain, again.actual_backend.lock_domain)
                assert.are.equal(B.store_domain or false, F.lock_domain == S.lock_domain)
                if B.store_domain then
                    -- the threads of both meet at the core's lock
                    local m = first.backend:get_mutex(k)
                    assert.is_true(m:acquire(false))
                    assert.are.equal(1, C.dp_lock_held(S.lock_domain, k, #k, nil))
                    assert.is_false(second.backend:get_mutex(k):acquire(false))
                    m:release()
                    assert.are.equal(0, C.dp_lock_held(S.lock_domain, k, #k, nil))
                end
                second:delete(k)
            end)
        end

        it("refuses an unknown argument, listing the known ones, and a bad value in one format", function()
            local err = raises_here(NAME .. ": unknown argument 'bogus' (known: ", function() region({ bogus = 1 }) end)
            assert.is_truthy(err:find(B.first_arg, 1, true), err)
            raises_here(NAME .. ": " .. B.bad[3], function() region(with(B.args(fresh("bad")), { [B.bad[1]] = B.bad[2] })) end)
        end)

        it("reports stats and whether it has a lock of its own", function()
            local r = region(B.args(fresh("stats")))
            r:set(K("a"), 1)
            r:set(K("b"), 2)
            assert.are.equal(1, r:get(K("a")))
            local st = r.actual_backend:stats()
            assert.are.equal(B.items == false and 0 or 2, st.items)
            assert.is_true(st.hits >= 1)
            assert.are.equal(B.own_lock, C.dp_backend_has_lock(r.actual_backend.handle) == 1)
            r:delete(K("a"))
            r:delete(K("b"))
        end)
    end)
end

teardown(function()
    os.execute("rm -rf '" .. LMDB_ROOT .. "'")
    if memcached_pid then
        os.execute("kill " .. memcached_pid .. " 2>/dev/null")
    end
    if redis_pid then
        os.execute("kill " .. redis_pid .. " 2>/dev/null")
    end
end)
