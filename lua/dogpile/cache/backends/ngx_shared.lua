--- dogpile.cache.ngx_shared: values in an nginx `lua_shared_dict`, seen by
-- every worker of the nginx instance, with the per-key dogpile lock and the
-- region's invalidation time kept in the same dict. Inside OpenResty only.
-- Arguments:
--
--     dict              the lua_shared_dict's name (or the ngx.shared.DICT itself)
--     lock_timeout      seconds (default 30): a lock expires after this long, so
--                       a dead or stuck holder keeps the others waiting at most
--                       that long; waiters give up the wait at that point too
--     lock_prefix       prefix of the lock keys (default "dogpile:lock:")
--     invalidation_prefix  prefix of the key that holds a region's
--                       invalidation, followed by the region's name
--                       (default "dogpile:invalidated:")
--     expiration        seconds after which the dict itself drops a stored
--                       value (default 0: never; the dict's LRU evicts when full)
--
-- Waiting: in a phase that can yield (rewrite, access, content, timer,
-- ssl_*), a caller with no value to serve waits without blocking the worker
-- for the holder's release, then reads the value without taking the lock
-- (Mutex:wait_unlocked): a release in the same worker wakes it at once
-- (ngx.semaphore), one in
-- another worker is seen within 1 ms (one waiter per worker and lock polls
-- the dict every 1 ms; see "Waiting in one worker" below). In a phase that
-- cannot yield (init_worker, log, header_filter, body_filter, balancer, set),
-- acquire(true) returns true without taking the lock: the caller runs the
-- creator itself instead of waiting (a stale value, when there is one, is
-- served as usual, since that needs no wait).
local ffi = require "ffi"
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local dogpile = require "dogpile"

local ngx = ngx
local NO_VALUE = api.NO_VALUE
local raise = lib.raise
local current_sleep = dogpile.current_sleep
local stamp = dogpile.stamp
local type, tostring, tonumber, setmetatable, error, pcall, math_min =
      type, tostring, tonumber, setmetatable, error, pcall, math.min
local ffi_string, ffi_cast = ffi.string, ffi.cast

lib.own_source()

local NAME = "dogpile.cache.ngx_shared"
local FIRST_STEP, MAX_STEP = 0.001, 0.004
local DEFAULT_LOCK_TIMEOUT = 30

local _M = { _VERSION = lib.version }

-- -- Reading the dict through the FFI -------------------------------------------
-- lua-resty-core's DICT:get resolves the zone (an FFI call and checks) and
-- copies the value out as a Lua string on every call. A hit here calls
-- ngx_<subsystem>_lua_ffi_shdict_get itself, on the zone pointer resolved
-- once, into this worker's buffer: the region reads the envelope in place
-- (get_in_place) and only the payload becomes a Lua string; the
-- invalidation time is read as a number, with no string at all. Where those
-- symbols are missing (no resty.core, or a dict that is not a
-- lua_shared_dict) the backend goes through the dict's methods.

-- The FFI functions, or nil (no FFI reads in this Lua state).
local shdict_get, udata_to_zone, free
pcall(function()
    local subsystem = ngx.config.subsystem
    require "resty.core.shdict" -- declares the functions below
    local C = ffi.C
    local get = C["ngx_" .. subsystem .. "_lua_ffi_shdict_get"]
    local to_zone = C["ngx_" .. subsystem .. "_lua_ffi_shdict_udata_to_zone"]
    shdict_get, udata_to_zone, free = get, to_zone, C.free
end)

-- LUA_TNIL, LUA_TBOOLEAN, LUA_TNUMBER, LUA_TSTRING: the value types shdict_get reports.
local T_NIL, T_BOOLEAN, T_NUMBER, T_STRING = 0, 1, 3, 4
local u8p = ffi.typeof("const uint8_t *")
local BUF_MIN, SMALL = 4096, 64

-- One worker's read state, in upvalues (constants to the trace compiler,
-- where table fields would be loaded on every hit): every read finishes
-- before the next starts (a dict read never yields), so one set of
-- out-parameters serves every backend of the Lua state. `buf` grows to the
-- largest value read: shdict_get mallocs a buffer of its own for a value
-- longer than `cap`, which becomes ours. `small`: the invalidation time's
-- own buffer, so that a string stored under its key (not ours) never lands
-- in `buf`, which a caller may be reading.
local vtype_p, buf_pp, len_p, num_p, flags_p, stale_p, err_p, buf, cap, small
if shdict_get then
    vtype_p, buf_pp = ffi.new("int[1]"), ffi.new("unsigned char *[1]")
    len_p, num_p, flags_p = ffi.new("size_t[1]"), ffi.new("double[1]"), ffi.new("int[1]")
    stale_p, err_p = ffi.new("int[1]"), ffi.new("char *[1]")
    buf, cap = ffi.new("unsigned char[?]", BUF_MIN), BUF_MIN
    small = ffi.new("unsigned char[?]", SMALL)
