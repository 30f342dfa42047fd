--- dogpile.cache: regions over pluggable backends, under the dogpile lock.
local lib = require "dogpile.lib"
local context = require "dogpile.context"
local api = require "dogpile.cache.api"
local region = require "dogpile.cache.region"
local util = require "dogpile.cache.util"

local raise = lib.raise
local type, pairs, ipairs, tostring, pcall, loadfile = type, pairs, ipairs, tostring, pcall, loadfile
local rawget, concat, floor = rawget, table.concat, math.floor

local function fmt_number(n)
    if n == floor(n) and n > -1e15 and n < 1e15 then
        return ("%d"):format(n)
    end
    return tostring(n)
end

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

--- Where fail_open failures and undecodable values are reported: a
-- function(message). Defaults to ngx.log(ngx.WARN) in nginx, stderr elsewhere.
function _M.set_logger(fn)
    if type(fn) ~= "function" then
        raise("dogpile.cache: set_logger expects a function(message), got " .. type(fn))
    end
    context.set_logger(fn)
end

--- `cache.load_regions(path_or_table)` -> {name = region}. Each entry names
-- a backend and any option of make_region or configure.
-- @raise on a file that does not load, or a region that does not configure
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
                raise("dogpile.cache: load_regions: region '" .. name .. "' in " .. where
                      .. ": unknown option '" .. tostring(k) .. "'")
            end
        end
        if type(backend) ~= "string" then
            raise("dogpile.cache: load_regions: region '" .. name .. "' in " .. where
                  .. ": backend must be a backend name, got " .. type(backend))
        end
        if type(conf_opts.expiration_time) == "string" then
            conf_opts.expiration_time = util.coerce_string(conf_opts.expiration_time)
        end
        regions[name] = region.make_region(make_opts):configure(backend, conf_opts)
    end
    return regions
end

-- -- Metrics -------------------------------------------------------------------

-- One Prometheus counter family per region:stats() counter, in this order.
local METRICS = {
    { "hits", "Cache hits: a fresh value returned from the backend." },
    { "misses", "Cache misses: no usable value in the backend." },
    { "creations", "Values created by a creator function." },
    { "stale_served", "Expired values served while another caller regenerates." },
    { "lock_waits", "Callers that waited for another caller's creator." },
    { "errors", "Backend failures and undecodable values." },
    { "evictions", "Values the backend evicted, where it reports them." },
    { "lock_overruns", "Creations that outlived a distributed lock's timeout." },
    { "stale_on_error", "Expired values served because the creator failed (stale_if_error)." },
    { "early_refreshes", "Fresh values regenerated early (early_refresh)." },
    { "front_hits", "Hits served by the nearest tier of a tiered region." },
    { "circuit_opened", "Times the backend's circuit breaker opened (networked C backends)." },
    { "circuit_refused", "Calls the open circuit breaker refused without asking the server." },
}

-- Label values escape backslash, double quote and newline (text format 0.0.4).
local function escape_label(s)
    return (s:gsub("[\\\"\n]", { ["\\"] = "\\\\", ["\""] = "\\\"", ["\n"] = "\\n" }))
end

--- `cache.metrics()` -> string: every configured region's counters (this Lua
-- state's) in the Prometheus text exposition format, one counter family per
-- stats() field, labelled by region name. Unnamed regions are labelled
-- "(unnamed N)", and a name used twice gets " (N)" appended, so that every
-- series is unique.
function _M.metrics()
    local labels, stats = {}, {}
    local seen, unnamed = {}, 0
    for _, r in ipairs(region.regions()) do
        if rawget(r, "is_configured") then
            local name = rawget(r, "name")
            local label
            if name == nil then
                unnamed = unnamed + 1
                label = "(unnamed " .. unnamed .. ")"
            else
                label = tostring(name)
            end
            local base, n = label, 1
            while seen[label] do
                n = n + 1
                label = base .. " (" .. n .. ")"
            end
            seen[label] = true
            labels[#labels + 1] = escape_label(label)
            stats[#stats + 1] = r:stats()
        end
    end
    local out = {}
    for _, m in ipairs(METRICS) do
        local family = "dogpile_cache_" .. m[1] .. "_total"
        out[#out + 1] = "# HELP " .. family .. " " .. m[2]
        out[#out + 1] = "# TYPE " .. family .. " counter"
        for i = 1, #labels do
            out[#out + 1] = ("%s{region=\"%s\"} %s"):format(family, labels[i],
                                                           fmt_number(stats[i][m[1]] or 0))
        end
    end
    -- Tiered regions: hits per tier, the tier numbered from 1 (nearest).
    local tiered = false
    for i = 1, #labels do
        local th = stats[i].tier_hits
        if type(th) == "table" then
            if not tiered then
                tiered = true
                out[#out + 1] = "# HELP dogpile_cache_tier_hits_total Hits served by each tier of a tiered region (1: nearest the caller)."
                out[#out + 1] = "# TYPE dogpile_cache_tier_hits_total counter"
            end
            for t = 1, #th do
                out[#out + 1] = ("dogpile_cache_tier_hits_total{region=\"%s\",tier=\"%d\"} %s")
                    :format(labels[i], t, fmt_number(th[t] or 0))
            end
        end
    end
    return concat(out, "\n") .. "\n"
end

return _M
