--- dogpile.cache.memcached: one or several memcached servers through
-- libmemcached, keys spread by consistent hashing (ketama), a distributed
-- lock per key (`add` with a token and a finite expiry, released by a
-- compare-and-delete while it is still its owner's; waiters poll the lock
-- key), one multi-get for get_multi; values up to the servers' own size limit.
-- Arguments (README, "dogpile.cache.memcached"): url, binary,
-- memcached_expire_time, distributed_lock, lock_timeout, lock_backoff_max,
-- socket_timeout, connect_timeout, retry_timeout, dead_timeout,
-- server_failure_limit, remove_failed_servers, tcp_nodelay, tcp_keepalive,
-- no_block, hash, item_size_max.
require "dogpile.backends.memcached" -- registers the C backend
local c = require "dogpile.cache.backends.c"
local util = require "dogpile.cache.util"
local lib = require "dogpile.lib"
local dogpile = require "dogpile"

local type, pairs, ipairs, tostring, concat = type, pairs, ipairs, tostring, table.concat
local find = string.find
local sha1_mangle_key = util.sha1_mangle_key

lib.own_source()

local NAME = "dogpile.cache.memcached"
-- The longest a dead or stuck holder keeps the others waiting, in seconds;
-- also the lock key's expiry on the server.
local DEFAULT_LOCK_TIMEOUT = 30
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

local function core_mutex(self, key)
    return dogpile.core_mutex(self.lock_domain, key)
end

local function new(arguments)
    arguments = arguments or {}
    if type(arguments) ~= "table" then
        lib.raise(NAME .. ": arguments must be a table, got " .. type(arguments))
    end
    local args = {}
    for k, v in pairs(arguments) do
        args[k] = v
    end
    local url = args.url
    if type(url) == "table" then
        for i, u in ipairs(url) do
            if type(u) ~= "string" or u == "" or find(u, ",", 1, true) then
                lib.raise(NAME .. ": url[" .. i .. "] must be a \"host:port\" string, got "
                          .. tostring(u))
            end
        end
        if #url == 0 then
            lib.raise(NAME .. ": url must name at least one server")
        end
        args.url = concat(url, ",")
    elseif url ~= nil and type(url) ~= "string" then
        lib.raise(NAME .. ": url must be \"host:port\" or a list of them, got " .. type(url))
    end
    local lock_timeout = args.lock_timeout
    if lock_timeout == nil then
        lock_timeout = DEFAULT_LOCK_TIMEOUT
    elseif type(lock_timeout) ~= "number" or not (lock_timeout > 0)
        or lock_timeout == math.huge then
        lib.raise(NAME .. ": lock_timeout must be a finite positive number of seconds (the "
                  .. "lock key's expiry on the server), got " .. tostring(lock_timeout))
    end
    args.lock_timeout = lock_timeout
    local distributed_lock = args.distributed_lock
    if distributed_lock == nil then
        distributed_lock = true
    elseif type(distributed_lock) ~= "boolean" then
        lib.raise(NAME .. ": distributed_lock must be a boolean, got " .. type(distributed_lock))
    end
    args.distributed_lock = nil
    local backend = c.open(NAME, args)
    backend.lock_timeout = lock_timeout
    backend.key_mangler = key_mangler
    if not distributed_lock then
        -- Only this process's threads and Lua states are ordered (the core's
        -- per-key lock), as dogpile.cache's distributed_lock=False.
        backend.get_mutex = core_mutex
    end
    return backend
end

return { new = new, key_mangler = key_mangler, DEFAULT_LOCK_TIMEOUT = DEFAULT_LOCK_TIMEOUT }
