--- What regions and backends share: the miss sentinel and the cached value.
local lib = require "dogpile.lib"

local setmetatable, type = setmetatable, type

lib.own_source()

local _M = {}

--- The miss sentinel: a backend returns it for a missing key, the region
-- returns it from get() for a missing or expired one. Never nil.
_M.NO_VALUE = setmetatable({}, {
    __tostring = function() return "<dogpile.cache.NO_VALUE>" end,
    __newindex = function() lib.raise("dogpile.cache: NO_VALUE is read-only") end,
})

--- The format version of cached values: a value of another version is a miss.
_M.VALUE_VERSION = 2

local CachedValue = {}
CachedValue.__index = CachedValue
_M.CachedValue = CachedValue

--- `{payload = v, metadata = {ct = created_time, v = version}}`. Without
-- metadata: created now, current version.
-- @tparam any payload the cached value
-- @tparam[opt] table metadata `{ct = created time (seconds since the epoch), v = version}` (default: now, cache.VALUE_VERSION)
-- @treturn table the CachedValue
function CachedValue.new(payload, metadata)
    if metadata == nil then
        metadata = { ct = lib.C.dp_clock_stamp(), v = _M.VALUE_VERSION }
    elseif type(metadata) ~= "table" then
        lib.raise("dogpile.cache: CachedValue.new: metadata must be a table {ct = , v = }, got "
                  .. type(metadata))
    end
    -- A plain table, as docs/API.md describes it: no metatable to set on the hit
    -- path of byte-storing backends (a setmetatable there can end a trace).
    return { payload = payload, metadata = metadata }
end

return _M