end

-- The zone pointer of `dict` (an ngx.shared.DICT), or nil when `dict` is
-- not one that the FFI functions take.
local function zone_of(dict)
    if shdict_get == nil or type(dict) ~= "table" or type(dict[1]) ~= "userdata" then
        return nil
    end
    local ok, zone = pcall(udata_to_zone, dict[1])
    if not ok or zone == nil then
        return nil
    end
    return zone
end

-- One shdict_get into the worker's buffer: the value's type (its length in
-- len_p[0], its bytes at buf_pp[0]). As DICT:get: a key the dict cannot
-- hold (empty, longer than 65535 bytes) is a miss, and so is a read that
-- failed with a reason (malloc); one without a reason raises.
local function raw_get(zone, key)
    local kn = #key
    if kn == 0 or kn > 65535 then
        return T_NIL
    end
    local b = buf
    buf_pp[0] = b
    len_p[0] = cap
    local rc = shdict_get(zone, key, kn, vtype_p, buf_pp, len_p, num_p, flags_p, 0, stale_p, err_p)
    if rc ~= 0 then
        if err_p[0] ~= nil then
            err_p[0] = nil
            return T_NIL
        end
        error(NAME .. ": reading '" .. key .. "' failed (shdict_get returned " .. rc .. ")", 0)
    end
    local p = buf_pp[0]
    if p ~= b then
        -- Longer than our buffer: shdict_get malloc'd this one; keep it.
        buf, cap = ffi.gc(p, free), tonumber(len_p[0])
    end
    return vtype_p[0]
end

-- The number stored under `key`, or nil when there is none (a value of
-- another type: false, for the caller to read through the dict instead).
local function raw_number(zone, key)
    buf_pp[0] = small
    len_p[0] = SMALL
    local rc = shdict_get(zone, key, #key, vtype_p, buf_pp, len_p, num_p, flags_p, 0, stale_p,
                          err_p)
    local p = buf_pp[0]
    if p ~= small then
        free(p)
    end
    if rc ~= 0 then
        return false
    end
    local t = vtype_p[0]
    if t == T_NUMBER then
        return num_p[0]
    elseif t == T_NIL then
        return nil
    end
    return false
end

-- -- The lock ------------------------------------------------------------------
-- `dict:add(lock_key, token, lock_timeout)` takes it (atomic across workers);
-- release deletes it only if it still holds our token, so a holder whose lock
-- expired and was taken by another never frees the other's lock.

local Mutex = {}
Mutex.__index = Mutex

local token_seq = 0

local function new_token()
    token_seq = token_seq + 1
    return ngx.worker.pid() .. ":" .. token_seq
end

local function try_add(self, token)
    local ok, err = self.dict:add(self.lock_key, token, self.timeout)
    if ok then
        self.token = token
        return true
    end
    if err ~= "exists" then
        error(NAME .. ": cannot take the lock '" .. self.lock_key .. "': " .. tostring(err), 0)
    end
    return false
end

