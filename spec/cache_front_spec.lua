-- The region side of front.md: a backend with `front = {store = T, sync = fn}`
-- is read through T (after sync) on a hit; anything but a fresh value there
-- is the backend's full read. `backend.invalidator` is the region's when none
-- is given; `stats().tier_hits` comes from `backend:tier_hits(front_hits)`.
-- Also: the read strategy is chosen once, at configure (and at wrap).
local support = require "support"
local cache = require "dogpile.cache"
local proxy = require "dogpile.cache.proxy"
local lib = require "dogpile.lib"

local NO_VALUE = cache.NO_VALUE
local C = lib.C

local function sleep(s)
    C.dp_clock_sleep(s)
end

local seq = 0

-- A region over a fresh front backend (registered under a name of its own).
local function front_region(conf, invalidator)
    seq = seq + 1
    local name = "test.front." .. seq
    local b = support.front_backend(invalidator)
    cache.register_backend(name, function() return b end)
    return cache.make_region({ name = name }):configure(name, conf), b
end

describe("a region over a backend with a front", function()
    support.no_leaks()

    it("reads a hit from the front table after sync, without calling get", function()
        local r, b = front_region({ expiration_time = 60 })
        r:set("k", "v")
        local calls = 0
        for _ = 1, 5 do
            assert.are.equal("v", r:get("k"))
            assert.are.equal("v", r:get_or_create("k", function() calls = calls + 1 end))
        end
        assert.are.equal(0, calls)
        assert.are.equal(0, b.gets)
        assert.are.equal(10, b.syncs)
        local st = r:stats()
        assert.are.equal(10, st.hits)
        assert.are.equal(10, st.front_hits)
        assert.are.equal(0, st.misses)
        assert.are.same({ 10, 0 }, st.tier_hits)
    end)

    it("falls back to the backend's full read on a miss in the front table", function()
        local r, b = front_region()
        b:changed_elsewhere("k", cache.CachedValue.new("below"))
        b.front.sync() -- nothing in T to drop; the value is only below
        assert.are.equal("below", r:get("k"))
        assert.are.equal(1, b.gets)
        assert.are.equal(1, b.tier2)
        -- get promoted it: the next hit is the front's.
        assert.are.equal("below", r:get("k"))
        assert.are.equal(1, b.gets)
        local st = r:stats()
        assert.are.equal(2, st.hits)
        assert.are.equal(1, st.front_hits)
        assert.are.same({ 1, 1 }, st.tier_hits)
    end)

    it("applies what sync reports before reading the front table", function()
        local r, b = front_region()
        r:set("k", "old")
        assert.are.equal("old", r:get("k"))
        b:changed_elsewhere("k", cache.CachedValue.new("new"))
        assert.are.equal("new", r:get("k"))
        assert.are.equal(1, b.gets)
    end)

    it("falls back to the full read for a value that is not fresh in the front table", function()
        local r, b = front_region({ expiration_time = 0.05 })
        r:set("k", "v1")
        sleep(0.07)
        -- T's copy has expired; the tier below has a newer one.
        b.below.k = cache.CachedValue.new("v2")
        local calls = 0
        assert.are.equal("v2", r:get_or_create("k", function() calls = calls + 1 return "v3" end))
        assert.are.equal(0, calls)
        assert.are.equal(1, b.gets)
        -- Expired everywhere: the miss path creates and writes through.
        sleep(0.07)
        assert.are.equal("v3", r:get_or_create("k", function() calls = calls + 1 return "v3" end))
        assert.are.equal(1, calls)
        assert.are.equal("v3", b.below.k.payload)
        assert.are.equal("v3", b.front.store.k.payload)
    end)

    it("get_multi reads the front table, and the backend for the rest", function()
        local r, b = front_region()
        r:set_multi({ a = 1, b = 2 })
        b:changed_elsewhere("c", cache.CachedValue.new(3))
        assert.are.same({ 1, 2, 3, NO_VALUE }, r:get_multi({ "a", "b", "c", "d" }))
        assert.are.equal(2, b.gets)
        local st = r:stats()
        assert.are.equal(3, st.hits)
        assert.are.equal(1, st.misses)
        assert.are.equal(2, st.front_hits)
    end)

    it("judges a value in the front table as every other read: hard and soft invalidation", function()
        local r = front_region({ expiration_time = 60 })
        r:set("k", "v")
        sleep(0.002)
        r:invalidate(false)
        -- Soft: stale, so one caller regenerates and the value is replaced.
        local calls = 0
        assert.are.equal("v2", r:get_or_create("k", function() calls = calls + 1 return "v2" end))
        assert.are.equal(1, calls)
        sleep(0.002)
        r:invalidate()
        assert.are.equal(NO_VALUE, r:get("k"))
    end)

    it("takes the backend's invalidator when configure is given none", function()
        local shared = cache.DefaultInvalidationStrategy.new()
        local r1 = front_region(nil, shared)
        local r2 = front_region(nil, shared)
        assert.are.equal(shared, r1.region_invalidator)
        r1:set("k", 1)
        r2:set("k", 2)
        sleep(0.002)
        r1:invalidate()
        -- Invalidation kept in the backend's object reaches both regions.
        assert.are.equal(NO_VALUE, r1:get("k"))
        assert.are.equal(NO_VALUE, r2:get("k"))
        -- A region_invalidator given to configure wins.
        local mine = cache.DefaultInvalidationStrategy.new()
        local r3 = front_region({ region_invalidator = mine }, shared)
        assert.are.equal(mine, r3.region_invalidator)
    end)

    it("asks an invalidator that is not the default one through its methods", function()
        local at, hard = nil, true
        local inv = {
            invalidate = function(_, h) hard, at = h, C.dp_clock_stamp() end,
            is_invalidated = function(_, ct) return at ~= nil and ct < at end,
            is_hard_invalidated = function(self, ct) return hard and self:is_invalidated(ct) end,
            is_soft_invalidated = function(self, ct) return not hard and self:is_invalidated(ct) end,
            was_hard_invalidated = function() return at ~= nil and hard end,
            was_soft_invalidated = function() return at ~= nil and not hard end,
        }
        local r = front_region(nil, inv)
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
        sleep(0.002)
        r:invalidate(false)
        assert.are.equal(NO_VALUE, r:get("k"))
        -- Soft: stale, so this caller (alone, it takes the lock) regenerates.
        local calls = 0
        assert.are.equal("w", r:get_or_create("k", function() calls = calls + 1 return "w" end))
        assert.are.equal(1, calls)
        sleep(0.002)
        r:invalidate(true)
        assert.are.equal(NO_VALUE, r:get("k"))
    end)

    it("refuses a front that is not {store = table, sync = function or nil}", function()
        cache.register_backend("test.bad_front", function()
            local b = support.front_backend()
            b.front = { store = "nope" }
            return b
        end)
        support.raises_here("dogpile.cache: configure: the backend's front must be", function() cache.make_region():configure("test.bad_front") end)
        cache.register_backend("test.bad_invalidator", function()
            return support.front_backend({ invalidate = function() end })
        end)
        support.raises_here("dogpile.cache: the backend's invalidator has no method", function() cache.make_region():configure("test.bad_invalidator") end)
    end)
end)

