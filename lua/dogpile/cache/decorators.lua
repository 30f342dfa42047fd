--- Decorators: `region:cache_on_arguments(opts)` and
-- `region:cache_multi_on_arguments(opts)` make callables that cache a
-- function's results in the region, keyed by its arguments.
local lib = require "dogpile.lib"
local dogpile = require "dogpile"
local api = require "dogpile.cache.api"
local options = require "dogpile.cache.options"
local create = require "dogpile.cache.create"

local is_callable = dogpile.is_callable
local finite = options.finite
local NO_VALUE = api.NO_VALUE
local outcome, FAILED = create.outcome, create.FAILED
local type, pairs, select, setmetatable, unpack, tostring, rawequal, error, pcall =
      type, pairs, select, setmetatable, unpack, tostring, rawequal, error, pcall

lib.own_source()

local _M = {}

local function pack(...)
    return { n = select("#", ...), ... }
end

local Cached = {}
Cached.__index = Cached

-- An expiration_time function is called on every call; what it returns is
-- checked as the option would have been.
local function expiration(self, who)
    local exp = self._exp
    if self._exp_fn then
        exp = exp()
        if exp ~= nil and not finite(exp) then
            self._region:_raise("dogpile.cache: " .. who .. ": the expiration_time function returned "
                  .. (type(exp) == "number" and tostring(exp) or ("a " .. type(exp)))
                  .. "; it must return a finite number of seconds (-1: never expires) or nil")
        end
    end
    return exp
end

Cached.__call = function(self, ...)
    local key = self._keygen(...)
    local exp = expiration(self, "cache_on_arguments")
    return self._region:get_or_create(key, self.original, exp, self._should_cache, pack(...))
end

function Cached:invalidate(...)
    self._region:delete(self._keygen(...))
end

function Cached:set(value, ...)
    self._region:set(self._keygen(...), value)
end

function Cached:get(...)
    return self._region:get(self._keygen(...))
end

--- Call the function and store what it returns, as the creator's result
-- would be (`value, expiration_time`; `nil, err` raises err, storing nothing).
function Cached:refresh(...)
    local region = self._region
    local value, second = self.original(...)
    -- outcome's own checks of what the function returned, named as the
    -- region's (the function's own error, below, propagates unchanged).
    local ok, ttl
    ok, value, ttl = pcall(outcome, region, value, second, "cache_on_arguments: refresh")
    if not ok then
        region:_reraise(value)
    end
    if rawequal(value, FAILED) then
        error(ttl, 0)
    end
    region:set(self._keygen(...), value, ttl)
    return value
end

--- `region:cache_on_arguments(opts)` -> decorator (region.lua's method).
function _M.cache_on_arguments(self, opts)
    opts = options.check("cache_on_arguments", opts, options.DECORATOR_OPTS, self:_label())
    local keygen_factory = opts.function_key_generator or self.function_key_generator
    return function(fn)
        if not is_callable(fn) then
            self:_raise("dogpile.cache: cache_on_arguments: can only decorate a function, got "
                        .. type(fn))
        end
        return setmetatable({
            original = fn,
            _region = self,
            _keygen = keygen_factory(opts.namespace, fn, opts.to_str),
            _exp = opts.expiration_time,
            _exp_fn = is_callable(opts.expiration_time),
            _should_cache = opts.should_cache_fn,
        }, Cached)
    end
end

local CachedMulti = {}
CachedMulti.__index = CachedMulti

CachedMulti.__call = function(self, ...)
    local n = select("#", ...)
    local args = { ... }
    local keys = self._keygen(...)
    local by_key = {}
    for i = 1, n do
        by_key[keys[i]] = args[i]
    end
    local fn = self.original
    local function creator(...)
        local m = select("#", ...)
        local a = { ... }
        for i = 1, m do
            a[i] = by_key[a[i]]
        end
        return fn(unpack(a, 1, m))
    end
    local exp = expiration(self, "cache_multi_on_arguments")
    local region = self._region
    if not self._asdict then
        return region:get_or_create_multi(keys, creator, exp, self._should_cache)
    end
    local should_cache = self._should_cache
    local function dict_create(...)
        local m = select("#", ...)
        local d, second = creator(...)
        if d == nil and type(second) == "string" then
            return nil, second -- the function failed: get_or_create_multi raises it
        end
        if type(d) ~= "table" then
            region:_raise("dogpile.cache: cache_multi_on_arguments (asdict): the function must return "
                  .. "a table keyed by argument, got " .. type(d))
        end
        local out = {}
        for i = 1, m do
            local v = d[by_key[(select(i, ...))]]
            if v == nil then
                v = NO_VALUE
            end
            out[i] = v
        end
        return out, second
    end
    local function cache_fn(v)
        if v == NO_VALUE then
            return false
        end
        return not should_cache or should_cache(v)
    end
    local res = region:get_or_create_multi(keys, dict_create, exp, cache_fn)
    local out = {}
    for i = 1, n do
        local v = res[i]
        if v ~= NO_VALUE and args[i] ~= nil then
            out[args[i]] = v
        end
    end
    return out
end

function CachedMulti:invalidate(...)
    self._region:delete_multi(self._keygen(...))
end

function CachedMulti:set(mapping)
    if type(mapping) ~= "table" then
        self._region:_raise("dogpile.cache: cache_multi_on_arguments: set: mapping must be a table "
                            .. "{argument = value}, got " .. type(mapping))
    end
    local args = {}
    for k in pairs(mapping) do
        args[#args + 1] = k
    end
    local keys = self._keygen(unpack(args))
    local out = {}
    for i = 1, #args do
        out[keys[i]] = mapping[args[i]]
    end
    self._region:set_multi(out)
end

function CachedMulti:get(...)
    return self._region:get_multi(self._keygen(...))
end

function CachedMulti:refresh(...)
    local n = select("#", ...)
    local args = { ... }
    local keys = self._keygen(...)
    local values, err = self.original(...)
    if values == nil and type(err) == "string" then
        error(err, 0)
    end
    if type(values) ~= "table" then
        self._region:_raise("dogpile.cache: cache_multi_on_arguments: the function must return a "
                            .. "table, got " .. type(values))
    end
    local ks, vs, m = {}, {}, 0
    for i = 1, n do
        local v
        if self._asdict then
            if args[i] ~= nil then
                v = values[args[i]]
            end
            -- As in the call: an argument absent from the result is not cached.
            if v == nil then
                goto continue
            end
        else
            v = values[i]
        end
        m = m + 1
        ks[m], vs[m] = keys[i], v
        ::continue::
    end
    self._region:_set_pairs(ks, vs, m)
    return values
end

--- `region:cache_multi_on_arguments(opts)` -> decorator (region.lua's method).
function _M.cache_multi_on_arguments(self, opts)
    opts = options.check("cache_multi_on_arguments", opts, options.MULTI_DECORATOR_OPTS,
                         self:_label())
    local keygen_factory = opts.function_multi_key_generator or self.function_multi_key_generator
    return function(fn)
        if not is_callable(fn) then
            self:_raise("dogpile.cache: cache_multi_on_arguments: can only decorate a function, "
                        .. "got " .. type(fn))
        end
        return setmetatable({
            original = fn,
            _region = self,
            _keygen = keygen_factory(opts.namespace, fn, opts.to_str),
            _exp = opts.expiration_time,
            _exp_fn = is_callable(opts.expiration_time),
            _should_cache = opts.should_cache_fn,
            _asdict = opts.asdict == true,
        }, CachedMulti)
    end
end

return _M
