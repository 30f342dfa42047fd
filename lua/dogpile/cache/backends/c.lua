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
local type, pairs, tostring, setmetatable = type, pairs, tostring, setmetatable

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
-- after another: a pointer to the first and their lengths (-1: missing),
-- valid until the next call. The region reads them in place.
function CBackend:get_multi_in_place(keys)
    local n = #keys
    local ks, kl = key_arrays(self, n)
    for i = 1, n do
        local k = keys[i]
        ks[i - 1], kl[i - 1] = k, #k
    end
    local vl = self.mout
    if C.dp_backend_get_multi(self.handle, n, ks, kl, self.bytes, vl, self.err) ~= DP_OK then
        failed(self.err)
    end
    return self.bytes.data, vl
end

function CBackend:get_multi(keys)
    local n = #keys
    local out = {}
    if n == 0 then
        return out
    end
    local data, vl = self:get_multi_in_place(keys)
    local pos = 0
    for i = 1, n do
        local len = tonumber(vl[i - 1])
        if len < 0 then
            out[i] = NO_VALUE
        else
            out[i] = ffi_string(data + pos, len)
            pos = pos + len
        end
    end
    return out
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
-- Two levels: the core's per-key lock in the instance's domain orders the
-- threads and Lua states of this process, so that only one of them at a time
-- asks the backend, whose lock orders the processes. Both are released
-- together. Waiting is bounded by the backend's `lock_timeout`: past it the
-- holder is taken to be stuck and the waiter goes ahead without the lock it
-- could not get (as an expired Redis lock is taken over), so a value may then
-- be created twice, never waited for forever.

local DP_EBUSY, DP_ETIMEDOUT, DP_EDEADLK = lib.DP_EBUSY, lib.DP_ETIMEDOUT, lib.DP_EDEADLK
local OWNER = context.OWNER
local monotonic = C.dp_clock_monotonic
local math_min = math.min
-- dogpile.lua's steps for yielding waiters (see there).
local FIRST_STEP, MAX_STEP, GROWTH = dogpile._steps.first, dogpile._steps.max,
    dogpile._steps.growth

-- A yielding waiter: `check(self)` after each sleep, until it is true (then
-- true) or the deadline passes (then false).
local function poll(sleep, check, self, unbounded, deadline)
    local step = FIRST_STEP
    while unbounded or monotonic() < deadline do
        sleep(step)
        if check(self) then
            return true
        end
        step = math_min(step * GROWTH, MAX_STEP)
    end
    return false
end

-- The backend's lock_timeout as a wait: the timeout, whether it is
-- unbounded (math.huge or negative), and the monotonic deadline.
local function wait_bound(b)
    local timeout = b.lock_timeout or -1
    local unbounded = timeout == math.huge or timeout < 0
    return timeout, unbounded, monotonic() + (unbounded and 0 or timeout)
end

local BackendMutex = {}
BackendMutex.__index = BackendMutex

local function lock_failed(self, what, rc)
    local err = self.b.err
    local msg = err.code == rc and ffi_string(err.msg) or lib.strerror(rc)
    error(self.b.name .. ": " .. what .. " of the lock for key '" .. self.key .. "': " .. msg, 0)
end

