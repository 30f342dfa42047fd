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
