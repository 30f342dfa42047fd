--- dogpile.cache.memcached inside nginx: the same arguments, servers, bytes
-- and lock as the C backend (backends/memcached.c, on libmemcached), over
-- nginx cosockets (dogpile.cache.mctext) with a keepalive pool per worker
-- and server, so that a worker never blocks on memcached.
-- backends/memcached.lua picks it when the region is configured inside
-- nginx, after the C backend's own argument reader has checked the
-- arguments (same messages). Added arguments: `pool_size` (connections
-- kept idle per worker and server, default 30) and `pool_idle_timeout`
-- (seconds an idle one is kept, default 60).
--
-- Keys go to the server libmemcached's ketama would pick for them (see
-- mctext.lua), so nginx workers and plain LuaJIT processes given one url
-- list meet on the same server for every key. Values: the region's
-- serialized envelope, stored with `set <key> <flags> <memcached_expire_time>`
-- (flags 0 or the `flags` argument, the expiry in whole seconds rounded up,
-- as in C), read with
-- `get`; get_multi is one multi-key get per server. The size limit is the
-- server's: a value it refuses is an error giving the limit it reports in
-- `stats settings`; item_size_max, when given, is checked before sending.
--
-- The lock is the C backend's: `add <lock_prefix><key>` (lock_prefix
-- "dogpile-lock:" by default; the SHA-1 hex of the key past memcached's key
-- limit) with a token and an expiry of
-- ceil(lock_timeout) + 1 s; released by a compare-and-delete (`gets`, and
-- while the token is still ours, `cas` with the CAS unique and an expiry
-- in the past), so an expired lock taken over by another holder is never
-- removed. Waiters poll the lock key, as the C backend's do (1 ms growing
-- by a quarter up to lock_backoff_max), without blocking the worker: the
-- coroutines of one worker waiting for one lock share one poller, and a
-- release in the same worker wakes them at once. Past lock_timeout the
-- holder is taken to be stuck and the waiter goes ahead without the lock.
--
-- The phase policy (what runs where cosockets cannot), the keepalive pools,
-- the waiters' sharing and the lock's acquire/release are
-- dogpile.cache.cosocket's; this file holds the text protocol's commands and
-- the lock's rules.
local lib = require "dogpile.lib"
local cosocket = require "dogpile.cache.cosocket"
local util = require "dogpile.cache.util"
local mctext = require "dogpile.cache.mctext"

local ngx = ngx
local server_of, read_value, read_line, read_lines, read_values, read_stats =
      mctext.server_of, mctext.read_value, mctext.read_line, mctext.read_lines,
      mctext.read_values, mctext.read_stats
local type, tostring, tonumber, setmetatable, pairs, ipairs, pcall, error, min =
      type, tostring, tonumber, setmetatable, pairs, ipairs, pcall, error, math.min
local find, format = string.find, string.format

lib.own_source()

local _M = {}
_M.COSOCKET = cosocket.COSOCKET

-- backends/memcached.c's constants.
local MAX_KEY = 250
local LOCK_PREFIX = "dogpile-lock:" -- lock_prefix's default
local ITEM_OVERHEAD = 64
-- An expiry memcached reads as a Unix time in 1970: the item is gone at once.
local EXPIRED = 30 * 24 * 3600 + 1
-- Keys per `get` line of a multi-get.
local MULTI_BATCH = 100

local Backend = cosocket.backend({})
Backend.__index = Backend

-- -- Keys -------------------------------------------------------------------------

-- The C backend's check_key, with its message.
local function check_key(key)
    local n = #key
    if n == 0 or n > MAX_KEY or find(key, "[%z\1- \127]") then
        error(format("a key of %d bytes is not a valid memcached key (1 to %d bytes, no spaces "
                     .. "or control characters); the backend's default key_mangler hashes such "
                     .. "keys, a region's own key_mangler must too", n, MAX_KEY), 0)
    end
end

