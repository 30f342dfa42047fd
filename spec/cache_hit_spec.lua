-- A hit reads the backend once: the flaw dogpile was written to fix in Beaker
-- was a hit that read twice.
local cache = require "dogpile.cache"
local ProxyBackend = require("dogpile.cache.proxy").ProxyBackend
local support = require "support"

local function counting_region(expiration_time)
    local reads = { n = 0 }
    local Counting = ProxyBackend:extend({
        get = function(self, key)
            reads.n = reads.n + 1
            return self.proxied:get(key)
        end,
    })
    local region = cache.make_region():configure("dogpile.cache.memory", {
        expiration_time = expiration_time,
        wrap = { Counting },
    })
    return region, reads
end

describe("a cache hit", function()
    support.no_leaks()

    it("through get_or_create reads the backend once and takes no lock", function()
        local region, reads = counting_region(60)
        region:set("k", "v")
        reads.n = 0
        local calls = 0
        for _ = 1, 10 do
            assert.are.equal("v", region:get_or_create("k", function() calls = calls + 1 end))
        end
        assert.are.equal(10, reads.n)
        assert.are.equal(0, calls)
        assert.are.equal(0, region:stats().lock_waits)
    end)

    it("through get reads the backend once", function()
        local region, reads = counting_region(nil)
        region:set("k", false)
        reads.n = 0
        assert.are.equal(false, region:get("k"))
        assert.are.equal(1, reads.n)
    end)

    it("counts hits and misses by the first read of each lookup", function()
        local region = counting_region(60)
        region:get_or_create("a", function() return 1 end)
        region:get_or_create("a", function() return 1 end)
        region:get("b")
        local st = region:stats()
        assert.are.equal(1, st.hits)
        assert.are.equal(2, st.misses)
        assert.are.equal(1, st.creations)
    end)
end)

-- The memory backend stamps a plain CachedValue with its created time
-- (backends/memory.lua, STAMP) and the region's hit judges it from there:
-- every judgement must stay what the metadata says.
describe("a memory hit on a stamped value", function()
    support.no_leaks()
    local api = require "dogpile.cache.api"
    local STAMP = require("dogpile.cache.backends.memory").STAMP

    local function region(opts)
        return cache.make_region():configure("dogpile.cache.memory", opts)
    end

    it("is stamped only without an expiration time of its own", function()
        local d = {}
        local r = region({ expiration_time = 60, arguments = { cache_dict = d } })
        r:set("plain", 1)
        r:set("own", 2, 3600)
        assert.are.equal(d.plain.metadata.ct, rawget(d.plain, STAMP))
        assert.is_nil(rawget(d.own, STAMP))
        assert.are.equal(1, r:get("plain"))
        assert.are.equal(2, r:get("own"))
    end)

    it("sees a change made to the metadata of a value the backend handed out", function()
        local r = region({ expiration_time = 60 })
        r:set("k", "v")
        local cv = r.backend:get("k")
        assert.is_nil(rawget(cv, STAMP), "handed out: no stamp")
        cv.metadata.ct = cv.metadata.ct - 120
        assert.are.equal(cache.NO_VALUE, r:get("k"))
        r:set("k", "w")
        assert.are.equal("w", r:get("k"))
    end)

    it("judges expiry, hard and soft invalidation as the metadata says", function()
        local r = region({ expiration_time = 60 })
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
        assert.are.equal(cache.NO_VALUE, r:get("k", 0), "expired for a call's own 0 s")
        assert.are.equal("v", r:get("k", -1), "never expires for -1")
        r:invalidate(false)
        assert.are.equal(cache.NO_VALUE, r:get("k"), "soft: a get misses")
        assert.are.equal("new", r:get_or_create("k", function() return "new" end))
        r:invalidate(true)
        assert.are.equal(cache.NO_VALUE, r:get("k"), "hard")
        local calls = 0
        assert.are.equal("again", r:get_or_create("k", function()
            calls = calls + 1
            return "again"
        end))
        assert.are.equal(1, calls)
        assert.are.equal("again", r:get("k"))
    end)

    it("reads a value put in the cache_dict by hand, unstamped, from its metadata", function()
        local d = {}
        local r = region({ expiration_time = 60, arguments = { cache_dict = d } })
        local now = require("dogpile.lib").C.dp_clock_stamp()
        d.fresh = api.CachedValue.new("f", { ct = now, v = api.VALUE_VERSION })
        d.old = api.CachedValue.new("o", { ct = now - 120, v = api.VALUE_VERSION })
        d.other = api.CachedValue.new("x", { ct = now, v = api.VALUE_VERSION + 1 })
        assert.are.equal("f", r:get("fresh"))
        assert.are.equal(cache.NO_VALUE, r:get("old"))
        assert.are.equal(cache.NO_VALUE, r:get("other"), "another format version is a miss")
    end)

    it("stamps the values of a cache_dict given at configure", function()
        local now = require("dogpile.lib").C.dp_clock_stamp()
        local d = { a = api.CachedValue.new(1, { ct = now, v = api.VALUE_VERSION }) }
        local r = region({ expiration_time = 60, arguments = { cache_dict = d } })
        assert.are.equal(now, rawget(d.a, STAMP))
        assert.are.equal(1, r:get("a"))
    end)
end)
