--- JSON exactly as Python's `json.dumps` and `json.loads` with their
-- defaults: the bytes dogpile.cache writes for the metadata of every
-- serialized value, and for the payload with `serializer = "json"`.
--
-- Python's defaults differ from most JSON libraries: separators ", " and
-- ": ", every non-ASCII character escaped as \uXXXX (surrogate pairs beyond
-- the BMP), floats as repr() writes them (1.0, 1e+16), NaN and Infinity
-- allowed; and `loads` keeps ints and floats apart. The Lua side of each
-- value follows pyvalue.lua (null, marks, wrappers), as pickle.lua does.
local ffi = require "ffi"
local lib = require "dogpile.lib"
local pyvalue = require "dogpile.cache.pyvalue"
local pyvalue_is_array = pyvalue.is_array
local buffer = require "string.buffer"

local type, pairs, next, pcall, error, tostring, tonumber, setmetatable, getmetatable, rawget =
    type, pairs, next, pcall, error, tostring, tonumber, setmetatable, getmetatable, rawget
local sub, find, byte, char, format, match, gsub = string.sub, string.find, string.byte,
    string.char, string.format, string.match, string.gsub
local floor, huge = math.floor, math.huge
local concat = table.concat

lib.own_source()

local null = pyvalue.null
local list_mt, tuple_mt, dict_mt, set_mt, frozenset_mt = pyvalue.list_mt, pyvalue.tuple_mt,
    pyvalue.dict_mt, pyvalue.set_mt, pyvalue.frozenset_mt
local bytes_mt, float_mt, cached_mt = pyvalue.bytes_mt, pyvalue.float_mt, pyvalue.CachedValue_mt
local is_int, is_int64, is_utf8, utf8_char, float_repr = pyvalue.is_int, pyvalue.is_int64,
    pyvalue.is_utf8, pyvalue.utf8_char, pyvalue.float_repr
local MAX_EXACT = pyvalue.MAX_EXACT

local _M = { _VERSION = "0.1.0" }

--- The deepest nesting read or written by default.
_M.MAX_DEPTH = 200

-- -- dumps -----------------------------------------------------------------------------

local SHORT = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
    ["\b"] = "\\b", ["\f"] = "\\f" }

-- One escaped character: ASCII controls and DEL, or a whole UTF-8 sequence.
local function escape_char(c)
    local e = SHORT[c]
    if e then
        return e
    end
    local b1 = byte(c, 1)
    if #c == 1 then
        return format("\\u%04x", b1)
    end
    local cp
    if #c == 2 then
        cp = (b1 - 0xC0) * 64 + byte(c, 2) - 0x80
    elseif #c == 3 then
        cp = (b1 - 0xE0) * 4096 + (byte(c, 2) - 0x80) * 64 + byte(c, 3) - 0x80
    else
        cp = (b1 - 0xF0) * 262144 + (byte(c, 2) - 0x80) * 4096 + (byte(c, 3) - 0x80) * 64
            + byte(c, 4) - 0x80
        cp = cp - 0x10000
        return format("\\u%04x\\u%04x", 0xD800 + floor(cp / 1024), 0xDC00 + cp % 1024)
    end
    return format("\\u%04x", cp)
end

local function quote(s)
    if find(s, '[%c"\\\127-\255]') then
        s = gsub(s, '[%c"\\\127]', escape_char)
        s = gsub(s, "[\192-\247][\128-\191]*", escape_char)
    end
    return '"' .. s .. '"'
end

local buf = buffer.new()
local onpath, depth, maxd, wempty
local path = {}

