--- cache.metrics(): the regions' counters and latency histograms in the
-- Prometheus text exposition format (0.0.4), for one Lua state or, inside
-- nginx, for every worker.
--
-- Inside nginx each worker is its own Lua state with its own counters. A
-- scrape lands on any worker, so a worker's own numbers alone would go
-- backwards from one scrape to the next. Two answers, chosen by `opts`:
--   * with `dict` (a lua_shared_dict): every worker adds what its counters
--     grew by since its last push to keys of its own in the dict
--     (dict:incr, as nginx-lua-prometheus does), at each scrape it answers
--     and every `interval` seconds from a timer (metrics_sync, started in
--     init_worker_by_lua). The scrape reads the dict: the sum over the
--     workers, or with `per_worker`, every worker's series labelled
--     worker="N". Sums only grow: a worker that restarts (reload, crash)
--     pushes from zero again onto what its predecessor left.
--   * without `dict`: this worker's series, each labelled worker="N", so
--     that no series is ever two workers' numbers in turn.
local latency = require "dogpile.cache.latency"

local type, pairs, ipairs, tostring, tonumber, rawget, setmetatable =
    type, pairs, ipairs, tostring, tonumber, rawget, setmetatable
local concat, sort, floor = table.concat, table.sort, math.floor

local _M = {}

