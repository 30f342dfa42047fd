--- dogpile.cache.redis and dogpile.cache.redis_sentinel inside nginx: the
-- same arguments, bytes and lock as the C backend (backends/redis.c), over
-- nginx cosockets (dogpile.cache.resp) with a keepalive pool per worker, so
-- that a worker never blocks on Redis. backends/redis.lua picks it when the
-- region is configured inside nginx. Added arguments: `pool_size`
-- (connections kept idle per worker, default 30) and `pool_idle_timeout`
-- (seconds an idle one is kept, default 60).
--
-- Values: the region's serialized envelope, stored with SET [PX
-- redis_expiration_time], read with GET; the multi forms are one MGET, one
-- pipeline of SETs and one DEL, as in C. Nginx workers and plain LuaJIT
-- processes read each other's values byte for byte.
--
-- The lock is the C backend's: SET <lock_prefix><key> <token> NX PX
-- <lock_timeout>, the token 16 random bytes in hex, released by the same
-- script (delete if ours, then PUBLISH on the channel named like the lock
-- key), so nginx workers on every host and plain processes exclude each
-- other. A caller with nothing to serve waits without blocking the worker
-- (wait_unlocked, or acquire(true)): the coroutines of one worker waiting
-- for one lock share one wait; the first SUBSCRIBEs a connection to the
-- lock's channel and wakes the others at the PUBLISH of the release (or
-- when a poll, 1 ms doubling to lock_sleep, finds the key gone or holding
-- another token: an expired lock publishes nothing); a release in the same
-- worker wakes them at once. Past lock_timeout the holder is taken to be
-- stuck and the waiter goes ahead without the lock, as the C backend does.
--
-- Phases where cosockets cannot run (init, init_worker, set, header_filter,
-- body_filter, log, balancer, exit_worker): nothing blocks. get and
-- get_multi are misses; set, set_multi, delete and delete_multi are handed to
-- `ngx.timer.at(0)` (a failure there is logged); the lock is not taken
-- (acquire returns true without it, so the caller runs its creator itself),
-- and wait_unlocked returns false at once.
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local resp = require "dogpile.cache.resp"
local ffi = require "ffi"

local ngx = ngx
local NO_VALUE = api.NO_VALUE
local get_phase = ngx.get_phase
local encode_into, read_bulk, read_bulks = resp.encode_into, resp.read_bulk, resp.read_bulks
local type, tostring, setmetatable, error, pcall, select, min =
      type, tostring, setmetatable, error, pcall, select, math.min
local format = string.format

lib.own_source()

local _M = {}

-- Phases where a cosocket may connect and yield.
local COSOCKET = {
    rewrite = true, server_rewrite = true, access = true, content = true, timer = true,
    ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true, preread = true,
}
_M.COSOCKET = COSOCKET

-- The C backend's release (backends/redis.c UNLOCK_SCRIPT), byte for byte.
local UNLOCK_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) "
    .. "redis.pcall('publish', KEYS[1], '') return 1 "
    .. "else return 0 end"

local Backend = {}
Backend.__index = Backend
-- The region hands us, and expects back, the serialized envelope (bytes).
Backend.serialized = true

local function log(msg)
    local region = package.loaded["dogpile.cache.region"]
    if region and region.log then
        region.log(msg)
    else
        ngx.log(ngx.WARN, msg)
    end
end

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
        log(format("%s: %s dropped: it cannot run in the %s phase and no timer could take it "
                   .. "(%s)", self.name, op, phase, tostring(ok and err or handle)))
    end
end

-- -- Values -----------------------------------------------------------------------

local GET_HEAD = "*2\r\n$3\r\nGET\r\n$"

function Backend:get(key)
    if not COSOCKET[get_phase()] then
        self.misses = self.misses + 1
        return NO_VALUE
    end
    -- A table of its own: call() may yield (connecting) before it sends.
    local v, kind = self.s:call("GET", { GET_HEAD, #key, "\r\n", key, "\r\n" }, nil,
                                read_bulk)
    if kind == "$" then
        if v then
            self.hits = self.hits + 1
            return v
        end
        self.misses = self.misses + 1
        return NO_VALUE
    end
    if v == nil then
        error(kind, 0)
    elseif kind == "-" then
        error("GET: " .. self.s:where() .. ": " .. v, 0)
    end
    error("GET: the key holds a value of another type", 0)
end

local function check(self, op, v, kind)
    if v == nil then
        error(kind, 0)
    elseif kind == "-" then
        error(op .. ": " .. self.s:where() .. ": " .. v, 0)
    end
end

-- This worker's tag on its change notifications (the C backend's sender
-- tag: 16 bytes that its listener recognises as its own).
local function sender(self)
    local pid = ngx.worker.pid()
    if self.sender_pid ~= pid then
        self.sender, self.sender_pid = _M.new_token():sub(1, 16), pid
    end
    return self.sender