local function wfail(msg)
    local parts = { "value" }
    for i = 1, depth do
        local k = path[i]
        parts[#parts + 1] = type(k) == "string" and find(k, "^[%a_][%w_]*$") and "." .. k
            or "[" .. tostring(k) .. "]"
    end
    error(format("dogpile.cache.pyjson: %s at %s", msg, concat(parts)), 0)
end

local function number_text(x)
    if is_int(x) then
        return format("%d", x)
    elseif x ~= x then
        return "NaN"
    elseif x == huge then
        return "Infinity"
    elseif x == -huge then
        return "-Infinity"
    end
    return float_repr(x)
end

local function int64_text(v)
    return (gsub(tostring(v), "U?LL$", ""))
end

local function key_text(k)
    local tk = type(k)
    if tk == "string" then
        if not is_utf8(k) then
            wfail("a dict key that is not UTF-8 text")
        end
        return quote(k)
    elseif tk == "number" then
        return '"' .. number_text(k) .. '"'
    elseif tk == "boolean" then
        return k and '"true"' or '"false"'
    elseif k == null then
        return '"null"'
    elseif tk == "table" and getmetatable(k) == float_mt then
        return '"' .. number_text(k[1]) .. '"'
    elseif is_int64(k) then
        return '"' .. int64_text(k) .. '"'
    end
    wfail("keys must be str, int, float, bool or None, not " .. (pyvalue.pytype(k) or tk))
end

local put

local function is_array(t)
    return pyvalue_is_array(t, wempty == "list")
end

local function put_table(t)
    local mt = getmetatable(t)
    if mt == bytes_mt then
        wfail("bytes are not JSON serializable")
    elseif mt == float_mt then
        local x = t[1]
        -- repr of an integer-valued float: "1.0"
        buf:put(x == floor(x) and x == x and x ~= huge and x ~= -huge and float_repr(x)
                or number_text(x))
        return
    elseif mt == set_mt or mt == frozenset_mt then
        wfail("a " .. mt.__pytype .. " is not JSON serializable")
    end
    if onpath[t] then
        wfail("a circular reference")
    end
    if depth >= maxd then
        wfail(format("nested deeper than %d", maxd))
    end
    onpath[t] = true
    depth = depth + 1
    if mt == cached_mt then
        -- a namedtuple: Python writes it as the list [payload, metadata]
        buf:put("[")
        path[depth] = "payload"
        put(rawget(t, "payload"))
        buf:put(", ")
        path[depth] = "metadata"
        local md = rawget(t, "metadata")
        if type(md) == "table" and getmetatable(md) == nil and type(md.ct) == "number" then
            -- as Python's _gen_metadata builds it: ct (a float), then v
            buf:put('{"ct": ', float_repr(md.ct))
            for k, v in pairs(md) do
                if k ~= "ct" and k ~= "v" then
                    buf:put(", ", key_text(k), ": ")
                    put(v)
                end
            end
            if md.v ~= nil then
                buf:put(', "v": ')
                put(md.v)
            end
            buf:put("}")
        else
            put(md)
        end
        buf:put("]")
    elseif mt == list_mt or mt == tuple_mt or (mt ~= dict_mt and is_array(t)) then
        local len = (mt == list_mt or mt == tuple_mt) and rawget(t, "n") or #t
        buf:put("[")
        for i = 1, len do
            if i > 1 then
                buf:put(", ")
            end
            path[depth] = i
            put(rawget(t, i))
        end
        buf:put("]")
    else
        buf:put("{")
        local first = true
        for k, v in pairs(t) do
            path[depth] = k
            if not first then
                buf:put(", ")
            end
            first = false
            buf:put(key_text(k), ": ")
            put(v)
        end
        buf:put("}")
    end
    depth = depth - 1
    onpath[t] = nil
end

put = function(v)
    local tv = type(v)
    if tv == "string" then
        if not is_utf8(v) then
            wfail("a string that is not UTF-8 (bytes are not JSON serializable)")
        end
        buf:put(quote(v))
    elseif tv == "number" then
        buf:put(number_text(v))
    elseif tv == "boolean" then
        buf:put(v and "true" or "false")
    elseif v == nil or v == null then
        buf:put("null")
    elseif tv == "table" then
        put_table(v)
    elseif is_int64(v) then
        buf:put(int64_text(v))
    else
        wfail("cannot write a " .. tv)
    end
end

--- `json.dumps(v)` with Python's defaults.
-- @param v the value (see pyvalue.lua for the mapping)
-- @param opts optional: `empty_table` ("dict", the default, or "list"), `max_depth`
-- @raise on a value JSON cannot hold (bytes, sets, functions, cycles), naming its path
function _M.dumps(v, opts)
    wempty, maxd = "dict", _M.MAX_DEPTH
    if opts then
        wempty = opts.empty_table or "dict"
        maxd = opts.max_depth or _M.MAX_DEPTH
    end
    buf:reset()
    onpath, depth = {}, 0
    local ok, err = pcall(put, v)
    onpath = nil
    if not ok then
        buf:reset()
        error(err, 2)
    end
    return buf:tostring()
end

--- Python's `repr()` of a float, as dumps writes it.
_M.float_repr = float_repr

-- -- loads -----------------------------------------------------------------------------

local s, pos, n, rdepth, rmax, marked, want_int64

local function fail(msg, at)
    error(format("dogpile.cache.pyjson: %s at byte %d", msg, (at or pos) - 1), 0)
end

local function skip_ws()
    pos = find(s, "[^ \t\n\r]", pos) or n + 1
end

local ESC = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r",
    t = "\t" }