-- `<lock_prefix><key>`, or `<lock_prefix><sha1 hex of key>` past the limit.
local function lock_key(prefix, key)
    if #prefix + #key <= MAX_KEY then
        return prefix .. key
    end
    return prefix .. util.sha1_mangle_key(key)
end
_M.lock_key = lock_key

-- -- Values -----------------------------------------------------------------------

-- A reply that is neither what `op` expects nor an I/O error.
local function refused(op, s, r, kind)
    if r == nil then
        error(kind, 0)
    end
    error(op .. " on server " .. s.addr .. ": " .. tostring(r), 0)
end

function Backend:_get(key)
    check_key(key)
    local s = server_of(self.ring, key)
    -- A table of its own: call() may yield (connecting) before it sends.
    local v, kind = s:call("get", { "get ", key, "\r\n" }, read_value)
    if kind == "hit" or kind == "miss" then
        return v
    end
    refused("get", s, v, kind)
end

-- The server refused a value as too large: say so with the limit it gives.
local function too_big(self, s, vlen)
    local st = s:call("stats settings", "stats settings\r\n", read_stats)
    local limit = type(st) == "table" and tonumber(st.item_size_max)
    if limit and limit > 0 then
        error(format("a value of %d bytes is larger than the item size limit of server %s "
                     .. "(item_size_max = %.0f bytes, with the key and header; memcached -I "
                     .. "sets it)", vlen, s.addr, limit), 0)
    end
    error(format("the server refused a value of %d bytes as larger than its item size limit "
                 .. "(memcached -I)", vlen), 0)
end

