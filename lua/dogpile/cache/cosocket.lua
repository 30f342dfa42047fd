--- What every backend that talks to its server over nginx cosockets needs
-- (redis_cosocket over dogpile.cache.resp, memcached_cosocket over
-- dogpile.cache.mctext), written once. A backend file then holds its
-- protocol and its lock rules (how a lock key is taken, read and released),
-- nothing else.
--
-- Phases. Cosockets connect and yield in rewrite, access, content, timer,
-- ssl_* and preread; elsewhere (init, init_worker, set, header_filter,
-- body_filter, log, balancer, exit_worker) nothing blocks: get and get_multi
-- are misses; set, set_multi, delete, delete_multi and a lock's release are
-- handed to `ngx.timer.at(0)` (a failure there is logged); the lock is not
-- taken (acquire returns true without it, so the caller runs its creator
-- itself), and wait_unlocked returns false at once.
--
-- Servers. Each server keeps a keepalive pool per worker (`pool_size`
-- connections idle at most, each for `pool_idle_timeout` seconds) whose name
-- carries a generation: a connection that saw an I/O or protocol error is
-- closed and the generation bumped, so that the idle connections opened
-- before are left to expire and the next operation connects anew (a
-- restarted server is used again without reloading nginx). Connecting is
-- bounded by connect_timeout, each send and read by socket_timeout; an
-- operation that fails on a reused connection because the server closed it
-- is retried once on a fresh one. Every round trip goes through the
-- server's circuit breaker, the C core's own ("Circuit breakers" below).
--
-- The lock's waiters. The coroutines of one worker waiting for one lock
-- share one wait: the first asks the server (polls the lock key, 1 ms
-- growing by the backend's factor up to its limit, and may also watch for
-- the release, as redis SUBSCRIBEs), the others sleep on its semaphore; all
-- are woken when it sees the release, or at once by a release in this
-- worker. Past lock_timeout the holder is taken to be stuck and the waiter
-- goes ahead without the lock, as the C backends do.
local lib = require "dogpile.lib"
local context = require "dogpile.context"
local api = require "dogpile.cache.api"
local ffi = require "ffi"

