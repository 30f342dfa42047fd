-- Freshness and failure policies (issue 16) on memory, shared_memory, lmdb
-- and redis regions: a TTL per value (a creator's second value,
-- region:set's third), `return nil, err`, negative_expiration_time,
-- stale_if_error and early_refresh, under a virtual clock
-- (fixtures/freshness/vclock.lua) wherever timing matters; XFetch's
-- statistics (fixtures/freshness/xfetch.lua); a TTL read by other
-- processes; stale_if_error across 4 processes on redis.
--
-- Redis: the server of the test command (DP_TEST_REDIS_PORT), or one of our
-- own on a free loopback port, stopped in teardown.
local support = require "support"
local vclock = require "fixtures.freshness.vclock"
local xfetch = require "fixtures.freshness.xfetch"

local sh, write, read, now, sleep = support.sh, support.write, support.read, support.now, support.sleep

local TMP = (sh("mktemp -d /tmp/dogpile-freshness-XXXXXX"):gsub("%s+$", ""))

-- -- Servers and paths -----------------------------------------------------------------

local free_port = support.free_port

local redis_pid
local REDIS_PORT = tonumber(os.getenv("DP_TEST_REDIS_PORT"))

local function redis_port()
    if REDIS_PORT then
        return REDIS_PORT
    end
    local port = free_port()
    local dir = TMP .. "/redis"
    os.execute("mkdir -p " .. dir)
    local out = sh(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s "
                    .. "--daemonize yes --pidfile %s/redis.pid --logfile %s/redis.log")
                   :format(port, dir, dir, dir))
    local t0 = now()
    while true do
        redis_pid = (read(dir .. "/redis.pid") or ""):match("%d+")
        if redis_pid and sh("redis-cli -p " .. port .. " ping"):match("PONG") then
            break
        end
        assert(now() - t0 < 10, "redis-server did not start: " .. out .. (read(dir .. "/redis.log") or ""))
        sleep(0.02)
    end
    REDIS_PORT = port
    return port
end

local LMDB_DIR = TMP .. "/lmdb"
os.execute("mkdir -p " .. LMDB_DIR)

local uniq = 0
local function key(prefix)
    uniq = uniq + 1
    return ("%s:%d:%d:%d"):format(prefix, os.time(), math.random(1e9), uniq)
end

-- The backends, and what makes two regions share one store.
local MEMORY_DICT = {}
local BACKENDS = {
    { "memory", "dogpile.cache.memory", function() return { cache_dict = MEMORY_DICT } end },
    { "shared_memory", "dogpile.cache.shared_memory",
      function() return { name = "freshness_spec" } end, bytes = true },
    { "lmdb", "dogpile.cache.lmdb", function() return { path = LMDB_DIR } end, bytes = true },
    { "redis", "dogpile.cache.redis", function() return { port = redis_port() } end, bytes = true },
}

local function near(a, b)
    return math.abs(a - b) < 1e-6
end

