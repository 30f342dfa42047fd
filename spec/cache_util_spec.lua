-- dogpile.cache.util: key generators, key manglers, config coercion, and a
-- region whose key_mangler is SHA-1 (the backend sees mangled keys, callers
-- the keys they gave).
local util = require "dogpile.cache.util"
local cache = require "dogpile.cache"
local proxy = require "dogpile.cache.proxy"
local support = require "support"

local NO_VALUE = cache.NO_VALUE

-- The prefix a generator uses when it is given no namespace.
local function where(fn)
    local info = debug.getinfo(fn, "S")
    return info.short_src .. ":" .. info.linedefined
end

-- `fn` must be written on one line and make the failing call there (not as a
-- tail call): the error must point at that line and start with dogpile.cache:.
local function assert_raises(fn, fragment)
    local info = debug.getinfo(fn, "S")
    local ok, err = pcall(fn)
    assert.is_false(ok, "expected an error")
    assert.is_string(err)
    local prefix = info.short_src .. ":" .. info.linedefined .. ": dogpile.cache:"
    assert.are.equal(prefix, err:sub(1, #prefix), "error does not start with " .. prefix .. ": " .. err)
    if fragment then
        assert.truthy(err:find(fragment, 1, true), "error does not mention '" .. fragment .. "': " .. err)
    end
end

local function pack(...)
    return { n = select("#", ...), ... }
end

local function brackets(v)
    return "<" .. tostring(v) .. ">"
end

local function target() end

describe("dogpile.cache.util", function()
    support.no_leaks()

    describe("function_key_generator", function()
        local cases = {
            { "no arguments", "ns", nil, pack(), "ns|" },
            { "one string", "ns", nil, pack("a"), "ns|a" },
            { "strings joined by one space", "ns", nil, pack("a", "b", "c"), "ns|a b c" },
            { "a string with spaces is kept as is", "ns", nil, pack("a b", "c"), "ns|a b c" },
            { "an empty string", "ns", nil, pack(""), "ns|" },
            { "numbers through tostring", "ns", nil, pack(1, 2.5, -3, 1e100),
              "ns|1 2.5 -3 " .. tostring(1e100) },
            { "booleans", "ns", nil, pack(true, false), "ns|true false" },
            { "one nil", "ns", nil, pack(nil), "ns|nil" },
            { "a leading nil", "ns", nil, pack(nil, 2), "ns|nil 2" },
            { "a nil in the middle", "ns", nil, pack(1, nil, 3), "ns|1 nil 3" },
            { "trailing nils count", "ns", nil, pack(1, nil, nil), "ns|1 nil nil" },
            { "custom to_str on one argument", "ns", brackets, pack("a"), "ns|<a>" },
            { "custom to_str on every argument", "ns", brackets, pack(1, nil, true),
              "ns|<1> <nil> <true>" },
            { "custom to_str, no arguments", "ns", brackets, pack(), "ns|" },
            { "empty namespace", "", nil, pack("x"), "|x" },
            { "namespace with a pipe", "a|b", nil, pack("x"), "a|b|x" },
        }
        for _, c in ipairs(cases) do
            it(c[1], function()
                local gen = util.function_key_generator(c[2], target, c[3])
                assert.are.equal(c[5], gen(unpack(c[4], 1, c[4].n)))
            end)
        end

        it("without a namespace, the prefix is short_src:linedefined of fn", function()
            local function f(a, b) return a, b end
            local info = debug.getinfo(f, "S")
            local prefix = info.short_src .. ":" .. info.linedefined
            local gen = util.function_key_generator(nil, f)
            assert.are.equal(prefix .. "|", gen())
            assert.are.equal(prefix .. "|1 2", gen(1, 2))
            assert.are.equal(prefix .. "|nil x", gen(nil, "x"))
            -- Two functions on different lines have different prefixes.
            local g = function() end
            assert.are_not.equal(util.function_key_generator(nil, g)(1), gen(1))
        end)

        it("with a namespace, the function's location is not in the key", function()
            local function f() end
            local function g() end
            assert.are.equal(util.function_key_generator("same", f)(1),
                             util.function_key_generator("same", g)(1))
        end)

        it("calls to_str once per argument, in order", function()
            local seen, n = {}, 0
            local gen = util.function_key_generator("ns", target, function(v)
                n = n + 1
                seen[n] = v
                return "s" .. n
            end)
            assert.are.equal("ns|s1 s2 s3", gen("x", nil, 3))
            assert.are.equal(3, n)
            assert.are.equal("x", seen[1])
            assert.is_nil(seen[2])
            assert.are.equal(3, seen[3])
        end)

        it("accepts a callable table as fn", function()
            local callable = setmetatable({}, { __call = function() end })
            local gen = util.function_key_generator("ns", callable)
            assert.are.equal("ns|1", gen(1))
        end)

        it("raises dogpile.cache: errors on bad arguments", function()
            assert_raises(function() util.function_key_generator(1, target) end, "namespace")
            assert_raises(function() util.function_key_generator("ns", 42) end, "fn")
            assert_raises(function() util.function_key_generator("ns", nil) end, "fn")
            assert_raises(function() util.function_key_generator("ns", target, "x") end, "to_str")
        end)
    end)

    describe("function_multi_key_generator", function()
        local cases = {
            { "no arguments", nil, pack(), {} },
            { "one key per argument", nil, pack("a", "b", "c"), { "ns|a", "ns|b", "ns|c" } },
            { "numbers and booleans", nil, pack(1, 2.5, true, false),
              { "ns|1", "ns|2.5", "ns|true", "ns|false" } },
            { "a string with spaces is one key", nil, pack("a b"), { "ns|a b" } },
            { "nil arguments", nil, pack(nil, "b", nil), { "ns|nil", "ns|b", "ns|nil" } },
            { "duplicates give duplicate keys", nil, pack("a", "a"), { "ns|a", "ns|a" } },
            { "custom to_str", brackets, pack("a", nil, 3), { "ns|<a>", "ns|<nil>", "ns|<3>" } },
        }
        for _, c in ipairs(cases) do
            it(c[1], function()
                local gen = util.function_multi_key_generator("ns", target, c[2])
                local keys = gen(unpack(c[3], 1, c[3].n))
                assert.are.same(c[4], keys)
                assert.are.equal(c[3].n, #keys)
            end)
        end

        it("without a namespace, the prefix is short_src:linedefined of fn", function()
            local function f() end
            local gen = util.function_multi_key_generator(nil, f)
            assert.are.same({ where(f) .. "|x", where(f) .. "|y" }, gen("x", "y"))
        end)

        it("each key is the single-argument key of function_key_generator", function()
            local one = util.function_key_generator("ns", target)
            local multi = util.function_multi_key_generator("ns", target)
            local keys = multi("a", 2, nil)
            assert.are.same({ one("a"), one(2), one(nil) }, keys)
        end)

        it("raises dogpile.cache: errors on bad arguments", function()
            assert_raises(function() util.function_multi_key_generator({}, target) end, "namespace")
            assert_raises(function() util.function_multi_key_generator("ns", "nope") end, "fn")
            assert_raises(function() util.function_multi_key_generator("ns", target, 7) end, "to_str")
        end)
    end)

    describe("kwarg_function_key_generator", function()
        local cases = {
            { "no named arguments", nil, {}, "ns|" },
            { "one argument", nil, { a = 1 }, "ns|a=1" },
            { "keys sorted, joined by one space", nil, { c = 3, a = "x", b = true },
              "ns|a=x b=true c=3" },
            { "false values are kept", nil, { flag = false }, "ns|flag=false" },
            { "values with spaces", nil, { q = "a b" }, "ns|q=a b" },
            { "to_str applied to values only", brackets, { b = 2, a = 1 }, "ns|a=<1> b=<2>" },
            { "sorting is by byte order", nil, { B = 1, a = 2, _ = 3 }, "ns|B=1 _=3 a=2" },
        }
        for _, c in ipairs(cases) do
            it(c[1], function()
                local gen = util.kwarg_function_key_generator("ns", target, c[2])
                assert.are.equal(c[4], gen(c[3]))
            end)
        end

        it("the same arguments in any construction order give the same key", function()
            local gen = util.kwarg_function_key_generator("ns", target)
            local t1, t2 = {}, {}
            for _, k in ipairs({ "x", "y", "z", "w" }) do t1[k] = k .. "!" end
            for _, k in ipairs({ "w", "z", "y", "x" }) do t2[k] = k .. "!" end
            assert.are.equal(gen(t1), gen(t2))
            assert.are.equal("ns|w=w! x=x! y=y! z=z!", gen(t1))
        end)

        it("without a namespace, the prefix is short_src:linedefined of fn", function()
            local function f(kw) return kw end
            assert.are.equal(where(f) .. "|a=1", util.kwarg_function_key_generator(nil, f)({ a = 1 }))
        end)

        it("raises dogpile.cache: errors on bad arguments", function()
            local gen = util.kwarg_function_key_generator("ns", target)
            assert_raises(function() gen("not a table") end, "one table")
            assert_raises(function() gen({ a = 1 }, { b = 2 }) end, "one table")
            assert_raises(function() util.kwarg_function_key_generator("ns", 3) end, "fn")
        end)
    end)

    describe("sha1_mangle_key", function()
        local cases = {
            { "empty string", "", "da39a3ee5e6b4b0d3255bfef95601890afd80709" },
            { "abc", "abc", "a9993e364706816aba3e25717850c26c9cd0d89d" },
            { "448-bit FIPS vector", "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
              "84983e441c3bd26ebaae4aa1f95129e5e54670f1" },
            { "quick brown fox", "The quick brown fox jumps over the lazy dog",
              "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12" },
            { "quick brown cog", "The quick brown fox jumps over the lazy cog",
              "de9f2c7fd25e1b3afad3e85a0bd17d9b100db4b3" },
            { "a million a", string.rep("a", 1000000), "34aa973cd4c4daa4f61eeb2bdbad27316534016f" },
            -- Padding boundaries: 55/56 bytes (length fits / does not fit in
            -- the last block), 63/64/65 (one block), 119/120 (two blocks).
            { "55 bytes", string.rep("x", 55), "cef734ba81a024479e09eb5a75b6ddae62e6abf1" },
            { "56 bytes", string.rep("x", 56), "901305367c259952f4e7af8323f480d59f81335b" },
            { "63 bytes", string.rep("x", 63), "0ddc4e0cccd9a12850deb5abb0853a4425559fec" },
            { "64 bytes", string.rep("x", 64), "bb2fa3ee7afb9f54c6dfb5d021f14b1ffe40c163" },
            { "65 bytes", string.rep("x", 65), "78c741ddc482e4cdf8c474a0876347a0905b6233" },
            { "119 bytes", string.rep("x", 119), "4300320394f7ee239bcdce7d3b8bcee173a0cd5c" },
            { "120 bytes", string.rep("x", 120), "ceb2821639c4b6dcb10bce0e522ca2e608ce056d" },
            -- Embedded zero bytes are hashed, not treated as the end.
            { "one zero byte", "\0", "5ba93c9db0cff93f52b521d7420e43f6eda2784f" },
            { "four zero bytes", "\0\0\0\0", "9069ca78e7450a285173431b3e52c5c25299e473" },
            { "a zero byte inside", "a\0b", "4a3dec2d1f8245280855c42db0ee4239f917fdb8" },
            { "several zero bytes inside", "key\0with\0zeros", "117cf4206fac84bba0f57527eb2b9492a0aa483c" },
            { "high bytes and UTF-8", "\255\128 caf\195\169", "433cd1fc1d9a6ad40056f8842d26f6d406b567af" },
        }
        for _, c in ipairs(cases) do
            it(c[1], function()
                local h = util.sha1_mangle_key(c[2])
                assert.are.equal(c[3], h)
                assert.are.equal(40, #h)
                assert.truthy(h:match("^[0-9a-f]+$"))
            end)
        end

        it("keys differing only after a zero byte give different digests", function()
            local a = util.sha1_mangle_key("prefix\0one")
            local b = util.sha1_mangle_key("prefix\0two")
            local c = util.sha1_mangle_key("prefix")
            assert.are_not.equal(a, b)
            assert.are_not.equal(a, c)
            assert.are.equal(40, #a)
            assert.truthy(a:match("^[0-9a-f]+$"))
        end)

        it("is stable across calls (the result is a fresh string)", function()
            local a = util.sha1_mangle_key("abc")
            local b = util.sha1_mangle_key("The quick brown fox jumps over the lazy dog")
            assert.are.equal("a9993e364706816aba3e25717850c26c9cd0d89d", a)
            assert.are.equal("2fd4e1c67a2d28fced849ee1bb76e7391b93eb12", b)
        end)

        it("raises a dogpile.cache: error on a non-string key, at the caller's line", function()
            assert_raises(function() util.sha1_mangle_key(42) end, "string")
            assert_raises(function() util.sha1_mangle_key(nil) end, "string")
            assert_raises(function() util.sha1_mangle_key({}) end, "string")
            assert_raises(function() util.sha1_mangle_key(true) end, "string")
        end)
    end)

    describe("length_conditional_mangler", function()
        local function upper(k) return "M:" .. k:upper() end
        local cases = {
            { "shorter than length: unchanged", 10, string.rep("a", 9), string.rep("a", 9) },
            { "exactly length: mangled", 10, string.rep("a", 10), "M:" .. string.rep("A", 10) },
            { "longer than length: mangled", 10, string.rep("a", 11), "M:" .. string.rep("A", 11) },
            { "empty key with length 1: unchanged", 1, "", "" },
            { "length 0 mangles every key", 0, "", "M:" },
            { "length counts bytes, not characters", 4, "caf\195\169", "M:CAF\195\169" },
            { "length counts zero bytes", 3, "a\0b", "M:A\0B" },
        }
        for _, c in ipairs(cases) do
            it(c[1], function()
                assert.are.equal(c[4], util.length_conditional_mangler(c[2], upper)(c[3]))
            end)
        end

        it("with sha1_mangle_key: length-1, length, length+1", function()
            local m = util.length_conditional_mangler(40, util.sha1_mangle_key)
            local k39, k40, k41 = string.rep("k", 39), string.rep("k", 40), string.rep("k", 41)
            assert.are.equal(k39, m(k39))
            assert.are.equal(util.sha1_mangle_key(k40), m(k40))
            assert.are.equal(util.sha1_mangle_key(k41), m(k41))
        end)

        it("calls the mangler only for long keys", function()
            local calls = 0
            local m = util.length_conditional_mangler(5, function(k)
                calls = calls + 1
                return "x" .. k
            end)
            m("abcd")
            assert.are.equal(0, calls)
            assert.are.equal("xabcde", m("abcde"))
            assert.are.equal(1, calls)
        end)

        it("raises dogpile.cache: errors on bad arguments", function()
            assert_raises(function() util.length_conditional_mangler("10", util.sha1_mangle_key) end, "length")
            assert_raises(function() util.length_conditional_mangler(10, "sha1") end, "mangler")
        end)
    end)

    describe("coerce_string", function()
        local cases = {
            { "60", 60 },
            { "0", 0 },
            { "-3", -3 },
            { "+4", 4 },
            { "1.5", 1.5 },
            { ".5", 0.5 },
            { "-.5", -0.5 },
            { "5.", 5 },
            { "1e3", 1000 },
            { "1E3", 1000 },
            { "2.5e-1", 0.25 },
            { "-1e+2", -100 },
            { "+.5", 0.5 },
            { "-5.", -5 },
            { "+1e3", 1000 },
            { "  7 ", 7 },
            { "\t8\n", 8 },
            { "true", true },
            { "TRUE", true },
            { "True", true },
            { "False", false },
            { "false", false },
            { " fAlSe ", false },
            { "None", nil },
            { "nil", nil },
            { "abc", "abc" },
            { "  abc  ", "abc" },
            { "NONE", "NONE" },
            { " None ", nil },
            { "1_000", "1_000" },
            { "1.2.3", "1.2.3" },
            { "1e", "1e" },
            { "e3", "e3" },
            { ".", "." },
            { "-", "-" },
            { "0x10", "0x10" },
            { "1 2", "1 2" },
            { "inf", "inf" },
            { "nan", "nan" },
            { "", "" },
            { "yes", "yes" },
        }
        for _, c in ipairs(cases) do
            it(string.format("%q -> %s (%s)", c[1], tostring(c[2]), type(c[2])), function()
                local v = util.coerce_string(c[1])
                assert.are.equal(type(c[2]), type(v))
                assert.are.equal(c[2], v)
            end)
        end

        it("numbers come back as numbers, not numeric strings", function()
            assert.are.equal("number", type(util.coerce_string("60")))
            assert.are.equal(60, util.coerce_string("60"))
        end)

        it("keeps non-strings as they are", function()
            local t = {}
            local f = function() end
            for _, v in ipairs({ 1, 2.5, true, false, t, f }) do
                assert.are.equal(v, util.coerce_string(v))
            end
            assert.is_nil(util.coerce_string(nil))
        end)
    end)

    describe("coerce_string_conf", function()
        it("coerces every string value, keeps keys and non-strings", function()
            local t = {}
            local conf = {
                ["cache.expiration_time"] = "60",
                ["cache.arguments.ratio"] = " 0.25 ",
                ["cache.arguments.flag"] = "TRUE",
                ["cache.arguments.off"] = "false",
                ["cache.arguments.none"] = "None",
                ["cache.arguments.lnil"] = "nil",
                ["cache.backend"] = "dogpile.cache.memory",
                ["cache.arguments.version"] = "1.2.3",
                ["cache.arguments.n"] = 5,
                ["cache.arguments.t"] = t,
                ["cache.arguments.b"] = false,
            }
            local out = util.coerce_string_conf(conf)
            assert.are.same({
                ["cache.expiration_time"] = 60,
                ["cache.arguments.ratio"] = 0.25,
                ["cache.arguments.flag"] = true,
                ["cache.arguments.off"] = false,
                ["cache.backend"] = "dogpile.cache.memory",
                ["cache.arguments.version"] = "1.2.3",
                ["cache.arguments.n"] = 5,
                ["cache.arguments.t"] = t,
                ["cache.arguments.b"] = false,
            }, out)
            assert.are.equal(t, out["cache.arguments.t"])
            assert.are_not.equal(conf, out)
            -- The input is not modified.
            assert.are.equal("60", conf["cache.expiration_time"])
        end)
    end)

    describe("a region with key_mangler", function()
        local key = "some:key|with args"
        local function mangled(k) return util.sha1_mangle_key(k) end

        local variants = {
            { "util.sha1_mangle_key", util.sha1_mangle_key },
            { '"sha1"', "sha1" },
        }
        for _, variant in ipairs(variants) do
            describe("= " .. variant[1], function()
                local region
                before_each(function()
                    region = cache.make_region({ key_mangler = variant[2] })
                        :configure("dogpile.cache.memory")
                end)

                it("exposes the mangler as region.key_mangler", function()
                    assert.are.equal("function", type(region.key_mangler))
                    assert.are.equal(mangled(key), region.key_mangler(key))
                end)

                it("set/get: the backend holds the mangled key only", function()
                    region:set(key, "v")
                    local store = region.actual_backend._cache
                    assert.is_not_nil(store[mangled(key)])
                    assert.is_nil(store[key])
                    assert.are.equal("v", store[mangled(key)].payload)
                    assert.are.equal("v", region:get(key))
                    local n = 0
                    for _ in pairs(store) do n = n + 1 end
                    assert.are.equal(1, n)
                end)

                it("get_or_create, delete: callers use the original key", function()
                    local calls = 0
                    local function creator() calls = calls + 1; return "made" end
                    assert.are.equal("made", region:get_or_create(key, creator))
                    assert.are.equal("made", region:get_or_create(key, creator))
                    assert.are.equal(1, calls)
                    assert.is_not_nil(region.actual_backend._cache[mangled(key)])
                    region:delete(key)
                    assert.is_nil(region.actual_backend._cache[mangled(key)])
                    assert.are.equal(NO_VALUE, region:get(key))
                end)

                it("multi operations mangle every key", function()
                    region:set_multi({ a = 1, b = 2 })
                    local store = region.actual_backend._cache
                    assert.is_not_nil(store[mangled("a")])
                    assert.is_not_nil(store[mangled("b")])
                    assert.is_nil(store.a)
                    assert.are.same({ 1, 2, NO_VALUE }, region:get_multi({ "a", "b", "c" }))
                    local got = region:get_or_create_multi({ "b", "c" }, function(...)
                        assert.are.same({ "c" }, { ... })
                        return { 3 }
                    end)
                    assert.are.same({ 2, 3 }, got)
                    assert.is_not_nil(store[mangled("c")])
                    region:delete_multi({ "a", "b" })
                    assert.is_nil(store[mangled("a")])
                    assert.is_nil(store[mangled("b")])
                    assert.are.same({ NO_VALUE, NO_VALUE, 3 }, region:get_multi({ "a", "b", "c" }))
                end)
            end)
        end

        it("a proxy sees only mangled keys", function()
            local seen = {}
            local Recorder = proxy.ProxyBackend:extend({
                get = function(self, k) seen[#seen + 1] = k; return self.proxied:get(k) end,
                set = function(self, k, v) seen[#seen + 1] = k; return self.proxied:set(k, v) end,
                delete = function(self, k) seen[#seen + 1] = k; return self.proxied:delete(k) end,
            })
            local region = cache.make_region({ key_mangler = "sha1" })
                :configure("dogpile.cache.memory", { wrap = { Recorder } })
            region:set(key, 1)
            assert.are.equal(1, region:get(key))
            assert.are.equal(1, region:get_or_create(key, function() error("not called") end))
            region:delete(key)
            assert.is_true(#seen >= 4)
            for _, k in ipairs(seen) do
                assert.are.equal(mangled(key), k)
            end
        end)

        it("length_conditional_mangler as the region's mangler", function()
            local region = cache.make_region({
                key_mangler = util.length_conditional_mangler(10, util.sha1_mangle_key),
            }):configure("dogpile.cache.memory")
            region:set("short", "s")
            region:set("a long key indeed", "l")
            local store = region.actual_backend._cache
            assert.is_not_nil(store.short)
            assert.is_nil(store["a long key indeed"])
            assert.is_not_nil(store[mangled("a long key indeed")])
            assert.are.equal("s", region:get("short"))
            assert.are.equal("l", region:get("a long key indeed"))
        end)

        it("decorated functions look up mangled keys", function()
            local region = cache.make_region({ key_mangler = "sha1" }):configure("dogpile.cache.memory")
            local calls = 0
            local f = region:cache_on_arguments({ namespace = "ns" })(function(a)
                calls = calls + 1
                return a * 2
            end)
            assert.are.equal(4, f(2))
            assert.are.equal(4, f(2))
            assert.are.equal(1, calls)
            local store = region.actual_backend._cache
            assert.is_nil(store["ns|2"])
            assert.are.equal(4, store[mangled("ns|2")].payload)
            assert.are.equal(4, region:get("ns|2"))
            assert.are.equal(4, f:get(2))
        end)

        it("make_region rejects a key_mangler that is neither a function nor \"sha1\"", function()
            assert_raises(function() cache.make_region({ key_mangler = "md5" }) end, "key_mangler")
            assert_raises(function() cache.make_region({ key_mangler = 1 }) end, "key_mangler")
        end)
    end)
end)