local function read_string()
    local start = pos + 1 -- after the quote
    local out
    local i = start
    while true do
        local j = find(s, '["\\%c]', i)
        if not j then
            fail("unterminated string", start - 1)
        end
        local c = byte(s, j)
        if c == 34 then
            local piece = sub(s, i, j - 1)
            pos = j + 1
            if out then
                out[#out + 1] = piece
                return concat(out)
            end
            return piece
        elseif c ~= 92 then
            if c == 127 then
                -- DEL is not a control character to Python's strict mode
                out = out or {}
                out[#out + 1] = sub(s, i, j)
                i = j + 1
            else
                fail("invalid control character in a string", j)
            end
        else
            out = out or {}
            out[#out + 1] = sub(s, i, j - 1)
            local e = sub(s, j + 1, j + 1)
            if ESC[e] then
                out[#out + 1] = ESC[e]
                i = j + 2
            elseif e == "u" then
                local hex = sub(s, j + 2, j + 5)
                if not find(hex, "^%x%x%x%x$") then
                    fail("invalid \\uXXXX escape", j)
                end
                local cp = tonumber(hex, 16)
                i = j + 6
                if cp >= 0xD800 and cp <= 0xDBFF and sub(s, i, i + 1) == "\\u" then
                    local hex2 = sub(s, i + 2, i + 5)
                    local lo = find(hex2, "^%x%x%x%x$") and tonumber(hex2, 16)
                    if lo and lo >= 0xDC00 and lo <= 0xDFFF then
                        cp = 0x10000 + (cp - 0xD800) * 1024 + lo - 0xDC00
                        i = i + 6
                    end
                end
                out[#out + 1] = utf8_char(cp)
            else
                fail("invalid escape", j)
            end
        end
    end
end

local read_value

local function int_of(text)
    local digits = #text - (byte(text, 1) == 45 and 1 or 0)
    if digits <= 15 then
        return tonumber(text)
    end
    local neg = byte(text, 1) == 45
    local d = neg and sub(text, 2) or text
    if #d > 19 then
        fail("an int beyond the int64 range")
    end
    local u = ffi.new("uint64_t", 0)
    for i = 1, #d do
        u = u * 10 + (byte(d, i) - 48)
    end
    if (neg and u > 9223372036854775808ULL) or (not neg and u > 9223372036854775807ULL) then
        fail("an int beyond the int64 range")
    end
    local v = ffi.cast("int64_t", neg and 0ULL - u or u)
    if v >= -MAX_EXACT and v <= MAX_EXACT then
        return tonumber(v)
    end
    if not want_int64 then
        fail("an int beyond 2^53 (read it with int64 = true)")
    end
    return v
end

local function read_number()
    local int, frac, exp = match(s, "^(-?%d+)(%.?%d*)([eE]?[-+]?%d*)", pos)
    if not int or (#int > 1 and find(int, "^%-?0%d")) or frac == "." or (exp ~= "" and not find(exp, "%d")) then
        fail("invalid number")
    end
    local text = int .. frac .. exp
    pos = pos + #text
    if frac == "" and exp == "" then
        return int_of(text)
    end
    local x = tonumber(text)
    if marked and x == floor(x) then
        return setmetatable({ x }, float_mt)
    end
    return x
end

local function enter()
    rdepth = rdepth + 1
    if rdepth > rmax then
        fail(format("nested deeper than %d", rmax))
    end
end

read_value = function(inside)
    skip_ws()
    local c = byte(s, pos)
    if c == 34 then
        return read_string()
    elseif c == 123 then
        enter()
        pos = pos + 1
        local t = {}
        skip_ws()
        if byte(s, pos) == 125 then
            pos = pos + 1
        else
            while true do
                skip_ws()
                if byte(s, pos) ~= 34 then
                    fail("expecting a property name in double quotes")
                end
                local k = read_string()
                skip_ws()
                if byte(s, pos) ~= 58 then
                    fail("expecting ':'")
                end
                pos = pos + 1
                t[k] = read_value(true)
                skip_ws()
                local d = byte(s, pos)
                pos = pos + 1
                if d == 125 then
                    break
                elseif d ~= 44 then
                    fail("expecting ',' or '}'", pos - 1)
                end
            end
        end
        rdepth = rdepth - 1
        return marked and setmetatable(t, dict_mt) or t
    elseif c == 91 then
        enter()
        pos = pos + 1
        local t, len = {}, 0
        skip_ws()
        if byte(s, pos) == 93 then
            pos = pos + 1
        else
            while true do
                len = len + 1
                t[len] = read_value(true)
                skip_ws()
                local d = byte(s, pos)
                pos = pos + 1
                if d == 93 then
                    break
                elseif d ~= 44 then
                    fail("expecting ',' or ']'", pos - 1)
                end
            end
        end
        rdepth = rdepth - 1
        return marked and setmetatable(t, list_mt) or t
    elseif c == 45 or (c and c >= 48 and c <= 57) then
        if sub(s, pos, pos + 8) == "-Infinity" then
            pos = pos + 9
            return -huge
        end
        return read_number()
    elseif c == 110 and sub(s, pos, pos + 3) == "null" then
        pos = pos + 4
        return inside and null or nil
    elseif c == 116 and sub(s, pos, pos + 3) == "true" then
        pos = pos + 4
        return true
    elseif c == 102 and sub(s, pos, pos + 4) == "false" then
        pos = pos + 5
        return false
    elseif c == 78 and sub(s, pos, pos + 2) == "NaN" then
        pos = pos + 3
        return 0 / 0
    elseif c == 73 and sub(s, pos, pos + 7) == "Infinity" then
        pos = pos + 8
        return huge
    end
    fail(c and "expecting a value" or "unexpected end of input")
end

local function load_all()
    local v = read_value(false)
    skip_ws()
    if pos <= n then
        fail("extra data")
    end
    return v
end

--- `json.loads(text)` with Python's defaults. Returns `true, value` or
-- `false, message`; never raises on any input.
-- @param text the JSON text
-- @param opts optional: `mark` (lists and dicts marked, integer-valued floats
--   wrapped: see pyvalue.lua), `int64` (ints beyond 2^53 as int64_t cdata),
--   `max_depth`
function _M.load(text, opts)
    if type(text) ~= "string" then
        return false, "dogpile.cache.pyjson: expected a string, got " .. type(text)
    end
    s, pos, n, rdepth = text, 1, #text, 0
    -- Python's json.loads(bytes) reads a UTF-8 BOM as utf-8-sig does.
    if sub(s, 1, 3) == "\239\187\191" then
        pos = 4
    end
    rmax, marked, want_int64 = _M.MAX_DEPTH, false, false
    if opts then
        rmax = opts.max_depth or _M.MAX_DEPTH
        marked = opts.mark and true or false
        want_int64 = opts.int64 and true or false
    end
    local ok, v = pcall(load_all)
    s = nil
    if not ok and type(v) == "string" and sub(v, 1, 21) ~= "dogpile.cache.pyjson:" then
        v = "dogpile.cache.pyjson: " .. v
    end
    return ok, v
end

--- As `load`, raising the message.
-- @raise on text that is not JSON
function _M.loads(text, opts)
    local ok, v = _M.load(text, opts)
    if not ok then
        error(v, 2)
    end
    return v
end

return _M
