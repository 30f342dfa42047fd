--- dogpile.cache.redis_sentinel: dogpile.cache.redis on whichever server the
-- sentinels name as the master of `service_name`; after a failover the next
-- operations find the new master by themselves. Inside nginx, over cosockets
-- (backends/redis.lua dispatches).
-- Arguments: sentinels ({{host, port}, ...} or {{host = h, port = p}, ...} or
-- {"host:port", ...}), service_name, and those of dogpile.cache.redis
-- (except url, host and port), read and checked by backends/redis.c. What
-- is Lua's here: the list, joined into one "host:port,..." string.
local redis = require "dogpile.cache.backends.redis"
local lib = require "dogpile.lib"

local type, ipairs, tostring, concat = type, ipairs, tostring, table.concat

lib.own_source()

local NAME = "dogpile.cache.redis_sentinel"

local function new(arguments)
    arguments = arguments or {}
    if type(arguments) ~= "table" then
        lib.raise(NAME .. ": arguments must be a table, got " .. type(arguments))
    end
    local sentinels = arguments.sentinels
    if type(sentinels) ~= "table" or #sentinels == 0 then
        lib.raise(NAME .. ": sentinels must be a non-empty list of {host, port}, got "
                  .. tostring(sentinels))
    end
    for _, k in ipairs({ "url", "host", "port" }) do
        if arguments[k] ~= nil then
            lib.raise(NAME .. ": '" .. k .. "' is not an argument here: the sentinels name "
                      .. "the master")
        end
    end
    local list = {}
    for i, s in ipairs(sentinels) do
        local host, port
        if type(s) == "string" then
            host, port = s:match("^(.*):(%d+)$")
        elseif type(s) == "table" then
            host, port = s.host or s[1], s.port or s[2] or 26379
        end
        if type(host) ~= "string" or tonumber(port) == nil then
            lib.raise(NAME .. ": sentinels[" .. i .. "] must be {host, port}, "
                      .. "{host = h, port = p} or \"host:port\"")
        end
        list[i] = host .. ":" .. tonumber(port)
    end
    return redis.open(NAME, arguments, { sentinels = concat(list, ",") })
end

--- A redis backend on the master the sentinels name (the region calls it from `configure`).
-- @function new
-- @tparam[opt] table arguments the arguments listed above (default {}: each at its default)
-- @treturn table the backend
return { new = new }
