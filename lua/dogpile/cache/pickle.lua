--- Python pickle, the subset that dogpile.cache values need: a reader for
-- protocols 0 to 5 and a writer of protocol 4 (or 5, the same opcodes).
--
-- Read: None, bool, int, float, str, bytes, list, tuple, dict, set,
-- frozenset, and dogpile.cache.api.CachedValue in every form Python writes it
-- (NEWOBJ from protocol 2 on, copy_reg._reconstructor + REDUCE in protocols 0
-- and 1, and REDUCE on the class itself, as dogpile.cache before 1.0 and the
-- oslo.cache values of that era wrote it). The only classes ever called are
-- those; every other class, and every opcode outside the subset (BUILD, INST,
-- OBJ, EXT*, persistent ids, out-of-band buffers...) is refused with an error
-- naming the opcode, its byte offset and the class.
--
-- The bytes come from a shared server, so they are untrusted: every length is
-- checked against what is left before anything is read or allocated, the
-- nesting depth of the result is bounded (`max_depth`), a cyclic value is
-- refused, and nothing is ever run. Memory is linear in the input: a memo
-- reference (2 bytes) costs one table slot, never a copy.
--
-- How values map to Lua and back is pyvalue.lua's (plain or marked decoding).
local ffi = require "ffi"
local lib = require "dogpile.lib"
local pyvalue = require "dogpile.cache.pyvalue"
local pyvalue_is_array = pyvalue.is_array
local buffer = require "string.buffer"

local type, pairs, next, pcall, error, tostring, tonumber, setmetatable, getmetatable, rawget =
    type, pairs, next, pcall, error, tostring, tonumber, setmetatable, getmetatable, rawget
local sub, find, byte, char, format, lower = string.sub, string.find, string.byte, string.char,
    string.format, string.lower
local floor, huge = math.floor, math.huge
local concat, unpack = table.concat, unpack
local ffi_cast, ffi_string = ffi.cast, ffi.string
local tnew = require "table.new"

lib.own_source()

local null = pyvalue.null
local list_mt, tuple_mt, dict_mt, set_mt, frozenset_mt = pyvalue.list_mt, pyvalue.tuple_mt,
    pyvalue.dict_mt, pyvalue.set_mt, pyvalue.frozenset_mt
local bytes_mt, float_mt, cached_mt = pyvalue.bytes_mt, pyvalue.float_mt, pyvalue.CachedValue_mt
local is_int, is_int64, is_utf8, utf8_char = pyvalue.is_int, pyvalue.is_int64, pyvalue.is_utf8,
    pyvalue.utf8_char
local MAX_EXACT = pyvalue.MAX_EXACT

local _M = { _VERSION = "0.1.0" }