-- Waiting in one worker: the coroutines of this worker waiting for one lock
-- (to take it, or only for its release: Mutex:wait_unlocked) share a record
-- {sema, n, poller, poll_at}. A release in this worker wakes them all at
-- once through the ngx.semaphore. Releases in other workers are seen by
-- polling: one waiter per worker and lock (the poller) looks at the lock
-- every POLL_STEP, and wakes the others when it sees the release; the others
-- wait on the semaphore for at most IDLE_STEP (and take over polling if the
-- poller stops, say its request was aborted).
-- Without ngx.semaphore, or with a sleep function set by dogpile.set_sleep,
-- every waiter polls with that sleep (FIRST_STEP growing to MAX_STEP).
local semaphore
do
    local ok, m = pcall(require, "ngx.semaphore")
    semaphore = ok and m or nil
end
local POLL_STEP, IDLE_STEP, POLLER_STALE = 0.001, 0.05, 0.01
local waits = {} -- lock key -> record, in this worker

-- Wait in this worker until `check(self, arg)` is true (it may raise).
-- `all`: the condition is the same for every waiter of the record (the lock
-- was released), so the one that sees it by polling wakes them all.
-- Returns true, or false when the deadline passed.
local function wait_worker(self, check, arg, all)
    local lk = self.lock_key
    local w = waits[lk]
    if not w then
        w = { sema = semaphore.new(0), n = 0, poller = nil, poll_at = 0 }
        waits[lk] = w
    end
    w.n = w.n + 1
    local me = coroutine.running()
    local deadline = ngx.now() + 2 * self.timeout + 1
    local ok, got = true, false
    while true do
        local now = ngx.now()
        if w.poller == nil or now - w.poll_at > POLLER_STALE then
            w.poller = me
        end
        local polling = w.poller == me
        if polling then
            w.poll_at = now
        end
        w.sema:wait(polling and POLL_STEP or IDLE_STEP)
        ok, got = pcall(check, self, arg)
        if not ok or got then
            break
        end
        if ngx.now() > deadline then
            break
        end
    end
    w.n = w.n - 1
    local was_poller = w.poller == me
    if was_poller then
        w.poller = nil
    end
    if ok and got and all then
        local blocked = -w.sema:count()
        if blocked > 0 then
            w.sema:post(blocked) -- released: every waiter may look now
        end
    elseif was_poller and w.n > 0 then
        w.sema:post(1) -- hand the polling over
    end
    if w.n == 0 and waits[lk] == w then
        waits[lk] = nil
    end
    if not ok then
        error(got, 0)
    end
    return got
end

--- `wait` false: try once. Otherwise wait with ngx.sleep where the phase can
-- yield; where it cannot, return true without the lock (see the header).
-- @tparam[opt=true] boolean wait false: try once
-- @treturn boolean true: held (or, where the phase cannot yield, go ahead without it)
function Mutex:acquire(wait)
    local token = new_token()
    if try_add(self, token) then
        return true
    end
    if wait == false then
        return false
    end
    local sleep = current_sleep()
    if not sleep then
        self.unlocked = true
        return true
    end
    if semaphore and sleep == ngx.sleep then
        if wait_worker(self, try_add, token, false) then
            return true
        end
        error(NAME .. ": timed out waiting for the lock '" .. self.lock_key .. "'", 0)
    end
    -- The holder's lock expires after `timeout` at the latest, and add then
    -- succeeds; the deadline only guards against a clock gone wrong.
    local deadline = ngx.now() + 2 * self.timeout + 1
    local step = FIRST_STEP
    while true do
        sleep(step)
        if try_add(self, token) then
            return true
        end
        if ngx.now() > deadline then
            error(NAME .. ": timed out waiting for the lock '" .. self.lock_key .. "'", 0)
        end
        step = math_min(step * 2, MAX_STEP)
    end
end

function Mutex:release()
    local token = self.token
    if token == nil then
        if self.unlocked then
            self.unlocked = false
            return
        end
        raise("dogpile: release of the lock '" .. self.lock_key .. "', which is not held")
    end
    self.token = nil
    local dict, lk = self.dict, self.lock_key
    if dict:get(lk) == token then
        dict:delete(lk)
    end
    local w = waits[lk]
    if w then
        local blocked = -w.sema:count()
        if blocked > 0 then
            w.sema:post(blocked)
        end
    end
end

