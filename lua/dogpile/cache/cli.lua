--- dogpile-cache, the operator's command line: inspect and manage the regions
-- of a regions config file (the file cache.load_regions reads).
--
-- `main(argv, out, err)` runs one command and returns the exit status:
-- 0 ok, 1 error (message on `err`, starting "dogpile-cache: "), 2 no value
-- for the key (`get`, `inspect`). `out` and `err` are functions(string);
-- they default to io.stdout and io.stderr. The launcher (lua/bin/dogpile-cache,
-- installed as PREFIX/bin/dogpile-cache) calls it with the script's `arg`.
local lib = require "dogpile.lib"

local C = lib.C
local type, pairs, ipairs, tostring, tonumber, pcall, loadfile, select =
    type, pairs, ipairs, tostring, tonumber, pcall, loadfile, select
local concat, sort, floor = table.concat, table.sort, math.floor
local fmt = string.format

local _M = { _VERSION = lib.version }

local PROG = "dogpile-cache"

-- -- Help ----------------------------------------------------------------------

local USAGE = [[
Usage: dogpile-cache [--config FILE] COMMAND [ARGS]

Inspect and manage the cache regions of a regions config file: a Lua file
returning {name = {backend = ..., expiration_time = ..., arguments = {...}}},
as read by cache.load_regions(). FILE defaults to $DOGPILE_CACHE_CONFIG.

Commands:
  list                        the regions, their backends and expiration times
  get REGION KEY              print the value (as the application would get it)
  inspect REGION KEY          value, created time, age, expired or not
  delete REGION KEY           delete a key
  invalidate REGION [--soft]  invalidate a region (see its --help: per process!)
  stats [REGION]              counters of the regions and of their backends
  bench REGION [--n N]        hit and miss latency of a region

Options:
  --config FILE   the regions config file
  -h, --help      this help; `dogpile-cache COMMAND --help` for a command's

Exit status: 0 ok, 1 error (message on stderr), 2 no value for the key.
]]

