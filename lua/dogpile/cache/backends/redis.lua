--- dogpile.cache.redis: a cache on a Redis server (hiredis), shared by every
-- process and machine that reaches it, with a distributed lock per key.
-- Arguments (README, "dogpile.cache.redis"): url, host, port, db, username,
-- password, socket_timeout, connect_timeout, redis_expiration_time,
-- distributed_lock, lock_timeout, lock_sleep, lock_prefix, and for inside
-- nginx pool_size and pool_idle_timeout (accepted and unused outside it).
-- Inside nginx the same names, arguments, bytes and lock run over cosockets
-- instead (dogpile.cache.backends.redis_cosocket): hiredis would block the
-- worker.
local lib = require "dogpile.lib"

local type, pairs, tostring = type, pairs, tostring

lib.own_source()

local NAME = "dogpile.cache.redis"
-- The lock's PX, and the longest a dead or stuck holder keeps others waiting.
local DEFAULT_LOCK_TIMEOUT = 30

--- Open `name` ("dogpile.cache.redis" or "dogpile.cache.redis_sentinel")
-- with the region's arguments; `rest` may already hold converted ones.
local function open(name, arguments, rest)
    arguments = arguments or {}
    if type(arguments) ~= "table" then
        lib.raise(name .. ": arguments must be a table, got " .. type(arguments))
    end
    local lock_timeout = arguments.lock_timeout
    if lock_timeout == nil then
        lock_timeout = DEFAULT_LOCK_TIMEOUT
    elseif type(lock_timeout) ~= "number" or not (lock_timeout > 0) or lock_timeout == math.huge then
        lib.raise(name .. ": lock_timeout must be a positive, finite number of seconds (the "
                  .. "lock's expiry in Redis), got " .. tostring(lock_timeout))
    end
    local distributed = arguments.distributed_lock
    if distributed == nil then
        distributed = true
    elseif type(distributed) ~= "boolean" then
        lib.raise(name .. ": distributed_lock must be a boolean, got " .. type(distributed))
    end
    local pool_size, idle = arguments.pool_size, arguments.pool_idle_timeout
    if pool_size ~= nil and (type(pool_size) ~= "number" or pool_size < 1
                             or pool_size ~= math.floor(pool_size)) then
        lib.raise(name .. ": pool_size must be a positive integer (connections kept idle per "
                  .. "nginx worker), got " .. tostring(pool_size))
    end
    if idle ~= nil and (type(idle) ~= "number" or not (idle > 0) or idle == math.huge) then
        lib.raise(name .. ": pool_idle_timeout must be a positive number of seconds, got "
                  .. tostring(idle))
    end
    local ngx = rawget(_G, "ngx")
    if type(ngx) == "table" and ngx.config and ngx.config.ngx_lua_version and ngx.socket then
        return require("dogpile.cache.backends.redis_cosocket").open(name, arguments,
                                                                     lock_timeout, distributed,
                                                                     rest)
    end
    require "dogpile.backends.redis" -- registers the C backend
    rest = rest or {}
    for k, v in pairs(arguments) do
        if k ~= "distributed_lock" and k ~= "pool_size" and k ~= "pool_idle_timeout"
            and rest[k] == nil then
            rest[k] = v
        end
    end
    rest.lock_timeout = lock_timeout
    local backend = require("dogpile.cache.backends.c").open(name, rest)
    backend.lock_timeout = lock_timeout
    if not distributed then
        -- The region's own lock: callers in this Lua state only.
        backend.get_mutex = nil
    end
    return backend
end

local function new(arguments)
    return open(NAME, arguments)
end

return { new = new, open = open, DEFAULT_LOCK_TIMEOUT = DEFAULT_LOCK_TIMEOUT }
