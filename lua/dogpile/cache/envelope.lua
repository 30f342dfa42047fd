--- The bytes of a cached value: the envelope and the payload.
--
-- Format 1 (16 bytes): magic "DPLV", the format (1), a flags byte (0), 2
-- reserved bytes (0), the created time as a native double; the payload
-- follows.
-- Format 2 (32 bytes): the same 16 bytes with format 2, then the value's own
-- expiration time (a double, seconds, negative: never expires) and how long
-- its creator took (a double, seconds, for early_refresh); flags bit 0 says
-- the expiration time is there, bit 1 the creator's duration (a field whose
-- bit is clear holds 0 and means nothing). The payload follows at 32.
--
-- A value that has neither is written in format 1, byte for byte as before
-- format 2 existed, so that a process of an older version sharing the
-- backend still reads every value a region without the new options writes.
-- Format 2 has its own number rather than a flag in format 1 so that an older
-- reader refuses it as "unknown value format 2" (a miss, logged) instead of
-- reading the two doubles as the start of the payload. Every reader here
-- accepts both.
--
-- `read` decodes the value codec's format (core/codec.c) from a pointer in
-- Lua, so that a hit on a C backend runs in compiled code straight from the
-- backend's buffer: no copy of the envelope, no call through the classic Lua C
-- API (which ends a trace). It is an accelerator, not the authority: whatever
-- it is not sure of (long varints, deep nesting, anything malformed) it
-- leaves to the C decoder, which checks everything and says what is wrong. On
-- bytes it accepts, it returns what the C decoder returns (spec/envelope_spec.lua
-- compares them on valid, mutated and random inputs).
local ffi = require "ffi"
local bit = require "bit"
local lib = require "dogpile.lib"

local ffi_string, ffi_cast, ffi_copy = ffi.string, ffi.cast, ffi.copy
local type, char, byte = type, string.char, string.byte
local band = bit.band
local tnew = require "table.new"

lib.own_source()

local M = {}

local MAGIC, FORMAT, HEADER = "DPLV", 1, 16
M.MAGIC, M.FORMAT, M.HEADER = MAGIC, FORMAT, HEADER
-- Format 2: the fields after the first 16 bytes, and their flags.
local FORMAT2, HEADER2 = 2, 32
local HAS_TTL, HAS_DELTA = 1, 2
M.FORMAT2, M.HEADER2, M.HAS_TTL, M.HAS_DELTA = FORMAT2, HEADER2, HAS_TTL, HAS_DELTA

local u8p = ffi.typeof("const uint8_t *")
local u32p = ffi.typeof("const uint32_t *")
local dblp = ffi.typeof("const double *")
local dbl = ffi.new("double[1]")
local LITTLE = ffi.abi("le")
local M1, M2, M3, M4 = byte(MAGIC, 1, 4)
local i32p = ffi.typeof("const int32_t *")
local u16p = ffi.typeof("const uint16_t *")
-- The first 8 bytes of a format 1 envelope without flags, as two native
-- words (numbers assigned once: constants in a trace; signed: compared as
-- integers).
local PLAIN_MAGIC = ffi_cast(i32p, MAGIC)[0]
local PLAIN_FORMAT = ffi_cast(i32p, char(FORMAT, 0, 0, 0))[0]
-- The value codec's first two bytes (0xC1, its version 1) as a native word.
local CODEC_HEAD = ffi_cast(u16p, char(0xC1, 0x01))[0]

-- -- Doubles from storage ------------------------------------------------------
-- LuaJIT keeps every non-number value as a NaN with a type tag in its high
-- bits: a NaN read through an FFI double is handed to Lua as is, so 8 stored
-- bytes could make a "table" at an address of the writer's choosing. Every
-- double that comes from a backend is therefore looked at as bits first, and
-- a NaN becomes Lua's own (what lua_pushnumber does for the C decoder).
local NAN = 0 / 0
local bits = ffi.new("union { double d; uint32_t w[2]; }")
local HI, LO = LITTLE and 1 or 0, LITTLE and 0 or 1
local EXP = 0x7ff00000

local function stored_double(src)
    ffi_copy(bits, src, 8)
    local hi = bits.w[HI]
    if band(hi, EXP) == EXP and (band(hi, 0xfffff) ~= 0 or bits.w[LO] ~= 0) then
        return NAN
    end
    return bits.d
end
M.stored_double = stored_double