-- Try both levels once; true when both are held (or given up on as stuck).
local function try_both(self)
    local key, b = self.key, self.b
    if not self.core then
        local rc = C.dp_lock_try(b.lock_domain, key, #key, OWNER)
        if rc == DP_EBUSY and reclaim(b.lock_domain, key) then
            rc = C.dp_lock_try(b.lock_domain, key, #key, OWNER)
        end
        if rc == DP_EBUSY then
            return false
        elseif rc ~= DP_OK then
            lock_failed(self, "taking", rc)
        end
        took(b.lock_domain, key, self)
        self.core = true
    end
    local rc = C.dp_backend_lock(b.handle, key, #key, 0, b.err)
    if rc == DP_OK then
        self.proc = true
        self.since = monotonic()
        return true
    end
    gave(b.lock_domain, key)
    C.dp_lock_release(b.lock_domain, key, #key)
    self.core = false
    if rc == DP_EBUSY then
        return false
    end
    lock_failed(self, "taking", rc)
end

--- `wait` nil or true: wait (yielding when a sleep function is set) for at
-- most the backend's lock_timeout; false: try once.
function BackendMutex:acquire(wait)
    if self.core or self.proc or self.stolen then
        error(self.b.name .. ": the lock for key '" .. self.key .. "' is already held through "
              .. "this mutex", 0)
    end
    local gave_up = self.gave_up
    self.gave_up = false
    if try_both(self) then
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
    local b, key = self.b, self.key
    local timeout, unbounded, deadline = wait_bound(b)
    local sleep = context.sleep()
    if sleep then
        if poll(sleep, try_both, self, unbounded, deadline) then
            return true
        end
        self.stolen = true
        return true -- stuck holder: go ahead without the lock
    end
    -- Blocking: the threads of this process sleep on the core's condition
    -- variable; the one that gets it waits for the other processes.
    local rc = C.dp_lock_wait(b.lock_domain, key, #key, OWNER, unbounded and -1 or timeout)
    if rc == DP_EDEADLK and reclaim(b.lock_domain, key) then
        rc = C.dp_lock_wait(b.lock_domain, key, #key, OWNER, unbounded and -1 or timeout)
    end
    if rc == DP_OK then
        took(b.lock_domain, key, self)
        self.core = true
    elseif rc == DP_EDEADLK then
        error("dogpile: the lock for key '" .. key .. "' is held by another coroutine "
              .. "of this Lua state, so blocking the thread would wait forever; "
              .. "call dogpile.set_sleep(fn) with your scheduler's sleep so that waiters yield", 0)
    elseif rc ~= DP_ETIMEDOUT then
        lock_failed(self, "taking", rc)
    end
    local left = unbounded and -1 or deadline - monotonic()
    if not unbounded and left <= 0 then
        self.stolen = true
        return true -- stuck holder in this process: go ahead
    end
    rc = C.dp_backend_lock(b.handle, key, #key, left, b.err)
    if rc == DP_OK then
        self.proc = true
        self.since = monotonic()
    elseif rc == DP_ETIMEDOUT then
        self.stolen = true
    else
        if self.core then
            gave(b.lock_domain, key)
            C.dp_lock_release(b.lock_domain, key, #key)
            self.core = false
        end
        lock_failed(self, "taking", rc)
    end
    return true
end

--- The lock goes on to another coroutine on purpose (the async creation
-- runner releases it): it is no longer this coroutine's to be abandoned with.
function BackendMutex:hand_over()
    if self.core then
        gave(self.b.lock_domain, self.key)
    end
end

function BackendMutex:release()
    local b, key = self.b, self.key
    local proc, core = self.proc, self.core
    if not (proc or core or self.stolen) then
        error("dogpile: release of the lock for key '" .. key .. "', which is not held "
              .. "through this mutex", 0)
    end
    self.stolen = false
    self.proc, self.core = false, false
    local rc = proc and C.dp_backend_unlock(b.handle, key, #key, b.err) or DP_OK
    if core then
        gave(b.lock_domain, key)
        C.dp_lock_release(b.lock_domain, key, #key)
    end
    if proc then
        -- Held past lock_timeout: others may have gone ahead (and a lock that
        -- expires by itself, as Redis's does, was taken by someone else, which
        -- the backend's unlock left alone: DP_ENOTHELD). Not the caller's
        -- error: the value was made; count it and say so.
        local held_for = monotonic() - self.since
        local limit = b.lock_timeout
        if rc == lib.DP_ENOTHELD or (limit and limit >= 0 and held_for > limit) then
            b.lock_overruns = b.lock_overruns + 1
            if limit and limit >= 0 and held_for > limit then
                context.log(string.format("%s: the lock for key '%s' was held for %.3f s, longer "
                                          .. "than lock_timeout (%s s): another caller may have "
                                          .. "created the value too", b.name, key, held_for,
                                          tostring(limit)))
            else
                -- Lost early (evicted, a restarted server): the backend says how.
                context.log(string.format("%s: the lock for key '%s' was no longer held when "
                                          .. "released after %.3f s (%s): another caller may "
                                          .. "have created the value too", b.name, key, held_for,
                                          ffi_string(b.err.msg)))
            end
            if rc == lib.DP_ENOTHELD then
                return
            end
        end
    end
    if rc ~= DP_OK then
        lock_failed(self, "release", rc)
    end
end

function BackendMutex:locked()
    return self.core or self.proc or self.stolen
end

-- -- Waiting for the holder's release, without taking the lock ----------------
-- For a backend with wait_unlocked (dp_backend_ops): dogpile's run() calls it
-- when it has no value and the lock is taken, then reads; every waiter gets
-- the holder's value as soon as it is released, instead of taking the lock in
-- turn. First the threads of this process (the core's lock in the instance's
-- domain: a condition variable), then the other processes (the backend's
-- wait: a futex for lmdb, a pub/sub message for redis). Bounded by
-- lock_timeout as acquire is; past it, the next acquire(true) goes ahead at
-- once, as acquire would have after waiting that long itself.

local BackendWaitMutex = {}
BackendWaitMutex.__index = BackendWaitMutex
for k, v in pairs(BackendMutex) do
    if k ~= "__index" then
        BackendWaitMutex[k] = v
    end
end

-- Free in this process and in the backend right now (no wait)?
local function both_free(self)
    local key, b = self.key, self.b
    if C.dp_lock_held(b.lock_domain, key, #key, nil) == 1 and not reclaim(b.lock_domain, key) then
        return false
    end
    local rc = C.dp_backend_wait_unlocked(b.handle, key, #key, 0, b.err)
    if rc == DP_OK then
        return true
    elseif rc == DP_EBUSY or rc == DP_ETIMEDOUT then
        return false
    end
    lock_failed(self, "waiting for the release", rc)
end

--- Wait (yielding when a sleep function is set) until the current holder
-- releases, for at most the backend's lock_timeout. true: released (or was
-- free); false: still held when the time was up.
function BackendWaitMutex:wait_unlocked()
    if self.core or self.proc or self.stolen then
        error(self.b.name .. ": the lock for key '" .. self.key .. "' is already held through "
              .. "this mutex", 0)
    end
    local b, key = self.b, self.key
    local timeout, unbounded, deadline = wait_bound(b)
    local sleep = context.sleep()
    if sleep then
        if both_free(self) then
            return true
        end
        if poll(sleep, both_free, self, unbounded, deadline) then
            return true
        end
        self.gave_up = true
        return false
    end
    local rc = C.dp_lock_wait_unlocked(b.lock_domain, key, #key, OWNER, unbounded and -1 or timeout)
    if rc == DP_EDEADLK and reclaim(b.lock_domain, key) then
        rc = DP_OK
    end
    if rc == DP_EDEADLK then
        error("dogpile: the lock for key '" .. key .. "' is held by another coroutine "
              .. "of this Lua state, so blocking the thread would wait forever; "
              .. "call dogpile.set_sleep(fn) with your scheduler's sleep so that waiters yield", 0)
    elseif rc == DP_ETIMEDOUT then
        self.gave_up = true
        return false
    elseif rc ~= DP_OK then
        lock_failed(self, "waiting for the release", rc)
    end
    local left = unbounded and -1 or deadline - monotonic()
    if not unbounded and left <= 0 then
        left = 0
    end
    rc = C.dp_backend_wait_unlocked(b.handle, key, #key, left, b.err)
    if rc == DP_OK then
        return true
    elseif rc == DP_ETIMEDOUT or rc == DP_EBUSY then
        self.gave_up = true
        return false
    end
    lock_failed(self, "waiting for the release", rc)
end

local function backend_mutex(self, key)
    return setmetatable({ b = self, key = key, core = false, proc = false, stolen = false,
                          gave_up = false }, self.has_wait_unlocked and BackendWaitMutex
                                                                    or BackendMutex)
end

local CIRCUIT_STATES = { [0] = "closed", "open", "probing" }

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
    local cs = ffi_new("dp_circuit_stats")
    C.dp_backend_circuit(self.handle, cs)
    if cs.enabled == 1 then
        out.circuit_state = CIRCUIT_STATES[cs.state]
        out.circuit_opened, out.circuit_refused = cs.opened, cs.refused
        out.circuit_probes = cs.probes
    end
    return out
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
        lock_overruns = 0,
        has_wait_unlocked = C.dp_backend_has_wait_unlocked(handle) == 1,
        multi_cap = 0,
        _keep = keep,
    }, CBackend)
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

return { open = open, CBackend = CBackend }
