-- dogpile.cache regions (API.md, "require 'dogpile.cache' — regions"): get,
-- set, delete and their multi forms, get_or_create(_multi) under the dogpile
-- lock, invalidation, the async creation runner, fail_open, stats,
-- configuration (configure, configure_from_config, load_regions), proxies and
-- Lua backends. Behaviour follows Python's dogpile.cache where API.md is silent.
-- Every creator call is counted exactly.
local support = require "support"
local dogpile = require "dogpile"
local cache = require "dogpile.cache"
local proxy = require "dogpile.cache.proxy"
local util = require "dogpile.cache.util"
local lib = require "dogpile.lib"

local NO_VALUE = cache.NO_VALUE
local ProxyBackend = proxy.ProxyBackend
local C = lib.C

local THIS_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"
local FIXTURES = THIS_DIR .. "/fixtures/"

local function sleep(seconds)
    C.dp_clock_sleep(seconds)
end

local function memory_region(make_opts, conf)
    return cache.make_region(make_opts):configure("dogpile.cache.memory", conf)
end

local raises_here = support.raises_here

--- A scheduler installed as dogpile's sleep for this test only.
local function with_scheduler()
    local sched = support.scheduler()
    dogpile.set_sleep(sched.sleep)
    finally(function() dogpile.set_sleep(nil) end)
    return sched
end

