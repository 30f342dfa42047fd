-- region:cache_on_arguments and region:cache_multi_on_arguments over the
-- memory backend: every spec counts calls of the original function exactly.
local cache = require "dogpile.cache"
local util = require "dogpile.cache.util"
local support = require "support"

local NO_VALUE = cache.NO_VALUE
local CachedValue = cache.CachedValue

local function memory_region(make_opts, configure_opts)
    return cache.make_region(make_opts):configure("dogpile.cache.memory", configure_opts)
end

-- A function that records each call's arguments (with their count) and
-- returns impl(...).
local function recorder(impl)
    local calls = {}
    local fn = function(...)
        calls[#calls + 1] = { n = select("#", ...), ... }
        return impl(...)
    end
    return fn, calls
end

-- The prefix a generator uses when it is given no namespace.
local function where(fn)
    local info = debug.getinfo(fn, "S")
    return info.short_src .. ":" .. info.linedefined
end

-- Make the value stored under `key` look `seconds` older than it is.
local function age(region, key, seconds)
    local store = region.actual_backend._cache
    local k = region.key_mangler and region.key_mangler(key) or key
    local cv = store[k]
    assert(cv, "no value stored under " .. key)
    store[k] = CachedValue.new(cv.payload, { ct = cv.metadata.ct - seconds, v = cv.metadata.v })
end

-- `fn` must be written on one line and make the failing call there (not as a
-- tail call): the error must point at that line and start with dogpile.cache:.
-- The specs' regions have no name: every error a region raises ends naming
-- it so (issue 20).
local UNNAMED = " (region (unnamed))"

local function assert_raises(fn, fragment)
    local info = debug.getinfo(fn, "S")
    local ok, err = pcall(fn)
    assert.is_false(ok, "expected an error")
    assert.is_string(err)
    local prefix = info.short_src .. ":" .. info.linedefined .. ": dogpile.cache:"
    assert.are.equal(prefix, err:sub(1, #prefix), "error does not start with " .. prefix .. ": " .. err)
    assert.are.equal(UNNAMED, err:sub(-#UNNAMED), "error does not name the region: " .. err)
    if fragment then
        assert.truthy(err:find(fragment, 1, true), "error does not mention '" .. fragment .. "': " .. err)
    end
end

describe("region:cache_on_arguments", function()
    support.no_leaks()

    local region
    before_each(function()
        region = memory_region()
    end)

    it("calls the original once per distinct arguments", function()
        local orig, calls = recorder(function(a, b) return tostring(a) .. "+" .. tostring(b) end)
        local f = region:cache_on_arguments()(orig)
        assert.are.equal("1+2", f(1, 2))
        assert.are.equal("1+2", f(1, 2))
        assert.are.equal(1, #calls)
        assert.are.equal("2+1", f(2, 1))
        assert.are.equal("1+nil", f(1))
        assert.are.equal("1+2", f(1, 2))
        assert.are.equal(3, #calls)
        assert.are.same({ n = 2, 1, 2 }, calls[1])
        assert.are.same({ n = 2, 2, 1 }, calls[2])
        assert.are.same({ n = 1, 1 }, calls[3])
    end)

    it("exposes the original function as f.original", function()
        local function orig() return 1 end
        local f = region:cache_on_arguments()(orig)
        assert.are.equal(orig, f.original)
    end)

    it("stores under function_key_generator's key: short_src:linedefined of the original", function()
        local orig = function(a, b) return a .. b end
        local f = region:cache_on_arguments()(orig)
        assert.are.equal("xy", f("x", "y"))
        assert.are.equal("xy", region:get(where(orig) .. "|x y"))
    end)

    it("namespace replaces the prefix of the key", function()
        local orig, calls = recorder(function(a, b) return a * b end)
        local f = region:cache_on_arguments({ namespace = "mul" })(orig)
        local g = region:cache_on_arguments({ namespace = "other" })(orig)
        assert.are.equal(6, f(2, 3))
        assert.are.equal(6, region:get("mul|2 3"))
        assert.are.equal(NO_VALUE, region:get(where(orig) .. "|2 3"))
        assert.are.equal(NO_VALUE, region:get("other|2 3"))
        assert.are.equal(6, g(2, 3))
        assert.are.equal(2, #calls)
        -- The same namespace on two functions shares entries, as in dogpile.cache.
        local h = region:cache_on_arguments({ namespace = "mul" })(function() error("not called") end)
        assert.are.equal(6, h(2, 3))
    end)

    it("f:invalidate(...) deletes only that entry", function()
        local orig, calls = recorder(function(a) return a end)
        local f = region:cache_on_arguments({ namespace = "ns" })(orig)
        f(1); f(2)
        assert.are.equal(2, #calls)
        f:invalidate(1)
        assert.are.equal(NO_VALUE, region:get("ns|1"))
        assert.are.equal(2, region:get("ns|2"))
        f(1); f(2)
        assert.are.equal(3, #calls)
        assert.are.same({ n = 1, 1 }, calls[3])
    end)

    it("f:set(value, ...) stores without calling the original", function()
        local orig, calls = recorder(function(a, b) return "orig" end)
        local f = region:cache_on_arguments({ namespace = "ns" })(orig)
        f:set("preset", "a", "b")
        assert.are.equal("preset", region:get("ns|a b"))
        assert.are.equal("preset", f("a", "b"))
        assert.are.equal(0, #calls)
        f:set(false, "c")
        assert.is_false(f("c"))
        assert.are.equal(0, #calls)
    end)

    it("f:get(...) returns the cached value or NO_VALUE, never calling the original", function()
        local orig, calls = recorder(function(a) return a * 10 end)
        local f = region:cache_on_arguments()(orig)
        assert.are.equal(NO_VALUE, f:get(1))
        assert.are.equal(10, f(1))
        assert.are.equal(10, f:get(1))
        assert.are.equal(NO_VALUE, f:get(2))
        assert.are.equal(1, #calls)
    end)

    it("f:refresh(...) calls the original even on a hit, stores and returns its value", function()
        local n = 0
        local orig, calls = recorder(function(a) n = n + 1; return a .. n end)
        local f = region:cache_on_arguments({ namespace = "ns" })(orig)
        assert.are.equal("x1", f("x"))
        assert.are.equal("x2", f:refresh("x"))
        assert.are.equal(2, #calls)
        assert.are.equal("x2", f("x"))
        assert.are.equal("x2", region:get("ns|x"))
        -- On a miss too.
        assert.are.equal("y3", f:refresh("y"))
        assert.are.equal("y3", f("y"))
        assert.are.equal(3, #calls)
    end)

    it("caches false and nil results", function()
        local orig, calls = recorder(function(a) if a == "f" then return false end return nil end)
        local f = region:cache_on_arguments()(orig)
        assert.is_false(f("f"))
        assert.is_false(f("f"))
        assert.is_nil(f("n"))
        assert.is_nil(f("n"))
        assert.are.equal(2, #calls)
        assert.is_false(f:get("f"))
        assert.is_nil(f:get("n"))
    end)

    it("f:set(nil, ...) caches nil", function()
        local orig, calls = recorder(function() return "orig" end)
        local f = region:cache_on_arguments()(orig)
        f:set(nil, 1)
        assert.is_nil(f(1))
        assert.are.equal(0, #calls)
    end)

    describe("expiration_time", function()
        it("as a number: a value older than it is regenerated", function()
            local orig, calls = recorder(function(a) return a .. #tostring(a) end)
            local f = region:cache_on_arguments({ namespace = "ns", expiration_time = 10 })(orig)
            f("old"); f("new")
            assert.are.equal(2, #calls)
            age(region, "ns|old", 20)
            age(region, "ns|new", 5)
            f("old"); f("new")
            assert.are.equal(3, #calls)
            assert.are.same({ n = 1, "old" }, calls[3])
            -- Regenerated: fresh again.
            f("old")
            assert.are.equal(3, #calls)
        end)

        it("overrides the region's expiration_time", function()
            local r = memory_region(nil, { expiration_time = 1000 })
            local orig, calls = recorder(function() return 1 end)
            local f = r:cache_on_arguments({ namespace = "ns", expiration_time = 10 })(orig)
            f("k")
            age(r, "ns|k", 20)
            f("k")
            assert.are.equal(2, #calls)
        end)

        it("as a function: called on every call, its result is used", function()
            local exp, exp_calls = 100, 0
            local orig, calls = recorder(function() return "v" end)
            local f = region:cache_on_arguments({
                namespace = "ns",
                expiration_time = function() exp_calls = exp_calls + 1; return exp end,
            })(orig)
            f("k")
            assert.are.equal(1, exp_calls)
            age(region, "ns|k", 50)
            f("k"); f("k")
            assert.are.equal(3, exp_calls)
            assert.are.equal(1, #calls)
            exp = 10
            f("k")
            assert.are.equal(4, exp_calls)
            assert.are.equal(2, #calls)
        end)

        it("as a callable table", function()
            local n = 0
            local exp = setmetatable({}, { __call = function() n = n + 1; return 10 end })
            local orig, calls = recorder(function() return "v" end)
            local f = region:cache_on_arguments({ namespace = "ns", expiration_time = exp })(orig)
            f("k")
            age(region, "ns|k", 20)
            f("k")
            assert.are.equal(2, n)
            assert.are.equal(2, #calls)
        end)
    end)

    it("should_cache_fn decides from the value whether it is stored", function()
        local seen = {}
        local orig, calls = recorder(function(a) return a end)
        local f = region:cache_on_arguments({
            namespace = "ns",
            should_cache_fn = function(v) seen[#seen + 1] = v; return v ~= "skip" end,
        })(orig)
        assert.are.equal("keep", f("keep"))
        assert.are.equal("keep", f("keep"))
        assert.are.equal("skip", f("skip"))
        assert.are.equal("skip", f("skip"))
        assert.are.equal(3, #calls)
        assert.are.same({ "keep", "skip", "skip" }, seen)
        assert.are.equal(NO_VALUE, region:get("ns|skip"))
        assert.are.equal("keep", region:get("ns|keep"))
    end)

    it("to_str turns each argument into its part of the key", function()
        local orig, calls = recorder(function(t) return t.id end)
        local f = region:cache_on_arguments({
            namespace = "ns",
            to_str = function(v) return type(v) == "table" and ("id:" .. v.id) or tostring(v) end,
        })(orig)
        assert.are.equal(7, f({ id = 7 }, "x"))
        -- A different table with the same id is the same entry.
        assert.are.equal(7, f({ id = 7 }, "x"))
        assert.are.equal(1, #calls)
        assert.are.equal(7, region:get("ns|id:7 x"))
    end)

    it("a function_key_generator option replaces the key generator", function()
        local got
        local function keygen(namespace, fn, to_str)
            got = { namespace = namespace, fn = fn, to_str = to_str }
            return function(...) return "custom:" .. select("#", ...) end
        end
        local function to_str(v) return tostring(v) end
        local orig, calls = recorder(function(...) return select("#", ...) end)
        local f = region:cache_on_arguments({
            namespace = "ns", to_str = to_str, function_key_generator = keygen,
        })(orig)
        assert.are.same({ namespace = "ns", fn = orig, to_str = to_str }, got)
        assert.are.equal(2, f("a", "b"))
        assert.are.equal(2, f("c", "d")) -- same key "custom:2"
        assert.are.equal(1, #calls)
        assert.are.equal(2, region:get("custom:2"))
        assert.are.equal(2, f:get("x", "y"))
        f:invalidate("p", "q")
        assert.are.equal(NO_VALUE, region:get("custom:2"))
    end)

    it("the region's function_key_generator is used when the decorator has none", function()
        local function region_keygen(namespace, fn, to_str)
            return function(a) return "region:" .. tostring(namespace) .. ":" .. tostring(a) end
        end
        local r = memory_region({ function_key_generator = region_keygen })
        local orig, calls = recorder(function(a) return a end)
        local f = r:cache_on_arguments({ namespace = "ns" })(orig)
        f(1)
        assert.are.equal(1, r:get("region:ns:1"))
        local g = r:cache_on_arguments()(orig)
        g(2)
        assert.are.equal(2, r:get("region:nil:2"))
        -- The decorator's own generator wins over the region's.
        local h = r:cache_on_arguments({
            function_key_generator = function() return function(a) return "own:" .. a end end,
        })(orig)
        h(3)
        assert.are.equal(3, r:get("own:3"))
        assert.are.equal(NO_VALUE, r:get("region:nil:3"))
        assert.are.equal(3, #calls)
    end)

    it("kwarg_function_key_generator as a region's generator", function()
        local r = memory_region({ function_key_generator = util.kwarg_function_key_generator })
        local orig, calls = recorder(function(kw) return kw.a + kw.b end)
        local f = r:cache_on_arguments({ namespace = "add" })(orig)
        assert.are.equal(3, f({ a = 1, b = 2 }))
        assert.are.equal(3, f({ b = 2, a = 1 }))
        assert.are.equal(1, #calls)
        assert.are.equal(3, r:get("add|a=1 b=2"))
    end)

    describe("nil arguments", function()
        it("f(nil, 2) calls the original with nil, 2", function()
            local orig, calls = recorder(function(a, b) return tostring(a) .. "," .. tostring(b) end)
            local f = region:cache_on_arguments({ namespace = "ns" })(orig)
            assert.are.equal("nil,2", f(nil, 2))
            assert.are.same({ n = 2, nil, 2 }, calls[1])
            assert.are.equal("nil,2", region:get("ns|nil 2"))
            assert.are.equal("nil,2", f(nil, 2))
            assert.are.equal(1, #calls)
        end)

        it("holes in the middle and trailing nils reach the original", function()
            local orig, calls = recorder(function(...) return select("#", ...) end)
            local f = region:cache_on_arguments({ namespace = "ns" })(orig)
            assert.are.equal(3, f(1, nil, 3))
            assert.are.same({ n = 3, 1, nil, 3 }, calls[1])
            assert.are.equal(3, f(1, nil, nil))
            assert.are.same({ n = 3, 1 }, calls[2])
            assert.are.equal(NO_VALUE, region:get("ns|nil"))
            assert.are.equal(1, f(nil))
            assert.are.equal(0, f())
            assert.are.same({ n = 1 }, calls[3])
            assert.are.same({ n = 0 }, calls[4])
            assert.are.equal(4, #calls)
            assert.are.equal(1, region:get("ns|nil"))
            assert.are.equal(0, region:get("ns|"))
        end)

        it("invalidate, set, get and refresh accept nil arguments", function()
            local orig, calls = recorder(function(a, b) return select("#", a, b) .. tostring(b) end)
            local f = region:cache_on_arguments({ namespace = "ns" })(orig)
            f:set("preset", nil, 2)
            assert.are.equal("preset", f:get(nil, 2))
            assert.are.equal("preset", f(nil, 2))
            assert.are.equal(0, #calls)
            assert.are.equal("22", f:refresh(nil, 2))
            assert.are.same({ n = 2, nil, 2 }, calls[1])
            assert.are.equal("22", f:get(nil, 2))
            f:invalidate(nil, 2)
            assert.are.equal(NO_VALUE, f:get(nil, 2))
        end)
    end)

    it("an error from the original propagates unchanged and nothing is cached", function()
        local boom = { "a table error" }
        local fail = true
        local orig, calls = recorder(function() if fail then error(boom) end return "ok" end)
        local f = region:cache_on_arguments({ namespace = "ns" })(orig)
        local ok, err = pcall(f, 1)
        assert.is_false(ok)
        assert.are.equal(boom, err)
        assert.are.equal(NO_VALUE, region:get("ns|1"))
        fail = false
        assert.are.equal("ok", f(1))
        assert.are.equal(2, #calls)
    end)

    it("can decorate before the region is configured", function()
        local r = cache.make_region()
        local orig, calls = recorder(function(a) return a + 1 end)
        local f = r:cache_on_arguments({ namespace = "ns" })(orig)
        r:configure("dogpile.cache.memory")
        assert.are.equal(2, f(1))
        assert.are.equal(2, f(1))
        assert.are.equal(1, #calls)
        assert.are.equal(2, r:get("ns|1"))
    end)

    it("decorates a callable table", function()
        local n = 0
        local obj = setmetatable({}, { __call = function(_, a) n = n + 1; return a end })
        local f = region:cache_on_arguments({ namespace = "ns" })(obj)
        assert.are.equal(5, f(5))
        assert.are.equal(5, f(5))
        assert.are.equal(1, n)
    end)

    it("two different C functions without a namespace do not share entries", function()
        -- debug.getinfo gives every C function short_src "[C]" and linedefined
        -- -1; dogpile.cache's keys name the function, so string.upper and
        -- string.lower never share a cache entry there.
        local up = region:cache_on_arguments()(string.upper)
        local low = region:cache_on_arguments()(string.lower)
        assert.are.equal("AB", up("aB"))
        assert.are.equal("ab", low("aB"))
    end)

    it("raises dogpile.cache: errors on bad inputs, at the caller's line", function()
        local dec = region:cache_on_arguments()
        assert_raises(function() dec(42) end, "function")
        assert_raises(function() dec(nil) end, "function")
        assert_raises(function() dec("fn") end, "function")
        assert_raises(function() dec({}) end, "function")
        assert_raises(function() region:cache_on_arguments({ nmespace = "x" }) end, "nmespace")
        assert_raises(function() region:cache_on_arguments({ asdict = true }) end, "asdict")
        assert_raises(function() region:cache_on_arguments("ns") end, "table")
        assert_raises(function() region:cache_on_arguments({ namespace = 1 }) end, "namespace")
        assert_raises(function() region:cache_on_arguments({ expiration_time = "10" }) end, "expiration_time")
        assert_raises(function() region:cache_on_arguments({ should_cache_fn = true }) end, "should_cache_fn")
        assert_raises(function() region:cache_on_arguments({ to_str = "x" }) end, "to_str")
        assert_raises(function() region:cache_on_arguments({ function_key_generator = 1 }) end,
                      "function_key_generator")
    end)
end)

describe("region:cache_multi_on_arguments", function()
    support.no_leaks()

    local region
    before_each(function()
        region = memory_region()
    end)

    -- The original returns, for each argument, its upper-case form.
    local function upper_all(...)
        local out = {}
        for i = 1, select("#", ...) do
            out[i] = string.upper((select(i, ...)))
        end
        return out
    end

    it("calls the original only with the missing arguments, returns values in argument order", function()
        local orig, calls = recorder(upper_all)
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(orig)
        assert.are.same({ "A", "B", "C" }, f("a", "b", "c"))
        assert.are.same({ { n = 3, "a", "b", "c" } }, calls)
        assert.are.same({ "C", "D", "A", "E" }, f("c", "d", "a", "e"))
        assert.are.equal(2, #calls)
        assert.are.same({ n = 2, "d", "e" }, calls[2])
        assert.are.same({ "B", "A" }, f("b", "a"))
        assert.are.equal(2, #calls)
        assert.are.equal("D", region:get("ns|d"))
    end)

    it("stores each value under function_multi_key_generator's key", function()
        local orig = function(...) return upper_all(...) end
        local f = region:cache_multi_on_arguments()(orig)
        f("x", "y")
        assert.are.equal("X", region:get(where(orig) .. "|x"))
        assert.are.equal("Y", region:get(where(orig) .. "|y"))
    end)

    it("passes the arguments themselves to the original, not their keys", function()
        local orig, calls = recorder(function(...)
            local out = {}
            for i = 1, select("#", ...) do
                local v = select(i, ...)
                out[i] = type(v) .. ":" .. tostring(v)
            end
            return out
        end)
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(orig)
        assert.are.same({ "number:1", "boolean:true", "string:s" }, f(1, true, "s"))
        assert.are.same({ n = 3, 1, true, "s" }, calls[1])
        assert.are.equal("number:1", region:get("ns|1"))
    end)

    it("duplicate arguments are created once and repeated in the result", function()
        local orig, calls = recorder(upper_all)
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(orig)
        assert.are.same({ "A", "A", "B", "A" }, f("a", "a", "b", "a"))
        assert.are.same({ { n = 2, "a", "b" } }, calls)
    end)

    it("no arguments: an empty array, the original is not called", function()
        local orig, calls = recorder(upper_all)
        local f = region:cache_multi_on_arguments()(orig)
        assert.are.same({}, f())
        assert.are.equal(0, #calls)
    end)

    it("exposes the original function as f.original", function()
        local f = region:cache_multi_on_arguments()(upper_all)
        assert.are.equal(upper_all, f.original)
    end)

    it("f:get(...) returns an array with NO_VALUE for the missing", function()
        local orig, calls = recorder(upper_all)
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(orig)
        f("a", "c")
        assert.are.same({ "A", NO_VALUE, "C" }, f:get("a", "b", "c"))
        assert.are.equal(1, #calls)
    end)

    it("f:set({arg = value}) stores without calling the original", function()
        local orig, calls = recorder(upper_all)
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(orig)
        f:set({ a = "preset-a", b = "preset-b" })
        assert.are.equal("preset-a", region:get("ns|a"))
        assert.are.same({ "preset-b", "preset-a" }, f("b", "a"))
        assert.are.equal(0, #calls)
        assert.are.same({ "preset-a", "C" }, f("a", "c"))
        assert.are.same({ { n = 1, "c" } }, calls)
    end)

    it("f:set with non-string arguments uses their keys", function()
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(function() error("not called") end)
        f:set({ [1] = "one", [true] = "yes" })
        assert.are.same({ "yes", "one" }, f(true, 1))
        assert.are.equal("one", region:get("ns|1"))
    end)

    it("f:invalidate(...) deletes those entries only", function()
        local orig, calls = recorder(upper_all)
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(orig)
        f("a", "b", "c")
        f:invalidate("a", "c")
        assert.are.same({ NO_VALUE, "B", NO_VALUE }, f:get("a", "b", "c"))
        assert.are.same({ "A", "B", "C" }, f("a", "b", "c"))
        assert.are.equal(2, #calls)
        assert.are.same({ n = 2, "a", "c" }, calls[2])
    end)

    it("f:refresh(...) calls the original with every argument and stores the values", function()
        local gen = 0
        local orig, calls = recorder(function(...)
            gen = gen + 1
            local out = {}
            for i = 1, select("#", ...) do out[i] = (select(i, ...)) .. gen end
            return out
        end)
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(orig)
        assert.are.same({ "a1", "b1" }, f("a", "b"))
        assert.are.same({ "a2", "c2" }, f:refresh("a", "c"))
        assert.are.same({ n = 2, "a", "c" }, calls[2])
        assert.are.same({ "a2", "b1", "c2" }, f("a", "b", "c"))
        assert.are.equal(2, #calls)
    end)

    it("f:refresh stores a nil value the original returns, as the call does", function()
        local orig, calls = recorder(function(...)
            local out = {}
            for i = 1, select("#", ...) do
                local a = select(i, ...)
                if a ~= "none" then out[i] = a end
            end
            return out
        end)
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(orig)
        -- The decorated call caches nil (API.md: nil can be cached) ...
        local r = f("none", "x")
        assert.is_nil(r[1])
        assert.are.equal("x", r[2])
        assert.is_nil(f:get("none")[1])
        f:invalidate("none")
        -- ... and so must refresh (dogpile.cache's refresh stores every value).
        f:refresh("none", "y")
        assert.are.equal(2, #calls)
        assert.is_nil(f:get("none")[1], "refresh did not store the nil value")
        f("none")
        assert.are.equal(2, #calls, "refresh did not store the nil value")
    end)

    it("nil arguments reach the original", function()
        local orig, calls = recorder(function(...)
            local out = {}
            for i = 1, select("#", ...) do out[i] = tostring((select(i, ...))) end
            return out
        end)
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(orig)
        assert.are.same({ "nil", "b" }, f(nil, "b"))
        assert.are.same({ n = 2, nil, "b" }, calls[1])
        assert.are.equal("nil", region:get("ns|nil"))
        assert.are.same({ "b", "nil" }, f("b", nil))
        assert.are.equal(1, #calls)
    end)

    it("should_cache_fn decides per value", function()
        local orig, calls = recorder(upper_all)
        local f = region:cache_multi_on_arguments({
            namespace = "ns",
            should_cache_fn = function(v) return v ~= "SKIP" end,
        })(orig)
        assert.are.same({ "A", "SKIP" }, f("a", "skip"))
        assert.are.same({ "A", NO_VALUE }, f:get("a", "skip"))
        assert.are.same({ "SKIP", "A" }, f("skip", "a"))
        assert.are.equal(2, #calls)
        assert.are.same({ n = 1, "skip" }, calls[2])
    end)

    it("to_str and a region-level function_multi_key_generator", function()
        local f = region:cache_multi_on_arguments({
            namespace = "ns", to_str = function(v) return "<" .. tostring(v) .. ">" end,
        })(upper_all)
        f("a")
        assert.are.equal("A", region:get("ns|<a>"))
        local r = memory_region({
            function_multi_key_generator = function(namespace)
                return function(...)
                    local keys = {}
                    for i = 1, select("#", ...) do keys[i] = "R" .. namespace .. (select(i, ...)) end
                    return keys
                end
            end,
        })
        local g = r:cache_multi_on_arguments({ namespace = "n" })(upper_all)
        assert.are.same({ "Q" }, g("q"))
        assert.are.equal("Q", r:get("Rnq"))
    end)

    it("expiration_time as a function is called on every call", function()
        local exp, exp_calls = 100, 0
        local orig, calls = recorder(upper_all)
        local f = region:cache_multi_on_arguments({
            namespace = "ns",
            expiration_time = function() exp_calls = exp_calls + 1; return exp end,
        })(orig)
        f("a", "b")
        age(region, "ns|a", 50)
        f("a", "b")
        assert.are.equal(2, exp_calls)
        assert.are.equal(1, #calls)
        exp = 10
        f("a", "b")
        assert.are.equal(3, exp_calls)
        assert.are.same({ n = 1, "a" }, calls[2])
    end)

    describe("asdict", function()
        -- Returns {arg = upper(arg)}, leaving out arguments starting with "x".
        local function upper_dict(...)
            local out = {}
            for i = 1, select("#", ...) do
                local a = select(i, ...)
                if a:sub(1, 1) ~= "x" then out[a] = a:upper() end
            end
            return out
        end

        it("returns a table keyed by argument", function()
            local orig, calls = recorder(upper_dict)
            local f = region:cache_multi_on_arguments({ namespace = "ns", asdict = true })(orig)
            assert.are.same({ a = "A", b = "B" }, f("a", "b"))
            assert.are.same({ a = "A", c = "C" }, f("a", "c"))
            assert.are.equal(2, #calls)
            assert.are.same({ n = 1, "c" }, calls[2])
            assert.are.equal("C", region:get("ns|c"))
        end)

        it("an argument absent from the result is neither cached nor returned", function()
            local orig, calls = recorder(upper_dict)
            local f = region:cache_multi_on_arguments({ namespace = "ns", asdict = true })(orig)
            local r = f("a", "xmiss", "b")
            assert.are.same({ a = "A", b = "B" }, r)
            assert.is_nil(r.xmiss)
            assert.are.equal(NO_VALUE, region:get("ns|xmiss"))
            -- The next call asks for it again, and only for it.
            assert.are.same({ a = "A", b = "B" }, f("a", "xmiss", "b"))
            assert.are.equal(2, #calls)
            assert.are.same({ n = 1, "xmiss" }, calls[2])
        end)

        it("false values are cached and returned", function()
            local orig, calls = recorder(function(a) return { [a] = false } end)
            local f = region:cache_multi_on_arguments({ namespace = "ns", asdict = true })(orig)
            assert.are.same({ k = false }, f("k"))
            assert.are.same({ k = false }, f("k"))
            assert.are.equal(1, #calls)
        end)

        it("should_cache_fn applies to the values present", function()
            local seen = {}
            local orig, calls = recorder(upper_dict)
            local f = region:cache_multi_on_arguments({
                namespace = "ns", asdict = true,
                should_cache_fn = function(v) seen[#seen + 1] = v; return v ~= "SKIP" end,
            })(orig)
            assert.are.same({ a = "A", skip = "SKIP" }, f("a", "skip", "xno"))
            table.sort(seen)
            assert.are.same({ "A", "SKIP" }, seen)
            assert.are.same({ "A", NO_VALUE, NO_VALUE }, f:get("a", "skip", "xno"))
            f("a", "skip", "xno")
            assert.are.equal(2, #calls)
            assert.are.same({ n = 2, "skip", "xno" }, calls[2])
        end)

        it("f:get, f:set, f:invalidate and f:refresh", function()
            local orig, calls = recorder(upper_dict)
            local f = region:cache_multi_on_arguments({ namespace = "ns", asdict = true })(orig)
            f:set({ a = "set-a" })
            assert.are.same({ "set-a", NO_VALUE }, f:get("a", "b"))
            assert.are.same({ a = "set-a", b = "B" }, f("a", "b"))
            assert.are.same({ n = 1, "b" }, calls[1])
            assert.are.same({ a = "A" }, f:refresh("a", "xgone"))
            assert.are.same({ "A", NO_VALUE }, f:get("a", "xgone"))
            f:invalidate("a", "b")
            assert.are.same({ NO_VALUE, NO_VALUE }, f:get("a", "b"))
            assert.are.equal(2, #calls)
        end)
    end)

    it("an error from the original propagates unchanged and nothing is cached", function()
        local boom = setmetatable({}, { __tostring = function() return "boom" end })
        local f = region:cache_multi_on_arguments({ namespace = "ns" })(function() error(boom) end)
        local ok, err = pcall(f, "a", "b")
        assert.is_false(ok)
        assert.are.equal(boom, err)
        assert.are.same({ NO_VALUE, NO_VALUE }, region:get_multi({ "ns|a", "ns|b" }))
    end)

    it("raises dogpile.cache: errors on bad inputs, at the caller's line", function()
        local dec = region:cache_multi_on_arguments()
        assert_raises(function() dec(42) end, "function")
        assert_raises(function() dec(nil) end, "function")
        assert_raises(function() dec("fn") end, "function")
        assert_raises(function() region:cache_multi_on_arguments({ asdikt = true }) end, "asdikt")
        assert_raises(function() region:cache_multi_on_arguments({ asdict = "yes" }) end, "asdict")
        assert_raises(function() region:cache_multi_on_arguments({ namespace = false }) end, "namespace")
        assert_raises(function() region:cache_multi_on_arguments(7) end, "table")
        assert_raises(function() region:cache_multi_on_arguments({ expiration_time = {} }) end,
                      "expiration_time")
    end)

    it("asdict: an original that does not return a table is a dogpile.cache: error", function()
        local f = region:cache_multi_on_arguments({ asdict = true })(function() return "nope" end)
        local ok, err = pcall(f, "a")
        assert.is_false(ok)
        assert.truthy(tostring(err):find("dogpile.cache:", 1, true))
        assert.are.equal(UNNAMED, err:sub(-#UNNAMED), err)
    end)

    it("misuse at a call, at refresh and at set names the region, after the message", function()
        local named = memory_region({ name = "users" })
        local f = named:cache_multi_on_arguments()(function() return "nope" end)
        support.raises_here("dogpile.cache: cache_multi_on_arguments: the function must return a table, got string (region 'users')", function() f:refresh("a") end)
        support.raises_here("dogpile.cache: cache_multi_on_arguments: set: mapping must be a table {argument = value}, got string (region 'users')", function() f:set("a") end)
        local g = named:cache_on_arguments({ expiration_time = function() return 0 / 0 end })(function(x) return x end)
        support.raises_here("dogpile.cache: cache_on_arguments: the expiration_time function returned nan; it must return a finite number of seconds (-1: never expires) or nil (region 'users')", function() g(1) end)
        local h = named:cache_on_arguments()(function() return 1, "x" end)
        support.raises_here("dogpile.cache: cache_on_arguments: refresh: the creator returned a string after its value; a second value must be the value's expiration time (a number of seconds) or, after nil, an error message (a string) (region 'users')", function() h:refresh() end)
        -- The original's own error is not the region's: unchanged.
        local boom = named:cache_on_arguments()(function() error("boom", 0) end)
        local ok, err = pcall(boom.refresh, boom)
        assert.is_false(ok)
        assert.are.equal("boom", err)
    end)
end)
