--- Python values in Lua: what the pickle and Python-json codecs of the
-- `wire_format = "dogpile.cache"` path read into and write from.
--
-- Lua has one table type and one string type where Python has list, tuple,
-- dict, set, frozenset, str and bytes, so a Python value read into Lua and
-- written back could change type. Two ways out, as lua-cjson offers with its
-- array metatable: plain decoding (the default: plain tables and strings, the
-- convenient form) and marked decoding (`mark = true`: every container gets
-- the metatable of its Python type, bytes and integer-valued floats come
-- wrapped), which writes back exactly. The writers read the same marks, so a
-- Lua program chooses a type with `pyvalue.tuple{...}`, `pyvalue.bytes(s)`...
-- The table of the whole mapping is in the README ("Sharing a cache with Python").
local ffi = require "ffi"
local lib = require "dogpile.lib"

local setmetatable, getmetatable, type, tostring = setmetatable, getmetatable, type, tostring
local floor, huge = math.floor, math.huge
local format, byte = string.format, string.byte
local ffi_istype = ffi.istype
local tonumber = tonumber

lib.own_source()

-- libc's printf and strtod: LuaJIT's own formatter rounds exact ties half
-- up, where glibc (and Python's dtoa) round them to even.
pcall(ffi.cdef, [[
int snprintf(char *str, size_t size, const char *format, ...);
double strtod(const char *nptr, char **endptr);
]])
local C = ffi.C
local fmtbuf = ffi.new("char[64]")

local _M = { _VERSION = "0.1.0" }

--- Python's None inside a container (a list item, a dict value or key, a set
-- element): Lua tables cannot hold nil. A top-level None is nil.
_M.null = setmetatable({}, {
    __tostring = function() return "<python None>" end,
    __newindex = function() lib.raise("dogpile.cache: pyvalue.null is read-only") end,
    __metatable = false,
})

-- The container marks. `__pytype` names the Python type in messages.
local list_mt = { __pytype = "list" }
local tuple_mt = { __pytype = "tuple" }
local dict_mt = { __pytype = "dict" }
local set_mt = { __pytype = "set" }
local frozenset_mt = { __pytype = "frozenset" }
-- Wrappers: bytes and integer-valued floats are Lua strings and numbers
-- otherwise; the value is field 1.
local bytes_mt = { __pytype = "bytes", __tostring = function(b) return "b" .. format("%q", b[1]) end }
local float_mt = { __pytype = "float", __tostring = function(f) return format("%.17g", f[1]) end }
-- dogpile.cache.api.CachedValue: {payload = value, metadata = {ct = , v = }}.
local cached_mt = { __pytype = "dogpile.cache.api.CachedValue" }

_M.list_mt, _M.tuple_mt, _M.dict_mt, _M.set_mt, _M.frozenset_mt =
    list_mt, tuple_mt, dict_mt, set_mt, frozenset_mt
_M.bytes_mt, _M.float_mt, _M.CachedValue_mt = bytes_mt, float_mt, cached_mt

local function mark(mt, name)
    return function(t, n)
        if t == nil then
            t = {}
        elseif type(t) ~= "table" then
            lib.raise("dogpile.cache: pyvalue." .. name .. ": expected a table, got " .. type(t))
        end
        if n ~= nil then
            if type(n) ~= "number" or n < 0 or n ~= floor(n) then
                lib.raise("dogpile.cache: pyvalue." .. name .. ": n must be a length, got "
                          .. tostring(n))
            end
            t.n = n
        end
        return setmetatable(t, mt)
    end
end

--- `pyvalue.list(t, n)`: `t` (an array) written as a list; with `n`, of that
-- length, nil holes written as None. Returns `t`.
_M.list = mark(list_mt, "list")
--- `pyvalue.tuple(t, n)`: as `list`, written as a tuple.
_M.tuple = mark(tuple_mt, "tuple")
--- `pyvalue.dict(t)`: written as a dict even when empty or array-like.
_M.dict = mark(dict_mt, "dict")
--- `pyvalue.set(t)`: `t` is `{[element] = true, ...}`, written as a set.
_M.set = mark(set_mt, "set")
--- `pyvalue.frozenset(t)`: as `set`, written as a frozenset.
_M.frozenset = mark(frozenset_mt, "frozenset")

