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
  check                       open every region's backend; status 1 on any problem
  list                        the regions, their backends and expiration times
  get REGION KEY              print the value (as the application would get it)
  inspect REGION KEY          value, created time, age, expired or not
  delete REGION KEY           delete a key
  invalidate REGION [--soft]  invalidate a region (see its --help: per process!)
  keys REGION [PATTERN] [--limit N]  the region's stored keys (lmdb, redis)
  flush REGION                delete every value of the region (lmdb, redis)
  stats [REGION]              counters of the regions and what their backends hold
  bench REGION [--n N]        hit and miss latency of a region

Options:
  --config FILE   the regions config file
  --json          print data as JSON (one document) instead of text
  -h, --help      this help; `dogpile-cache COMMAND --help` for a command's

Exit status: 0 ok, 1 error (message on stderr), 2 no value for the key.
]]

local HELP = {
    check = [[
Usage: dogpile-cache [--config FILE] check [--json]

Loads every region of the config file and opens its backend (a misspelled
backend name, an unknown argument, a bad value, a path that cannot be
created), then asks each backend once for a key that does not exist, so
that a server that is down or refuses the credentials is found too. Prints
one line per region, "ok" or the problem. Exit status 1 when any region has
a problem (or the file does not load), 0 otherwise.
]],
    keys = [[
Usage: dogpile-cache [--config FILE] keys REGION [PATTERN] [--limit N] [--json]

Lists the keys stored for REGION, as stored (after the region's key_mangler:
long keys on lmdb are SHA-1 digests), sorted, at most N (default 1000).
PATTERN is a glob: * any bytes, ? one byte, [abc] [^a] [a-z] sets, \x a
literal x. lmdb marks keys past the backend's own expiration_time (the
region's own expiration is judged on read). Redis does not namespace keys by
region: the keys of a redis region are every key of its database, less the
held locks (lock_prefix). memory and shared_memory cannot be listed (their
values live inside each application process), nor ngx_shared (inside nginx
only), memcached (it cannot list its keys), redis_sentinel, redis_cluster.
]],
    flush = [[
Usage: dogpile-cache [--config FILE] flush REGION [--json]

Deletes every value stored for REGION and prints how many. lmdb: every value
of the environment at the region's path (in one transaction). redis: every
key of the region's database except held locks (SCAN, then DEL in batches):
regions sharing one database are flushed together, and so is anything else
kept in that database. Backends that `keys` cannot list cannot be flushed
from here (status 1, saying why).
]],
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

Prints, for REGION or for every region, what its backend's storage holds,
asked of the storage itself: lmdb reads the file (items, expired, bytes);
redis asks the server (DBSIZE of the region's database, held locks, and the
server's used_memory, maxmemory, keyspace hits and misses, evicted and
expired keys). Backends whose storage the CLI cannot reach say why.

Counters of region:stats() and of a backend's handle count what happens in
one process: here, this command's own, so they would be zero and are not
printed. The application's counters are served by cache.metrics() (the
README's "Metrics" section).
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

-- -- JSON ----------------------------------------------------------------------

-- Bytes that are not UTF-8 are written as \u00XX (their Latin-1 reading), so
-- that the document stays valid JSON whatever a key or value holds.
local function json_string(s)
    local out, i, n = { '"' }, 1, #s
    while i <= n do
        local c = s:byte(i)
        local len = c < 0x80 and 1 or (c >= 0xC2 and c <= 0xDF) and 2
                    or (c >= 0xE0 and c <= 0xEF) and 3 or (c >= 0xF0 and c <= 0xF4) and 4 or 0
        local ok = len > 0 and i + len - 1 <= n
        for j = i + 1, ok and i + len - 1 or 0 do
            local b = s:byte(j)
            if b < 0x80 or b > 0xBF then
                ok = false
            end
        end
        if not ok then
            out[#out + 1] = fmt("\\u%04x", c)
            i = i + 1
        elseif c == 34 then
            out[#out + 1] = '\\"'
            i = i + 1
        elseif c == 92 then
            out[#out + 1] = "\\\\"
            i = i + 1
        elseif c < 0x20 or c == 0x7F then
            out[#out + 1] = fmt("\\u%04x", c)
            i = i + 1
        else
            out[#out + 1] = s:sub(i, i + len - 1)
            i = i + len
        end
    end
    out[#out + 1] = '"'
    return concat(out)
end

--- JSON for `v`: a table whose keys are 1..n is an array, any other an
-- object (keys written as strings, sorted); NaN and infinities, which JSON
-- lacks, are null; cycles and values without a JSON form are strings.
local ARRAY = {}

local function json(v, seen)
    local t = type(v)
    if t == "string" then
        return json_string(v)
    elseif t == "number" then
        if v ~= v or v == math.huge or v == -math.huge then
            return "null"
        end
        return pretty_number(v)
    elseif t == "boolean" then
        return tostring(v)
    elseif t == "nil" then
        return "null"
    elseif t ~= "table" then
        return json_string("<" .. tostring(v) .. ">")
    end
    seen = seen or {}
    if seen[v] then
        return '"<cycle>"'
    end
    seen[v] = true
    local n, count = #v, 0
    for _ in pairs(v) do
        count = count + 1
    end
    local parts = {}
    if getmetatable(v) == ARRAY or (n > 0 and count == n) then
        for i = 1, n do
            parts[i] = json(v[i], seen)
        end
        seen[v] = nil
        return "[" .. concat(parts, ",") .. "]"
    end
    local keys = {}
    for k in pairs(v) do
        keys[#keys + 1] = k
    end
    sort(keys, key_order)
    for _, k in ipairs(keys) do
        parts[#parts + 1] = json_string(tostring(k)) .. ":" .. json(v[k], seen)
    end
    seen[v] = nil
    return "{" .. concat(parts, ",") .. "}"
end
_M.json = json

-- A table written as a JSON array even when empty ([] rather than {}).
local function array(t)
    return setmetatable(t or {}, ARRAY)
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
    local rows = array()
    for _, name in ipairs(region_names(conf)) do
        local spec = conf[name]
        local exp = type(spec) == "table" and spec.expiration_time or nil
        local backend = type(spec) == "table" and tostring(spec.backend) or "?"
        rows[#rows + 1] = { name = name, backend = backend, expiration_time = exp }
        if not ctx.json then
            ctx.out(fmt("%s\t%s\t%s\n", name, backend,
                        exp == nil and "no expiration" or ("expiration_time=" .. tostring(exp))))
        end
    end
    if ctx.json then
        ctx.out(json({ regions = rows }) .. "\n")
    end
    return 0
end

-- Every region of the file opened, and its backend asked once for a key
-- that is not there: a name that does not resolve, an argument refused, a
-- server that is down all show here, each on its region's line.
function commands.check(ctx, ...)
    if select("#", ...) > 0 then
        fail("check: unexpected argument '" .. tostring((...)) .. "'")
    end
    local conf = ctx.conf()
    local cache = require "dogpile.cache"
    local rows, bad = array(), 0
    for _, name in ipairs(region_names(conf)) do
        local spec = conf[name]
        local backend = type(spec) == "table" and tostring(spec.backend) or "?"
        local ok, res = pcall(cache.load_regions, { [name] = spec })
        local problem
        if not ok then
            -- The line names the region already: not load_regions' prefix too.
            problem = clean(res):gsub("^dogpile%.cache: load_regions: region '.-' in the given table: ",
                                      "dogpile.cache: ", 1)
        else
            local b = res[name].actual_backend
            local ok2, err2 = pcall(b.get, b, "dogpile-cache:check")
            if not ok2 then
                -- A C backend's own message names no backend: the region adds it.
                problem = clean(err2)
                if problem:sub(1, #backend + 1) ~= backend .. ":" then
                    problem = backend .. ": get failed: " .. problem
                end
            end
            if type(b.close) == "function" then
                pcall(b.close, b)
            end
        end
        if problem then
            bad = bad + 1
        end
        rows[#rows + 1] = { name = name, backend = backend, ok = problem == nil, problem = problem }
        if not ctx.json then
            ctx.out(fmt("%s\t%s\t%s\n", name, backend, problem and ("FAIL: " .. problem) or "ok"))
        end
    end
    if ctx.json then
        ctx.out(json({ ok = bad == 0, problems = bad, regions = rows }) .. "\n")
    elseif bad > 0 then
        ctx.err(fmt("%s: %d of %d regions in '%s' have problems\n", PROG, bad, #rows, ctx.path))
    end
    return bad == 0 and 0 or 1
end

-- The backend name and arguments of region `name`, checked to exist,
-- without opening it.
local function region_spec(ctx, name, usage)
    local conf = ctx.conf()
    if name == nil then
        fail("missing REGION (usage: " .. PROG .. " " .. usage .. ")")
    end
    local spec = conf[name]
    if spec == nil then
        fail("unknown region '" .. name .. "' (regions: " .. concat(region_names(conf), ", ") .. ")")
    end
    if type(spec) ~= "table" or type(spec.backend) ~= "string" then
        fail("region '" .. name .. "' in '" .. ctx.path .. "' names no backend")
    end
    return spec.backend, spec.arguments or {}
end

function commands.keys(ctx, ...)
    local args = { ... }
    local name, pattern, limit
    local i = 1
    while i <= #args do
        local a = args[i]
        if a == "--limit" or a == "-n" then
            limit = tonumber(args[i + 1])
            if not limit or limit < 1 or limit ~= floor(limit) then
                fail("keys: --limit expects a positive integer, got '" .. tostring(args[i + 1]) .. "'")
            end
            i = i + 1
        elseif a:sub(1, 2) == "--" then
            fail("keys: unknown option '" .. a .. "'")
        elseif name == nil then
            name = a
        elseif pattern == nil then
            pattern = a
        else
            fail("keys: unexpected argument '" .. a .. "'")
        end
        i = i + 1
    end
    limit = limit or 1000
    local backend, arguments = region_spec(ctx, name, "keys REGION [PATTERN] [--limit N]")
    local store = require "dogpile.cache.cli_store"
    -- One more than asked: to say that there are more.
    local keys, err = store.keys(backend, arguments, pattern, limit + 1)
    if not keys then
        fail("region '" .. name .. "': " .. err)
    end
    local more = #keys > limit
    if more then
        keys[#keys] = nil
    end
    if ctx.json then
        local list = array()
        for j, k in ipairs(keys) do
            list[j] = { key = k.key, expired = k.expired }
        end
        ctx.out(json({ region = name, backend = backend, pattern = pattern, limit = limit,
                       truncated = more, keys = list }) .. "\n")
        return 0
    end
    for _, k in ipairs(keys) do
        ctx.out(k.key .. (k.expired and "\t(expired)" or "") .. "\n")
    end
    if more then
        ctx.err(fmt("%s: more than %d keys; the first %d are shown (--limit N)\n", PROG, limit, limit))
    end
    return 0
end

function commands.flush(ctx, name, extra)
    if extra ~= nil then
        fail("flush: unexpected argument '" .. extra .. "'")
    end
    local backend, arguments = region_spec(ctx, name, "flush REGION")
    local store = require "dogpile.cache.cli_store"
    local n, err = store.flush(backend, arguments)
    if not n then
        fail("region '" .. name .. "': " .. err)
    end
    if ctx.json then
        ctx.out(json({ region = name, backend = backend, deleted = n }) .. "\n")
    else
        ctx.out(fmt("flushed region '%s' (%s): %d values deleted\n", name, backend, n))
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
    if ctx.json then
        ctx.out(json({ region = name, key = key, value = value }) .. "\n")
        return 0
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
    if ctx.json then
        local doc = { region = name, backend = tostring(conf[name].backend), key = key,
                      value = cv.payload, expiration_time = exp }
        if type(ct) == "number" then
            local inv = region.region_invalidator
            doc.created = ct
            doc.created_iso = iso(ct)
            doc.age = now - ct
            doc.expired = exp ~= nil and exp >= 0 and now - ct > exp
            doc.invalidated = inv:is_hard_invalidated(ct) and "hard"
                              or inv:is_soft_invalidated(ct) and "soft" or nil
        end
        ctx.out(json(doc) .. "\n")
        return 0
    end
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
    if ctx.json then
        ctx.out(json({ region = name, key = key, deleted = true }) .. "\n")
        return 0
    end
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
    if ctx.json then
        ctx.out(json({ region = name, invalidated = soft and "soft" or "hard" }) .. "\n")
        return 0
    end
    ctx.out("invalidated region '" .. name .. "' (" .. (soft and "soft" or "hard") .. ")\n")
    return 0
end

local BACKEND_STATS = { "items", "bytes", "max_items", "max_bytes" }

-- What REGION's storage holds, asked of the storage (cli_store) where the
-- CLI can reach it. Otherwise, for a backend whose stats() describe shared
-- storage (a file, a server) its own report; for one that lives inside a
-- process, why there is nothing to show. A C backend's handle counters
-- (hits, misses, evictions, ...) are this process's, so never shown.
local function storage_stats(ctx, conf, name)
    local backend = conf[name].backend
    local store = require "dogpile.cache.cli_store"
    if store.can_enumerate(backend) then
        local rows, err = store.stats(backend, conf[name].arguments or {})
        if not rows then
            fail("region '" .. name .. "': " .. err)
        end
        return rows
    end
    local ok, why = store.can_enumerate(backend)
    if not ok and type(backend) == "string" and backend:match("^dogpile%.cache%.") then
        return nil, why
    end
    local region = open_region(conf, ctx.path, name)
    local b = region.actual_backend
    if type(b.stats) == "function" and not rawget(b, "handle") then
        local bs = guarded(b.stats, b)
        local rows = {}
        if type(bs) == "table" then
            for _, c in ipairs(BACKEND_STATS) do
                if type(bs[c]) == "number" then
                    rows[#rows + 1] = { c, bs[c], "as the backend reports it to this process" }
                end
            end
        end
        return rows
    end
    return nil, "the backend reports nothing about its storage"
end

function commands.stats(ctx, name, extra)
    if extra ~= nil then
        fail("stats: unexpected argument '" .. extra .. "'")
    end
    local conf = ctx.conf()
    local names = name and { name } or region_names(conf)
    local docs = array()
    for i, n in ipairs(names) do
        if conf[n] == nil then
            open_region(conf, ctx.path, n) -- fails, naming the known ones
        end
        local backend = tostring(conf[n].backend)
        local rows, why = storage_stats(ctx, conf, n)
        if ctx.json then
            local doc = { region = n, backend = backend, reachable = rows ~= nil, why = why }
            if rows then
                doc.storage = {}
                for _, r in ipairs(rows) do
                    doc.storage[r[1]] = r[2]
                end
            end
            docs[#docs + 1] = doc
        else
            local lines = { (i > 1 and "\n" or "") .. "region " .. n .. " (" .. backend .. ")" }
            if rows then
                lines[1] = lines[1] .. ", its storage:"
                for _, r in ipairs(rows) do
                    lines[#lines + 1] = fmt("  %-12s %-14s %s", r[1],
                                            r[2] == nil and "?" or pretty_number(r[2]), r[3])
                end
            else
                lines[1] = lines[1] .. ": its storage cannot be read from here: " .. why
            end
            ctx.out(concat(lines, "\n") .. "\n")
        end
    end
    if ctx.json then
        ctx.out(json({ regions = docs }) .. "\n")
    end
    return 0
end

local function summary(samples, as_table)
    sort(samples)
    local n, sum = #samples, 0
    for i = 1, n do
        sum = sum + samples[i]
    end
    local function pct(p)
        return samples[math.max(1, math.ceil(n * p))]
    end
    if as_table then
        return { mean = sum / n * 1e6, p50 = pct(0.5) * 1e6, p99 = pct(0.99) * 1e6,
                 max = samples[n] * 1e6 }
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
    if ctx.json then
        local h, m = summary(hits, true), summary(misses, true)
        ctx.out(json({ region = name, backend = tostring(conf[name].backend), n = n,
                       unit = "microseconds", hit = h, miss = m }) .. "\n")
        return 0
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
    -- --json anywhere: every command that prints data prints one JSON document.
    local as_json = false
    do
        local rest = {}
        for j = 1, #argv do
            if argv[j] == "--json" then
                as_json = true
            else
                rest[#rest + 1] = argv[j]
            end
        end
        argv = rest
    end
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
        command = command, path = path, out = out, err = err, json = as_json,
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
