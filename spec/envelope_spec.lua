-- envelope.read, the codec read in Lua on the hit path, must never disagree
-- with the C decoder: on every input it accepts, both give the same value;
-- what it declines, the C decoder judges.
local codec = require "dogpile.codec"
local envelope = require "dogpile.cache.envelope"
local cache = require "dogpile.cache"

local read_string = envelope.read_string

local function same(a, b, seen)
    if type(a) ~= type(b) then
        return false
    end
    if type(a) == "number" then
        if a ~= a then
            return b ~= b
        end
        return a == b and 1 / a == 1 / b
    end
    if type(a) ~= "table" then
        return a == b
    end
    seen = seen or {}
    if seen[a] then
        return seen[a] == b
    end
    seen[a] = b
    local n = 0
    for k, v in pairs(a) do
        n = n + 1
        local w = b[k]
        if w == nil or not same(v, w, seen) then
            return false
        end
    end
    for _ in pairs(b) do
        n = n - 1
    end
    return n == 0
end

-- A deterministic generator (the spec must not depend on math.random's seed).
local state = 12345
local function rnd(n)
    state = (state * 1103515245 + 12345) % 2147483648
    return state % n
end

local SCALARS = { 0, 1, -1, 63, 64, -64, -65, 127, 128, 8191, 8192, 2 ^ 20, 2 ^ 21 - 1, 2 ^ 21,
    -(2 ^ 21), 2 ^ 27, 2 ^ 35 + 3, 2 ^ 48, 2 ^ 49, -(2 ^ 49), 2 ^ 53, -(2 ^ 53), 2 ^ 63, 0.5, -0.0,
    1 / 0, -1 / 0, 0 / 0, 1e300, true, false, "", "x", string.rep("s", 127),
    string.rep("m", 128), string.rep("l", 20000), "\0\255\193\1" }

local function value(depth)
    local r = rnd(10)
    if depth > 4 or r < 6 then
        return SCALARS[rnd(#SCALARS) + 1]
    end
    local t = {}
    for i = 1, rnd(5) do
        t[i] = value(depth + 1)
    end
    for _ = 1, rnd(5) do
        local k = value(depth + 1)
        if k ~= nil and k == k then
            t[k] = value(depth + 1)
        end
    end
    return t
end

local function check(bytes)
    local ok, v = read_string(bytes)
    if ok then
        local c, err = codec.decode(bytes)
        assert(c ~= nil or err == nil, "the Lua reader accepted bytes the C decoder refuses ("
               .. tostring(err) .. "): " .. ("%q"):format(bytes))
        assert(same(v, c), "the two decoders disagree on " .. ("%q"):format(bytes))
    end
    return ok
end

-- Records: the reader learns a record's shape (its keys in order) and reads
-- the next records of that shape by comparing key bytes (envelope.lua).
local function record(i)
    return { id = i, name = "n" .. i, score = i + 0.25, ok = i % 3 == 0, tags = { i, "t" },
             note = i % 5 == 0 and string.rep("x", 130) or "short", big = 2 ^ 40 + i, neg = -i,
             off = false, inner = { x = i, y = -i } }
end

-- A record of string keys written by hand: pairs { key, item bytes }.
local function hand_record(pairs_)
    local b = { "\193\1\6\0", string.char(#pairs_) }
    for _, kv in ipairs(pairs_) do
        b[#b + 1] = "\5" .. string.char(#kv[1]) .. kv[1] .. kv[2]
    end
    return table.concat(b)
end

describe("envelope.read", function()
    it("reads what the codec writes, as the C decoder does", function()
        local record = { id = 42, name = "Ada", email = "ada@example.com", age = 36, score = 99.5,
                         admin = false, active = true, tags = { "a", "b" }, n = -7, c = "NO" }
        for _, v in ipairs({ record, { nested = { deeper = { 1, 2, { 3 } } } }, {}, { [1.5] = 2 },
                             { [true] = "t", [false] = "f" } }) do
            assert.is_true(check(codec.encode(v)))
        end
        for _, s in ipairs(SCALARS) do
            local bytes = codec.encode(s)
            local ok = check(bytes)
            -- Long varints are the C decoder's; everything else is read here.
            if not (type(s) == "number" and s == math.floor(s) and math.abs(s) >= 2 ^ 48) then
                assert.is_true(ok, "declined " .. tostring(s))
            end
        end
        for _ = 1, 300 do
            check(codec.encode(value(0)))
        end
    end)

    it("declines nesting deeper than its limit, which the C decoder reads", function()
        local v = {}
        local t = v
        for _ = 1, 50 do
            t[1] = {}
            t = t[1]
        end
        local bytes = codec.encode(v)
        assert.is_false((read_string(bytes)))
        assert.is_truthy(codec.decode(bytes))
    end)

    it("accepts nothing the C decoder refuses: truncations, corruptions, random bytes", function()
        local samples = {}
        for i = 1, 40 do
            samples[i] = codec.encode(value(0))
        end
        samples[#samples + 1] = codec.encode({ 1, 2, k = "v", [2 ^ 30] = { x = 1.25 } })
        -- Records, whose shape the reader has learned from the samples first.
        for i = 1, 4 do
            samples[#samples + 1] = codec.encode(record(i))
            assert.is_true(check(samples[#samples]))
        end
        for _, bytes in ipairs(samples) do
            for cut = 0, math.min(#bytes - 1, 200) do
                check(bytes:sub(1, cut))
            end
            for _ = 1, 200 do
                local at = rnd(#bytes) + 1
                local mutated = bytes:sub(1, at - 1) .. string.char(rnd(256)) .. bytes:sub(at + 1)
                check(mutated)
                check(bytes .. string.char(rnd(256)))
            end
        end
        for _ = 1, 5000 do
            local b = { "\193\1" }
            for i = 1, rnd(12) do
                b[#b + 1] = string.char(({ 0, 1, 2, 3, 4, 5, 6, 0x80, 0x81, 0xff, 0 })[rnd(11) + 1]
                                        + (i % 3 == 0 and rnd(4) or 0))
            end
            check(table.concat(b))
        end
        -- Known refusals (codec_spec's list): the Lua reader declines them too.
        for _, bytes in ipairs({ "\193\1", "\193\1\9", "\193\1\0\0", "\193\1\5\100abc",
                                 "\193\1\6\0\1\0\2", "\193\1\6\0\1\4\0\0\0\0\0\0\248\127\2",
                                 "\193\1\3\128\0", "\193\2\0", "\192\1\0" }) do
            assert.is_false((read_string(bytes)), ("%q"):format(bytes))
        end
    end)
end)

-- A buffer whose end touches a PROT_NONE page: a read past the bytes given
-- to the reader is a crash, not a silent success.
local guarded_put
do
    local ffi = require "ffi"
    pcall(ffi.cdef, [[
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int mprotect(void *addr, size_t len, int prot);
    ]])
    local PAGE, SIZE = 4096, 16 * 4096
    local base = ffi.cast("uint8_t *", ffi.C.mmap(nil, SIZE + PAGE, 3, 0x22, -1, 0))
    assert(ffi.cast("intptr_t", base) ~= -1, "mmap failed")
    assert(ffi.C.mprotect(base + SIZE, PAGE, 0) == 0, "mprotect failed")
    function guarded_put(bytes)
        assert(#bytes <= SIZE)
        local p = base + SIZE - #bytes
        ffi.copy(p, bytes, #bytes)
        return p
    end
end

describe("envelope.read of records", function()
    it("learns their shape and reads the next ones as the C decoder does", function()
        local before = envelope.shape_count()
        assert.is_true(check(codec.encode({ learned_here = 1, too = 2 })))
        assert.are.equal(before + 1, envelope.shape_count(), "no shape learned")
        for i = 1, 300 do
            assert.is_true(check(codec.encode(record(i))), "declined record " .. i)
            assert.is_true(check(codec.encode({ learned_here = i, too = -i })))
        end
        local ok, v = read_string(codec.encode(record(7)))
        assert.is_true(ok)
        assert.are.same(record(7), v)
    end)

    it("tells apart shapes found under one number, and keys given twice", function()
        -- Two keys, the first "a" in both: the same number, other keys.
        local ab = hand_record({ { "a", "\3\2" }, { "b", "\5\2hi" } })
        local ac = hand_record({ { "a", "\3\4" }, { "c", "\2" } })
        local aa = hand_record({ { "a", "\3\6" }, { "a", "\1" } })
        local abx = hand_record({ { "a", "\3\2" }, { "b", "\0" } })
        for _ = 1, 100 do
            for _, bytes in ipairs({ ab, ac, aa, abx, ab, ab }) do
                assert.is_true(check(bytes), ("%q"):format(bytes))
            end
        end
        assert.are.same({ a = 1, b = "hi" }, select(2, read_string(ab)))
        assert.are.same({ a = 2, c = true }, select(2, read_string(ac)))
        assert.are.same({ a = false }, select(2, read_string(aa)))
        local _, t = read_string(abx)
        assert.are.same({ a = 1 }, t)
        assert.is_nil(next(t, next(t)), "a nil value leaves no key")
        -- A learned shape whose bytes are then cut, corrupted or lengthened.
        for cut = 0, #ab - 1 do
            check(ab:sub(1, cut))
        end
        assert.is_false((read_string(ab:sub(1, -4) .. "\9hi")))
        assert.is_false((read_string(ab:sub(1, -5) .. "\9\2hi")))
        assert.is_false((read_string(ab .. "\0")))
    end)

    it("reads no byte past the end of a record, of a learned shape or not", function()
        local samples = { hand_record({ { "a", "\3\2" }, { "b", "\5\2hi" } }) }
        for i = 1, 6 do
            samples[#samples + 1] = codec.encode(record(i))
            samples[#samples + 1] = codec.encode(value(0))
        end
        for _, bytes in ipairs(samples) do
            check(bytes)
            for cut = 0, #bytes do
                local part = bytes:sub(1, cut)
                local ok, v = envelope.read(guarded_put(part), cut)
                if ok then
                    assert.is_true(same(v, (codec.decode(part))), ("%q"):format(part))
                end
            end
        end
    end)
end)

describe("envelope.write_scalar", function()
    it("writes what envelope.pack(ct, codec.encode(v)) makes, byte for byte", function()
        local ffi = require "ffi"
        local extra = { -(2 ^ 63), 2 ^ 63 - 1024, 2 ^ 53 - 1, -(2 ^ 53) + 1, 2 ^ 52 - 1, -(2 ^ 52) + 1, 2 ^ 51 + 0.5, 1e-300,
                        string.rep("z", 300), string.rep("y", 70000) }
        local all = {}
        for _, v in ipairs(SCALARS) do
            all[#all + 1] = v
        end
        for _, v in ipairs(extra) do
            all[#all + 1] = v
        end
        all[#all + 1] = nil
        local checked = 0
        for i = 1, #all + 1 do
            local v = all[i] -- the last is nil
            local p, n = envelope.write_scalar(1234567.25, v)
            if p then
                checked = checked + 1
                assert.are.equal(envelope.pack(1234567.25, codec.encode(v)), ffi.string(p, n),
                                 tostring(v))
            else
                assert.is_true(type(v) == "number" and math.abs(v) >= 2 ^ 52, tostring(v))
            end
        end
        assert.is_true(checked >= #all - 6)
        assert.is_nil((envelope.write_scalar(0, {})))
    end)
end)

describe("envelope format 2 (a value's own expiration time, its creator's duration)", function()
    local ffi = require "ffi"
    local function dbl(v)
        return ffi.string(ffi.new("double[1]", v), 8)
    end

    it("is written only for a value that has one of them; format 1 otherwise", function()
        local payload = codec.encode("v")
        assert.are.equal("DPLV\1\0\0\0" .. dbl(5.5) .. payload, envelope.pack(5.5, payload))
        assert.are.equal("DPLV\2\1\0\0" .. dbl(5.5) .. dbl(-1) .. dbl(0) .. payload,
                         envelope.pack(5.5, payload, -1))
        assert.are.equal("DPLV\2\2\0\0" .. dbl(5.5) .. dbl(0) .. dbl(0.25) .. payload,
                         envelope.pack(5.5, payload, nil, 0.25))
        assert.are.equal("DPLV\2\3\0\0" .. dbl(5.5) .. dbl(30) .. dbl(0.25) .. payload,
                         envelope.pack(5.5, payload, 30, 0.25))
    end)

    it("is read back by unpack and header, which say where the payload starts", function()
        local payload = codec.encode({ 1, 2 })
        for _, case in ipairs({ { nil, nil, 16 }, { 30, nil, 32 }, { nil, 0.5, 32 }, { -1, 0, 32 },
                                { 0, 2.5, 32 } }) do
            local ttl, delta, off = case[1], case[2], case[3]
            local bytes = envelope.pack(77.5, payload, ttl, delta)
            local ct, o, t, d = envelope.unpack(bytes)
            assert.are.same({ 77.5, off, ttl, delta }, { ct, o, t, d })
            local p = ffi.cast("const uint8_t *", bytes)
            ct, o, t, d = envelope.header(p, #bytes)
            assert.are.same({ 77.5, off, ttl, delta }, { ct, o, t, d })
            assert.are.same({ true, { 1, 2 } }, { envelope.read(p + o, #bytes - o) })
        end
    end)

    it("write_scalar writes what pack(ct, codec.encode(v), ttl, delta) makes", function()
        for _, v in ipairs({ "s", string.rep("x", 500), 42, -7, 0.5, true, false }) do
            for _, td in ipairs({ { 60 }, { nil, 0.125 }, { -1, 3 } }) do
                local p, n = envelope.write_scalar(99.25, v, td[1], td[2])
                assert.are.equal(envelope.pack(99.25, codec.encode(v), td[1], td[2]),
                                 ffi.string(p, n), tostring(v))
            end
        end
        local p, n = envelope.write_scalar(99.25, nil, 5)
        assert.are.equal(envelope.pack(99.25, codec.encode(nil), 5), ffi.string(p, n))
    end)

    it("refuses short headers, fields that are not finite, a negative duration and "
       .. "unknown formats, on every read path", function()
        local payload = codec.encode("v")
        local good = envelope.pack(1, payload, 10, 1)
        local bad = {
            { good:sub(1, 31), "too short" },
            { "DPLV\2\1\0\0" .. dbl(1) .. dbl(0 / 0) .. dbl(0) .. payload, "not a finite number" },
            { "DPLV\2\1\0\0" .. dbl(1) .. dbl(1 / 0) .. dbl(0) .. payload, "not a finite number" },
            { "DPLV\2\2\0\0" .. dbl(1) .. dbl(0) .. dbl(-1) .. payload, "not a finite number" },
            { "DPLV\3\0\0\0" .. dbl(1) .. payload, "unknown value format 3" },
        }
        local region = cache.make_region():configure("dogpile.cache.shared_memory", {
            expiration_time = 60, arguments = { name = "envelope_spec_format2" } })
        local logged = 0
        cache.set_logger(function() logged = logged + 1 end)
        local errors = region:stats().errors
        for i, case in ipairs(bad) do
            local ct, err = envelope.unpack(case[1])
            assert.is_nil(ct)
            assert.matches(case[2], err, 1, true)
            assert.is_nil(envelope.header(ffi.cast("const uint8_t *", case[1]), #case[1]))
            region.backend:set("bad" .. i, case[1])
            assert.are.equal(cache.NO_VALUE, region:get("bad" .. i))
            assert.are.same({ cache.NO_VALUE }, region:get_multi({ "bad" .. i }))
        end
        require("dogpile.context").set_logger(nil)
        assert.are.equal(errors + 2 * #bad, region:stats().errors)
        assert.are.equal(2 * #bad, logged)
        -- Unknown flag bits are ignored: the layout of format 2 is fixed.
        region.backend:set("flags", "DPLV\2\255\0\0" .. dbl(require("dogpile").now()) .. dbl(-1)
                           .. dbl(0) .. payload)
        assert.are.equal("v", region:get("flags"))
    end)
end)

describe("a region on a C backend", function()
    it("reads hits in place and still reports bytes that do not decode", function()
        local region = cache.make_region():configure("dogpile.cache.shared_memory", {
            expiration_time = 60, arguments = { name = "envelope_spec" } })
        local v = { a = { 1, 2, 3 }, b = "x", c = 2 ^ 60 }
        region:set("k", v)
        assert.are.same(v, region:get("k"))
        assert.are.same(v, region:get_or_create("k", function() error("not called") end))
        -- A value whose payload the Lua reader declines (deep) comes through
        -- the C decoder.
        local deep = {}
        local t = deep
        for _ = 1, 40 do
            t[1] = {}
            t = t[1]
        end
        region:set("deep", deep)
        assert.are.same(deep, region:get("deep"))
        -- Bytes that are an envelope around garbage: a miss and an error counted.
        region.backend:set("bad", envelope.pack(os.time(), "\193\1\9"))
        local errors = region:stats().errors
        assert.are.equal(cache.NO_VALUE, region:get("bad"))
        assert.are.equal(errors + 1, region:stats().errors)
    end)
end)

-- -- Doubles from storage: NaN payloads must not forge Lua objects -----------------
-- LuaJIT tags every non-number with a NaN pattern: a stored double handed to
-- Lua unchecked could become a "table" or a "cdata" at an address chosen by
-- whoever wrote the bytes. Every NaN class: both signs, quiet and signalling,
-- each high mantissa nibble (the bits LuaJIT uses as a type tag), several
-- low words.
local ffi = require "ffi"

local function double_bytes(hi, lo)
    local u = ffi.new("union { double d; uint32_t w[2]; }")
    u.w[ffi.abi("le") and 0 or 1], u.w[ffi.abi("le") and 1 or 0] = lo, hi
    return ffi.string(u, 8)
end

local FORGED = {}
for _, sign in ipairs({ 0, 0x80000000 }) do
    for nibble = 0, 15 do
        for _, low_hi in ipairs({ 0, 0x8000, 0x0001 }) do
            for _, lo in ipairs({ 0, 1, 0x1000, 0xdeadbeef, 0xffffffff }) do
                local hi = sign + 0x7ff00000 + nibble * 0x10000 + low_hi
                if hi % 0x100000 ~= 0 or lo ~= 0 then -- mantissa 0 is an infinity
                    FORGED[#FORGED + 1] = double_bytes(hi, lo)
                end
            end
        end
    end
end

-- Only plain Lua values may come out of a decoder.
local PLAIN = { ["nil"] = true, boolean = true, number = true, string = true, table = true }
local function plain(v, depth)
    if not PLAIN[type(v)] then
        return false
    end
    if type(v) == "table" and (depth or 0) < 40 then
        for k, w in pairs(v) do
            if not plain(k, (depth or 0) + 1) or not plain(w, (depth or 0) + 1) then
                return false
            end
        end
    end
    return true
end

describe("stored NaN payloads", function()
    it("come out of the Lua reader as Lua's NaN, interpreted and compiled, as from the C decoder", function()
        assert.is_true(#FORGED > 150)
        for _, d in ipairs(FORGED) do
            local inputs = { "\193\1\4" .. d, "\193\1\6\2\0\4" .. d .. "\5\1x",
                             "\193\1\6\0\1\5\1k\4" .. d, "\193\1\6\0\1\4" .. d .. "\2" }
            for _, bytes in ipairs(inputs) do
                -- 200 times: the loop compiles, and the compiled reader must
                -- check the bits as the interpreter does.
                for _ = 1, 200 do
                    local ok, v = read_string(bytes)
                    assert.is_true(plain(v), "a forged " .. type(v) .. " from " .. ("%q"):format(bytes))
                    if ok then
                        local c = codec.decode(bytes)
                        assert.is_true(same(v, c), ("%q"):format(bytes))
                    end
                end
            end
            local ok, v = read_string("\193\1\4" .. d)
            assert.is_true(ok)
            assert.is_true(type(v) == "number" and v ~= v)
        end
    end)

    it("as a created time make the bytes not a value, on every read path", function()
        local region = cache.make_region():configure("dogpile.cache.shared_memory", {
            expiration_time = 60, arguments = { name = "envelope_spec_nan" } })
        local payload = codec.encode("v")
        for i, d in ipairs(FORGED) do
            local bytes = "DPLV\1\0\0\0" .. d .. payload
            assert.is_nil(envelope.created(ffi.cast("const uint8_t *", bytes), #bytes))
            local ct, err = envelope.unpack(bytes)
            assert.is_nil(ct)
            assert.matches("not a finite number", err)
            region.backend:set("k" .. i, bytes)
        end
        local inf = "DPLV\1\0\0\0" .. double_bytes(0x7ff00000, 0) .. payload
        assert.is_nil(envelope.unpack(inf))
        local errors = region:stats().errors
        for _ = 1, 3 do
            for i = 1, #FORGED do
                assert.are.equal(cache.NO_VALUE, region:get("k" .. i))
                assert.are.same({ cache.NO_VALUE }, region:get_multi({ "k" .. i }))
            end
        end
        assert.are.equal(errors + 6 * #FORGED, region:stats().errors)
        -- A creator replaces what does not decode.
        assert.are.equal("new", region:get_or_create("k1", function() return "new" end))
    end)
end)

-- -- Differential fuzz of the in-place reader -------------------------------------
-- Mutations of valid encodings, with forged doubles spliced in, for
-- DP_FUZZ_LUA_SECONDS (default 3; longer on a loaded machine): whatever the
-- Lua reader accepts, the C decoder accepts and agrees on, and only plain
-- Lua values come out.
describe("the in-place reader under fuzzing", function()
    it("never accepts what the C decoder refuses, never disagrees, never forges", function()
        local clock = require "dogpile.lib".C
        local seconds = tonumber(os.getenv("DP_FUZZ_LUA_SECONDS")) or 3
        local seeds = {}
        for i = 1, 60 do
            seeds[i] = codec.encode(value(0))
        end
        for _, d in ipairs(FORGED) do
            seeds[#seeds + 1] = "\193\1\6\1\1\4" .. d .. "\4" .. d .. "\3\2"
        end
        -- Records of a few shapes: mutated, they go through the shape's
        -- reader before the generic one.
        for i = 1, 20 do
            seeds[#seeds + 1] = codec.encode(record(i))
            seeds[#seeds + 1] = codec.encode({ name = "n" .. i, score = 0.5 * i, flag = i % 2 == 0 })
        end
        -- At least `seconds`, and on until 500 inputs were accepted (a loaded
        -- machine runs fewer in the time), for at most ten times as long.
        local t0 = clock.dp_clock_monotonic()
        local deadline, limit = t0 + seconds, t0 + 10 * seconds
        local runs, accepted = 0, 0
        while clock.dp_clock_monotonic() < deadline
            or (accepted <= 500 and clock.dp_clock_monotonic() < limit) do
            for _ = 1, 200 do
                local bytes = seeds[rnd(#seeds) + 1]
                for _ = 0, rnd(3) do
                    local op, at = rnd(5), rnd(#bytes) + 1
                    if op == 0 then
                        bytes = bytes:sub(1, at - 1) .. string.char(rnd(256)) .. bytes:sub(at + 1)
                    elseif op == 1 then
                        bytes = bytes:sub(1, at - 1) .. "\4" .. FORGED[rnd(#FORGED) + 1] .. bytes:sub(at)
                    elseif op == 2 then
                        bytes = bytes:sub(1, at)
                    elseif op == 3 then
                        local other = seeds[rnd(#seeds) + 1]
                        bytes = bytes:sub(1, at) .. other:sub(rnd(#other) + 1)
                    else
                        bytes = bytes:sub(1, at - 1) .. FORGED[rnd(#FORGED) + 1] .. bytes:sub(at + 8)
                    end
                end
                local ok, v = read_string(bytes)
                assert.is_true(plain(v), "a forged " .. type(v) .. " from " .. ("%q"):format(bytes))
                if check(bytes) then
                    accepted = accepted + 1
                end
                runs = runs + 1
            end
        end
        assert.is_true(runs > 1000, "only " .. runs .. " runs")
        assert.is_true(accepted > 500, accepted .. " of " .. runs .. " accepted")
    end)
end)