end

-- Send the write commands `req` (`ncmd` of them, changing `keys`) and
-- check their replies. With notify_channel, a PUBLISH of the keys follows
-- in the same pipeline, as the C backend does (for dogpile.cache.tiered):
-- "<sender><len>:<key>...".
local function write(self, op, req, ncmd, keys)
    local s = self.s
    local channel = s.notify_channel
    if channel then
        local parts = { sender(self) }
        for i = 1, #keys do
            local k = keys[i]
            parts[i + 1] = #k .. ":" .. k
        end
        encode_into(req, #req + 1, { "PUBLISH", channel, table.concat(parts) }, 3)
        ncmd = ncmd + 1
    end
    local vs, kinds = s:call(op, req, ncmd)
    if vs == nil then
        error(kinds, 0)
    end
    for j = 1, ncmd do
        if kinds[j] == "-" then
            if channel and j == ncmd then
                error(op .. ": PUBLISH on '" .. channel .. "' refused: " .. vs[j], 0)
            end
            error(op .. ": " .. s:where() .. ": " .. vs[j], 0)
        end
    end
end

function Backend:_set(key, value)
    local s = self.s
    local req = {}
    if s.ttl_ms then
        encode_into(req, 1, { "SET", key, value, "PX", s.ttl_ms }, 5)
    else
        encode_into(req, 1, { "SET", key, value }, 3)
    end
    write(self, "SET", req, 1, { key })
end

function Backend:set(key, value)
    local phase = get_phase()
    if not COSOCKET[phase] then
        return defer(self, "set", phase, key, value)
    end
    self:_set(key, value)
end

function Backend:_delete(key)
    write(self, "DEL", resp.encode({ "DEL", key, n = 2 }), 1, { key })
end

function Backend:delete(key)
    local phase = get_phase()
    if not COSOCKET[phase] then
        return defer(self, "delete", phase, key)
    end
    self:_delete(key)
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
    local req = {}
    req[1], req[2], req[3], req[4] = "*", n + 1, "\r\n$4\r\nMGET\r\n", nil
    local j = 4
    for i = 1, n do
        local k = keys[i]
        req[j], req[j + 1], req[j + 2], req[j + 3], req[j + 4] = "$", #k, "\r\n", k, "\r\n"
        j = j + 5
    end
    local v, kind = self.s:call("MGET", req, nil, read_bulks, n, out)
    check(self, "MGET", v, kind)
    local hits = 0
    for i = 1, n do
        if out[i] then
            hits = hits + 1
        else
            out[i] = NO_VALUE
        end
    end
    self.hits, self.misses = self.hits + hits, self.misses + n - hits
    return out
end

function Backend:_set_multi(mapping)
    local s = self.s
    local req, i, n, keys = {}, 1, 0, {}
    local args = { "SET", "", "", "PX", s.ttl_ms }
    local nargs = s.ttl_ms and 5 or 3
    for k, v in pairs(mapping) do
        args[2], args[3] = k, v
        i = encode_into(req, i, args, nargs)
        n = n + 1
        keys[n] = k
    end
    if n == 0 then
        return
    end
    write(self, "SET (pipeline)", req, n, keys)
end

function Backend:set_multi(mapping)
    local phase = get_phase()
    if not COSOCKET[phase] then
        return defer(self, "set_multi", phase, mapping)
    end
    self:_set_multi(mapping)
end

function Backend:_delete_multi(keys)
    local n = #keys
    if n == 0 then
        return
    end
    local args = { "DEL", n = n + 1 }
    for i = 1, n do
        args[i + 1] = keys[i]
    end
    write(self, "DEL", resp.encode(args), 1, keys)
end

function Backend:delete_multi(keys)
    local phase = get_phase()
    if not COSOCKET[phase] then
        return defer(self, "delete_multi", phase, keys)
    end
    self:_delete_multi(keys)
end

function Backend:stats()
    return { hits = self.hits, misses = self.misses, lock_overruns = self.lock_overruns }
end

-- -- The lock ---------------------------------------------------------------------

pcall(ffi.cdef, "long getrandom(void *buf, size_t buflen, unsigned int flags);")
local token_buf = ffi.new("uint8_t[16]")
local token_seq = 0

-- 16 random bytes in hex, as the C backend's new_token.
local function new_token()
    if ffi.C.getrandom(token_buf, 16, 0) ~= 16 then
        -- Not expected; still unique per worker and moment.
        token_seq = token_seq + 1
        local s = format("%016x%08x%08x", math.floor(ngx.now() * 1e6), ngx.worker.pid() % 2^32,
                         token_seq % 2^32)
        return s:sub(1, 32)
    end
    local t = {}
    for i = 0, 15 do
        t[i + 1] = format("%02x", token_buf[i])
    end
    return table.concat(t)
end
_M.new_token = new_token

-- The waits of this worker, by lock (domain and lock key): the coroutines
-- waiting for one lock's release share one record {sema, n, listening,
-- done, result}; `held` marks the locks a coroutine of this worker holds,
-- whose release wakes the waiters directly.
local waits, held = {}, {}
local semaphore

