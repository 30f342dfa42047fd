--- dogpile.cache.redis_cluster: a cache on a Redis Cluster (hiredis, in C:
-- backends/redis_cluster.c), with the values and the lock of
-- dogpile.cache.redis. This file only does what is Lua's: the list of
-- startup nodes joined into one string, and distributed_lock; inside nginx
-- it opens the cosocket form instead (backends/redis_cluster_cosocket.lua).
-- Arguments (README, "dogpile.cache.redis_cluster"): startup_nodes
-- ({"host:port", ...}, {{host, port}, ...} or {{host = h, port = p}, ...})
-- or url ("redis+cluster://[user:password@]h1:p1,h2:p2"), username,
-- password, socket_timeout, connect_timeout, redis_expiration_time,
-- distributed_lock, lock_timeout, lock_sleep, lock_prefix, and pool_size
-- and pool_idle_timeout (accepted, as dogpile.cache.redis does outside nginx).
local ffi = require "ffi"
local lib = require "dogpile.lib"

local type, pairs, ipairs, tostring, tonumber, concat = type, pairs, ipairs, tostring, tonumber,
    table.concat

lib.own_source()
-- Not in lib.lua's declarations (the C backends' shims declare it).
pcall(ffi.cdef, "double dp_backend_lock_timeout(dp_backend *b);")

local NAME = "dogpile.cache.redis_cluster"

local function node_list(nodes)
    if type(nodes) == "string" then
        return nodes
    end
    if type(nodes) ~= "table" or #nodes == 0 then
        lib.raise(NAME .. ": startup_nodes must be a non-empty list of \"host:port\", got "
                  .. tostring(nodes))
    end
    local list = {}
    for i, s in ipairs(nodes) do
        local host, port
        if type(s) == "string" then
            host, port = s:match("^(.*):(%d+)$")
        elseif type(s) == "table" then
            host, port = s.host or s[1], s.port or s[2]
        end
        if type(host) ~= "string" or host == "" or tonumber(port) == nil then
            lib.raise(NAME .. ": startup_nodes[" .. i .. "] must be \"host:port\", {host, port} "
                      .. "or {host = h, port = p}")
        end
        list[i] = host .. ":" .. tonumber(port)
    end
    return concat(list, ",")
end

-- The nodes as "host:port,..." from startup_nodes or a url
-- ("redis+cluster://[user:password@]h1:p1,h2:p2[/0]"), for the cosocket
-- form (the C backend reads the url itself); the url's credentials go into
-- `arguments` (the caller's copy), where the cosocket form reads them.
local function url_nodes(arguments)
    if arguments.startup_nodes ~= nil then
        return node_list(arguments.startup_nodes)
    end
    local url = arguments.url
    if type(url) ~= "string" then
        lib.raise(NAME .. ": startup_nodes (a list of \"host:port\") or url "
                  .. "(\"redis+cluster://host:port,...\") is required")
    end
    local rest = url:match("^redis%+cluster://(.*)$") or url:match("^redis://(.*)$")
    if not rest then
        lib.raise(NAME .. ": url '" .. url .. "' must start with redis+cluster:// (or redis://)")
    end
    local userinfo, hosts = rest:match("^(.*)@([^@]*)$")
    if userinfo then
        local user, pass = userinfo:match("^([^:]*):(.*)$")
        if user then
            arguments.password = pass
            if user ~= "" then
                arguments.username = user
            end
        elseif userinfo ~= "" then
            arguments.password = userinfo
        end
        rest = hosts
    end
    local list, db = rest:match("^([^/]*)/?(.*)$")
    if db ~= "" and db ~= "0" then
        lib.raise(NAME .. ": url '" .. url .. "': a cluster has database 0 only, not '" .. db .. "'")
    end
    return list
end

local function new(arguments)
    arguments = arguments or {}
    if type(arguments) ~= "table" then
        lib.raise(NAME .. ": arguments must be a table, got " .. type(arguments))
    end
    local distributed = arguments.distributed_lock
    if distributed == nil then
        distributed = true
    elseif type(distributed) ~= "boolean" then
        lib.raise(NAME .. ": distributed_lock must be a boolean, got " .. type(distributed))
    end
    local pool_size, idle = arguments.pool_size, arguments.pool_idle_timeout
    if pool_size ~= nil and (type(pool_size) ~= "number" or pool_size < 1
                             or pool_size ~= math.floor(pool_size)) then
        lib.raise(NAME .. ": pool_size must be a positive integer, got " .. tostring(pool_size))
    end
    if idle ~= nil and (type(idle) ~= "number" or not (idle > 0) or idle == math.huge) then
        lib.raise(NAME .. ": pool_idle_timeout must be a positive number of seconds, got "
                  .. tostring(idle))
    end
    local ngx = rawget(_G, "ngx")
    if type(ngx) == "table" and ngx.config and ngx.config.ngx_lua_version and ngx.socket then
        -- hiredis would block the worker: the same client over cosockets.
        local copy = {}
        for k, v in pairs(arguments) do
            copy[k] = v
        end
        return require("dogpile.cache.backends.redis_cluster_cosocket").open(
            NAME, copy, url_nodes(copy), distributed)
    end
    local rest = {}
    for k, v in pairs(arguments) do
        if k ~= "distributed_lock" and k ~= "pool_size" and k ~= "pool_idle_timeout" then
            rest[k] = v
        end
    end
    if arguments.startup_nodes ~= nil then
        rest.startup_nodes = node_list(arguments.startup_nodes)
    end
    require "dogpile.backends.redis_cluster" -- registers the C backend
    local backend = require("dogpile.cache.backends.c").open(NAME, rest)
    -- The region's waits end with the lock's expiry in Redis.
    backend.lock_timeout = lib.C.dp_backend_lock_timeout(backend.handle)
    if not distributed then
        -- The region's own lock: callers in this Lua state only.
        backend.get_mutex = nil
    end
    return backend
end

--- A backend on the cluster (the region calls it from `configure`).
-- @function new
-- @tparam[opt] table arguments the arguments listed above (default {}: each at its default)
-- @treturn table the backend
return { new = new }