--- `pyvalue.bytes(s)`: `s` written as Python bytes (not str).
-- @raise when `s` is not a string
function _M.bytes(s)
    if type(s) ~= "string" then
        lib.raise("dogpile.cache: pyvalue.bytes: expected a string, got " .. type(s))
    end
    return setmetatable({ s }, bytes_mt)
end

--- `pyvalue.float(x)`: `x` written as a Python float even when integer-valued.
-- @raise when `x` is not a number
function _M.float(x)
    if type(x) ~= "number" then
        lib.raise("dogpile.cache: pyvalue.float: expected a number, got " .. type(x))
    end
    return setmetatable({ x }, float_mt)
end

--- `pyvalue.CachedValue(payload, metadata)`: written as
-- `dogpile.cache.api.CachedValue(payload, metadata)`.
function _M.CachedValue(payload, metadata)
    if type(metadata) ~= "table" then
        lib.raise("dogpile.cache: pyvalue.CachedValue: metadata must be a table {ct = , v = }, got "
                  .. type(metadata))
    end
    return setmetatable({ payload = payload, metadata = metadata }, cached_mt)
end

--- The plain Lua value of a wrapper (bytes, float), or `v` itself.
function _M.unwrap(v)
    local mt = getmetatable(v)
    if mt == bytes_mt or mt == float_mt then
        return v[1]
    end
    return v
end

--- The Python type name that `v`'s mark or wrapper stands for, or nil.
function _M.pytype(v)
    local mt = type(v) == "table" and getmetatable(v)
    return mt and mt.__pytype or nil
end

-- -- Numbers ---------------------------------------------------------------------

local MAX_EXACT = 9007199254740992 -- 2^53
_M.MAX_EXACT = MAX_EXACT

--- Whether the number `x` is written as a Python int: integer-valued, within
-- 2^53 (every such integer is exact), and not -0.0 (which only a float holds).
function _M.is_int(x)
    return x == floor(x) and x <= MAX_EXACT and x >= -MAX_EXACT and (x ~= 0 or 1 / x > 0)
end

local int64_t, uint64_t = ffi.typeof("int64_t"), ffi.typeof("uint64_t")

--- Whether `v` is an int64_t or uint64_t cdata (written as a Python int).
function _M.is_int64(v)
    return type(v) == "cdata" and (ffi_istype(int64_t, v) or ffi_istype(uint64_t, v))
end

-- Shortest-digits repr, as CPython's float_repr_style 'short' (David Gay's
-- mode 0): the fewest significant digits that read back as `x`, the nearest
-- to `x` among those; written fixed when the decimal exponent is in
-- [-4, 16), else as d.ddde+XX.
local function sci(p, x)
    C.snprintf(fmtbuf, 64, "%.*e", ffi.new("int", p - 1), x)
    return ffi.string(fmtbuf)
end

local function split(s)
    local mant, exp = s:match("^(.-)e(.*)$")
    return (mant:gsub("%.", "")), tonumber(exp)
end

