--- The bytes Python's dogpile.cache (1.1) keeps on a shared server, read and
-- written the same way: what `wire_format = "dogpile.cache"` stores.
--
-- Two layouts:
-- * A region with a serializer (every Redis region: RedisBackend's default
--   serializer is pickle.dumps): `json.dumps(metadata)`, "|", then
--   `serializer(payload)`; metadata is `{"ct": time.time(), "v": 2}` with
--   Python's default separators. `encode` / `decode`.
-- * memcached without a region serializer: the client library pickles the
--   whole `dogpile.cache.api.CachedValue(payload, metadata)` and stores it
--   with flags 1 (pymemcache: protocol 5; python-memcached, oslo.cache's:
--   protocol 0). `encode_memcached` / `decode_memcached`. With a region
--   serializer the memcached value is the first layout with flags 0.
--
-- Created times are Python floats (seconds since the epoch): written with
-- repr()'s shortest digits, read back to the same double.
local lib = require "dogpile.lib"
local pickle = require "dogpile.cache.pickle"
local pyjson = require "dogpile.cache.pyjson"
local pyvalue = require "dogpile.cache.pyvalue"

local type, pcall, error, tostring, setmetatable, getmetatable =
    type, pcall, error, tostring, setmetatable, getmetatable
local find, sub, format, match = string.find, string.sub, string.format, string.match

lib.own_source()

local _M = { _VERSION = "0.1.0" }

--- dogpile.cache's value_version: a value whose metadata "v" differs is a
-- miss to Python (region.py), and to the region using this module.
_M.VALUE_VERSION = 2
--- memcached flags of a pickled value (pymemcache FLAG_PICKLE,
-- python-memcached _FLAG_PICKLE).
_M.FLAG_PICKLE = 1
--- memcached flags of plain bytes (a region with a serializer).
_M.FLAG_BYTES = 0

local float_repr = pyvalue.float_repr
local CachedValue_mt = pyvalue.CachedValue_mt

-- -- Serializers ------------------------------------------------------------------------

local Serializer = {}
Serializer.__index = Serializer

--- A serializer: `name` is "pickle" or "json", or a table
-- `{serializer = fn, deserializer = fn}` of user functions
-- (`fn(payload) -> bytes`, `fn(bytes) -> payload`, raising on failure), as
-- dogpile.cache's make_region(serializer=, deserializer=) takes them.
-- `opts` go to the codec: pickle.load / pyjson.load options (`mark`,
-- `int64`, `max_depth`) and pickle.dumps / pyjson.dumps options
-- (`protocol`, `string`, `empty_table`).
-- @raise on an unknown name or a missing function
function _M.serializer(name, opts)
    local self = setmetatable({ opts = opts }, Serializer)
    if name == nil or name == "pickle" then
        self.name, self.codec = "pickle", pickle
    elseif name == "json" then
        self.name, self.codec = "json", pyjson
    elseif type(name) == "table" and type(name.serializer) == "function"
        and type(name.deserializer) == "function" then
        self.name, self.dumps_fn, self.loads_fn = "user", name.serializer, name.deserializer
    else
        lib.raise("dogpile.cache: serializer must be \"pickle\", \"json\" or "
                  .. "{serializer = fn, deserializer = fn}, got " .. tostring(name))
    end
    return self
end

--- The payload's bytes. Raises on a value the serializer refuses.
function Serializer:dumps(payload)
    if self.codec then
        return self.codec.dumps(payload, self.opts)
    end
    local bytes = self.dumps_fn(payload)
    if type(bytes) ~= "string" then
        error("dogpile.cache: the serializer returned a " .. type(bytes) .. ", not bytes", 2)
    end
    return bytes
end

--- `true, payload` or `false, message`; never raises.
function Serializer:load(bytes)
    if self.codec then
        return self.codec.load(bytes, self.opts)
    end
    local ok, v = pcall(self.loads_fn, bytes)
    if not ok then
        return false, "dogpile.cache: the deserializer raised: " .. tostring(v)
    end
    return true, v
end

local PICKLE = _M.serializer("pickle")

-- -- The serialized layout -----------------------------------------------------------

-- The metadata's JSON. Python's _gen_metadata builds {"ct": time.time(),
-- "v": 2}, in that order; ct is always a float ("1700000000.0", not
-- "1700000000"). `ttl` and `delta` (a value's own expiration time, its
-- creator's duration: Lua regions' freshness policies) follow only when
-- given; Python's region reads the metadata as a dict and ignores them.
local function metadata_json(ct, v, ttl, delta)
    local s = '{"ct": ' .. float_repr(ct) .. ', "v": ' .. format("%d", v)
    if ttl ~= nil then
        s = s .. ', "ttl": ' .. float_repr(ttl)
    end
    if delta ~= nil then
        s = s .. ', "delta": ' .. float_repr(delta)
    end
    return s .. "}"
end

local function check_extra(who, name, x)
    if x ~= nil and (type(x) ~= "number" or x ~= x or x == math.huge or x == -math.huge) then
        lib.raise("dogpile.cache: " .. who .. ": " .. name .. " must be a finite number or nil, got "
                  .. tostring(x))
    end
end