local function new_group()
    semaphore = semaphore or require("ngx.semaphore")
    return { sema = semaphore.new(), n = 0, listening = false, done = false, result = false }
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

-- SET NX PX once: true when taken.
local function try_set(self)
    local b = self.b
    local token = new_token()
    local v, kind = b.s:command("SET NX (lock)", { "SET", self.lk, token, "NX", "PX",
                                                    b.lock_px, n = 6 })
    if v == nil then
        lock_failed(self, "taking", kind)
    elseif kind == "-" then
        lock_failed(self, "taking", "SET NX (lock): " .. b.s:where() .. ": " .. v)
    end
    if kind == "+" then
        self.token = token
        self.since = ngx.now()
        held[self.gk] = true
        return true
    end
    return false
end

-- The lock key's token, or false when the lock is free.
local function token_of(self)
    local b = self.b
    local v, kind = b.s:command("GET (lock)", { "GET", self.lk, n = 2 })
    if v == nil then
        lock_failed(self, "waiting for the release", kind)
    elseif kind ~= "$" then
        lock_failed(self, "waiting for the release", "GET (lock): the lock key holds a value "
                    .. "of another type")
    end
    return v
end

-- UNSUBSCRIBE, read up to its confirmation (messages published meanwhile
-- come first), and pool the connection again; close it on any trouble.
local function unsubscribe(s, sock, lk)
    local ok = sock:send(resp.encode({ "UNSUBSCRIBE", lk, n = 2 }))
    if ok then
        sock:settimeouts(s.connect_ms, s.socket_ms, s.socket_ms)
        for _ = 1, 100 do
            local v, kind = resp.read_reply(sock)
            if v == nil or kind ~= "*" then
                break
            end
            if v[1] == "unsubscribe" and v[3] == 0 then
                s:keep(sock)
                return
            end
        end
    end
    sock:close()
end

-- The subscription's reader, a light thread of the first waiter: the first
-- message on the lock's channel is the release (the unlock script's
-- PUBLISH): everyone waiting may look. A lost subscription only leaves the
-- first waiter polling.
local function read_message(sock, gk, g)
    local v = resp.read_reply(sock)
    if v ~= nil then
        finish(gk, g, true)
    end
    return v ~= nil
end

local function subscribe(s, lk)
    local sock = s:connect()
    if not sock then
        return nil
    end
    local ok = sock:send(resp.encode({ "SUBSCRIBE", lk, n = 2 }))
    local v, kind
    if ok then
        v, kind = resp.read_reply(sock)
    end
    if not (v and kind == "*" and v[1] == "subscribe") then
        sock:close()
        return nil
    end
    return sock
end

-- The wait of the first waiter of this worker: subscribe to the lock's
-- channel, read the holder's token, then wait (on the group's semaphore,
-- like the others) for the release's message, or for a poll (1 ms doubling
-- to lock_sleep) that finds the token gone or changed (an expired lock
-- publishes nothing), until `deadline`. The message is read by a light
-- thread: a read timeout would be logged by nginx at every poll step.
-- Returns the result and the subscribed connection, and the reader.
local function listen(self, gk, g, deadline)
    local b = self.b
    local sock = subscribe(b.s, self.lk)
    local reader
    local ok, result = pcall(function()
        local first = token_of(self)
        if not first then
            return true
        end
        if sock then
            sock:settimeout(math.floor((deadline - ngx.now() + 1) * 1000))
            local spawned
            spawned, reader = pcall(ngx.thread.spawn, read_message, sock, gk, g)
            if not spawned then
                reader = nil
            end
        end
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
            step = min(step * 2, b.lock_sleep)
            if token_of(self) ~= first then
                return true
            end
        end
        return g.result
    end)
    return ok, result, sock, reader
end