--- Capture what the region logs (fail_open) for this test only.
local function capture_log()
    local region_mod = require "dogpile.cache.region"
    local saved = region_mod.log
    local lines = {}
    -- Each test starts with no failure line recently logged (one a second
    -- per backend is the limit).
    for name in pairs(region_mod._log_limits) do
        region_mod._log_limits[name] = nil
    end
    cache.set_logger(function(msg) lines[#lines + 1] = msg end)
    finally(function() region_mod.log = saved end)
    return lines
end

-- -- get / set / delete ---------------------------------------------------------

describe("region get/set/delete", function()
    support.no_leaks()

    it("returns NO_VALUE (never nil) for a miss", function()
        local r = memory_region()
        local v = r:get("missing")
        assert.is_true(rawequal(NO_VALUE, v))
        assert.is_not_nil(v)
    end)

    it("sets, gets and deletes", function()
        local r = memory_region()
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
        r:set("k", 42)
        assert.are.equal(42, r:get("k"))
        r:delete("k")
        assert.are.equal(NO_VALUE, r:get("k"))
        r:delete("never-set") -- deleting a missing key is fine
        assert.are.equal(NO_VALUE, r:get("never-set"))
    end)

    it("caches nil and false as values, distinct from a miss", function()
        local r = memory_region()
        r:set("n", nil)
        r:set("f", false)
        local n = r:get("n")
        assert.is_nil(n)
        assert.is_false(rawequal(NO_VALUE, n))
        assert.is_false(r:get("f"))
        local cv = r:get_value_metadata("n")
        assert.is_not_nil(cv)
        assert.is_nil(cv.payload)
    end)

    it("get_multi keeps the order and length of keys, NO_VALUE where missing", function()
        local r = memory_region()
        r:set_multi({ a = 1, b = false, c = "three" })
        local res = r:get_multi({ "c", "x", "a", "b", "a", "y" })
        assert.are.equal(6, #res)
        assert.are.equal("three", res[1])
        assert.are.equal(NO_VALUE, res[2])
        assert.are.equal(1, res[3])
        assert.is_false(res[4])
        assert.are.equal(1, res[5])
        assert.are.equal(NO_VALUE, res[6])
        assert.are.same({}, r:get_multi({}))
    end)

    it("get_multi returns a cached nil at its position", function()
        local r = memory_region()
        r:set("n", nil)
        r:set("a", "A")
        local res = r:get_multi({ "n", "a", "zz" })
        assert.is_nil(res[1])
        assert.are.equal("A", res[2])
        assert.are.equal(NO_VALUE, res[3])
    end)

    it("delete_multi deletes exactly the given keys", function()
        local r = memory_region()
        r:set_multi({ a = 1, b = 2, c = 3, d = 4 })
        r:delete_multi({ "a", "c", "nope" })
        local res = r:get_multi({ "a", "b", "c", "d" })
        assert.are.equal(NO_VALUE, res[1])
        assert.are.equal(2, res[2])
        assert.are.equal(NO_VALUE, res[3])
        assert.are.equal(4, res[4])
        r:delete_multi({})
        assert.are.equal(2, r:get("b"))
    end)

    it("set_multi stores values set in one call with one created time", function()
        local r = memory_region()
        r:set_multi({ a = 1, b = 2 })
        local ma, mb = r:get_value_metadata("a"), r:get_value_metadata("b")
        assert.are.equal(1, ma.payload)
        assert.are.equal(2, mb.payload)
        assert.are.equal(ma.metadata.ct, mb.metadata.ct)
    end)

    it("get honours the region's expiration_time", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
        sleep(0.25)
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal(NO_VALUE, r:get_multi({ "k" })[1])
        assert.is_nil(r:get_value_metadata("k"))
    end)

    it("get's expiration_time overrides the region's; -1 never expires", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        r:set("k", "v")
        sleep(0.25)
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal("v", r:get("k", 100))
        assert.are.equal("v", r:get("k", -1))
        assert.are.equal("v", r:get_multi({ "k" }, 100)[1])
        assert.are.equal("v", r:get_multi({ "k" }, -1)[1])
        assert.are.equal("v", r:get_value_metadata("k", 100).payload)
        assert.are.equal("v", r:get_value_metadata("k", -1).payload)

        local forever = memory_region()
        forever:set("k", "v")
        sleep(0.03)
        assert.are.equal("v", forever:get("k"))
        assert.are.equal(NO_VALUE, forever:get("k", 0.01))
        assert.are.equal(NO_VALUE, forever:get_multi({ "k" }, 0.01)[1])
        assert.is_nil(forever:get_value_metadata("k", 0.01))
    end)

    it("ignore_expiration returns an expired value", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        r:set("k", "v")
        sleep(0.25)
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal("v", r:get("k", nil, true))
        assert.are.equal("v", r:get_multi({ "k" }, nil, true)[1])
        assert.are.equal("v", r:get_value_metadata("k", nil, true).payload)
        assert.are.equal(NO_VALUE, r:get("missing", nil, true))
    end)

    it("get_value_metadata returns a CachedValue with ct and v, or nil", function()
        local r = memory_region()
        local before = C.dp_clock_now()
        r:set("k", { 1, 2 })
        local after = C.dp_clock_now()
        local cv = r:get_value_metadata("k")
        assert.are.same({ 1, 2 }, cv.payload)
        assert.is_number(cv.metadata.ct)
        assert.is_true(cv.metadata.ct >= before - 0.001 and cv.metadata.ct <= after + 0.001)
        assert.is_number(cv.metadata.v)
        assert.are.equal(math.floor(cv.metadata.v), cv.metadata.v)
        assert.is_nil(r:get_value_metadata("missing"))
    end)

    it("CachedValue.new makes {payload, metadata = {ct, v}}", function()
        local cv = cache.CachedValue.new("p", { ct = 123.5, v = 7 })
        assert.are.equal("p", cv.payload)
        assert.are.equal(123.5, cv.metadata.ct)
        assert.are.equal(7, cv.metadata.v)
        local t = {}
        assert.are.equal(t, cache.CachedValue.new(t, { ct = 1, v = 1 }).payload)
        assert.is_nil(cache.CachedValue.new(nil, { ct = 1, v = 1 }).payload)
    end)

    it("a CachedValue put in the backend directly is read with its created time", function()
        local r = memory_region(nil, { expiration_time = 10 })
        local cv = r:get_value_metadata("x") -- nil
        assert.is_nil(cv)
        r:set("probe", 1)
        local v = r:get_value_metadata("probe").metadata.v
        r.actual_backend:set("old", cache.CachedValue.new("ancient", { ct = C.dp_clock_now() - 60, v = v }))
        r.actual_backend:set("new", cache.CachedValue.new("recent", { ct = C.dp_clock_now(), v = v }))
        assert.are.equal(NO_VALUE, r:get("old"))
        assert.are.equal("ancient", r:get("old", nil, true))
        assert.are.equal("ancient", r:get("old", 100))
        assert.are.equal("recent", r:get("new"))
    end)

    it("applies the key_mangler to every key it sends to the backend", function()
        local r = memory_region({ key_mangler = function(k) return "m:" .. k end })
        r:set("a", 1)
        r:set_multi({ b = 2 })
        local backend = r.actual_backend
        assert.are.equal(1, backend:get("m:a").payload)
        assert.are.equal(2, backend:get("m:b").payload)
        assert.are.equal(NO_VALUE, backend:get("a"))
        assert.are.same({ 1, 2 }, r:get_multi({ "a", "b" }))
        r:delete("a")
        assert.are.equal(NO_VALUE, backend:get("m:a"))
        r:delete_multi({ "b" })
        assert.are.equal(NO_VALUE, backend:get("m:b"))
        assert.are.equal("v", r:get_or_create("c", function() return "v" end))
        assert.are.equal("v", backend:get("m:c").payload)
    end)

    it("key_mangler = 'sha1' stores under the SHA-1 hex of the key", function()
        local r = memory_region({ key_mangler = "sha1" })
        r:set("abc", "v")
        assert.are.equal("v", r.actual_backend:get("a9993e364706816aba3e25717850c26c9cd0d89d").payload)
        assert.are.equal("v", r:get("abc"))
    end)
end)

-- -- get_or_create -------------------------------------------------------------------

describe("region get_or_create", function()
    support.no_leaks()

    it("calls the creator once, then serves the cached value", function()
        local r = memory_region()
        local calls = 0
        local function creator()
            calls = calls + 1
            return "value " .. calls
        end
        assert.are.equal("value 1", r:get_or_create("k", creator))
        assert.are.equal("value 1", r:get_or_create("k", creator))
        assert.are.equal("value 1", r:get("k"))
        assert.are.equal(1, calls)
    end)

    it("caches nil and false returned by the creator", function()
        local r = memory_region()
        local calls = 0
        local function make_nil()
            calls = calls + 1
            return nil
        end
        local function make_false()
            calls = calls + 1
            return false
        end
        assert.is_nil(r:get_or_create("n", make_nil))
        assert.is_nil(r:get_or_create("n", make_nil))
        assert.is_false(r:get_or_create("f", make_false))
        assert.is_false(r:get_or_create("f", make_false))
        assert.are.equal(2, calls)
        assert.is_nil(r:get("n"))
        assert.is_false(r:get("f"))
    end)

    it("regenerates after the region's expiration_time", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        local calls = 0
        local function creator()
            calls = calls + 1
            return calls
        end
        assert.are.equal(1, r:get_or_create("k", creator))
        assert.are.equal(1, r:get_or_create("k", creator))
        sleep(0.25)
        assert.are.equal(2, r:get_or_create("k", creator))
        assert.are.equal(2, r:get_or_create("k", creator))
        assert.are.equal(2, calls)
    end)

    it("expiration_time overrides the region's; -1 never expires", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        local calls = 0
        local function creator()
            calls = calls + 1
            return calls
        end
        assert.are.equal(1, r:get_or_create("k", creator, -1))
        sleep(0.25)
        assert.are.equal(1, r:get_or_create("k", creator, -1))
        assert.are.equal(1, r:get_or_create("k", creator, 100))
        assert.are.equal(1, calls)
        assert.are.equal(2, r:get_or_create("k", creator))
        assert.are.equal(2, calls)

        local forever = memory_region()
        assert.are.equal(3, forever:get_or_create("k", creator))
        sleep(0.03)
        assert.are.equal(3, forever:get_or_create("k", creator))
        assert.are.equal(4, forever:get_or_create("k", creator, 0.01))
        assert.are.equal(4, calls)
    end)

    it("does not store a value that should_cache_fn refuses, but returns it", function()
        local r = memory_region()
        local calls, seen = 0, {}
        local function creator()
            calls = calls + 1
            return calls
        end
        local function should_cache(v)
            seen[#seen + 1] = v
            return v >= 2
        end
        assert.are.equal(1, r:get_or_create("k", creator, nil, should_cache))
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal(2, r:get_or_create("k", creator, nil, should_cache))
        assert.are.equal(2, r:get("k"))
        assert.are.equal(2, r:get_or_create("k", creator, nil, should_cache))
        assert.are.equal(2, calls)
        assert.are.same({ 1, 2 }, seen)
    end)

    it("passes creator_args to the creator", function()
        local r = memory_region()
        local got
        local function creator(...)
            got = { n = select("#", ...), ... }
            return "made"
        end
        assert.are.equal("made", r:get_or_create("a", creator, nil, nil, { 1, "two", 3 }))
        assert.are.same({ n = 3, 1, "two", 3 }, got)
        assert.are.equal("made", r:get_or_create("b", creator, nil, nil, { n = 4, nil, 2, nil, nil }))
        assert.are.same({ n = 4, nil, 2, nil, nil }, got)
        assert.are.equal(4, got.n)
        assert.are.equal("made", r:get_or_create("c", creator, nil, nil, {}))
        assert.are.equal(0, got.n)
    end)

    it("propagates a creator's string error unchanged, stores nothing, releases the lock", function()
        local r = memory_region()
        local calls = 0
        local ok, err = pcall(r.get_or_create, r, "k", function()
            calls = calls + 1
            error("creator failed", 0)
        end)
        assert.is_false(ok)
        assert.are.equal("creator failed", err)
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal(0, tonumber(C.dp_lock_count()))
        assert.are.equal("ok", r:get_or_create("k", function()
            calls = calls + 1
            return "ok"
        end))
        assert.are.equal(2, calls)
    end)

    it("propagates a creator's table error as the very same object", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        local boom = { code = 503 }
        local ok, err = pcall(r.get_or_create, r, "k", function() error(boom) end)
        assert.is_false(ok)
        assert.is_true(rawequal(boom, err))
        assert.are.equal(0, tonumber(C.dp_lock_count()))
        -- also when regenerating an expired value
        r:set("k", "old")
        sleep(0.25)
        ok, err = pcall(r.get_or_create, r, "k", function() error(boom) end)
        assert.is_false(ok)
        assert.is_true(rawequal(boom, err))
        assert.are.equal(0, tonumber(C.dp_lock_count()))
        assert.are.equal("old", r:get("k", nil, true))
        assert.are.equal("new", r:get_or_create("k", function() return "new" end))
    end)

    it("regenerates a value of another format version", function()
        local r = memory_region()
        r:set("probe", 1)
        local v = r:get_value_metadata("probe").metadata.v
        r.actual_backend:set("k", cache.CachedValue.new("foreign", { ct = C.dp_clock_now(), v = v + 1 }))
        local calls = 0
        assert.are.equal("mine", r:get_or_create("k", function()
            calls = calls + 1
            return "mine"
        end))
        assert.are.equal(1, calls)
    end)

    it("concurrent callers of a missing key: one creator call, the others wait for it", function()
        local r = memory_region()
        local sched = with_scheduler()
        local calls, got = 0, {}
        local function creator()
            calls = calls + 1
            sched.sleep(0.05)
            return "v"
        end
        for i = 1, 6 do
            sched.spawn(function() got[i] = r:get_or_create("k", creator) end)
        end
        sched.run()
        assert.are.equal(1, calls)
        assert.are.same({ "v", "v", "v", "v", "v", "v" }, got)
        assert.are.equal(5, r:stats().lock_waits)
    end)

    it("concurrent callers of an expired key: one regenerates, the others get the stale value", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        r:set("k", "old")
        sleep(0.25)
        local sched = with_scheduler()
        local calls, got = 0, {}
        local function creator()
            calls = calls + 1
            sched.sleep(0.05)
            return "new"
        end
        for i = 1, 5 do
            sched.spawn(function() got[i] = r:get_or_create("k", creator) end)
        end
        sched.run()
        assert.are.equal(1, calls)
        assert.are.same({ "new", "old", "old", "old", "old" }, got)
        assert.are.equal(4, r:stats().stale_served)
        assert.are.equal("new", r:get_or_create("k", creator))
        assert.are.equal(1, calls)
    end)

    it("a creator that yields and raises releases the lock for the waiters", function()
        local r = memory_region()
        local sched = with_scheduler()
        local calls, got, errs = 0, {}, {}
        local function creator()
            calls = calls + 1
            sched.sleep(0.02)
            if calls == 1 then
                error({ first = true })
            end
            return "second"
        end
        for i = 1, 4 do
            sched.spawn(function()
                local ok, v = pcall(r.get_or_create, r, "k", creator)
                if ok then got[i] = v else errs[i] = v end
            end)
        end
        sched.run()
        assert.are.equal(2, calls)
        assert.is_true(errs[1].first)
        assert.are.same({ [2] = "second", [3] = "second", [4] = "second" }, got)
    end)
end)

-- -- get_or_create_multi ---------------------------------------------------------------

describe("region get_or_create_multi", function()
    support.no_leaks()

    it("calls the creator once with the missing distinct keys in first-appearance order", function()
        local r = memory_region()
        r:set("b", "cached b")
        local calls, args = 0, nil
        local function creator(...)
            calls = calls + 1
            args = { n = select("#", ...), ... }
            local out = {}
            for i = 1, select("#", ...) do
                out[i] = "new " .. (select(i, ...))
            end
            return out
        end
        local res = r:get_or_create_multi({ "d", "b", "a", "d", "c", "a" }, creator)
        assert.are.equal(1, calls)
        assert.are.same({ n = 3, "d", "a", "c" }, args)
        assert.are.same({ "new d", "cached b", "new a", "new d", "new c", "new a" }, res)
        assert.are.equal("new a", r:get("a"))
        assert.are.equal("new c", r:get("c"))
        assert.are.equal("new d", r:get("d"))
        res = r:get_or_create_multi({ "a", "b", "c", "d" }, creator)
        assert.are.same({ "new a", "cached b", "new c", "new d" }, res)
        assert.are.equal(1, calls)
    end)

    it("gives duplicate keys the same value object", function()
        local r = memory_region()
        local res = r:get_or_create_multi({ "x", "x", "y", "x" }, function(...)
            assert.are.equal(2, select("#", ...))
            return { {}, {} }
        end)
        assert.are.equal(4, #res)
        assert.is_true(rawequal(res[1], res[2]))
        assert.is_true(rawequal(res[1], res[4]))
        assert.is_false(rawequal(res[1], res[3]))
    end)

    it("returns an empty array for no keys without calling the creator", function()
        local r = memory_region()
        local calls = 0
        assert.are.same({}, r:get_or_create_multi({}, function() calls = calls + 1 return {} end))
        assert.are.equal(0, calls)
    end)

    it("does not call the creator when every key is cached", function()
        local r = memory_region()
        r:set_multi({ a = 1, b = false })
        local calls = 0
        local res = r:get_or_create_multi({ "b", "a" }, function() calls = calls + 1 return {} end)
        assert.are.equal(0, calls)
        assert.are.equal(2, #res)
        assert.is_false(res[1])
        assert.are.equal(1, res[2])
    end)

    it("stores only what should_cache_fn accepts, returns everything", function()
        local r = memory_region()
        local calls = 0
        local function creator(...)
            calls = calls + 1
            local out = {}
            for i = 1, select("#", ...) do
                out[i] = (select(i, ...)):upper()
            end
            return out
        end
        local res = r:get_or_create_multi({ "a", "skip", "c" }, creator, nil,
                                          function(v) return v ~= "SKIP" end)
        assert.are.same({ "A", "SKIP", "C" }, res)
        assert.are.equal("A", r:get("a"))
        assert.are.equal(NO_VALUE, r:get("skip"))
        assert.are.equal("C", r:get("c"))
        local args
        res = r:get_or_create_multi({ "a", "skip", "c" }, function(...)
            args = { ... }
            return creator(...)
        end)
        assert.are.same({ "skip" }, args)
        assert.are.same({ "A", "SKIP", "C" }, res)
        assert.are.equal(2, calls)
    end)

    it("regenerates expired keys, keeps fresh ones", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        r:set_multi({ a = "old a", b = "old b" })
        sleep(0.25)
        r:set("c", "fresh c")
        local args
        local res = r:get_or_create_multi({ "c", "b", "a", "d" }, function(...)
            args = { n = select("#", ...), ... }
            local out = {}
            for i = 1, select("#", ...) do
                out[i] = "new " .. (select(i, ...))
            end
            return out
        end)
        assert.are.same({ n = 3, "b", "a", "d" }, args)
        assert.are.same({ "fresh c", "new b", "new a", "new d" }, res)
        assert.are.same({ "new a", "new b", "fresh c", "new d" }, r:get_multi({ "a", "b", "c", "d" }))
    end)

    it("honours an expiration_time argument, -1 never expiring", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        r:set("a", "old")
        sleep(0.25)
        local calls = 0
        local function creator(...)
            calls = calls + 1
            return { "new" }
        end
        assert.are.same({ "old" }, r:get_or_create_multi({ "a" }, creator, -1))
        assert.are.same({ "old" }, r:get_or_create_multi({ "a" }, creator, 100))
        assert.are.equal(0, calls)
        assert.are.same({ "new" }, r:get_or_create_multi({ "a" }, creator))
        assert.are.equal(1, calls)
    end)

    it("propagates a creator error unchanged, stores nothing and releases every lock", function()
        local r = memory_region()
        r:set("b", "B")
        local boom = { reason = "multi failed" }
        local ok, err = pcall(r.get_or_create_multi, r, { "a", "b", "c" }, function() error(boom) end)
        assert.is_false(ok)
        assert.is_true(rawequal(boom, err))
        assert.are.equal(0, tonumber(C.dp_lock_count()))
        assert.are.equal(NO_VALUE, r:get("a"))
        assert.are.equal(NO_VALUE, r:get("c"))
        ok, err = pcall(r.get_or_create_multi, r, { "a" }, function() error("plain", 0) end)
        assert.is_false(ok)
        assert.are.equal("plain", err)
        assert.are.equal(0, tonumber(C.dp_lock_count()))
        local calls = 0
        local res = r:get_or_create_multi({ "a", "b", "c" }, function(...)
            calls = calls + 1
            return { "A", "C" }
        end)
        assert.are.same({ "A", "B", "C" }, res)
        assert.are.equal(1, calls)
    end)

    it("concurrent callers with overlapping keys create each key exactly once, no deadlock", function()
        local r = memory_region()
        local sched = with_scheduler()
        local created, generation = {}, 1
        local function count(k)
            created[k] = (created[k] or 0) + 1
        end
        local function creator(...)
            local out = {}
            for i = 1, select("#", ...) do
                local k = select(i, ...)
                count(k)
                out[i] = "g" .. generation .. ":" .. k
            end
            sched.sleep(0.01)
            return out
        end
        local sets = {
            { "a", "b", "c" }, { "c", "b", "a" }, { "b", "d" }, { "d", "e", "a", "d" },
            { "e", "f" }, { "f", "a" }, { "c", "f", "b", "e" }, { "g", "a", "g" },
            { "h" }, { "h", "g", "f", "e", "d", "c", "b", "a" },
        }
        local singles = { "a", "g", "e", "h" }
        local function round(delay_step)
            local results, single_results = {}, {}
            for i, keys in ipairs(sets) do
                sched.spawn(function()
                    if delay_step > 0 then
                        sched.sleep(delay_step * (i % 3))
                    end
                    results[i] = r:get_or_create_multi(keys, creator)
                end)
            end
            for i, k in ipairs(singles) do
                sched.spawn(function()
                    single_results[i] = r:get_or_create(k, function()
                        count(k)
                        sched.sleep(0.01)
                        return "g" .. generation .. ":" .. k
                    end)
                end)
            end
            sched.run()
            return results, single_results
        end

        local results, single_results = round(0)
        for _, k in ipairs({ "a", "b", "c", "d", "e", "f", "g", "h" }) do
            assert.are.equal(1, created[k], "key " .. k .. " created " .. tostring(created[k]) .. " times")
        end
        for i, keys in ipairs(sets) do
            assert.are.equal(#keys, #results[i])
            for j, k in ipairs(keys) do
                assert.are.equal("g1:" .. k, results[i][j])
            end
        end
        for i, k in ipairs(singles) do
            assert.are.equal("g1:" .. k, single_results[i])
        end

        -- Soft invalidation: each key is regenerated once more; callers get
        -- the old or the new value, never a mix-up and never a deadlock.
        r:invalidate(false)
        created, generation = {}, 2
        results, single_results = round(0.005)
        for _, k in ipairs({ "a", "b", "c", "d", "e", "f", "g", "h" }) do
            assert.are.equal(1, created[k], "key " .. k .. " regenerated " .. tostring(created[k]) .. " times")
        end
        for i, keys in ipairs(sets) do
            assert.are.equal(#keys, #results[i])
            for j, k in ipairs(keys) do
                local v = results[i][j]
                assert.is_true(v == "g1:" .. k or v == "g2:" .. k, "unexpected " .. tostring(v))
            end
        end
        for _, k in ipairs({ "a", "b", "c", "d", "e", "f", "g", "h" }) do
            assert.are.equal("g2:" .. k, r:get(k))
        end
    end)
end)

-- -- invalidate ---------------------------------------------------------------------------

describe("region invalidate", function()
    support.no_leaks()

    it("hard (the default): earlier values are missing; get_or_create recreates", function()
        local r = memory_region()
        r:set("k", "old")
        r:set("other", "o")
        r:invalidate()
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal(NO_VALUE, r:get_multi({ "k", "other" })[1])
        assert.are.equal(NO_VALUE, r:get_multi({ "k", "other" })[2])
        assert.is_nil(r:get_value_metadata("k"))
        local calls = 0
        local function creator()
            calls = calls + 1
            return "new"
        end
        assert.are.equal("new", r:get_or_create("k", creator))
        assert.are.equal("new", r:get_or_create("k", creator))
        assert.are.equal(1, calls)
        assert.are.equal("new", r:get("k"))
        assert.are.equal(NO_VALUE, r:get("other"))
    end)

    it("hard with true: concurrent callers wait for the new value (none gets the old one)", function()
        local r = memory_region()
        r:set("k", "old")
        r:invalidate(true)
        local sched = with_scheduler()
        local calls, got = 0, {}
        for i = 1, 4 do
            sched.spawn(function()
                got[i] = r:get_or_create("k", function()
                    calls = calls + 1
                    sched.sleep(0.02)
                    return "new"
                end)
            end)
        end
        sched.run()
        assert.are.equal(1, calls)
        assert.are.same({ "new", "new", "new", "new" }, got)
    end)

    it("soft: get treats earlier values as invalid; get_or_create regenerates once", function()
        local r = memory_region(nil, { expiration_time = 100 })
        r:set("k", "old")
        r:invalidate(false)
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal(NO_VALUE, r:get_multi({ "k" })[1])
        assert.is_nil(r:get_value_metadata("k"))
        local calls = 0
        local function creator()
            calls = calls + 1
            return "new"
        end
        assert.are.equal("new", r:get_or_create("k", creator))
        assert.are.equal("new", r:get_or_create("k", creator))
        assert.are.equal(1, calls)
        assert.are.equal("new", r:get("k"))
    end)

    for _, exp in ipairs({ false, 100 }) do
        local label = exp and "with expiration_time" or "with no expiration_time"
        it("soft: while one caller regenerates, the others get the old value (" .. label .. ")", function()
            local r = memory_region(nil, { expiration_time = exp or nil })
            r:set("k", "old")
            r:invalidate(false)
            local sched = with_scheduler()
            local calls, got = 0, {}
            local function creator()
                calls = calls + 1
                sched.sleep(0.05)
                return "new"
            end
            for i = 1, 4 do
                sched.spawn(function() got[i] = r:get_or_create("k", creator) end)
            end
            sched.run()
            assert.are.equal(1, calls)
            assert.are.same({ "new", "old", "old", "old" }, got)
            assert.are.equal("new", r:get_or_create("k", creator))
            assert.are.equal(1, calls)
            assert.are.equal("new", r:get("k"))
        end)
    end

    it("values set after an invalidation are valid", function()
        for _, hard in ipairs({ true, false }) do
            local r = memory_region()
            r:set("k", "old")
            r:invalidate(hard)
            r:set("k", "new")
            r:set_multi({ m = "multi" })
            assert.are.equal("new", r:get("k"))
            assert.are.equal("multi", r:get("m"))
            assert.are.same({ "new", "multi" }, r:get_multi({ "k", "m" }))
            local calls = 0
            assert.are.equal("new", r:get_or_create("k", function() calls = calls + 1 return "x" end))
            assert.are.equal(0, calls)
        end
    end)

    it("ignore_expiration skips both the expiration and the invalidation checks", function()
        for _, hard in ipairs({ true, false }) do
            local r = memory_region(nil, { expiration_time = 0.2 })
            r:set("k", "old")
            r:invalidate(hard)
            assert.are.equal(NO_VALUE, r:get("k"))
            assert.are.equal("old", r:get("k", nil, true))
            assert.are.equal("old", r:get_multi({ "k" }, nil, true)[1])
            assert.are.equal("old", r:get_value_metadata("k", nil, true).payload)
            sleep(0.25)
            assert.are.equal("old", r:get("k", nil, true))
        end
    end)

    it("uses a custom region_invalidator object", function()
        local calls = {}
        local threshold, hard_mode = nil, true
        local inv = {}
        local function log(name) calls[#calls + 1] = name end
        function inv:invalidate(hard)
            log("invalidate " .. tostring(hard))
            threshold, hard_mode = C.dp_clock_stamp(), hard
        end
        function inv:is_invalidated(ct)
            log("is_invalidated")
            return threshold ~= nil and ct < threshold
        end
        function inv:is_hard_invalidated(ct)
            log("is_hard_invalidated")
            return hard_mode and self:is_invalidated(ct)
        end
        function inv:is_soft_invalidated(ct)
            log("is_soft_invalidated")
            return not hard_mode and self:is_invalidated(ct)
        end
        function inv:was_hard_invalidated() return threshold ~= nil and hard_mode end
        function inv:was_soft_invalidated() return threshold ~= nil and not hard_mode end

        local r = memory_region(nil, { region_invalidator = inv })
        assert.are.equal(inv, r.region_invalidator)
        r:set("k", "v1")
        assert.are.equal("v1", r:get("k"))
        calls = {}
        r:invalidate()
        assert.are.same({ "invalidate true" }, calls)
        assert.are.equal(NO_VALUE, r:get("k"))
        local n = 0
        local function creator()
            n = n + 1
            return "v" .. (n + 1)
        end
        assert.are.equal("v2", r:get_or_create("k", creator))
        assert.are.equal(1, n)

        -- soft through the custom object: one regenerates, the others get the old value
        calls = {}
        r:invalidate(false)
        assert.are.same("invalidate false", calls[1])
        assert.are.equal(NO_VALUE, r:get("k"))
        local sched = with_scheduler()
        local got = {}
        for i = 1, 3 do
            sched.spawn(function()
                got[i] = r:get_or_create("k", function()
                    n = n + 1
                    sched.sleep(0.02)
                    return "v" .. (n + 1)
                end)
            end)
        end
        sched.run()
        assert.are.equal(2, n)
        assert.are.same({ "v3", "v2", "v2" }, got)
        local asked = {}
        for _, c in ipairs(calls) do asked[c] = true end
        assert.is_true(asked["is_invalidated"] or asked["is_soft_invalidated"])
    end)

    it("rejects a region_invalidator that lacks a method", function()
        local r = cache.make_region()
        local inv = { invalidate = function() end, is_invalidated = function() return false end }
        raises_here("dogpile.cache:", function() r:configure("dogpile.cache.memory", { region_invalidator = inv }) end, "region_invalidator")
    end)

    it("invalidation applies to this region only", function()
        local shared = {}
        local a = memory_region(nil, { arguments = { cache_dict = shared } })
        local b = memory_region(nil, { arguments = { cache_dict = shared } })
        a:set("k", "v")
        a:invalidate()
        assert.are.equal(NO_VALUE, a:get("k"))
        assert.are.equal("v", b:get("k"))
    end)
end)

-- -- async_creation_runner ---------------------------------------------------------------

describe("region async_creation_runner", function()
    support.no_leaks()

    local function deferred_region(exp)
        local jobs, seen = {}, {}
        local r = cache.make_region({
            key_mangler = function(k) return "m:" .. k end,
            async_creation_runner = function(region, key, creator, mutex)
                seen[#seen + 1] = { region = region, key = key, creator = creator, mutex = mutex }
                jobs[#jobs + 1] = function()
                    local ok, v = pcall(creator)
                    if ok then
                        region:set(key, v)
                    end
                    mutex:release()
                end
            end,
        }):configure("dogpile.cache.memory", { expiration_time = exp })
        return r, jobs, seen
    end

    it("is called as runner(region, key, creator, mutex) with the unmangled key; the caller gets the stale value", function()
        local r, jobs, seen = deferred_region(0.2)
        local calls = 0
        local function creator()
            calls = calls + 1
            return "v" .. calls
        end
        -- A missing value is created by the caller itself.
        assert.are.equal("v1", r:get_or_create("k", creator))
        assert.are.equal(0, #seen)
        assert.are.equal(1, calls)
        sleep(0.25)
        assert.are.equal("v1", r:get_or_create("k", creator))
        assert.are.equal(1, #seen)
        assert.are.equal(r, seen[1].region)
        assert.are.equal("k", seen[1].key)
        assert.is_true(dogpile.is_callable(seen[1].creator))
        assert.is_true(dogpile.is_callable(seen[1].mutex.acquire))
        assert.is_true(dogpile.is_callable(seen[1].mutex.release))
        assert.are.equal(1, calls)
        -- While the runner's job is pending, the lock is held: others get the
        -- stale value and the runner is not called again.
        assert.are.equal("v1", r:get_or_create("k", creator))
        assert.are.equal(1, #seen)
        assert.are.equal(1, tonumber(C.dp_lock_count()))
        jobs[1]()
        assert.are.equal(2, calls)
        assert.are.equal(0, tonumber(C.dp_lock_count()))
        assert.are.equal("v2", r:get_or_create("k", creator))
        assert.are.equal("v2", r:get("k"))
        assert.are.equal("v2", r.actual_backend:get("m:k").payload)
        assert.are.equal(2, calls)
    end)

    it("passes creator_args through the runner's creator", function()
        local r, jobs = deferred_region(0.2)
        r:set("k", "old")
        sleep(0.25)
        local got
        assert.are.equal("old", r:get_or_create("k", function(...)
            got = { n = select("#", ...), ... }
            return "new"
        end, nil, nil, { n = 2, nil, "b" }))
        jobs[1]()
        assert.are.same({ n = 2, nil, "b" }, got)
        assert.are.equal("new", r:get("k"))
    end)

    it("a runner that works at once still hands the caller the stale value", function()
        local runs = 0
        local r = cache.make_region({
            async_creation_runner = function(region, key, creator, mutex)
                runs = runs + 1
                local ok, v = pcall(creator)
                if ok then
                    region:set(key, v)
                end
                mutex:release()
            end,
        }):configure("dogpile.cache.memory", { expiration_time = 0.2 })
        r:set("k", "old")
        sleep(0.25)
        assert.are.equal("old", r:get_or_create("k", function() return "new" end))
        assert.are.equal(1, runs)
        assert.are.equal("new", r:get("k"))
    end)

    it("is used after a soft invalidation, not after a hard one", function()
        local r, jobs, seen = deferred_region(nil)
        r:set("k", "old")
        r:invalidate(false)
        assert.are.equal("old", r:get_or_create("k", function() return "soft" end))
        assert.are.equal(1, #seen)
        jobs[1]()
        assert.are.equal("soft", r:get("k"))
        r:invalidate(true)
        assert.are.equal("hard", r:get_or_create("k", function() return "hard" end))
        assert.are.equal(1, #seen)
    end)
end)

-- -- fail_open -------------------------------------------------------------------------------

cache.register_backend("test.failing", function()
    local b = {}
    function b:get(key) error("connection refused", 0) end
    function b:set(key, value) error("connection refused", 0) end
    function b:delete(key) error("connection refused", 0) end
    return b
end)

-- A working store whose lock server is down.
local function store_with_lock(lock_factory)
    return function()
        local store = {}
        local b = {}
        function b:get(key)
            local v = store[key]
            if v == nil then
                return NO_VALUE
            end
            return v
        end
        function b:set(key, value) store[key] = value end
        function b:delete(key) store[key] = nil end
        function b:get_mutex(key) return lock_factory(key) end
        return b
    end
end

cache.register_backend("test.badlock", store_with_lock(function()
    return {
        acquire = function() error("lock server down", 0) end,
        release = function() error("lock server down", 0) end,
    }
end))

cache.register_backend("test.badgetmutex", store_with_lock(function()
    error("lock server down", 0)
end))

describe("region fail_open", function()
    support.no_leaks()

    it("logs at most one failure line a second per backend, then says how many it left out", function()
        local lines = capture_log()
        local r = cache.make_region({ name = "fo-limit" }):configure("test.failing", { fail_open = true })
        for i = 1, 50 do
            assert.are.equal("v", r:get_or_create("k" .. i, function() return "v" end))
        end
        assert.are.equal(1, #lines)
        assert.are.equal(1, select(2, lines[1]:gsub("test.failing", "")), lines[1])
        assert.is_true(r:stats().errors >= 100)
        require("dogpile.lib").C.dp_clock_sleep(1.05)
        r:get("again")
        assert.are.equal(2, #lines)
        assert.matches("%(%d+ more failure%(s%) of test.failing not logged in the last 1%.%d s%)", lines[2])
    end)

    it("treats a failing backend as a miss: the creator runs and its value is returned", function()
        local lines = capture_log()
        local r = cache.make_region({ name = "fo" }):configure("test.failing", { fail_open = true })
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal(1, r:stats().errors)
        local calls = 0
        local function creator()
            calls = calls + 1
            return "made " .. calls
        end
        assert.are.equal("made 1", r:get_or_create("k", creator))
        assert.are.equal("made 2", r:get_or_create("k", creator))
        assert.are.equal(2, calls)
        assert.is_true(r:stats().errors > 1)
        r:set("k", 1)
        r:delete("k")
        r:set_multi({ a = 1 })
        r:delete_multi({ "a" })
        local res = r:get_multi({ "a", "b" })
        assert.are.same({ NO_VALUE, NO_VALUE }, res)
        assert.are.same({ "A", "B" }, r:get_or_create_multi({ "a", "b" }, function() return { "A", "B" } end))
        assert.is_true(#lines > 0)
        assert.is_truthy(lines[1]:find("test.failing", 1, true))
    end)

    it("counts each failed operation once in stats().errors", function()
        capture_log()
        local r = cache.make_region():configure("test.failing", { fail_open = true })
        r:get("a")
        assert.are.equal(1, r:stats().errors)
        r:set("a", 1)
        assert.are.equal(2, r:stats().errors)
        r:delete("a")
        assert.are.equal(3, r:stats().errors)
    end)

    it("without fail_open, the backend's error propagates", function()
        local r = cache.make_region():configure("test.failing")
        local ok, err = pcall(r.get, r, "k")
        assert.is_false(ok)
        assert.is_truthy(tostring(err):find("connection refused", 1, true))
        local calls = 0
        ok, err = pcall(r.get_or_create, r, "k", function() calls = calls + 1 return 1 end)
        assert.is_false(ok)
        assert.is_truthy(tostring(err):find("connection refused", 1, true))
        assert.are.equal(0, calls)
        ok, err = pcall(r.set, r, "k", 1)
        assert.is_false(ok)
        assert.is_truthy(tostring(err):find("connection refused", 1, true))
        ok = pcall(r.delete, r, "k")
        assert.is_false(ok)
        ok = pcall(r.get_multi, r, { "k" })
        assert.is_false(ok)
    end)

    it("without fail_open, a backend failure names the backend, the operation and the key (API.md)", function()
        local r = cache.make_region():configure("test.failing")
        local ok, err = pcall(r.get, r, "somekey")
        assert.is_false(ok)
        err = tostring(err)
        assert.is_truthy(err:find("test.failing", 1, true), err)
        assert.is_truthy(err:find("get", 1, true), err)
        assert.is_truthy(err:find("somekey", 1, true), err)
        assert.is_truthy(err:find("connection refused", 1, true), err)
    end)

    it("without fail_open, a backend failure ends naming the region, the backend's message whole before it", function()
        local r = cache.make_region({ name = "users" }):configure("test.failing")
        raises_here("test.failing: get 'somekey' failed: connection refused (region 'users')", function() r:get("somekey") end)
        raises_here("test.failing: set 'k' failed: connection refused (region 'users')", function() r:set("k", 1) end)
        raises_here("test.failing: get 'k' failed: connection refused (region 'users')", function() r:get_or_create("k", function() return 1 end) end)
        raises_here("test.failing: get_multi 'a' failed: connection refused (region 'users')", function() r:get_multi({ "a", "b" }) end)
        raises_here("test.failing: set_multi 'a' failed: connection refused (region 'users')", function() r:set_multi({ a = 1 }) end)
        raises_here("test.failing: delete 'k' failed: connection refused (region 'users')", function() r:delete("k") end)
        local u = cache.make_region():configure("test.failing")
        local err = raises_here("test.failing: get 'k' failed: connection refused (region (unnamed))", function() u:get("k") end)
        assert.are.equal(" (region (unnamed))", err:sub(-19))
        assert.are.equal(6 + 1, r:stats().errors + u:stats().errors)
    end)

    it("runs the creator without the lock when the backend's mutex cannot be taken", function()
        capture_log()
        local r = cache.make_region():configure("test.badlock", { fail_open = true })
        local calls = 0
        local function creator()
            calls = calls + 1
            return "v"
        end
        assert.are.equal("v", r:get_or_create("k", creator))
        assert.are.equal(1, calls)
        assert.is_true(r:stats().errors >= 1)
        assert.are.equal("v", r:get_or_create("k", creator))
        assert.are.equal(1, calls)
        assert.are.same({ "A", "B" }, r:get_or_create_multi({ "a", "b" }, function() calls = calls + 1 return { "A", "B" } end))
        assert.are.equal(2, calls)
    end)

    it("runs the creator when get_mutex itself fails", function()
        capture_log()
        local r = cache.make_region():configure("test.badgetmutex", { fail_open = true })
        local calls = 0
        assert.are.equal("v", r:get_or_create("k", function() calls = calls + 1 return "v" end))
        assert.are.equal(1, calls)
        assert.is_true(r:stats().errors >= 1)
    end)

    it("without fail_open, a failing lock raises and the creator does not run", function()
        local r = cache.make_region():configure("test.badlock")
        local calls = 0
        local ok, err = pcall(r.get_or_create, r, "k", function() calls = calls + 1 return "v" end)
        assert.is_false(ok)
        assert.is_truthy(tostring(err):find("lock server down", 1, true))
        assert.are.equal(0, calls)
    end)

    it("does not hide a creator's error", function()
        capture_log()
        local r = cache.make_region():configure("test.failing", { fail_open = true })
        local boom = {}
        local ok, err = pcall(r.get_or_create, r, "k", function() error(boom) end)
        assert.is_false(ok)
        assert.is_true(rawequal(boom, err))
    end)
end)

-- -- stats ----------------------------------------------------------------------------------

describe("region stats", function()
    support.no_leaks()

    it("starts at zero with every counter", function()
        local r = memory_region()
        assert.are.same({ hits = 0, misses = 0, creations = 0, stale_served = 0, lock_waits = 0,
                          errors = 0, evictions = 0, lock_overruns = 0, stale_on_error = 0,
                          early_refreshes = 0 }, r:stats())
    end)

    it("counts hits, misses and creations", function()
        local r = memory_region()
        local function creator() return 1 end
        r:get("a")                   -- miss
        r:get_or_create("a", creator) -- miss, creation
        r:get_or_create("a", creator) -- hit
        r:get("a")                   -- hit
        local st = r:stats()
        assert.are.equal(2, st.hits)
        assert.are.equal(2, st.misses)
        assert.are.equal(1, st.creations)
        assert.are.equal(0, st.stale_served)
        assert.are.equal(0, st.lock_waits)
        assert.are.equal(0, st.errors)
        r:get_multi({ "a", "b" })    -- one hit, one miss
        st = r:stats()
        assert.are.equal(3, st.hits)
        assert.are.equal(3, st.misses)
    end)

    it("counts stale values served and lock waits", function()
        local r = memory_region(nil, { expiration_time = 0.2 })
        local sched = with_scheduler()
        local calls = 0
        local function creator()
            calls = calls + 1
            sched.sleep(0.02)
            return calls
        end
        for _ = 1, 3 do
            sched.spawn(function() r:get_or_create("k", creator) end)
        end
        sched.run()
        local st = r:stats()
        assert.are.equal(1, calls)
        assert.are.equal(2, st.lock_waits)
        assert.are.equal(1, st.creations)
        sleep(0.25)
        for _ = 1, 3 do
            sched.spawn(function() r:get_or_create("k", creator) end)
        end
        sched.run()
        st = r:stats()
        assert.are.equal(2, calls)
        assert.are.equal(2, st.stale_served)
        assert.are.equal(2, st.creations)
        assert.are.equal(2, st.lock_waits)
    end)

    it("counts get_or_create_multi: one lookup per distinct key, one creation per creator call", function()
        local r = memory_region()
        r:set("b", "B")
        r:get_or_create_multi({ "a", "b", "c", "a" }, function() return { "A", "C" } end)
        local st = r:stats()
        assert.are.equal(1, st.hits)
        assert.are.equal(2, st.misses)
        assert.are.equal(1, st.creations)
    end)

    it("counts a creator's error in errors", function()
        local r = memory_region()
        pcall(r.get_or_create, r, "k", function() error("no") end)
        local st = r:stats()
        assert.are.equal(1, st.errors)
        assert.are.equal(1, st.creations)
    end)

    it("reports the memory backend's evictions", function()
        local r = memory_region(nil, { arguments = { max_items = 2 } })
        r:set("a", 1)
        r:set("b", 2)
        assert.are.equal(0, r:stats().evictions)
        r:set("c", 3)
        r:set("d", 4)
        assert.are.equal(2, r:stats().evictions)
    end)

    it("starts again from zero when the region is configured again", function()
        local r = memory_region()
        r:get("a")
        assert.are.equal(1, r:stats().misses)
        r:configure("dogpile.cache.memory", { replace_existing_backend = true })
        assert.are.equal(0, r:stats().misses)
    end)
end)

-- -- configure ------------------------------------------------------------------------------

describe("region configuration", function()
    support.no_leaks()

    it("exposes is_configured, name, expiration_time, key_mangler", function()
        local function mangler(k) return "x" .. k end
        local r = cache.make_region({ name = "users", key_mangler = mangler })
        assert.is_false(r.is_configured)
        assert.are.equal("users", r.name)
        assert.are.equal(r, r:configure("dogpile.cache.memory", { expiration_time = 30 }))
        assert.is_true(r.is_configured)
        assert.are.equal(30, r.expiration_time)
        assert.are.equal(mangler, r.key_mangler)
        local plain = memory_region()
        assert.is_nil(plain.name)
        assert.is_nil(plain.expiration_time)
        assert.is_nil(plain.key_mangler)
    end)

    it("the name is a label: it does not prefix keys", function()
        local r = memory_region({ name = "users" })
        r:set("k", 1)
        assert.are.equal(1, r.actual_backend:get("k").payload)
    end)

    it("key_mangler = 'sha1' makes region.key_mangler the SHA-1 mangler", function()
        local r = memory_region({ key_mangler = "sha1" })
        assert.is_function(r.key_mangler)
        assert.are.equal(util.sha1_mangle_key("some key"), r.key_mangler("some key"))
    end)

    it("takes the backend's key_mangler when the region has none", function()
        cache.register_backend("test.mangling", function()
            local store = {}
            return {
                key_mangler = function(k) return "backend:" .. k end,
                get = function(_, k) local v = store[k]; if v == nil then return NO_VALUE end return v end,
                set = function(_, k, v) store[k] = v end,
                delete = function(_, k) store[k] = nil end,
                store = store,
            }
        end)
        local r = cache.make_region():configure("test.mangling")
        r:set("k", 1)
        assert.is_not_nil(r.actual_backend.store["backend:k"])
        assert.are.equal(1, r:get("k"))
        local own = cache.make_region({ key_mangler = function(k) return "own:" .. k end })
            :configure("test.mangling")
        own:set("k", 2)
        assert.is_not_nil(own.actual_backend.store["own:k"])
        assert.is_nil(own.actual_backend.store["backend:k"])
    end)

    it("region.backend is the outermost proxy, region.actual_backend the backend itself", function()
        local P = ProxyBackend:extend({})
        local r = memory_region(nil, { wrap = { P } })
        assert.are.equal(P, getmetatable(r.backend))
        assert.are.equal(r.actual_backend, r.backend.proxied)
        assert.is_not.equal(r.backend, r.actual_backend)
        local plain = memory_region()
        assert.are.equal(plain.backend, plain.actual_backend)
    end)

    it("raises on an unknown backend", function()
        local r = cache.make_region()
        raises_here("dogpile.cache:", function() r:configure("no.such.backend") end, "no.such.backend")
        assert.is_false(r.is_configured)
    end)

    it("raises when configured twice, unless replace_existing_backend", function()
        local r = memory_region()
        r:set("k", "v")
        raises_here("dogpile.cache:", function() r:configure("dogpile.cache.memory") end, "already configured")
        assert.are.equal("v", r:get("k"))
        r:configure("dogpile.cache.null", { replace_existing_backend = true, expiration_time = 5 })
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal(5, r.expiration_time)
        r:configure("dogpile.cache.memory", { replace_existing_backend = true })
        assert.is_nil(r.expiration_time)
        r:set("k", "again")
        assert.are.equal("again", r:get("k"))
    end)

    it("raises on an unconfigured region", function()
        local r = cache.make_region({ name = "lonely" })
        raises_here("dogpile.cache:", function() r:get("k") end, "not configured")
        raises_here("dogpile.cache:", function() r:set("k", 1) end, "not configured")
        raises_here("dogpile.cache:", function() r:get_or_create("k", print) end, "not configured")
        raises_here("dogpile.cache:", function() local _ = r.backend end, "not configured")
    end)

    it("raises on a non-number expiration_time", function()
        local r = cache.make_region()
        raises_here("dogpile.cache:", function() r:configure("dogpile.cache.memory", { expiration_time = "60" }) end, "expiration_time")
        assert.is_false(r.is_configured)
        local m = memory_region()
        raises_here("dogpile.cache:", function() m:get("k", "soon") end, "expiration_time")
        raises_here("dogpile.cache:", function() m:get_or_create("k", print, "soon") end, "expiration_time")
        raises_here("dogpile.cache:", function() m:get_multi({ "k" }, {}) end, "expiration_time")
        raises_here("dogpile.cache:", function() m:get_or_create_multi({ "k" }, print, "soon") end, "expiration_time")
    end)

    it("raises on a creator that is not a function", function()
        local m = memory_region()
        raises_here("dogpile.cache:", function() m:get_or_create("k", 5) end, "creator")
        raises_here("dogpile.cache:", function() m:get_or_create("k") end, "creator")
        raises_here("dogpile.cache:", function() m:get_or_create_multi({ "k" }, "no") end, "creator")
        raises_here("dogpile.cache:", function() m:get_or_create("k", print, nil, 7) end, "should_cache_fn")
    end)

    it("raises on a key that is not a string", function()
        local m = memory_region()
        raises_here("dogpile.cache:", function() m:get(1) end, "key")
        raises_here("dogpile.cache:", function() m:get({}) end, "key")
        raises_here("dogpile.cache:", function() m:set(1, "v") end, "key")
        raises_here("dogpile.cache:", function() m:set({}, "v") end, "key")
        raises_here("dogpile.cache:", function() m:delete(2) end, "key")
        raises_here("dogpile.cache:", function() m:get_or_create(3, print) end, "key")
        raises_here("dogpile.cache:", function() m:get_multi({ "a", 4 }) end, "key")
        raises_here("dogpile.cache:", function() m:set_multi({ [5] = "v" }) end, "key")
        raises_here("dogpile.cache:", function() m:get_or_create_multi({ "a", {} }, print) end, "key")
        raises_here("dogpile.cache:", function() m:get_value_metadata(6) end, "key")
        raises_here("dogpile.cache:", function() m:get_multi("a") end, "keys")
        assert.are.equal(0, tonumber(C.dp_lock_count()))
    end)

    it("raises on an unknown option name", function()
        raises_here("dogpile.cache:", function() cache.make_region({ nmae = "x" }) end, "nmae")
        local r = cache.make_region()
        raises_here("dogpile.cache:", function() r:configure("dogpile.cache.memory", { expiraton_time = 5 }) end, "expiraton_time")
        assert.is_false(r.is_configured)
    end)

    it("raises on a bad option type", function()
        raises_here("dogpile.cache:", function() cache.make_region({ key_mangler = 5 }) end, "key_mangler")
        raises_here("dogpile.cache:", function() cache.make_region({ async_creation_runner = "x" }) end, "async_creation_runner")
        local r = cache.make_region()
        raises_here("dogpile.cache:", function() r:configure("dogpile.cache.memory", { arguments = "x" }) end, "arguments")
        raises_here("dogpile.cache:", function() r:configure(42) end, "backend")
    end)

    it("configure_from_config reads a flat table with a prefix and coerces strings", function()
        local r = cache.make_region()
        r:configure_from_config({
            ["cache.local.backend"] = "dogpile.cache.memory",
            ["cache.local.expiration_time"] = "60",
            ["cache.local.arguments.max_items"] = "2",
            ["cache.other.backend"] = "dogpile.cache.null",
        }, "cache.local.")
        assert.is_true(r.is_configured)
        assert.are.equal(60, r.expiration_time)
        assert.are.equal("number", type(r.expiration_time))
        r:set("a", 1)
        r:set("b", 2)
        r:set("c", 3)
        assert.are.equal(NO_VALUE, r:get("a"))
        assert.are.equal(1, r:stats().evictions)
    end)

    it("configure_from_config passes coerced arguments.<name> to the backend", function()
        local captured
        cache.register_backend("test.capture", function(args)
            captured = args
            return { get = function() return NO_VALUE end, set = function() end, delete = function() end }
        end)
        local r = cache.make_region()
        r:configure_from_config({
            ["p.backend"] = "test.capture",
            ["p.expiration_time"] = "1.5",
            ["p.arguments.int"] = "42",
            ["p.arguments.neg"] = "-7",
            ["p.arguments.float"] = "1.5",
            ["p.arguments.exp"] = "1e3",
            ["p.arguments.yes"] = "true",
            ["p.arguments.no"] = "FALSE",
            ["p.arguments.mixed"] = "True",
            ["p.arguments.none"] = "None",
            ["p.arguments.spaced"] = " 12 ",
            ["p.arguments.host"] = "127.0.0.1",
            ["p.arguments.word"] = "hello",
            ["p.arguments.number"] = 9,
            ["q.arguments.other"] = "not mine",
        }, "p.")
        assert.are.equal(1.5, r.expiration_time)
        assert.are.same({
            int = 42, neg = -7, float = 1.5, exp = 1000, yes = true, no = false, mixed = true,
            spaced = 12, host = "127.0.0.1", word = "hello", number = 9,
        }, captured)
        assert.is_nil(captured.none)
        assert.is_nil(captured.other)
    end)

    it("configure_from_config: 'None' expiration_time means never, replace_existing_backend coerced", function()
        local r = memory_region(nil, { expiration_time = 5 })
        r:configure_from_config({
            ["x.backend"] = "dogpile.cache.memory",
            ["x.expiration_time"] = "None",
            ["x.replace_existing_backend"] = "true",
        }, "x.")
        assert.is_nil(r.expiration_time)
        raises_here("dogpile.cache:", function() r:configure_from_config({ ["x.backend"] = "dogpile.cache.memory" }, "x.") end, "already configured")
        local s = cache.make_region()
        raises_here("dogpile.cache:", function() s:configure_from_config({ ["x.backend"] = "dogpile.cache.memory", ["x.expiration_time"] = "soon" }, "x.") end, "expiration_time")
        raises_here("dogpile.cache:", function() s:configure_from_config({ ["y.backend"] = "dogpile.cache.memory" }, "x.") end, "x.backend")
    end)

    it("register_backend rejects a bad name or factory", function()
        raises_here("dogpile.cache:", function() cache.register_backend(5, function() end) end, "name")
        raises_here("dogpile.cache:", function() cache.register_backend("test.bad", 5) end, "factory")
    end)
end)

-- -- load_regions ---------------------------------------------------------------------------

describe("cache.load_regions", function()
    support.no_leaks()

    it("builds configured regions from a Lua config file", function()
        local regions = cache.load_regions(FIXTURES .. "regions.lua")
        local names = {}
        for name, r in pairs(regions) do
            names[#names + 1] = name
            assert.is_true(r.is_configured)
            assert.are.equal(name, r.name)
        end
        table.sort(names)
        assert.are.same({ "custom", "hashed", "nothing", "short" }, names)

        local short = regions.short
        assert.are.equal(30, short.expiration_time)
        short:set("a", 1)
        short:set("b", 2)
        short:set("c", 3)
        assert.are.equal(1, short:stats().evictions)
        assert.are.equal(NO_VALUE, short:get("a"))

        local hashed = regions.hashed
        assert.are.equal(60, hashed.expiration_time)
        assert.are.equal(util.sha1_mangle_key("abc"), hashed.key_mangler("abc"))
        hashed:set("abc", "v")
        assert.are.equal("v", hashed.actual_backend:get("a9993e364706816aba3e25717850c26c9cd0d89d").payload)

        local custom = regions.custom
        assert.are.equal("m/k", custom.key_mangler("k"))
        assert.are.equal("fixture:ns:a,1", custom.function_key_generator("ns", print)("a", 1))
        assert.are.equal("Recording", getmetatable(custom.backend).fixture_name)
        assert.are.equal(custom.actual_backend, custom.backend.proxied)
        custom:set("k", "v")
        assert.are.equal("v", custom:get("k"))
        assert.are.same({ "m/k" }, custom.backend.seen)
        assert.are.equal("v", custom.actual_backend:get("m/k").payload)

        local nothing = regions.nothing
        nothing:set("k", 1)
        assert.are.equal(NO_VALUE, nothing:get("k"))
    end)

    it("builds regions from a table", function()
        local calls = 0
        local regions = cache.load_regions({
            one = { backend = "dogpile.cache.memory", expiration_time = 10, name = "renamed" },
            two = {
                backend = "dogpile.cache.memory",
                async_creation_runner = function(region, key, creator, mutex)
                    calls = calls + 1
                    region:set(key, creator())
                    mutex:release()
                end,
                fail_open = true,
            },
        })
        assert.are.equal(10, regions.one.expiration_time)
        assert.are.equal("renamed", regions.one.name)
        assert.are.equal("two", regions.two.name)
        assert.is_true(regions.two.fail_open)
        regions.two:set("k", "old")
        regions.two:invalidate(false)
        assert.are.equal("old", regions.two:get_or_create("k", function() return "new" end))
        assert.are.equal(1, calls)
        assert.are.equal("new", regions.two:get("k"))
    end)

    it("raises on a file that does not exist, naming it", function()
        local path = FIXTURES .. "no_such_regions.lua"
        raises_here("dogpile.cache:", function() cache.load_regions(path) end, "no_such_regions.lua")
    end)

    it("raises on a file that raises, with its error", function()
        raises_here("dogpile.cache:", function() cache.load_regions(FIXTURES .. "regions_raising.lua") end, "regions_raising.lua", "fixture config exploded")
    end)

    it("raises on a file that does not return a table", function()
        raises_here("dogpile.cache:", function() cache.load_regions(FIXTURES .. "regions_not_table.lua") end, "table")
    end)

    it("raises on an unknown option, naming it and the region", function()
        raises_here("dogpile.cache:", function() cache.load_regions(FIXTURES .. "regions_bad_option.lua") end, "expiraton_time", "typo")
        raises_here("dogpile.cache:", function() cache.load_regions({ r = { backend = "dogpile.cache.memory", colour = "red" } }) end, "colour")
    end)

    it("raises on a missing or unknown backend", function()
        raises_here("dogpile.cache:", function() cache.load_regions({ r = { expiration_time = 5 } }) end, "backend")
        raises_here("dogpile.cache:", function() cache.load_regions({ r = { backend = "no.such" } }) end, "no.such")
        raises_here("dogpile.cache:", function() cache.load_regions(42) end, "number")
    end)
end)

-- -- ProxyBackend and wrap ------------------------------------------------------------------

describe("ProxyBackend and wrap", function()
    support.no_leaks()

    local function tracer(tag, log)
        return ProxyBackend:extend({
            get = function(self, key)
                log[#log + 1] = tag .. " get " .. key
                return self.proxied:get(key)
            end,
            set = function(self, key, value)
                log[#log + 1] = tag .. " set " .. key
                return self.proxied:set(key, value)
            end,
        })
    end

    it("a proxy class forwards what it does not override", function()
        local log = {}
        local A = tracer("A", log)
        local r = memory_region(nil, { wrap = { A } })
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
        r:delete("k")
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.same({ "A set k", "A get k", "A get k" }, log)
    end)

    it("region:wrap after configure puts the proxy in front of every read", function()
        for _, conf in ipairs({ { "dogpile.cache.memory", {} },
                                { "dogpile.cache.memory", { expiration_time = 60 } },
                                { "dogpile.cache.shared_memory",
                                  { expiration_time = 60, arguments = { name = "wrap_spec" } } } }) do
            local log = {}
            local r = cache.make_region():configure(conf[1], conf[2])
            r:set("k", "v")
            r:wrap(tracer("A", log))
            assert.are.equal("v", r:get("k"))
            assert.are.equal("v", r:get_or_create("k", function() return "new" end))
            assert.are.same({ "A get k", "A get k" }, log, conf[1])
        end
    end)

    it("{A, B} gives A(B(backend)): A sees every call first", function()
        local log = {}
        local A, B = tracer("A", log), tracer("B", log)
        local r = memory_region(nil, { wrap = { A, B } })
        assert.are.equal(A, getmetatable(r.backend))
        assert.are.equal(B, getmetatable(r.backend.proxied))
        assert.are.equal(r.actual_backend, r.backend.proxied.proxied)
        r:set("k", 1)
        r:get("k")
        assert.are.same({ "A set k", "B set k", "A get k", "B get k" }, log)
    end)

    it("accepts instances made with Class.new() as well as classes", function()
        local log = {}
        local A, B = tracer("A", log), tracer("B", log)
        local a = A.new()
        local r = memory_region(nil, { wrap = { a, B } })
        assert.are.equal(a, r.backend)
        r:set("k", 1)
        assert.are.same({ "A set k", "B set k" }, log)
    end)

    it("can change values on their way in and out", function()
        local Upper = ProxyBackend:extend({
            get = function(self, key)
                local v = self.proxied:get(key)
                if v ~= NO_VALUE and type(v.payload) == "string" then
                    return cache.CachedValue.new(v.payload:upper(), v.metadata)
                end
                return v
            end,
        })
        local r = memory_region(nil, { wrap = { Upper } })
        r:set("k", "quiet")
        assert.are.equal("QUIET", r:get("k"))
        assert.are.equal("QUIET", r:get_or_create("k", function() error("not called") end))
    end)

    it("forwards the multi methods", function()
        local log = {}
        local Multi = ProxyBackend:extend({
            get_multi = function(self, keys)
                log[#log + 1] = "get_multi " .. table.concat(keys, ",")
                return self.proxied:get_multi(keys)
            end,
            set_multi = function(self, mapping)
                local ks = {}
                for k in pairs(mapping) do ks[#ks + 1] = k end
                table.sort(ks)
                log[#log + 1] = "set_multi " .. table.concat(ks, ",")
                return self.proxied:set_multi(mapping)
            end,
            delete_multi = function(self, keys)
                log[#log + 1] = "delete_multi " .. table.concat(keys, ",")
                return self.proxied:delete_multi(keys)
            end,
        })
        local Plain = ProxyBackend:extend({})
        local r = memory_region(nil, { wrap = { Multi, Plain } })
        r:set_multi({ a = 1, b = 2 })
        assert.are.same({ 1, 2, NO_VALUE }, r:get_multi({ "a", "b", "c" }))
        r:delete_multi({ "a" })
        assert.are.same({ NO_VALUE, 2 }, r:get_multi({ "a", "b" }))
        assert.are.same({ "set_multi a,b", "get_multi a,b,c", "delete_multi a", "get_multi a,b" }, log)
    end)

    it("a plain proxy over a backend without multi methods falls back to its single methods", function()
        cache.register_backend("test.dict_for_proxy", "fixtures.dict_backend")
        local r = cache.make_region():configure("test.dict_for_proxy", { wrap = { ProxyBackend:extend({}) } })
        r:set_multi({ a = 1 })
        assert.are.same({ 1, NO_VALUE }, r:get_multi({ "a", "b" }))
        r:delete_multi({ "a" })
        assert.are.same({ "set a", "get a", "get b", "delete a" }, r.actual_backend.calls)
    end)

    it("rejects something that is not a proxy class or instance in wrap", function()
        local r = cache.make_region()
        raises_here("dogpile.cache:", function() r:configure("dogpile.cache.memory", { wrap = { {} } }) end, "wrap")
    end)
end)

-- -- Lua backends ----------------------------------------------------------------------------

describe("Lua backends through register_backend", function()
    support.no_leaks()

    it("uses a factory, handing it the arguments", function()
        local got
        cache.register_backend("test.factory", function(args)
            got = args
            return require("fixtures.dict_backend").new(args)
        end)
        local r = cache.make_region():configure("test.factory", { arguments = { color = "blue" } })
        assert.are.same({ color = "blue" }, got)
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
    end)

    it("loads a module that returns a table with .new(arguments)", function()
        cache.register_backend("test.module_new", "fixtures.dict_backend")
        local r = cache.make_region():configure("test.module_new", { arguments = { x = 1 } })
        assert.are.same({ x = 1 }, r.actual_backend.arguments)
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
        assert.are.same({ "set k", "get k" }, r.actual_backend.calls)
    end)

    it("loads a module that returns a factory", function()
        cache.register_backend("test.module_factory", "fixtures.factory_backend")
        local r = cache.make_region():configure("test.module_factory", { arguments = { y = 2 } })
        assert.is_true(r.actual_backend.from_factory_module)
        assert.are.same({ y = 2 }, r.actual_backend.arguments)
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
    end)

    it("raises on a module that cannot be loaded or a factory that returns no backend", function()
        cache.register_backend("test.missing_module", "fixtures.no_such_backend")
        local r = cache.make_region()
        raises_here("dogpile.cache:", function() r:configure("test.missing_module") end, "fixtures.no_such_backend")
        cache.register_backend("test.returns_nothing", function() return nil end)
        raises_here("dogpile.cache:", function() r:configure("test.returns_nothing") end, "test.returns_nothing")
        assert.is_false(r.is_configured)
    end)

    it("a backend without multi methods works through the region's loops", function()
        cache.register_backend("test.dict", "fixtures.dict_backend")
        local r = cache.make_region():configure("test.dict")
        r:set_multi({ a = 1, b = 2 })
        assert.are.same({ 1, 2, NO_VALUE }, r:get_multi({ "a", "b", "c" }))
        r:delete_multi({ "a", "b" })
        assert.are.same({ NO_VALUE, NO_VALUE }, r:get_multi({ "a", "b" }))
        local calls = 0
        local res = r:get_or_create_multi({ "x", "a", "x" }, function(...)
            calls = calls + 1
            return { "X", "A" }
        end)
        assert.are.same({ "X", "A", "X" }, res)
        assert.are.equal(1, calls)
        assert.are.same({ "X", "A" }, r:get_multi({ "x", "a" }))
        local log = r.actual_backend.calls
        local sets = {}
        for _, c in ipairs(log) do
            if c:match("^set ") then sets[#sets + 1] = c end
        end
        table.sort(sets)
        assert.are.same({ "set a", "set a", "set b", "set x" }, sets)
    end)

    it("a backend returning nil for a miss is read as NO_VALUE", function()
        cache.register_backend("test.nil_miss", function()
            local store = {}
            return {
                get = function(_, k) return store[k] end,
                set = function(_, k, v) store[k] = v end,
                delete = function(_, k) store[k] = nil end,
            }
        end)
        local r = cache.make_region():configure("test.nil_miss")
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.same({ NO_VALUE }, r:get_multi({ "k" }))
        local calls = 0
        assert.are.equal(1, r:get_or_create("k", function() calls = calls + 1 return 1 end))
        assert.are.equal(1, r:get_or_create("k", function() calls = calls + 1 return 1 end))
        assert.are.equal(1, calls)
    end)

    it("a backend with get_mutex: the region takes that mutex, not its own", function()
        local mutexes, log = {}, {}
        local Mutex = {}
        Mutex.__index = Mutex
        function Mutex:acquire(wait)
            log[#log + 1] = "acquire " .. self.key .. " " .. tostring(wait)
            if self.held then
                return false
            end
            self.held = true
            return true
        end
        function Mutex:release()
            log[#log + 1] = "release " .. self.key
            assert(self.held, "release of a mutex that is not held")
            self.held = false
        end
        cache.register_backend("test.with_mutex", function()
            local b = require("fixtures.dict_backend").new({})
            function b:get_mutex(key)
                local m = mutexes[key]
                if not m then
                    m = setmetatable({ key = key, held = false }, Mutex)
                    mutexes[key] = m
                end
                return m
            end
            return b
        end)
        local r = cache.make_region({ key_mangler = function(k) return "m:" .. k end })
            :configure("test.with_mutex")
        local calls = 0
        local held_inside, core_locks_inside
        assert.are.equal("v", r:get_or_create("k", function()
            calls = calls + 1
            held_inside = mutexes["m:k"] and mutexes["m:k"].held
            core_locks_inside = tonumber(C.dp_lock_count())
            return "v"
        end))
        assert.are.equal(1, calls)
        assert.is_true(held_inside)
        assert.are.equal(0, core_locks_inside)
        assert.is_false(mutexes["m:k"].held)
        assert.are.equal("release m:k", log[#log])
        assert.is_truthy(log[1]:match("^acquire m:k"))

        log = {}
        local res = r:get_or_create_multi({ "a", "b" }, function(...)
            calls = calls + 1
            assert.is_true(mutexes["m:a"].held and mutexes["m:b"].held)
            assert.are.equal(0, tonumber(C.dp_lock_count()))
            return { "A", "B" }
        end)
        assert.are.same({ "A", "B" }, res)
        assert.are.equal(2, calls)
        assert.is_false(mutexes["m:a"].held)
        assert.is_false(mutexes["m:b"].held)
    end)
end)

-- -- Backends that store bytes -----------------------------------------------------------------

-- A Lua backend that stores strings only (serialized = true) and checks it.
cache.register_backend("test.bytes", function()
    local store = {}
    return {
        serialized = true,
        store = store,
        get = function(_, k)
            local v = store[k]
            if v == nil then
                return NO_VALUE
            end
            return v
        end,
        set = function(_, k, v)
            assert(type(v) == "string", "test.bytes: set was handed a " .. type(v))
            store[k] = v
        end,
        delete = function(_, k) store[k] = nil end,
    }
end)

-- A tiny codec for strings, numbers, booleans and nil.
local function serialize(v)
    local t = type(v)
    if t == "string" then
        return "s" .. v
    elseif t == "number" then
        return "n" .. string.format("%.17g", v)
    elseif t == "boolean" then
        return v and "T" or "F"
    elseif t == "nil" then
        return "0"
    end
    error("cannot serialize a " .. t, 0)
end

local function deserialize(b)
    local tag, rest = b:sub(1, 1), b:sub(2)
    if tag == "s" then
        return rest
    elseif tag == "n" then
        return tonumber(rest)
    elseif tag == "T" then
        return true
    elseif tag == "F" then
        return false
    elseif tag == "0" then
        return nil
    end
    error("cannot deserialize tag " .. tag, 0)
end

describe("region over a backend that stores bytes", function()
    support.no_leaks()

    local function bytes_region(conf)
        return cache.make_region({ serializer = serialize, deserializer = deserialize })
            :configure("test.bytes", conf)
    end

    it("hands the backend strings and reads values back", function()
        local r = bytes_region()
        r:set("s", "text")
        r:set("n", 1.25)
        r:set("f", false)
        r:set("z", nil)
        for _, k in ipairs({ "s", "n", "f", "z" }) do
            assert.are.equal("string", type(r.actual_backend.store[k]))
        end
        assert.are.equal("text", r:get("s"))
        assert.are.equal(1.25, r:get("n"))
        assert.is_false(r:get("f"))
        assert.is_nil(r:get("z"))
        assert.are.equal(NO_VALUE, r:get("missing"))
        r:set_multi({ a = "A", b = 2 })
        local res = r:get_multi({ "a", "b", "c" })
        assert.are.equal("A", res[1])
        assert.are.equal(2, res[2])
        assert.are.equal(NO_VALUE, res[3])
        local cv = r:get_value_metadata("s")
        assert.are.equal("text", cv.payload)
        assert.is_number(cv.metadata.ct)
        assert.is_number(cv.metadata.v)
    end)

    it("keeps the created time through the bytes: expiration and invalidation work", function()
        local r = bytes_region({ expiration_time = 0.2 })
        local calls = 0
        local function creator()
            calls = calls + 1
            return "v" .. calls
        end
        assert.are.equal("v1", r:get_or_create("k", creator))
        assert.are.equal("v1", r:get_or_create("k", creator))
        sleep(0.25)
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal("v1", r:get("k", nil, true))
        assert.are.equal("v2", r:get_or_create("k", creator))
        r:invalidate()
        assert.are.equal("v3", r:get_or_create("k", creator))
        assert.are.equal(3, calls)
    end)

    it("counts bytes that do not decode as a miss and an error", function()
        capture_log()
        local r = bytes_region()
        r.actual_backend.store["junk"] = "not a dogpile value"
        assert.are.equal(NO_VALUE, r:get("junk"))
        assert.are.equal(1, r:stats().errors)
        r:set("k", "v")
        -- a payload the deserializer refuses
        local good = r.actual_backend.store["k"]
        r.actual_backend.store["bad"] = good:sub(1, #good - 2) .. "?x"
        assert.are.equal(NO_VALUE, r:get("bad"))
        assert.are.equal(2, r:stats().errors)
        local calls = 0
        assert.are.equal("fresh", r:get_or_create("junk", function() calls = calls + 1 return "fresh" end))
        assert.are.equal(1, calls)
        assert.are.equal("fresh", r:get("junk"))
    end)

    it("proxies see the bytes the backend sees", function()
        local seen = {}
        local Spy = ProxyBackend:extend({
            set = function(self, k, v)
                seen[#seen + 1] = type(v)
                return self.proxied:set(k, v)
            end,
        })
        local r = bytes_region({ wrap = { Spy } })
        r:set("k", "v")
        assert.are.same({ "string" }, seen)
        assert.are.equal("v", r:get("k"))
    end)

    it("raises when the serializer returns something other than a string", function()
        local r = cache.make_region({ serializer = function() return 42 end, deserializer = deserialize })
            :configure("test.bytes")
        raises_here("dogpile.cache:", function() r:set("k", "v") end, "serializer")
    end)
end)

describe("async_creation_runner errors", function()
    support.no_leaks()

    it("a runner that raises: the error propagates and the lock is released", function()
        local boom = { runner = true }
        local r = cache.make_region({
            async_creation_runner = function() error(boom) end,
        }):configure("dogpile.cache.memory", { expiration_time = 0.2 })
        r:set("k", "old")
        sleep(0.25)
        local ok, err = pcall(r.get_or_create, r, "k", function() return "new" end)
        assert.is_false(ok)
        assert.is_true(rawequal(boom, err))
        assert.are.equal(0, tonumber(C.dp_lock_count()))
    end)
end)

-- -- Issue 19: refusals and the locks around a creator ----------------------------

describe("region get_or_create_multi and the creator's array", function()
    support.no_leaks()

    it("refuses an array with too few values, naming the counts, and stores nothing", function()
        local r = memory_region()
        local calls = 0
        local err = raises_here("dogpile.cache: get_or_create_multi:", function() r:get_or_create_multi({ "a", "b", "c" }, function(...) calls = calls + 1 return { "A", "B" } end) end,
                                "expected 3, got 2", "nothing was stored")
        assert.is_string(err)
        assert.are.equal(1, calls)
        assert.are.same({ NO_VALUE, NO_VALUE, NO_VALUE }, r:get_multi({ "a", "b", "c" }))
        assert.is_nil(next(r.actual_backend._cache), "nothing stored")
        assert.are.equal(1, r:stats().errors)
        -- The locks were released: the same keys are created at once.
        assert.are.same({ 1, 2, 3 }, r:get_or_create_multi({ "a", "b", "c" }, function() return { 1, 2, 3 } end))
    end)

    it("refuses an array with too many values", function()
        local r = memory_region()
        raises_here("dogpile.cache: get_or_create_multi:", function() r:get_or_create_multi({ "a", "b" }, function() return { 1, 2, 3 } end) end,
                    "expected 2, got 3")
        assert.are.same({ NO_VALUE, NO_VALUE }, r:get_multi({ "a", "b" }))
    end)

    it("counts only the keys still to create, and a nil value given with n is cached as nil", function()
        local r = memory_region()
        r:set("a", "A")
        local got
        local res = r:get_or_create_multi({ "a", "b", "c" }, function(...)
            got = { ... }
            return { n = 2, nil, "C" }
        end)
        assert.are.same({ "b", "c" }, got)
        assert.are.equal("A", res[1])
        assert.is_nil(res[2])
        assert.are.equal("C", res[3])
        local b = r:get("b")
        assert.is_nil(b)
        assert.is_false(rawequal(NO_VALUE, b))
        -- A nil in the middle is a value too: the array runs to its last one.
        local res2 = r:get_or_create_multi({ "x", "y", "z" }, function() return { "X", nil, "Z" } end)
        assert.are.equal("X", res2[1])
        assert.are.equal("Z", res2[3])
        assert.is_nil(r:get("y"))
        assert.is_false(rawequal(NO_VALUE, r:get("y")))
    end)

    it("releases a backend's own locks when the count is wrong", function()
        local held, acquired, released = {}, 0, 0
        cache.register_backend("test.count_locks", function()
            local b = require("fixtures.dict_backend").new({})
            b.get_mutex = function(_, key)
                return {
                    acquire = function() acquired = acquired + 1 held[key] = true return true end,
                    release = function() released = released + 1 held[key] = nil end,
                }
            end
            return b
        end)
        local r = cache.make_region():configure("test.count_locks")
        assert.has_error(function()
            r:get_or_create_multi({ "a", "b" }, function() return { 1 } end)
        end)
        assert.are.equal(2, acquired)
        assert.are.equal(2, released)
        assert.is_nil(next(held))
    end)

    it("through cache_multi_on_arguments: a function returning too few values is an error", function()
        local r = memory_region()
        local calls = 0
        local f = r:cache_multi_on_arguments()(function(...)
            calls = calls + 1
            return { "one" }
        end)
        raises_here("dogpile.cache: get_or_create_multi:", function() f(1, 2) end, "expected 2, got 1")
        assert.are.equal(1, calls)
        assert.are.same({ NO_VALUE, NO_VALUE }, f:get(1, 2))
    end)
end)

describe("expiration times that are not finite", function()
    support.no_leaks()

    local NAN, INF = 0 / 0, math.huge

    it("are refused by configure, configure_from_config and load_regions", function()
        for _, case in ipairs { { NAN, "got nan" }, { INF, "got math.huge" }, { -INF, "got -math.huge" } } do
            local bad = case[1]
            local r = cache.make_region()
            raises_here("dogpile.cache: configure: expiration_time must be a finite number", function() r:configure("dogpile.cache.memory", { expiration_time = bad }) end, case[2])
            assert.is_false(r.is_configured)
        end
        for _, s in ipairs { "inf", "-inf", "nan" } do
            local r = cache.make_region()
            raises_here("dogpile.cache: configure_from_config: cache.expiration_time must be a finite", function() r:configure_from_config({ ["cache.backend"] = "dogpile.cache.memory", ["cache.expiration_time"] = s }, "cache.") end)
        end
        raises_here("dogpile.cache: load_regions: region 'r' in the given table: configure: expiration_time must be a finite", function() cache.load_regions({ r = { backend = "dogpile.cache.memory", expiration_time = INF } }) end)
    end)

    it("are refused by get, get_multi, get_value_metadata, get_or_create and get_or_create_multi", function()
        local r = memory_region()
        r:set("k", "v")
        local calls = 0
        local function creator() calls = calls + 1 return "new" end
        for _, bad in ipairs { NAN, INF, -INF } do
            raises_here("dogpile.cache: get: expiration_time must be a finite number", function() r:get("k", bad) end, "-1: never expires")
            raises_here("dogpile.cache: get_multi: expiration_time must be a finite", function() r:get_multi({ "k" }, bad) end)
            raises_here("dogpile.cache: get_value_metadata: expiration_time must be a finite", function() r:get_value_metadata("k", bad) end)
            raises_here("dogpile.cache: get_or_create: expiration_time must be a finite", function() r:get_or_create("k", creator, bad) end)
            raises_here("dogpile.cache: get_or_create_multi: expiration_time must be a finite", function() r:get_or_create_multi({ "k" }, creator, bad) end)
        end
        assert.are.equal(0, calls)
        -- -1 and finite values still work.
        assert.are.equal("v", r:get("k", -1))
        assert.are.equal("v", r:get_or_create("k", creator, 1e9))
    end)

    it("are refused by the decorators, as an option and from an expiration_time function", function()
        local r = memory_region()
        local f = function(x) return x end
        raises_here("dogpile.cache: cache_on_arguments: expiration_time must be a finite", function() r:cache_on_arguments({ expiration_time = INF }) end)
        raises_here("dogpile.cache: cache_multi_on_arguments: expiration_time must be a finite", function() r:cache_multi_on_arguments({ expiration_time = NAN }) end)
        local calls = 0
        local g = r:cache_on_arguments({ expiration_time = function() return NAN end })(function(x)
            calls = calls + 1
            return x
        end)
        raises_here("dogpile.cache: cache_on_arguments: the expiration_time function returned", function() g(1) end, "nan")
        local h = r:cache_multi_on_arguments({ expiration_time = function() return -INF end })(f)
        raises_here("dogpile.cache: cache_multi_on_arguments: the expiration_time function returned", function() h(1) end, "-inf")
        assert.are.equal(0, calls)
        local ok = r:cache_on_arguments({ expiration_time = function() return 60 end })(f)
        assert.are.equal(3, ok(3))
    end)
end)

describe("region:invalidate's argument", function()
    support.no_leaks()

    it("must be a boolean or nil: invalidate('no') is refused, not taken as hard", function()
        local r = memory_region()
        r:set("k", "v")
        sleep(0.002)
        raises_here("dogpile.cache: invalidate: hard must be true, false or nil", function() r:invalidate("no") end, "string")
        raises_here("dogpile.cache: invalidate: hard must be", function() r:invalidate(0) end, "number")
        assert.are.equal("v", r:get("k"))
        assert.is_false(r.region_invalidator:was_hard_invalidated())
        assert.is_false(r.region_invalidator:was_soft_invalidated())
        local s = cache.DefaultInvalidationStrategy.new()
        raises_here("dogpile.cache: invalidate: hard must be", function() s:invalidate("yes") end)
        r:invalidate(false)
        assert.is_true(r.region_invalidator:was_soft_invalidated())
        r:invalidate()
        assert.are.equal(NO_VALUE, r:get("k"))
    end)
end)

describe("a lock release that fails after the creator succeeded", function()
    support.no_leaks()

    -- A backend whose lock cannot be released (its server went away after
    -- the lock was taken, say).
    local function failing_release_region()
        local releases = 0
        cache.register_backend("test.bad_release", function()
            local b = require("fixtures.dict_backend").new({})
            b.get_mutex = function(_, key)
                local m = { held = false }
                function m.acquire() m.held = true return true end
                function m.release()
                    releases = releases + 1
                    m.held = false
                    error("test.bad_release: release of the lock for key '" .. key .. "': connection lost", 0)
                end
                return m
            end
            return b
        end)
        return cache.make_region({ name = "rel" }):configure("test.bad_release"), function() return releases end
    end

    it("is logged, and get_or_create returns the value it stored", function()
        local lines = capture_log()
        local r, releases = failing_release_region()
        local calls = 0
        assert.are.equal("v", r:get_or_create("k", function() calls = calls + 1 return "v" end))
        assert.are.equal(1, calls)
        assert.are.equal(1, releases())
        assert.are.equal("v", r:get("k"))
        assert.are.equal(1, #lines)
        assert.truthy(lines[1]:find("connection lost", 1, true), lines[1])
        assert.truthy(lines[1]:find("key 'k'", 1, true), lines[1])
    end)

    it("is logged by get_or_create_multi too", function()
        local lines = capture_log()
        local r, releases = failing_release_region()
        assert.are.same({ 1, 2 }, r:get_or_create_multi({ "a", "b" }, function() return { 1, 2 } end))
        assert.are.equal(2, releases())
        assert.are.equal(2, #lines)
        assert.are.same({ 1, 2 }, r:get_multi({ "a", "b" }))
    end)

    it("does not hide the creator's own error", function()
        local lines = capture_log()
        local r = failing_release_region()
        local boom = setmetatable({}, { __tostring = function() return "boom" end })
        local ok, err = pcall(r.get_or_create, r, "k", function() error(boom) end)
        assert.is_false(ok)
        assert.are.equal(boom, err)
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal(0, #lines)
    end)

    it("is logged by dogpile.Lock:enter, which returns the value", function()
        local lines = capture_log()
        local m = { acquire = function() return true end,
                    release = function() error("mutex gone", 0) end }
        local lock = dogpile.Lock.new(m, function() return "made", 1 end,
                                      function() error(dogpile.NeedRegenerationException) end, 10)
        assert.are.equal("made", lock:enter())
        assert.are.equal(1, #lines)
        assert.truthy(lines[1]:find("mutex gone", 1, true))
    end)
end)