local ngx = ngx
local NO_VALUE = api.NO_VALUE
-- Loaded outside nginx too (resp's encoder and reader serve the CLI there).
local get_phase = ngx and ngx.get_phase
local type, tostring, tonumber, next, pcall, error, setmetatable, ipairs, min, max, floor =
      type, tostring, tonumber, next, pcall, error, setmetatable, ipairs, math.min, math.max,
      math.floor
local jit = require "jit"
local format, concat, find, sub = string.format, table.concat, string.find, string.sub

lib.own_source()

local _M = {}

-- -- Phases -----------------------------------------------------------------------

-- Phases where a cosocket may connect and yield.
local COSOCKET = {
    rewrite = true, server_rewrite = true, access = true, content = true, timer = true,
    ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true, preread = true,
}
_M.COSOCKET = COSOCKET

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

--- `op` (set, delete, set_multi, delete_multi, unlock) of backend `self`
-- in a phase that cannot yield: self["_" .. op](self, a, b) runs in a timer.
local function defer(self, op, phase, a, b)
    local ok, handle, err = pcall(ngx.timer.at, 0, deferred, self, op, phase, a, b)
    if not (ok and handle) then
        context.log(format("%s: %s dropped: it cannot run in the %s phase and no timer could "
                           .. "take it (%s)", self.name, op, phase, tostring(ok and err or handle)))
    end
end
_M.defer = defer

-- -- A release's value --------------------------------------------------------------------
-- The C backend's stash (backends/redis.c): a waiter woken by a release
-- whose message carried the value keeps it for its very next operation on
-- the backend, for at most STASH_SECONDS: a get of that key is then served
-- from it, without a round trip; any other operation drops it. Per
-- coroutine (a request's, or a light thread's), as the C one is per thread.

local STASH_SECONDS = 0.05
local running = coroutine.running
local stash = setmetatable({}, { __mode = "k" })

-- The stashed value of `key` on backend `b` for this coroutine, or nil;
-- the stash is dropped either way.
local function stash_take(b, key)
    local co = running()
    local st = stash[co]
    if st == nil then
        return nil
    end
    stash[co] = nil
    if st.b == b and st.key == key and ngx.now() - st.at <= STASH_SECONDS then
        return st.value
    end
    return nil
end

local function stash_drop()
    if next(stash) ~= nil then
        stash[running()] = nil
    end
end

-- -- The backend's public operations ---------------------------------------------------

local function write(op)
    local run = "_" .. op
    return function(self, a, b)
        stash_drop()
        local phase = get_phase()
        if not COSOCKET[phase] then
            return defer(self, op, phase, a, b)
        end
        return self[run](self, a, b)
    end
end

--- Give `Backend` the region's operations, each applying the phase policy
-- and counting hits and misses around the protocol's own: _get(key) (the
-- value, or false for a miss), _get_multi(keys, n, out) (out[i] the value
-- of keys[i], or false or nil for a miss), _set(key, value), _delete(key),
-- _set_multi(mapping), _delete_multi(keys). Each raises on failure, with
-- the operation and server named. Instances have name, hits, misses and
-- lock_overruns.
function _M.backend(Backend)
    -- The region hands us, and expects back, the serialized envelope (bytes).
    Backend.serialized = true

    function Backend:get(key)
        if not COSOCKET[get_phase()] then
            self.misses = self.misses + 1
            return NO_VALUE
        end
        local v = next(stash) ~= nil and stash_take(self, key) or self:_get(key)
        if v then
            self.hits = self.hits + 1
            return v
        end
        self.misses = self.misses + 1
        return NO_VALUE
    end

    function Backend:get_multi(keys)
        stash_drop()
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
        self:_get_multi(keys, n, out)
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

    Backend.set = write("set")
    Backend.delete = write("delete")
    Backend.set_multi = write("set_multi")
    Backend.delete_multi = write("delete_multi")

    -- evictions (none: the server evicts), as the C backends say, so that
    -- the region reads the breaker's figures too (region:stats()).
    function Backend:stats()
        local out = { hits = self.hits, misses = self.misses, lock_overruns = self.lock_overruns,
                      evictions = 0 }
        if self.circuit then
            self.circuit:stats(out)
        end
        return out
    end
    return Backend
end

-- -- Arguments --------------------------------------------------------------------------

--- The pool arguments, checked: pool_size (connections kept idle per
-- worker, and per server where there are several: `per` says which; default
-- 30) and pool_idle_timeout (seconds, default 60). nil, err when one is bad.
function _M.pool_args(name, pool_size, pool_idle_timeout, per)
    if pool_size ~= nil and (type(pool_size) ~= "number" or pool_size < 1
                             or pool_size ~= floor(pool_size)) then
        return nil, format("%s: pool_size must be a positive integer (connections kept idle per "
                           .. "%s), got %s", name, per, tostring(pool_size))
    end
    local idle = pool_idle_timeout
    if idle ~= nil and (type(idle) ~= "number" or not (idle > 0) or idle == math.huge) then
        return nil, format("%s: pool_idle_timeout must be a positive number of seconds, got %s",
                           name, tostring(idle))
    end
    return pool_size or 30, idle or 60
end

-- -- Servers ----------------------------------------------------------------------------
-- The base of a protocol's server: fields connect_ms, socket_ms, idle_ms,
-- pool_size, gen; methods connect(op) (sock, reused; or nil, message),
-- pool_name(addr), io_fail(op, err) (the message for an I/O failure, in the
-- wording of the protocol's C backend) and optionally settle (see exchange).

local Server = {}
Server.__index = Server
_M.Server = Server

--- A protocol's server class, inheriting these methods.
function _M.server_class()
    local S = setmetatable({}, Server)
    S.__index = S
    return S
end

--- The options of sock:connect() for `addr`: the pool's name (pool_name and
-- the generation) and size.
function Server:pool_opts(addr)
    local opts = self.opts
    if opts == nil or self.opts_gen ~= self.gen or self.opts_addr ~= addr then
        opts = { pool = self:pool_name(addr) .. "#" .. self.gen, pool_size = self.pool_size }
        self.opts, self.opts_gen, self.opts_addr = opts, self.gen, addr
    end
    return opts
