--- dogpile: the lock. Many callers want a value that is missing or expired;
-- one is chosen to create it; while it works the others get the previous value
-- at once or, when there is none, wait for the new one.
local lib = require "dogpile.lib"
local context = require "dogpile.context"
local holders = require "dogpile.holders"

local C = lib.C
local OWNER = context.OWNER
local log_quietly = context.log_quietly
local raise = lib.raise
local pcall, error, type, setmetatable, getmetatable, tostring =
      pcall, error, type, setmetatable, getmetatable, tostring
local co_running = coroutine.running
local math_min = math.min

lib.own_source()

local DP_OK, DP_EBUSY, DP_ETIMEDOUT, DP_EDEADLK = lib.DP_OK, lib.DP_EBUSY, lib.DP_ETIMEDOUT, lib.DP_EDEADLK
local monotonic = C.dp_clock_monotonic
local format = string.format

local _M = { _VERSION = lib.version }

-- Sleep steps of a yielding waiter: short first, so a creator that finishes
-- quickly hands over quickly, then longer so that a slow one is not polled
-- hard. Each step is a quarter longer than the one before: a waiter sees the
-- release at most about a quarter of its wait late (doubling made it up to
-- the whole wait: 6-8 ms late on a 10 ms creator), for a handful more tries.
local FIRST_STEP, MAX_STEP, GROWTH = 0.001, 0.02, 1.25
_M._steps = { first = FIRST_STEP, max = MAX_STEP, growth = GROWTH }

--- Raised (as `error(dogpile.NeedRegenerationException)`) by a
-- value_and_created_fn that has no value. Calling it returns itself, so
-- `error(dogpile.NeedRegenerationException())` works too.
local NeedRegenerationException = setmetatable({}, {
    __tostring = function() return "dogpile.NeedRegenerationException" end,
    __call = function(self) return self end,
})
_M.NeedRegenerationException = NeedRegenerationException

-- -- Waiting -----------------------------------------------------------------

--- How a waiter waits in this Lua state: `fn(seconds)` must yield the running
-- coroutine to the host's scheduler for that long. `nil` restores the default
-- (ngx.sleep inside nginx where it can yield, otherwise blocking the thread).
-- @raise when fn is neither a function nor nil
-- @tparam function|nil fn `fn(seconds)`, yielding the running coroutine that long; nil: the default
function _M.set_sleep(fn)
    if fn ~= nil and type(fn) ~= "function" then
        raise("dogpile: set_sleep expects a function(seconds) or nil, got " .. type(fn))
    end
    context.set_sleep(fn)
end

--- The yielding sleep in force in this Lua state, or nil when waiting must
-- block (dogpile.context keeps it).
local current_sleep = context.sleep
_M.current_sleep = current_sleep

--- Wait with a yielding sleep until `try()` succeeds, backing off, for at
-- most `bound` seconds: false when try() still fails then.
local function wait_yielding(sleep, bound, try, ...)
    local deadline = monotonic() + bound
    local step = FIRST_STEP
    while true do
        local left = deadline - monotonic()
        if left <= 0 then
            return false
        end
        sleep(math_min(step, left))
        if try(...) then
            return true
        end
        step = math_min(step * GROWTH, MAX_STEP)
    end
end
_M.wait_yielding = wait_yielding

-- The longest a caller waits for the core's per-key lock before it takes the
-- holder to be stuck and goes ahead without the lock. The holder may be a
-- coroutine of another Lua state that was abandoned: its lock is released at
-- that state's next collection cycle (dogpile.holders), and a state that
-- stays idle may never run one; or a creator that hangs. A backend's own
-- lock_timeout bounds its waits the same way (backends/c.lua).
local DEFAULT_LOCK_TIMEOUT = 30
local lock_timeout = DEFAULT_LOCK_TIMEOUT