describe("the read strategy", function()
    support.no_leaks()

    it("is chosen at configure: memory table, direct, C in place, front, or the generic read", function()
        assert.are.equal("memory", cache.make_region():configure("dogpile.cache.memory")._reader)
        assert.are.equal("direct", cache.make_region():configure("dogpile.cache.memory", {
            arguments = { max_items = 10 } })._reader)
        assert.are.equal("c", cache.make_region():configure("dogpile.cache.shared_memory", {
            arguments = { name = "front_spec" } })._reader)
        assert.are.equal("generic", cache.make_region({
            serializer = function(v) return tostring(v) end, deserializer = function(s) return s end,
        }):configure("dogpile.cache.shared_memory", { arguments = { name = "front_spec" } })._reader)
        assert.are.equal("front", (front_region())._reader)
        assert.are.equal("direct", cache.make_region():configure("dogpile.cache.null")._reader)
        cache.register_backend("test.plain_lua", "fixtures.dict_backend")
        assert.are.equal("generic", cache.make_region():configure("test.plain_lua")._reader)
    end)

    it("is the generic read behind a proxy, given at configure or by wrap later", function()
        local reads = 0
        local Counting = proxy.ProxyBackend:extend({
            get = function(self, key)
                reads = reads + 1
                return self.proxied:get(key)
            end,
        })
        local r, b = front_region({ wrap = { Counting } })
        assert.are.equal("generic", r._reader)
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
        assert.are.equal(1, reads)
        assert.are.equal(1, b.gets)
        local r2, b2 = front_region()
        r2:set("k", "v")
        assert.are.equal("v", r2:get("k"))
        assert.are.equal(0, b2.gets)
        r2:wrap(Counting)
        assert.are.equal("generic", r2._reader)
        assert.are.equal("v", r2:get("k"))
        assert.are.equal(2, reads)
        assert.are.equal(1, b2.gets)
    end)

    it("stays as chosen: a region never re-derives it from the backend on a call", function()
        local r, b = front_region()
        r:set("k", "v")
        -- The backend drops its front after configure: the region keeps the
        -- table it was given (the backend's contract is that T lives as long
        -- as the backend).
        local T = b.front.store
        b.front = nil
        assert.are.equal("v", r:get("k"))
        assert.are.equal(0, b.gets)
        assert.are.equal(T, r._front)
    end)
end)