end

--- A socket connected to `host`:`port` (port nil: host is "unix:<path>"),
-- from the pool `opts` names (nil: none) when it has one: sock, reused;
-- or nil, err ("timeout" when connect_timeout passed).
function Server:open(host, port, opts)
    local sock = ngx.socket.tcp()
    sock:settimeouts(self.connect_ms, self.socket_ms, self.socket_ms)
    local ok, err
    if port then
        ok, err = sock:connect(host, port, opts)
    else
        ok, err = sock:connect(host, opts)
    end
    if not ok then
        return nil, err
    end
    return sock, sock:getreusedtimes() > 0
end

--- Give a connection back to the pool (in step: every reply read).
function Server:keep(sock)
    sock:setkeepalive(self.idle_ms, self.pool_size)
end

--- Forget the pooled connections: a new generation of the pool's name.
function Server:broken()
    self.gen = self.gen + 1
end

--- After a reply (r1 not nil): pool the connection, or close it, and say
-- what the caller gets. The default pools it and returns r1, r2.
function Server:settle(sock, _, r1, r2)
    self:keep(sock)
    return r1, r2
end

-- -- Circuit breakers ------------------------------------------------------------------
-- The C backends' breaker (core/breaker.c), the very same one: the core is
-- loaded in every worker, so a cosocket backend joins the breaker of its
-- store through the FFI, per worker process (the core's registry is per
-- process), with the core's arguments, checks, messages, states and stats.
-- The core makes a store's breaker only inside dp_backend_open, for a
-- backend registered under a networked name, and hands it to the backend
-- through dp_backend_ops.server_circuits; so each public name gets a stand-in
-- C backend, "<name>#cosocket", whose ops are FFI callbacks that do nothing
-- but note what the core hands over (never called on a hot path: only while
-- a region opens). The stand-in's lock domain names the store (server, db,
-- lock prefix; a cluster's startup nodes and lock prefix), so every region
-- of a worker on one store shares its breaker, as in C.

for _, decl in ipairs({
    "typedef struct dp_circuit dp_circuit;",
    "typedef struct dp_circuit_guard { double t0; int probe; } dp_circuit_guard;",
    "int dp_circuit_server(dp_circuit *store, const char *server, dp_circuit **out);",
    "int dp_circuit_enter(dp_circuit *c, dp_circuit_guard *g, dp_err *err);",
    "int dp_circuit_leave(dp_circuit *c, const dp_circuit_guard *g, int rc, dp_err *err);",
    "int dp_circuit_declare(const char *name);",
    "int dp_backend_register(const dp_backend_ops *ops, void *ud);",
    -- dogpile.h's dp_backend_ops, function pointers as void * (same size);
    -- a struct of our own so that no other module's declaration collides.
    [[struct dp_cosocket_ops {
        const char *name;
        void *open, *get, *set, *del, *stats, *lock_domain, *close;
        int infallible;
        void *lock, *unlock, *get_multi, *set_multi, *del_multi, *wait_unlocked;
        const void *args;
        size_t settings_size;
        void *identify, *create, *destroy, *server_circuits;
    };]],
}) do
    pcall(ffi.cdef, decl)
end

local C = lib.C
local DP_OK, DP_EBACKEND = 0, 13
local ffi_new, ffi_string, ffi_cast, ffi_copy = ffi.new, ffi.string, ffi.cast, ffi.copy

-- What the callbacks pass between dp_backend_open and us (one open at a
-- time: a worker runs one Lua thread at a time, and nothing yields here).
local open_domain, open_store = 0, nil
local callbacks -- kept for the life of the worker: the registry keeps the ops

