-- The Lua backends shipped with dogpile.cache (API.md, "Backend names
-- shipped"): dogpile.cache.memory (this Lua state only, values by reference,
-- optional exact LRU bound) and dogpile.cache.null (stores nothing, never
-- blocks). Both are used through regions, as users use them, and directly
-- through region.actual_backend where the backend interface itself matters.
local support = require "support"
local dogpile = require "dogpile"
local cache = require "dogpile.cache"
local lib = require "dogpile.lib"

local NO_VALUE = cache.NO_VALUE
local C = lib.C

local function memory(arguments, conf)
    conf = conf or {}
    conf.arguments = arguments
    return cache.make_region():configure("dogpile.cache.memory", conf)
end

local raises_here = support.raises_here

--- The keys present in a table, sorted.
local function keys_of(t)
    local out = {}
    for k in pairs(t) do
        out[#out + 1] = k
    end
    table.sort(out)
    return out
end

-- -- dogpile.cache.memory ------------------------------------------------------------

describe("dogpile.cache.memory", function()
    support.no_leaks()

    it("returns NO_VALUE for a miss at the backend interface", function()
        local b = memory().actual_backend
        assert.are.equal(NO_VALUE, b:get("nope"))
        assert.are.same({ NO_VALUE, NO_VALUE }, b:get_multi({ "a", "b" }))
    end)

    it("stores values by reference: get returns the very table that was set", function()
        local r = memory()
        local t = { nested = { 1, 2, 3 } }
        r:set("t", t)
        assert.is_true(rawequal(t, r:get("t")))
        assert.is_true(rawequal(t, r:get_multi({ "t" })[1]))
        assert.is_true(rawequal(t, r:get_value_metadata("t").payload))
        -- a change to the table is seen through the cache (nothing was copied)
        t.changed = true
        assert.is_true(r:get("t").changed)
        local made
        local got = r:get_or_create("c", function()
            made = {}
            return made
        end)
        assert.is_true(rawequal(made, got))
        assert.is_true(rawequal(made, r:get_or_create("c", function() return {} end)))
        -- also with functions and userdata-like values that a codec would refuse
        local fn = function() end
        r:set("fn", fn)
        assert.are.equal(fn, r:get("fn"))
        local co = coroutine.create(fn)
        r:set("co", co)
        assert.are.equal(co, r:get("co"))
    end)

    it("the backend hands back the very CachedValue it was given", function()
        local b = memory().actual_backend
        local cv = cache.CachedValue.new({ "x" }, { ct = C.dp_clock_now(), v = 1 })
        b:set("k", cv)
        assert.is_true(rawequal(cv, b:get("k")))
        b:set_multi({ m = cv })
        assert.is_true(rawequal(cv, b:get_multi({ "m" })[1]))
        b:delete("k")
        b:delete_multi({ "m" })
        assert.are.equal(NO_VALUE, b:get("k"))
        assert.are.equal(NO_VALUE, b:get("m"))
    end)

    it("keeps its values in the given cache_dict", function()
        local d = {}
        local r = memory({ cache_dict = d })
        r:set("k", "v")
        assert.are.same({ "k" }, keys_of(d))
        assert.are.equal("v", d.k.payload)
        -- values already in the dict are served
        d.pre = cache.CachedValue.new("from dict", r:get_value_metadata("k").metadata)
        assert.are.equal("from dict", r:get("pre"))
        r:delete("k")
        assert.is_nil(d.k)
    end)

    it("each configured region gets its own store unless they share a cache_dict", function()
        local a, b = memory(), memory()
        a:set("k", "a")
        assert.are.equal(NO_VALUE, b:get("k"))
        local d = {}
        local c, e = memory({ cache_dict = d }), memory({ cache_dict = d })
        c:set("k", "shared")
        assert.are.equal("shared", e:get("k"))
    end)

    it("max_items evicts the least recently set key first", function()
        local d = {}
        local r = memory({ cache_dict = d, max_items = 3 })
        r:set("a", 1)
        r:set("b", 2)
        r:set("c", 3)
        assert.are.same({ "a", "b", "c" }, keys_of(d))
        r:set("d", 4)
        assert.are.same({ "b", "c", "d" }, keys_of(d))
        r:set("e", 5)
        assert.are.same({ "c", "d", "e" }, keys_of(d))
        assert.are.equal(2, r:stats().evictions)
    end)

    it("max_items: get refreshes recency (exact LRU)", function()
        local d = {}
        local r = memory({ cache_dict = d, max_items = 3 })
        r:set("a", 1)
        r:set("b", 2)
        r:set("c", 3)
        assert.are.equal(1, r:get("a")) -- order now b, c, a
        r:set("d", 4)                   -- evicts b
        assert.are.same({ "a", "c", "d" }, keys_of(d))
        assert.are.equal(3, r:get("c")) -- order now a, d, c
        r:set("e", 5)                   -- evicts a
        assert.are.same({ "c", "d", "e" }, keys_of(d))
        r:get_or_create("d", function() error("not called") end) -- order now c, e, d
        r:set("f", 6)                   -- evicts c
        assert.are.same({ "d", "e", "f" }, keys_of(d))
        assert.are.same({ 5 }, r:get_multi({ "e" })) -- order now d, f, e
        r:set("g", 7)                   -- evicts d
        assert.are.same({ "e", "f", "g" }, keys_of(d))
        assert.are.equal(4, r:stats().evictions)
    end)

    it("max_items: setting an existing key refreshes it without evicting", function()
        local d = {}
        local r = memory({ cache_dict = d, max_items = 3 })
        r:set("a", 1)
        r:set("b", 2)
        r:set("c", 3)
        r:set("a", 10)                  -- order now b, c, a; still 3 keys
        assert.are.equal(0, r:stats().evictions)
        r:set("d", 4)                   -- evicts b
        assert.are.same({ "a", "c", "d" }, keys_of(d))
        assert.are.equal(10, r:get("a"))
        assert.are.equal(1, r:stats().evictions)
    end)

    it("max_items: a deleted key frees its slot and is not evicted later", function()
        local d = {}
        local r = memory({ cache_dict = d, max_items = 3 })
        r:set("a", 1)
        r:set("b", 2)
        r:set("c", 3)
        r:delete("a")
        r:set("d", 4)
        assert.are.same({ "b", "c", "d" }, keys_of(d))
        assert.are.equal(0, r:stats().evictions)
        r:delete_multi({ "b", "c" })
        r:set_multi({ e = 5, f = 6 })
        assert.are.same({ "d", "e", "f" }, keys_of(d))
        assert.are.equal(0, r:stats().evictions)
        r:set("g", 7)                   -- evicts d, the oldest
        assert.are.same({ "e", "f", "g" }, keys_of(d))
        assert.are.equal(1, r:stats().evictions)
    end)

    it("max_items = 1 keeps only the last key", function()
        local d = {}
        local r = memory({ cache_dict = d, max_items = 1 })
        for i = 1, 5 do
            r:set("k" .. i, i)
        end
        assert.are.same({ "k5" }, keys_of(d))
        assert.are.equal(4, r:stats().evictions)
    end)

    it("max_items bounds a large working set exactly", function()
        local d = {}
        local r = memory({ cache_dict = d, max_items = 100 })
        for i = 1, 1000 do
            r:set("k" .. i, i)
        end
        local n = 0
        for _ in pairs(d) do
            n = n + 1
        end
        assert.are.equal(100, n)
        assert.are.equal(900, r:stats().evictions)
        assert.are.equal(NO_VALUE, r:get("k900"))
        assert.are.equal(901, r:get("k901"))
        assert.are.equal(1000, r:get("k1000"))
    end)

    it("an unbounded memory backend reports no evictions", function()
        local r = memory()
        for i = 1, 50 do
            r:set("k" .. i, i)
        end
        assert.are.equal(0, r:stats().evictions)
    end)

    it("max_items: keys already in cache_dict count against the bound", function()
        local d = {}
        local seed = memory({ cache_dict = d })
        seed:set_multi({ a = 1, b = 2, c = 3 })
        local r = memory({ cache_dict = d, max_items = 2 })
        local n = 0
        for _ in pairs(d) do
            n = n + 1
        end
        assert.are.equal(2, n)
        r:set("z", 26)
        n = 0
        for _ in pairs(d) do
            n = n + 1
        end
        assert.are.equal(2, n)
        assert.are.equal(26, r:get("z"))
    end)

    it("raises on a bad max_items or cache_dict, at the caller's line", function()
        local r = cache.make_region()
        raises_here("dogpile.cache.memory:", function() r:configure("dogpile.cache.memory", { arguments = { max_items = 0 } }) end, "max_items")
        raises_here("dogpile.cache.memory:", function() r:configure("dogpile.cache.memory", { arguments = { max_items = -3 } }) end, "max_items")
        raises_here("dogpile.cache.memory:", function() r:configure("dogpile.cache.memory", { arguments = { max_items = 1.5 } }) end, "max_items")
        raises_here("dogpile.cache.memory:", function() r:configure("dogpile.cache.memory", { arguments = { max_items = "3" } }) end, "max_items")
        raises_here("dogpile.cache.memory:", function() r:configure("dogpile.cache.memory", { arguments = { max_items = 0 / 0 } }) end, "max_items")
        raises_here("dogpile.cache.memory:", function() r:configure("dogpile.cache.memory", { arguments = { cache_dict = "d" } }) end, "cache_dict")
        assert.is_false(r.is_configured)
    end)

    it("max_items from configure_from_config strings", function()
        local r = cache.make_region()
        r:configure_from_config({
            ["m.backend"] = "dogpile.cache.memory",
            ["m.arguments.max_items"] = " 2 ",
        }, "m.")
        r:set("a", 1)
        r:set("b", 2)
        r:set("c", 3)
        assert.are.equal(NO_VALUE, r:get("a"))
        assert.are.equal(1, r:stats().evictions)
    end)
end)

-- -- dogpile.cache.null --------------------------------------------------------------

describe("dogpile.cache.null", function()
    support.no_leaks()

    local function null_region(conf)
        return cache.make_region():configure("dogpile.cache.null", conf)
    end

    it("never stores anything", function()
        local r = null_region()
        r:set("k", "v")
        assert.are.equal(NO_VALUE, r:get("k"))
        r:set_multi({ a = 1, b = 2 })
        assert.are.same({ NO_VALUE, NO_VALUE }, r:get_multi({ "a", "b" }))
        r:delete("k")
        r:delete_multi({ "a", "b" })
        assert.is_nil(r:get_value_metadata("k"))
        local b = r.actual_backend
        assert.are.equal(NO_VALUE, b:get("k"))
        assert.are.same({ NO_VALUE }, b:get_multi({ "k" }))
    end)

    it("every caller runs the creator", function()
        local r = null_region({ expiration_time = 100 })
        local calls = 0
        local function creator()
            calls = calls + 1
            return calls
        end
        assert.are.equal(1, r:get_or_create("k", creator))
        assert.are.equal(2, r:get_or_create("k", creator))
        assert.are.equal(3, r:get_or_create("k", creator))
        assert.are.equal(3, calls)
        local multi_calls = 0
        local function multi(...)
            multi_calls = multi_calls + 1
            assert.are.equal(2, select("#", ...))
            return { "A", "B" }
        end
        assert.are.same({ "A", "B", "A" }, r:get_or_create_multi({ "a", "b", "a" }, multi))
        assert.are.same({ "A", "B", "A" }, r:get_or_create_multi({ "a", "b", "a" }, multi))
        assert.are.equal(2, multi_calls)
    end)

    it("never blocks: a creator may ask for its own key again", function()
        local r = null_region()
        local calls = 0
        local function creator()
            calls = calls + 1
            if calls == 1 then
                return "outer(" .. r:get_or_create("k", creator) .. ")"
            end
            return "inner"
        end
        assert.are.equal("outer(inner)", r:get_or_create("k", creator))
        assert.are.equal(2, calls)
    end)

    it("never blocks: concurrent callers all run the creator at the same time", function()
        local r = null_region()
        local sched = support.scheduler()
        dogpile.set_sleep(sched.sleep)
        finally(function() dogpile.set_sleep(nil) end)
        local calls, running, max_running, got = 0, 0, 0, {}
        local function creator()
            calls = calls + 1
            running = running + 1
            if running > max_running then
                max_running = running
            end
            sched.sleep(0.05)
            running = running - 1
            return "v"
        end
        for i = 1, 5 do
            sched.spawn(function() got[i] = r:get_or_create("k", creator) end)
        end
        sched.run()
        assert.are.equal(5, calls)
        assert.are.equal(5, max_running)
        assert.are.same({ "v", "v", "v", "v", "v" }, got)
        assert.are.equal(0, r:stats().lock_waits)
    end)

    it("takes no lock in the core", function()
        local r = null_region()
        local inside
        r:get_or_create("k", function()
            inside = tonumber(C.dp_lock_count())
            return 1
        end)
        assert.are.equal(0, inside)
    end)
end)