local function double_bytes(v)
    dbl[0] = v
    return ffi_string(dbl, 8)
end

--- The envelope around `payload`: format 1 when the value has neither its
-- own expiration time `ttl` nor its creator's duration `delta`, else format 2.
-- Both, when given, are finite numbers (the region checks them).
function M.pack(ct, payload, ttl, delta)
    if ttl == nil and delta == nil then
        return MAGIC .. char(FORMAT, 0, 0, 0) .. double_bytes(ct) .. payload
    end
    local flags = (ttl ~= nil and HAS_TTL or 0) + (delta ~= nil and HAS_DELTA or 0)
    return MAGIC .. char(FORMAT2, flags, 0, 0) .. double_bytes(ct) .. double_bytes(ttl or 0)
        .. double_bytes(delta or 0) .. payload
end

-- A finite double at `p` (8-aligned), or nil.
local function finite_at(p)
    if band(ffi_cast(u32p, p)[HI], EXP) == EXP then
        return nil
    end
    return ffi_cast(dblp, p)[0]
end

-- The rest of a format 2 header: kept out of `header` so that a format 1
-- hit's trace holds none of it.
local function extended(p, n, ct)
    if n < HEADER2 then
        return nil
    end
    local flags = p[5]
    local ttl, delta
    if band(flags, HAS_TTL) ~= 0 then
        ttl = finite_at(p + 16)
        if ttl == nil then
            return nil
        end
    end
    if band(flags, HAS_DELTA) ~= 0 then
        delta = finite_at(p + 24)
        if delta == nil or delta < 0 then
            return nil
        end
    end
    return ct, HEADER2, ttl, delta
end