-- Released since `held` (the holder's token) was seen?
local function released(self, held)
    return self.dict:get(self.lock_key) ~= held
end

--- Wait, without taking the lock, until its holder now releases it (or its
-- lock expires): dogpile's run() then reads the value, so that every waiter
-- gets it at once rather than taking the lock in turn. In this worker a
-- release wakes the waiters through the semaphore; a release in another
-- worker is seen by the poll (POLL_STEP). true: released or free; false:
-- cannot wait in this phase, or the deadline passed.
function Mutex:wait_unlocked()
    local held = self.dict:get(self.lock_key)
    if held == nil then
        return true
    end
    local sleep = current_sleep()
    if not sleep then
        return false
    end
    if semaphore and sleep == ngx.sleep then
        return wait_worker(self, released, held, true)
    end
    local deadline = ngx.now() + 2 * self.timeout + 1
    local step = FIRST_STEP
    while true do
        sleep(step)
        if released(self, held) then
            return true
        end
        if ngx.now() > deadline then
            return false
        end
        step = math_min(step * 2, MAX_STEP)
    end
end

function Mutex:locked()
    return self.dict:get(self.lock_key) ~= nil
end

-- -- Invalidation across workers -----------------------------------------------
-- One number per region in the dict: the invalidation time, positive for a
-- hard invalidation and negative for a soft one.

-- Every hit asks for the invalidation time. Read from the dict, that is a
-- second shdict_get per hit, costlier than the value's own (the key is
-- longer, and shdict hashes it byte by byte). So each invalidator keeps the
-- time it last read, and the workers share one word of memory, the change
-- page: invalidate() writes the dict and then a new token into the page; a
-- hit that finds the token it saw last uses its copy, any other token makes
-- it read the dict again. The page is mapped (MAP_SHARED, anonymous) by the
-- master in init_by_lua, before the fork, so every worker of the instance
-- sees it; the master keeps it across reloads (HUP), finding it again
-- through the dict (PAGE_KEY: the address and a check token), so workers of
-- the old and the new generation share it.
--
-- The order makes it exact: the writer's dict write is done (the dict's
-- mutex released) before its token store, and the reader loads the token
-- before it takes the dict's mutex. On x86 (TSO: stores become visible in
-- order, loads are not reordered with loads) that is enough; elsewhere
-- there is no page and every hit reads the dict. Without init_by_lua (a
-- region configured in a worker) there is no page either.
--
-- Backstop: a copy older than REREAD seconds (ngx.now, the worker's cached
-- clock) is read again, so that an invalidation that bypassed the page (a
-- worker of a generation with no page) is seen within that time, and so
-- that hits keep the record recent in the dict's LRU, as reading it on
-- every hit did.
local PAGE_KEY, REREAD = "dogpile:ngx_shared:change_page", 1
local page -- volatile double[2]: [0] the token of the last invalidation, [1] the check token
local page_seq = 0

local function worker_pid()
    return ngx.worker and ngx.worker.pid and ngx.worker.pid() or 0
end

-- A token no other write uses: the writer's pid and its own count.
local function new_page_token()
    page_seq = (page_seq + 1) % 0x40000000
    return (worker_pid() % 0x400000) * 0x40000000 + page_seq + 1
end

-- Whether this process maps shared, readable and writable memory at `addr`
-- (reading elsewhere could fault).
local function shared_mapping_at(addr)
    local f = io.open("/proc/self/maps")
    if not f then
        return false
    end
    local found = false
    for line in f:lines() do
        local start, perms = line:match("^(%x+)%-%x+ (%S+)")
        if start and tonumber(start, 16) == addr then
            found = perms == "rw-s"
            break
        end
    end
    f:close()
    return found
end