local function make_callbacks()
    local function nothing()
        return DP_EBACKEND
    end
    callbacks = {
        open = ffi_cast("int (*)(void *, const dp_arg *, size_t, void **, dp_err *)",
                        function(_, _, _, self)
                            self[0] = ffi_cast("void *", open_domain)
                            return DP_OK
                        end),
        op = ffi_cast("int (*)(void *)", nothing),
        lock_domain = ffi_cast("uint32_t (*)(void *)", function(self)
            return tonumber(ffi_cast("uintptr_t", self))
        end),
        close = ffi_cast("void (*)(void *)", function() end),
        server_circuits = ffi_cast("void (*)(void *, dp_circuit *)", function(_, store)
            open_store = store
        end),
    }
end

local registered = {}

-- The stand-in of public name `name`, registered on first use (again in a
-- Lua state that replaced an earlier one: the registry then points at
-- these ops).
local function stand_in(name)
    local r = registered[name]
    if r then
        return r.name
    end
    if not callbacks then
        make_callbacks()
    end
    local rname = name .. "#cosocket"
    local ops = ffi_new("struct dp_cosocket_ops")
    ops.name = rname
    ops.open, ops.close = callbacks.open, callbacks.close
    ops.get, ops.set, ops.del = callbacks.op, callbacks.op, callbacks.op
    ops.lock_domain, ops.server_circuits = callbacks.lock_domain, callbacks.server_circuits
    if C.dp_circuit_declare(rname) ~= DP_OK
        or C.dp_backend_register(ffi_cast("const dp_backend_ops *", ops), nil) ~= DP_OK then
        error(name .. ": cannot register the circuit breaker's stand-in backend", 0)
    end
    registered[name] = { name = rname, ops = ops }
    return rname
end

local stores = {} -- by name, store and arguments: { handle, store (nil: no breaker) }

