--- Cached values as bytes, for backends that store strings: the codec a
-- region uses (chosen once, at configure), and the envelope around it
-- (dogpile/cache/envelope.lua: magic, format, flags, the created time, the
-- value's own expiration time and its creator's duration when it has them,
-- then the payload); or, for a wire_format = "dogpile.cache" region, the
-- bytes Python's dogpile.cache stores (wire_codec, dogpile/cache/wire.lua).
local ffi = require "ffi"
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local envelope = require "dogpile.cache.envelope"

local raise = lib.raise
local NO_VALUE = api.NO_VALUE
local VALUE_VERSION = api.VALUE_VERSION
local pack_envelope, unpack_envelope = envelope.pack, envelope.unpack
local read_value = envelope.read
local u8p = envelope.u8p
local ffi_cast = ffi.cast
local type, pcall, error, tostring, require, rawget = type, pcall, error, tostring, require, rawget
local HUGE = math.huge

lib.own_source()

local _M = {}

_M.pack_envelope, _M.unpack_envelope = pack_envelope, unpack_envelope

--- The codec of a region: `{encode = fn, decode = fn, raw_decode = fn or
-- nil}`. The user's serializer and deserializer when given (both or
-- neither), else, for a backend that stores bytes, the default codec, whose
-- raw decoder (`raw_decode`: nil, err on bad bytes, never raises) lets
-- values be read in place. nil for a backend that keeps Lua values (not
-- `serialized`), whatever the serializer.
-- @raise when only one of serializer and deserializer is given
function _M.codec(serializer, deserializer, serialized, label)
    if (serializer == nil) ~= (deserializer == nil) then
        raise("dogpile.cache: region " .. label .. " has a "
              .. (serializer and "serializer but no deserializer" or "deserializer but no serializer")
              .. "; give both or neither")
    end
    if not serialized then
        -- Values stay Lua values: a serializer has nothing to do.
        return nil
    end
    if serializer then
        return { encode = serializer, decode = deserializer }
    end
    -- The default codec: exact for every plain Lua value.
    local codec = require "dogpile.codec"
    local codec_decode = codec.decode
    return {
        encode = codec.encode,
        decode = function(bytes)
            local value, err = codec_decode(bytes)
            if value == nil and err ~= nil then
                error(err, 0)
            end
            return value
        end,
        raw_decode = codec_decode,
    }
end

-- -- wire_format = "dogpile.cache" ------------------------------------------------------

-- A number read from Python metadata (a float mark when decoding is marked).
local function md_number(x)
    if type(x) == "table" then
        x = x[1]
    end
    if type(x) == "number" and x == x and x > -HUGE and x < HUGE then
        return x
    end
    return nil
end