--- The deepest nesting read or written by default (Python's own recursion
-- limit is 1000).
_M.MAX_DEPTH = 200
--- The protocol the writer uses by default (Python 3.8+'s default).
_M.PROTOCOL = 4

local u8p = ffi.typeof("const uint8_t *")
local num = ffi.new("union { double d; uint8_t b[8]; }")
local int64_t, uint64_t = ffi.typeof("int64_t"), ffi.typeof("uint64_t")
local LITTLE = ffi.abi("le")

-- -- Opcode names, for messages ------------------------------------------------------

local NAMES = {
    [0x28] = "MARK", [0x2e] = "STOP", [0x30] = "POP", [0x31] = "POP_MARK", [0x32] = "DUP",
    [0x46] = "FLOAT", [0x49] = "INT", [0x4a] = "BININT", [0x4b] = "BININT1", [0x4c] = "LONG",
    [0x4d] = "BININT2", [0x4e] = "NONE", [0x50] = "PERSID", [0x51] = "BINPERSID",
    [0x52] = "REDUCE", [0x53] = "STRING", [0x54] = "BINSTRING", [0x55] = "SHORT_BINSTRING",
    [0x56] = "UNICODE", [0x58] = "BINUNICODE", [0x61] = "APPEND", [0x62] = "BUILD",
    [0x63] = "GLOBAL", [0x64] = "DICT", [0x7d] = "EMPTY_DICT", [0x65] = "APPENDS",
    [0x67] = "GET", [0x68] = "BINGET", [0x69] = "INST", [0x6a] = "LONG_BINGET", [0x6c] = "LIST",
    [0x5d] = "EMPTY_LIST", [0x6f] = "OBJ", [0x70] = "PUT", [0x71] = "BINPUT",
    [0x72] = "LONG_BINPUT", [0x73] = "SETITEM", [0x74] = "TUPLE", [0x29] = "EMPTY_TUPLE",
    [0x75] = "SETITEMS", [0x47] = "BINFLOAT", [0x80] = "PROTO", [0x81] = "NEWOBJ",
    [0x82] = "EXT1", [0x83] = "EXT2", [0x84] = "EXT4", [0x85] = "TUPLE1", [0x86] = "TUPLE2",
    [0x87] = "TUPLE3", [0x88] = "NEWTRUE", [0x89] = "NEWFALSE", [0x8a] = "LONG1",
    [0x8b] = "LONG4", [0x42] = "BINBYTES", [0x43] = "SHORT_BINBYTES",
    [0x8c] = "SHORT_BINUNICODE", [0x8d] = "BINUNICODE8", [0x8e] = "BINBYTES8",
    [0x8f] = "EMPTY_SET", [0x90] = "ADDITEMS", [0x91] = "FROZENSET", [0x92] = "NEWOBJ_EX",
    [0x93] = "STACK_GLOBAL", [0x94] = "MEMOIZE", [0x95] = "FRAME", [0x96] = "BYTEARRAY8",
    [0x97] = "NEXT_BUFFER", [0x98] = "READONLY_BUFFER",
}

local function opname(op)
    if op == nil then
        return "(end of input)"
    end
    local c = (op >= 0x21 and op < 0x7f) and format(" '%s'", char(op)) or ""
    return format("%s 0x%02x%s", NAMES[op] or "unknown", op, c)
end

-- The classes the reader may call, by "module.name" after Python 3's
-- fix_imports (__builtin__ -> builtins, copy_reg -> copyreg).
local CACHED_VALUE = "dogpile.cache.api.CachedValue"
local ALLOWED = {
    [CACHED_VALUE] = true,
    ["copyreg._reconstructor"] = true,
    ["builtins.tuple"] = true,
    ["builtins.set"] = true,
    ["builtins.frozenset"] = true,
    ["builtins.bytes"] = true,
    ["_codecs.encode"] = true,
}
local RENAMED_MODULES = { __builtin__ = "builtins", copy_reg = "copyreg" }

-- -- The reader ------------------------------------------------------------------------

-- What each container is, in one number per table (meta[t]): the kind in
-- the low 4 bits, 16 once it sits inside another container, and its depth
-- times 32. Kept aside so that plain decoding needs no metatables.
local LIST, TUPLE, DICT, SET, FROZENSET, CACHED, GLOBAL, ARGS = 1, 2, 3, 4, 5, 6, 7, 8
local KIND_NAMES = { "list", "tuple", "dict", "set", "frozenset", CACHED_VALUE, "class",
    "tuple of classes" }
local INSIDE, DEPTH = 16, 32

-- The state of one read. Reads never yield nor call out, so one set of
-- upvalues serves them all; each read resets what it uses.
local p, n, pos, op, at
local st, sp, base
local marks, mp
local memo, memo_count, meta
local tclear = require "table.clear"
-- The work tables outlive a read (no allocation per read); after a large
-- input (which bounds how much they grew) they are dropped, not cleared.
local REUSE_LIMIT = 4096
local st_keep, marks_keep, memo_keep, meta_keep = tnew(64, 0), tnew(16, 0), tnew(64, 0), tnew(0, 32)
local recheck, max_depth, marked, want_int64

local function fail(msg, where)
    error(format("dogpile.cache.pickle: %s at byte %d (opcode %s)", msg, where or at, opname(op)), 0)
end

local function need(k)
    if pos + k > n then
        fail(format("truncated: %d bytes needed, %d left", k, n - pos), pos)
    end
end

local function under(k)
    if sp - base < k then
        fail("stack underflow")
    end
end

local function push(v)
    sp = sp + 1
    st[sp] = v
end

local function new_container(kind, mt)
    local t = {}
    meta[t] = kind + DEPTH
    if marked and mt then
        setmetatable(t, mt)
    end
    return t
end

-- `c` goes inside a container: its depth, and whether containers already
-- inside others are changing (then the depth and the acyclicity are checked
-- again at the end: sharing through the memo can do that, Python never does).
local function depth_of(c)
    if type(c) ~= "table" then
        return 0
    end
    local m = meta[c]
    if m == nil then
        return 0 -- null and the wrappers
    end
    local kind = m % 16
    if kind == GLOBAL or kind == ARGS then
        fail("class " .. (kind == GLOBAL and c[1] or "arguments") .. " used as a value")
    end
    if m % 32 < INSIDE then
        meta[c] = m + INSIDE
    end
    return floor(m / DEPTH)
end

local function grow(t, d)
    local m = meta[t]
    if m % 32 >= INSIDE then
        recheck = true
    end
    if d + 1 > floor(m / DEPTH) then
        if d + 1 > max_depth then
            fail(format("nested deeper than %d", max_depth))
        end
        meta[t] = m % DEPTH + (d + 1) * DEPTH
    end
end

local function check_key(k)
    if k ~= k then
        fail("a NaN dict key or set element")
    end
    local m = type(k) == "table" and meta[k]
    if m then
        local kind = m % 16
        if kind == LIST or kind == DICT or kind == SET or kind == CACHED then
            fail("unhashable " .. KIND_NAMES[kind] .. " as a dict key or set element")
        end
    end
end

local function container(t, kind)
    local m = type(t) == "table" and meta[t]
    if not m or m % 16 ~= kind then
        local what = m and KIND_NAMES[m % 16] or (t == null and "None" or type(t))
        fail(format("a %s where a %s was expected", what, KIND_NAMES[kind]))
    end
    return t
end

local function append(list, v)
    grow(list, depth_of(v))
    if list == v then
        recheck = true
    end
    list[#list + 1] = v
end

local function setitem(dict, k, v)
    check_key(k)
    local d1, d2 = depth_of(k), depth_of(v)
    grow(dict, d1 > d2 and d1 or d2)
    if k == dict or v == dict then
        recheck = true
    end
    dict[k] = v
end

local function additem(set, k)
    check_key(k)
    grow(set, depth_of(k))
    if k == set then
        recheck = true
    end
    set[k] = true
end

-- The container under a mark's items: inside the enclosing mark, as
-- Python's stack split at each MARK allows.
local function below(first)
    if first - 1 <= base then
        fail("stack underflow")
    end
    return st[first - 1]
end

local function pop_mark()
    if mp == 0 then
        fail("no MARK before this opcode")
    end
    local first = marks[mp] + 1
    mp = mp - 1
    base = mp > 0 and marks[mp] or 0
    return first
end

-- A tuple of the items st[first..last]; a tuple holding classes is the
-- arguments of a REDUCE or NEWOBJ and nothing else.
local function make_tuple(first, last)
    local t = {}
    local d, args = 0, false
    for i = first, last do
        local v = st[i]
        local m = type(v) == "table" and meta[v]
        if m and (m % 16 == GLOBAL or m % 16 == ARGS) then
            args = true
        else
            local cd = depth_of(v)
            if cd > d then
                d = cd
            end
        end
        t[i - first + 1] = v
    end
    if d + 1 > max_depth then
        fail(format("nested deeper than %d", max_depth))
    end
    meta[t] = (args and ARGS or TUPLE) + (d + 1) * DEPTH
    if marked and not args then
        setmetatable(t, tuple_mt)
    end
    sp = first - 1
    return t
end

local function make_frozenset(first, last)
    local t = new_container(FROZENSET, frozenset_mt)
    for i = first, last do
        additem(t, st[i])
    end
    sp = first - 1
    return t
end

local function bytes_value(str)
    if marked then
        return setmetatable({ str }, bytes_mt)
    end
    return str
end

local function float_value(x)
    if marked and x == floor(x) then
        return setmetatable({ x }, float_mt)
    end
    return x
end

local function too_big()
    if want_int64 then
        fail("an int outside the int64 range")
    end
    fail("an int beyond 2^53 (read it with int64 = true)")
end

-- An int64 `v` as the Lua value of a Python int.
local function int_value(v)
    if v >= -MAX_EXACT and v <= MAX_EXACT then
        return tonumber(v)
    end
    if not want_int64 then
        too_big()
    end
    return v
end

-- LONG1 / LONG4: little-endian two's complement of `len` bytes at `q`.
local function read_long(q, len)
    if len == 0 then
        return 0
    end
    local neg = p[q + len - 1] >= 0x80
    local ext = neg and 0xff or 0
    -- Python writes the fewest bytes; strip any redundant sign bytes anyway.
    while len > 1 and p[q + len - 1] == ext and (p[q + len - 2] >= 0x80) == neg do
        len = len - 1
    end
    if len > 8 then
        too_big()
    end
    if len <= 6 then
        local v, mul = 0, 1
        for i = 0, len - 1 do
            v = v + p[q + i] * mul
            mul = mul * 256
        end
        return neg and v - mul or v
    end
    local u = ffi.new(uint64_t, 0)
    for i = len - 1, 0, -1 do
        u = u * 256 + p[q + i]
    end
    if neg and len == 7 then
        -- minus 2^56: wraps to the 64-bit two's complement of the value
        u = u - 72057594037927936ULL
    end
    return int_value(ffi_cast(int64_t, u))
end

-- INT / LONG text: an optional sign and decimal digits.
local function read_decimal(str)
    local sign, digits = str:match("^([+-]?)(%d+)$")
    if not digits then
        fail(format("not a decimal integer: %q", sub(str, 1, 40)))
    end
    digits = digits:gsub("^0+(%d)", "%1")
    if #digits <= 15 then
        local v = tonumber(digits)
        return sign == "-" and -v or v
    end
    if #digits > 19 then
        too_big()
    end
    local u = ffi.new(uint64_t, 0)
    for i = 1, #digits do
        u = u * 10 + (byte(digits, i) - 48)
    end
    if (sign == "-" and u > 9223372036854775808ULL) or (sign ~= "-" and u > 9223372036854775807ULL) then
        too_big()
    end
    if sign == "-" then
        u = 0ULL - u
    end
    return int_value(ffi_cast(int64_t, u))
end

-- FLOAT text: what Python's float() reads of repr's output.
local function read_float_text(str)
    local l = lower(str)
    local sign, word = l:match("^([+-]?)(%a+)$")
    if word == "inf" or word == "infinity" then
        return sign == "-" and -huge or huge
    elseif word == "nan" then
        return 0 / 0
    end
    local x = find(str, "^[+-]?%d*%.?%d*[eE]?[+-]?%d*$") and find(str, "%d") and tonumber(str)
    if not x then
        fail(format("not a float: %q", sub(str, 1, 40)))
    end
    return x
end

-- UNICODE (protocol 0): raw-unicode-escape. Bytes are latin-1 code points;
-- \uXXXX and \UXXXXXXXX escape the rest, only after an odd number of
-- backslashes (CPython's rule).
local function raw_unicode_escape(str)
    if not find(str, "[\\\128-\255]") then
        return str
    end
    local out, i, len = {}, 1, #str
    while i <= len do
        local c = byte(str, i)
        if c ~= 92 then
            out[#out + 1] = c < 0x80 and char(c) or utf8_char(c)
            i = i + 1
        else
            local j = i
            while j <= len and byte(str, j) == 92 do
                j = j + 1
            end
            local run = j - i
            local nc = byte(str, j)
            if run % 2 == 1 and (nc == 117 or nc == 85) then
                out[#out + 1] = ("\\"):rep(run - 1)
                local count = nc == 117 and 4 or 8
                local hex = sub(str, j + 1, j + count)
                if #hex ~= count or not hex:find("^%x+$") then
                    fail("truncated \\uXXXX escape in a UNICODE string")
                end
                local cp = tonumber(hex, 16)
                if cp > 0x10FFFF then
                    fail("\\U escape beyond U+10FFFF in a UNICODE string")
                end
                out[#out + 1] = utf8_char(cp)
                i = j + 1 + count
            else
                out[#out + 1] = ("\\"):rep(run)
                i = j
            end
        end
    end
    return concat(out)
end

-- STRING (Python 2's str, protocol 0): a quoted literal with backslash
-- escapes (codecs.escape_decode).
local ESCAPES = { n = "\n", t = "\t", r = "\r", a = "\a", b = "\b", f = "\f", v = "\v",
    ["\\"] = "\\", ["'"] = "'", ['"'] = '"', ["\n"] = "" }
local function escape_decode(str)
    local q = sub(str, 1, 1)
    if #str < 2 or (q ~= "'" and q ~= '"') or sub(str, -1) ~= q then
        fail("the STRING opcode argument must be quoted")
    end
    str = sub(str, 2, -2)
    if not find(str, "\\", 1, true) then
        return str
    end
    local out, i, len = {}, 1, #str
    while i <= len do
        local c = sub(str, i, i)
        if c ~= "\\" then
            out[#out + 1] = c
            i = i + 1
        else
            local e = sub(str, i + 1, i + 1)
            local oct = str:match("^[0-7][0-7]?[0-7]?", i + 1)
            if e == "" then
                fail("a trailing \\ in a STRING")
            elseif ESCAPES[e] then
                out[#out + 1] = ESCAPES[e]
                i = i + 2
            elseif e == "x" then
                local h = sub(str, i + 2, i + 3)
                if not find(h, "^%x%x$") then
                    fail("a bad \\x escape in a STRING")
                end
                out[#out + 1] = char(tonumber(h, 16))
                i = i + 4
            elseif oct then
                out[#out + 1] = char(tonumber(oct, 8) % 256)
                i = i + 1 + #oct
            else
                out[#out + 1] = "\\" .. e
                i = i + 2
            end
        end
    end
    return concat(out)
end

-- UTF-8 str back to the latin-1 bytes of _codecs.encode(s, "latin1"), how
-- protocols 0 to 2 write bytes.
local function latin1_of(str)
    if not find(str, "[\128-\255]") then
        return str
    end
    local out, i, len = {}, 1, #str
    while i <= len do
        local c = byte(str, i)
        if c < 0x80 then
            out[#out + 1] = char(c)
            i = i + 1
        elseif (c == 0xC2 or c == 0xC3) and i < len then
            local c2 = byte(str, i + 1)
            if c2 < 0x80 or c2 > 0xBF then
                fail("bytes written as latin-1 text hold invalid UTF-8")
            end
            out[#out + 1] = char((c - 0xC0) * 64 + c2 - 0x80)
            i = i + 2
        else
            fail("bytes written as latin-1 text hold a character beyond U+00FF")
        end
    end
    return concat(out)
end

local function global_of(module, name)
    module = RENAMED_MODULES[module] or module
    local full = module .. "." .. name
    if not ALLOWED[full] then
        fail(format("refused class %s", full))
    end
    local g = { full }
    meta[g] = GLOBAL
    return g
end

local function global_name(g)
    local m = type(g) == "table" and meta[g]
    if not m or m % 16 ~= GLOBAL then
        fail("a call of something other than a class")
    end
    return g[1]
end

local function make_cached(payload, metadata)
    container(metadata, DICT)
    local d1, d2 = depth_of(payload), depth_of(metadata)
    local d = (d1 > d2 and d1 or d2) + 1
    if d > max_depth then
        fail(format("nested deeper than %d", max_depth))
    end
    if payload == null then
        payload = nil
    end
    local cv = setmetatable({ payload = payload, metadata = metadata }, cached_mt)
    meta[cv] = CACHED + d * DEPTH
    return cv
end

local function args_tuple(args, len)
    local m = type(args) == "table" and meta[args]
    if not m or (m % 16 ~= TUPLE and m % 16 ~= ARGS) then
        fail("call arguments that are not a tuple")
    end
    if len and #args ~= len then
        return nil
    end
    return args
end

-- REDUCE: only the calls Python makes for the allowed classes.
local function reduce(g, args)
    local name = global_name(g)
    args_tuple(args)
    local nargs = #args
    if name == CACHED_VALUE and nargs == 2 then
        return make_cached(args[1], args[2])
    elseif name == "copyreg._reconstructor" and nargs == 3 then
        local cls, base_, state = args[1], args[2], args[3]
        local m = type(state) == "table" and meta[state]
        if global_name(cls) == CACHED_VALUE and global_name(base_) == "builtins.tuple"
            and m and m % 16 == TUPLE and #state == 2 then
            return make_cached(state[1], state[2])
        end
    elseif (name == "builtins.set" or name == "builtins.frozenset") and nargs <= 1 then
        local set = new_container(name == "builtins.set" and SET or FROZENSET,
                                  name == "builtins.set" and set_mt or frozenset_mt)
        if nargs == 1 then
            local items = args[1]
            local m = type(items) == "table" and meta[items]
            if not m or (m % 16 ~= LIST and m % 16 ~= TUPLE) then
                fail(name .. " called on something other than a list")
            end
            for i = 1, #items do
                additem(set, items[i])
            end
        end
        return set
    elseif name == "_codecs.encode" and nargs == 2 and type(args[1]) == "string"
        and (args[2] == "latin1" or args[2] == "latin-1") then
        return bytes_value(latin1_of(args[1]))
    elseif name == "builtins.bytes" and nargs == 0 then
        return bytes_value("")
    end
    fail(format("class %s called with arguments it is not written with", name))
end

local function newobj(g, args, kwargs)
    local name = global_name(g)
    if name == CACHED_VALUE and args_tuple(args, 2) and (kwargs == nil or next(kwargs) == nil) then
        return make_cached(args[1], args[2])
    end
    fail(format("class %s cannot be instantiated here", name))
end

-- The final check when shared containers were changed after being nested
-- (through the memo; Python never writes that, a hostile input may): the
-- real height of every container, refusing cycles. `d`, the depth of the
-- walk, stops it at max_depth whatever the shape.
local function height(t, d, seen)
    local h = seen[t]
    if h == 0 then
        fail("a cyclic value", n)
    elseif h then
        return h
    end
    if d > max_depth then
        fail(format("nested deeper than %d", max_depth), n)
    end
    seen[t] = 0
    local best = 0
    for k, v in pairs(t) do
        if type(k) == "table" and meta[k] then
            local ch = height(k, d + 1, seen)
            best = ch > best and ch or best
        end
        if type(v) == "table" and meta[v] then
            local ch = height(v, d + 1, seen)
            best = ch > best and ch or best
        end
    end
    best = best + 1
    if best > max_depth then
        fail(format("nested deeper than %d", max_depth), n)
    end
    seen[t] = best
    return best
end

-- -- The opcode loop -------------------------------------------------------------

local function read_line()
    local e = pos
    while e < n and p[e] ~= 10 do
        e = e + 1
    end
    if e >= n then
        fail("truncated: no end of line", pos)
    end
    local line = ffi_string(p + pos, e - pos)
    pos = e + 1
    return line
end

local function u32(q)
    return p[q] + p[q + 1] * 256 + p[q + 2] * 65536 + p[q + 3] * 16777216
end

-- An 8-byte length: anything beyond what is left is refused before use.
local function u64(q)
    local hi = u32(q + 4)
    if hi ~= 0 then
        return huge
    end
    return u32(q)
end

local function read_bytes(len)
    if len > n - pos then
        fail(format("declared length %s beyond the %d bytes left", tostring(len), n - pos))
    end
    local str = ffi_string(p + pos, len)
    pos = pos + len
    return str
end

-- Stored at idx + 1: MEMOIZE counts from 0 and the array part starts at 1.
local function memo_put(idx)
    under(1)
    memo[idx + 1] = st[sp]
end

local function memo_get(idx)
    local v = memo[idx + 1]
    if v == nil then
        fail(format("memo key %s not found", tostring(idx)))
    end
    push(v)
end

local function run()
    while true do
        if pos >= n then
            op = nil
            at = pos
            fail("truncated: no STOP")
        end
        at = pos
        op = p[pos]
        pos = pos + 1
        if op == 0x8c then -- SHORT_BINUNICODE
            need(1)
            local len = p[pos]
            pos = pos + 1
            push(read_bytes(len))
        elseif op == 0x94 then -- MEMOIZE
            under(1)
            memo_count = memo_count + 1
            memo[memo_count] = st[sp]
        elseif op == 0x4b then -- BININT1
            need(1)
            push(p[pos])
            pos = pos + 1
        elseif op == 0x75 then -- SETITEMS
            local first = pop_mark()
            if (sp - first + 1) % 2 ~= 0 then
                fail("SETITEMS with an odd number of items")
            end
            local d = container(below(first), DICT)
            for i = first, sp, 2 do
                setitem(d, st[i], st[i + 1])
            end
            sp = first - 1
        elseif op == 0x47 then -- BINFLOAT
            need(8)
            if LITTLE then
                for i = 0, 7 do
                    num.b[7 - i] = p[pos + i]
                end
            else
                for i = 0, 7 do
                    num.b[i] = p[pos + i]
                end
            end
            pos = pos + 8
            push(float_value(num.d))
        elseif op == 0x7d then -- EMPTY_DICT
            push(new_container(DICT, dict_mt))
        elseif op == 0x5d then -- EMPTY_LIST
            push(new_container(LIST, list_mt))
        elseif op == 0x28 then -- MARK
            if mp >= max_depth then
                fail(format("marks nested deeper than %d", max_depth))
            end
            mp = mp + 1
            marks[mp] = sp
            base = sp
        elseif op == 0x65 then -- APPENDS
            local first = pop_mark()
            local l = container(below(first), LIST)
            for i = first, sp do
                append(l, st[i])
            end
            sp = first - 1
        elseif op == 0x4a then -- BININT
            need(4)
            local v = u32(pos)
            pos = pos + 4
            push(v >= 2147483648 and v - 4294967296 or v)
        elseif op == 0x4e then -- NONE
            push(null)
        elseif op == 0x88 or op == 0x89 then -- NEWTRUE, NEWFALSE
            push(op == 0x88)
        elseif op == 0x73 then -- SETITEM
            under(3)
            setitem(container(st[sp - 2], DICT), st[sp - 1], st[sp])
            sp = sp - 2
        elseif op == 0x61 then -- APPEND
            under(2)
            append(container(st[sp - 1], LIST), st[sp])
            sp = sp - 1
        elseif op == 0x4d then -- BININT2
            need(2)
            push(p[pos] + p[pos + 1] * 256)
            pos = pos + 2
        elseif op >= 0x85 and op <= 0x87 then -- TUPLE1..3
            local k = op - 0x84
            under(k)
            push(make_tuple(sp - k + 1, sp))
        elseif op == 0x29 then -- EMPTY_TUPLE
            push(make_tuple(sp + 1, sp))
        elseif op == 0x74 then -- TUPLE
            local first = pop_mark()
            push(make_tuple(first, sp))
        elseif op == 0x58 or op == 0x42 then -- BINUNICODE, BINBYTES
            need(4)
            local len = u32(pos)
            pos = pos + 4
            local str = read_bytes(len)
            push(op == 0x58 and str or bytes_value(str))
        elseif op == 0x43 then -- SHORT_BINBYTES
            need(1)
            local len = p[pos]
            pos = pos + 1
            push(bytes_value(read_bytes(len)))
        elseif op == 0x8d or op == 0x8e then -- BINUNICODE8, BINBYTES8
            need(8)
            local len = u64(pos)
            pos = pos + 8
            local str = read_bytes(len)
            push(op == 0x8d and str or bytes_value(str))
        elseif op == 0x71 then -- BINPUT
            need(1)
            memo_put(p[pos])
            pos = pos + 1
        elseif op == 0x72 then -- LONG_BINPUT
            need(4)
            memo_put(u32(pos))
            pos = pos + 4
        elseif op == 0x68 then -- BINGET
            need(1)
            memo_get(p[pos])
            pos = pos + 1
        elseif op == 0x6a then -- LONG_BINGET
            need(4)
            memo_get(u32(pos))
            pos = pos + 4
        elseif op == 0x8a then -- LONG1
            need(1)
            local len = p[pos]
            pos = pos + 1
            need(len)
            push(read_long(pos, len))
            pos = pos + len
        elseif op == 0x8b then -- LONG4
            need(4)
            local len = u32(pos)
            pos = pos + 4
            if len >= 2147483648 then
                fail("negative LONG4 length")
            end
            need(len)
            push(read_long(pos, len))
            pos = pos + len
        elseif op == 0x8f then -- EMPTY_SET
            push(new_container(SET, set_mt))
        elseif op == 0x90 then -- ADDITEMS
            local first = pop_mark()
            local set = container(below(first), SET)
            for i = first, sp do
                additem(set, st[i])
            end
            sp = first - 1
        elseif op == 0x91 then -- FROZENSET
            local first = pop_mark()
            push(make_frozenset(first, sp))
        elseif op == 0x93 then -- STACK_GLOBAL
            under(2)
            local module, name = st[sp - 1], st[sp]
            if type(module) ~= "string" or type(name) ~= "string" then
                fail("STACK_GLOBAL on something other than two str")
            end
            sp = sp - 2
            push(global_of(module, name))
        elseif op == 0x81 then -- NEWOBJ
            under(2)
            local v = newobj(st[sp - 1], st[sp])
            sp = sp - 2
            push(v)
        elseif op == 0x92 then -- NEWOBJ_EX
            under(3)
            local kwargs = st[sp]
            container(kwargs, DICT)
            local v = newobj(st[sp - 2], st[sp - 1], kwargs)
            sp = sp - 3
            push(v)
        elseif op == 0x52 then -- REDUCE
            under(2)
            local v = reduce(st[sp - 1], st[sp])
            sp = sp - 2
            push(v)
        elseif op == 0x95 then -- FRAME: a read-ahead hint, checked and skipped
            need(8)
            local len = u64(pos)
            pos = pos + 8
            if len > n - pos then
                fail(format("frame of %s bytes beyond the %d left", tostring(len), n - pos))
            end
        elseif op == 0x80 then -- PROTO
            need(1)
            if p[pos] > 5 then
                fail(format("unsupported protocol %d", p[pos]))
            end
            pos = pos + 1
        elseif op == 0x2e then -- STOP
            under(1)
            return st[sp]
        elseif op == 0x30 then -- POP
            if sp > base then
                sp = sp - 1
            else
                pop_mark()
            end
        elseif op == 0x31 then -- POP_MARK
            sp = pop_mark() - 1
        elseif op == 0x32 then -- DUP
            under(1)
            push(st[sp])
        -- Protocol 0 and 1's text forms.
        elseif op == 0x56 then -- UNICODE
            push(raw_unicode_escape(read_line()))
        elseif op == 0x70 then -- PUT
            memo_put(read_decimal(read_line()))
        elseif op == 0x67 then -- GET
            memo_get(read_decimal(read_line()))
        elseif op == 0x49 then -- INT
            local line = read_line()
            if line == "01" or line == "00" then
                push(line == "01")
            else
                push(read_decimal(line))
            end
        elseif op == 0x4c then -- LONG
            local line = read_line()
            if sub(line, -1) == "L" then
                line = sub(line, 1, -2)
            end
            push(read_decimal(line))
        elseif op == 0x46 then -- FLOAT
            push(float_value(read_float_text(read_line())))
        elseif op == 0x64 then -- DICT
            local first = pop_mark()
            if (sp - first + 1) % 2 ~= 0 then
                fail("DICT with an odd number of items")
            end
            local d = new_container(DICT, dict_mt)
            for i = first, sp, 2 do
                setitem(d, st[i], st[i + 1])
            end
            sp = first - 1
            push(d)
        elseif op == 0x6c then -- LIST
            local first = pop_mark()
            local l = new_container(LIST, list_mt)
            for i = first, sp do
                append(l, st[i])
            end
            sp = first - 1
            push(l)
        elseif op == 0x63 then -- GLOBAL
            local module = read_line()
            local name = read_line()
            push(global_of(module, name))
        elseif op == 0x53 then -- STRING
            push(escape_decode(read_line()))
        elseif op == 0x54 then -- BINSTRING
            need(4)
            local len = u32(pos)
            pos = pos + 4
            if len >= 2147483648 then
                fail("negative BINSTRING length")
            end
            push(read_bytes(len))
        elseif op == 0x55 then -- SHORT_BINSTRING
            need(1)
            local len = p[pos]
            pos = pos + 1
            push(read_bytes(len))
        else
            fail("opcode outside the supported subset")
        end
    end
end

local function finish(v)
    if recheck then
        if type(v) == "table" and meta[v] then
            height(v, 1, {})
        end
    end
    local m = type(v) == "table" and meta[v]
    if m and (m % 16 == GLOBAL or m % 16 == ARGS) then
        op = 0x2e
        fail("a class as the value", at)
    end
    if v == null then
        return nil
    end
    return v
end

local function run_and_finish()
    return finish(run())
end

local function load(str, opts, len)
    if type(str) == "string" then
        p, n = ffi_cast(u8p, str), #str
    elseif type(str) == "cdata" and type(len) == "number" and len >= 0 then
        p, n = ffi_cast(u8p, str), len
    else
        return false, "dogpile.cache.pickle: expected bytes (a string, or a pointer and a length), got "
            .. type(str)
    end
    pos, op, at = 0, nil, 0
    st, sp, base = st_keep, 0, 0
    marks, mp = marks_keep, 0
    memo, memo_count = memo_keep, 0
    meta = meta_keep
    recheck = false
    if opts then
        max_depth = opts.max_depth or _M.MAX_DEPTH
        marked = opts.mark and true or false
        want_int64 = opts.int64 and true or false
    else
        max_depth, marked, want_int64 = _M.MAX_DEPTH, false, false
    end
    local ok, v = pcall(run_and_finish)
    -- Let go of the input and the partial value at once.
    p = nil
    if n > REUSE_LIMIT then
        st_keep, marks_keep, memo_keep, meta_keep = tnew(64, 0), tnew(16, 0), tnew(64, 0), tnew(0, 32)
    else
        tclear(st)
        tclear(memo)
        tclear(meta)
    end
    if not ok and type(v) == "string" and sub(v, 1, 21) ~= "dogpile.cache.pickle:" then
        v = "dogpile.cache.pickle: " .. v
    end
    return ok, v
end

--- Reads a pickle. Returns `true, value` or `false, message`; never raises
-- on any bytes (the message names what was refused, the opcode and the
-- byte offset).
-- @param str the bytes: a string, or a pointer (cdata) with `len`
-- @param opts optional: `mark` (marked decoding, see pyvalue.lua),
--   `int64` (ints beyond 2^53 as int64_t cdata instead of an error),
--   `max_depth` (default `MAX_DEPTH`)
-- @param len the length when `str` is a pointer
_M.load = load

--- Reads a pickle; as `load`, but raises the message.
-- @raise on bytes that are not a pickle of the supported subset
function _M.loads(str, opts)
    local ok, v = load(str, opts)
    if not ok then
        error(v, 2)
    end
    return v
end

-- -- The writer ------------------------------------------------------------------------

local buf = buffer.new()
local wmemo, wcount, onpath, wdepth, wmax, wopts_string, wempty
local path = {}

local function wfail(msg)
    local parts = { "value" }
    for i = 1, wdepth do
        local k = path[i]
        parts[#parts + 1] = type(k) == "string" and k:find("^[%a_][%w_]*$") and "." .. k
            or "[" .. tostring(k) .. "]"
    end
    error(format("dogpile.cache.pickle: %s at %s", msg, concat(parts)), 0)
end

local function put_u32(x)
    buf:put(char(x % 256, floor(x / 256) % 256, floor(x / 65536) % 256, floor(x / 16777216) % 256))
end

local function put_len8(len)
    put_u32(len % 4294967296)
    put_u32(floor(len / 4294967296))
end

local function put_str(str)
    local len = #str
    if len < 256 then
        buf:put("\140", char(len), str)
    else
        buf:put("X")
        put_u32(len)
        buf:put(str)
    end
end

local function put_bytes(str)
    local len = #str
    if len < 256 then
        buf:put("C", char(len), str)
    else
        buf:put("B")
        put_u32(len)
        buf:put(str)
    end
end

local function put_float(x)
    num.d = x
    if LITTLE then
        buf:put("G", char(num.b[7], num.b[6], num.b[5], num.b[4], num.b[3], num.b[2], num.b[1], num.b[0]))
    else
        buf:put("G", ffi_string(num.b, 8))
    end
end

-- An int64 cdata as LONG1: the fewest little-endian two's complement bytes.
local function put_int64(v)
    v = ffi_cast(int64_t, v)
    if v >= -2147483648LL and v <= 2147483647LL then
        local x = tonumber(v)
        buf:put("J")
        put_u32(x < 0 and x + 4294967296 or x)
        return
    end
    local bytes = {}
    local u = ffi_cast(uint64_t, v)
    for i = 1, 8 do
        bytes[i] = tonumber(u % 256)
        u = u / 256
    end
    local len = 8
    local neg = v < 0
    while len > 1 and bytes[len] == (neg and 0xff or 0) and (bytes[len - 1] >= 0x80) == neg do
        len = len - 1
    end
    buf:put("\138", char(len), char(unpack(bytes, 1, len)))
end

local function put_int(x)
    if x >= 0 then
        if x < 256 then
            buf:put("K", char(x))
            return
        elseif x < 65536 then
            buf:put("M", char(x % 256, floor(x / 256)))
            return
        end
    end
    if x >= -2147483648 and x <= 2147483647 then
        buf:put("J")
        put_u32(x < 0 and x + 4294967296 or x)
        return
    end
    put_int64(ffi.new(int64_t, x))
end

local function put_memoize(t)
    buf:put("\148")
    wmemo[t] = wcount
    wcount = wcount + 1
end

local put_value

-- A table without a mark: a list when its keys are exactly 1..n, a dict
-- otherwise; empty: `empty_table`.
local function is_array(t)
    return pyvalue_is_array(t, wempty == "list")
end

local function put_items(t, len)
    for i = 1, len do
        path[wdepth] = i
        local v = rawget(t, i)
        if v == nil then
            buf:put("N")
        else
            put_value(v, false)
        end
    end
end

local function put_key(k)
    local tk = type(k)
    if tk == "table" then
        local mt = getmetatable(k)
        if mt ~= tuple_mt and mt ~= frozenset_mt and mt ~= bytes_mt and mt ~= float_mt and k ~= null then
            wfail("a table key (only pyvalue.tuple, frozenset, bytes and float marks are hashable)")
        end
    end
    put_value(k, true)
end

local function put_table(t)
    -- Python would write a container holding itself through the memo;
    -- the reader refuses cycles, so the writer does too.
    if onpath[t] then
        wfail("a cyclic value")
    end
    local known = wmemo[t]
    if known then
        if known < 256 then
            buf:put("h", char(known))
        else
            buf:put("j")
            put_u32(known)
        end
        return
    end
    if wdepth >= wmax then
        wfail(format("nested deeper than %d", wmax))
    end
    local mt = getmetatable(t)
    onpath[t] = true
    wdepth = wdepth + 1
    path[wdepth] = nil
    if mt == cached_mt then
        buf:put("\140\017dogpile.cache.api\148\140\011CachedValue\148\147\148")
        wcount = wcount + 3
        path[wdepth] = "payload"
        local payload = rawget(t, "payload")
        if payload == nil then
            buf:put("N")
        else
            put_value(payload, false)
        end
        local md = rawget(t, "metadata")
        path[wdepth] = "metadata"
        if type(md) ~= "table" then
            wfail("CachedValue metadata that is not a table")
        end
        -- ct is time.time(), a float in Python, whatever its value.
        local ct = rawget(md, "ct")
        if type(ct) == "number" and getmetatable(md) == nil then
            local copy = {}
            for k, v in pairs(md) do
                copy[k] = v
            end
            copy.ct = setmetatable({ ct }, float_mt)
            md = copy
        end
        put_value(md, false)
        buf:put("\134\129")
        put_memoize(t)
    elseif mt == tuple_mt then
        local len = rawget(t, "n") or #t
        if len == 0 then
            buf:put(")")
        elseif len <= 3 then
            put_items(t, len)
            buf:put(char(0x84 + len))
        else
            buf:put("(")
            put_items(t, len)
            buf:put("t")
        end
        put_memoize(t)
    elseif mt == frozenset_mt then
        buf:put("(")
        for k in pairs(t) do
            path[wdepth] = k
            put_key(k)
        end
        buf:put("\145")
        put_memoize(t)
    elseif mt == set_mt then
        buf:put("\143")
        put_memoize(t)
        if next(t) ~= nil then
            buf:put("(")
            for k in pairs(t) do
                path[wdepth] = k
                put_key(k)
            end
            buf:put("\144")
        end
    elseif mt == list_mt or (mt ~= dict_mt and is_array(t)) then
        buf:put("]")
        put_memoize(t)
        local len = mt == list_mt and rawget(t, "n") or #t
        if len > 0 then
            buf:put("(")
            put_items(t, len)
            buf:put("e")
        end
    else
        buf:put("}")
        put_memoize(t)
        if next(t) ~= nil then
            buf:put("(")
            for k, v in pairs(t) do
                path[wdepth] = k
                put_key(k)
                put_value(v, false)
            end
            buf:put("u")
        end
    end
    wdepth = wdepth - 1
    onpath[t] = nil
end

put_value = function(v, as_key)
    local tv = type(v)
    if tv == "string" then
        local mode = wopts_string
        if mode == "bytes" then
            put_bytes(v)
        elseif is_utf8(v) then
            put_str(v)
        elseif mode == "str" then
            wfail("a string that is not UTF-8 (string = \"str\")")
        else
            put_bytes(v)
        end
    elseif tv == "number" then
        if is_int(v) then
            put_int(v)
        else
            put_float(v)
        end
    elseif tv == "boolean" then
        buf:put(v and "\136" or "\137")
    elseif tv == "table" then
        if v == null then
            buf:put("N")
            return
        end
        local mt = getmetatable(v)
        if mt == bytes_mt then
            if type(v[1]) ~= "string" then
                wfail("a bytes wrapper around a " .. type(v[1]))
            end
            put_bytes(v[1])
        elseif mt == float_mt then
            if type(v[1]) ~= "number" then
                wfail("a float wrapper around a " .. type(v[1]))
            end
            put_float(v[1])
        else
            put_table(v)
        end
    elseif is_int64(v) then
        put_int64(v)
    else
        wfail("cannot write a " .. tv)
    end
end

--- Writes `v` as a pickle (protocol 4 by default: what Python's pickle.dumps
-- writes by default, and readable by every Python 3.4+ whatever the protocol
-- its own writer uses).
-- @param v the value (see pyvalue.lua for the mapping)
-- @param opts optional: `protocol` (4 or 5: the same opcodes, only the
--   header differs), `string` ("auto": UTF-8 as str, other bytes as bytes;
--   "str": refuse non-UTF-8; "bytes": every string as bytes), `empty_table`
--   ("dict", the default, or "list"), `max_depth`
-- @raise on a value outside the mapping (function, userdata, cycle, too
--   deep), naming the path inside the value
function _M.dumps(v, opts)
    local protocol = 4
    wopts_string, wempty, wmax = "auto", "dict", _M.MAX_DEPTH
    if opts then
        protocol = opts.protocol or 4
        wopts_string = opts.string or "auto"
        wempty = opts.empty_table or "dict"
        wmax = opts.max_depth or _M.MAX_DEPTH
        if protocol ~= 4 and protocol ~= 5 then
            lib.raise("dogpile.cache.pickle: dumps: protocol must be 4 or 5, got " .. tostring(protocol))
        end
        if wopts_string ~= "auto" and wopts_string ~= "str" and wopts_string ~= "bytes" then
            lib.raise("dogpile.cache.pickle: dumps: string must be \"auto\", \"str\" or \"bytes\"")
        end
        if wempty ~= "dict" and wempty ~= "list" then
            lib.raise("dogpile.cache.pickle: dumps: empty_table must be \"dict\" or \"list\"")
        end
    end
    buf:reset()
    buf:put("\128", char(protocol))
    wmemo, wcount, onpath, wdepth = {}, 0, {}, 0
    local ok, err = pcall(put_value, v == nil and null or v, false)
    wmemo, onpath = nil, nil
    if not ok then
        buf:reset()
        error(err, 2)
    end
    buf:put(".")
    local out = buf:tostring()
    if #out > 65536 then
        buf:free()
    else
        buf:reset()
    end
    return out
end

return _M
