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
-- item_size_max. What is Lua's here: `url` given as a list, the default
-- key mangler, and for inside nginx pool_size and pool_idle_timeout
-- (accepted and unused outside it). Inside nginx the same names,
-- arguments, servers, bytes and lock run over cosockets instead
-- (dogpile.cache.backends.memcached_cosocket): libmemcached would block the
-- worker.
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

-- The pool arguments (nginx only): checked, then taken out of `arguments`.
local function pool_args(arguments)
    local pool_size, idle = arguments.pool_size, arguments.pool_idle_timeout
    if pool_size ~= nil and (type(pool_size) ~= "number" or pool_size < 1
                             or pool_size ~= math.floor(pool_size)) then
        lib.raise(NAME .. ": pool_size must be a positive integer (connections kept idle per "
                  .. "nginx worker and server), got " .. tostring(pool_size))
    end
    if idle ~= nil and (type(idle) ~= "number" or not (idle > 0) or idle == math.huge) then
        lib.raise(NAME .. ": pool_idle_timeout must be a positive number of seconds, got "
                  .. tostring(idle))
    end
    if pool_size == nil and idle == nil then
        return arguments
    end
    local args = {}
    for k, v in pairs(arguments) do
        if k ~= "pool_size" and k ~= "pool_idle_timeout" then
            args[k] = v
        end
    end
    return args, pool_size, idle
end

-- The arguments as the C backend reads them: `url` one string.
local function c_arguments(arguments)
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
    return arguments
end

local function new(arguments)
    local pool_size, idle
    if arguments == nil or type(arguments) == "table" then
        arguments, pool_size, idle = pool_args(arguments or {})
    end
    arguments = c_arguments(arguments)
    local backend = c.open(NAME, arguments)
    local t = C.dp_backend_lock_timeout(backend.handle)
    local ngx = rawget(_G, "ngx")
    if type(ngx) == "table" and ngx.config and ngx.config.ngx_lua_version and ngx.socket then
        -- The C backend's reader has checked the arguments (its messages,
        -- its defaults); opening it connected to nothing.
        backend:close()
        return require("dogpile.cache.backends.memcached_cosocket").open(
            NAME, arguments, t, pool_size, idle, key_mangler)
    end
    backend.lock_timeout = t < 0 and math.huge or t
    backend.key_mangler = key_mangler
    return backend
end

return { new = new, key_mangler = key_mangler }