-- A user-set item_size_max is checked before sending, as in C.
local function check_size(self, key, vlen)
    local limit = self.item_size_max
    if limit > 0 and vlen + #key + ITEM_OVERHEAD > limit then
        error(format("a value of %d bytes is larger than the item size limit set "
                     .. "(item_size_max = %.0f bytes, less %d bytes for the key and header)",
                     vlen, limit, #key + ITEM_OVERHEAD), 0)
    end
end

-- A set's reply line, checked.
local function stored(self, s, op, r, kind, vlen)
    if kind == "ok" and r == "STORED" then
        return
    elseif kind == "error" and find(r, "too large", 1, true) then
        too_big(self, s, vlen)
    end
    refused(op, s, r, kind)
end

function Backend:_set(key, value)
    check_key(key)
    local vlen = #value
    check_size(self, key, vlen)
    local s = server_of(self.ring, key)
    local r, kind = s:call("set", { "set ", key, self.set_tail, vlen, "\r\n", value, "\r\n" },
                           read_line)
    stored(self, s, "set", r, kind, vlen)
end

function Backend:_delete(key)
    check_key(key)
    local s = server_of(self.ring, key)
    local r, kind = s:call("delete", { "delete ", key, "\r\n" }, read_line)
    if kind == "ok" and (r == "DELETED" or r == "NOT_FOUND") then
        return
    end
    refused("delete", s, r, kind)
end

-- `keys` grouped by server, in the ring's order: {server, {key, ...}}, each
-- key once.
local function by_server(ring, keys)
    local groups, seen = {}, {}
    for i = 1, #keys do
        local k = keys[i]
        if not seen[k] then
            seen[k] = true
            check_key(k)
            local s = server_of(ring, k)
            local g = groups[s]
            if not g then
                g = {}
                groups[s] = g
            end
            g[#g + 1] = k
        end
    end
    local out = {}
    for _, s in ipairs(ring) do
        if groups[s] then
            out[#out + 1] = { s, groups[s] }
        end
    end
    return out
end

function Backend:_get_multi(keys, n, out)
    local found = {}
    for _, g in ipairs(by_server(self.ring, keys)) do
        local s, ks = g[1], g[2]
        local req, nget = {}, 0
        for i = 1, #ks, MULTI_BATCH do
            req[#req + 1] = "get"
            for j = i, min(i + MULTI_BATCH - 1, #ks) do
                req[#req + 1] = " "
                req[#req + 1] = ks[j]
            end
            req[#req + 1] = "\r\n"
            nget = nget + 1
        end
        local r, kind = s:call("get_multi", req, read_values, nget, found)
        if kind ~= "ok" then
            refused("get_multi", s, r, kind)
        end
    end
    for i = 1, n do
        out[i] = found[keys[i]]
    end
end

function Backend:_set_multi(mapping)
    local keys = {}
    for k, v in pairs(mapping) do
        keys[#keys + 1] = k
        check_size(self, k, #v)
    end
    for _, g in ipairs(by_server(self.ring, keys)) do
        local s, ks = g[1], g[2]
        local req, j = {}, 0
        for i = 1, #ks do
            local k = ks[i]
            local v = mapping[k]
            req[j + 1], req[j + 2], req[j + 3], req[j + 4], req[j + 5], req[j + 6], req[j + 7] =
                "set ", k, self.set_tail, #v, "\r\n", v, "\r\n"
            j = j + 7
        end
        local lines, kind = s:call("set", req, read_lines, #ks)
        if lines == nil then
            error(kind, 0)
        end
        for i = 1, #ks do
            local line = lines[i]
            if line ~= "STORED" then
                local ok, err = pcall(stored, self, s, "set", line, kind, #mapping[ks[i]])
                if not ok then
                    error("'" .. ks[i] .. "': " .. err, 0)
                end
            end
        end
    end
end

function Backend:_delete_multi(keys)
    for _, g in ipairs(by_server(self.ring, keys)) do
        local s, ks = g[1], g[2]
        local req = {}
        for i = 1, #ks do
            req[3 * i - 2], req[3 * i - 1], req[3 * i] = "delete ", ks[i], "\r\n"
        end
        local lines, kind = s:call("delete", req, read_lines, #ks)
        if lines == nil then
            error(kind, 0)
        end
        for i = 1, #ks do
            if lines[i] ~= "DELETED" and lines[i] ~= "NOT_FOUND" then
                error("delete on server " .. s.addr .. ": '" .. ks[i] .. "': " .. lines[i], 0)
            end
        end
    end
end

-- -- The lock ---------------------------------------------------------------------

local Mutex = cosocket.mutex_class()

local token_seq = 0

-- The C backend's token shape: pid.seq.seconds.random, in hex but the pid.
local function new_token()
    token_seq = token_seq + 1
    return format("%d.%x.%x.%s", ngx.worker.pid(), token_seq, math.floor(ngx.time()),
                  cosocket.random_hex(8))
end
_M.new_token = new_token
Mutex.new_token = new_token

-- `add` once: true when taken.
function Mutex:take(token)
    local s, lk = self.s, self.lk
    local r, kind = s:call("add of the lock key", { "add ", lk, self.b.lock_tail, #token,
                                                     "\r\n", token, "\r\n" }, read_line)
    if r == nil then
        self:fail("taking", kind)
    elseif kind == "error" then
        self:fail("taking", "add of the lock key on server " .. s.addr .. ": " .. r)
    end
    if r == "STORED" then
        return true
    elseif r == "NOT_STORED" or r == "EXISTS" then
        return false
    end
    self:fail("taking", "add of the lock key on server " .. s.addr .. ": unexpected reply '"
              .. r .. "'")
end

-- The lock key's token, or false when the lock is free.
function Mutex:token_of()
    local s = self.s
    local v, kind = s:call("get of the lock key", { "get ", self.lk, "\r\n" }, read_value)
    if v == nil then
        self:fail("waiting for the release", kind)
    elseif kind == "error" then
        self:fail("waiting for the release", "get of the lock key on server " .. s.addr .. ": "
                  .. v)
    end
    return v
end

-- The compare-and-delete: true when the lock was still ours (now gone).
local function unlock(s, lk, token)
    local v, cas = s:call("gets of the lock key", { "gets ", lk, "\r\n" }, read_value, true)
    if v == nil then
        error(cas, 0)
    elseif cas == "error" then
        error("gets of the lock key on server " .. s.addr .. ": " .. v, 0)
    end
    if v ~= token then
        return false, "evicted, or a restarted server"
    end
    local r, kind = s:call("release (cas) of the lock key", { "cas ", lk, " 0 ", EXPIRED,
                                                               " 0 ", cas, "\r\n\r\n" },
                           read_line)
    if kind == "ok" and r == "STORED" then
        return true
    elseif kind == "ok" and (r == "EXISTS" or r == "NOT_FOUND") then
        -- expired and taken since the gets: theirs now
        return false, "evicted, or a restarted server"
    end
    refused("release (cas) of the lock key", s, r, kind)
end

function Mutex:unlock(token)
    return unlock(self.s, self.lk, token)
end

function Backend:_unlock(lk, token)
    unlock(server_of(self.ring, lk), lk, token)
end

function Mutex:locked()
    return self.token ~= nil or self.stolen or self.unlocked
end

local function get_mutex(self, key)
    local lk = lock_key(self.lock_prefix, key)
    local m = cosocket.new_mutex(Mutex, self, key, lk)
    m.s = server_of(self.ring, lk)
    return m
end

-- -- Opening ----------------------------------------------------------------------

-- A size argument as the C core reads it: bytes, or "64k", "10m", "1g".
local function size_of(v)
    if type(v) == "number" then
        return math.floor(v)
    end
    local n, unit = tostring(v):match("^%s*([%d.eE+-]+)([kKmMgG]?)$")
    local mul = ({ k = 1024, m = 1024 ^ 2, g = 1024 ^ 3 })[unit:lower()] or 1
    return math.floor(tonumber(n) * mul)
end

--- The backend for `name` with the region's `arguments`, which the C
-- backend's reader has accepted (url a "host:port,..." string; no pool_*),
-- its `lock_timeout` as that reader gave it, and the pool's `pool_size`
-- and `pool_idle_timeout`.
function _M.open(name, arguments, lock_timeout, pool_size, pool_idle_timeout, key_mangler)
    local a = arguments
    local function arg(k, default)
        local v = a[k]
        if v == nil then
            return default
        end
        return v
    end
    local url = arg("url", "127.0.0.1:11211")
    local ring = mctext.ring(url, {
        socket_timeout = arg("socket_timeout", 1), connect_timeout = arg("connect_timeout", 1),
        retry_timeout = arg("retry_timeout", 1), dead_timeout = arg("dead_timeout", 1),
        failure_limit = arg("server_failure_limit", 2),
        remove_failed = arg("remove_failed_servers", false),
        pool_size = pool_size or 30, pool_idle_timeout = pool_idle_timeout or 60,
    })
    local expire = math.ceil(arg("memcached_expire_time", 0))
    -- memcached's relative expiry ticks once a second: N lives N - 1 to N
    -- seconds, so ceil(lock_timeout) + 1, at most 30 days (as in C).
    local lock_expire = lock_timeout < 30 * 24 * 3600 - 1 and math.ceil(lock_timeout) + 1
        or 30 * 24 * 3600
    local self = setmetatable({
        name = name, ring = ring, domain = name .. ":" .. url,
        set_tail = " " .. format("%d", arg("flags", 0)) .. " " .. expire .. " ",
        lock_tail = " 0 " .. lock_expire .. " ", lock_prefix = arg("lock_prefix", LOCK_PREFIX),
        item_size_max = a.item_size_max and size_of(a.item_size_max) or 0,
        -- Waiters poll as the C backend's do: 1 ms growing by a quarter.
        lock_timeout = lock_timeout, lock_growth = 1.25,
        lock_step_max = arg("lock_backoff_max", 0.05),
        hits = 0, misses = 0, lock_overruns = 0, key_mangler = key_mangler,
    }, Backend)
    if arg("distributed_lock", true) then
        self.get_mutex = get_mutex
    end
    return self
end

_M.Backend, _M.Mutex = Backend, Mutex

return _M