describe("freshness policies", function()
    support.no_leaks()

    local env, cache, clock, NO_VALUE

    setup(function()
        env = vclock.enter()
        cache, clock, NO_VALUE = env.cache, env.clock, env.cache.NO_VALUE
        env.context.set_logger(function() end)
    end)

    teardown(function()
        vclock.leave()
    end)

    describe("configure", function()
        it("checks the options", function()
            for _, case in ipairs({
                { { negative_expiration_time = 0 / 0 }, "negative_expiration_time must be a finite" },
                { { negative_expiration_time = "5" }, "negative_expiration_time must be a number" },
                { { stale_if_error = -1 }, "stale_if_error must be a finite number of seconds >= 0" },
                { { stale_if_error = 1 / 0 }, "stale_if_error must be a finite" },
                { { early_refresh = 0 }, "early_refresh must be a finite number > 0" },
                { { early_refresh = "yes" }, "early_refresh must be a number" },
            }) do
                local ok, err = pcall(function()
                    cache.make_region():configure("dogpile.cache.memory", case[1])
                end)
                assert.is_false(ok)
                assert.matches(case[2], err, 1, true)
            end
            local r = cache.make_region():configure("dogpile.cache.memory", { early_refresh = true,
                stale_if_error = 0, negative_expiration_time = -1 })
            assert.are.equal(1, r.early_refresh)
            assert.are.equal(0, r.stale_if_error)
            assert.are.equal(-1, r.negative_expiration_time)
            r = cache.make_region():configure_from_config({ ["c.backend"] = "dogpile.cache.memory",
                ["c.early_refresh"] = "2", ["c.stale_if_error"] = "30",
                ["c.negative_expiration_time"] = "5" }, "c.")
            assert.are.equal(2, r.early_refresh)
            assert.are.equal(30, r.stale_if_error)
            assert.are.equal(5, r.negative_expiration_time)
        end)

        it("refuses an expiration time for set that is not a finite number", function()
            local r = cache.make_region():configure("dogpile.cache.memory")
            local ok, err = pcall(r.set, r, "k", 1, 0 / 0)
            assert.is_false(ok)
            assert.matches("set: expiration_time must be a finite number", err)
            ok, err = pcall(r.set, r, "k", 1, "soon")
            assert.is_false(ok)
            assert.matches("set: expiration_time must be a number", err)
        end)
    end)

    for _, b in ipairs(BACKENDS) do
        local bname, backend, arguments = b[1], b[2], b[3]

        local function region(conf, opts)
            conf = conf or {}
            conf.arguments = arguments()
            return cache.make_region(opts):configure(backend, conf)
        end

        -- The bytes a byte-storing backend holds (nil elsewhere).
        local function raw(r, k)
            local v = r.actual_backend:get(r.key_mangler and r.key_mangler(k) or k)
            return v
        end

        describe("on " .. bname, function()
            it("a creator's second value is the value's own expiration time, over the "
               .. "region's and the call's; -1 never expires", function()
                local r = region({ expiration_time = 100 })
                local k, calls = key("ttl"), 0
                local function creator()
                    calls = calls + 1
                    return "v" .. calls, 5
                end
                assert.are.equal("v1", r:get_or_create(k, creator))
                assert.are.equal(5, r:get_value_metadata(k).metadata.ttl)
                clock.advance(4.9)
                assert.are.equal("v1", r:get_or_create(k, creator))
                assert.are.equal("v1", r:get(k, 1)) -- the call's 1 s does not apply
                assert.are.equal("v1", r:get_multi({ k })[1])
                clock.advance(0.2) -- past its own 5 s, well within the region's 100
                assert.are.equal(NO_VALUE, r:get(k))
                assert.are.same({ NO_VALUE }, r:get_multi({ k }))
                assert.is_nil(r:get_value_metadata(k))
                assert.are.equal("v1", r:get(k, nil, true))
                assert.are.equal("v2", r:get_or_create(k, creator))
                assert.are.equal(2, calls)

                -- Longer than the region's.
                local k2 = key("ttl-long")
                assert.are.equal("long", r:get_or_create(k2, function() return "long", 500 end))
                clock.advance(200)
                assert.are.equal("long", r:get(k2))
                assert.are.equal("long", r:get_or_create(k2, function() error("not fresh?") end))
                clock.advance(301)
                assert.are.equal(NO_VALUE, r:get(k2))

                -- Never.
                local k3 = key("ttl-never")
                assert.are.equal("never", r:get_or_create(k3, function() return "never", -1 end))
                clock.advance(1e6)
                assert.are.equal("never", r:get(k3))
                assert.are.equal(-1, r:get_value_metadata(k3).metadata.ttl)
            end)

            it("region:set(key, value, expiration_time), read by get, get_multi, "
               .. "get_value_metadata and get_or_create_multi", function()
                local r = region({ expiration_time = 8 })
                local k1, k2, k3 = key("set1"), key("set2"), key("set3")
                r:set(k1, "a", 5)
                r:set(k2, "b")
                r:set(k3, "c", -1)
                assert.is_nil(r:get_value_metadata(k2).metadata.ttl)
                clock.advance(6)
                assert.are.same({ NO_VALUE, "b", "c" }, r:get_multi({ k1, k2, k3 }))
                assert.is_nil(r:get_value_metadata(k1))
                assert.are.equal(5, r:get_value_metadata(k1, nil, true).metadata.ttl)
                clock.advance(4)
                assert.are.same({ NO_VALUE, NO_VALUE, "c" }, r:get_multi({ k1, k2, k3 }))
                local asked
                local got = r:get_or_create_multi({ k1, k2, k3 }, function(...)
                    asked = { ... }
                    return { "A", "B" }, 30
                end)
                assert.are.same({ "A", "B", "c" }, got)
                assert.are.same({ k1, k2 }, asked)
                assert.are.equal(30, r:get_value_metadata(k2).metadata.ttl)
                clock.advance(20) -- past the region's 8, within their own 30
                assert.are.same({ "A", "B", "c" }, r:get_multi({ k1, k2, k3 }))
            end)

            it("another region over the same store honours the value's own TTL", function()
                local writer = region({ expiration_time = 10 })
                local reader = region({ expiration_time = 1 })
                local k, short = key("shared"), key("shared-short")
                writer:set(k, { answer = 42 }, 100)
                writer:set(short, "s", 2)
                clock.advance(50)
                assert.are.same({ answer = 42 }, reader:get(k))
                assert.are.same({ answer = 42 }, reader:get_or_create(k, function() error("miss") end))
                assert.are.equal(NO_VALUE, reader:get(short))
                if b.bytes then
                    -- Format 2 only for values that carry a TTL; the rest are
                    -- format 1, as before issue 16.
                    local bytes = raw(writer, k)
                    assert.are.equal("DPLV", bytes:sub(1, 4))
                    assert.are.equal(2, bytes:byte(5))
                    assert.are.equal(env.envelope.HAS_TTL, bytes:byte(6))
                    local plain = key("plain")
                    writer:set(plain, "p")
                    assert.are.equal(1, raw(writer, plain):byte(5))
                    assert.are.equal(env.envelope.HEADER + 5, #raw(writer, plain))
                end
            end)

            it("return nil, err: the error is raised with that message, nothing is stored, "
               .. "the lock is released", function()
                local r = region({ expiration_time = 10 })
                local k, calls = key("nil-err"), 0
                local errors = r:stats().errors
                local ok, err = pcall(r.get_or_create, r, k, function()
                    calls = calls + 1
                    return nil, "no such user"
                end)
                assert.is_false(ok)
                assert.are.equal("no such user", err)
                assert.are.equal(errors + 1, r:stats().errors)
                assert.are.equal(NO_VALUE, r:get(k))
                assert.are.equal(NO_VALUE, raw(r, k))
                -- The lock was released: the next caller creates at once.
                assert.are.equal("ok", r:get_or_create(k, function()
                    calls = calls + 1
                    return "ok"
                end))
                assert.are.equal(2, calls)

                -- A second value that is neither a TTL nor an error message.
                local k2 = key("bad-second")
                ok, err = pcall(r.get_or_create, r, k2, function() return "v", "oops" end)
                assert.is_false(ok)
                assert.matches("dogpile.cache: get_or_create: the creator returned a string after "
                               .. "its value", err, 1, true)
                assert.are.equal(NO_VALUE, raw(r, k2))
                ok, err = pcall(r.get_or_create, r, k2, function() return "v", 0 / 0 end)
                assert.is_false(ok)
                assert.matches("expiration time of nan", err, 1, true)
                assert.are.equal("fine", r:get_or_create(k2, function() return "fine" end))

                -- get_or_create_multi and the decorators the same.
                local k3, k4 = key("multi-err1"), key("multi-err2")
                ok, err = pcall(r.get_or_create_multi, r, { k3, k4 }, function()
                    return nil, "batch failed"
                end)
                assert.is_false(ok)
                assert.are.equal("batch failed", err)
                assert.are.same({ NO_VALUE, NO_VALUE }, { raw(r, k3), raw(r, k4) })
                local f = r:cache_on_arguments({ namespace = key("deco") })(function(x)
                    if x == "bad" then
                        return nil, "bad input"
                    end
                    return x .. "!", 60
                end)
                ok, err = pcall(f, "bad")
                assert.is_false(ok)
                assert.are.equal("bad input", err)
                assert.are.equal("good!", f("good"))
                ok, err = pcall(f.refresh, f, "bad")
                assert.are.equal("bad input", err)
                assert.are.equal("good!", f:refresh("good"))
            end)

            it("negative_expiration_time caches nil for its own time; should_cache_fn is "
               .. "asked first", function()
                local r = region({ expiration_time = 100, negative_expiration_time = 3 })
                local k, calls = key("neg"), 0
                local function creator()
                    calls = calls + 1
                    return nil
                end
                assert.is_nil(r:get_or_create(k, creator))
                local md = r:get_value_metadata(k)
                assert.is_nil(md.payload)
                assert.are.equal(3, md.metadata.ttl)
                clock.advance(2.9)
                assert.is_nil(r:get_or_create(k, creator))
                assert.are.equal(1, calls)
                clock.advance(0.2)
                assert.is_nil(r:get_or_create(k, creator))
                assert.are.equal(2, calls)
                -- A value keeps the region's; a creator's own TTL wins.
                local k2, k3 = key("neg-value"), key("neg-own")
                r:get_or_create(k2, function() return "x" end)
                assert.is_nil(r:get_value_metadata(k2).metadata.ttl)
                r:get_or_create(k3, function() return nil, 30 end)
                assert.are.equal(30, r:get_value_metadata(k3).metadata.ttl)
                -- should_cache_fn refusing nil: nothing is stored at all.
                local k4 = key("neg-refused")
                assert.is_nil(r:get_or_create(k4, creator, nil, function(v) return v ~= nil end))
                assert.are.equal(NO_VALUE, raw(r, k4))
                -- get_or_create_multi: the nil values only.
                local k5, k6 = key("neg-m1"), key("neg-m2")
                r:get_or_create_multi({ k5, k6 }, function() return { nil, "y", n = 2 } end)
                assert.are.equal(3, r:get_value_metadata(k5).metadata.ttl)
                assert.is_nil(r:get_value_metadata(k6).metadata.ttl)
                clock.advance(5)
                assert.are.same({ NO_VALUE, "y" }, r:get_multi({ k5, k6 }))
            end)

            it("stale_if_error serves the expired value within the window, raises past it",
               function()
                local r = region({ expiration_time = 10, stale_if_error = 5 })
                local k = key("sie")
                r:get_or_create(k, function() return "good" end)
                local ct = r:get_value_metadata(k).metadata.ct
                clock.advance(12) -- expired 2 s ago
                local attempts = 0
                local function failing()
                    attempts = attempts + 1
                    error("the database is down")
                end
                assert.are.equal("good", r:get_or_create(k, failing))
                assert.are.equal(1, attempts)
                assert.are.equal(1, r:stats().stale_on_error)
                -- Nothing stored; the next caller tries again.
                assert.are.equal(ct, r:get_value_metadata(k, nil, true).metadata.ct)
                assert.are.equal("good", r:get_or_create(k, function()
                    attempts = attempts + 1
                    return nil, "still down"
                end))
                assert.are.equal(2, attempts)
                assert.are.equal(2, r:stats().stale_on_error)
                -- Without the option the error reaches the caller at once.
                local plain = region({ expiration_time = 10 })
                local ok, err = pcall(plain.get_or_create, plain, k, failing)
                assert.is_false(ok)
                assert.matches("the database is down", err)
                -- Past the window.
                clock.advance(3.5) -- expired 5.5 s ago
                ok, err = pcall(r.get_or_create, r, k, failing)
                assert.is_false(ok)
                assert.matches("the database is down", err)
                ok, err = pcall(r.get_or_create, r, k, function() return nil, "gone" end)
                assert.are.equal("gone", err)
                assert.are.equal(2, r:stats().stale_on_error)
                -- A value's own TTL says when it expired.
                local k2 = key("sie-own")
                r:set(k2, "own", 1)
                clock.advance(4) -- expired 3 s ago by its own 1 s (not by the region's 10)
                assert.are.equal("own", r:get_or_create(k2, failing))
                clock.advance(3) -- 6 s ago
                assert.is_false((pcall(r.get_or_create, r, k2, failing)))
                -- A missing value has nothing to fall back to.
                ok, err = pcall(r.get_or_create, r, key("sie-missing"), failing)
                assert.is_false(ok)
                -- get_or_create_multi: every key being created falls back, or the error.
                local m1, m2 = key("sie-m1"), key("sie-m2")
                r:set_multi({ [m1] = "one", [m2] = "two" })
                clock.advance(11)
                assert.are.same({ "one", "two" }, r:get_or_create_multi({ m1, m2 }, failing))
                assert.are.equal(5, r:stats().stale_on_error)
                ok = pcall(r.get_or_create_multi, r, { m1, key("sie-m3") }, failing)
                assert.is_false(ok)
            end)

            it("early_refresh: one caller refreshes a value near its expiry, the others keep "
               .. "it without waiting; get never refreshes", function()
                local r = region({ expiration_time = 10, early_refresh = 1 })
                local s = xfetch.scheduler(clock)
                env.dogpile.set_sleep(s.sleep)
                math.randomseed(7)
                local k, calls = key("early"), 0
                local function creator()
                    calls = calls + 1
                    s.sleep(0.1)
                    return "v" .. calls
                end
                local results = {}
                local function ask(name)
                    local t0 = clock.t
                    local v = r:get_or_create(k, creator)
                    results[#results + 1] = { name = name, v = v, waited = clock.t - t0 }
                end
                s.spawn(clock.t, function() ask("first") end)
                s.run()
                local md = r:get_value_metadata(k)
                assert.is_true(near(md.metadata.delta, 0.1), tostring(md.metadata.delta))
                local ct = md.metadata.ct
                -- Far from expiry (remaining life > 37 * delta * beta): never drawn.
                clock.set(ct + 5)
                for _ = 1, 500 do
                    assert.are.equal("v1", r:get_or_create(k, creator))
                end
                assert.are.equal(1, calls)
                -- Near expiry: get never refreshes.
                clock.set(ct + 9.99)
                for _ = 1, 100 do
                    assert.are.equal("v1", r:get(k))
                end
                assert.are.equal(1, calls)
                -- Callers every 10 ms: one is drawn and refreshes under the lock
                -- (taking the creator's 0.1 s); the others keep v1 at once.
                results = {}
                for i = 1, 8 do
                    s.spawn(ct + 9.99 + i * 0.001, function() ask(i) end)
                end
                s.run()
                env.dogpile.set_sleep(nil)
                assert.are.equal(2, calls)
                local refreshers = 0
                for _, res in ipairs(results) do
                    if res.waited > 0 then
                        refreshers = refreshers + 1
                        assert.is_true(near(res.waited, 0.1))
                        assert.are.equal("v2", res.v)
                    else
                        assert.is_true(res.v == "v1" or res.v == "v2")
                    end
                end
                assert.are.equal(1, refreshers)
                local st = r:stats()
                assert.are.equal(1, st.early_refreshes)
                assert.are.equal(0, st.stale_served)
                assert.are.equal(1, st.misses) -- the first creation only
                assert.is_true(r:get_value_metadata(k).metadata.ct > ct)
            end)

            it("early_refresh with an async_creation_runner: the drawn caller gets the value "
               .. "at once, the runner stores the new one with its creator's duration", function()
                local s = xfetch.scheduler(clock)
                local runs = 0
                local r = region({ expiration_time = 10, early_refresh = 1 }, {
                    async_creation_runner = function(region_, key_, creator, mutex)
                        runs = runs + 1
                        s.spawn(clock.t, function()
                            local ok, err = pcall(function()
                                region_:set(key_, creator())
                            end)
                            mutex:release()
                            assert(ok, err)
                        end)
                    end })
                env.dogpile.set_sleep(s.sleep)
                math.randomseed(3)
                local k, calls = key("early-async"), 0
                local function creator()
                    calls = calls + 1
                    s.sleep(0.25)
                    return "v" .. calls, 20
                end
                s.spawn(clock.t, function() r:get_or_create(k, creator) end)
                s.run()
                local ct = r:get_value_metadata(k).metadata.ct
                local waited = {}
                for i = 1, 10 do
                    s.spawn(ct + 19.98 + i * 0.001, function()
                        local t0 = clock.t
                        assert.are.equal("v1", r:get_or_create(k, creator))
                        waited[#waited + 1] = clock.t - t0
                    end)
                end
                s.run()
                env.dogpile.set_sleep(nil)
                assert.are.same({ 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }, waited)
                assert.are.equal(1, runs)
                assert.are.equal(2, calls)
                local md = r:get_value_metadata(k)
                assert.are.equal("v2", md.payload)
                assert.are.equal(20, md.metadata.ttl)
                assert.is_true(near(md.metadata.delta, 0.25))
                assert.are.equal(1, r:stats().early_refreshes)
            end)

            it("early_refresh: a refresh that fails keeps the value, which is still fresh",
               function()
                local r = region({ expiration_time = 10, early_refresh = 1 })
                local k = key("early-fail")
                local s = xfetch.scheduler(clock)
                env.dogpile.set_sleep(s.sleep)
                s.spawn(clock.t, function()
                    r:get_or_create(k, function() s.sleep(1) return "kept" end)
                end)
                s.run()
                env.dogpile.set_sleep(nil)
                local ct = r:get_value_metadata(k).metadata.ct
                clock.set(ct + 9.999) -- a draw is all but certain (r / delta = 0.001)
                math.randomseed(11)
                local attempts = 0
                for _ = 1, 5 do
                    assert.are.equal("kept", r:get_or_create(k, function()
                        attempts = attempts + 1
                        error("refresh failed")
                    end))
                end
                assert.is_true(attempts >= 1)
                assert.are.equal(0, r:stats().early_refreshes)
                assert.are.equal(ct, r:get_value_metadata(k).metadata.ct)
            end)
        end)
    end

    describe("stale_if_error and a store that fails", function()
        it("serves the stale value when the new one cannot be stored, under fail_open "
           .. "or not; past the window, as before", function()
            local proxy = require "dogpile.cache.proxy"
            local Failing = proxy.ProxyBackend:extend({
                set = function(self, k, v)
                    if self.fail then
                        error("disk full")
                    end
                    return self.proxied:set(k, v)
                end,
            })
            for _, fail_open in ipairs({ false, true }) do
                local r = cache.make_region():configure("dogpile.cache.memory", {
                    expiration_time = 10, stale_if_error = 5, fail_open = fail_open,
                    wrap = { Failing } })
                local k = key("store-fails")
                r:set(k, "old")
                r.backend.fail = true
                clock.advance(12)
                assert.are.equal("old", r:get_or_create(k, function() return "new" end))
                assert.are.equal(1, r:stats().stale_on_error)
                clock.advance(5)
                if fail_open then
                    assert.are.equal("new", r:get_or_create(k, function() return "new" end))
                else
                    local ok, err = pcall(r.get_or_create, r, k, function() return "new" end)
                    assert.is_false(ok)
                    assert.matches("disk full", err)
                end
            end
        end)
    end)

    describe("XFetch, 50 callers a second on one key, creator 100 ms, expiration 2 s, "
             .. "20 simulated seconds", function()
        it("with early_refresh no caller waits after the first value; 1 to 2 "
           .. "regenerations per expiration period", function()
            for seed = 1, 5 do
                for _, async in ipairs({ false, true }) do
                    local res = xfetch.run(env, { beta = 1, seed = seed, async = async })
                    assert.are.equal(1000, #res.requests)
                    assert.are.equal(0, res.waited_after_first,
                                     "seed " .. seed .. ": requests waited after the first value")
                    assert.is_true(res.regenerations_per_period >= 1
                                   and res.regenerations_per_period <= 2,
                                   "seed " .. seed .. ": " .. res.regenerations_per_period
                                   .. " regenerations per period")
                    -- Refreshed early, not at expiry: the lock's own expiry path
                    -- never ran (no miss after the first creation).
                    assert.are.equal(#res.creations - 1, res.stats.early_refreshes)
                    if async then
                        assert.are.equal(0, res.counts.refreshed)
                    else
                        assert.are.equal(#res.creations - 1, res.counts.refreshed)
                    end
                end
            end
        end)

        it("without early_refresh a caller waits for the expired value in every period",
           function()
            local res = xfetch.run(env, { seed = 1 })
            assert.is_true(res.waited_after_first >= 8, tostring(res.waited_after_first))
            assert.are.equal(0, res.stats.early_refreshes)
        end)
    end)
end)

-- -- Other processes --------------------------------------------------------------------

-- A child process (the real clock) with its own region.
local CHILD = [[
local cache = require "dogpile.cache"
local ffi = require "ffi"
pcall(ffi.cdef, "int usleep(unsigned int usec);")
local function sleep(s) ffi.C.usleep(math.floor(math.max(s, 0) * 1e6)) end
local function now() return require("dogpile").now() end
local backend, args, conf = arg[1], assert(loadstring("return " .. arg[2]))(),
    assert(loadstring("return " .. arg[3]))()
conf.arguments = args
cache.set_logger(function() end)
local r = cache.make_region():configure(backend, conf)
local function append(file, line)
    local f = assert(io.open(file, "a"))
    f:write(line, "\n")
    f:close()
end
]]

local function child(name, body)
    local path = TMP .. "/" .. name .. ".lua"
    write(path, CHILD .. body)
    return path
end

describe("a value's own TTL in other processes", function()
    support.no_leaks()

    teardown(function()
        if redis_pid then
            sh("kill " .. redis_pid)
        end
        os.execute("rm -rf '" .. TMP .. "'")
    end)

    for _, b in ipairs({ { "lmdb", "dogpile.cache.lmdb", ("{ path = %q }"):format(LMDB_DIR) },
                         { "redis", "dogpile.cache.redis", function() return ("{ port = %d }"):format(redis_port()) end } }) do
        it("is honoured by a process reading " .. b[1], function()
            local cache = require "dogpile.cache"
            local envelope = require "dogpile.cache.envelope"
            local codec = require "dogpile.codec"
            local args = type(b[3]) == "function" and b[3]() or b[3]
            local w = cache.make_region():configure(b[2], { arguments = assert(loadstring("return " .. args))() })
            -- Written 100 s ago: one with its own 3600 s, one with its own 50 s.
            local long, short = key("proc-long"), key("proc-short")
            local ct = now() - 100
            local km = w.key_mangler or function(x) return x end
            w.actual_backend:set(km(long), envelope.pack(ct, codec.encode("long"), 3600))
            w.actual_backend:set(km(short), envelope.pack(ct, codec.encode("short"), 50))
            local f = child("ttl_reader", [[
io.write(tostring(r:get(arg[4])), " ", tostring(r:get(arg[5])), " ",
         tostring(r:get_value_metadata(arg[4]).metadata.ttl))
]])
            -- The reader's own expiration times say the opposite.
            local out = sh(("luajit %s %s '%s' '{ expiration_time = 10 }' '%s' '%s'")
                           :format(f, b[2], args, long, short))
            assert.are.equal("long <dogpile.cache.NO_VALUE> 3600", out)
            out = sh(("luajit %s %s '%s' '{ expiration_time = 1000 }' '%s' '%s'")
                     :format(f, b[2], args, long, short))
            assert.are.equal("long <dogpile.cache.NO_VALUE> 3600", out)
        end)
    end

    it("stale_if_error across 4 processes on redis: the failing creator's error never "
       .. "reaches a caller within the window", function()
        local args = ("{ port = %d }"):format(redis_port())
        local k = key("sie-procs")
        local creations, errors_file = TMP .. "/sie-creations", TMP .. "/sie-errors"
        os.remove(creations)
        os.remove(errors_file)
        -- A first value, then every creator fails (raising or returning nil,
        -- err in turn); each process asks 4 times per expiration period.
        local f = child("sie_proc", [[
local k, creations, errors_file, start, stop = arg[4], arg[5], arg[6], tonumber(arg[7]), tonumber(arg[8])
while now() < start do sleep(0.001) end
local n, served = 0, {}
while now() < stop do
    local ok, v = pcall(r.get_or_create, r, k, function()
        append(creations, "x")
        n = n + 1
        sleep(0.02)
        if n % 2 == 0 then
            return nil, "upstream down (returned)"
        end
        error("upstream down (raised)")
    end)
    if ok then
        served[v] = (served[v] or 0) + 1
    else
        append(errors_file, tostring(v))
    end
    sleep(0.05)
end
io.write(string.format("%d %d %d", served.first or 0, r:stats().stale_on_error, n))
]])
        local r = require("dogpile.cache").make_region():configure("dogpile.cache.redis", {
            expiration_time = 0.2, arguments = { port = redis_port() } })
        r:set(k, "first")
        local start = now() + 0.5
        local cmd = {}
        for i = 1, 4 do
            cmd[i] = ("luajit %s dogpile.cache.redis '%s' '{ expiration_time = 0.2, stale_if_error = 30 }' "
                      .. "'%s' '%s' '%s' %.3f %.3f > %s/sie-out%d &")
                     :format(f, args, k, creations, errors_file, start, start + 2, TMP, i)
        end
        sh(table.concat(cmd, " ") .. " wait")
        assert.is_nil(read(errors_file), "an error reached a caller: " .. tostring(read(errors_file)))
        local served, stale, tried = 0, 0, 0
        for i = 1, 4 do
            local out = read(TMP .. "/sie-out" .. i) or ""
            local a, s, n = out:match("^(%d+) (%d+) (%d+)$")
            assert.is_truthy(a, "process " .. i .. " printed: " .. out)
            served, stale, tried = served + a, stale + s, tried + n
        end
        -- Every process kept asking and got the first value; the creator was
        -- tried again and again (the lock released after each failure).
        assert.is_true(served >= 4 * 20, served .. " values served")
        assert.is_true(support.count_lines(creations) >= 4, "creator tried " .. support.count_lines(creations))
        assert.are.equal(support.count_lines(creations), tried)
        assert.are.equal(tried, stale)
        assert.are.equal("first", r:get(k, nil, true))
        r:delete(k)
    end)

end)

-- The memory region's early_refresh hit skips the draw for a stamped value
-- whose remaining life is past its reach (37 * delta * beta): one with a
-- long creator's duration must still be drawn, one with a short must not.
describe("early_refresh on a memory hit, real clock", function()
    support.no_leaks()
    local cache = require "dogpile.cache"

    local function reads_until_refresh(delta)
        local r = cache.make_region():configure("dogpile.cache.memory",
                                                { expiration_time = 3600, early_refresh = 1 })
        r:set("k", "old", nil, delta)
        assert.is_not_nil(rawget(r.backend._cache.k, require("dogpile.cache.backends.memory").STAMP),
                          "the value is stamped, so the hit takes the stamp's path")
        math.randomseed(11)
        local calls = 0
        for _ = 1, 2000 do
            r:get_or_create("k", function()
                calls = calls + 1
                return "new"
            end)
        end
        return calls, r:get("k")
    end

    it("draws for a value within the draw's reach of its expiry", function()
        -- 3600 s left, delta 1000 s: each read elects with probability
        -- exp(-3.6), about 1 in 37; once refreshed, the new value's delta is
        -- the creator's own (microseconds), out of reach.
        local calls, v = reads_until_refresh(1000)
        assert.are.equal(1, calls)
        assert.are.equal("new", v)
    end)

    it("does not draw for a value far from its expiry", function()
        local calls, v = reads_until_refresh(0.001)
        assert.are.equal(0, calls)
        assert.are.equal("old", v)
    end)
end)
