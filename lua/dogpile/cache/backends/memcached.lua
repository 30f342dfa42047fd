--- dogpile.cache.memcached: one or several memcached servers through
-- libmemcached, keys spread by consistent hashing (ketama), a distributed
-- lock per key (`add` with a token and a finite expiry, released by a
-- compare-and-delete while it is still its owner's; waiters poll the lock
-- key), one multi-get for get_multi; values up to the servers' own size limit.
-- Arguments (README, "dogpile.cache.memcached"; read and checked by
-- backends/memcached.c): url, binary, memcached_expire_time,
-- distributed_lock, lock_timeout, lock_backoff_max, socket_timeout,
-- connect_timeout, retry_timeout, dead_timeout, server_failure_limit,
-- remove_failed_servers, tcp_nodelay, tcp_keepalive, no_block, hash,
-- item_size_max. What is Lua's here: `url` given as a list, and the default
-- key mangler.
require "dogpile.backends.memcached" -- registers the C backend
local c = require "dogpile.cache.backends.c"
local util = require "dogpile.cache.util"
local lib = require "dogpile.lib"
local ffi = require "ffi"

local C = lib.C
local type, pairs, ipairs, tostring, concat = type, pairs, ipairs, tostring, table.concat
local find = string.find
local sha1_mangle_key = util.sha1_mangle_key

lib.own_source()

-- Until dogpile.lib declares it and c.lua reads it (the mutex's wait bound).

local NAME = "dogpile.cache.memcached"
-- memcached's key limit (both protocols).
local MAX_KEY = 250

--- The default key mangler: keys memcached would refuse (longer than 250
-- bytes, empty, or holding spaces or control characters) become the 40 hex
-- characters of their SHA-1; every other key is kept as it is, readable.
local function key_mangler(key)
    local n = #key
    if n == 0 or n > MAX_KEY or find(key, "[%c ]") then
        return sha1_mangle_key(key)
    end
    return key
end

local function new(arguments)
    local url = arguments and arguments.url
    if type(url) == "table" then
        -- The C backend reads one string: "host:port,host:port".
        for i, u in ipairs(url) do
            if type(u) ~= "string" or u == "" or find(u, ",", 1, true) then
                lib.raise(NAME .. ": url[" .. i .. "] must be a \"host:port\" string, got "
                          .. tostring(u))
            end
        end
        if #url == 0 then
            lib.raise(NAME .. ": url must name at least one server")
        end
        local args = {}
        for k, v in pairs(arguments) do
            args[k] = v
        end
        args.url = concat(url, ",")
        arguments = args
    end
    local backend = c.open(NAME, arguments)
    local t = C.dp_backend_lock_timeout(backend.handle)
    backend.lock_timeout = t < 0 and math.huge or t
    backend.key_mangler = key_mangler
    return backend
end

return { new = new, key_mangler = key_mangler }
