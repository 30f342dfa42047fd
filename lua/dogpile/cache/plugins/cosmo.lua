--- Rendered-template caching for Cosmo (Debian: lua-cosmo), the part
-- dogpile.cache's Mako plugin plays for Mako: a template's output is cached
-- in a region under a key the caller names, and rendered only on a miss,
-- under the dogpile lock (one render per key however many callers wait).
--
--     local cosmo_cache = require "dogpile.cache.plugins.cosmo"
--     local pages = cosmo_cache.new(region, { namespace = "page", expiration_time = 60 })
--     local html = pages:fill("user:" .. id, "<h1>$name</h1>", { name = user.name })
--     pages:invalidate("user:" .. id)
--
-- Cosmo itself keeps each compiled template (cosmo.compile memoizes by
-- source), so only the rendered output goes to the region: a string, which
-- every backend stores.
local lib = require "dogpile.lib"
local cosmo = require "cosmo"

local raise = lib.raise
local type, tostring, setmetatable = type, tostring, setmetatable

lib.own_source()

local _M = { _VERSION = lib.version }

local TemplateCache = {}
TemplateCache.__index = TemplateCache

--- `new(region, opts)`: `opts` (optional): `namespace` (key prefix, default
-- "cosmo"), `expiration_time` (seconds; default: the region's).
-- @raise on a region that is not one, or bad options
-- @tparam table region a configured region
-- @tparam[opt] table opts `{namespace = "cosmo", expiration_time = nil}` (default: those)
-- @treturn table the template cache
function _M.new(region, opts)
    if type(region) ~= "table" or type(region.get_or_create) ~= "function" then
        raise("dogpile.cache.plugins.cosmo: new expects a cache region, got " .. type(region))
    end
    opts = opts or {}
    if type(opts) ~= "table" then
        raise("dogpile.cache.plugins.cosmo: options must be a table, got " .. type(opts))
    end
    if opts.namespace ~= nil and type(opts.namespace) ~= "string" then
        raise("dogpile.cache.plugins.cosmo: namespace must be a string, got "
              .. type(opts.namespace))
    end
    if opts.expiration_time ~= nil and type(opts.expiration_time) ~= "number" then
        raise("dogpile.cache.plugins.cosmo: expiration_time must be a number, got "
              .. type(opts.expiration_time))
    end
    return setmetatable({
        region = region,
        prefix = (opts.namespace or "cosmo") .. ":",
        expiration_time = opts.expiration_time,
    }, TemplateCache)
end

--- `tc:fill(key, template, env, expiration_time)` -> the rendered string:
-- cosmo.fill(template, env), cached under `key` (with the namespace).
-- @raise on a key that is not a string; Cosmo's errors propagate unchanged
-- @tparam string key names the output
-- @tparam string template Cosmo template
-- @tparam[opt] table env its values (default {})
-- @tparam[opt] number expiration_time seconds (default: the cache's, else the region's)
-- @treturn string the rendered output
function TemplateCache:fill(key, template, env, expiration_time)
    if type(key) ~= "string" then
        raise("dogpile.cache.plugins.cosmo: fill: key must be a string, got " .. type(key))
    end
    if type(template) ~= "string" then
        raise("dogpile.cache.plugins.cosmo: fill: template must be a string, got "
              .. type(template))
    end
    return self.region:get_or_create(self.prefix .. key, function()
        return tostring(cosmo.fill(template, env or {}))
    end, expiration_time or self.expiration_time)
end

--- `tc:get(key)` -> the cached output, or cache.NO_VALUE.
-- @tparam string key names the output
-- @return the output, or cache.NO_VALUE
function TemplateCache:get(key)
    return self.region:get(self.prefix .. key, self.expiration_time)
end

--- `tc:invalidate(key)`: drop the cached output of `key`.
-- @tparam string key names the output
function TemplateCache:invalidate(key)
    self.region:delete(self.prefix .. key)
end

return _M
