-- dogpile.cache.wire and dogpile.cache.pyjson against Python's dogpile.cache
-- itself: real regions (redis backend with its default pickle serializer and
-- with a json serializer; pymemcache and python-memcached backends) on real
-- servers write every case, Lua reads the raw bytes equal with the same
-- created time; Lua's bytes, stored raw, are read by the same regions equal,
-- with the same created time and the same expiry. Python's json.dumps and
-- repr() are matched byte for byte.
local wire = require "dogpile.cache.wire"
local pyjson = require "dogpile.cache.pyjson"
local pickle = require "dogpile.cache.pickle"
local pyvalue = require "dogpile.cache.pyvalue"
local py = require "python_support"

local canon, read, write = py.canon, py.read, py.write
local null = pyvalue.null

local DIR
local OPTS = { mark = true, int64 = true }

local SERVERS = py.servers() -- stopped in teardown
local function redis_port()
    return SERVERS:redis_port(DIR)
end
local function memcached_port()
    return SERVERS:memcached_port(DIR)
end

local function check_output(out, ok)
    assert(ok, out)
    local count, failed = out:match("checked (%d+), (%d+) failed")
    assert(failed == "0", out)
    return tonumber(count)
end

-- Whether Lua's text for `v` must equal Python's byte for byte: no dict
-- with two keys or more (their order is Lua's pairs order).
local function ordered(v)
    if type(v) ~= "table" or v == null or getmetatable(v) == pyvalue.float_mt then
        return true
    end
    local n = 0
    for k, x in pairs(v) do
        n = n + 1
        if not ordered(k) or not ordered(x) then
            return false
        end
    end
    return getmetatable(v) ~= pyvalue.dict_mt or n <= 1
end

describe("dogpile.cache.wire", function()
    setup(function()
        DIR = py.tmpdir()
        local out, ok = py.python("gen-pickle", DIR)
        assert(ok, "the Python fixture failed (python3-dogpile.cache installed?): " .. out)
    end)

    teardown(function()
        SERVERS:stop()
        if DIR then
            py.rmdir(DIR)
        end
    end)

    describe("Python's float repr and json", function()
        it("float_repr is Python's repr() for random and tricky doubles", function()
            local out, ok = py.python("floats", DIR, 20000)
            assert(ok, out)
            local ffi = require "ffi"
            local u = ffi.new("union { double d; uint8_t b[8]; }")
            local n = 0
            for hex, repr in read(DIR .. "/floats.txt"):gmatch("(%x+) (%S+)\n") do
                for i = 0, 7 do
                    u.b[7 - i] = tonumber(hex:sub(2 * i + 1, 2 * i + 2), 16)
                end
                assert.are.equal(repr, pyvalue.float_repr(u.d), hex)
                -- and json reads the text back to the same double
                assert.are.equal(u.d, pyjson.loads(repr))
                n = n + 1
            end
            assert.is_true(n > 40000, n)
        end)

        it("reads every case Python's json.dumps writes, and writes the same bytes", function()
            local files, n, exact = py.list(DIR .. "/json"), 0, 0
            for _, f in ipairs(files) do
                local name = f:match("^(.*)%.json$")
                if name then
                    local text = read(DIR .. "/json/" .. f)
                    local v = pyjson.loads(text, OPTS)
                    assert.are.equal(read(DIR .. "/json/" .. name .. ".expect"), canon(v), name)
                    local mine = pyjson.dumps(v)
                    if ordered(v) then
                        assert.are.equal(text, mine, name)
                        exact = exact + 1
                    end
                    write(DIR .. "/lua_json/" .. name .. ".json", mine)
                    write(DIR .. "/lua_json/" .. name .. ".expect", canon(v))
                    write(DIR .. "/lua_json/" .. name .. ".pytext", "")
                    n = n + 1
                end
            end
            assert.is_true(n >= 40 and exact >= 35, n .. " read, " .. exact .. " byte-exact")
            -- Python reads Lua's text equal, and json.dumps of it is Lua's text
            check_output(py.python("check", DIR, "lua_json"))
        end)

        it("writes Lua values as Python's json.dumps does", function()
            local cases = {
                { nil, "null" }, { null, "null" }, { true, "true" }, { 3, "3" }, { 2.5, "2.5" },
                { pyvalue.float(3), "3.0" }, { 1e16, "1e+16" }, { 0 / 0, "NaN" },
                { -math.huge, "-Infinity" }, { "é\0\127\"\\/\n", '"\\u00e9\\u0000\\u007f\\"\\\\/\\n"' },
                { "😀", '"\\ud83d\\ude00"' }, { {}, "{}" }, { pyvalue.list {}, "[]" },
                { { 1, "a", null, false }, '[1, "a", null, false]' }, { { a = { b = 1 } }, '{"a": {"b": 1}}' },
                { { [1.5] = 1 }, '{"1.5": 1}' }, { { [true] = 1 }, '{"true": 1}' },
                { pyvalue.tuple { 1, 2 }, "[1, 2]" }, { pyvalue.list({ 1, nil }, 2), "[1, null]" },
                { pyvalue.CachedValue(1, { ct = 1.0, v = 2 }), '[1, {"ct": 1.0, "v": 2}]' },
            }
            for _, c in ipairs(cases) do
                assert.are.equal(c[2], pyjson.dumps(c[1]))
            end
            for _, bad in ipairs { { "\255", "not UTF-8" }, { pyvalue.bytes("x"), "bytes are not JSON" },
                { pyvalue.set {}, "a set is not JSON" }, { { f = print }, "cannot write a function at value.f" },
                { { [pyvalue.tuple {}] = 1 }, "keys must be str" } } do
                local ok, err = pcall(pyjson.dumps, bad[1])
                assert.is_false(ok)
                assert.matches(bad[2], err, 1, true)
            end
        end)

        it("json input: errors, never a raise, on truncated, mutated and deep text", function()
            local samples = { '{"a": [1, 2.5, "x\\u00e9\\ud83d\\ude00", null, true, false, {"b": -1e5}]}',
                '[NaN, Infinity, -Infinity, 1234567890123456789]', '"\\n\\t\\/"' }
            local n = 0
            for _, s in ipairs(samples) do
                assert.is_true((pyjson.load(s, { int64 = true })))
                for len = 0, #s - 1 do
                    local ok, a, b = pcall(pyjson.load, s:sub(1, len))
                    assert(ok and (a == false and type(b) == "string" or a == true))
                end
                for i = 1, #s do
                    for x = 0, 255, 3 do
                        local ok, a = pcall(pyjson.load, s:sub(1, i - 1) .. string.char(x) .. s:sub(i + 1))
                        assert(ok and (a == true or a == false))
                        n = n + 1
                    end
                end
            end
            assert.is_true(n > 5000)
            local ok, err = pyjson.load(("["):rep(100000))
            assert.is_false(ok)
            assert.matches("nested deeper than 200", err, 1, true)
            assert.is_false((pyjson.load("[1] x")))
            assert.is_false((pyjson.load("01")))
            assert.is_false((pyjson.load('"\1"')))
            assert.is_false((pyjson.load("12345678901234567890")))
        end)
    end)

    describe("the serialized layout (redis)", function()
        local port
        setup(function()
            port = redis_port()
        end)

        it("reads what dogpile.cache regions write, with the same created time", function()
            local out, ok = py.python("redis-gen", DIR, port)
            assert(ok, out)
            local n = 0
            for _, ser in ipairs { "pickle", "json" } do
                local serializer = wire.serializer(ser, OPTS)
                local folder = DIR .. "/redis/" .. ser
                for _, f in ipairs(py.list(folder)) do
                    local name = f:match("^(.*)%.bin$")
                    if name then
                        local bytes = read(folder .. "/" .. f)
                        local ok2, payload, ct, md = wire.decode(bytes, serializer)
                        assert(ok2, name .. ": " .. tostring(payload))
                        assert.are.equal(read(folder .. "/" .. name .. ".expect"), canon(payload), name)
                        assert.are.equal(read(folder .. "/" .. name .. ".ct"), pyvalue.float_repr(ct))
                        assert.are.equal(wire.VALUE_VERSION, md.v)
                        -- the metadata is Python's json.dumps, byte for byte
                        local mine = wire.encode(payload, ct, serializer)
                        assert.are.equal(bytes:match("^[^|]*|"), mine:match("^[^|]*|"))
                        if ser == "json" and ordered(payload) then
                            assert.are.equal(bytes, mine, name)
                        end
                        -- Lua writes it back, for Python to read
                        local back = DIR .. "/lua_redis/" .. ser .. "/" .. name
                        write(back .. ".bin", mine)
                        write(back .. ".expect", canon(payload))
                        write(back .. ".ct", pyvalue.float_repr(ct))
                        n = n + 1
                    end
                end
            end
            assert.is_true(n >= 100, n)
        end)

        it("writes what dogpile.cache regions read, with the same created time and expiry", function()
            local now = require("dogpile").now()
            local function put(ser, name, payload, ct, expect, exp)
                local base = DIR .. "/lua_redis/" .. ser .. "/" .. name
                write(base .. ".bin", wire.encode(payload, ct, wire.serializer(ser)))
                write(base .. ".expect", expect)
                write(base .. ".ct", pyvalue.float_repr(ct))
                if exp then
                    write(base .. ".exp", tostring(exp))
                end
            end
            for _, ser in ipairs { "pickle", "json" } do
                put(ser, "lua_plain", { a = 1, list = { 1, 2.5, "x" } }, now,
                    "dict{str:61=int:1,str:6c697374=list[int:1,float:2.5,str:78]}")
                put(ser, "lua_integral_ct", "v", 1700000000, "str:76")
                put(ser, "lua_expired", "old", now - 100, "str:6f6c64", 10)
                put(ser, "lua_nil", nil, now, "None")
            end
            put("pickle", "lua_bytes", pyvalue.bytes("\0\255"), now, "bytes:00ff")
            put("pickle", "lua_cached_payload", pyvalue.tuple { 1, pyvalue.frozenset { x = true } }, now,
                "tuple[int:1,frozenset{str:78}]")
            local count = check_output(py.python("redis-check", DIR, port))
            assert.is_true(count >= 110, count)
        end)

        it("decodes errors as false and a message, never a raise", function()
            local s = wire.serializer("pickle")
            local cases = {
                { "no bar at all", "no \"|\" after the metadata" },
                { "{\"ct\": 1.0|x", "dogpile.cache.pyjson:" },
                { "1|\128\4N.", "the metadata is not a JSON object" },
                { "{\"v\": 2}|\128\4N.", "no numeric \"ct\"" },
                { "{\"ct\": 1.5, \"v\": 2}|\128\4cos\nsystem\n.", "refused class os.system" },
                { "{\"ct\": 1.5, \"v\": 2}|", "truncated" },
            }
            for _, c in ipairs(cases) do
                local ok, err = wire.decode(c[1], s)
                assert.is_false(ok, c[1])
                assert.matches(c[2], err, 1, true)
            end
            assert.is_false((wire.decode(nil)))
            -- a version other than 2: decoded, for the caller to count a miss
            local ok, _, ct, md = wire.decode('{"ct": 1.5, "v": 1}|\128\4N.')
            assert.is_true(ok)
            assert.are.same({ 1.5, 1 }, { ct, md.v })
            -- user functions, as make_region(serializer=, deserializer=)
            local user = wire.serializer {
                serializer = function(v) return "<" .. v .. ">" end,
                deserializer = function(b)
                    return assert(b:match("^<(.*)>$"), "not mine")
                end,
            }
            local bytes = wire.encode("x", 2.5, user)
            assert.are.equal('{"ct": 2.5, "v": 2}|<x>', bytes)
            local okd, vd, ctd = wire.decode(bytes, user)
            assert.are.same({ true, "x", 2.5 }, { okd, vd, ctd })
            local ok2, err = wire.decode('{"ct": 2.5, "v": 2}|zz', user)
            assert.is_false(ok2)
            assert.matches("the deserializer raised: .*not mine", err)
            assert.has_error(function() wire.serializer("yaml") end)
            assert.has_error(function() wire.encode(1, 0 / 0) end)
        end)

        it("a value's own expiration time and creator's duration as extra metadata fields",
           function()
            local bytes = wire.encode("x", 1700000000, wire.serializer("json"), 5, 0.25)
            assert.are.equal('{"ct": 1700000000.0, "v": 2, "ttl": 5.0, "delta": 0.25}|"x"', bytes)
            local ok, v, ct, md = wire.decode(bytes, wire.serializer("json"))
            assert.is_true(ok)
            assert.are.same({ "x", 1700000000, 5, 0.25 }, { v, ct, md.ttl, md.delta })
            -- without them: exactly Python's bytes
            assert.are.equal('{"ct": 1700000000.0, "v": 2}|"x"',
                             wire.encode("x", 1700000000, wire.serializer("json")))
            local mb = wire.encode_memcached("x", 1700000000, nil, -1)
            local ok2, v2, ct2, md2 = wire.decode_memcached(mb, 1)
            assert.is_true(ok2)
            assert.are.same({ "x", 1700000000, -1 }, { v2, ct2, md2.ttl })
            assert.is_nil(md2.delta)
            assert.has_error(function() wire.encode("x", 1, nil, 0 / 0) end)
            assert.has_error(function() wire.encode_memcached("x", 1, nil, nil, "1") end)
        end)
    end)

    describe("memcached without a region serializer (pickled CachedValue, flags 1)", function()
        local port
        setup(function()
            port = memcached_port()
        end)

        it("reads what pymemcache and python-memcached regions write", function()
            local out, ok = py.python("mc-gen", DIR, port)
            assert(ok, out)
            local n = 0
            for _, client in ipairs { "pymemcache", "memcached" } do
                local folder = DIR .. "/mc/" .. client
                for _, f in ipairs(py.list(folder)) do
                    local name = f:match("^(.*)%.bin$")
                    if name then
                        local bytes = read(folder .. "/" .. f)
                        local flags = tonumber(read(folder .. "/" .. name .. ".flags"))
                        assert.are.equal(wire.FLAG_PICKLE, flags)
                        -- pymemcache pickles with protocol 5, python-memcached with 0
                        if client == "pymemcache" then
                            assert.are.equal("\128\5", bytes:sub(1, 2))
                        else
                            assert.are_not.equal("\128", bytes:sub(1, 1))
                        end
                        local ok2, payload, ct, md = wire.decode_memcached(bytes, flags, OPTS)
                        assert(ok2, name .. ": " .. tostring(payload))
                        assert.are.equal(read(folder .. "/" .. name .. ".expect"), canon(payload), name)
                        assert.are.equal(read(folder .. "/" .. name .. ".ct"), pyvalue.float_repr(ct))
                        assert.are.equal(2, md.v)
                        if client == "memcached" then
                            local back = DIR .. "/lua_mc/" .. name
                            local b2, f2 = wire.encode_memcached(payload, ct)
                            write(back .. ".bin", b2)
                            write(back .. ".flags", tostring(f2))
                            write(back .. ".expect", canon(payload))
                            write(back .. ".ct", pyvalue.float_repr(ct))
                        end
                        n = n + 1
                    end
                end
            end
            assert.is_true(n >= 120, n)
        end)

        it("writes what both clients' regions read, with the same created time", function()
            local now = require("dogpile").now()
            local b, f = wire.encode_memcached({ a = { 1, 2 } }, now, { protocol = 5 })
            assert.are.equal("\128\5", b:sub(1, 2))
            write(DIR .. "/lua_mc/lua_p5.bin", b)
            write(DIR .. "/lua_mc/lua_p5.flags", tostring(f))
            write(DIR .. "/lua_mc/lua_p5.expect", "dict{str:61=list[int:1,int:2]}")
            write(DIR .. "/lua_mc/lua_p5.ct", pyvalue.float_repr(now))
            b, f = wire.encode_memcached(nil, 1700000000)
            write(DIR .. "/lua_mc/lua_nil.bin", b)
            write(DIR .. "/lua_mc/lua_nil.flags", tostring(f))
            write(DIR .. "/lua_mc/lua_nil.expect", "None")
            write(DIR .. "/lua_mc/lua_nil.ct", "1700000000.0")
            -- each file is read by both clients
            local count = check_output(py.python("mc-check", DIR, port))
            assert.is_true(count >= 120, count)
        end)

        it("refuses other flags and other pickles", function()
            local ok, err = wire.decode_memcached("x", 8)
            assert.is_false(ok)
            assert.matches("flags 8", err, 1, true)
            ok, err = wire.decode_memcached(pickle.dumps({ 1 }), 1)
            assert.is_false(ok)
            assert.matches("not a dogpile.cache.api.CachedValue", err, 1, true)
            ok, err = wire.decode_memcached("\128\4cos\nsystem\n.", 1)
            assert.is_false(ok)
            assert.matches("refused class os.system at byte 2", err, 1, true)
            -- with a region serializer: the serialized layout, flags 0
            local bytes = wire.encode({ 1 }, 3.5)
            local ok2, v, ct = wire.decode_memcached(bytes, 0, nil, wire.serializer("pickle"))
            assert.is_true(ok2)
            assert.are.same({ { 1 }, 3.5 }, { v, ct })
            assert.is_false((wire.decode_memcached(bytes, 1, nil, wire.serializer("pickle"))))
        end)
    end)
end)