-- This Lua state's mark on its stores' names. The handles are never closed
-- (the callbacks die with the state), so a state that replaces this one in
-- the process (nginx's master at a reload) must not join their breakers: a
-- changed circuit_* setting would be refused as a mismatch. The workers
-- forked from one state share it, each a process of its own.
local STATE = tostring(C.dp_lock_domain_new())

local Circuit = {}
Circuit.__index = Circuit
_M.Circuit = Circuit

-- Opening runs the callbacks: never from a trace.
local function open_store_of(name, domain, arguments)
    local rname = stand_in(name)
    local cargs, keep, n = ffi_new("dp_arg[3]"), {}, 0
    local sig = { name, domain }
    for _, k in ipairs({ "circuit_failures", "circuit_cooldown", "circuit_slow" }) do
        local v = arguments[k]
        sig[#sig + 1] = tostring(v)
        if v ~= nil then
            local a = cargs[n]
            n = n + 1
            a.name = k
            if type(v) == "number" then
                a.type, a.number = 2, v
            elseif type(v) == "boolean" then
                a.type, a.number = 1, v and 1 or 0
            elseif type(v) == "string" then
                keep[#keep + 1] = v
                a.type, a.string, a.len = 3, v, #v
            else
                error(format("%s: argument '%s' must be a number, string or boolean, got %s",
                             name, k, type(v)), 0)
            end
        end
    end
    sig = concat(sig, "\n")
    local st = stores[sig]
    if st then
        return st
    end
    local id = "cosocket:" .. STATE .. ":" .. domain
    open_domain = C.dp_lock_domain(id, #id)
    open_store = nil
    local out, err = ffi_new("dp_backend *[1]"), ffi_new("dp_err")
    local rc = C.dp_backend_open(rname, cargs, n, out, err)
    if rc ~= DP_OK then
        -- The core's message, in the public name (the C backend's words).
        local msg = ffi_string(err.msg)
        if sub(msg, 1, #rname) == rname then
            msg = name .. sub(msg, #rname + 1)
        end
        error(msg, 0)
    end
    local handle = out[0]
    local cs = ffi_new("dp_circuit_stats")
    C.dp_backend_circuit(handle, cs)
    st = { handle = handle, store = cs.enabled == 1 and open_store or nil }
    stores[sig] = st
    return st
end
jit.off(open_store_of)

--- The circuit breaker of a store (`domain` names it: server, db and lock
-- prefix) of backend `name` (the public one: "dogpile.cache.redis"), from
-- the circuit_* entries of `arguments`, checked by the core (its messages):
-- an object with `store` (the store's dp_circuit, or nil when
-- circuit_failures is 0) and server(addr) (one server's breaker, for a
-- cluster's nodes; nil without a breaker). Raises on a bad argument, or
-- when the store's breaker is in use in this worker with other settings.
function _M.circuit(name, domain, arguments)
    local st = open_store_of(name, domain, arguments)
    return setmetatable({ st = st, store = st.store }, Circuit)
end

--- The breaker of server `addr` ("host:port") of this store, or nil.
function Circuit:server(addr)
    if self.store == nil then
        return nil
    end
    local out = ffi_new("dp_circuit *[1]")
    if C.dp_circuit_server(self.store, addr, out) ~= DP_OK or out[0] == nil then
        return nil
    end
    return out[0]
end

--- Add the breaker's figures to a backend's stats `out`, as
-- dogpile.cache.backends.c does: circuit_state, circuit_opened,
-- circuit_refused, circuit_probes (the servers' summed up).
function Circuit:stats(out)
    if self.store == nil then
        return out
    end
    return require("dogpile.cache.backends.c").circuit_stats(self.st.handle, out)
end

-- Guards free for the next call (a call yields: each needs its own).
local guards, nguards = {}, 0
local cerr = ffi_new("dp_err")

--- Before a round trip to this server: a guard (true without a breaker),
-- or nil and the breaker's message when it is open (nothing was sent).
function Server:enter()
    local c = self.circuit
    if not c then
        return true
    end
    local g
    if nguards > 0 then
        g, guards[nguards], nguards = guards[nguards], nil, nguards - 1
    else
        g = ffi_new("dp_circuit_guard")
    end
    if C.dp_circuit_enter(c, g, cerr) ~= DP_OK then
        nguards = nguards + 1
        guards[nguards] = g
        return nil, ffi_string(cerr.msg)
    end
    return g
end

--- After it: `failure` (a message) when the server failed (an I/O error,
-- a timeout: counted, a slow one opening the breaker at once), nil when it
-- answered.
function Server:leave(g, failure)
    if g == true then
        return
    end
    if failure then
        local n = min(#failure, 1023)
        ffi_copy(cerr.msg, failure, n)
        cerr.msg[n] = 0
        C.dp_circuit_leave(self.circuit, g, DP_EBACKEND, cerr)
    else
        C.dp_circuit_leave(self.circuit, g, DP_OK, cerr)
    end
    nguards = nguards + 1
    guards[nguards] = g
end

--- Whether an I/O error is socket_timeout passing.
function _M.timed_out(err)
    return err == "timeout" or err == "timeout, mid-reply"
end

-- The server closed a reused connection (a restart): worth one retry.
local function closed(err)
    return err == "closed" or err == "broken pipe" or err == "connection reset by peer"
end

--- Send `req` (a string or an array of fragments) on a connection and read
-- its reply with `read(sock, a, b)`, which returns r1, r2 (r1 nil: r2 is an
-- I/O or protocol error). Returns what settle makes of r1, r2; or nil and
-- the message io_fail words (the connection closed, the pool forgotten).
-- Through the server's circuit breaker: refused, it returns nil, the
-- breaker's message and true, without a round trip.
function Server:exchange(op, req, read, a, b)
    local g, refused = self:enter()
    if not g then
        return nil, refused, true
    end
    for attempt = 1, 2 do
        local sock, reused = self:connect(op)
        if not sock then
            self:leave(g, reused)
            return nil, reused
        end
        local ok, err = sock:send(req)
        local r1, r2
        if ok then
            r1, r2 = read(sock, a, b)
            if r1 == nil then
                err = r2
            end
        end
        if err == nil then
            r1, r2 = self:settle(sock, op, r1, r2)
            self:leave(g, r1 == nil and r2 or nil)
            return r1, r2
        end
        sock:close()
        local msg = self:io_fail(op, err)
        self:broken()
        if not (reused and attempt == 1 and closed(err)) then
            self:leave(g, msg)
            return nil, msg
        end
    end
end

-- -- Replies read in chunks -------------------------------------------------------------
-- A reply read with receiveany, a chunk at a time, and cut up by the
-- protocol's reader: one cosocket call for a whole small reply, where
-- receive() needs one per line and one per value. Only for a reply that is
-- the last thing the server sends on the connection: a chunk may hold all
-- that is there.

local CHUNK = 65536

--- Make sure that `buf` (nil: nothing read yet) holds a whole line from
-- `pos`, reading more chunks as needed: buf, pos (both anew when more was
-- read), and e, where that line's CRLF starts; or nil, err.
function _M.line_in(sock, buf, pos)
    local e = buf and find(buf, "\r\n", pos, true)
    while not e do
        local more, err = sock:receiveany(CHUNK)
        if not more then
            return nil, err
        end
        if buf == nil then
            buf = more
        elseif pos > 1 then
            buf = sub(buf, pos) .. more
        else
            buf = buf .. more
        end
        pos = 1
        e = find(buf, "\r\n", 1, true)
    end
    return buf, pos, e
end

-- -- Lock tokens --------------------------------------------------------------------------

pcall(ffi.cdef, "long getrandom(void *buf, size_t buflen, unsigned int flags);")
local rand_buf = ffi.new("uint8_t[32]")
local rand_seq = 0

--- `n` (at most 32) random bytes in hex.
function _M.random_hex(n)
    if ffi.C.getrandom(rand_buf, n, 0) ~= n then
        -- Not expected; still unique per worker and moment.
        rand_seq = rand_seq + 1
        local s = format("%016x%08x%08x", floor(ngx.now() * 1e6), ngx.worker.pid() % 2^32,
                         rand_seq % 2^32)
        return s:sub(1, 2 * n)
    end
    local t = {}
    for i = 0, n - 1 do
        t[i + 1] = format("%02x", rand_buf[i])
    end
    return concat(t)
end

-- -- The lock ---------------------------------------------------------------------------
-- A protocol's mutex class (mutex_class) defines new_token(), take(token)
-- (true when the lock key was set to `token`), token_of() (the holder's
-- token, false when free), unlock(token) (the release: true when it was
-- still ours; false and why not otherwise) and locked(); optionally watch(),
-- which the first waiter of a worker calls before it first reads the token,
-- returning nil or an object with start(group, deadline) (the lock is held:
-- a group:finish(true) wakes every waiter) and stop(). Instances come from
-- new_mutex; the backend has name, domain, lock_timeout, lock_growth and
-- lock_step_max (the poll's steps), lock_overruns and _unlock(lk, token)
-- (a release handed to a timer).

-- The waits of this worker, by lock (domain and lock key): the coroutines
-- waiting for one lock's release share one group; `held` marks the locks a
-- coroutine of this worker holds, whose release wakes the waiters directly.
local waits, held = {}, {}
local semaphore

local Group = {}
Group.__index = Group

--- The release's message carried the value stored under the lock's key
-- (the C backend's release, given that key, publishes "=" and the value):
-- the waiters of the group read it instead of a GET (see the stash).
function Group:carried(value)
    self.value, self.value_at = value, ngx.now()
end

local function new_group(gk)
    semaphore = semaphore or require("ngx.semaphore")
    return setmetatable({ gk = gk, sema = semaphore.new(), n = 0, polling = false,
                          done = false, result = false }, Group)
end

--- Everyone waiting in this group may look now.
function Group:finish(result)
    if self.done then
        return
    end
    self.done, self.result = true, result
    if waits[self.gk] == self then
        waits[self.gk] = nil
    end
    if self.n > 0 then
        self.sema:post(self.n)
    end
end

local Mutex = {}
Mutex.__index = Mutex
_M.Mutex = Mutex

function _M.mutex_class()
    local M = setmetatable({}, Mutex)
    M.__index = M
    return M
end

--- The mutex of `key` (lock key `lk`) on backend `b`, of class `M`.
function _M.new_mutex(M, b, key, lk)
    return setmetatable({ b = b, key = key, lk = lk, gk = b.domain .. "\n" .. lk, token = nil,
                          stolen = false, unlocked = false, gave_up = false, since = 0 }, M)
end

--- Raise "<backend>: <what> of the lock for key '<key>': <msg>".
-- @raise always
function Mutex:fail(what, msg)
    error(self.b.name .. ": " .. what .. " of the lock for key '" .. self.key .. "': "
          .. tostring(msg), 0)
end

-- One try: true when taken.
local function try_take(self)
    local token = self:new_token()
    if self:take(token) then
        self.token = token
        self.since = ngx.now()
        held[self.gk] = true
        return true
    end
    return false
end

-- The first waiter of this worker: read the holder's token, then look again
-- at growing steps (waiting on the group's semaphore, which a release in
-- this worker or the watch posts) until it is gone or another's, or
-- `deadline`.
local function poll(self, g, deadline, watch)
    local first = self:token_of()
    if not first then
        return true
    end
    if watch then
        watch:start(g, deadline)
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
        step = min(step * b.lock_growth, b.lock_step_max)
        if self:token_of() ~= first then
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
        g = new_group(gk)
        waits[gk] = g
    end
    if not held[gk] and not g.polling then
        g.polling = true
        local watch, failed
        if self.watch then
            watch, failed = self:watch()
        end
        if failed then
            g:finish(false)
            self:fail("waiting for the release", failed)
        end
        local ok, result = pcall(poll, self, g, deadline, watch)
        g:finish(ok and result)
        if watch then
            watch:stop()
        end
        if not ok then
            error(result, 0)
        end
        return g.result, g
    end
    g.n = g.n + 1
    g.sema:wait(max(0.001, deadline - ngx.now()))
    g.n = g.n - 1
    return g.done and g.result, g
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
    if try_take(self) then
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
        if try_take(self) then
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
    local released, g = wait_release(self, ngx.now() + self.b.lock_timeout)
    if not released then
        self.gave_up = true
    elseif g.value then
        stash[running()] = { b = self.b, key = self.key, value = g.value, at = g.value_at }
    end
    return released
end

--- Release: the waiters of this worker are woken at once; the lock key is
-- released on the server (in a timer from a phase that cannot yield). A
-- lock held past lock_timeout, or no longer ours, is counted and logged:
-- the value was made, so it is not the caller's error.
-- @raise when it was not held through this mutex, or the release failed
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
        g:finish(true)
    end
    local phase = get_phase()
    if not COSOCKET[phase] then
        -- An async runner's release from a phase that cannot yield.
        return defer(b, "unlock", phase, self.lk, token)
    end
    local ok, ours, why = pcall(self.unlock, self, token)
    if not ok then
        self:fail("release", ours)
    end
    local held_for = ngx.now() - self.since
    if held_for > b.lock_timeout then
        b.lock_overruns = b.lock_overruns + 1
        context.log(format("%s: the lock for key '%s' was held for %.3f s, longer than "
                           .. "lock_timeout (%s s): another caller may have created the value "
                           .. "too", b.name, self.key, held_for, tostring(b.lock_timeout)))
    elseif not ours then
        b.lock_overruns = b.lock_overruns + 1
        context.log(format("%s: the lock for key '%s' was no longer held when released after "
                           .. "%.3f s (%s): another caller may have created the value too",
                           b.name, self.key, held_for, tostring(why)))
    end
end

return _M