--- Bound every wait on the core's per-key lock in this Lua state (the lock of
-- the memory and shared_memory backends, and of a backend's lock inside the
-- process): past `seconds` the holder is taken to be stuck and the waiter goes
-- ahead without the lock (logged; the value may then be created twice), as a
-- backend's lock_timeout does for its own lock. `nil` restores the default, 30 s.
-- @tparam number|nil seconds a positive, finite number of seconds, or nil
-- @raise when seconds is not a positive finite number or nil
function _M.set_lock_timeout(seconds)
    if seconds == nil then
        lock_timeout = DEFAULT_LOCK_TIMEOUT
        return
    end
    if type(seconds) ~= "number" or not (seconds > 0 and seconds < math.huge) then
        raise("dogpile: set_lock_timeout expects a positive finite number of seconds or nil, got "
              .. type(seconds) .. " " .. tostring(seconds))
    end
    lock_timeout = seconds
end

--- The bound in force (seconds).
function _M.lock_timeout()
    return lock_timeout
end

-- -- The core's per-key lock, as a mutex object --------------------------------

local Mutex = {}
Mutex.__index = Mutex

-- The result of a blocking wait on the core's lock: true, or an error.
-- `msg`, naming the region of the mutex when a region made it (its
-- `_message`), as every error a region raises does.
local function named(self, msg)
    local region = self.region
    if region ~= nil then
        return region:_message(msg)
    end
    return msg
end

local function blocked_wait(self, rc, key)
    if rc == DP_OK then
        return true
    elseif rc == DP_EDEADLK then
        raise(named(self, "dogpile: the lock for key '" .. key .. "' is held by another coroutine "
              .. "of this Lua state, so blocking the thread would wait forever; "
              .. "call dogpile.set_sleep(fn) with your scheduler's sleep so that waiters yield"))
    end
    raise(named(self, "dogpile: waiting for the lock for key '" .. key .. "': " .. lib.strerror(rc)))
end

local took, gave, reclaim = holders.took, holders.gave, holders.reclaim