-- The p-digit decimal one unit above the digits `d` (exponent `e`): its
-- digits and exponent.
local function next_up(d, e)
    local i = #d
    while i > 0 and d:sub(i, i) == "9" do
        i = i - 1
    end
    if i == 0 then
        return "1" .. ("0"):rep(#d - 1), e + 1
    end
    return d:sub(1, i - 1) .. string.char(d:byte(i) + 1) .. ("0"):rep(#d - i), e
end

local function reads_back(d, e, x)
    return C.strtod(d:sub(1, 1) .. "." .. d:sub(2) .. "e" .. e, nil) == x
end

local function digits_of(x)
    local _, m = nil, nil
    m, _ = math.frexp(x)
    if m == 0.5 then
        -- A power of two: the interval of doubles that read back as x is
        -- half as wide below it as above, so the nearest p-digit decimal
        -- may miss while the one above it reads back. Search every p.
        for p = 1, 17 do
            local d, e = split(sci(p, x))
            if reads_back(d, e, x) then
                return d, e
            end
            local ud, ue = next_up(d, e)
            if reads_back(ud, ue, x) then
                return ud, ue
            end
        end
    end
    -- Otherwise reading back is monotonic in the number of digits: bisect.
    local lo, hi = 1, 17
    while lo < hi do
        local mid = floor((lo + hi) / 2)
        if C.strtod(sci(mid, x), nil) == x then
            hi = mid
        else
            lo = mid + 1
        end
    end
    return split(sci(lo, x))
end

--- Python's `repr(x)` of a float (what `json.dumps` and `str()` write).
function _M.float_repr(x)
    if x ~= x then
        return "nan"
    elseif x == huge then
        return "inf"
    elseif x == -huge then
        return "-inf"
    elseif x == 0 then
        return 1 / x < 0 and "-0.0" or "0.0"
    end
    local sign = ""
    if x < 0 then
        sign, x = "-", -x
    end
    local d, e = digits_of(x)
    d = d:gsub("0+$", "")
    if d == "" then
        d = "0"
    end
    local decpt = e + 1 -- digits are 0.d1d2... * 10^decpt
    if decpt > -4 and decpt <= 16 then
        if decpt <= 0 then
            return sign .. "0." .. ("0"):rep(-decpt) .. d
        elseif decpt >= #d then
            return sign .. d .. ("0"):rep(decpt - #d) .. ".0"
        end
        return sign .. d:sub(1, decpt) .. "." .. d:sub(decpt + 1)
    end
    local mant = #d > 1 and d:sub(1, 1) .. "." .. d:sub(2) or d
    return format("%s%se%s%02d", sign, mant, e < 0 and "-" or "+", e < 0 and -e or e)
end

-- -- Strings ----------------------------------------------------------------------

--- Whether `s` is UTF-8 as Python reads a str back (utf-8 with
-- surrogatepass: encoded lone surrogates are accepted).
function _M.is_utf8(s)
    local i, n = 1, #s
    -- ASCII runs are the common case: skip them with one pattern search.
    while i <= n do
        local j = s:find("[\128-\255]", i)
        if not j then
            return true
        end
        local c = byte(s, j)
        local len, min
        if c >= 0xC2 and c <= 0xDF then
            len, min = 2, 0x80
        elseif c >= 0xE0 and c <= 0xEF then
            len, min = 3, 0x800
        elseif c >= 0xF0 and c <= 0xF4 then
            len, min = 4, 0x10000
        else
            return false
        end
        if j + len - 1 > n then
            return false
        end
        local cp = c % (2 ^ (7 - len))
        for k = j + 1, j + len - 1 do
            local b = byte(s, k)
            if b < 0x80 or b > 0xBF then
                return false
            end
            cp = cp * 64 + b - 0x80
        end
        if cp < min or cp > 0x10FFFF then
            return false
        end
        i = j + len
    end
    return true
end

--- The UTF-8 bytes of code point `cp` (surrogates as three bytes, as
-- Python's surrogatepass writes them).
function _M.utf8_char(cp)
    local char = string.char
    if cp < 0x80 then
        return char(cp)
    elseif cp < 0x800 then
        return char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
    elseif cp < 0x10000 then
        return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
    end
    return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64,
                0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

--- Whether a table without a mark is written as a Python list: its keys are
-- exactly 1..n; an empty one when `empty_list` (the writers' empty_table).
-- @tparam table t the table
-- @tparam boolean empty_list what an empty table is
-- @treturn boolean
function _M.is_array(t, empty_list)
    local count = 0
    for _ in pairs(t) do
        count = count + 1
    end
    if count == 0 then
        return empty_list
    end
    for i = 1, count do
        if rawget(t, i) == nil then
            return false
        end
    end
    return true
end

return _M
