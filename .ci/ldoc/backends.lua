-- Writes the reference's "Backend arguments" page (Markdown, on stdout):
-- every shipped backend's arguments with their type, default and meaning.
--
-- For the C backends, the names, types, bounds and defaults are read from
-- the tables the backends check arguments with (dp_arg_spec, through the FFI
-- from the built library), so the page cannot drift from what is accepted;
-- the meanings are the README's argument tables, so that users read one text.
-- An argument the backend accepts without a README row (or a row for a name
-- the backend does not accept) stops the build: .ci/docs fails on it.
--
-- Usage (from the checkout, with a stage in LUA_PATH/LUA_CPATH):
--   luajit .ci/ldoc/backends.lua README.md core/dogpile.h > out.md
local ffi = require "ffi"

local readme_path, header_path = arg[1], arg[2]
local problems = {}
local function problem(msg)
    problems[#problems + 1] = msg
end

-- -- The README's argument tables, by section ----------------------------------

local function read(path)
    local fh = assert(io.open(path, "rb"))
    local s = fh:read("*a")
    fh:close()
    return s
end

-- rows[section][name] = {default = cell, meaning = cell}
local function readme_rows(text)
    local rows, section = {}, nil
    for line in text:gmatch("[^\n]*") do
        local h = line:match("^#+%s+(.-)%s*$")
        if h then
            section = h
        elseif section and line:match("^|%s*`") then
            local cells = {}
            for cell in line:gmatch("|([^|]*)") do
                cells[#cells + 1] = cell:match("^%s*(.-)%s*$")
            end
            if #cells >= 3 then
                rows[section] = rows[section] or {}
                for name in cells[1]:gmatch("`([%w_]+)`") do
                    rows[section][name] = { default = cells[2], meaning = cells[3] }
                end
            end
        end
    end
    return rows
end

local ROWS = readme_rows(read(readme_path))

-- -- The C backends' tables ---------------------------------------------------

-- The header's declarations, preprocessed by the C compiler (the FFI takes
-- no macros), give dp_backend_ops.args its place in the struct.
local function cdef_header()
    local p = assert(io.popen("cc -E -P -DDP_API= -D'__attribute__(x)=' " .. header_path))
    local h = p:read("*a")
    assert(p:close(), "cc -E " .. header_path .. " failed")
    ffi.cdef(h)
end
cdef_header()
local C = ffi.load(require("dogpile.core").library_path)

local INT, SECONDS, SIZE, BOOL, STR, ENUM, CUSTOM, BYTES = 1, 2, 3, 4, 5, 6, 7, 8
local REQUIRED, ABOVE_MIN, INFINITE = 0x01, 0x02, 0x04
local band = require("bit").band

local function num(v)
    if v == math.huge then
        return "math.huge"
    end
    return ("%.14g"):format(v)
end

local function choices(s)
    local out, i = {}, 0
    while s.choices ~= nil and s.choices[i] ~= nil do
        out[#out + 1] = ffi.string(s.choices[i])
        i = i + 1
    end
    return out
end

-- The type, as core/args.c words what a value "must be" (its own `what`
-- when the backend wrote one).
local function type_text(s)
    if s.what ~= nil then
        return ffi.string(s.what)
    end
    local above, lo, hi = band(s.flags, ABOVE_MIN) ~= 0, num(s.min), num(s.max)
    local k = s.kind
    if k == INT then
        if s.max ~= 0 then
            return "an integer from " .. lo .. " to " .. hi
        elseif (s.min == 1 and not above) or (s.min == 0 and above) then
            return "a positive integer"
        elseif s.min == 0 then
            return "a non-negative integer"
        end
        return "an integer " .. (above and "> " or ">= ") .. lo
    elseif k == SECONDS or k == SIZE then
        local unit = k == SECONDS and "seconds" or "bytes"
        local t = (s.min == 0 and above) and ("a positive number of " .. unit)
            or ("a number of " .. unit .. (above and " > " or " >= ") .. lo)
        if s.max ~= 0 then
            t = t .. " and <= " .. hi
        end
        if k == SIZE then
            t = t .. " or a size such as \"64m\""
        elseif band(s.flags, INFINITE) ~= 0 then
            t = t .. " (math.huge: no limit)"
        end
        return t
    elseif k == BOOL then
        return "a boolean"
    elseif k == STR or k == BYTES then
        return (s.min >= 1 and "a non-empty string" or "a string")
            .. (s.max ~= 0 and (" of at most " .. hi .. " bytes") or "")
    elseif k == ENUM then
        local c = choices(s)
        for i = 1, #c do
            c[i] = '"' .. c[i] .. '"'
        end
        return (#c > 2 and "one of " or "") .. table.concat(c, #c == 2 and " or " or ", ")
    end
    return "a string" -- DP_SPEC_CUSTOM: a url, parsed by the backend
end

-- The default the table declares; nil when it declares none (0 that is not
-- a valid value is "none", as a NULL string default is).
local function default_text(s)
    if band(s.flags, REQUIRED) ~= 0 then
        return "required"
    end
    local k = s.kind
    if k == STR or k == BYTES then
        return s.def_str ~= nil and ('`"' .. ffi.string(s.def_str) .. '"`') or nil
    elseif k == ENUM then
        return '`"' .. choices(s)[s.def + 1] .. '"`'
    elseif k == BOOL then
        return s.def ~= 0 and "`true`" or "`false`"
    elseif k == CUSTOM then
        return nil
    elseif s.def ~= 0 or (s.min <= 0 and band(s.flags, ABOVE_MIN) == 0) then
        return "`" .. num(s.def) .. "`"
    end
    return nil
end

local function c_args(backend)
    local ops = C.dp_backend_find(backend)
    assert(ops ~= nil, backend .. " is not registered")
    local out, a, i = {}, ops.args, 0
    while a ~= nil and a[i].name ~= nil do
        local s = a[i]
        out[#out + 1] = { name = ffi.string(s.name), type = type_text(s), default = default_text(s) }
        i = i + 1
    end
    return out
end

-- The circuit breaker's arguments (core/breaker.c), taken by every backend
-- that talks to a server.
local BREAKER = {
    { name = "circuit_failures", type = "a non-negative integer", default = "`20`" },
    { name = "circuit_cooldown", type = "a positive number of seconds", default = "`1`" },
    { name = "circuit_slow", type = "a positive number of seconds (math.huge: no limit)", default = "`0.1`" },
}

-- -- The backends -------------------------------------------------------------

-- Each: the registered name, the C module that registers it (nil: Lua), the
-- README sections whose rows describe it (first found wins), what it is,
-- and the rows written here (the Lua backends', and the arguments only Lua
-- reads), {name, type, default, meaning}.
local BACKENDS = {
    { name = "dogpile.cache.memory", sections = {},
      about = "Values in a Lua table of this Lua state, by reference (nothing copied or serialized).",
      rows = {
          { "cache_dict", "a table", "a new table", "the table the values are kept in (keys already there enter the LRU order, oldest first)" },
          { "max_items", "a positive integer", "unbounded", "bound on the number of keys; the least recently used is evicted" },
      } },
    { name = "dogpile.cache.null", sections = {},
      about = "Stores nothing: every get is a miss and its lock never blocks.",
      rows = {} },
    { name = "dogpile.cache.shared_memory", module = "shared_memory",
      sections = { "dogpile.cache.shared_memory" },
      about = "One bounded store per `name`, shared by every Lua state and thread of the process." },
    { name = "dogpile.cache.lmdb", module = "lmdb", sections = { "dogpile.cache.lmdb" },
      about = "An LMDB environment on disk, shared by every process of the host that opens its path." },
    { name = "dogpile.cache.redis", module = "redis", breaker = true,
      sections = { "dogpile.cache.redis" },
      about = "A Redis server (hiredis; cosockets inside nginx), with a distributed lock per key." },
    { name = "dogpile.cache.redis_sentinel", module = "redis", breaker = true,
      sections = { "dogpile.cache.redis" },
      about = "dogpile.cache.redis on the master the sentinels name for `service_name`.",
      rows = {
          { "sentinels", "a non-empty list of {host, port}, {host = h, port = p} or \"host:port\"", "required", "the sentinels, asked in turn for the master" },
          { "service_name", "a non-empty string", "required", "the master's name as the sentinels know it" },
      } },
    { name = "dogpile.cache.redis_cluster", module = "redis_cluster", breaker = true,
      sections = { "dogpile.cache.redis_cluster" },
      about = "A Redis Cluster, with the values and the lock of dogpile.cache.redis." },
    { name = "dogpile.cache.memcached", module = "memcached", breaker = true,
      sections = { "dogpile.cache.memcached", "Memcached inside nginx: `dogpile.cache.memcached` over cosockets" },
      about = "memcached servers (libmemcached; cosockets inside nginx), with a distributed lock per key." },
    { name = "dogpile.cache.tiered", sections = { "Tiers" },
      about = "Two to four backends in front of one another, kept coherent across states, processes and hosts.",
      readme_rows = { "tiers", "prefix", "name" },
      types = { tiers = "a table: an array of 2 to 4 tiers", prefix = "a non-empty string", name = "a string" } },
    { name = "dogpile.cache.ngx_shared", sections = {},
      about = "An nginx `lua_shared_dict`, seen by every worker, with the lock and the invalidation time in the same dict. Inside OpenResty only.",
      rows = {
          { "dict", "a string or an ngx.shared.DICT", "required", "the lua_shared_dict's name (or the dict itself)" },
          { "lock_timeout", "a positive number of seconds", "`30`", "a lock expires after this long, so a dead or stuck holder keeps the others waiting at most that long" },
          { "lock_prefix", "a string", '`"dogpile:lock:"`', "prefix of the lock keys" },
          { "invalidation_prefix", "a string", '`"dogpile:invalidated:"`', "prefix of the key that holds a region's invalidation, followed by the region's name" },
          { "expiration", "a number of seconds >= 0", "`0` (never)", "seconds after which the dict itself drops a stored value (the dict's LRU evicts when full)" },
      } },
}

-- Meanings of arguments the README's tables do not describe (yet): used
-- only when no README row gives one.
local FALLBACK = {
    port = "the server's port",
    notify_channel = "set by dogpile.cache.tiered on its bottom tier: every write also PUBLISHes the keys it changed on this channel",
    notify_feed = "set by dogpile.cache.tiered: the change feed into which a listener thread pushes the keys others published on `notify_channel`",
}

-- Names a backend lists only to refuse them with a reason (redis_cluster's
-- db, host, port...): not arguments, so not rows.
local REFUSED = {
    ["dogpile.cache.redis_cluster"] = { db = true, host = true, port = true,
                                        notify_channel = true, notify_feed = true },
}

local function readme_row(b, name)
    for _, sec in ipairs(b.sections) do
        local r = ROWS[sec] and ROWS[sec][name]
        if r then
            return r
        end
    end
    if FALLBACK[name] then
        return { default = "", meaning = FALLBACK[name] }
    end
end

-- A README cell in this page: its links to README sections lose their
-- target (the text stays), and a "|" is escaped.
local function cell(s)
    s = s:gsub("%[([^%]]*)%]%(#[^)]*%)", "%1")
    return (s:gsub("|", "\\|"))
end

local out = {}
local function w(s)
    out[#out + 1] = s
end

w("# Backend arguments\n")
w("The `arguments` table of `region:configure(backend, {arguments = {...}})`, for every shipped backend. "
  .. "Every backend refuses a name it does not know, listing the ones it knows, and a value of the wrong "
  .. "type or out of its bounds, saying what it must be and what was given "
  .. "(`dogpile.cache.memory: max_items must be a positive integer, got string \"10000\"`). "
  .. "Strings are not coerced to numbers or booleans (only `configure_from_config`, whose table stands "
  .. "for an ini file, coerces). The types and defaults of the C backends are read from the tables they "
  .. "check their arguments with.\n")
for _, b in ipairs(BACKENDS) do
    w("\n## " .. b.name .. "\n")
    w(b.about .. "\n")
    local list = {}
    for _, r in ipairs(b.rows or {}) do
        list[#list + 1] = { name = r[1], type = r[2], default = r[3], meaning = r[4] }
    end
    local own = {}
    for _, r in ipairs(list) do
        own[r.name] = true
    end
    local from_readme = {}
    if b.module then
        require("dogpile.backends." .. b.module)
        for _, a in ipairs(c_args(b.name)) do
            if not own[a.name] and not (REFUSED[b.name] or {})[a.name] then
                from_readme[#from_readme + 1] = a
            end
        end
        if b.breaker then
            for _, a in ipairs(BREAKER) do
                from_readme[#from_readme + 1] = { name = a.name, type = a.type, default = a.default,
                                                  section = "Circuit breaker" }
            end
        end
    end
    for _, n in ipairs(b.readme_rows or {}) do
        from_readme[#from_readme + 1] = { name = n, type = b.types[n] }
    end
    for _, a in ipairs(from_readme) do
        local r = a.section and ROWS[a.section] and ROWS[a.section][a.name] or readme_row(b, a.name)
        if not r or (r.meaning == "" and not FALLBACK[a.name]) then
            problem(b.name .. ": argument '" .. a.name .. "' has no meaning in the README's table")
        else
            local readme_default = r.default ~= "" and r.default or nil
            list[#list + 1] = { name = a.name, type = a.type,
                                default = a.default or readme_default or "none",
                                meaning = r.meaning ~= "" and r.meaning or FALLBACK[a.name] }
        end
    end
    if #list == 0 then
        w("It takes no argument.\n")
    else
        w("\n| argument | type | default | meaning |")
        w("| --- | --- | --- | --- |")
        for _, r in ipairs(list) do
            w(("| `%s` | %s | %s | %s |"):format(r.name, cell(r.type), cell(r.default), cell(r.meaning)))
        end
        w("")
    end
end

if #problems > 0 then
    io.stderr:write(table.concat(problems, "\n") .. "\n")
    os.exit(1)
end
io.write(table.concat(out, "\n") .. "\n")
