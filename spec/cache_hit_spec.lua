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

describe("a configured region's fields the hit reads", function()
    support.no_leaks()
    local api = require "dogpile.cache.api"

    it("follow an expiration_time assigned after configure", function()
        local d = {}
        local r = cache.make_region():configure("dogpile.cache.memory",
                                                { arguments = { cache_dict = d } })
        local now = require("dogpile.lib").C.dp_clock_stamp()
        d.old = api.CachedValue.new("o", { ct = now - 120, v = api.VALUE_VERSION })
        assert.is_nil(r.expiration_time)
        assert.are.equal("o", r:get("old"), "no expiration_time: never expires")
        r.expiration_time = 60
        assert.are.equal(60, r.expiration_time)
        assert.are.equal(cache.NO_VALUE, r:get("old"))
        assert.are.equal("new", r:get_or_create("old", function() return "new" end))
        r.expiration_time = -1
        assert.are.equal(-1, r.expiration_time)
        d.old = api.CachedValue.new("o", { ct = now - 120, v = api.VALUE_VERSION })
        assert.are.equal("o", r:get("old"), "-1: never expires")
        r.expiration_time = nil
        assert.is_nil(r.expiration_time)
        assert.are.equal("o", r:get("old"))
        assert.has_error(function() r.expiration_time = "soon" end)
        assert.has_error(function() r.expiration_time = 0 / 0 end)
    end)

    it("follow a key_mangler assigned after configure", function()
        local r = cache.make_region():configure("dogpile.cache.memory")
        assert.is_nil(r.key_mangler)
        r:set("k", "plain")
        local function mangler(k) return "m:" .. k end
        r.key_mangler = mangler
        assert.are.equal(mangler, r.key_mangler)
        assert.are.equal(cache.NO_VALUE, r:get("k"), "the mangled key was never set")
        r:set("k", "mangled")
        assert.are.equal("mangled", r:get("k"))
        assert.are.equal("mangled", r:get_or_create("k", function() error("a miss") end))
        assert.are.equal("mangled", r.backend:get("m:k").payload)
        r.key_mangler = nil
        assert.is_nil(r.key_mangler)
        assert.are.equal("plain", r:get("k"))
    end)

    it("count every hit in stats, whichever path served it", function()
        local r = cache.make_region():configure("dogpile.cache.memory", { expiration_time = 60 })
        r:set("a", 1)
        r:get("a")
        r:get_or_create("a", function() error("a miss") end)
        r:get("a", nil, true)
        r:get_multi({ "a", "b" })
        r:get("b")
        local st = r:stats()
        assert.are.equal(4, st.hits)
        assert.are.equal(2, st.misses)
        r:configure("dogpile.cache.memory", { replace_existing_backend = true })
        assert.are.equal(0, r:stats().hits, "configure starts the counters again")
    end)
end)

describe("an invalidation strategy judged on the hit", function()
    support.no_leaks()
    local invalidation = require "dogpile.cache.invalidation"

    it("is read from its fields only when it says so (judge_fields)", function()
        local default = cache.DefaultInvalidationStrategy.new()
        local fields = invalidation.judge_for(default)
        assert.are.equal(nil, fields(default, 1))
        default:invalidate(false)
        assert.are.equal("stale", fields(default, 1))
        -- The default's metatable without its flag: asked through its methods,
        -- which here say something the fields do not.
        local other = setmetatable({ _invalidated = false, _hard = false },
                                   cache.DefaultInvalidationStrategy)
        other.is_invalidated = function() return true end
        other.is_hard_invalidated = function() return true end
        local judge = invalidation.judge_for(other)
        assert.are_not.equal(fields, judge)
        assert.are.equal("missing", judge(other, 1))
        -- Any strategy with the flag and the two fields: read in place.
        local flagged = { judge_fields = true, _invalidated = 10, _hard = true }
        assert.are.equal(fields, invalidation.judge_for(flagged))
        assert.are.equal("missing", fields(flagged, 5))
        assert.are.equal(nil, fields(flagged, 10))
    end)
end)

describe("a configure that fails", function()
    support.no_leaks()

    it("leaves the region's key_mangler and expiration_time for the next one", function()
        local function mangler(k) return "m:" .. k end
        local r = cache.make_region({ key_mangler = mangler })
        cache.register_backend("spec.hit_bad_front", function()
            return { get = function() end, set = function() end, delete = function() end,
                     front = "not a table" }
        end)
        local ok, err = pcall(r.configure, r, "spec.hit_bad_front", { expiration_time = 5 })
        assert.is_false(ok)
        assert.matches("the backend's front must be", err, 1, true)
        assert.are.equal(mangler, r.key_mangler)
        r:configure("dogpile.cache.memory", { expiration_time = 7 })
        assert.are.equal(mangler, r.key_mangler)
        assert.are.equal(7, r.expiration_time)
        r:set("k", "v")
        assert.are.equal("v", r.backend:get("m:k").payload)
    end)
end)
