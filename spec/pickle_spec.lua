-- dogpile.cache.pickle against Python's own pickle (Debian's /usr/bin/python3):
-- every supported type written by Python with protocols 0 to 5 reads equal;
-- what Lua writes, Python reads equal; the refusals name opcode, offset and
-- class; and no input, truncated, mutated, random, deep or huge, makes the
-- reader raise, crash or read past its end (inputs sit against a PROT_NONE page).
local pickle = require "dogpile.cache.pickle"
local pyvalue = require "dogpile.cache.pyvalue"
local py = require "python_support"
local ffi = require "ffi"

local canon, read, write = py.canon, py.read, py.write
local null = pyvalue.null

local DIR
local CASES = {} -- {name, canon} in the order Python wrote them

local function load_cases()
    for line in read(DIR .. "/cases.txt"):gmatch("[^\n]+") do
        local name, text = line:match("^(%S+)\t(.*)$")
        CASES[#CASES + 1] = { name = name, canon = text }
    end
end

-- Python's check of DIR/lua: every file reads back to its .expect.
local function python_check(sub)
    local out, ok = py.python("check", DIR, sub or "lua")
    assert(ok, out)
    local count, failed = out:match("checked (%d+), (%d+) failed")
    assert.are.equal("0", failed, out)
    return tonumber(count)
end

local function loads_ok(bytes, opts)
    local ok, v = pickle.load(bytes, opts)
    assert(ok, v)
    return v
end

describe("dogpile.cache.pickle", function()
    setup(function()
        DIR = py.tmpdir()
        local out, ok = py.python("gen-pickle", DIR)
        assert(ok, "the Python fixture failed (python3-dogpile.cache installed?): " .. out)
        load_cases()
        assert(#CASES >= 60, "cases: " .. #CASES)
    end)

    teardown(function()
        if DIR then
            py.rmdir(DIR)
        end
    end)

    it("reads every case Python writes with protocols 0 to 5, types exact", function()
        local n = 0
        for _, c in ipairs(CASES) do
            for proto = 0, 5 do
                local bytes = assert(read(("%s/pickle/%s.p%d"):format(DIR, c.name, proto)))
                local ok, v = pickle.load(bytes, { mark = true, int64 = true })
                assert(ok, c.name .. " protocol " .. proto .. ": " .. tostring(v))
                assert.are.equal(c.canon, canon(v), c.name .. " protocol " .. proto)
                n = n + 1
            end
        end
        assert.are.equal(#CASES * 6, n)
    end)

    it("writes what Python reads back equal: every case, read then written", function()
        for _, c in ipairs(CASES) do
            for proto = 0, 5, 5 do
                local v = loads_ok(read(("%s/pickle/%s.p%d"):format(DIR, c.name, proto)),
                                  { mark = true, int64 = true })
                local name = c.name .. "_p" .. proto
                write(DIR .. "/lua/" .. name .. ".pkl", pickle.dumps(v, { protocol = proto == 5 and 5 or 4 }))
                write(DIR .. "/lua/" .. name .. ".expect", c.canon)
            end
        end
        assert.are.equal(#CASES * 2, python_check())
    end)

    it("writes plain Lua values as the documented Python types", function()
        local shared = { 1 }
        local cases = {
            { "nil", nil, "None" },
            { "null", null, "None" },
            { "bool", true, "True" },
            { "int", 42, "int:42" },
            { "int_neg_big", -2 ^ 53, "int:-9007199254740992" },
            { "float", 0.1, "float:0.1" },
            { "float_2p53_plus", 2 ^ 53 * 2, "float:1.8014398509481984e+16" },
            { "float_neg0", -0.0, "float:-0.0" },
            { "float_marked", pyvalue.float(3), "float:3.0" },
            { "str", "héllo", "str:68c3a96c6c6f" },
            { "str_invalid_utf8", "\255\0", "bytes:ff00" },
            { "bytes_marked", pyvalue.bytes("abc"), "bytes:616263" },
            { "empty_table", {}, "dict{}" },
            { "empty_list", pyvalue.list {}, "list[]" },
            { "array", { 1, "a", true }, "list[int:1,str:61,True]" },
            { "array_with_null", { 1, null, 3 }, "list[int:1,None,int:3]" },
            { "list_n_holes", pyvalue.list({ 1, nil, 3, nil }, 4), "list[int:1,None,int:3,None]" },
            { "holes_unmarked", { [1] = "a", [3] = "c" }, "dict{int:1=str:61,int:3=str:63}" },
            { "dict", { a = 1, [2] = "two", [2.5] = true, [false] = 0 },
              "dict{False=int:0,float:2.5=True,int:2=str:74776f,str:61=int:1}" },
            { "dict_marked", pyvalue.dict { "x" }, "dict{int:1=str:78}" },
            { "tuple", pyvalue.tuple { 1, 2 }, "tuple[int:1,int:2]" },
            { "tuple_key", { [pyvalue.tuple { 1, "a" }] = 1 }, "dict{tuple[int:1,str:61]=int:1}" },
            { "set", pyvalue.set { a = true, [1] = true }, "set{int:1,str:61}" },
            { "frozenset", pyvalue.frozenset { [2] = true }, "frozenset{int:2}" },
            { "int64", ffi.new("int64_t", 2) ^ 62, "int:4611686018427387904" },
            { "int64_neg", -ffi.new("int64_t", 2) ^ 63, "int:-9223372036854775808" },
            { "uint64_small", ffi.new("uint64_t", 7), "int:7" },
            { "shared", { shared, shared }, "list[list[int:1],list[int:1]]" },
            { "cached", pyvalue.CachedValue({ x = 1 }, { ct = 1700000000, v = 2 }),
              "CachedValue(dict{str:78=int:1},dict{str:6374=float:1700000000.0,str:76=int:2})" },
            { "cached_nil", pyvalue.CachedValue(nil, { ct = 5.5, v = 2 }),
              "CachedValue(None,dict{str:6374=float:5.5,str:76=int:2})" },
        }
        for _, c in ipairs(cases) do
            write(DIR .. "/native/" .. c[1] .. ".pkl", pickle.dumps(c[2]))
            write(DIR .. "/native/" .. c[1] .. ".expect", c[3])
        end
        -- strings: all as bytes, or refused when not UTF-8
        write(DIR .. "/native/as_bytes.pkl", pickle.dumps({ "a" }, { string = "bytes" }))
        write(DIR .. "/native/as_bytes.expect", "list[bytes:61]")
        write(DIR .. "/native/empty_list_opt.pkl", pickle.dumps({}, { empty_table = "list" }))
        write(DIR .. "/native/empty_list_opt.expect", "list[]")
        assert.are.equal(#cases + 2, python_check("native"))
        assert.has_error(function() pickle.dumps("\255", { string = "str" }) end,
            "dogpile.cache.pickle: a string that is not UTF-8 (string = \"str\") at value")
    end)

    it("reads into plain Lua values by default (the documented mapping)", function()
        local function p4(name)
            return loads_ok(read(DIR .. "/pickle/" .. name .. ".p4"))
        end
        assert.is_nil(p4("none"))
        assert.are.same({ 1, "a", null, 2.5, true }, p4("list"))
        assert.are.same({ 1, "b" }, p4("tuple2"))
        local set, kinds = p4("set"), {}
        for k, v in pairs(set) do
            assert.is_true(v)
            kinds[#kinds + 1] = k == null and "None" or type(k) == "table" and "tuple:" .. k[1] .. k[2]
                or tostring(k)
        end
        table.sort(kinds)
        assert.are.same({ "1", "None", "a", "tuple:12" }, kinds)
        assert.are.equal("ab\255\0\128", p4("bytes"))
        assert.are.equal(2, p4("float_int"))
        assert.is_nil(getmetatable(p4("dict")))
        assert.are.same({ "a", "b" }, p4("dict_intkeys"))
        local cv = p4("cached_value")
        assert.are.equal(pyvalue.CachedValue_mt, getmetatable(cv))
        assert.are.same({ a = { 1, 2 } }, cv.payload)
        assert.are.same({ ct = 1700000000.25, v = 2 }, cv.metadata)
        assert.is_nil(p4("cached_none").payload)
        local sh = p4("shared")
        assert.are.equal(sh[1], sh[2]) -- the memo shares, never copies
        assert.are.equal(sh[1], sh[3].k)
    end)

    it("reads ints beyond 2^53 as an error, or as int64 cdata when asked", function()
        local big = "\128\4\138\8\255\255\255\255\255\255\255\127." -- 2^63 - 1
        local ok, err = pickle.load(big)
        assert.is_false(ok)
        assert.matches("an int beyond 2^53 (read it with int64 = true) at byte 2 (opcode LONG1 0x8a)", err, 1, true)
        local v = loads_ok(big, { int64 = true })
        assert.is_true(ffi.istype("int64_t", v))
        assert.are.equal(9223372036854775807LL, v)
        assert.are.equal(-9007199254740992, loads_ok(read(DIR .. "/pickle/int_neg2p53.p0")))
        assert.are.equal(-9223372036854775807LL - 1, loads_ok("L-9223372036854775808L\n.", { int64 = true }))
        ok, err = pickle.load("\128\4\138\9\0\0\0\0\0\0\0\0\1.", { int64 = true })
        assert.is_false(ok)
        assert.matches("outside the int64 range", err, 1, true)
        ok = pickle.load("I99999999999999999999\n.", { int64 = true })
        assert.is_false(ok)
        -- the writer: int64 cdata round trip through its own reader
        for _, c in ipairs { 9007199254740993LL, -9007199254740993LL, 4611686018427387904LL,
            -9223372036854775807LL - 1, 9223372036854775807LL, 7LL, -2147483648LL } do
            local back = loads_ok(pickle.dumps(c), { int64 = true })
            assert.are.equal(c, back + 0LL)
        end
    end)

    it("reads oslo.cache-era protocol 0 CachedValues (REDUCE on the class, Python 2 str)", function()
        local v = loads_ok(read(DIR .. "/oslo.p0"), { mark = true })
        assert.are.equal(read(DIR .. "/oslo.expect"), canon(v))
        local plain = loads_ok(read(DIR .. "/oslo.p0"))
        assert.are.equal("nA's\nA", plain.payload.name)
        assert.are.equal("café €", plain.payload.u)
        assert.are.equal(1700000000.5, plain.metadata.ct)
    end)

    it("refuses other classes and opcodes, naming opcode, byte offset and class", function()
        local function refused(bytes, msg)
            local ok, err = pickle.load(bytes)
            assert.is_false(ok, msg)
            assert.matches(msg, err, 1, true)
            assert.has_error(function() pickle.loads(bytes) end)
        end
        refused("cos\nsystem\n(S'echo x'\ntR.", "refused class os.system at byte 0 (opcode GLOBAL 0x63 'c')")
        refused("\128\4\140\8builtins\148\140\4eval\148\147.",
            "refused class builtins.eval at byte 20 (opcode STACK_GLOBAL 0x93)")
        refused("c__builtin__\nsetattr\n.", "refused class builtins.setattr at byte 0")
        refused("\128\2cdatetime\ndatetime\nq\0.", "refused class datetime.datetime at byte 2")
        refused("\128\4}\148b.", "opcode outside the supported subset at byte 4 (opcode BUILD 0x62 'b')")
        refused("\128\5\150\1\0\0\0\0\0\0\0x.", "at byte 2 (opcode BYTEARRAY8 0x96)")
        refused("\128\5\151.", "at byte 2 (opcode NEXT_BUFFER 0x97)")
        refused("\128\2\130\1.", "at byte 2 (opcode EXT1 0x82)")
        refused("(i__main__\nC\n.", "opcode outside the supported subset at byte 1 (opcode INST 0x69 'i')")
        refused("P1\n.", "(opcode PERSID 0x50 'P')")
        -- allowed classes, called in ways Python never writes
        refused("c__builtin__\nset\n(S'ab'\ntR.",
            "builtins.set called on something other than a list at byte 25 (opcode REDUCE 0x52 'R')")
        refused("\128\2c__builtin__\nset\n)\129.", "class builtins.set cannot be instantiated here at byte 20 (opcode NEWOBJ")
        refused("c_codecs\nencode\n(Vx\nVutf8\ntR.", "class _codecs.encode called with arguments it is not written with")
        refused("\128\2cdogpile.cache.api\nCachedValue\n]]\134\129.", "a list where a dict was expected")
        refused("\128\2c__builtin__\nset\n.", "a class as the value")
        refused("\128\2]c__builtin__\nset\na.", "class builtins.set used as a value")
        refused("\128\4}]K\1s.", "unhashable list as a dict key")
        refused("\128\4}G\127\248\0\0\0\0\0\0K\1s.", "a NaN dict key")
        refused("\128\6N.", "unsupported protocol 6 at byte 0 (opcode PROTO 0x80)")
        refused("N", "truncated: no STOP at byte 1 (opcode (end of input))")
        refused("a.", "stack underflow at byte 0 (opcode APPEND")
        refused("](K\1a.", "stack underflow at byte 4 (opcode APPEND")
        refused("\128\4h\7.", "memo key 7 not found at byte 2 (opcode BINGET")
    end)

    it("refuses what Python pickles of other classes", function()
        -- written by a one-off inline script: datetime, Decimal, bytearray,
        -- complex, a user class; protocols 0..5
        local code = [[
import pickle, sys, datetime, decimal, collections
P = collections.namedtuple("P", "x y")
d = sys.argv[1]
vals = {"datetime": datetime.datetime(2020, 1, 1), "decimal": decimal.Decimal("1.5"),
        "bytearray": bytearray(b"x"), "complex": 1j, "namedtuple": P(1, 2),
        "range": range(3), "slice": slice(1)}
for name, v in vals.items():
    for proto in range(6):
        open("%s/refused_%s.p%d" % (d, name, proto), "wb").write(pickle.dumps(v, proto))
]]
        write(DIR .. "/refused.py", code)
        local p = io.popen(py.PYTHON .. " " .. DIR .. "/refused.py " .. DIR .. " 2>&1; echo exit=$?")
        local out = p:read("*a")
        p:close()
        assert.matches("exit=0", out, 1, true)
        local n = 0
        for _, f in ipairs(py.list(DIR)) do
            if f:match("^refused_") then
                local ok2, err = pickle.load(read(DIR .. "/" .. f))
                assert.is_false(ok2, f)
                assert.matches("at byte %d+ %(opcode ", err)
                if not f:match("bytearray") then
                    assert.matches("refused class [%w_.]+", err)
                end
                n = n + 1
            end
        end
        assert.are.equal(42, n)
    end)

    it("writes refusals with the path inside the value", function()
        local function refuses(v, msg, opts)
            local ok, err = pcall(pickle.dumps, v, opts)
            assert.is_false(ok)
            assert.matches(msg, err, 1, true)
        end
        refuses({ a = { print } }, "cannot write a function at value.a[1]")
        refuses({ [{}] = 1 }, "a table key (only pyvalue.tuple, frozenset, bytes and float marks are hashable)")
        local cyc = {}
        cyc.self = cyc
        refuses(cyc, "a cyclic value at value.self")
        local deep = {}
        for _ = 1, 300 do
            deep = { deep }
        end
        refuses(deep, "nested deeper than 200")
        assert.is_string(pickle.dumps(deep, { max_depth = 400 }))
        refuses(coroutine.create(print), "cannot write a thread at value")
        refuses(io.stdout, "cannot write a userdata at value")
    end)

    it("bounds depth: deep nesting is refused, cycles through the memo too", function()
        local function nested(d)
            return "\128\4" .. ("]"):rep(d) .. ("a"):rep(d - 1) .. "."
        end
        assert.is_true((pickle.load(nested(200))))
        local ok, err = pickle.load(nested(201))
        assert.is_false(ok)
        assert.matches("nested deeper than 200", err, 1, true)
        assert.is_true((pickle.load(nested(1000), { max_depth = 1000 })))
        ok, err = pickle.load("\128\4" .. ("("):rep(100000) .. ".")
        assert.is_false(ok)
        assert.matches("marks nested deeper than 200", err, 1, true)
        -- depth through the memo: each list holds the previous one
        local chain = { "\128\4]q\0" }
        for _ = 1, 300 do
            chain[#chain + 1] = "]h\0aq\0"
        end
        ok, err = pickle.load(table.concat(chain) .. ".")
        assert.is_false(ok)
        assert.matches("nested deeper than 200", err, 1, true)
        -- a list holding itself; two lists holding each other; a list
        -- changed after it was nested
        for _, bytes in ipairs {
            "\128\4]q\0h\0a.",
            "\128\4]q\0]q\1h\0a0h\1a.",
            "\128\4]q\0]q\1h\0ah\1a.",
        } do
            ok, err = pickle.load(bytes)
            assert.is_false(ok, bytes)
            assert.matches("a cyclic value", err, 1, true)
        end
        -- shared without a cycle is fine, and its real depth is measured
        local v = loads_ok("\128\4]q\0]q\1h\0ah\0]]]]aaaa0h\1.")
        assert.are.equal(v[1], v[1])
        ok, err = pickle.load("\128\4]q\0]q\1h\0ah\0" .. ("]"):rep(199) .. ("a"):rep(199) .. "0h\1.")
        assert.is_false(ok)
        assert.matches("nested deeper than 200", err, 1, true)
        -- Python's own deep pickle
        local code = "import pickle,sys\nsys.setrecursionlimit(10000)\nv=[]\nfor _ in range(300): v=[v]\n"
            .. "open(sys.argv[1],'wb').write(pickle.dumps(v,4))\n"
        write(DIR .. "/deep.py", code)
        os.execute(py.PYTHON .. " " .. DIR .. "/deep.py " .. DIR .. "/deep.p4")
        ok, err = pickle.load(read(DIR .. "/deep.p4"))
        assert.is_false(ok)
        assert.matches("nested deeper than 200", err, 1, true)
        assert.is_true((pickle.load(read(DIR .. "/deep.p4"), { max_depth = 600 })))
    end)

    it("refuses huge declared lengths before allocating", function()
        for _, bytes in ipairs {
            "\128\4\141\255\255\255\255\255\255\255\63x.",  -- BINUNICODE8 2^62-ish
            "\128\4\142\0\0\0\0\1\0\0\0x.",                -- BINBYTES8 2^32
            "\128\4X\255\255\255\255x.",                   -- BINUNICODE 4 GB
            "\128\3B\255\255\255\127x.",                   -- BINBYTES 2 GB
            "\128\4\149\255\255\255\255\255\255\255\255N.",  -- FRAME 2^64-1
            "\128\2\139\255\255\255\127\0.",               -- LONG4 2 GB
            "\128\2\139\255\255\255\255\0.",               -- LONG4 negative
            "T\255\255\255\255x.",                         -- BINSTRING negative
        } do
            local ok, err = pickle.load(bytes)
            assert.is_false(ok, bytes)
            assert.is_string(err)
            assert.matches("at byte %d+ %(opcode ", err)
        end
    end)

    it("keeps memory linear in the input (memo references are shared, not copied)", function()
        local n = 100000
        -- a list of one short str and n memo references to it
        local bytes = "\128\4]q\0(\140\1xq\1" .. ("h\1"):rep(n) .. "e."
        collectgarbage()
        collectgarbage()
        local before = collectgarbage("count")
        local v = loads_ok(bytes)
        local grown = (collectgarbage("count") - before) * 1024
        assert.are.equal(n + 1, #v)
        assert.are.equal("x", v[n + 1])
        assert.is_true(grown < 16 * #bytes, "grew " .. grown .. " bytes for " .. #bytes)
    end)

    describe("hostile input (each input ends against an unreadable page)", function()
        local guard
        setup(function()
            guard = py.guarded(65536)
        end)
        teardown(function()
            guard.free()
        end)

        -- load() must return (true, value) or (false, message): never raise,
        -- never crash, never read past the end.
        local function survives(bytes)
            local p = guard.put(bytes)
            local ok, a, b = pcall(pickle.load, p, { mark = true, int64 = true }, #bytes)
            assert(ok, "load raised: " .. tostring(a))
            assert(a == true or (a == false and type(b) == "string"), "bad result for input")
            return a
        end

        local SAMPLES = { "nested", "cached_value", "dict_keys", "shared", "str_unicode", "list",
            "set", "int_56", "bytes", "float_time", "str_escapes", "tuple4", "frozenset" }

        local function samples()
            local out = {}
            for _, name in ipairs(SAMPLES) do
                for proto = 0, 5 do
                    out[#out + 1] = read(("%s/pickle/%s.p%d"):format(DIR, name, proto))
                end
            end
            out[#out + 1] = read(DIR .. "/oslo.p0")
            return out
        end

        it("every truncation of every sample is an error", function()
            local n = 0
            for _, s in ipairs(samples()) do
                assert.is_true(survives(s))
                for len = 0, #s - 1 do
                    assert.is_false(survives(s:sub(1, len)), "truncation at " .. len)
                    n = n + 1
                end
            end
            assert.is_true(n > 2000, n)
        end)

        it("every single-byte mutation of every sample reads or fails cleanly", function()
            local n, accepted = 0, 0
            for _, s in ipairs(samples()) do
                for i = 1, #s do
                    local b = s:byte(i)
                    for _, x in ipairs { 0, 1, 0x28, 0x2e, 0x7f, 0x80, 0xff, (b + 1) % 256,
                        (b + 255) % 256, b ~= 0x0a and 0x0a or 0x0b, (b * 7 + 3) % 256 } do
                        if x ~= b then
                            if survives(s:sub(1, i - 1) .. string.char(x) .. s:sub(i + 1)) then
                                accepted = accepted + 1
                            end
                            n = n + 1
                        end
                    end
                end
            end
            assert.is_true(n > 20000, n)
            assert.is_true(accepted > 0 and accepted < n, accepted .. " of " .. n)
        end)

        it("every byte value at every position of small samples", function()
            for _, name in ipairs { "cached_value", "tuple2", "set" } do
                for _, proto in ipairs { 0, 2, 5 } do
                    local s = read(("%s/pickle/%s.p%d"):format(DIR, name, proto))
                    for i = 1, #s do
                        for x = 0, 255 do
                            survives(s:sub(1, i - 1) .. string.char(x) .. s:sub(i + 1))
                        end
                    end
                end
            end
        end)

        it("random bytes and random opcode streams (a bounded fuzz loop)", function()
            math.randomseed(17)
            local ops = { "(", ".", "0", "1", "2", "F1.5\n", "I1\n", "J\1\0\0\0", "K\1", "L5L\n",
                "M\1\0", "N", "R", "Vx\n", "X\1\0\0\0x", "a", "b", "cbuiltins\nset\n", "d", "}", "e",
                "g0\n", "h\0", "j\0\0\0\0", "l", "]", "p0\n", "q\0", "r\0\0\0\0", "s", "t", ")", "u",
                "G\0\0\0\0\0\0\0\0", "\128\4", "\129", "\133", "\134", "\135", "\136", "\137",
                "\138\1\1", "\139\1\0\0\0\1", "\140\1x", "\141\1\0\0\0\0\0\0\0x", "\143", "\144",
                "\145", "\146", "\147", "\148", "\149\0\0\0\0\0\0\0\0", "C\1x", "B\1\0\0\0x",
                "\140\017dogpile.cache.api\140\011CachedValue\147" }
            local deadline = os.clock() + 3
            local n = 0
            while os.clock() < deadline and n < 300000 do
                local s
                if n % 2 == 0 then
                    local t = {}
                    for i = 1, math.random(0, 64) do
                        t[i] = string.char(math.random(0, 255))
                    end
                    s = table.concat(t)
                else
                    local t = {}
                    for i = 1, math.random(1, 24) do
                        t[i] = ops[math.random(#ops)]
                    end
                    s = table.concat(t)
                end
                survives(s)
                n = n + 1
            end
            assert.is_true(n > 10000, n)
        end)
    end)
end)