-- In init_by_lua (the master): map the page, or find the one this master
-- mapped under an earlier configuration. Any failure leaves no page.
local function open_page(dict)
    if page ~= nil or (ffi.arch ~= "x64" and ffi.arch ~= "x86") or ngx.get_phase() ~= "init" then
        return
    end
    pcall(function()
        pcall(ffi.cdef, [[
            void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset);
        ]])
        local dptr = ffi.typeof("volatile double *")
        local found = dict:get(PAGE_KEY)
        if type(found) == "string" then
            local addr, check = found:match("^(%d+):(%d+)$")
            addr, check = tonumber(addr), tonumber(check)
            -- The master that mapped it (or the process it was forked from,
            -- before nginx went daemon) never unmaps it: it is here if this
            -- process has a shared read-write mapping starting at that
            -- address that holds the check token.
            if addr and check and shared_mapping_at(addr) then
                local p = ffi_cast(dptr, ffi_cast("uintptr_t", addr))
                if p[1] == check then
                    page = p
                    return
                end
            end
        end
        -- PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS (Linux).
        local m = ffi.C.mmap(nil, 4096, 3, 0x21, -1, 0)
        if m == nil or ffi_cast("intptr_t", m) == -1 then
            return
        end
        local p = ffi_cast(dptr, m)
        local check = new_page_token()
        p[0], p[1] = 0, check
        local addr = tonumber(ffi_cast("uintptr_t", m))
        if dict:set(PAGE_KEY, ("%.0f:%.0f"):format(addr, check)) then
            page = p
        end
    end)
end

-- The stored invalidation time, read from the dict: through the FFI where
-- it can (a number, no string).
local function read_stamp(self)
    local zone = self.zone
    if zone ~= nil then
        local v = raw_number(zone, self.key)
        if v ~= false then
            return v
        end
    end
    return self.dict:get(self.key)
end

local function stamp_of(self)
    local pg = self.page
    if pg == nil then
        return read_stamp(self)
    end
    local token, now = pg[0], ngx.now()
    if token == self.token and now - self.read_at < REREAD then
        return self.stamp
    end
    -- The token first, then the dict (see above).
    local v = read_stamp(self)
    self.token, self.stamp, self.read_at = token, v, now
    return v
end

local Invalidator = {}
Invalidator.__index = Invalidator
_M.Invalidator = Invalidator

function Invalidator:invalidate(hard)
    local t = stamp()
    local ok, err = self.dict:set(self.key, hard ~= false and t or -t)
    if not ok then
        error(NAME .. ": cannot store the invalidation '" .. self.key .. "': " .. tostring(err), 0)
    end
    -- After the dict write: a worker that sees the new token reads the new time.
    if page ~= nil then
        page[0] = new_page_token()
    end
end

function Invalidator:is_invalidated(ct)
    local v = stamp_of(self)
    if v == nil then
        return false
    end
    if v < 0 then
        v = -v
    end
    return ct < v
end

function Invalidator:is_hard_invalidated(ct)
    local v = stamp_of(self)
    return v ~= nil and v > 0 and ct < v
end

function Invalidator:is_soft_invalidated(ct)
    local v = stamp_of(self)
    return v ~= nil and v < 0 and ct < -v
end

function Invalidator:was_hard_invalidated()
    local v = stamp_of(self)
    return v ~= nil and v > 0
end

function Invalidator:was_soft_invalidated()
    local v = stamp_of(self)
    return v ~= nil and v < 0
end

-- -- The backend -----------------------------------------------------------------

local Backend = {}
Backend.__index = Backend
-- The region hands us, and expects back, the serialized envelope (bytes).
Backend.serialized = true
-- dict:get never raises (a bad key gives nil, err): the region calls it
-- without pcall, so a hit compiles into one trace.
Backend.infallible = true

function Backend:get(key)
    local zone = self.zone
    if zone == nil then
        local v = self.dict:get(key)
        if v == nil then
            return NO_VALUE
        end
        return v
    end
    local t = raw_get(zone, key)
    if t == T_STRING then
        return ffi_string(buf_pp[0], len_p[0])
    elseif t == T_NIL then
        return NO_VALUE
    elseif t == T_NUMBER then
        return tonumber(num_p[0])
    elseif t == T_BOOLEAN then
        return buf_pp[0][0] ~= 0
    end
    return self.dict:get(key)
end