-- Wait until the lock's holder now lets go, or `deadline`. true: released.
local function wait_release(self, deadline)
    local gk = self.gk
    local g = waits[gk]
    if g == nil then
        g = new_group()
        waits[gk] = g
    end
    if not held[gk] and not g.listening then
        g.listening = true
        local ok, result, sock, reader = listen(self, gk, g, deadline)
        finish(gk, g, ok and result)
        if sock then
            if reader and coroutine.status(reader) ~= "dead" then
                ngx.thread.kill(reader)
                sock:close() -- the reader was cut short mid-read
            else
                if reader then
                    ngx.thread.wait(reader)
                end
                unsubscribe(self.b.s, sock, self.lk)
            end
        end
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
    if try_set(self) then
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
        if try_set(self) then
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

function Mutex:release()
    local b = self.b
    if self.unlocked then
        self.unlocked = false
        return
    end
    local gk = self.gk
    if self.stolen then
        self.stolen = false
        return
    end
    local token = self.token
    if not token then
        error("dogpile: release of the lock for key '" .. self.key .. "', which is not held "
              .. "through this mutex", 0)
    end
    self.token = nil
    held[gk] = nil
    local g = waits[gk]
    if g and not g.listening then
        finish(gk, g, true)
    end
    local phase = get_phase()
    if not COSOCKET[phase] then
        -- An async runner's release from a phase that cannot yield.
        return defer(b, "unlock", phase, self.lk, token)
    end
    local v, kind = b.s:command("EVAL (unlock)", { "EVAL", UNLOCK_SCRIPT, 1, self.lk, token,
                                                    n = 5 })
    if v == nil then
        lock_failed(self, "release", kind)
    elseif kind == "-" then
        lock_failed(self, "release", "EVAL (unlock): " .. b.s:where() .. ": " .. v)
    end
    local held_for = ngx.now() - self.since
    if v ~= 1 or held_for > b.lock_timeout then
        -- Not the caller's error: the value was made. Count it and say so.
        b.lock_overruns = b.lock_overruns + 1
        log(format("%s: the lock for key '%s' was held for %.3f s, longer than lock_timeout "
                   .. "(%s s): another caller may have created the value too", b.name,
                   self.key, held_for, tostring(b.lock_timeout)))
    end
end

function Backend:_unlock(lk, token)
    self.s:command("EVAL (unlock)", { "EVAL", UNLOCK_SCRIPT, 1, lk, token, n = 5 })
end

function Mutex:locked()
    local v, kind = self.b.s:command("EXISTS (lock)", { "EXISTS", self.lk, n = 2 })
    return kind == ":" and v == 1
end

local function get_mutex(self, key)
    local lk = self.s.lock_prefix .. key
    return setmetatable({ b = self, key = key, lk = lk, gk = self.domain .. "\n" .. lk,
                          token = nil, stolen = false, unlocked = false, gave_up = false,
                          since = 0 }, Mutex)
end

-- -- Opening ----------------------------------------------------------------------

--- The backend for `name` with the region's `arguments` (lock_timeout
-- already checked by backends/redis.lua; `distributed` false: no lock of
-- its own, the region's is used). `rest.sentinels` is "host:port,...".
-- @raise on a bad argument
function _M.open(name, arguments, lock_timeout, distributed, rest)
    local sentinels
    if rest and rest.sentinels then
        sentinels = {}
        for host, port in rest.sentinels:gmatch("([^,]+):(%d+)") do
            sentinels[#sentinels + 1] = { host, tonumber(port) }
        end
    end
    local args = {}
    for k, v in pairs(arguments) do
        args[k] = v
    end
    args.lock_timeout = lock_timeout
    local s, err = resp.server(name, args, sentinels)
    if not s then
        lib.raise(err)
    end
    local domain
    if sentinels then
        domain = format("%s:%s/%d/%s", name, s.service, s.db, s.lock_prefix)
    elseif s.unix then
        domain = format("dogpile.cache.redis:unix:%s/%d/%s", s.unix, s.db, s.lock_prefix)
    else
        domain = format("dogpile.cache.redis:%s:%d/%d/%s", s.host, s.port, s.db, s.lock_prefix)
    end
    local self = setmetatable({
        name = name, s = s, domain = domain, lock_timeout = lock_timeout,
        lock_px = math.ceil(lock_timeout * 1000), lock_sleep = s.lock_sleep,
        hits = 0, misses = 0, lock_overruns = 0,
    }, Backend)
    if distributed then
        self.get_mutex = get_mutex
    end
    return self
end

_M.Backend, _M.Mutex = Backend, Mutex

return _M