-- One Prometheus counter family per region:stats() counter, in this order.
local COUNTERS = {
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
_M.COUNTERS = COUNTERS

local HISTOGRAMS = {
    get = { "dogpile_cache_get_seconds", "Latency of region lookups (get, get_or_create's "
            .. "read), sampled: about one lookup in " .. latency.SAMPLE_EVERY .. "." },
    create = { "dogpile_cache_create_seconds", "Time a creator function took to make a value." },
}

-- family name -> {order, type, help}
local FAMILIES = {}
for i, m in ipairs(COUNTERS) do
    FAMILIES["dogpile_cache_" .. m[1] .. "_total"] = { i, "counter", m[2] }
end
FAMILIES.dogpile_cache_tier_hits_total = { #COUNTERS + 1, "counter",
    "Hits served by each tier of a tiered region (1: nearest the caller)." }
for i, kind in ipairs(latency.KINDS) do
    local h = HISTOGRAMS[kind]
    FAMILIES[h[1]] = { #COUNTERS + 1 + i, "histogram", h[2] }
end

local function fmt_number(n)
    if n == floor(n) and n > -1e15 and n < 1e15 then
        return ("%d"):format(n)
    end
    return ("%.17g"):format(n)
end

local LE = {}
for i, b in ipairs(latency.BOUNDS) do
    LE[i] = ("%g"):format(b)
end
LE[#latency.BOUNDS + 1] = "+Inf"

-- Label values escape backslash, double quote and newline (text format 0.0.4).
local function escape_label(s)
    return (s:gsub("[\\\"\n]", { ["\\"] = "\\\\", ["\""] = "\\\"", ["\n"] = "\\n" }))
end

-- -- This Lua state's samples ---------------------------------------------------

-- Every configured region with its label: unnamed ones "(unnamed N)", a name
-- used twice gets " (N)", so that every series is unique.
local function labelled(regions)
    local out, seen, unnamed = {}, {}, 0
    for _, r in ipairs(regions) do
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
            out[#out + 1] = { region = r, label = escape_label(label) }
        end
    end
    return out
end

--- This Lua state's samples: an array of {region object, series text
-- (`name{labels}`), value}.
local function collect()
    local region = require "dogpile.cache.region"
    local out = {}
    for _, e in ipairs(labelled(region.regions())) do
        local st = e.region:stats()
        local lab = 'region="' .. e.label .. '"'
        for _, m in ipairs(COUNTERS) do
            out[#out + 1] = { e.region, "dogpile_cache_" .. m[1] .. "_total{" .. lab .. "}",
                              st[m[1]] or 0 }
        end
        local th = st.tier_hits
        if type(th) == "table" then
            for t = 1, #th do
                out[#out + 1] = { e.region, ('dogpile_cache_tier_hits_total{%s,tier="%d"}')
                                  :format(lab, t), th[t] or 0 }
            end
        end
        local hs = latency.of(e.region)
        for _, kind in ipairs(latency.KINDS) do
            local h = hs and hs[kind]
            if h then
                local name, cum = HISTOGRAMS[kind][1], 0
                for i, le in ipairs(LE) do
                    cum = cum + h.counts[i]
                    out[#out + 1] = { e.region, ('%s_bucket{%s,le="%s"}'):format(name, lab, le), cum }
                end
                out[#out + 1] = { e.region, name .. "_sum{" .. lab .. "}", h.sum }
                out[#out + 1] = { e.region, name .. "_count{" .. lab .. "}", h.count }
            end
        end
    end
    return out
end

-- -- Text ----------------------------------------------------------------------------

local SUFFIX_ORDER = { _bucket = 1, _sum = 2, _count = 3 }

-- The family of a series, and how it sorts inside the output.
local function family_of(series)
    local name, labels = series:match("^([%w_:]+){(.*)}$")
    if not name then
        name, labels = series, ""
    end
    local fam, sub = name, 0
    if not FAMILIES[name] then
        local base, suffix = name:match("^(.-)(_%a+)$")
        if base and FAMILIES[base] and SUFFIX_ORDER[suffix] then
            fam, sub = base, SUFFIX_ORDER[suffix]
        end
    end
    local le = labels:match(',le="([^"]*)"') or labels:match('^le="([^"]*)"')
    local rest = labels:gsub(',?le="[^"]*"', "")
    return fam, rest, sub, le == "+Inf" and math.huge or tonumber(le) or 0
end

--- The exposition text of `samples` ({series, value} pairs), grouped by
-- family with its HELP and TYPE lines, buckets in order of le.
local function render(samples)
    local rows = {}
    for _, s in ipairs(samples) do
        local fam, rest, sub, le = family_of(s[1])
        local f = FAMILIES[fam]
        rows[#rows + 1] = { f and f[1] or 1e9, fam, rest, sub, le, s[1], s[2] }
    end
    sort(rows, function(a, b)
        if a[1] ~= b[1] then return a[1] < b[1] end
        if a[2] ~= b[2] then return a[2] < b[2] end
        if a[3] ~= b[3] then return a[3] < b[3] end
        if a[4] ~= b[4] then return a[4] < b[4] end
        if a[5] ~= b[5] then return a[5] < b[5] end
        return a[6] < b[6]
    end)
    local out, last = {}, nil
    -- Every counter family is written, with no sample when no region has
    -- one, so that a scraper always sees the same families.
    local present = {}
    for _, r in ipairs(rows) do
        present[r[2]] = true
    end
    for _, m in ipairs(COUNTERS) do
        local fam = "dogpile_cache_" .. m[1] .. "_total"
        if not present[fam] then
            out[#out + 1] = "# HELP " .. fam .. " " .. FAMILIES[fam][3]
            out[#out + 1] = "# TYPE " .. fam .. " counter"
        end
    end
    local i = 1
    while i <= #rows do
        local r = rows[i]
        if r[2] ~= last then
            last = r[2]
            local f = FAMILIES[last]
            if f then
                out[#out + 1] = "# HELP " .. last .. " " .. f[3]
                out[#out + 1] = "# TYPE " .. last .. " " .. f[2]
            end
        end
        out[#out + 1] = r[6] .. " " .. fmt_number(r[7])
        i = i + 1
    end
    return concat(out, "\n") .. "\n"
end

-- `series` with the label worker="id" added last.
local function with_worker(series, id)
    local lab = 'worker="' .. id .. '"'
    if series:sub(-1) == "}" then
        return series:sub(1, -2) .. "," .. lab .. "}"
    end
    return series .. "{" .. lab .. "}"
end

-- -- Inside nginx: pushing to a shared dict ---------------------------------------------

-- region -> {series -> value last pushed}: what this worker already added.
local PUSHED = setmetatable({}, { __mode = "k" })

local function ngx_worker()
    local ngx = rawget(_G, "ngx")
    if type(ngx) == "table" and type(ngx.worker) == "table" and ngx.worker.id then
        return ngx, ngx.worker.id()
    end
    return nil
end

local function shared_dict(name)
    local ngx = ngx_worker()
    if not ngx then
        error("dogpile.cache: metrics: dict works inside nginx only (a lua_shared_dict)", 3)
    end
    local dict = ngx.shared[name]
    if not dict then
        error("dogpile.cache: metrics: no lua_shared_dict named '" .. tostring(name)
              .. "' (declare it in nginx.conf: lua_shared_dict " .. tostring(name) .. " 1m;)", 3)
    end
    return dict
end

--- Add to `dict` what this worker's counters grew by since its last push.
-- nil, err when the dict refused (full): the rest is pushed next time.
local function push(dict)
    local _, wid = ngx_worker()
    local prefix = "w" .. tostring(wid or "?") .. "|"
    local failed
    for _, s in ipairs(collect()) do
        local r, series, v = s[1], s[2], s[3]
        local last = PUSHED[r]
        if last == nil then
            last = {}
            PUSHED[r] = last
        end
        local prev = last[series]
        local delta
        if prev == nil then
            delta = v
        elseif v < prev then
            delta = v -- the region was configured again: its counters restarted
        else
            delta = v - prev
        end
        if delta > 0 or prev == nil then
            local ok, err = dict:incr(prefix .. series, delta, 0)
            if ok then
                last[series] = v
            else
                failed = err
            end
        end
    end
    if failed then
        return nil, failed
    end
    return true
end
_M.push = push

--- The dict's samples: summed over workers, or per worker with a worker label.
local function read_dict(dict, per_worker)
    local sums, order = {}, {}
    for _, key in ipairs(dict:get_keys(0)) do
        local wid, series = key:match("^w([^|]*)|(.*)$")
        local v = wid and dict:get(key)
        if type(v) == "number" then
            local s = per_worker and with_worker(series, wid) or series
            if sums[s] == nil then
                order[#order + 1] = s
                sums[s] = 0
            end
            sums[s] = sums[s] + v
        end
    end
    local out = {}
    for i, s in ipairs(order) do
        out[i] = { s, sums[s] }
    end
    return out
end

-- -- The API ---------------------------------------------------------------------------

local synced -- metrics_sync's options, the default of metrics()

--- `cache.metrics(opts)` -> string (see the module's head). `opts`
-- (optional): `dict` (a lua_shared_dict's name: every worker's counters),
-- `per_worker` (with `dict`: one series per worker, labelled worker="N",
-- instead of their sum). Defaults to what metrics_sync was given.
-- @raise on a dict that does not exist, or outside nginx
function _M.metrics(opts)
    if opts ~= nil and type(opts) ~= "table" then
        error("dogpile.cache: metrics expects nil or a table {dict =, per_worker =}, got "
              .. type(opts), 2)
    end
    opts = opts or synced or {}
    if opts.dict ~= nil then
        local dict = shared_dict(opts.dict)
        push(dict) -- a full dict still answers with what it has
        return render(read_dict(dict, opts.per_worker))
    end
    local samples = {}
    local _, wid = ngx_worker()
    for i, s in ipairs(collect()) do
        samples[i] = { wid and with_worker(s[2], wid) or s[2], s[3] }
    end
    return render(samples)
end

--- `cache.metrics_sync(opts)`: call in init_worker_by_lua. Every
-- `opts.interval` seconds (default 1) this worker pushes its counters to
-- the lua_shared_dict `opts.dict`; metrics() then defaults to `opts`.
-- @raise outside nginx, on a dict that does not exist or a bad interval
function _M.metrics_sync(opts)
    if type(opts) ~= "table" or type(opts.dict) ~= "string" then
        error("dogpile.cache: metrics_sync expects {dict = NAME, interval = SECONDS, "
              .. "per_worker = BOOLEAN}", 2)
    end
    local interval = opts.interval or 1
    if type(interval) ~= "number" or not (interval > 0) or interval == math.huge then
        error("dogpile.cache: metrics_sync: interval must be a positive number of seconds, got "
              .. tostring(interval), 2)
    end
    local dict = shared_dict(opts.dict)
    local ngx = ngx_worker()
    local ok, err = ngx.timer.every(interval, function(premature)
        if not premature then
            push(dict)
        end
    end)
    if not ok then
        error("dogpile.cache: metrics_sync: cannot start the timer: " .. tostring(err), 2)
    end
    synced = { dict = opts.dict, per_worker = opts.per_worker }
    return true
end

return _M