--- The stored bytes of `key` where they lie, for the region to read the
-- envelope in place (read.lua's in-place strategy): a `const uint8_t *` and
-- the length, valid until this worker's next read of any ngx_shared
-- backend; nil on a miss; false when the value is not bytes (get then
-- returns what it is, and the region counts it as undecodable).
-- @local
function Backend:get_in_place(key)
    local t = raw_get(self.zone, key)
    if t == T_STRING then
        return ffi_cast(u8p, buf_pp[0]), tonumber(len_p[0])
    elseif t == T_NIL then
        return nil
    end
    return false
end

function Backend:set(key, value)
    local ok, err = self.dict:set(key, value, self.expiration)
    if not ok then
        error("cannot store: " .. tostring(err), 0)
    end
end

function Backend:delete(key)
    self.dict:delete(key)
end

function Backend:get_mutex(key)
    return setmetatable({ dict = self.dict, lock_key = self.lock_prefix .. key,
                          timeout = self.lock_timeout, token = nil, unlocked = false }, Mutex)
end

--- The region's invalidator, in the dict, so that invalidate() in one worker
-- reaches every worker (region.configure asks for it).
-- @local
function Backend:region_invalidator(region)
    local name = region and region.name or ""
    -- token false: no token seen yet (the page holds a number).
    return setmetatable({ dict = self.dict, zone = self.zone, page = page,
                          key = self.invalidation_prefix .. tostring(name),
                          token = false, stamp = nil, read_at = 0 }, Invalidator)
end

-- -- The change feed for a tiered region's upper tiers --------------------------
-- (dogpile.cache.tiered over ngx_shared: each worker keeps a memory tier in
-- front of the dict.) A sequence number and a ring of changed keys in the
-- dict, which every worker sees: a write bumps `<prefix>feed:seq` (incr is
-- atomic across workers) and stores "<seq>:<pid>:<key>" in slot seq % RING.
-- Each worker drains it from a timer every DRAIN_EVERY seconds, so a hit
-- costs nothing; the timer runs between the worker's yields, and a dict read
-- never yields, so a copy cannot be made from a value older than a drain
-- already applied. Entries carry their seq: a slot holding another one was
-- overwritten (the worker fell behind by a whole ring) or evicted, and a seq
-- that went backwards was evicted too: the worker then drops every copy.

local FEED_RING, DRAIN_EVERY, HOST_SCOPE = 4096, 0.01, 3

local Feed = {}
Feed.__index = Feed

function Feed:push(key)
    local dict, prefix = self.dict, self.prefix
    local seq, err = dict:incr(prefix .. "seq", 1, 0)
    if not seq then
        error(NAME .. ": cannot announce a change of '" .. key .. "': " .. tostring(err), 0)
    end
    local ok, serr = dict:set(prefix .. (seq % FEED_RING), seq .. ":" .. ngx.worker.pid() .. ":" .. key)
    if not ok then
        -- An announcement that cannot be stored must not go unseen: the
        -- readers find the slot without it and start over.
        error(NAME .. ": cannot announce a change of '" .. key .. "': " .. tostring(serr), 0)
    end
end

-- Apply what was pushed since the last drain: on_key(ctx, key, scope) for
-- each entry of another worker, on_reset(ctx, now) when entries were lost.
-- An entry whose slot is not written yet (incr done, set to come) ends the
-- drain: the next one starts there.
-- @local
function Feed:drain(on_key, on_reset, ctx)
    local dict, prefix = self.dict, self.prefix
    local head = dict:get(prefix .. "seq") or 0
    local last = self.last
    if head == last then
        return
    end
    ctx.drains = ctx.drains + 1
    if head < last or head - last > FEED_RING then
        self.last = head
        on_reset(ctx, ngx.now())
        return
    end
    local me = tostring(ngx.worker.pid())
    for seq = last + 1, head do
        local v = dict:get(prefix .. (seq % FEED_RING))
        local s, pid, key = nil, nil, nil
        if v then
            s, pid, key = v:match("^(%d+):(%d+):(.*)$")
            s = tonumber(s)
        end
        if s == nil or s < seq then
            if v == nil and seq < head then
                -- Evicted (or never stored): what changed is unknown.
                self.last = head
                on_reset(ctx, ngx.now())
                return
            end
            return -- not written yet
        elseif s > seq then
            self.last = head
            on_reset(ctx, ngx.now())
            return
        end
        self.last = seq
        if pid ~= me then
            on_key(ctx, key, HOST_SCOPE)
        end
    end
end

--- The change feed of this dict under `prefix` (dogpile.cache.tiered asks
-- for it). Its sync_fn gives the tiered backend's hit-path sync: it only
-- makes sure this worker's drain timer runs (timers cannot start in
-- init_by_lua, where a region may be configured before the fork).
-- @local
function Backend:change_feed(prefix)
    local feed = setmetatable({ dict = self.dict, prefix = prefix .. "feed:" }, Feed)
    feed.last = self.dict:get(feed.prefix .. "seq") or 0
    function feed.sync_fn(ctx, on_key, on_reset)
        local started = false
        local function tick(premature)
            if not premature then
                feed:drain(on_key, on_reset, ctx)
            end
        end
        local function start()
            if ngx.get_phase() == "init" then
                return
            end
            local ok, err = ngx.timer.every(DRAIN_EVERY, tick)
            if not ok then
                error(NAME .. ": cannot start the change feed's timer: " .. tostring(err), 0)
            end
            started = true
            -- Whatever changed before this worker listened is unknown.
            feed.last = feed.dict:get(feed.prefix .. "seq") or 0
            on_reset(ctx, ngx.now())
        end
        return function()
            if not started then
                start()
            end
        end
    end
    return feed
