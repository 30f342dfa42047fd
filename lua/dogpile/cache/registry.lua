--- The backend registry: names to backend modules or factories
-- (`cache.register_backend`), and the loader `configure` calls.
local lib = require "dogpile.lib"
local dogpile = require "dogpile"

local C = lib.C
local raise = lib.raise
local is_callable = dogpile.is_callable
local type, pairs, tostring, pcall, require = type, pairs, tostring, pcall, require
local sort, concat = table.sort, table.concat

lib.own_source()

local _M = {}

-- The backends shipped: name -> module.
local BACKENDS = {
    ["dogpile.cache.memory"] = "dogpile.cache.backends.memory",
    ["dogpile.cache.null"] = "dogpile.cache.backends.null",
    ["dogpile.cache.shared_memory"] = "dogpile.cache.backends.shared_memory",
    ["dogpile.cache.lmdb"] = "dogpile.cache.backends.lmdb",
    ["dogpile.cache.redis"] = "dogpile.cache.backends.redis",
    ["dogpile.cache.redis_sentinel"] = "dogpile.cache.backends.redis_sentinel",
    ["dogpile.cache.redis_cluster"] = "dogpile.cache.backends.redis_cluster",
    ["dogpile.cache.ngx_shared"] = "dogpile.cache.backends.ngx_shared",
    ["dogpile.cache.memcached"] = "dogpile.cache.backends.memcached",
    ["dogpile.cache.tiered"] = "dogpile.cache.backends.tiered",
}

--- `cache.register_backend(name, module_name_or_factory)`.
function _M.register_backend(name, module_or_factory)
    if type(name) ~= "string" then
        raise("dogpile.cache: register_backend: name must be a string, got " .. type(name))
    end
    if type(module_or_factory) ~= "string" and not is_callable(module_or_factory) then
        raise("dogpile.cache: register_backend: expected a module name or a factory "
              .. "function(arguments), got " .. type(module_or_factory))
    end
    BACKENDS[name] = module_or_factory
end

local function registered_names()
    local names = {}
    for k in pairs(BACKENDS) do
        names[#names + 1] = k
    end
    sort(names)
    return concat(names, ", ")
end

--- A new backend object for `name`, made from `arguments`.
function _M.load_backend(name, arguments)
    local factory = BACKENDS[name]
    if factory == nil and C.dp_backend_find(name) ~= nil then
        -- A C backend the host registered with dp_backend_register().
        return require("dogpile.cache.backends.c").open(name, arguments)
    end
    local plugin = false
    if factory == nil then
        -- A plugin: a backend installed as a rock is found by its module
        -- name, as dogpile.cache finds plugins by entry points.
        local ok, mod = pcall(require, name)
        if ok then
            factory, plugin = mod, true
        elseif type(mod) == "string" and mod:find("module '" .. name .. "' not found", 1, true) then
            raise("dogpile.cache: unknown backend '" .. name .. "'; registered backends: "
                  .. registered_names() .. " (cache.register_backend adds one), and no Lua "
                  .. "module '" .. name .. "' was found either")
        else
            raise("dogpile.cache: backend '" .. name .. "': loading module '" .. name
                  .. "' failed: " .. tostring(mod))
        end
    end
    if type(factory) == "string" or plugin then
        local mod = factory
        if not plugin then
            local ok
            ok, mod = pcall(require, factory)
            if not ok then
                raise("dogpile.cache: backend '" .. name .. "': cannot load module '" .. factory
                      .. "': " .. tostring(mod))
            end
        else
            factory = name
        end
        if type(mod) == "table" and is_callable(mod.new) then
            factory = mod.new
        elseif is_callable(mod) then
            factory = mod
        else
            raise("dogpile.cache: backend '" .. name .. "': module '" .. factory
                  .. "' returned neither a factory nor a table with .new(arguments)")
        end
    end
    local backend = factory(arguments)
    if (type(backend) ~= "table" and type(backend) ~= "userdata") or not is_callable(backend.get)
        or not is_callable(backend.set) or not is_callable(backend.delete) then
        raise("dogpile.cache: backend '" .. name .. "': the factory returned a " .. type(backend)
              .. ", not an object with get, set and delete methods")
    end
    return backend
end

return _M
