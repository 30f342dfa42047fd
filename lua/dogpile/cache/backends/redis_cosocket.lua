--- dogpile.cache.redis and dogpile.cache.redis_sentinel inside nginx: the
-- same arguments, bytes and lock as the C backend (backends/redis.c), over
-- nginx cosockets (dogpile.cache.resp) with a keepalive pool per worker, so
-- that a worker never blocks on Redis. backends/redis.lua picks it when the
-- region is configured inside nginx. Added arguments: `pool_size`
-- (connections kept idle per worker, default 30) and `pool_idle_timeout`
-- (seconds an idle one is kept, default 60). circuit_failures,
-- circuit_cooldown and circuit_slow are the C backend's circuit breaker, the
-- core's own (one per store and worker process: dogpile.cache.cosocket).
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
-- lock's channel and wakes the others at the PUBLISH of the release, or
-- when a poll (1 ms doubling to lock_sleep) finds the key gone or holding
-- another token (an expired lock publishes nothing); a release in the same
-- worker wakes them at once. The release's message carries the value the
-- holder stored: a waiter woken by it reads that instead of a GET, as the
-- C backend's waiters do (its next read of that key only, within 50 ms). Past lock_timeout the holder is taken to be
-- stuck and the waiter goes ahead without the lock, as the C backend does.
--
-- The phase policy (what runs where cosockets cannot), the keepalive pool,
-- the waiters' sharing and the lock's acquire/release are
-- dogpile.cache.cosocket's; this file holds RESP's commands and the lock's
-- rules.
local lib = require "dogpile.lib"
local cosocket = require "dogpile.cache.cosocket"
local resp = require "dogpile.cache.resp"

local ngx = ngx
local encode_into, read_bulk, read_bulks = resp.encode_into, resp.read_bulk, resp.read_bulks
local setmetatable, error, pcall, tonumber, type = setmetatable, error, pcall, tonumber, type
local format, concat, byte, sub = string.format, table.concat, string.byte, string.sub

lib.own_source()

local _M = {}
_M.COSOCKET = cosocket.COSOCKET

-- The C backend's release (backends/redis.c UNLOCK_SCRIPT), byte for byte:
-- given the value's key too (KEYS[2]), it publishes "=" and the value; with
-- the lock key alone (a release handed to a timer), a bare wake-up.
local UNLOCK_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) "
    .. "local v = KEYS[2] and redis.pcall('get', KEYS[2]) "
    .. "if type(v) == 'string' and #v <= 65536 then v = '=' .. v else v = '' end "
    .. "redis.pcall('publish', KEYS[1], v) return 1 "
    .. "else return 0 end"

local CIRCUIT_ARGS = { circuit_failures = true, circuit_cooldown = true, circuit_slow = true }
_M.CIRCUIT_ARGS = CIRCUIT_ARGS

local Backend = cosocket.backend({})
Backend.__index = Backend

-- -- Values -----------------------------------------------------------------------

-- A reply that is an error: raise it, naming the command and server.
local function check(self, op, v, kind)
    if v == nil then
        error(kind, 0)
    elseif kind == "-" then
        error(op .. ": " .. self.s:where() .. ": " .. v, 0)
    end
end

local GET_HEAD = "*2\r\n$3\r\nGET\r\n$"