--- The codec of a `wire_format = "dogpile.cache"` region: values as Python's
-- dogpile.cache (1.1) stores them (dogpile/cache/wire.lua). `serializer`:
-- nil or "pickle" (pickle.dumps of the payload), "json", or a function
-- with `deserializer` (Python's make_region(serializer=, deserializer=)).
-- `memcached`: the region's backend is dogpile.cache.memcached; with
-- pickle there, the layout of Python's memcached backends, which have no
-- serializer: the client pickles the whole CachedValue (flags 1). `opts`:
-- wire_options (pickle / pyjson load and dumps options).
-- The codec has `decode_cv` and `encode_cv` (CachedValue <-> bytes) and
-- `flags` (the memcached item flags of the layout); no `raw_decode`, so the
-- region reads through the generic strategy (read.choose).
-- @raise on an unknown serializer name or a function without its pair
function _M.wire_codec(serializer, deserializer, memcached, opts, label)
    local wire = require "dogpile.cache.wire"
    local codec = { wire = true, flags = wire.FLAG_BYTES }
    local whole = memcached and (serializer == nil or serializer == "pickle")
    local ser
    if type(serializer) == "string" or serializer == nil then
        if deserializer ~= nil then
            raise("dogpile.cache: region " .. label .. " has a deserializer with serializer "
                  .. tostring(serializer or "pickle") .. "; a deserializer goes with a serializer "
                  .. "function")
        end
        ser = wire.serializer(serializer or "pickle", opts)
    else
        if deserializer == nil then
            raise("dogpile.cache: region " .. label .. " has a serializer but no deserializer; "
                  .. "give both or neither")
        end
        local s_fn, d_fn = serializer, deserializer
        ser = wire.serializer({ serializer = function(v) return s_fn(v) end,
                                deserializer = function(b) return d_fn(b) end }, opts)
    end
    codec.serializer = ser
    local VERSION = wire.VALUE_VERSION
    local decode_payload
    if whole then
        codec.flags = wire.FLAG_PICKLE
        local FLAG = wire.FLAG_PICKLE
        local decode_memcached = wire.decode_memcached
        decode_payload = function(bytes)
            return decode_memcached(bytes, FLAG, opts)
        end
        codec.encode_cv = function(cv)
            local md = cv.metadata
            return (wire.encode_memcached(cv.payload, md.ct, opts, md.ttl, md.delta))
        end
    else
        local wdecode = wire.decode
        decode_payload = function(bytes)
            return wdecode(bytes, ser)
        end
        codec.encode_cv = function(cv)
            local md = cv.metadata
            return wire.encode(cv.payload, md.ct, ser, md.ttl, md.delta)
        end
    end
    -- Bytes -> CachedValue; NO_VALUE and the reason when they do not
    -- decode; NO_VALUE alone for a value of another dogpile.cache value
    -- version (a miss to Python too, and not an error).
    codec.decode_cv = function(bytes)
        if type(bytes) ~= "string" then
            return NO_VALUE, "dogpile.cache: expected bytes, got " .. type(bytes)
        end
        local ok, payload, ct, md = decode_payload(bytes)
        if not ok then
            return NO_VALUE, tostring(payload)
        end
        if md_number(md.v) ~= VERSION then
            return NO_VALUE
        end
        return { payload = payload,
                 metadata = { ct = ct, v = VALUE_VERSION, ttl = md_number(rawget(md, "ttl")),
                              delta = md_number(rawget(md, "delta")) } }
    end
    return codec
end

--- Bytes from the backend -> a CachedValue, or NO_VALUE with the reason
-- (the region counts and logs it: bytes that do not decode are a miss).
function _M.decode(codec, bytes)
    if bytes == NO_VALUE or bytes == nil then
        return NO_VALUE
    end
    local decode_cv = codec.decode_cv
    if decode_cv then
        return decode_cv(bytes)
    end
    local ct, off, ttl, delta = unpack_envelope(bytes)
    local ok, value = false, off
    if ct then
        local raw = codec.raw_decode
        if raw then
            -- The default codec: scalars are read in Lua, in compiled code;
            -- the rest by the C decoder, which returns nil, err on bad bytes
            -- and never raises, so it needs no pcall.
            ok, value = read_value(ffi_cast(u8p, bytes) + off, #bytes - off)
            if not ok then
                local err
                value, err = raw(bytes:sub(off + 1))
                ok = value ~= nil or err == nil
                if not ok then
                    value = err
                end
            end
        else
            ok, value = pcall(codec.decode, bytes:sub(off + 1))
        end
    end
    if not ok then
        return NO_VALUE, tostring(value)
    end
    return { payload = value, metadata = { ct = ct, v = VALUE_VERSION, ttl = ttl, delta = delta } }
end

--- A CachedValue -> the bytes `region` stores under `key`.
-- @raise when the serializer fails or returns something else than a string
function _M.encode(codec, cv, key, region)
    local encode_cv = codec.encode_cv
    if encode_cv then
        local ok, bytes = pcall(encode_cv, cv)
        if not ok then
            if type(bytes) ~= "string" then
                error(bytes, 0)
            end
            raise(region:_message("dogpile.cache: cannot store key '" .. tostring(key) .. "': "
                                  .. bytes))
        end
        return bytes
    end
    local ok, payload = pcall(codec.encode, cv.payload)
    if not ok then
        if type(payload) ~= "string" then
            error(payload, 0)
        end
        raise(region:_message("dogpile.cache: cannot store key '" .. tostring(key) .. "': "
                              .. payload))
    end
    if type(payload) ~= "string" then
        raise(region:_message("dogpile.cache: the serializer returned a " .. type(payload)
                              .. ", not a string"))
    end
    local md = cv.metadata
    return pack_envelope(md.ct, payload, md.ttl, md.delta)
end

return _M
