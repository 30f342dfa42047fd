--- Any C backend registered with the core (dp_backend_register), seen as a
-- Lua backend that stores bytes. Its get/set/delete go through the FFI.
local ffi = require "ffi"
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local dogpile = require "dogpile"
local context = require "dogpile.context"
local holders = require "dogpile.holders"

local C = lib.C
local took, gave, reclaim = holders.took, holders.gave, holders.reclaim
local NO_VALUE = api.NO_VALUE
local DP_OK, DP_ENOTFOUND = lib.DP_OK, lib.DP_ENOTFOUND
local ffi_string, ffi_new, ffi_gc = ffi.string, ffi.new, ffi.gc
local type, pairs, tostring, setmetatable, tonumber, getmetatable = type, pairs, tostring,
    setmetatable, tonumber, getmetatable
-- dogpile.h: a multi form that failed for some keys only (their server is
-- down) and did the others; get_multi's length of such a key.
local DP_EPARTIAL, VLEN_FAILED = 14, -2

lib.own_source()

local CBackend = {}
CBackend.__index = CBackend

-- The region names the backend, the operation and the key around this.
local function failed(err)
    error(ffi_string(err.msg), 0)
end

function CBackend:get(key)
    local rc = C.dp_backend_get(self.handle, key, #key, self.bytes, self.err)
    if rc == DP_OK then
        local bytes = self.bytes
        return ffi_string(bytes.data, bytes.len)
    elseif rc == DP_ENOTFOUND then
        return NO_VALUE
    end
    failed(self.err)
end

function CBackend:set(key, value)
    if C.dp_backend_set(self.handle, key, #key, value, #value, self.err) ~= DP_OK then
        failed(self.err)
    end
end

function CBackend:delete(key)
    if C.dp_backend_delete(self.handle, key, #key, self.err) ~= DP_OK then
        failed(self.err)
    end
end

-- -- Multi forms: one call of the backend's own (one round trip for a server
-- backend), or the core's loop over the single operations.

local function key_arrays(self, n)
    if n > self.multi_cap then
        local cap = math.max(n, 2 * self.multi_cap)
        self.mkeys = ffi_new("const char *[?]", cap)
        self.mklens = ffi_new("size_t[?]", cap)
        self.mvals = ffi_new("const char *[?]", cap)
        self.mvlens = ffi_new("size_t[?]", cap)
        self.mout = ffi_new("int64_t[?]", cap)
        self.multi_cap = cap
    end
    return self.mkeys, self.mklens
end

--- The values of `keys` (n >= 1 of them) left in the backend's buffer, one
-- after another: a pointer to the first and their lengths (-1: missing; -2:
-- failed), valid until the next call. The region reads them in place. A
-- call that failed for some keys only (a cluster node down) returns, third,
-- the backend's message (naming the node, counting the keys) when
-- `partial_ok`, and raises it otherwise; one that failed as a whole raises.
function CBackend:get_multi_in_place(keys, partial_ok)
    local n = #keys
    local ks, kl = key_arrays(self, n)
    for i = 1, n do
        local k = keys[i]
        ks[i - 1], kl[i - 1] = k, #k
    end
    local vl = self.mout
    local rc = C.dp_backend_get_multi(self.handle, n, ks, kl, self.bytes, vl, self.err)
    if rc == DP_OK then
        return self.bytes.data, vl
    elseif rc == DP_EPARTIAL and partial_ok then
        return self.bytes.data, vl, ffi_string(self.err.msg)
    end
    failed(self.err)
end

--- The error get_multi raises when some keys failed and the others were
-- read: `msg` (what failed, as a string error says it), `values` (the
-- array get_multi would have returned, NO_VALUE for the failed keys),
-- `failed` (their indexes). tostring() and `..` give the message, so a
-- caller that treats it as a string error loses nothing but the values.
local Partial = {}
Partial.__index = Partial
Partial.__tostring = function(e)
    return e.msg
end
Partial.__concat = function(a, b)
    return tostring(a) .. tostring(b)
end

--- The values of `keys` in an array (NO_VALUE: missing). Raises the
-- backend's message, or a Partial when only some keys failed.
function CBackend:get_multi(keys)
    local n = #keys
    local out = {}
    if n == 0 then
        return out
    end
    local data, vl, partial = self:get_multi_in_place(keys, true)
    local pos, bad = 0, nil
    for i = 1, n do
        local len = tonumber(vl[i - 1])
        if len < 0 then
            out[i] = NO_VALUE
            if len == VLEN_FAILED then
                bad = bad or {}
                bad[#bad + 1] = i
            end
        else
            out[i] = ffi_string(data + pos, len)
            pos = pos + len
        end
    end
    if partial then
        error(setmetatable({ msg = partial, values = out, failed = bad or {} }, Partial), 0)
    end
    return out
end

--- A Partial error for another backend's get_multi (the cluster's cosocket
-- form): `msg`, the array of values with NO_VALUE for the failed keys, and
-- their indexes.
local function partial_error(msg, values, failed)
    return setmetatable({ msg = msg, values = values, failed = failed }, Partial)
end

function CBackend:set_multi(mapping)
    local n = 0
    for _ in pairs(mapping) do
        n = n + 1
    end
    if n == 0 then
        return
    end
    local ks, kl = key_arrays(self, n)
    local vs, vl = self.mvals, self.mvlens
    local i = 0
    for k, v in pairs(mapping) do
        ks[i], kl[i], vs[i], vl[i] = k, #k, v, #v
        i = i + 1
    end
    -- DP_EPARTIAL too: the keys of the live servers are stored, the
    -- message names the failed one and counts the keys.
    if C.dp_backend_set_multi(self.handle, n, ks, kl, vs, vl, self.err) ~= DP_OK then
        failed(self.err)
    end
end

function CBackend:delete_multi(keys)
    local n = #keys
    if n == 0 then
        return
    end
    local ks, kl = key_arrays(self, n)
    for i = 1, n do
        local k = keys[i]
        ks[i - 1], kl[i - 1] = k, #k
    end
    if C.dp_backend_delete_multi(self.handle, n, ks, kl, self.err) ~= DP_OK then
        failed(self.err)
    end
end

local function mutex_in_domain(self, key)
    return dogpile.core_mutex(self.lock_domain, key, true)
end

-- -- The backend's own lock (between processes) --------------------------------
-- Two levels, taken and released together by the core (dp_backend_acquire,
-- dp_backend_release, dp_backend_wait_released): its per-key lock in the
-- instance's domain orders the threads and Lua states of this process, the
-- backend's orders the processes; blocking waits are bounded there by the
-- handle's lock_timeout. What is Lua's stays here: a waiter that must yield
-- (a sleep function is set) polls at dp_backoff's steps instead of blocking
-- the thread; the coroutine holding a lock is told to dogpile.holders, so
-- that an abandoned one's lock is released; and the policy past
-- lock_timeout: the holder is taken to be stuck and the waiter goes ahead
-- without the lock (`stolen`, as an expired Redis lock is taken over), so a
-- value may then be created twice, never waited for forever.

local DP_EBUSY, DP_ETIMEDOUT, DP_EDEADLK = lib.DP_EBUSY, lib.DP_ETIMEDOUT, lib.DP_EDEADLK
local OWNER = context.OWNER
local monotonic = C.dp_clock_monotonic
local format = string.format

local BackendMutex = {}
BackendMutex.__index = BackendMutex
-- With wait_unlocked (a backend that can wait for its lock's release); the
-- methods of BackendMutex are copied in below, so each table has its own
-- (a caller may wrap one: rawget(getmetatable(m), "acquire")).
local BackendWaitMutex = {}
BackendWaitMutex.__index = BackendWaitMutex

local function lock_failed(self, what, rc)
    if rc == DP_EDEADLK then
        error("dogpile: the lock for key '" .. self.key .. "' is held by another coroutine "
              .. "of this Lua state, so blocking the thread would wait forever; call "
              .. "dogpile.set_sleep(fn) with your scheduler's sleep so that waiters yield", 0)
    end
    local err = self.b.err
    local msg = err.code == rc and ffi_string(err.msg) or lib.strerror(rc)
    error(self.b.name .. ": " .. what .. " of the lock for key '" .. self.key .. "': " .. msg, 0)
end

-- The core's call `fn` for this key, waiting `timeout` (0: once). A lock of
-- this state held by a coroutine that is gone is released first, then the
-- call made again (dogpile.holders).
local function call(self, fn, timeout, hold)
    local b, key = self.b, self.key
    local rc
    if hold then
        rc = fn(b.handle, key, #key, OWNER, timeout, hold, b.err)
    else
        rc = fn(b.handle, key, #key, OWNER, timeout, b.err)
    end
    if (rc == DP_EBUSY or rc == DP_EDEADLK) and reclaim(b.lock_domain, key) then
        return call(self, fn, timeout, hold)
    end
    return rc
end

local function take(self, timeout)
    local rc = call(self, C.dp_backend_acquire, timeout, self.hold)
    if self.hold.core == 1 then
        took(self.b.lock_domain, self.key, self)
    end
    return rc
end

-- Once, taking both levels (true) or finding them busy (false).
local function try_both(self)
    local rc = take(self, 0)
    if rc == DP_OK or rc == DP_EBUSY then
        return rc == DP_OK
    end
    lock_failed(self, "taking", rc)
end

-- Once, free in this process and in the backend (true) or held (false).
local function both_free(self)
    local rc = call(self, C.dp_backend_wait_released, 0)
    if rc == DP_OK or rc == DP_EBUSY then
        return rc == DP_OK
    end
    lock_failed(self, "waiting for the release", rc)
end

-- A yielding waiter: `check(self)` after each of dp_backoff's steps, until it
-- is true (then true) or lock_timeout has passed (then false).
local function poll(self, sleep, check)
    local bo = ffi_new("dp_backoff")
    C.dp_backoff_init(bo, C.dp_backend_lock_timeout(self.b.handle), 0)
    local step = C.dp_backoff_next(bo)
    while step > 0 do
        sleep(step)
        if check(self) then
            return true
        end
        step = C.dp_backoff_next(bo)
    end
    return false
end

function BackendMutex:locked()
    local h = self.hold
    return h.core == 1 or h.proc == 1 or self.stolen
end

local function not_again(self)
    if self:locked() then
        error(self.b.name .. ": the lock for key '" .. self.key .. "' is already held through "
              .. "this mutex", 0)
    end
end

--- `wait` nil or true: wait (yielding when a sleep function is set) for at
-- most the backend's lock_timeout; false: try once.
function BackendMutex:acquire(wait)
    not_again(self)
    local gave_up = self.gave_up
    self.gave_up = false
    if try_both(self) then
        return true
    elseif wait == false then
        return false
    end
    local sleep = context.sleep()
    -- After wait_unlocked waited lock_timeout for this holder, it is stuck.
    if gave_up or (sleep and not poll(self, sleep, try_both)) then
        self.stolen = true -- stuck holder: go ahead without the lock
    elseif not sleep then
        local rc = take(self, C.dp_backend_lock_timeout(self.b.handle))
        if rc == DP_ETIMEDOUT then
            self.stolen = true -- the core level, if taken, goes with the rest
        elseif rc ~= DP_OK then
            lock_failed(self, "taking", rc)
        end
    end
    return true
end

--- The lock goes on to another coroutine on purpose (the async creation
-- runner releases it): it is no longer this coroutine's to be abandoned with.
function BackendMutex:hand_over()
    if self.hold.core == 1 then
        gave(self.b.lock_domain, self.key)
    end
end

function BackendMutex:release()
    local b, key, h = self.b, self.key, self.hold
    if not self:locked() then
        error("dogpile: release of the lock for key '" .. key .. "', which is not held "
              .. "through this mutex", 0)
    end
    self.stolen = false
    if h.core == 0 and h.proc == 0 then
        return
    end
    if h.core == 1 then
        gave(b.lock_domain, key)
    end
    local held_for = monotonic() - h.since
    local rc = C.dp_backend_release(b.handle, key, #key, h, b.err)
    -- Held past lock_timeout (1), or lost before (2: evicted, expired, a
    -- restarted server; the backend says how): others may have gone ahead.
    -- Not the caller's error: the value was made; count it and say so.
    if h.overrun ~= 0 then
        b.lock_overruns = b.lock_overruns + 1
        context.log(format("%s: the lock for key '%s' was %s: another caller may have created "
                           .. "the value too", b.name, key, h.overrun == 1
                           and format("held for %.3f s, longer than lock_timeout (%s s)",
                                      held_for, tostring(b.lock_timeout))
                           or format("no longer held when released after %.3f s (%s)",
                                     held_for, ffi_string(b.err.msg))))
    end
    if rc ~= DP_OK then
        lock_failed(self, "release", rc)
    end
end

--- Wait (yielding when a sleep function is set) until the current holder
-- releases, without taking the lock, for at most the backend's lock_timeout:
-- dogpile's run() then reads the holder's value, as every waiter does at
-- once (a futex for lmdb, a pub/sub message for redis). true: released (or
-- was free); false: still held when the time was up, and the next
-- acquire(true) goes ahead at once, as it would have after waiting that long.
function BackendWaitMutex:wait_unlocked()
    not_again(self)
    local sleep = context.sleep()
    local rc
    if sleep then
        rc = (both_free(self) or poll(self, sleep, both_free)) and DP_OK or DP_ETIMEDOUT
    else
        rc = call(self, C.dp_backend_wait_released, C.dp_backend_lock_timeout(self.b.handle))
    end
    if rc == DP_OK or rc == DP_ETIMEDOUT then
        self.gave_up = rc == DP_ETIMEDOUT
        return rc == DP_OK
    end
    lock_failed(self, "waiting for the release", rc)
end

for k, v in pairs(BackendMutex) do
    if k ~= "__index" then
        BackendWaitMutex[k] = v
    end
end

local function backend_mutex(self, key)
    return setmetatable({ b = self, key = key, hold = ffi_new("dp_backend_hold"),
                          stolen = false, gave_up = false },
                        self.has_wait_unlocked and BackendWaitMutex or BackendMutex)
end

local CIRCUIT_STATES = { [0] = "closed", "open", "probing" }

-- The breaker's state and counters of the backend `handle` into `out`,
-- when it has one (also the cosocket backends', whose breakers are the
-- core's).
local function circuit_stats(handle, out)
    local cs = ffi_new("dp_circuit_stats")
    C.dp_backend_circuit(handle, cs)
    if cs.enabled == 1 then
        out.circuit_state = CIRCUIT_STATES[cs.state]
        out.circuit_opened, out.circuit_refused = cs.opened, cs.refused
        out.circuit_probes = cs.probes
    end
    return out
end

function CBackend:stats()
    local st = ffi_new("dp_backend_stats")
    C.dp_backend_stat(self.handle, st)
    local out = {
        items = st.items, bytes = st.bytes, max_items = st.max_items, max_bytes = st.max_bytes,
        hits = st.hits, misses = st.misses, evictions = st.evictions,
        expirations = st.expirations,
        -- this handle's count of locks held past lock_timeout
        lock_overruns = self.lock_overruns,
    }
    return circuit_stats(self.handle, out)
end

--- Open an instance of the C backend registered as `name` with the region's
-- `arguments` (numbers, strings and booleans).
local function open(name, arguments)
    local n, args, keep = 0, {}, {}
    for k, v in pairs(arguments or {}) do
        if type(k) ~= "string" then
            lib.raise(name .. ": argument names must be strings, got " .. type(k))
        end
        local t = type(v)
        if t ~= "number" and t ~= "string" and t ~= "boolean" then
            lib.raise(name .. ": argument '" .. k .. "' must be a number, string or boolean, got " .. t)
        end
        n = n + 1
        args[n] = { k, v }
    end
    local cargs = ffi_new("dp_arg[?]", n > 0 and n or 1)
    for i = 1, n do
        local k, v = args[i][1], args[i][2]
        local a = cargs[i - 1]
        keep[#keep + 1] = k
        a.name = k
        if type(v) == "number" then
            a.type, a.number = 2, v
        elseif type(v) == "boolean" then
            a.type, a.number = 1, v and 1 or 0
        else
            keep[#keep + 1] = v
            a.type, a.string, a.len = 3, v, #v
        end
    end
    local out = ffi_new("dp_backend*[1]")
    local err = ffi_new("dp_err")
    if C.dp_backend_open(name, cargs, n, out, err) ~= DP_OK then
        lib.raise(ffi_string(err.msg))
    end
    local handle = ffi_gc(out[0], C.dp_backend_close)
    local self = setmetatable({
        name = name,
        handle = handle,
        serialized = true,
        infallible = C.dp_backend_infallible(handle) == 1,
        bytes = ffi_gc(ffi_new("dp_bytes"), C.dp_bytes_free),
        err = err,
        lock_domain = C.dp_backend_lock_domain(handle),
        -- the handle's bound of every lock wait (math.huge: none)
        lock_timeout = C.dp_backend_lock_timeout(handle),
        lock_overruns = 0,
        has_wait_unlocked = C.dp_backend_has_wait_unlocked(handle) == 1,
        multi_cap = 0,
        _keep = keep,
    }, CBackend)
    if self.lock_timeout < 0 then
        self.lock_timeout = math.huge
    end
    if C.dp_backend_has_lock(handle) == 1 then
        if self.lock_domain == 0 then
            lib.raise(name .. ": a backend with a lock of its own must give a lock_domain")
        end
        self.get_mutex = backend_mutex
    elseif self.lock_domain ~= 0 then
        self.get_mutex = mutex_in_domain
    end
    return self
end

--- Close now rather than at garbage collection.
function CBackend:close()
    if self.handle ~= nil then
        C.dp_backend_close(ffi_gc(self.handle, nil))
        self.handle = nil
    end
end

--- The values a Partial error (from get_multi) carries and the indexes of
-- the keys that failed, or nil for any other error.
local function partial_of(err)
    if type(err) == "table" and getmetatable(err) == Partial then
        return err.values, err.failed, err.msg
    end
    return nil
end

return { open = open, CBackend = CBackend, partial_of = partial_of, partial_error = partial_error,
         VLEN_FAILED = VLEN_FAILED, circuit_stats = circuit_stats }
