--- Which coroutine of this Lua state holds each of the core's locks, so that a
-- lock taken by a coroutine that is then abandoned (never resumed, and
-- collected: a killed light thread, a request nginx dropped, a session a game
-- scheduler forgot) or that died holding it does not stay held for the life
-- of the state. The core knows only the state (the owner tag); this module
-- knows the coroutine.
--
-- Two ways out for such a lock: a waiter of this state that finds the lock
-- held by this state asks `reclaim` (at once, before it would wait or raise);
-- and at every garbage-collection cycle, the locks whose coroutine has been
-- collected are released, so the threads of other Lua states waiting for them
-- are freed too. A lock handed on on purpose (the async creation runner
-- releases it from another coroutine) is `gave` first, so it is never taken
-- for abandoned.
local ffi = require "ffi"
local lib = require "dogpile.lib"
local context = require "dogpile.context"

local C = lib.C
local OWNER = context.OWNER
local co_running, co_status = coroutine.running, coroutine.status
local pairs, pcall, setmetatable, type = pairs, pcall, setmetatable, type

lib.own_source()

local _M = {}

local WEAK_VALUES = { __mode = "v" }
-- domain -> {key -> coroutine}, weakly: a collected holder leaves a hole.
local holder = {}
-- domain -> {key -> mutex or true}: every lock taken by a coroutine and not
-- yet given back, strongly, so that a hole in `holder` can be found; the
-- mutex object, when there is one, releases every level it holds (a
-- backend's own lock too, not only the core's).
local held = {}
local nheld = 0

--- The running coroutine, or false in the main one (which cannot be
-- abandoned, so its locks are not tracked).
local function running()
    local co, main = co_running()
    if co == nil or main then
        return false
    end
    return co
end
_M.running = running

--- This state took the core's lock (domain, key), through `mutex` (optional):
-- remember the coroutine that did, unless it is the main one. `co`, when a
-- coroutine: the one taking it, which the caller asked `running` for already.
-- (coroutine.running is not compiled: the trace is stitched around the call,
-- and every table the miss path made before it must then be allocated, which
-- made get_or_create's miss several times slower. The region asks before it
-- makes any.)
function _M.took(domain, key, mutex, co)
    if type(co) ~= "thread" then
        co = running()
        if not co then
            return
        end
    end
    local d = holder[domain]
    if d == nil then
        d = setmetatable({}, WEAK_VALUES)
        holder[domain] = d
        held[domain] = {}
    end
    d[key] = co
    local h = held[domain]
    if not h[key] then
        nheld = nheld + 1
    end
    h[key] = mutex or true
end

--- The lock (domain, key) is released, or handed to someone else on purpose.
function _M.gave(domain, key)
    local h = held[domain]
    if h ~= nil and h[key] then
        h[key] = nil
        nheld = nheld - 1
        holder[domain][key] = nil
    end
end

local owner_of = ffi.new("uint32_t[1]")

--- When the lock (domain, key) is held by this state for a coroutine that is
-- dead or has been collected, release it and return true.
function _M.reclaim(domain, key)
    local h = held[domain]
    if h == nil or not h[key] then
        return false
    end
    local co = holder[domain][key]
    if co ~= nil and co_status(co) ~= "dead" then
        return false
    end
    local mutex = h[key]
    _M.gave(domain, key)
    if C.dp_lock_held(domain, key, #key, owner_of) == 1 and owner_of[0] == OWNER then
        if mutex == true or not pcall(mutex.release, mutex) then
            C.dp_lock_release(domain, key, #key)
        end
        context.log_quietly("dogpile: the lock for key '" .. key .. "' was held by a coroutine "
                            .. (co == nil and "that was abandoned (collected while holding it)"
                                or "that ended without releasing it")
                            .. "; released")
        return true
    end
    return false
end

--- How many locks coroutines of this state hold (for the specs).
function _M.count()
    return nheld
end

-- At every collection cycle: release what collected coroutines held. A
-- finalizer that arms the next one; pairs() tolerates the fields it clears.
_M._sweeping = true -- specs turn it off to test the waiters' way out alone

local function sweep()
    if nheld == 0 or not _M._sweeping then
        return
    end
    for domain, h in pairs(held) do
        for key in pairs(h) do
            _M.reclaim(domain, key)
        end
    end
end

local function arm()
    ffi.gc(ffi.new("char[1]"), function()
        sweep()
        arm()
    end)
end
arm()

_M._sweep = sweep

return _M
