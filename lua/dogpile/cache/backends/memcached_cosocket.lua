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
-- Phases where cosockets cannot run (init, init_worker, set,
-- header_filter, body_filter, log, balancer, exit_worker): nothing blocks.
-- get and get_multi are misses; set, set_multi, delete and delete_multi are
-- handed to `ngx.timer.at(0)` (a failure there is logged); the lock is not
-- taken (acquire returns true without it, so the caller runs its creator
-- itself), and wait_unlocked returns false at once.
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local context = require "dogpile.context"
local util = require "dogpile.cache.util"
local mctext = require "dogpile.cache.mctext"
local ffi = require "ffi"

local ngx = ngx
local NO_VALUE = api.NO_VALUE
local get_phase = ngx.get_phase
local server_of, read_value, read_line, read_lines, read_values, read_stats =
      mctext.server_of, mctext.read_value, mctext.read_line, mctext.read_lines,
      mctext.read_values, mctext.read_stats
local type, tostring, tonumber, setmetatable, pairs, ipairs, next, pcall, error, min =
      type, tostring, tonumber, setmetatable, pairs, ipairs, next, pcall, error, math.min
local find, format = string.find, string.format

lib.own_source()

local _M = {}

-- Phases where a cosocket may connect and yield (as for redis).
local COSOCKET = {
    rewrite = true, server_rewrite = true, access = true, content = true, timer = true,
    ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true, preread = true,
}
_M.COSOCKET = COSOCKET

-- backends/memcached.c's constants.
local MAX_KEY = 250
local LOCK_PREFIX = "dogpile-lock:" -- lock_prefix's default
local ITEM_OVERHEAD = 64
-- An expiry memcached reads as a Unix time in 1970: the item is gone at once.
local EXPIRED = 30 * 24 * 3600 + 1
-- Keys per `get` line of a multi-get.
local MULTI_BATCH = 100

local Backend = {}
Backend.__index = Backend
-- The region hands us, and expects back, the serialized envelope (bytes).
Backend.serialized = true

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

-- -- Work handed to a timer -------------------------------------------------------

local function deferred(premature, self, op, phase, a, b)
    if premature then
        return
    end
    local ok, err = pcall(self["_" .. op], self, a, b)
    if not ok then
        local key = type(a) == "string" and a or (type(a) == "table" and (a[1] or next(a)))
        ngx.log(ngx.ERR, self.name, ": ", op, key and (" '" .. tostring(key) .. "'") or "",
                " failed (deferred from the ", phase, " phase): ", tostring(err))
    end
end

-- `op` (set, delete, set_multi, delete_multi, unlock) in a phase that
-- cannot yield: run it in a timer.
local function defer(self, op, phase, a, b)
    local ok, handle, err = pcall(ngx.timer.at, 0, deferred, self, op, phase, a, b)
    if not (ok and handle) then
        context.log(format("%s: %s dropped: it cannot run in the %s phase and no timer could "
                           .. "take it (%s)", self.name, op, phase, tostring(ok and err or handle)))
    end
end

-- -- Values -----------------------------------------------------------------------

-- A reply that is neither what `op` expects nor an I/O error.
local function refused(op, s, r, kind)
    if r == nil then
        error(kind, 0)
    end
    error(op .. " on server " .. s.addr .. ": " .. tostring(r), 0)
end

function Backend:get(key)
    if not COSOCKET[get_phase()] then
        self.misses = self.misses + 1
        return NO_VALUE
    end
    check_key(key)
    local s = server_of(self.ring, key)
    -- A table of its own: call() may yield (connecting) before it sends.
    local v, kind = s:call("get", { "get ", key, "\r\n" }, read_value)
    if kind == "hit" then
        self.hits = self.hits + 1
        return v
    elseif kind == "miss" then
        self.misses = self.misses + 1
        return NO_VALUE
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

function Backend:set(key, value)
    local phase = get_phase()
    if not COSOCKET[phase] then
        return defer(self, "set", phase, key, value)
    end
    self:_set(key, value)
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

function Backend:delete(key)
    local phase = get_phase()
    if not COSOCKET[phase] then
        return defer(self, "delete", phase, key)
    end
    self:_delete(key)
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

function Backend:get_multi(keys)
    local n = #keys
    local out = {}
    if n == 0 then
        return out
    end
    if not COSOCKET[get_phase()] then
        for i = 1, n do
            out[i] = NO_VALUE
        end
        self.misses = self.misses + n
        return out
    end
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
    local hits = 0
    for i = 1, n do
        local v = found[keys[i]]
        if v then
            hits = hits + 1
            out[i] = v
        else
            out[i] = NO_VALUE
        end
    end
    self.hits, self.misses = self.hits + hits, self.misses + n - hits
    return out
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

function Backend:set_multi(mapping)
    local phase = get_phase()
    if not COSOCKET[phase] then
        return defer(self, "set_multi", phase, mapping)
    end
    if next(mapping) ~= nil then
        self:_set_multi(mapping)
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

