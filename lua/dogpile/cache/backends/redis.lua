--- dogpile.cache.redis: a cache on a Redis server (hiredis), shared by every
-- process and machine that reaches it, with a distributed lock per key.
-- Arguments (README, "dogpile.cache.redis"; read and checked by
-- backends/redis.c, pool_size and pool_idle_timeout there too, accepted and
-- unused outside nginx). What is Lua's here: inside nginx the same names,
-- arguments, bytes and lock run over cosockets instead
-- (dogpile.cache.backends.redis_cosocket): hiredis would block the worker.
local lib = require "dogpile.lib"

local type, pairs, rawget = type, pairs, rawget

lib.own_source()

local NAME = "dogpile.cache.redis"

local function in_nginx()
    local ngx = rawget(_G, "ngx")
    return type(ngx) == "table" and ngx.config and ngx.config.ngx_lua_version and ngx.socket
end

-- The cosocket transport checks every argument itself (dogpile.cache.resp)
-- but distributed_lock, and takes the lock's two settings apart; 30 is its
-- lock_timeout default, as backends/redis.c's.
local function over_cosockets(name, arguments, rest)
    local distributed = arguments.distributed_lock
    if distributed ~= nil and type(distributed) ~= "boolean" then
        lib.raise(name .. ": distributed_lock must be a boolean, got " .. type(distributed))
    end
    local lock_timeout = arguments.lock_timeout
    if lock_timeout == nil then
        lock_timeout = 30
    end
    return require("dogpile.cache.backends.redis_cosocket").open(name, arguments, lock_timeout,
                                                                 distributed ~= false, rest)
end

--- Open `name` ("dogpile.cache.redis" or "dogpile.cache.redis_sentinel")
-- with the region's arguments; `rest` holds arguments already converted
-- (redis_sentinel's list), which win.
local function open(name, arguments, rest)
    arguments = arguments or {}
    if type(arguments) ~= "table" then
        lib.raise(name .. ": arguments must be a table, got " .. type(arguments))
    end
    if in_nginx() then
        return over_cosockets(name, arguments, rest)
    end
    require "dogpile.backends.redis" -- registers the C backend
    if rest then
        local args = {}
        for k, v in pairs(arguments) do
            args[k] = v
        end
        for k, v in pairs(rest) do
            args[k] = v
        end
        arguments = args
    end
    return require("dogpile.cache.backends.c").open(name, arguments)
end

local function new(arguments)
    return open(NAME, arguments)
end

return { new = new, open = open }