local function try_core(domain, key, tracked)
    local rc = C.dp_lock_try(domain, key, #key, OWNER)
    if rc == DP_EBUSY and reclaim(domain, key) then
        rc = C.dp_lock_try(domain, key, #key, OWNER)
    end
    if rc == DP_OK then
        if tracked then
            took(domain, key, nil, tracked)
        end
        return true
    elseif rc == DP_EBUSY then
        return false
    end
    raise("dogpile: cannot take the lock for key '" .. key .. "': " .. lib.strerror(rc))
end

--- A mutex for `key` in lock domain `domain` (from the core's registry).
-- `tracked`: the lock is held by the coroutine that takes it until it
-- releases it or hands it over (the region's get_or_create): one abandoned
-- with it is released (dogpile.holders). Untracked, a mutex may be released
-- by any coroutine at any time, as API.md allows. `tracked` may be the
-- coroutine that will take the lock, when the caller knows it (the region's
-- miss path asks before it makes any table: asking is not compiled, see
-- dogpile.holders), or false for the main one, which is never tracked.
-- `timeout`: the bound of its waits in seconds (nil: dogpile.set_lock_timeout's).
-- @tparam number domain a lock domain of the core (`dp_lock_domain(name, len)` or `dp_lock_domain_new()`)
-- @tparam string key the key the lock is for
-- @tparam[opt] boolean|thread tracked the taking coroutine holds the lock until it releases it or hands
-- it over; a coroutine: the one that will take it (default false: any coroutine may release it)
-- @tparam[opt] number timeout the bound of its waits in seconds (default nil: dogpile.lock_timeout())
-- @tparam[opt] table region the region the mutex serves, whose `_message` names it in the mutex's errors
-- (default nil: errors name no region)
-- @treturn table the mutex, not taken: `:acquire(wait)`, `:wait_unlocked()`, `:hand_over()`, `:release()`, `:locked()`
function _M.core_mutex(domain, key, tracked, timeout, region)
    return setmetatable({ domain = domain, key = key, tracked = tracked, timeout = timeout,
                          stolen = false, gave_up = false, region = region }, Mutex)
end

-- The metatable of the core's mutexes, for the region's miss path: a
-- backend's get_mutex that gives one needs no check, and its `tracked` may be
-- set to the coroutine the region asked for already.
_M._Mutex = Mutex

-- Past the bound: the holder is taken to be stuck; this caller goes ahead
-- without the lock, and its release is then a no-op.
local function go_ahead(self, bound)
    self.stolen = true
    log_quietly(format("dogpile: the lock for key '%s' was still held after %g s "
                       .. "(dogpile.set_lock_timeout); going ahead without it, so the value may "
                       .. "be created twice", self.key, bound))
    return true
end

--- `wait` nil or true: block (or yield) until acquired, for at most the
-- lock timeout (then go ahead without it); false: try once.
-- @tparam[opt] boolean wait false: try once (default true: wait)
-- @treturn boolean false only when `wait` is false and the lock is held elsewhere
function Mutex:acquire(wait)
    local domain, key, tracked = self.domain, self.key, self.tracked
    local gave_up = self.gave_up
    self.gave_up = false
    if try_core(domain, key, tracked) then
        return true
    end
    if wait == false then
        return false
    end
    local bound = self.timeout or lock_timeout
    -- wait_unlocked already waited the whole bound for this holder.
    if gave_up then
        return go_ahead(self, bound)
    end
    local sleep = current_sleep()
    if sleep then
        if wait_yielding(sleep, bound, try_core, domain, key, tracked) then
            return true
        end
        return go_ahead(self, bound)
    end
    local rc = C.dp_lock_wait(domain, key, #key, OWNER, bound)
    if rc == DP_EDEADLK and reclaim(domain, key) then
        rc = C.dp_lock_wait(domain, key, #key, OWNER, bound)
    end
    if rc == DP_ETIMEDOUT then
        return go_ahead(self, bound)
    end
    blocked_wait(self, rc, key)
    if tracked then
        took(domain, key, nil, tracked)
    end
    return true
end

local function core_free(domain, key)
    return C.dp_lock_held(domain, key, #key, nil) == 0 or reclaim(domain, key)
end

--- Wait, without taking the lock, until whoever holds it now releases it (at
-- once when it is free), for at most the lock timeout, as acquire. With a
-- sleep function set, poll with it; otherwise block on the core's condition
-- variable. Returns true. run() calls it so that every waiter can read the
-- holder's value together instead of taking the lock in turn.
function Mutex:wait_unlocked()
    local domain, key = self.domain, self.key
    local bound = self.timeout or lock_timeout
    local sleep = current_sleep()
    if sleep then
        if core_free(domain, key) or wait_yielding(sleep, bound, core_free, domain, key) then
            return true
        end
        self.gave_up = true
        return true
    end
    local rc = C.dp_lock_wait_unlocked(domain, key, #key, OWNER, bound)
    if rc == DP_EDEADLK and reclaim(domain, key) then
        rc = DP_OK
    elseif rc == DP_ETIMEDOUT then
        self.gave_up = true
        return true
    end
    return blocked_wait(self, rc, key)
end

--- The lock goes on to another coroutine on purpose (the async creation
-- runner releases it): it is no longer this coroutine's to be abandoned with.
function Mutex:hand_over()
    if not self.stolen then
        gave(self.domain, self.key)
    end
end

--- Release the lock this mutex took.
-- @raise when the lock is not held
function Mutex:release()
    local key = self.key
    if self.stolen then
        self.stolen = false
        return
    end
    gave(self.domain, key)
    if C.dp_lock_release(self.domain, key, #key) ~= DP_OK then
        raise("dogpile: release of the lock for key '" .. key .. "', which is not held")
    end
end

--- Whether the lock is held, by anyone.
-- @treturn boolean
function Mutex:locked()
    local key = self.key
    if self.stolen then
        return true
    end
    return C.dp_lock_held(self.domain, key, #key, nil) == 1
end

-- -- The dogpile algorithm ----------------------------------------------------

local function release_quietly(mutex)
    pcall(mutex.release, mutex)
end

-- Release once the value is in hand: a lock that cannot be released (its
-- backend went down meanwhile, say) is the lock's problem, not the caller's,
-- who has the value; it is logged, not raised. A lock with a timeout frees
-- itself; the core's cannot fail to release a lock its caller holds.
local function release_logged(mutex)
    local ok, err = pcall(mutex.release, mutex)
    if not ok then
        log_quietly("dogpile: the lock was not released after the value was made "
                    .. "(the value is returned): " .. tostring(err))
    end
end
_M.release_logged = release_logged

--- The lock's decision, shared by Lock:enter and the region.
-- The callbacks take a context `ctx` rather than being closures: creating a
-- closure is not compiled by LuaJIT (FNEW), and the miss path should be.
-- `read(ctx)` returns `has, value, created`; `has` false means no value.
-- `is_expired(ctx, created)` says whether a value must be regenerated.
-- `creator(ctx)` makes the value; `async_creator(ctx, mutex)` (or nil) hands
-- the held mutex to a runner.
-- `has, value, created` is the first read, already done by the caller, so a
-- hit costs one read. Returns the value and how it was obtained: "fresh",
-- "stale", "created" or "async"; a third result is true when the caller had
-- to wait for the lock.
--
-- With no value and the lock taken by someone else, a mutex that has
-- `:wait_unlocked()` (wait, without taking the lock, until the holder lets
-- go) lets every waiter read the holder's value as soon as it is released,
-- all together, instead of each taking the lock in turn to read it. Only when
-- that read finds nothing fresh (the holder failed, or stored nothing) does
-- the waiter take the lock, and it reads again under it: a value is only ever
-- created under the lock, so still by one caller at a time.
local function run(mutex, ctx, creator, read, is_expired, async_creator, has, value, created)
    local has_value = has and created > 0
    if has_value and not is_expired(ctx, created) then
        return value, "fresh"
    end
    local waited = false
    if has_value then
        if not mutex:acquire(false) then
            return value, "stale"
        end
    elseif not mutex:acquire(false) then
        waited = true
        -- (Tables only: a userdata or cdata mutex may raise on a missing field.)
        local wait_unlocked = type(mutex) == "table" and mutex.wait_unlocked
        if wait_unlocked then
            wait_unlocked(mutex)
            -- Nothing is held here: a read error propagates as is.
            local has1, value1, created1 = read(ctx)
            if has1 and created1 > 0 and not is_expired(ctx, created1) then
                return value1, "fresh", true
            end
        end
        mutex:acquire(true)
    end
    -- We hold the lock. Read again: while we waited, or just before we took
    -- it, the holder may have stored a new value.
    local ok, has2, value2, created2 = pcall(read, ctx)
    if not ok then
        release_quietly(mutex)
        error(has2, 0)
    end
    if has2 then
        has_value, value, created = true, value2, created2
        if not is_expired(ctx, created2) then
            release_logged(mutex)
            return value2, "fresh", waited
        end
    end
    if has_value and async_creator then
        -- The runner now owns the mutex and must release it.
        local hand_over = type(mutex) == "table" and mutex.hand_over
        if hand_over then
            hand_over(mutex)
        end
        local ok2, err = pcall(async_creator, ctx, mutex)
        if not ok2 then
            release_quietly(mutex)
            error(err, 0)
        end
        return value, "async", waited
    end
    local ok3, new = pcall(creator, ctx)
    if not ok3 then
        release_quietly(mutex)
        error(new, 0)
    end
    release_logged(mutex)
    return new, "created", waited
end
_M._run = run

-- -- Lock -------------------------------------------------------------------

local Lock = {}
Lock.__index = Lock
_M.Lock = Lock

local function is_callable(f)
    if type(f) == "function" then
        return true
    end
    local mt = getmetatable(f)
    return mt ~= nil and type(mt) == "table" and mt.__call ~= nil
end
_M.is_callable = is_callable

local function has_methods(obj)
    return is_callable(obj.acquire) and is_callable(obj.release)
end

local function check_mutex(mutex, who)
    local t = type(mutex)
    -- A userdata may not be indexable at all: ask under pcall.
    local ok, has = false, false
    if t == "table" or t == "userdata" or t == "cdata" then
        ok, has = pcall(has_methods, mutex)
    end
    if not (ok and has) then
        raise(who .. ": mutex must be an object with :acquire(wait) and :release(), got "
              .. type(mutex))
    end
end
_M.check_mutex = check_mutex

--- `Lock.new(mutex, creator, value_and_created_fn, expiretime, async_creator)`
-- @raise on arguments of the wrong type
-- @tparam table mutex any object with `:acquire(wait)` and `:release()` (a table, userdata or cdata:
-- dogpile.core_mutex's, a backend's get_mutex)
-- @tparam function creator makes the value, stores it where value_and_created_fn reads it, and returns it
-- @tparam function value_and_created_fn returns `value, created_time`, or raises
-- dogpile.NeedRegenerationException when there is no value
-- @tparam[opt] number expiretime seconds a value stays fresh (default nil, as a negative number: never expires)
-- @tparam[opt] function async_creator `async_creator(mutex)` regenerates an expired value elsewhere and
-- releases the mutex when done (default nil: the caller that took the lock regenerates)
-- @treturn table the lock; `lock:enter()` returns the value
function Lock.new(mutex, creator, value_and_created_fn, expiretime, async_creator)
    check_mutex(mutex, "dogpile: Lock.new")
    if not is_callable(creator) then
        raise("dogpile: Lock.new: creator must be a function, got " .. type(creator))
    end
    if not is_callable(value_and_created_fn) then
        raise("dogpile: Lock.new: value_and_created_fn must be a function, got "
              .. type(value_and_created_fn))
    end
    if expiretime ~= nil and type(expiretime) ~= "number" then
        raise("dogpile: Lock.new: expiretime must be a number of seconds or nil, got "
              .. type(expiretime))
    end
    if async_creator ~= nil and not is_callable(async_creator) then
        raise("dogpile: Lock.new: async_creator must be a function or nil, got "
              .. type(async_creator))
    end
    if expiretime ~= nil and expiretime < 0 then
        expiretime = nil
    end
    return setmetatable({
        mutex = mutex, creator = creator, value_and_created_fn = value_and_created_fn,
        expiretime = expiretime, async_creator = async_creator,
    }, Lock)
end

--- Returns the value: fresh, stale while another caller regenerates, or new.
-- @raise whatever the creator or value function raise, after releasing
local function lock_read(lock)
    local ok, value, created = pcall(lock.value_and_created_fn)
    if ok then
        if type(created) ~= "number" then
            raise("dogpile: value_and_created_fn must return value, created_time; "
                  .. "created_time was " .. type(created))
        end
        return true, value, created
    elseif value == NeedRegenerationException then
        return false
    end
    error(value, 0)
end

local function lock_is_expired(lock, created)
    local expiretime = lock.expiretime
    return not (created > 0) or (expiretime ~= nil and C.dp_clock_now() - created > expiretime)
end

local function lock_create(lock)
    return (lock.creator())
end

local function lock_async(lock, mutex)
    return lock.async_creator(mutex)
end

--- Returns the value: fresh, stale while another caller regenerates, or new.
-- @raise whatever the creator or value function raise, after releasing
-- @return the value
function Lock:enter()
    local has, value, created = lock_read(self)
    return (run(self.mutex, self, lock_create, lock_read, lock_is_expired,
                self.async_creator and lock_async or nil, has, value, has and created or -1))
end

-- -- NameRegistry --------------------------------------------------------------

local NameRegistry = {}
NameRegistry.__index = NameRegistry
_M.NameRegistry = NameRegistry

--- `NameRegistry.new(creator)`: `:get(id, ...)` returns the one live object for
-- `id`, made by `creator(id, ...)` when there is none. Objects are held weakly.
-- @tparam function creator `creator(id, ...)` makes the object for `id`
-- @treturn table the registry
function NameRegistry.new(creator)
    if not is_callable(creator) then
        raise("dogpile: NameRegistry.new: creator must be a function, got " .. type(creator))
    end
    return setmetatable({ creator = creator, values = setmetatable({}, { __mode = "v" }) },
                        NameRegistry)
end

--- The one live object for `id`, made by the registry's creator when there is none.
-- @tparam any id the object's name (any value but nil)
-- @tparam any ... passed to the creator after `id` when it is called
-- @return the object
-- @raise when id is nil
function NameRegistry:get(id, ...)
    if id == nil then
        raise("dogpile: NameRegistry:get: id must not be nil")
    end
    local values = self.values
    local obj = values[id]
    if obj == nil then
        obj = self.creator(id, ...)
        values[id] = obj
    end
    return obj
end

-- -- ReadWriteMutex ------------------------------------------------------------
-- A Lua object lives in one Lua state, so only coroutines of this state can
-- contend for it: waiting always goes through the yielding sleep.

local ReadWriteMutex = {}
ReadWriteMutex.__index = ReadWriteMutex
_M.ReadWriteMutex = ReadWriteMutex

local MAIN = {}

local function current()
    return co_running() or MAIN
end

--- A lock with shared readers and one writer, between the coroutines of this Lua state
-- (waiting goes through the sleep set by dogpile.set_sleep).
-- @treturn table the mutex, free
function ReadWriteMutex.new()
    return setmetatable({ readers = 0, writer = nil }, ReadWriteMutex)
end

local function rw_wait(step)
    local sleep = current_sleep()
    if not sleep then
        raise("dogpile: ReadWriteMutex is held by another coroutine of this Lua state and "
              .. "no sleep function is set, so waiting would block forever; "
              .. "call dogpile.set_sleep(fn)")
    end
    sleep(step)
    return math_min(step * GROWTH, MAX_STEP)
end

--- Take a read lock, shared with other readers; waits while a writer holds or awaits the lock.
-- @tparam[opt] boolean wait false: try once (default true: wait)
-- @treturn boolean false only when `wait` is false and a writer holds the lock
-- @raise when it must wait and no sleep function is set
function ReadWriteMutex:acquire_read_lock(wait)
    local step = FIRST_STEP
    while self.writer ~= nil do
        if wait == false then
            return false
        end
        step = rw_wait(step)
    end
    self.readers = self.readers + 1
    return true
end

--- Release a read lock.
-- @raise when no read lock is held
function ReadWriteMutex:release_read_lock()
    if self.readers <= 0 then
        raise("dogpile: ReadWriteMutex: release_read_lock called without a read lock")
    end
    self.readers = self.readers - 1
end

--- Take the write lock: waits for the writer before, then for the readers to leave (new readers
-- wait meanwhile).
-- @tparam[opt] boolean wait false: try once (default true: wait)
-- @treturn boolean false only when `wait` is false and the lock is held
-- @raise when it must wait and no sleep function is set
function ReadWriteMutex:acquire_write_lock(wait)
    local step = FIRST_STEP
    while self.writer ~= nil do
        if wait == false then
            return false
        end
        step = rw_wait(step)
    end
    -- Claim the writer slot first, so new readers wait while current ones drain.
    local me = current()
    self.writer = me
    step = FIRST_STEP
    while self.readers > 0 do
        if wait == false then
            self.writer = nil
            return false
        end
        local ok, err = pcall(rw_wait, step)
        if not ok then
            self.writer = nil
            error(err, 0)
        end
        step = err
    end
    return true
end

--- Release the write lock.
-- @raise when the current coroutine does not hold it
function ReadWriteMutex:release_write_lock()
    if self.writer ~= current() then
        raise("dogpile: ReadWriteMutex: the current coroutine does not hold the write lock")
    end
    self.writer = nil
end

_M.now = function() return C.dp_clock_now() end
_M.stamp = function() return C.dp_clock_stamp() end

return _M