function Backend:delete_multi(keys)
    local phase = get_phase()
    if not COSOCKET[phase] then
        return defer(self, "delete_multi", phase, keys)
    end
    if #keys > 0 then
        self:_delete_multi(keys)
    end
end

function Backend:stats()
    return { hits = self.hits, misses = self.misses, lock_overruns = self.lock_overruns }
end

-- -- The lock ---------------------------------------------------------------------

pcall(ffi.cdef, "long getrandom(void *buf, size_t buflen, unsigned int flags);")
local rand_buf = ffi.new("uint32_t[2]")
local token_seq = 0

-- The C backend's token shape: pid.seq.seconds.random, in hex but the pid.
local function new_token()
    token_seq = token_seq + 1
    if ffi.C.getrandom(rand_buf, 8, 0) ~= 8 then
        rand_buf[0], rand_buf[1] = math.random(0, 2^31), ngx.now() * 1e6 % 2^32
    end
    return format("%d.%x.%x.%08x%08x", ngx.worker.pid(), token_seq, math.floor(ngx.time()),
                  rand_buf[0], rand_buf[1])
end
_M.new_token = new_token

-- The waits of this worker, by lock (domain and lock key): the coroutines
-- waiting for one lock's release share one record {sema, n, polling, done,
-- result}; `held` marks the locks a coroutine of this worker holds, whose
-- release wakes the waiters directly.
local waits, held = {}, {}
local semaphore

local function new_group()
    semaphore = semaphore or require("ngx.semaphore")
    return { sema = semaphore.new(), n = 0, polling = false, done = false, result = false }
end

-- Everyone waiting in this record may look now.
local function finish(gk, g, result)
    if g.done then
        return
    end
    g.done, g.result = true, result
    if waits[gk] == g then
        waits[gk] = nil
    end
    if g.n > 0 then
        g.sema:post(g.n)
    end
end

local Mutex = {}
Mutex.__index = Mutex

local function lock_failed(self, what, msg)
    error(self.b.name .. ": " .. what .. " of the lock for key '" .. self.key .. "': "
          .. tostring(msg), 0)
end

-- `add` once: true when taken.
local function try_add(self)
    local b, s, lk = self.b, self.s, self.lk
    local token = new_token()
    local r, kind = s:call("add of the lock key", { "add ", lk, b.lock_tail, #token, "\r\n",
                                                     token, "\r\n" }, read_line)
    if r == nil then
        lock_failed(self, "taking", kind)
    elseif kind == "error" then
        lock_failed(self, "taking", "add of the lock key on server " .. s.addr .. ": " .. r)
    end
    if r == "STORED" then
        self.token = token
        self.since = ngx.now()
        held[self.gk] = true
        return true
    elseif r == "NOT_STORED" or r == "EXISTS" then
        return false
    end
    lock_failed(self, "taking", "add of the lock key on server " .. s.addr
                .. ": unexpected reply '" .. r .. "'")
end

-- The lock key's token, or false when the lock is free.
local function token_of(self)
    local s = self.s
    local v, kind = s:call("get of the lock key", { "get ", self.lk, "\r\n" }, read_value)
    if v == nil then
        lock_failed(self, "waiting for the release", kind)
    elseif kind == "error" then
        lock_failed(self, "waiting for the release", "get of the lock key on server " .. s.addr
                    .. ": " .. v)
    end
    return v
end

-- The first waiter of this worker: read the holder's token, then look
-- again at the C backend's backoff steps (waiting on the group's semaphore,
-- which a release in this worker posts) until it is gone or another's, or
-- `deadline`.
local function poll(self, g, deadline)
    local first = token_of(self)
    if not first then
        return true
    end
    local b = self.b
    local step = 0.001
    while not g.done do
        local left = deadline - ngx.now()
        if left <= 0 then
            return false
        end
        g.n = g.n + 1
        g.sema:wait(min(step, left))
        g.n = g.n - 1
        if g.done then
            break
        end
        step = min(step * 1.25, b.lock_backoff_max)
        if token_of(self) ~= first then
            return true
        end
    end
    return g.result
end

-- Wait until the lock's holder now lets go, or `deadline`. true: released.
local function wait_release(self, deadline)
    local gk = self.gk
    local g = waits[gk]
    if g == nil then
        g = new_group()
        waits[gk] = g
    end
    if not held[gk] and not g.polling then
        g.polling = true
        local ok, result = pcall(poll, self, g, deadline)
        finish(gk, g, ok and result)
        if not ok then
            error(result, 0)
        end
        return g.result
    end
    g.n = g.n + 1
    g.sema:wait(math.max(0.001, deadline - ngx.now()))
    g.n = g.n - 1
    return g.done and g.result
end

local function check_free(self)
    if self.token or self.stolen or self.unlocked then
        error(self.b.name .. ": the lock for key '" .. self.key .. "' is already held through "
              .. "this mutex", 0)
    end