--- The envelope at `p` (`n` bytes): the created time, where the payload
-- starts, the value's own expiration time (nil: none) and its creator's
-- duration (nil: none); or nil when the bytes are not one (a created time or
-- field that is not a finite number included: it could neither expire nor be
-- invalidated).
local function header(p, n)
    if n < HEADER then
        return nil
    end
    -- The common envelope, format 1 with no flags, is two word comparisons
    -- (the envelope starts a malloc'd buffer or a Lua string: 8 is aligned);
    -- anything else is looked at byte by byte.
    local w = ffi_cast(i32p, p)
    local plain = w[0] == PLAIN_MAGIC and w[1] == PLAIN_FORMAT
    if not plain and (p[0] ~= M1 or p[1] ~= M2 or p[2] ~= M3 or p[3] ~= M4) then
        return nil
    end
    if band(ffi_cast(u32p, p + 8)[HI], EXP) == EXP then
        return nil
    end
    local ct = ffi_cast(dblp, p + 8)[0]
    if plain then
        return ct, HEADER
    end
    local f = p[4]
    if f == FORMAT then
        return ct, HEADER
    elseif f == FORMAT2 then
        return extended(p, n, ct)
    end
    return nil
end
M.header = header
-- Kept for callers that want the created time only.
M.created = header

--- The created time, where the payload starts, the value's own expiration
-- time and its creator's duration (as `header`); or nil and why the bytes
-- are not a value.
function M.unpack(bytes)
    if type(bytes) ~= "string" then
        return nil, "the backend returned a " .. type(bytes) .. ", not bytes"
    end
    local p = ffi_cast(u8p, bytes)
    local n = #bytes
    if n < HEADER or p[0] ~= M1 or p[1] ~= M2 or p[2] ~= M3 or p[3] ~= M4 then
        return nil, "the bytes are not a dogpile value (bad magic or too short)"
    end
    local f = p[4]
    if f ~= FORMAT and f ~= FORMAT2 then
        return nil, "unknown value format " .. f
    end
    local ct = stored_double(p + 8)
    if ct ~= ct or ct == 1 / 0 or ct == -1 / 0 then
        return nil, "the created time is not a finite number"
    end
    if f == FORMAT then
        return ct, HEADER
    end
    local _, off, ttl, delta = extended(p, n, ct)
    if not off then
        return nil, "a format 2 header that is too short or holds a field that is not "
            .. "a finite number"
    end
    return ct, off, ttl, delta
end

-- -- The codec, read in place ----------------------------------------------------

-- Up to 7 bytes (< 2^49: every integer exact in a double); longer, and
-- overlong forms, are the C decoder's to judge. Returns value, next or nil.
-- Four bytes and more loop, apart: a loop inside the hit's trace would be
-- unrolled into it and abort it.
local function long_varint(p, pos, n, v)
    local mul = 2097152
    for _ = 4, 7 do
        if pos >= n then
            return nil
        end
        local b = p[pos]
        pos = pos + 1
        if b < 0x80 then
            if b == 0 then
                return nil
            end
            return v + b * mul, pos
        end
        v = v + (b - 0x80) * mul
        mul = mul * 128
    end
    return nil
end

local function varint(p, pos, n)
    if pos >= n then
        return nil
    end
    local b = p[pos]
    if b < 0x80 then
        return b, pos + 1
    end
    if pos + 1 >= n then
        return nil
    end
    local b1 = p[pos + 1]
    if b1 < 0x80 then
        if b1 == 0 then
            return nil
        end
        return (b - 0x80) + b1 * 128, pos + 2
    end
    if pos + 2 >= n then
        return nil
    end
    local b2 = p[pos + 2]
    local v = (b - 0x80) + (b1 - 0x80) * 128
    if b2 < 0x80 then
        if b2 == 0 then
            return nil
        end
        return v + b2 * 16384, pos + 3
    end
    return long_varint(p, pos + 3, n, v + (b2 - 0x80) * 16384)
end

-- Deeper tables go to the C decoder (its limit is 200).
local MAX_DEPTH = 32
local PREALLOC = 4096

-- -- Records by shape ------------------------------------------------------------
-- Most tables a cache holds are records: the same string keys in the same
-- order. Read generically, each field costs interning its key (hash, string
-- table look-up) and inserting it into a new table (another look-up and an
-- allocation of its node). So the reader learns a record's shape, its keys
-- in order, the first time it reads it: the shape's key strings, and a
-- template table holding them. A record of a known shape is read by
-- comparing each key's bytes with the shape's (memcmp, no string made),
-- copying the template (table.clone: every key already in place) and storing
-- each value at its key. Bytes that are not the shape make it answer nil,
-- and the table is read again by the generic reader, which judges them as
-- it always did.
--
-- A shape is found by its key count, the length of its first key and that
-- key's first and last bytes (a number: no string is made to find it). A
-- different shape under the same number replaces it, at most RELEARN times
-- per number, and at most MAX_SHAPES numbers are learned in a Lua state:
-- bytes that keep changing shape cannot make the reader learn for ever or
-- hold ever more memory.
local MAX_SHAPE_KEYS = 64
local RELEARN = 16
local MAX_SHAPES = 256
local shape_keys, shape_lens, shape_src, learned = {}, {}, {}, {}
local nshapes = 0
-- table.clone is OpenResty's LuaJIT's; elsewhere the template is not used
-- (the keys still are).
local has_clone, tclone = pcall(require, "table.clone")
if not has_clone then
    tclone = nil
end
if not pcall(function() return ffi.C.memcmp end) then
    ffi.cdef "int memcmp(const void *, const void *, size_t);"
end
local memcmp = ffi.C.memcmp

local item

-- A record of `nhash` keys at p[pos] (after its counts) read as the shape
-- `keys` (`lens` their lengths, `src` its template): the table and where it
-- ends, or nil when the bytes are not that shape or not understood.
local function shaped(p, pos, n, depth, nhash, keys, lens, src)
    local t = tclone and tclone(src) or tnew(0, nhash)
    for i = 1, nhash do
        local k, klen = keys[i], lens[i]
        if klen + 3 > n - pos or p[pos] ~= 0x05 or p[pos + 1] ~= klen
            or memcmp(p + pos + 2, k, klen) ~= 0 then
            return nil
        end
        pos = pos + 2 + klen
        -- The value: the common tags inline, the rest by item. A byte is
        -- left for it by the check above.
        local tag, v = p[pos], nil
        if tag == 0x05 and pos + 1 < n and p[pos + 1] < 0x80 then
            local len = p[pos + 1]
            pos = pos + 2
            if len > n - pos then
                return nil
            end
            v = ffi_string(p + pos, len)
            pos = pos + len
        elseif tag == 0x03 then
            local u
            u, pos = varint(p, pos + 1, n)
            if not u then
                return nil
            end
            if u % 2 == 0 then
                v = u / 2
            else
                v = -(u + 1) / 2
            end
        elseif tag == 0x04 and LITTLE then
            if n - pos < 9 then
                return nil
            end
            v = stored_double(p + pos + 1)
            pos = pos + 9
        elseif tag == 0x02 then
            v = true
            pos = pos + 1
        elseif tag == 0x01 then
            v = false
            pos = pos + 1
        else
            local ok
            ok, v, pos = item(p, pos, n, depth + 1)
            if not ok then
                return nil
            end
        end
        t[k] = v
    end
    return t, pos
end

-- After a generic read of a record with these keys, found by number `id`:
-- learn its shape, within the budgets.
local function learn(id, keys)
    local times = learned[id]
    if times == nil then
        if nshapes >= MAX_SHAPES then
            return
        end
        nshapes = nshapes + 1
        times = 0
    end
    if times >= RELEARN then
        return
    end
    learned[id] = times + 1
    local m = #keys
    local src, lens = tnew(0, m), tnew(m, 0)
    -- A key given twice is no matter: the template holds it once, and the
    -- last value read is kept, as by the C decoder.
    for i = 1, m do
        local k = keys[i]
        src[k] = true
        lens[i] = #k
    end
    shape_keys[id], shape_lens[id], shape_src[id] = keys, lens, src
end

--- How many record shapes this Lua state has learned (for tests).
function M.shape_count()
    return nshapes
end

-- One item at p[pos]: true, value, next; or false.
function item(p, pos, n, depth)
    if pos >= n then
        return false
    end
    local tag = p[pos]
    pos = pos + 1
    if tag == 0x05 then
        local len
        len, pos = varint(p, pos, n)
        if not len or len > n - pos then
            return false
        end
        return true, ffi_string(p + pos, len), pos + len
    elseif tag == 0x03 then
        local u
        u, pos = varint(p, pos, n)
        if not u then
            return false
        end
        if u % 2 == 0 then
            return true, u / 2, pos
        end
        return true, -(u + 1) / 2, pos
    elseif tag == 0x06 then
        if depth >= MAX_DEPTH then
            return false
        end
        local narr, nhash
        narr, pos = varint(p, pos, n)
        if not narr then
            return false
        end
        nhash, pos = varint(p, pos, n)
        if not nhash then
            return false
        end
        -- Every item takes a byte at least.
        local room = n - pos
        if narr > room or nhash > (room - narr) / 2 then
            return false
        end
        -- A record: its shape's reader, or learn its shape.
        local id, keys
        if narr == 0 and nhash <= MAX_SHAPE_KEYS and nhash > 0 and pos + 1 < n and p[pos] == 0x05 then
            local len = p[pos + 1]
            if len == 0 then
                id = nhash
            elseif len < 0x80 and len <= n - pos - 2 then
                id = nhash + 128 * len + 16384 * p[pos + 2] + 4194304 * p[pos + 1 + len]
            end
            if id then
                local keys_of = shape_keys[id]
                if keys_of then
                    local t, after = shaped(p, pos, n, depth, nhash, keys_of, shape_lens[id],
                                            shape_src[id])
                    if t then
                        return true, t, after
                    end
                end
                local times = learned[id]
                if (times or 0) < RELEARN and (times or nshapes < MAX_SHAPES) then
                    keys = tnew(nhash, 0)
                end
            end
        end
        local t = tnew(narr < PREALLOC and narr or PREALLOC, nhash < PREALLOC and nhash or PREALLOC)
        local ok, k, v
        for i = 1, narr do
            ok, v, pos = item(p, pos, n, depth + 1)
            if not ok then
                return false
            end
            t[i] = v
        end
        for i = 1, nhash do
            if pos + 1 < n and p[pos] == 0x05 and p[pos + 1] < 0x80 then
                -- A short string key, the common case, read inline.
                local len = p[pos + 1]
                pos = pos + 2
                if len > n - pos then
                    return false
                end
                k = ffi_string(p + pos, len)
                pos = pos + len
            else
                ok, k, pos = item(p, pos, n, depth + 1)
                if not ok or k == nil or k ~= k then
                    return false
                end
                keys = nil
            end
            if keys then
                keys[i] = k
            end
            ok, v, pos = item(p, pos, n, depth + 1)
            if not ok then
                return false
            end
            t[k] = v
        end
        if keys then
            learn(id, keys)
        end
        return true, t, pos
    elseif tag == 0x04 then
        if n - pos < 8 or not LITTLE then
            return false
        end
        return true, stored_double(p + pos), pos + 8
    elseif tag == 0x02 then
        return true, true, pos
    elseif tag == 0x01 then
        return true, false, pos
    elseif tag == 0x00 then
        return true, nil, pos
    end
    return false
end

--- Decode the codec bytes at `p` (a `const uint8_t *`), `n` of them: true and
-- the value, or false when the C decoder must decide.
local function read(p, n)
    if n < 3 or ffi_cast(u16p, p)[0] ~= CODEC_HEAD then
        return false
    end
    local ok, v, pos = item(p, 2, n, 0)
    if ok and pos == n then
        return true, v
    end
    return false
end
M.read = read

--- The same for a Lua string.
function M.read_string(s)
    return read(ffi_cast(u8p, s), #s)
end

-- -- Scalars written in place ---------------------------------------------------
-- A store of a string, number, boolean or nil on a C backend: the envelope
-- and the codec's bytes written straight into one scratch buffer, handed to
-- the backend by pointer. No Lua string is made, so a miss-and-create does
-- not feed the garbage collector. Byte for byte what the C encoder writes
-- (spec/envelope_spec.lua compares).

local scratch_cap = 256
local scratch = ffi.new("uint8_t[?]", scratch_cap)

local function reserve(n)
    if n > scratch_cap then
        local cap = scratch_cap
        while cap < n do
            cap = cap * 2
        end
        scratch = ffi.new("uint8_t[?]", cap)
        scratch_cap = cap
    end
    return scratch
end

local function put_varint(b, pos, v)
    while v >= 128 do
        local low = v % 128
        b[pos] = low + 128
        v = (v - low) / 128
        pos = pos + 1
    end
    b[pos] = v
    return pos + 1
end

-- The envelope and the codec's 2-byte header; returns where the item goes.
local function put_header(b, ct, ttl, delta)
    dbl[0] = ct
    ffi_copy(b + 8, dbl, 8)
    local at = HEADER
    if ttl == nil and delta == nil then
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7] = M1, M2, M3, M4, FORMAT, 0, 0, 0
    else
        b[0], b[1], b[2], b[3], b[4], b[6], b[7] = M1, M2, M3, M4, FORMAT2, 0, 0
        b[5] = (ttl ~= nil and HAS_TTL or 0) + (delta ~= nil and HAS_DELTA or 0)
        dbl[0] = ttl or 0
        ffi_copy(b + 16, dbl, 8)
        dbl[0] = delta or 0
        ffi_copy(b + 24, dbl, 8)
        at = HEADER2
    end
    b[at], b[at + 1] = 0xC1, 0x01
    return at + 2
end

--- Write the envelope (with `ttl` and `delta` as M.pack) around scalar `v`
-- into the scratch buffer: pointer and length (valid until the next call),
-- or nil when `v` is not a scalar this writer handles (tables; integers
-- beyond 2^52; big-endian doubles).
function M.write_scalar(ct, v, ttl, delta)
    local t = type(v)
    if t == "string" then
        local len = #v
        local b = reserve(HEADER2 + 13 + len)
        local at = put_header(b, ct, ttl, delta)
        b[at] = 0x05
        local pos = put_varint(b, at + 1, len)
        ffi_copy(b + pos, v, len)
        return b, pos + len
    end
    local b = reserve(HEADER2 + 13)
    if t == "number" then
        -- Below 2^52 the zigzag form (up to 2^53) is exact in a double.
        if v == v and v % 1 == 0 and v > -4503599627370496 and v < 4503599627370496
            and (v ~= 0 or 1 / v > 0) then
            local at = put_header(b, ct, ttl, delta)
            b[at] = 0x03
            return b, put_varint(b, at + 1, v >= 0 and 2 * v or -2 * v - 1)
        end
        if v % 1 == 0 and v == v and v >= -9223372036854775808 and v < 9223372036854775808
            and v ~= 0 then
            return nil -- an integer beyond 2^52: the C encoder's
        end
        if not LITTLE then
            return nil
        end
        local at = put_header(b, ct, ttl, delta)
        b[at] = 0x04
        dbl[0] = v
        ffi_copy(b + at + 1, dbl, 8)
        return b, at + 9
    elseif t == "boolean" then
        local at = put_header(b, ct, ttl, delta)
        b[at] = v and 0x02 or 0x01
        return b, at + 1
    elseif t == "nil" then
        local at = put_header(b, ct, ttl, delta)
        b[at] = 0x00
        return b, at + 1
    end
    return nil
end

M.u8p = u8p

return M
