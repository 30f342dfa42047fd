--- ProxyBackend: wraps a backend; every method forwards to self.proxied.
-- `ProxyBackend:extend{get = function(self, key) ... end}` makes a class,
-- `Class.new()` an instance; regions use them through configure's `wrap`.
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"

local setmetatable, getmetatable, pairs, type, select = setmetatable, getmetatable, pairs, type, select
local NO_VALUE = api.NO_VALUE

lib.own_source()

local _M = {}

-- -- Multi operations for backends that only have the single ones ---------------

function _M.get_multi(backend, keys)
    if backend.get_multi then
        return backend:get_multi(keys)
    end
    local out = {}
    for i = 1, #keys do
        local v = backend:get(keys[i])
        if v == nil then
            v = NO_VALUE
        end
        out[i] = v
    end
    return out
end

function _M.set_multi(backend, mapping)
    if backend.set_multi then
        return backend:set_multi(mapping)
    end
    for k, v in pairs(mapping) do
        backend:set(k, v)
    end
end

function _M.delete_multi(backend, keys)
    if backend.delete_multi then
        return backend:delete_multi(keys)
    end
    for i = 1, #keys do
        backend:delete(keys[i])
    end
end

-- -- ProxyBackend -------------------------------------------------------------

local ProxyBackend = { __is_proxy_class = true }
ProxyBackend.__index = ProxyBackend
_M.ProxyBackend = ProxyBackend

local function make_new(cls)
    return function(...)
        local obj = setmetatable({}, cls)
        if cls.init then
            -- Accept Class.new(...) and Class:new(...) alike.
            if select("#", ...) > 0 and (...) == cls then
                obj:init(select(2, ...))
            else
                obj:init(...)
            end
        end
        return obj
    end
end

ProxyBackend.new = make_new(ProxyBackend)

--- A new proxy class whose methods are `methods`, inheriting the rest.
-- @tparam table methods backend methods (get, set, ...) to override; the others forward to `self.proxied`
-- @treturn table the class: `cls.new()` makes an instance to give to configure's `wrap`
function ProxyBackend:extend(methods)
    if methods ~= nil and type(methods) ~= "table" then
        lib.raise("dogpile.cache: ProxyBackend:extend expects a table of methods, got " .. type(methods))
    end
    local cls = { __is_proxy_class = true }
    for k, v in pairs(methods or {}) do
        cls[k] = v
    end
    cls.__index = cls
    cls.new = make_new(cls)
    return setmetatable(cls, { __index = self })
end

--- True for a proxy class (made by extend) and false for an instance.
-- @tparam any x any value
-- @treturn boolean
function _M.is_class(x)
    return type(x) == "table" and rawget(x, "__is_proxy_class") == true
end

--- True for an instance of any proxy class.
-- @tparam any x any value
-- @treturn boolean
function _M.is_instance(x)
    if type(x) ~= "table" or rawget(x, "__is_proxy_class") then
        return false
    end
    local mt = getmetatable(x)
    return type(mt) == "table" and rawget(mt, "__is_proxy_class") == true
end

function ProxyBackend:wrap(backend)
    self.proxied = backend
    return self
end

function ProxyBackend:get(key)
    return self.proxied:get(key)
end

function ProxyBackend:set(key, value)
    return self.proxied:set(key, value)
end

function ProxyBackend:delete(key)
    return self.proxied:delete(key)
end

function ProxyBackend:get_multi(keys)
    return _M.get_multi(self.proxied, keys)
end

function ProxyBackend:set_multi(mapping)
    return _M.set_multi(self.proxied, mapping)
end

function ProxyBackend:delete_multi(keys)
    return _M.delete_multi(self.proxied, keys)
end

function ProxyBackend:get_mutex(key)
    local p = self.proxied
    if p.get_mutex then
        return p:get_mutex(key)
    end
    return nil
end

function ProxyBackend:stats()
    local p = self.proxied
    if p.stats then
        return p:stats()
    end
    return nil
end

return _M
