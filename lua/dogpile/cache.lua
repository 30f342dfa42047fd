--- dogpile.cache: regions over pluggable backends, under the dogpile lock.
local lib = require "dogpile.lib"
local context = require "dogpile.context"
local api = require "dogpile.cache.api"
local region = require "dogpile.cache.region"
local options = require "dogpile.cache.options"

local raise = lib.raise
local type, pairs, ipairs, tostring, pcall, loadfile = type, pairs, ipairs, tostring, pcall, loadfile

lib.own_source()

local _M = {
    _VERSION = lib.version,
    NO_VALUE = api.NO_VALUE,
    CachedValue = api.CachedValue,
    VALUE_VERSION = api.VALUE_VERSION,
    make_region = region.make_region,
    register_backend = region.register_backend,
    DefaultInvalidationStrategy = region.DefaultInvalidationStrategy,
    CacheRegion = region.Region,
}

--- `cache.register_backend(name, module_name_or_factory)`: makes a backend
-- known to `region:configure` by name (the shipped ones are registered already).
-- @function register_backend
-- @tparam string name the name configure takes, such as "myapp.table"
-- @tparam string|function module_name_or_factory the name of a module that returns the factory, or
-- the factory itself: `factory(arguments)` returns the backend (see "Writing a backend in Lua")
-- @raise when name is not a string, or the second argument neither a string nor callable

--- Where fail_open failures and undecodable values are reported: a
-- function(message). Defaults to ngx.log(ngx.WARN) in nginx, stderr elsewhere.
-- @tparam function fn called with one string per message
function _M.set_logger(fn)
    if type(fn) ~= "function" then
        raise("dogpile.cache: set_logger expects a function(message), got " .. type(fn))
    end
    context.set_logger(fn)
end

--- `cache.load_regions(path_or_table)` -> {name = region}. Each entry names
-- a backend and any option of make_region or configure.
-- @raise on a file that does not load, or a region that does not configure
-- Values are taken as given: a string is not coerced (expiration_time = "60"
-- is refused, as configure refuses it); every error names the region.
-- @tparam string|table source a Lua file returning `{name = {backend = NAME, ...}}`, or that table
-- @treturn table `{name = region}`, each configured
function _M.load_regions(source)
    local where, conf
    if type(source) == "string" then
        where = "'" .. source .. "'"
        local chunk, err = loadfile(source)
        if not chunk then
            raise("dogpile.cache: load_regions: cannot load " .. where .. ": " .. tostring(err))
        end
        local ok, res = pcall(chunk)
        if not ok then
            raise("dogpile.cache: load_regions: " .. where .. " raised: " .. tostring(res))
        end
        conf = res
    elseif type(source) == "table" then
        where, conf = "the given table", source
    else
        raise("dogpile.cache: load_regions expects a file path or a table, got " .. type(source))
    end
    if type(conf) ~= "table" then
        raise("dogpile.cache: load_regions: " .. where .. " must return a table of regions, got "
              .. type(conf))
    end
    local regions = {}
    for name, spec in pairs(conf) do
        if type(name) ~= "string" or type(spec) ~= "table" then
            raise("dogpile.cache: load_regions: in " .. where .. ", each entry must be "
                  .. "name = {backend = ..., ...}; got " .. type(name) .. " = " .. type(spec))
        end
        local make_opts, conf_opts = { name = name }, {}
        local backend
        local in_region = "dogpile.cache: load_regions: region '" .. name .. "' in " .. where .. ": "
        for k, v in pairs(spec) do
            if k == "backend" then
                backend = v
            elseif k == "name" then
                make_opts.name = v
            elseif region.MAKE_OPTS[k] then
                make_opts[k] = v
            elseif region.CONFIGURE_OPTS[k] then
                conf_opts[k] = v
            else
                local known = { backend = true, name = true }
                for o in pairs(region.MAKE_OPTS) do known[o] = true end
                for o in pairs(region.CONFIGURE_OPTS) do known[o] = true end
                raise(in_region .. "unknown option '" .. tostring(k) .. "' (known: "
                      .. options.known(known) .. ")")
            end
        end
        if type(backend) ~= "string" then
            raise(in_region .. "backend must be a backend name, got " .. options.show(backend))
        end
        -- No string is coerced here (options.lua says why): expiration_time =
        -- "60" is refused as configure refuses it. Errors of make_region,
        -- configure and the backend are raised again naming this region.
        local ok, res = pcall(function()
            return region.make_region(make_opts):configure(backend, conf_opts)
        end)
        if not ok then
            local msg = tostring(res)
            -- The position raise() put in front (the caller's line, ours now).
            msg = msg:gsub("^[^\n]-:%d+: ", "", 1)
            if msg:sub(1, 15) == "dogpile.cache: " then
                msg = msg:sub(16)
            end
            -- in_region names the region already: not twice.
            msg = msg:gsub(" %(region '" .. tostring(make_opts.name):gsub("%p", "%%%0") .. "'%)$", "", 1)
            raise(in_region .. msg)
        end
        regions[name] = res
    end
    return regions
end

-- -- Metrics -------------------------------------------------------------------
-- dogpile.cache.metrics: counters and latency histograms of every region, in
-- the Prometheus text format; inside nginx, every worker's (see there).

local metrics = require "dogpile.cache.metrics"

--- `cache.metrics(opts)` -> string: every configured region's counters
-- (region:stats()) and latency histograms in the Prometheus text exposition
-- format, labelled by region name ("(unnamed N)" for an unnamed one, " (N)"
-- appended to a name used twice). Inside nginx, with `opts.dict` (a
-- lua_shared_dict): the sum over every worker, or with `opts.per_worker`
-- each worker's series labelled worker="N"; without: this worker's, each
-- labelled worker="N".
-- @tparam[opt] table opts `{dict = NAME, per_worker = false}`; defaults to
-- metrics_sync's
-- @raise on a dict that does not exist, or `dict` outside nginx
_M.metrics = metrics.metrics

--- `cache.metrics_sync(opts)`: in init_worker_by_lua, push this worker's
-- counters to the lua_shared_dict `opts.dict` every `opts.interval` seconds
-- (default 1), so that a scrape answered by any worker sums them all.
-- @tparam table opts `{dict = NAME, interval = 1, per_worker = false}`
-- @raise outside nginx, or on a dict that does not exist
_M.metrics_sync = metrics.metrics_sync

return _M