end

--- `wait` nil or true: wait, yielding, for at most lock_timeout (then go
-- ahead without the lock: its holder is stuck); false: try once. In a phase
-- that cannot yield: true at once, without the lock.
function Mutex:acquire(wait)
    check_free(self)
    if not COSOCKET[get_phase()] then
        self.unlocked = true
        return true
    end
    local gave_up = self.gave_up
    self.gave_up = false
    if held[self.gk] and wait == false then
        return false -- held in this worker: no round trip needed to know
    end
    if try_add(self) then
        return true
    end
    if wait == false then
        return false
    end
    if gave_up then
        -- wait_unlocked already waited lock_timeout for this holder: stuck.
        self.stolen = true
        return true
    end
    local deadline = ngx.now() + self.b.lock_timeout
    while true do
        wait_release(self, deadline)
        if try_add(self) then
            return true
        end
        if ngx.now() >= deadline then
            self.stolen = true
            return true -- stuck holder: go ahead without the lock
        end
    end
end

--- Wait, without taking the lock, until its holder now releases it (at once
-- when it is free), for at most lock_timeout. true: released; false: still
-- held then, or a phase that cannot yield.
function Mutex:wait_unlocked()
    check_free(self)
    if not COSOCKET[get_phase()] then
        return false
    end
    local released = wait_release(self, ngx.now() + self.b.lock_timeout)
    if not released then
        self.gave_up = true
    end
    return released
end

-- The compare-and-delete: true when the lock was still ours (now gone).
local function unlock(b, s, lk, token)
    local v, cas = s:call("gets of the lock key", { "gets ", lk, "\r\n" }, read_value, true)
    if v == nil then
        error(cas, 0)
    elseif cas == "error" then
        error("gets of the lock key on server " .. s.addr .. ": " .. v, 0)
    end
    if v ~= token then
        return false
    end
    local r, kind = s:call("release (cas) of the lock key", { "cas ", lk, " 0 ", EXPIRED,
                                                               " 0 ", cas, "\r\n\r\n" },
                           read_line)
    if kind == "ok" and r == "STORED" then
        return true
    elseif kind == "ok" and (r == "EXISTS" or r == "NOT_FOUND") then
        return false -- expired and taken since the gets: theirs now
    end
    refused("release (cas) of the lock key", s, r, kind)
end

function Mutex:release()
    local b = self.b
    if self.unlocked then
        self.unlocked = false
        return
    end
    if self.stolen then
        self.stolen = false
        return
    end
    local token = self.token
    if not token then
        error("dogpile: release of the lock for key '" .. self.key .. "', which is not held "
              .. "through this mutex", 0)
    end
    local gk = self.gk
    self.token = nil
    held[gk] = nil
    local g = waits[gk]
    if g and not g.polling then
        finish(gk, g, true)
    end
    local phase = get_phase()
    if not COSOCKET[phase] then
        -- An async runner's release from a phase that cannot yield.
        return defer(b, "unlock", phase, self.key, token)
    end
    local ok, ours = pcall(unlock, b, self.s, self.lk, token)
    if not ok then
        lock_failed(self, "release", ours)
    end
    local held_for = ngx.now() - self.since
    if held_for > b.lock_timeout then
        -- Not the caller's error: the value was made. Count it and say so.
        b.lock_overruns = b.lock_overruns + 1
        context.log(format("%s: the lock for key '%s' was held for %.3f s, longer than "
                           .. "lock_timeout (%s s): another caller may have created the value "
                           .. "too", b.name, self.key, held_for, tostring(b.lock_timeout)))
    elseif not ours then
        b.lock_overruns = b.lock_overruns + 1
        context.log(format("%s: the lock for key '%s' was no longer held when released after "
                           .. "%.3f s (evicted, or a restarted server): another caller may "
                           .. "have created the value too", b.name, self.key, held_for))
    end
end

function Backend:_unlock(key, token)
    local lk = lock_key(self.lock_prefix, key)
    unlock(self, server_of(self.ring, lk), lk, token)
end

function Mutex:locked()
    return self.token ~= nil or self.stolen or self.unlocked
end

local function get_mutex(self, key)
    local lk = lock_key(self.lock_prefix, key)
    return setmetatable({ b = self, key = key, lk = lk, s = server_of(self.ring, lk),
                          gk = self.domain .. "\n" .. lk, token = nil, stolen = false,
                          unlocked = false, gave_up = false, since = 0 }, Mutex)
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
        lock_timeout = lock_timeout, lock_backoff_max = arg("lock_backoff_max", 0.05),
        hits = 0, misses = 0, lock_overruns = 0, key_mangler = key_mangler,
    }, Backend)
    if arg("distributed_lock", true) then
        self.get_mutex = get_mutex
    end
    return self
end

_M.Backend, _M.Mutex = Backend, Mutex

return _M