function Backend:_get(key)
    -- A table of its own: call() may yield (connecting) before it sends.
    local v, kind = self.s:call("GET", { GET_HEAD, #key, "\r\n", key, "\r\n" }, nil,
                                read_bulk)
    if kind == "$" then
        return v
    end
    check(self, "GET", v, kind)
    error("GET: the key holds a value of another type", 0)
end

-- This worker's tag on its change notifications (the C backend's sender
-- tag: 16 bytes that its listener recognises as its own).
local function sender(self)
    local pid = ngx.worker.pid()
    if self.sender_pid ~= pid then
        self.sender, self.sender_pid = cosocket.random_hex(8), pid
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
        encode_into(req, #req + 1, { "PUBLISH", channel, concat(parts) }, 3)
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

function Backend:_delete(key)
    write(self, "DEL", resp.encode({ "DEL", key, n = 2 }), 1, { key })
end

function Backend:_get_multi(keys, n, out)
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

-- -- The lock ---------------------------------------------------------------------

local Mutex = cosocket.mutex_class()

-- 16 random bytes in hex, as the C backend's new_token.
local function new_token()
    return cosocket.random_hex(16)
end
_M.new_token = new_token
Mutex.new_token = new_token

-- SET NX PX once: true when taken.
function Mutex:take(token)
    local b = self.b
    local v, kind = b.s:command("SET NX (lock)", { "SET", self.lk, token, "NX", "PX",
                                                    b.lock_px, n = 6 })
    if v == nil then
        self:fail("taking", kind)
    elseif kind == "-" then
        self:fail("taking", "SET NX (lock): " .. b.s:where() .. ": " .. v)
    end
    return kind == "+"
end

-- The lock key's token, or false when the lock is free.
function Mutex:token_of()
    local v, kind = self.b.s:command("GET (lock)", { "GET", self.lk, n = 2 })
    if v == nil then
        self:fail("waiting for the release", kind)
    elseif kind ~= "$" then
        self:fail("waiting for the release", "GET (lock): the lock key holds a value of "
                  .. "another type")
    end
    return v
end

-- The C backend's release script: true when the lock was still ours.
-- With `key` (the value's), the release's message carries the value stored
-- under it (at most 64 KiB), which the waiters read instead of a GET each.
local function unlock(b, lk, token, key)
    local s = b.s
    local v, kind
    if key then
        v, kind = s:command("EVAL (unlock)", { "EVAL", UNLOCK_SCRIPT, 2, lk, key, token, n = 6 })
    else
        v, kind = s:command("EVAL (unlock)", { "EVAL", UNLOCK_SCRIPT, 1, lk, token, n = 5 })
    end
    check(b, "EVAL (unlock)", v, kind)
    if v ~= 1 then
        return false, format("the lock had expired (lock_timeout %g s) and was no longer ours",
                             b.lock_timeout)
    end
    return true
end

function Mutex:unlock(token)
    return unlock(self.b, self.lk, token, self.key)
end

function Backend:_unlock(lk, token)
    unlock(self, lk, token)
end

function Mutex:locked()
    local v, kind = self.b.s:command("EXISTS (lock)", { "EXISTS", self.lk, n = 2 })
    return kind == ":" and v == 1
end

-- The waiters' watch: a connection SUBSCRIBEd to the lock's channel (a
-- cluster's: SSUBSCRIBEd on the lock key's node), whose first message is the
-- release (the unlock script's PUBLISH or SPUBLISH), carrying the value when
-- the release was given the value's key. A refused or lost subscription
-- only leaves the first waiter polling.
local Watch = {}
Watch.__index = Watch

-- The commands and replies of each kind of subscription.
local PLAIN = { sub = "SUBSCRIBE", unsub = "UNSUBSCRIBE", subscribed = "subscribe",
                unsubscribed = "unsubscribe", message = "message" }
local SHARD = { sub = "SSUBSCRIBE", unsub = "SUNSUBSCRIBE", subscribed = "ssubscribe",
                unsubscribed = "sunsubscribe", message = "smessage" }

-- UNSUBSCRIBE, read up to its confirmation (messages published meanwhile
-- come first), and pool the connection again; close it on any trouble.
local function unsubscribe(s, sock, lk, how)
    local ok = sock:send(resp.encode({ how.unsub, lk, n = 2 }))
    if ok then
        sock:settimeouts(s.connect_ms, s.socket_ms, s.socket_ms)
        for _ = 1, 100 do
            local v, kind = resp.read_reply(sock)
            if v == nil or kind ~= "*" then
                break
            end
            if v[1] == how.unsubscribed and v[3] == 0 then
                s:keep(sock)
                return
            end
        end
    end
    sock:close()
end

--- A watch of lock key `lk`'s channel on server `s` (`shard`: SSUBSCRIBE,
-- Redis 7's sharded pub/sub, on the node serving the key); nil when the
-- server refuses it (an ACL, an older Redis, a moved slot): the waiters then
-- poll; nil and the failure when the server cannot be reached or does not
-- answer: the wait fails then, rather than spend another socket_timeout on
-- its first poll.
local function subscribe(s, lk, shard)
    local how = shard and SHARD or PLAIN
    -- Through the breaker: an open one leaves the wait to token_of, which
    -- fails at once.
    local g = s:enter()
    if not g then
        return nil
    end
    local sock, err = s:connect()
    if not sock then
        s:leave(g, err)
        return nil, err
    end
    local ok
    ok, err = sock:send(resp.encode({ how.sub, lk, n = 2 }))
    local v, kind
    if ok then
        v, kind = resp.read_reply(sock)
    end
    local failure = v == nil and s:io_fail(how.sub, err or kind) or nil
    s:leave(g, failure)
    if not (v and kind == "*" and v[1] == how.subscribed) then
        if v ~= nil and kind == "-" then
            s:keep(sock) -- refused: the connection is as it was
        else
            sock:close()
        end
        return nil, failure
    end
    return setmetatable({ s = s, sock = sock, lk = lk, how = how, reader = nil }, Watch)
end
_M.subscribe = subscribe

function Mutex:watch()
    return subscribe(self.b.s, self.lk)
end

-- The subscription's reader, a light thread of the first waiter: the
-- release's message wakes everyone waiting, with the value it carried
-- ("=" and the bytes; "" for a bare wake-up). Anything else (the server
-- dropping a shard channel whose slot moved) leaves them polling.
local function read_message(sock, g, how)
    local v, kind = resp.read_reply(sock)
    if v ~= nil and kind == "*" and v[1] == how.message then
        local payload = v[3]
        if type(payload) == "string" and byte(payload, 1) == 61 then -- "="
            g:carried(sub(payload, 2))
        end
        g:finish(true)
        return true
    end
    return false
end

-- The lock is held: read the release's message until `deadline` (and a
-- second more). A light thread reads it: a read timeout would be logged by
-- nginx at every poll step.
function Watch:start(g, deadline)
    -- At least 1 ms: 0 would be lua_socket_read_timeout (60 s), and a
    -- negative value raises.
    self.sock:settimeout(math.max(1, math.floor((deadline - ngx.now() + 1) * 1000)))
    local spawned, reader = pcall(ngx.thread.spawn, read_message, self.sock, g, self.how)
    if spawned then
        self.reader = reader
    end
end

function Watch:stop()
    local sock, reader = self.sock, self.reader
    if reader and coroutine.status(reader) ~= "dead" then
        ngx.thread.kill(reader)
        sock:close() -- the reader was cut short mid-read
    else
        if reader then
            ngx.thread.wait(reader)
        end
        unsubscribe(self.s, sock, self.lk, self.how)
    end
end

local function get_mutex(self, key)
    return cosocket.new_mutex(Mutex, self, key, self.s.lock_prefix .. key)
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
    -- The circuit_* arguments are the core's (checked there, below).
    local args = {}
    for k, v in pairs(arguments) do
        if not CIRCUIT_ARGS[k] then
            args[k] = v
        end
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
    -- Waiters poll at 1 ms doubling to lock_sleep, between messages.
    local self = setmetatable({
        name = name, s = s, domain = domain, lock_timeout = lock_timeout,
        lock_px = math.ceil(lock_timeout * 1000), lock_growth = 2, lock_step_max = s.lock_sleep,
        hits = 0, misses = 0, lock_overruns = 0,
    }, Backend)
    -- The C backend's breaker, the core's own: one per store (domain) and
    -- worker process, guarding every round trip to the server.
    self.circuit = cosocket.circuit(name, domain, arguments)
    s.circuit = self.circuit.store or false
    if distributed then
        self.get_mutex = get_mutex
    end
    return self
end

_M.Backend, _M.Mutex = Backend, Mutex

return _M
