--- The write path of a region: CachedValues to the backend, encoded when it
-- stores bytes, straight into a C backend's buffer where the value allows.
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local proxy = require "dogpile.cache.proxy"
local envelope = require "dogpile.cache.envelope"
local values = require "dogpile.cache.values"
local ffi = require "ffi"

local C = lib.C
local VALUE_VERSION = api.VALUE_VERSION
local write_scalar = envelope.write_scalar
local encode = values.encode
local ffi_string = ffi.string
local DP_OK = lib.DP_OK
local pairs, next, pcall = pairs, next, pcall

lib.own_source()

local _M = {}

--- A new CachedValue of `payload`, created now; `ttl` (its own expiration
-- time) and `delta` (its creator's duration, for early_refresh) when given.
function _M.new_value(payload, ttl, delta)
    -- Room for the memory backend's stamps (_ct, _dt), which it adds when it
    -- stores the value: made with two slots, the table was grown on every
    -- store, about 70 ns of a memory region's miss.
    return { payload = payload,
             metadata = { ct = C.dp_clock_stamp(), v = VALUE_VERSION, ttl = ttl, delta = delta },
             _ct = nil, _dt = nil }
end

--- Metadata for values stored together: one created time (and `ttl`,
-- `delta` as new_value).
function _M.new_metadata(ttl, delta)
    return { ct = C.dp_clock_stamp(), v = VALUE_VERSION, ttl = ttl, delta = delta }
end

-- A C backend with the default codec: the value written in place
-- (envelope.write_scalar) or encoded, either way straight to the backend,
-- which reports failure in err.
local function c_store(region, key, cv)
    local cb = region._cb
    local md = cv.metadata
    local p, n = write_scalar(md.ct, cv.payload, md.ttl, md.delta)
    if not p then
        p = encode(region._codec, cv, key, region)
        n = #p
    end
    if C.dp_backend_set(cb.handle, key, #key, p, n, cb.err) ~= DP_OK then
        region:_failed("set", key, ffi_string(cb.err.msg))
    end
end

local function generic_store(region, key, cv)
    local backend = region.backend
    local v = cv
    local codec = region._codec
    if codec then
        v = encode(codec, cv, key, region)
    end
    local ok, err = pcall(backend.set, backend, key, v)
    if not ok then
        region:_failed("set", key, err)
    end
end

--- The store function for a region read with strategy `s` (read.choose):
-- in place when the reads are.
function _M.choose(s)
    return s.cb and c_store or generic_store
end

--- Store CachedValue `cv` under mangled `key` with the region's store
-- function. A backend failure goes through the region's failure policy.
function _M.store(region, key, cv)
    return region._store(region, key, cv)
end

--- Store `{mangled key = CachedValue}` with one backend call where it has one.
function _M.store_multi(region, mapping)
    local codec = region._codec
    if codec then
        local enc = {}
        for k, cv in pairs(mapping) do
            enc[k] = encode(codec, cv, k, region)
        end
        mapping = enc
    end
    local ok, err = pcall(proxy.set_multi, region.backend, mapping)
    if not ok then
        region:_failed("set_multi", next(mapping), err)
    end
end

return _M
