-- Issue 19 item 4: a lock taken by a coroutine that is then abandoned (never
-- resumed, then collected) or that ended holding it is released: at once for
-- a waiter of the same Lua state, and at the next collection for everyone.
local cache = require "dogpile.cache"
local dogpile = require "dogpile"
local holders = require "dogpile.holders"
local lib = require "dogpile.lib"
local support = require "support"

local C = lib.C

local function full_gc()
    collectgarbage()
    collectgarbage()
end

-- A coroutine that starts get_or_create on `key` and yields inside the
-- creator, never to be resumed. Returns nothing that keeps it alive.
local function abandon(region, key)
    local co = coroutine.create(function()
        region:get_or_create(key, function()
            coroutine.yield("creating")
            return "never"
        end)
    end)
    local ok, what = coroutine.resume(co)
    assert(ok and what == "creating", tostring(what))
end

local BACKENDS = {
    { "dogpile.cache.memory", {} },
    { "dogpile.cache.shared_memory", { name = "holders_spec" } },
}
if os.getenv("DP_TEST_LMDB") ~= "0" then
    BACKENDS[#BACKENDS + 1] = { "dogpile.cache.lmdb", nil }
end

describe("a lock held by an abandoned coroutine", function()
    support.no_leaks()
    local tmp
    before_each(function()
        tmp = os.tmpname()
        os.remove(tmp)
        os.execute("mkdir -p " .. tmp)
    end)
    after_each(function()
        os.execute("rm -rf " .. tmp)
    end)

    for _, b in ipairs(BACKENDS) do
        local name = b[1]
        local function region()
            local args = b[2] or { path = tmp, lock_timeout = 5 }
            return cache.make_region():configure(name, { expiration_time = 60, arguments = args })
        end

        it("is released at the next collection, with no waiter: " .. name, function()
            local r = region()
            abandon(r, "k")
            assert.are.equal(1, tonumber(C.dp_lock_count()))
            assert.are.equal(1, holders.count())
            full_gc()
            assert.are.equal(0, tonumber(C.dp_lock_count()))
            assert.are.equal(0, holders.count())
            local calls = 0
            assert.are.equal("v", r:get_or_create("k", function() calls = calls + 1 return "v" end))
            assert.are.equal(1, calls)
        end)

        it("is taken over by a blocking caller of the same state once collected: " .. name, function()
            local r = region()
            abandon(r, "k")
            -- The coroutine is collected, but the sweep is off: the waiter
            -- itself must find the lock abandoned.
            holders._sweeping = false
            full_gc()
            assert.are.equal(1, tonumber(C.dp_lock_count()))
            local ok, v = pcall(r.get_or_create, r, "k", function() return "v" end)
            holders._sweeping = true
            assert.is_true(ok, tostring(v))
            assert.are.equal("v", v)
        end)

        it("is taken over by a yielding caller of the same state: " .. name, function()
            local r = region()
            local s = support.scheduler()
            dogpile.set_sleep(s.sleep)
            local got
            holders._sweeping = false
            local ok, err = pcall(function()
                abandon(r, "k")
                s.spawn(function()
                    -- The abandoned coroutine becomes garbage while this one
                    -- waits for its lock.
                    full_gc()
                    got = r:get_or_create("k", function() return "v" end)
                end)
                s.run()
            end)
            dogpile.set_sleep(nil)
            holders._sweeping = true
            assert.is_true(ok, tostring(err))
            assert.are.equal("v", got)
        end)
    end

    for _, b in ipairs { BACKENDS[1], BACKENDS[2] } do
    it("is still held while the coroutine lives, suspended: " .. b[1], function()
        local r = cache.make_region():configure(b[1], { expiration_time = 60, arguments = b[2] })
        r:delete("k")
        local co = coroutine.create(function()
            r:get_or_create("k", function()
                coroutine.yield()
                return "late"
            end)
        end)
        coroutine.resume(co)
        full_gc()
        assert.are.equal(1, tonumber(C.dp_lock_count()))
        -- A blocking caller of the same state is told why it cannot wait.
        support.raises_here("dogpile:", function() r:get_or_create("k", function() return "x" end) end,
                            "held by another coroutine", "(region (unnamed))")
        assert.is_true(coroutine.resume(co))
        assert.are.equal(0, tonumber(C.dp_lock_count()))
        assert.are.equal("late", r:get("k"))
    end)
    end

    it("is not taken for abandoned when handed to the async creation runner", function()
        local pending = {}
        local r = cache.make_region({
            async_creation_runner = function(region, key, creator, mutex)
                pending[#pending + 1] = function()
                    region:set(key, creator())
                    mutex:release()
                end
            end,
        }):configure("dogpile.cache.memory", { expiration_time = 1 })
        r:set("k", "old")
        local md = r:get_value_metadata("k")
        md.metadata.ct = md.metadata.ct - 10 -- expired
        local got
        local co = coroutine.create(function()
            got = r:get_or_create("k", function() return "new" end)
        end)
        assert.is_true(coroutine.resume(co))
        assert.are.equal("old", got)
        assert.are.equal("dead", coroutine.status(co))
        co = nil
        full_gc()
        -- The runner still holds the lock: nobody released it under it.
        assert.are.equal(1, tonumber(C.dp_lock_count()))
        pending[1]()
        assert.are.equal(0, tonumber(C.dp_lock_count()))
        assert.are.equal("new", r:get("k"))
    end)
end)

-- Issue 21: which coroutine takes a lock is asked (coroutine.running, which
-- LuaJIT does not compile: the trace is stitched around it) before the miss
-- path makes its tables, so that the lock's and the context's tables stay
-- unallocated in the compiled miss. Asked at the lock's take, it made every
-- miss allocate them (1 KiB a miss on the memory region instead of 320 bytes,
-- and about 10x the time).
-- Every wait on the core's lock is bounded (issue 19 item 4): a holder in
-- another Lua state whose coroutine was abandoned is released only at that
-- state's next collection cycle, which an idle state may never run. The
-- holder here is the core's lock taken under a fresh owner tag, which is what
-- another Lua state of the process is to the core (its own tag): nobody in
-- this state can reclaim it, as nobody could reclaim another state's.
describe("a wait on the core's lock", function()
    support.no_leaks()
    local context = require "dogpile.context"
    local monotonic = C.dp_clock_monotonic
    local BOUND = 0.5
    local logged

    before_each(function()
        logged = {}
        context.set_logger(function(msg) logged[#logged + 1] = msg end)
        dogpile.set_lock_timeout(BOUND)
    end)
    after_each(function()
        dogpile.set_lock_timeout(nil)
        dogpile.set_sleep(nil)
        context.set_logger(nil)
    end)

    -- The spec scheduler's clock is virtual; the bound is in real time.
    local function real_sleep(s)
        return function(seconds)
            support.sleep(seconds)
            s.sleep(seconds)
        end
    end

    local function foreign_hold(domain, key)
        local other = C.dp_lock_owner_new()
        assert.are.equal(lib.DP_OK, C.dp_lock_try(domain, key, #key, other))
        return function()
            assert.are.equal(lib.DP_OK, C.dp_lock_release(domain, key, #key))
        end
    end

    local REGIONS = {
        { "dogpile.cache.memory", {}, function(r) return r._domain end },
        { "dogpile.cache.shared_memory", { name = "holders_spec_bound" },
          function(r) return r.backend.lock_domain end },
    }

    for _, b in ipairs(REGIONS) do
        local name, args, domain_of = b[1], b[2], b[3]
        local function region()
            return cache.make_region():configure(name, { expiration_time = 60, arguments = args })
        end

        for _, how in ipairs { "blocking", "yielding" } do
            it("ends after the lock timeout, " .. how .. ", and the caller goes ahead: " .. name,
               function()
                local r = region()
                local key = "bound:" .. how
                r:delete(key)
                local unhold = foreign_hold(domain_of(r), key)
                local calls, got = 0, nil
                local function creator()
                    calls = calls + 1
                    return "made"
                end
                local t0 = monotonic()
                if how == "yielding" then
                    local s = support.scheduler()
                    dogpile.set_sleep(real_sleep(s))
                    s.spawn(function() got = r:get_or_create(key, creator) end)
                    s.run()
                else
                    got = r:get_or_create(key, creator)
                end
                local waited = monotonic() - t0
                assert.are.equal("made", got)
                assert.are.equal(1, calls)
                assert.are.equal("made", r:get(key))
                -- One bound in all: wait_unlocked's wait counts for acquire.
                assert.is_true(waited >= BOUND * 0.9, "returned after " .. waited .. " s")
                assert.is_true(waited < BOUND * 2, "waited " .. waited .. " s: twice the bound")
                assert.are.equal(1, #logged, table.concat(logged, "\n"))
                assert.matches("lock for key 'bound:" .. how .. "' was still held after 0.5 s", logged[1],
                               1, true)
                -- The stuck holder's lock was not released by the caller.
                assert.are.equal(1, C.dp_lock_held(domain_of(r), key, #key, nil))
                unhold()
                assert.are.equal(0, tonumber(C.dp_lock_count()))
            end)
        end

        it("does not end early when the holder lets go in time: " .. name, function()
            local r = region()
            local key = "bound:released"
            r:delete(key)
            local domain = domain_of(r)
            local unhold = foreign_hold(domain, key)
            local s = support.scheduler()
            dogpile.set_sleep(real_sleep(s))
            local got
            s.spawn(function() got = r:get_or_create(key, function() return "mine" end) end)
            s.spawn(function()
                s.sleep(0.05)
                r:set(key, "holder's")
                unhold()
            end)
            s.run()
            assert.are.equal("holder's", got)
            assert.are.equal(0, #logged, table.concat(logged, "\n"))
        end)
    end

    it("is set per Lua state and checked", function()
        assert.are.equal(BOUND, dogpile.lock_timeout())
        dogpile.set_lock_timeout(nil)
        assert.are.equal(30, dogpile.lock_timeout())
        for _, bad in ipairs { 0, -1, 0 / 0, math.huge, "5", true } do
            support.raises_here("dogpile: set_lock_timeout expects a positive finite number",
                                function() dogpile.set_lock_timeout(bad) end)
        end
    end)
end)