--- The bytes of a value as dogpile.cache's serialized regions store it.
-- @param payload the value
-- @param ct the created time (epoch seconds, a float)
-- @param serializer from `serializer()` (default: pickle)
-- @param ttl optional: the value's own expiration time, written as metadata "ttl"
-- @param delta optional: its creator's duration, written as metadata "delta"
-- @raise on a payload the serializer refuses, or a ct that is not a finite number
function _M.encode(payload, ct, serializer, ttl, delta)
    if type(ct) ~= "number" or ct ~= ct or ct == math.huge or ct == -math.huge then
        lib.raise("dogpile.cache: wire.encode: ct must be a finite number, got " .. tostring(ct))
    end
    check_extra("wire.encode", "ttl", ttl)
    check_extra("wire.encode", "delta", delta)
    return metadata_json(ct, _M.VALUE_VERSION, ttl, delta) .. "|"
        .. (serializer or PICKLE):dumps(payload)
end

local function check_metadata(md)
    if type(md) ~= "table" then
        return false, "dogpile.cache: the metadata is not a JSON object"
    end
    local ct = md.ct
    if getmetatable(ct) == pyvalue.float_mt then
        ct = ct[1]
    end
    if type(ct) ~= "number" then
        return false, "dogpile.cache: the metadata has no numeric \"ct\""
    end
    return true, ct
end

--- Reads a serialized value. Returns `true, payload, ct, metadata` or
-- `false, message`; never raises. The caller compares `metadata.v` with
-- `VALUE_VERSION` (a mismatch is a miss, as in Python).
-- @param bytes what the server returned
-- @param serializer from `serializer()` (default: pickle)
function _M.decode(bytes, serializer)
    if type(bytes) ~= "string" then
        return false, "dogpile.cache: expected bytes, got " .. type(bytes)
    end
    -- Python partitions at the first "|": the metadata's JSON has none.
    local bar = find(bytes, "|", 1, true)
    if not bar then
        return false, "dogpile.cache: not a dogpile.cache value (no \"|\" after the metadata)"
    end
    -- What Python writes is one shape: read it with one match, anything
    -- else with the full JSON reader.
    local ok, md, ct
    local cts, vs = match(bytes, '^{"ct": (%-?%d[%d.e+-]*), "v": (%d+)}|')
    ct = cts and tonumber(cts)
    if ct then
        md = { ct = ct, v = tonumber(vs) }
    else
        ok, md = pyjson.load(sub(bytes, 1, bar - 1))
        if not ok then
            return false, md
        end
        ok, ct = check_metadata(md)
        if not ok then
            return false, ct
        end
    end
    local payload
    ok, payload = (serializer or PICKLE):load(sub(bytes, bar + 1))
    if not ok then
        return false, payload
    end
    return true, payload, ct, md
end

-- -- memcached without a region serializer -------------------------------------------

--- The bytes and flags of a value as pymemcache or python-memcached store a
-- dogpile.cache CachedValue: a pickle of CachedValue(payload, {"ct": ct,
-- "v": 2}), flags 1. Both clients read protocol 4 whatever protocol they
-- write (`opts.protocol` = 5 writes pymemcache's header).
-- @param payload the value
-- @param ct the created time (epoch seconds, a float)
-- @param opts optional: pickle.dumps options
-- @param ttl optional: as encode's
-- @param delta optional: as encode's
-- @raise on a payload pickle refuses, or a ct that is not a finite number
function _M.encode_memcached(payload, ct, opts, ttl, delta)
    if type(ct) ~= "number" or ct ~= ct or ct == math.huge or ct == -math.huge then
        lib.raise("dogpile.cache: wire.encode_memcached: ct must be a finite number, got "
                  .. tostring(ct))
    end
    check_extra("wire.encode_memcached", "ttl", ttl)
    check_extra("wire.encode_memcached", "delta", delta)
    local md = { ct = ct, v = _M.VALUE_VERSION }
    if ttl ~= nil then
        md.ttl = pyvalue.float(ttl)
    end
    if delta ~= nil then
        md.delta = pyvalue.float(delta)
    end
    local cv = setmetatable({ payload = payload, metadata = md }, CachedValue_mt)
    return pickle.dumps(cv, opts), _M.FLAG_PICKLE
end

--- Reads a memcached value. Returns `true, payload, ct, metadata` or
-- `false, message`; never raises.
-- @param bytes the value
-- @param flags the item's flags: 1 (a pickled CachedValue) or, with
--   `serializer` given (the region has one), 0 (the serialized layout)
-- @param opts optional: pickle.load options
-- @param serializer optional: the region's serializer
function _M.decode_memcached(bytes, flags, opts, serializer)
    if serializer ~= nil then
        if flags ~= _M.FLAG_BYTES then
            return false, format("dogpile.cache: memcached flags %s where a serialized value "
                                 .. "(flags 0) was expected", tostring(flags))
        end
        return _M.decode(bytes, serializer)
    end
    if flags ~= _M.FLAG_PICKLE then
        return false, format("dogpile.cache: memcached flags %s: not a pickled CachedValue "
                             .. "(flags 1; 8 is compressed, 2/4 int, 16 text)", tostring(flags))
    end
    local ok, cv = pickle.load(bytes, opts)
    if not ok then
        return false, cv
    end
    if getmetatable(cv) ~= CachedValue_mt then
        return false, "dogpile.cache: the pickle holds a " .. (pyvalue.pytype(cv) or type(cv))
            .. ", not a dogpile.cache.api.CachedValue"
    end
    local ct
    ok, ct = check_metadata(cv.metadata)
    if not ok then
        return false, ct
    end
    return true, cv.payload, ct, cv.metadata
end

return _M