end

function Backend:stats()
    local dict = self.dict
    local out = { evictions = 0 }
    if dict.free_space then
        local ok, free = pcall(dict.free_space, dict)
        if ok then
            out.free_bytes = free
        end
    end
    if dict.capacity then
        local ok, cap = pcall(dict.capacity, dict)
        if ok then
            out.capacity = cap
        end
    end
    return out
end

local function check_seconds(v, what, default)
    if v == nil then
        return default
    end
    if type(v) ~= "number" or v < 0 or v ~= v then
        raise(NAME .. ": " .. what .. " must be a number of seconds >= 0, got " .. tostring(v))
    end
    return v
end

--- `new(arguments)`: the backend (the region calls it from `configure`).
-- @tparam table arguments `dict` (required), `lock_timeout`, `lock_prefix`, `invalidation_prefix`,
-- `expiration`: see the Backend arguments page for their types and defaults
-- @treturn table the backend
-- @raise outside nginx, or when `dict` names no lua_shared_dict
function _M.new(arguments)
    arguments = arguments or {}
    if type(ngx) ~= "table" or type(ngx.shared) ~= "table" and type(ngx.shared) ~= "userdata" then
        raise(NAME .. ": needs OpenResty (ngx.shared); this Lua state is not inside nginx")
    end
    local dict = arguments.dict
    if type(dict) == "string" then
        local d = ngx.shared[dict]
        if d == nil then
            raise(NAME .. ": no lua_shared_dict named '" .. dict .. "' (declare it with "
                  .. "`lua_shared_dict " .. dict .. " 10m;` in the http block)")
        end
        dict = d
    elseif type(dict) ~= "table" and type(dict) ~= "userdata" then
        raise(NAME .. ": argument dict must be the name of a lua_shared_dict, got " .. type(dict))
    end
    local lock_timeout = check_seconds(arguments.lock_timeout, "lock_timeout", DEFAULT_LOCK_TIMEOUT)
    if lock_timeout <= 0 then
        raise(NAME .. ": lock_timeout must be > 0 (a lock without a timeout could be held forever)")
    end
    local lock_prefix = arguments.lock_prefix or "dogpile:lock:"
    local inv_prefix = arguments.invalidation_prefix or "dogpile:invalidated:"
    if type(lock_prefix) ~= "string" or type(inv_prefix) ~= "string" then
        raise(NAME .. ": lock_prefix and invalidation_prefix must be strings")
    end
    local zone = zone_of(dict)
    open_page(dict)
    return setmetatable({
        dict = dict,
        -- The zone pointer for the FFI reads, or nil (then the dict's methods).
        zone = zone,
        -- Only with the zone: a region reads the envelope in place (read.lua).
        get_in_place = zone ~= nil and Backend.get_in_place or false,
        lock_timeout = lock_timeout,
        lock_prefix = lock_prefix,
        invalidation_prefix = inv_prefix,
        expiration = check_seconds(arguments.expiration, "expiration", 0),
    }, Backend)
end

return _M
