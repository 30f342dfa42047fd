-- dogpile.codec: the value codec's Lua binding. Table-driven, as lua-cjson
-- tests its encoder: exact round trips, refusals with the exact path, and
-- decoding of bytes that are not a valid encoding.
local codec = require "dogpile.codec"
local ffi = require "ffi"

local HEADER = "\193\1"

-- Exact equality: -0.0 differs from 0, NaN equals NaN, tables compare
-- deeply (table keys are matched against an equal key of the other table).
local same

local function same_number(a, b)
    if a ~= a then
        return b ~= b
    end
    return a == b and (a ~= 0 or 1 / a == 1 / b)
end

local function find_key(t, k)
    if type(k) ~= "table" then
        return rawget(t, k) ~= nil, rawget(t, k)
    end
    for k2, v2 in pairs(t) do
        if type(k2) == "table" and same(k, k2) then
            return true, v2
        end
    end
    return false
end

function same(a, b)
    if type(a) ~= type(b) then
        return false
    end
    if type(a) == "number" then
        return same_number(a, b)
    end
    if type(a) ~= "table" then
        return a == b
    end
    local n = 0
    for k, v in pairs(a) do
        n = n + 1
        local found, v2 = find_key(b, k)
        if not found or not same(v, v2) then
            return false
        end
    end
    for _ in pairs(b) do
        n = n - 1
    end
    return n == 0
end