local HELP = {
    list = [[
Usage: dogpile-cache [--config FILE] list

Prints one line per region of the config file: its name, backend and
expiration time. Nothing is opened or connected.
]],
    get = [[
Usage: dogpile-cache [--config FILE] get REGION KEY

Prints the value stored under KEY (the key as the application passes it to
region:get; the region's key_mangler applies), as region:get would return it:
an expired or invalidated value counts as no value. Values are printed as Lua
literals. Exit status 2 when there is no value (`inspect` shows expired ones).
]],
    inspect = [[
Usage: dogpile-cache [--config FILE] inspect REGION KEY

Prints the value stored under KEY, expired or not, with its created time (ISO
8601 UTC and epoch seconds), its age, the region's expiration time, and
whether it is expired or invalidated. Exit status 2 when there is no value.
]],
    delete = [[
Usage: dogpile-cache [--config FILE] delete REGION KEY

Deletes KEY from the region's backend (deleting a missing key is not an
error). Only backends whose storage outlives this process and is shared with
the application (lmdb, redis, memcached) make this meaningful: memory and
shared_memory live inside one process, ngx_shared inside nginx only.
]],
    invalidate = [[
Usage: dogpile-cache [--config FILE] invalidate REGION [--soft]

Invalidates the region: hard (the default) makes every value created before
now count as missing; --soft makes such values count as expired, so one caller
regenerates while others keep the old value.

Invalidation deletes nothing: it is a timestamp kept by the region's
invalidator. With the default invalidator (dogpile.cache's, used by every
backend shipped except ngx_shared) that timestamp lives in the Lua state of
the process that calls it, so invalidating from this command could not reach
the application: the command then does nothing and exits with status 1,
saying so. It acts only on regions whose backend provides a shared
invalidator (ngx_shared has one, but it works inside nginx only). To drop a
key from a shared backend, use `delete`; to invalidate a whole region, call
region:invalidate() in the application.
]],
    stats = [[
Usage: dogpile-cache [--config FILE] stats [REGION]

Prints every counter of region:stats() (hits, misses, creations, stale_served,
lock_waits, errors, evictions, lock_overruns) for REGION or for every region,
then the backend's own statistics where it reports them (items, bytes, ...).
Region counters count what happens in one Lua state: here, this command's own
process, so they are zero. The application's counters are served by
cache.metrics() (the README's "Metrics" section).
]],
    bench = [[
Usage: dogpile-cache [--config FILE] bench REGION [--n N]

Measures the latency of region:get on a hit (one key, set first) and on a miss
(N keys that do not exist), N times each (default 1000), and prints the mean,
median, 99th percentile and maximum in microseconds. It writes one key,
"dogpile-cache:bench:<random>", to the region's backend and deletes it after.
]],
}

-- -- Printing values -----------------------------------------------------------

local IDENT = "^[%a_][%w_]*$"
local KEYWORDS = {}
for w in ([[and break do else elseif end false for function goto if in local nil not
            or repeat return then true until while]]):gmatch("%a+") do
    KEYWORDS[w] = true
end

local function pretty_number(n)
    if n ~= n then
        return "0/0"
    elseif n == math.huge then
        return "math.huge"
    elseif n == -math.huge then
        return "-math.huge"
    elseif n == floor(n) and n > -1e15 and n < 1e15 then
        return fmt("%d", n)
    end
    return fmt("%.17g", n)
end

local function key_order(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then
        return ta < tb
    end
    if ta == "number" or ta == "string" then
        return a < b
    end
    return tostring(a) < tostring(b)
end

--- A Lua literal for `v` (tables indented, keys sorted; cycles and values
-- that have no literal are shown as <...>).
local function pretty(v, indent, seen)
    local t = type(v)
    if t == "string" then
        return fmt("%q", v):gsub("\\\n", "\\n")
    elseif t == "number" then
        return pretty_number(v)
    elseif t == "nil" or t == "boolean" then
        return tostring(v)
    elseif t ~= "table" then
        return "<" .. tostring(v) .. ">"
    end
    indent, seen = indent or "", seen or {}
    if seen[v] then
        return "<cycle>"
    end
    seen[v] = true
    local n = #v
    local keys = {}
    for k in pairs(v) do
        if not (type(k) == "number" and k >= 1 and k <= n and k == floor(k)) then
            keys[#keys + 1] = k
        end
    end
    sort(keys, key_order)
    if n == 0 and #keys == 0 then
        seen[v] = nil
        return "{}"
    end
    local inner, parts = indent .. "  ", {}
    for i = 1, n do
        parts[#parts + 1] = inner .. pretty(v[i], inner, seen)
    end
    for _, k in ipairs(keys) do
        local ks
        if type(k) == "string" and k:match(IDENT) and not KEYWORDS[k] then
            ks = k
        else
            ks = "[" .. pretty(k, inner, seen) .. "]"
        end
        parts[#parts + 1] = inner .. ks .. " = " .. pretty(v[k], inner, seen)
    end
    seen[v] = nil
    return "{\n" .. concat(parts, ",\n") .. ",\n" .. indent .. "}"
end
_M.pretty = pretty

local function iso(t)
    local secs, frac = fmt("%.6f", t):match("^(%d+)%.(%d+)$")
    return os.date("!%Y-%m-%dT%H:%M:%S", tonumber(secs)) .. "." .. frac .. "Z"
end

local function duration(s)
    if s < 0 then
        return "-" .. duration(-s)
    elseif s < 60 then
        return fmt("%.3fs", s)
    end
    local d, h, m = floor(s / 86400), floor(s % 86400 / 3600), floor(s % 3600 / 60)
    local parts = {}
    if d > 0 then parts[#parts + 1] = d .. "d" end
    if h > 0 then parts[#parts + 1] = h .. "h" end
    if m > 0 then parts[#parts + 1] = m .. "m" end
    parts[#parts + 1] = floor(s % 60) .. "s"
    return concat(parts, " ") .. fmt(" (%.3fs)", s)
end

-- -- Errors --------------------------------------------------------------------

-- A failure of the command: main() prints it and returns `status`.
local Failure = {}
Failure.__index = Failure
Failure.__tostring = function(f) return f.msg end

local function fail(msg, status)
    error(setmetatable({ msg = msg, status = status or 1 }, Failure), 0)
end

-- An error raised by the library, without the position prefix Lua adds.
local function clean(err)
    err = tostring(err)
    return (err:gsub("^[^\n]-:%d+: ", "", 1))
end

-- -- Config --------------------------------------------------------------------

local function load_config(path)
    if path == nil or path == "" then
        fail("no regions config file: pass --config FILE or set DOGPILE_CACHE_CONFIG")
    end
    local chunk, err = loadfile(path)
    if not chunk then
        fail("cannot load config '" .. path .. "': " .. tostring(err))
    end
    local ok, conf = pcall(chunk)
    if not ok then
        fail("cannot load config '" .. path .. "': it raised: " .. tostring(conf))
    end
    if type(conf) ~= "table" then
        fail("cannot load config '" .. path .. "': it must return a table of regions, got "
             .. type(conf))
    end
    return conf
end

local function region_names(conf)
    local names = {}
    for name in pairs(conf) do
        names[#names + 1] = tostring(name)
    end
    sort(names)
    return names
end

-- The configured region `name` of `conf`; only that one is opened, so that a
-- region whose backend is down does not stop commands on the others.
local function open_region(conf, path, name)
    if name == nil then
        fail("missing REGION (regions: " .. concat(region_names(conf), ", ") .. ")")
    end
    if conf[name] == nil then
        fail("unknown region '" .. name .. "' (regions: " .. concat(region_names(conf), ", ") .. ")")
    end
    local cache = require "dogpile.cache"
    local ok, regions = pcall(cache.load_regions, { [name] = conf[name] })
    if not ok then
        fail("region '" .. name .. "' in '" .. path .. "': " .. clean(regions))
    end
    return regions[name]
end

-- Runs `fn(...)`, turning a library error (a backend that is down, ...)
-- into a failure of the command.
local function guarded(fn, ...)
    local res = { pcall(fn, ...) }
    if not res[1] then
        if getmetatable(res[2]) == Failure then
            error(res[2], 0)
        end
        fail(clean(res[2]))
    end
    return unpack(res, 2, table.maxn(res))
end

-- -- Commands ------------------------------------------------------------------

local commands = {}

function commands.list(ctx)
    local conf = ctx.conf()
    for _, name in ipairs(region_names(conf)) do
        local spec = conf[name]
        local exp = type(spec) == "table" and spec.expiration_time
        ctx.out(fmt("%s\t%s\t%s\n", name, type(spec) == "table" and tostring(spec.backend) or "?",
                    exp == nil and "no expiration" or ("expiration_time=" .. tostring(exp))))
    end
    return 0
end

local function need_key(ctx, region, key)
    if key == nil then
        fail("missing KEY (usage: " .. PROG .. " " .. ctx.command .. " REGION KEY)")
    end
    return key
end

function commands.get(ctx, name, key)
    local conf = ctx.conf()
    local region = open_region(conf, ctx.path, name)
    need_key(ctx, region, key)
    local value = guarded(region.get, region, key)
    if value == require("dogpile.cache").NO_VALUE then
        fail("no value for key '" .. key .. "' in region '" .. name .. "'", 2)
    end
    ctx.out(pretty(value) .. "\n")
    return 0
end

function commands.inspect(ctx, name, key)
    local conf = ctx.conf()
    local region = open_region(conf, ctx.path, name)
    need_key(ctx, region, key)
    local cv = guarded(region.get_value_metadata, region, key, nil, true)
    if cv == nil then
        fail("no value for key '" .. key .. "' in region '" .. name .. "'", 2)
    end
    local ct = cv.metadata and cv.metadata.ct
    local now = C.dp_clock_now()
    local exp = region.expiration_time
    local lines = {
        "region:     " .. name .. " (" .. tostring(conf[name].backend) .. ")",
        "key:        " .. pretty(key),
    }
    if type(ct) == "number" then
        local age = now - ct
        local inv = region.region_invalidator
        local expired = exp ~= nil and exp >= 0 and age > exp
        local state
        if inv:is_hard_invalidated(ct) then
            state = "invalidated (hard): counts as missing"
        elseif inv:is_soft_invalidated(ct) then
            state = "invalidated (soft): counts as expired"
        elseif expired then
            state = fmt("yes, %s ago", duration(age - exp))
        elseif exp ~= nil and exp >= 0 then
            state = fmt("no, expires in %s", duration(exp - age))
        else
            state = "no (the region has no expiration time)"
        end
        lines[#lines + 1] = "created:    " .. iso(ct) .. fmt(" (%.6f)", ct)
        lines[#lines + 1] = "age:        " .. duration(age)
        lines[#lines + 1] = "expiration: " .. (exp == nil and "none" or duration(exp))
        lines[#lines + 1] = "expired:    " .. state
    end
    lines[#lines + 1] = "value:      " .. pretty(cv.payload, "            ")
    ctx.out(concat(lines, "\n") .. "\n")
    return 0
end

function commands.delete(ctx, name, key)
    local conf = ctx.conf()
    local region = open_region(conf, ctx.path, name)
    need_key(ctx, region, key)
    guarded(region.delete, region, key)
    ctx.out("deleted key '" .. key .. "' from region '" .. name .. "'\n")
    return 0
end

function commands.invalidate(ctx, ...)
    local name, soft
    for i = 1, select("#", ...) do
        local a = select(i, ...)
        if a == "--soft" then
            soft = true
        elseif a == "--hard" then
            soft = false
        elseif a:sub(1, 1) == "-" then
            fail("invalidate: unknown option '" .. a .. "'")
        elseif name == nil then
            name = a
        else
            fail("invalidate: unexpected argument '" .. a .. "'")
        end
    end
    local conf = ctx.conf()
    local region = open_region(conf, ctx.path, name)
    if not rawget(region, "_backend_inv") then
        fail("region '" .. name .. "' (backend " .. tostring(conf[name].backend) .. ") keeps its "
             .. "invalidation in each process's Lua state, so invalidating it from here would "
             .. "not reach the application: nothing was done. Use `" .. PROG .. " delete` for "
             .. "single keys, or call region:invalidate() in the application (see "
             .. PROG .. " invalidate --help)")
    end
    guarded(region.invalidate, region, not soft)
    ctx.out("invalidated region '" .. name .. "' (" .. (soft and "soft" or "hard") .. ")\n")
    return 0
end

local COUNTERS = { "hits", "misses", "creations", "stale_served", "lock_waits", "errors",
                   "evictions", "lock_overruns" }
local BACKEND_STATS = { "items", "bytes", "max_items", "max_bytes", "hits", "misses",
                        "evictions", "expirations" }

function commands.stats(ctx, name)
    local conf = ctx.conf()
    local names = name and { name } or region_names(conf)
    for i, n in ipairs(names) do
        local region = open_region(conf, ctx.path, n)
        local st = guarded(region.stats, region)
        local lines = { (i > 1 and "\n" or "") .. "region " .. n .. " ("
                        .. tostring(conf[n].backend) .. "), this process:" }
        for _, c in ipairs(COUNTERS) do
            lines[#lines + 1] = fmt("  %-14s %s", c, pretty_number(st[c] or 0))
        end
        local b = region.actual_backend
        if type(b.stats) == "function" then
            local bs = guarded(b.stats, b)
            if type(bs) == "table" then
                lines[#lines + 1] = "backend:"
                for _, c in ipairs(BACKEND_STATS) do
                    if type(bs[c]) == "number" then
                        lines[#lines + 1] = fmt("  %-14s %s", c, pretty_number(bs[c]))
                    end
                end
            end
        end
        ctx.out(concat(lines, "\n") .. "\n")
    end
    return 0
end

local function summary(samples)
    sort(samples)
    local n, sum = #samples, 0
    for i = 1, n do
        sum = sum + samples[i]
    end
    local function pct(p)
        return samples[math.max(1, math.ceil(n * p))]
    end
    return fmt("mean %.2f  p50 %.2f  p99 %.2f  max %.2f", sum / n * 1e6, pct(0.5) * 1e6,
               pct(0.99) * 1e6, samples[n] * 1e6)
end

function commands.bench(ctx, ...)
    local name, n
    local args = { ... }
    local i = 1
    while i <= #args do
        local a = args[i]
        if a == "--n" or a == "-n" then
            n = tonumber(args[i + 1])
            if not n or n < 1 or n ~= floor(n) then
                fail("bench: --n expects a positive integer, got '" .. tostring(args[i + 1]) .. "'")
            end
            i = i + 1
        elseif a:sub(1, 1) == "-" then
            fail("bench: unknown option '" .. a .. "'")
        elseif name == nil then
            name = a
        else
            fail("bench: unexpected argument '" .. a .. "'")
        end
        i = i + 1
    end
    n = n or 1000
    local conf = ctx.conf()
    local region = open_region(conf, ctx.path, name)
    local NO_VALUE = require("dogpile.cache").NO_VALUE
    local clock = C.dp_clock_monotonic
    math.randomseed(floor(C.dp_clock_now() * 1e6) % 2147483647)
    local prefix = fmt("dogpile-cache:bench:%08x", math.random(0, 0x7fffffff))
    local hit_key = prefix .. ":hit"
    local hits, misses = {}, {}
    local ok, err = pcall(function()
        region:set(hit_key, { bench = true, payload = ("x"):rep(64) })
        for j = 1, n do
            local t0 = clock()
            local v = region:get(hit_key)
            hits[j] = clock() - t0
            if v == NO_VALUE then
                fail("bench: the value just set in region '" .. name .. "' was not found "
                     .. "(a null backend, or an expiration time shorter than the run?)")
            end
        end
        for j = 1, n do
            local key = prefix .. ":miss:" .. j
            local t0 = clock()
            region:get(key)
            misses[j] = clock() - t0
        end
    end)
    pcall(region.delete, region, hit_key)
    if not ok then
        if getmetatable(err) == Failure then
            error(err, 0)
        end
        fail(clean(err))
    end
    ctx.out(fmt("region %s (%s), %d gets each, microseconds:\n  hit:  %s\n  miss: %s\n", name,
                tostring(conf[name].backend), n, summary(hits), summary(misses)))
    return 0
end

-- -- Main ------------------------------------------------------------------------

local function writer(f)
    return function(s)
        f:write(s)
    end
end

--- Run one command. `argv` is an array of strings (the script's `arg`).
-- @return the exit status
function _M.main(argv, out, err)
    out, err = out or writer(io.stdout), err or writer(io.stderr)
    local path = os.getenv("DOGPILE_CACHE_CONFIG")
    local i, n = 1, #argv
    local command
    while i <= n do
        local a = argv[i]
        if a == "--config" or a == "-c" then
            if argv[i + 1] == nil then
                err(PROG .. ": --config expects a FILE\n")
                return 1
            end
            path = argv[i + 1]
            i = i + 2
        elseif a:match("^%-%-config=") then
            path = a:sub(10)
            i = i + 1
        elseif a == "-h" or a == "--help" or a == "help" then
            local topic = argv[i + 1]
            if a == "help" and topic and HELP[topic] then
                out(HELP[topic])
            else
                out(USAGE)
            end
            return 0
        elseif a:sub(1, 1) == "-" then
            err(PROG .. ": unknown option '" .. a .. "'\n" .. "Try '" .. PROG .. " --help'.\n")
            return 1
        else
            command = a
            i = i + 1
            break
        end
    end
    if command == nil then
        err(PROG .. ": missing COMMAND\n" .. USAGE)
        return 1
    end
    local fn = commands[command]
    if not fn then
        local names = {}
        for k in pairs(commands) do
            names[#names + 1] = k
        end
        sort(names)
        err(PROG .. ": unknown command '" .. command .. "' (commands: " .. concat(names, ", ")
            .. ")\nTry '" .. PROG .. " --help'.\n")
        return 1
    end
    local args = {}
    for j = i, n do
        if argv[j] == "--help" or argv[j] == "-h" then
            out(HELP[command])
            return 0
        end
        args[#args + 1] = argv[j]
    end
    local conf
    local ctx = {
        command = command, path = path, out = out, err = err,
        conf = function()
            conf = conf or load_config(path)
            return conf
        end,
    }
    local ok, res = pcall(fn, ctx, unpack(args))
    if not ok then
        if getmetatable(res) == Failure then
            err(PROG .. ": " .. res.msg .. "\n")
            return res.status
        end
        err(PROG .. ": " .. clean(res) .. "\n")
        return 1
    end
    return res or 0
end

return _M
