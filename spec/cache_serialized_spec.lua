-- Regions over a backend that stores bytes (serialized = true): the default
-- codec, the envelope, undecodable bytes, values that cannot be serialized.
local cache = require "dogpile.cache"
local support = require "support"

local NO_VALUE = cache.NO_VALUE

local store = {}
cache.register_backend("spec.bytes", function()
    local b = { serialized = true }
    function b.get(_, key) return store[key] or NO_VALUE end
    function b.set(_, key, value)
        assert(type(value) == "string", "a serialized backend must be handed bytes")
        store[key] = value
    end
    function b.delete(_, key) store[key] = nil end
    return b
end)

local function region(opts)
    return cache.make_region(opts):configure("spec.bytes", { expiration_time = 60 })
end

describe("a region over a backend that stores bytes", function()
    support.no_leaks()
    before_each(function()
        for k in pairs(store) do store[k] = nil end
    end)

    it("round-trips values through the default codec", function()
        local r = region()
        local value = { name = "ada", scores = { 1, 2.5, -0.0 }, flags = { [true] = "yes" }, z = "\0x" }
        r:set("k", value)
        assert.is_string(store.k)
        local got = r:get("k")
        assert.are_not.equal(value, got)
        assert.are.same(value, got)
        assert.are.equal(-math.huge, 1 / got.scores[3])
        r:set("nil", nil)
        r:set("false", false)
        assert.is_nil(r:get("nil"))
        assert.is_false(r:get("false"))
    end)

    it("keeps the created time in the envelope", function()
        local r = region()
        local before = require("dogpile").now()
        r:set("k", 1)
        local md = r:get_value_metadata("k")
        assert.are.equal(1, md.payload)
        assert.is_true(md.metadata.ct >= before - 0.001 and md.metadata.ct <= before + 5)
        assert.are.equal(cache.VALUE_VERSION, md.metadata.v)
    end)

    it("treats undecodable bytes as a miss, counts an error and lets get_or_create recreate", function()
        local r = region()
        local messages = {}
        cache.set_logger(function(msg) messages[#messages + 1] = msg end)
        finally(function() cache.set_logger(function(msg) io.stderr:write(msg, "\n") end) end)
        for _, junk in ipairs({ "", "garbage", ("DPLV"):rep(3), store.k or "DPLV\1\0\0\0\0\0\0\0\0\0\0\0\255" }) do
            store.k = junk
            assert.are.equal(NO_VALUE, r:get("k"))
        end
        assert.are.equal(4, r:stats().errors)
        assert.are.equal(4, #messages)
        assert.are.equal("new", r:get_or_create("k", function() return "new" end))
        assert.are.equal("new", r:get("k"))
    end)

    it("refuses a value that cannot be serialized, naming the path, and stores nothing", function()
        local r = region({ name = "players" })
        r:set("k", "kept")
        local ok, err = pcall(r.set, r, "k", { players = { {}, {}, { socket = io.stdout } } })
        assert.is_false(ok)
        assert.matches("^spec/cache_serialized_spec%.lua:%d+: dogpile%.cache: cannot store key 'k': "
                       .. "dogpile%.codec: value%.players%[3%]%.socket: cannot serialize a userdata "
                       .. "%(region 'players'%)$", err)
        assert.are.equal("kept", r:get("k"))
        local calls = 0
        ok, err = pcall(r.get_or_create, r, "f", function() calls = calls + 1; return print end)
        assert.is_false(ok)
        assert.matches("cannot serialize a function", err)
        assert.are.equal(1, calls)
        assert.are.equal(NO_VALUE, r:get("f"))
    end)

    it("uses the region's own serializer and deserializer when given", function()
        local r = region({
            serializer = function(v) return "S:" .. v end,
            deserializer = function(b) return (b:gsub("^S:", "")) end,
        })
        r:set("k", "abc")
        assert.matches("S:abc$", store.k)
        assert.are.equal("abc", r:get("k"))
    end)

    it("refuses a serializer without a deserializer", function()
        local ok, err = pcall(function()
            return cache.make_region({ serializer = tostring }):configure("spec.bytes")
        end)
        assert.is_false(ok)
        assert.matches("dogpile%.cache: region %(unnamed%) has a serializer but no deserializer", err)
    end)
end)