local function all_bytes()
    local t = {}
    for i = 0, 255 do
        t[#t + 1] = string.char(i)
    end
    return table.concat(t)
end

local function nest(depth, leaf)
    local v = leaf
    for _ = 1, depth do
        v = { v }
    end
    return v
end

-- A value that decode() accepted: it returned exactly one value.
local function decode1(bytes)
    local r = { n = select("#", codec.decode(bytes)), codec.decode(bytes) }
    assert.are.equal(1, r.n, "decode failed: " .. tostring(r[2]))
    return r[1]
end

describe("dogpile.codec", function()
    it("exposes its limits", function()
        assert.are.equal(200, codec.MAX_DEPTH)
        assert.are.equal(1, codec.FORMAT_VERSION)
        assert.is_string(codec._VERSION)
    end)

    describe("round-trips exactly", function()
        local t253 = 2 ^ 53
        local cases = {
            { "nil", nil },
            { "true", true },
            { "false", false },
            { "0", 0 },
            { "-0.0", -0.0, function(x) return 1 / x == -math.huge end },
            { "NaN", 0 / 0, function(x) return x ~= x end },
            { "1", 1 },
            { "-1", -1 },
            { "2^53", t253 },
            { "2^53 + 2", t253 + 2 },
            { "-2^53", -t253 },
            { "2^63", 2 ^ 63 },
            { "-2^63", -2 ^ 63 },
            { "2^64", 2 ^ 64 },
            { "1e308", 1e308 },
            { "5e-324 (smallest subnormal)", 5e-324 },
            { "math.huge", math.huge },
            { "-math.huge", -math.huge },
            { "0.1", 0.1 },
            { "1/3", 1 / 3 },
            { "-2.5", -2.5 },
            { "empty string", "" },
            { "a NUL", "\0" },
            { "embedded zeros", "a\0b\0\0c" },
            { "all 256 byte values", all_bytes() },
            { "a 4 MB string", string.rep("0123456789abcdef", 4 * 65536) },
            { "empty table", {} },
            { "array", { 1, 2, 3, "four", 5.5 } },
            { "hash", { a = 1, b = "two", c = true, ["with space"] = false } },
            { "array and hash parts", { 10, 20, 30, x = 1, y = { 1, 2 }, [0] = "zero" } },
            { "nested", { players = { { name = "ann", hp = 10 }, { name = "bob", hp = 0.5 } }, turn = 3 } },
            { "number keys", { [1.5] = "a", [-1] = "b", [0] = "c", [2 ^ 53] = "d", [1e300] = "e",
                               [math.huge] = "f", [-math.huge] = "g", [5e-324] = "h" } },
            { "boolean keys", { [true] = "yes", [false] = "no" } },
            { "table keys", { [{ 1, 2 }] = "pair", [{ x = { y = true } }] = { "nested", "value" } } },
            { "string keys with any bytes", { ["\0"] = 1, ["a\0b"] = 2, [all_bytes()] = 3, [""] = 4 } },
            { "a sparse array", { 1, nil, 3 } },
            { "an array with a leading hole", { nil, nil, 3 } },
            { "far indices", { [1] = 1, [1000] = 2, [2 ^ 40] = 3 } },
            { "special numbers as values", { -0.0, 0 / 0, math.huge, x = -0.0 } },
            { "200 nested tables (the limit)", nest(200, "bottom") },
            { "a shared (not cyclic) subtable", (function()
                local s = { 1, 2 }
                return { s, s, k = s }
            end)() },
        }
        for _, case in ipairs(cases) do
            local name, value, extra = case[1], case[2], case[3]
            it(name, function()
                local bytes = codec.encode(value)
                assert.is_string(bytes)
                local back = decode1(bytes)
                assert.is_true(same(value, back), name .. " did not round-trip")
                if extra then
                    assert.is_true(extra(back), name .. ": the special value was lost")
                end
                -- the encoding is deterministic in size whatever the order
                assert.are.equal(#bytes, #codec.encode(back))
            end)
        end

        it("keeps the sign of a -0.0 inside a table", function()
            local back = decode1(codec.encode({ -0.0, [2] = 0 }))
            assert.are.equal(-math.huge, 1 / back[1])
            assert.are.equal(math.huge, 1 / back[2])
        end)
    end)

    describe("byte format", function()
        local cases = {
            { "nil", nil, HEADER .. "\0" },
            { "false", false, HEADER .. "\1" },
            { "true", true, HEADER .. "\2" },
            { "1 as a zigzag varint", 1, HEADER .. "\3\2" },
            { "-1", -1, HEADER .. "\3\1" },
            { "2^53 as an integer", 2 ^ 53, HEADER .. "\3\128\128\128\128\128\128\128\32" },
            { "2^63 as a double", 2 ^ 63, HEADER .. "\4\0\0\0\0\0\0\224\67" },
            { "-0.0 as a double", -0.0, HEADER .. "\4\0\0\0\0\0\0\0\128" },
            { "0.5 as a double", 0.5, HEADER .. "\4\0\0\0\0\0\0\224\63" },
            { "a string", "hi", HEADER .. "\5\2hi" },
            { "{}", {}, HEADER .. "\6\0\0" },
            { "{7, k = false}", { 7, k = false }, HEADER .. "\6\1\1\3\14\5\1k\1" },
        }
        for _, case in ipairs(cases) do
            it(case[1], function()
                assert.are.equal(case[3], codec.encode(case[2]))
            end)
        end
    end)

    -- encode writes the bytes itself, each table traversed once (its counts
    -- after its items); the core's dp_buf_put_*, which C hosts use, are the
    -- reference.
    describe("writes what the core's dp_buf_put_* write", function()
        local lib = require "dogpile.lib"
        pcall(ffi.cdef, [[
        typedef struct codec_spec_buf {
            unsigned char *data; size_t len; int done; int err; char errstr[128];
            size_t cap; void *alloc; void *ud; int depth;
            uint64_t left[200]; uint64_t keyed[200];
        } codec_spec_buf;
        ]])
        local C = ffi.load(lib.library_path)
        pcall(ffi.cdef, [[
        void dp_buf_init(codec_spec_buf *b, void *alloc, void *ud);
        void dp_buf_free(codec_spec_buf *b);
        int dp_buf_finish(codec_spec_buf *b);
        int dp_buf_put_nil(codec_spec_buf *b);
        int dp_buf_put_boolean(codec_spec_buf *b, int value);
        int dp_buf_put_number(codec_spec_buf *b, double value);
        int dp_buf_put_string(codec_spec_buf *b, const void *s, size_t len);
        int dp_buf_put_table(codec_spec_buf *b, size_t narr, size_t nhash);
        ]])

        -- The items in the order encode visits them: 1..n up to the first
        -- nil, then the other keys in next() order.
        local function put(b, v)
            local t = type(v)
            if t == "nil" then
                C.dp_buf_put_nil(b)
            elseif t == "boolean" then
                C.dp_buf_put_boolean(b, v and 1 or 0)
            elseif t == "number" then
                C.dp_buf_put_number(b, v)
            elseif t == "string" then
                C.dp_buf_put_string(b, v, #v)
            else
                local narr = 0
                while rawget(v, narr + 1) ~= nil do
                    narr = narr + 1
                end
                local keys = {}
                for k in next, v do
                    if not (type(k) == "number" and k >= 1 and k <= narr and k % 1 == 0) then
                        keys[#keys + 1] = k
                    end
                end
                C.dp_buf_put_table(b, narr, #keys)
                for i = 1, narr do
                    put(b, v[i])
                end
                for _, k in ipairs(keys) do
                    put(b, k)
                    put(b, v[k])
                end
            end
        end

        local function reference(v)
            local b = ffi.new("codec_spec_buf")
            C.dp_buf_init(b, nil, nil)
            put(b, v)
            assert.are.equal(0, C.dp_buf_finish(b), ffi.string(b.errstr))
            local bytes = ffi.string(b.data, b.len)
            C.dp_buf_free(b)
            return bytes
        end

        local function big(n, f)
            local t = {}
            for i = 1, n do
                f(t, i)
            end
            return t
        end

        it("for scalars, records, counts of one byte and more, and nesting", function()
            math.randomseed(20261202)
            assert.are.equal(reference(nil), codec.encode(nil))
            local values = { true, false, 0, -0.0, 2 ^ 53, 2 ^ 63, -2 ^ 63, 0.5, 0 / 0, math.huge, "",
                             "hi", string.rep("x", 200),
                             { id = 1, name = "Ada", score = 98.25, ok = true, off = false },
                             { 1, 2, nil, 4, k = "v", [2.5] = { x = { [true] = false } } },
                             -- Counts of 127, 128 and 2^14 items: the counts take more
                             -- than the byte each that encode keeps for them.
                             big(127, function(t, i) t[i] = i end),
                             big(128, function(t, i) t[i] = i end),
                             big(128, function(t, i) t["k" .. i] = i end),
                             big(16384, function(t, i) t[i] = i; t["h" .. i] = { i } end),
                             { inner = big(300, function(t, i) t["k" .. i] = { i, "s" } end),
                               list = big(200, function(t, i) t[i] = big(130, function(u, j) u[j] = j end) end),
                               after = "end" },
                             nest(198, { a = big(129, function(t, i) t[i] = i end) }) }
            for i = 1, #values do
                assert.are.equal(reference(values[i]), codec.encode(values[i]), "value " .. i)
            end
            for _ = 1, 200 do
                local t = {}
                for i = 1, math.random(0, 200) do
                    t[i] = math.random() < 0.5 and i or { ("s"):rep(math.random(0, 130)) }
                end
                for _ = 1, math.random(0, 200) do
                    t[math.random(1, 1e6) * (math.random() < 0.5 and 1 or 0.5)] = math.random() < 0.5
                end
                assert.are.equal(reference(t), codec.encode(t))
            end
        end)
    end)

    describe("refuses with the path of what it cannot serialize", function()
        local function self_cycle()
            local t = {}
            t[1] = t
            return t
        end
        local function deep_cycle()
            local t = { a = {} }
            t.a.b = t
            return t
        end
        local function cycle_in_array()
            local t = { players = { {}, {}, {} } }
            t.players[3].team = t.players
            return t
        end
        local cases = {
            { "a function", print, "value: cannot serialize a function" },
            { "a userdata deep inside", { players = { nil, nil, { socket = io.stdout } } },
              "value.players[3].socket: cannot serialize a userdata" },
            { "a coroutine", { co = coroutine.create(print) }, "value.co: cannot serialize a thread" },
            { "a cdata", { [1] = { ffi.new("int") } }, "value[1][1]: cannot serialize a cdata" },
            { "a cdata int64", { n = 1LL }, "value.n: cannot serialize a cdata" },
            { "a non-identifier key", { ["x y"] = print }, 'value["x y"]: cannot serialize a function' },
            { "a keyword key", { ["end"] = print }, 'value["end"]: cannot serialize a function' },
            { "a key with quotes and control bytes", { ['a"b\\\n\0'] = print },
              'value["a\\"b\\\\\\10\\0"]: cannot serialize a function' },
            { "a long key, cut", { [string.rep("k", 50)] = print },
              'value["' .. string.rep("k", 40) .. '"...]: cannot serialize a function' },
            { "a fractional key", { [1.5] = print }, "value[1.5]: cannot serialize a function" },
            { "a negative key", { [-3] = print }, "value[-3]: cannot serialize a function" },
            { "an infinite key", { [-math.huge] = print }, "value[-math.huge]: cannot serialize a function" },
            { "a boolean key", { [false] = { [true] = print } }, "value[false][true]: cannot serialize a function" },
            { "a function as a key", { a = { [print] = 1 } }, "value.a: cannot serialize a function (used as a key)" },
            { "a coroutine as a key", { [coroutine.create(print)] = 1 },
              "value: cannot serialize a thread (used as a key)" },
            { "a table that contains itself", self_cycle(),
              "value[1]: cannot serialize a cycle (this table contains itself)" },
            { "a cycle two levels down", deep_cycle(),
              "value.a.b: cannot serialize a cycle (this table contains itself)" },
            { "a cycle to an inner table", cycle_in_array(),
              "value.players[3].team: cannot serialize a cycle (this table contains itself)" },
            { "201 nested tables", nest(201, 1),
              "value" .. string.rep("[1]", 200) .. ": tables nested deeper than 200 levels" },
        }
        for _, case in ipairs(cases) do
            it(case[1], function()
                local ok, err = pcall(codec.encode, case[2])
                assert.is_false(ok)
                assert.are.equal("dogpile.codec: " .. case[3], err)
            end)
        end

        it("names a table used as a key", function()
            local k = { f = print }
            local ok, err = pcall(codec.encode, { list = { [k] = true } })
            assert.is_false(ok)
            assert.matches("^dogpile%.codec: value%.list<key table: 0x%x+>%.f: cannot serialize a function$", err)
            local t = {}
            t[t] = 1
            ok, err = pcall(codec.encode, t)
            assert.matches("^dogpile%.codec: value<key table: 0x%x+>: cannot serialize a cycle", err)
            ok, err = pcall(codec.encode, { [{}] = { print } })
            assert.matches("^dogpile%.codec: value%[table: 0x%x+%]%[1%]: cannot serialize a function$", err)
        end)

        it("raises for a missing argument", function()
            assert.has_error(function() codec.encode() end)
        end)

        it("is usable again after refusing", function()
            for _ = 1, 100 do
                assert.is_false(pcall(codec.encode, { big = string.rep("x", 10000), f = print }))
            end
            assert.are.equal(HEADER .. "\2", codec.encode(true))
        end)
    end)

    describe("decodes bytes that are not a valid encoding to nil, err", function()
        local function refused(bytes, fragment)
            local ok, v, err = pcall(codec.decode, bytes)
            assert.is_true(ok, "decode raised: " .. tostring(v))
            assert.is_nil(v)
            assert.is_string(err)
            assert.are.equal("dogpile.codec: ", err:sub(1, 15))
            if fragment then
                assert.truthy(err:find(fragment, 1, true), "'" .. err .. "' does not mention " .. fragment)
            end
        end

        local cases = {
            { "empty", "", "header" },
            { "text", "hello world", "not a dogpile encoding" },
            { "JSON", '{"a":[1,2,3]}', "not a dogpile encoding" },
            { "MessagePack", "\130\161a\1\161b\2", "not a dogpile encoding" },
            { "LuaJIT bytecode", string.dump(function() return 1 end), "not a dogpile encoding" },
            { "a newer format version", "\193\2\0", "newer" },
            { "no item", HEADER, "truncated" },
            { "an unknown tag", HEADER .. "\9", "unknown tag 0x09" },
            { "trailing bytes", HEADER .. "\0\0", "trailing" },
            { "a string longer than the input", HEADER .. "\5\100abc", "truncated" },
            { "a huge declared table", HEADER .. "\6\255\255\255\255\15\0", "declares" },
            { "a nil key", HEADER .. "\6\0\1\0\2", "nil table key" },
            { "a NaN key", HEADER .. "\6\0\1\4\0\0\0\0\0\0\248\127\2", "NaN table key" },
            { "an integer no double holds", HEADER .. "\3\130\128\128\128\128\128\128\64", "not exactly a double" },
            { "201 nested tables", HEADER .. string.rep("\6\1\0", 201) .. "\0", "deeper than 200" },
        }
        for _, case in ipairs(cases) do
            it(case[1], function()
                refused(case[2], case[3])
            end)
        end

        it("200 nested tables decode", function()
            local v = decode1(HEADER .. string.rep("\6\1\0", 200) .. "\0")
            for _ = 1, 199 do
                v = v[1]
            end
            assert.are.same({}, v)
        end)

        local sample = codec.encode({ 1, -0.0, 0 / 0, "str\0ing", { x = { [true] = false } },
                                      [{ "k" }] = 2 ^ 63, name = "players", [2.5] = -1 })

        it("every truncation of an encoding", function()
            for cut = 0, #sample - 1 do
                refused(sample:sub(1, cut))
            end
        end)

        it("every single-byte corruption of an encoding: a value or nil, err, never an error", function()
            local accepted = 0
            for pos = 1, #sample do
                for b = 0, 255, 3 do
                    local bytes = sample:sub(1, pos - 1) .. string.char(b) .. sample:sub(pos + 1)
                    local ok, v, err = pcall(codec.decode, bytes)
                    assert.is_true(ok, "decode raised: " .. tostring(v))
                    if err == nil then
                        accepted = accepted + 1
                        -- whatever it accepted re-encodes and decodes again
                        assert.is_true(same(v, decode1(codec.encode(v))))
                    else
                        assert.is_nil(v)
                    end
                end
            end
            assert.is_true(accepted > 0)
        end)

        it("random bytes", function()
            math.randomseed(20240611)
            for _ = 1, 2000 do
                local t = {}
                for i = 1, math.random(0, 40) do
                    t[i] = string.char(math.random(0, 255))
                end
                local body = table.concat(t)
                for _, bytes in ipairs({ body, HEADER .. body }) do
                    local ok, v, err = pcall(codec.decode, bytes)
                    assert.is_true(ok, "decode raised: " .. tostring(v))
                    assert.is_true(err == nil or (v == nil and type(err) == "string"))
                end
            end
        end)

        it("raises only for a non-string argument", function()
            assert.has_error(function() codec.decode({}) end)
            assert.has_error(function() codec.decode() end)
        end)
    end)
end)
