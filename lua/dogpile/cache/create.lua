--- The miss path of a region: the lock for a key (the backend's own, or the
-- core's per-key lock), get_or_create past its hit under dogpile's run(), and
-- get_or_create_multi. Every lock taken here is released on every way out.
--
-- The freshness policies live here too: what a creator's results mean
-- (`value, expiration_time`, `nil, err`, negative_expiration_time),
-- stale_if_error, and the refresh early_refresh draws on a fresh value.
local lib = require "dogpile.lib"
local dogpile = require "dogpile"
local context = require "dogpile.context"
local holders = require "dogpile.holders"
local options = require "dogpile.cache.options"
local api = require "dogpile.cache.api"
local read = require "dogpile.cache.read"
local write = require "dogpile.cache.write"
local observe = require("dogpile.cache.latency").observe

local C = lib.C
local raise = lib.raise
local finite = options.finite
local run = dogpile._run
local core_mutex = dogpile.core_mutex
local release_logged = dogpile.release_logged
local CoreMutex = dogpile._Mutex
local running = holders.running
local NO_VALUE = api.NO_VALUE
local FRESH, STALE, MISSING = read.FRESH, read.STALE, read.MISSING
local judge, judge_value, own_exp = read.judge, read.judge_value, read.own_exp
local fetch, fetch_multi = read.fetch, read.fetch_multi
local store, store_multi = write.store, write.store_multi
local new_value, new_metadata = write.new_value, write.new_metadata
local type, pcall, error, setmetatable, getmetatable, unpack, tostring, ipairs, rawequal =
      type, pcall, error, setmetatable, getmetatable, unpack, tostring, ipairs, rawequal
local sort, maxn = table.sort, table.maxn

lib.own_source()

local _M = {}

-- -- Mutexes -------------------------------------------------------------------------

-- A backend's lock, its failures put through the region's failure policy
-- (Region:_failed): under fail_open a lock that cannot be taken because the
-- backend is down lets the creator run without it; otherwise the failure is
-- raised naming the backend, the key and the region.
local FailOpenMutex = {}
FailOpenMutex.__index = FailOpenMutex

function FailOpenMutex:acquire(wait)
    local ok, got = pcall(self.inner.acquire, self.inner, wait)
    if ok then
        self.unlocked = false
        return got
    end
    self.region:_failed("lock", self.key, got)
    self.unlocked = true
    return true
end

-- Waiting for the holder to let go (dogpile's run()) goes through too; a
-- failure there is logged and the caller goes on to acquire.
function FailOpenMutex:wait_unlocked()
    local inner = self.inner
    local f = type(inner) == "table" and inner.wait_unlocked
    if not f then
        return false
    end
    local ok, r = pcall(f, inner)
    if not ok then
        self.region:_failed("lock", self.key, r)
        return false
    end
    return r
end

function FailOpenMutex:hand_over()
    local inner = self.inner
    local f = not self.unlocked and type(inner) == "table" and inner.hand_over
    if f then
        f(inner)
    end
end

function FailOpenMutex:release()
    if self.unlocked then
        self.unlocked = false
        return
    end
    local ok, err = pcall(self.inner.release, self.inner)
    if not ok then
        self.region:_failed("unlock", self.key, err)
    end
end

--- The mutex for a mangled key: the backend's own lock when it has one,
-- otherwise the core's per-key lock in the region's domain. `co`: the
-- coroutine that will take it (holders.running(): false in the main one), when
-- the caller asked already; nil: asked when it is taken.
local function mutex_for(region, key, co)
    local backend = region.backend
    if co == nil then
        co = true
    end
    if backend.get_mutex then
        local ok, m = pcall(backend.get_mutex, backend, key)
        if not ok then
            region:_failed("get_mutex", key, m)
            m = nil
        elseif m ~= nil then
            if getmetatable(m) == CoreMutex then
                -- The core's lock in the backend's domain (shared_memory's):
                -- in process, it has no backend to fail, so it is used as
                -- the memory region's is, naming the region in its errors,
                -- not wrapped for fail_open. (Each wrapper's table and pcall
                -- took the miss past what one compiled trace holds.)
                if co ~= true and m.tracked == true then
                    m.tracked = co
                end
                if m.region == nil then
                    m.region = region
                end
                return m
            end
            local ok2, err = pcall(dogpile.check_mutex, m, "dogpile.cache: backend get_mutex")
            if not ok2 then
                region:_reraise(err)
            end
            return setmetatable({ inner = m, region = region, key = key }, FailOpenMutex)
        end
    end
    return core_mutex(region._domain, key, co, nil, region)
end
_M.mutex_for = mutex_for

-- -- What a creator returned ---------------------------------------------------------

-- `return nil, err`: the creator failed.
local FAILED = setmetatable({}, { __tostring = function() return "<creator failed>" end })
_M.FAILED = FAILED

--- A creator's results: the value and its own expiration time (nil: the
-- call's or the region's; a nil value gets negative_expiration_time), or
-- FAILED and the message of `return nil, err`.
-- @raise when a second value is neither a number nor, after nil, a string
local function outcome(region, value, second, who)
    if second == nil then
        if value == nil then
            return nil, region.negative_expiration_time
        end
        return value, nil
    end
    local t = type(second)
    if t == "number" then
        if not finite(second) then
            raise(region:_message("dogpile.cache: " .. who .. ": the creator returned an "
                  .. "expiration time of " .. tostring(second) .. "; it must be a finite number "
                  .. "of seconds (-1: never expires)"))
        end
        return value, second
    elseif t == "string" and value == nil then
        return FAILED, second
    end
    raise(region:_message("dogpile.cache: " .. who .. ": the creator returned a " .. t .. " after "
          .. (value == nil and "nil" or "its value") .. "; a second value must be the value's "
          .. "expiration time (a number of seconds) or, after nil, an error message (a string)"))
end
_M.outcome = outcome

--- How long ago (seconds, >= 0) a value created at `ct`, with its own
-- expiration time `ttl`, stopped being fresh for a call whose own is `exp`;
-- 0 for one that has not expired (soft-invalidated, or refreshed early).
local function expired_for(ct, ttl, exp, now)
    exp = own_exp(ttl, exp)
    if exp == nil then
        return 0
    end
    local ago = now - (ct + exp)
    return ago > 0 and ago or 0
end

--- May a value created at `ct` (own expiration time `ttl`) be served instead
-- of an error, under the region's stale_if_error?
local function within_window(region, ct, ttl, exp)
    local window = region.stale_if_error
    return window ~= nil and expired_for(ct, ttl, exp, C.dp_clock_now()) <= window
end

-- -- get_or_create's miss path ---------------------------------------------------------

local function call_creator(creator, creator_args)
    if creator_args == nil then
        return creator()
    end
    return creator(unpack(creator_args, 1, creator_args.n or #creator_args))
end

-- The callbacks for dogpile's run(), over a context table (no closures:
-- LuaJIT does not compile their creation). The context keeps the value the
-- caller holds (`has`, `cur`, `cur_ct`, `cur_ttl`): the last read's, which
-- the next is_expired judges and a failed creator may fall back to.
local function slow_read(ctx)
    local region = ctx.region
    local cv = fetch(region, ctx.key)
    if judge_value(region, cv, ctx.exp) == MISSING then
        ctx.has = false
        return false
    end
    local md = cv.metadata
    ctx.has, ctx.cur, ctx.cur_ct, ctx.cur_ttl = true, cv.payload, md.ct, md.ttl
    return true, cv.payload, md.ct
end

-- Only values that are not MISSING reach here (slow_read, and the first read).
-- A value drawn for an early refresh counts as expired until a newer one
-- replaces it.
local function slow_is_expired(ctx, ct)
    local early = ctx.early
    if early and ct <= early then
        return true
    end
    return judge(ctx.region, ct, own_exp(ctx.cur_ttl, ctx.exp)) ~= FRESH
end

--- The creator failed (`err`: what it raised or returned) or, with
-- `store_failed`, the new value could not be stored: the value the caller
-- holds when that is allowed (an early refresh's value, which is still fresh;
-- a stale one within stale_if_error), else the error, raised unchanged.
local function failed(ctx, err, store_failed)
    local region = ctx.region
    local st = region._stats
    if not store_failed then
        st.errors = st.errors + 1
    end
    if ctx.has then
        local why
        if ctx.early then
            why = "the early refresh of key '%s' failed (its value, still fresh, is kept): "
        elseif within_window(region, ctx.cur_ct, ctx.cur_ttl, ctx.exp) then
            st.stale_on_error = st.stale_on_error + 1
            why = "key '%s': its stale value is served (stale_if_error): "
        end
        if why then
            ctx.kept = true
            context.log_quietly("dogpile.cache: region " .. region:_label() .. ": "
                                .. why:format(tostring(ctx.key))
                                .. (store_failed and "storing the new value failed: " or "")
                                .. tostring(err))
            return ctx.cur
        end
    end
    error(err, 0)
end

local function slow_gen(ctx)
    local region = ctx.region
    local st = region._stats
    st.creations = st.creations + 1
    local beta = region._beta
    local t0 = C.dp_clock_monotonic()
    local ok, value, second = pcall(call_creator, ctx.creator, ctx.creator_args)
    local took = C.dp_clock_monotonic() - t0
    observe(region, "create", took)
    if not ok then
        return failed(ctx, value)
    end
    local ttl
    value, ttl = outcome(region, value, second, "get_or_create")
    if rawequal(value, FAILED) then
        return failed(ctx, ttl)
    end
    local should_cache_fn = ctx.should_cache_fn
    if not should_cache_fn or should_cache_fn(value) then
        local cv = new_value(value, ttl, beta and took or nil)
        if not (ctx.has and (ctx.early or region.stale_if_error)) then
            store(region, ctx.key, cv)
        else
            -- A failed store is the creator's failure: the caller keeps the
            -- value it holds, as it would have. Under fail_open the failure
            -- is logged and counted, not raised.
            local errors = st.errors
            local ok2, err = pcall(store, region, ctx.key, cv)
            if not ok2 or st.errors ~= errors then
                if ctx.early or within_window(region, ctx.cur_ct, ctx.cur_ttl, ctx.exp) then
                    return failed(ctx, ok2 and "the backend failed (fail_open)" or err, true)
                elseif not ok2 then
                    error(err, 0)
                end
            end
        end
    end
    return value
end

local function slow_async(ctx, mutex)
    local region = ctx.region
    local creator, creator_args = ctx.creator, ctx.creator_args
    -- Returns what region:set takes, so that `region:set(key, creator())`
    -- stores the value's own expiration time and its creator's duration.
    local function go()
        local t0 = C.dp_clock_monotonic()
        local value, second = call_creator(creator, creator_args)
        local took = C.dp_clock_monotonic() - t0
        observe(region, "create", took)
        local ttl
        value, ttl = outcome(region, value, second, "async_creation_runner")
        if rawequal(value, FAILED) then
            error(ttl, 0)
        end
        return value, ttl, took
    end
    region._stats.creations = region._stats.creations + 1
    return region.async_creation_runner(region, ctx.orig_key, go, mutex)
end

--- get_or_create past a first read that found no fresh value: `first` is
-- what it found (a CachedValue or NO_VALUE). Counts the miss, the wait and
-- a stale value served. With `early` (early_refresh drew this fresh value,
-- `first`, for a refresh): one caller refreshes it under the lock, or hands
-- it to the async_creation_runner; every other caller keeps it, without
-- waiting. Counted as a hit already; counts the refresh.
function _M.get_or_create(region, key, orig_key, creator, exp, should_cache_fn, creator_args,
                          first, early)
    -- Asked before any table is made: the call is not compiled, and what is
    -- made before it could not stay unallocated in the trace (see holders).
    local co = running()
    local st = region._stats
    local ctx = { region = region, key = key, orig_key = orig_key,
                  creator = creator, creator_args = creator_args, exp = exp,
                  should_cache_fn = should_cache_fn, has = false, early = false }
    local has = early or judge_value(region, first, exp) ~= MISSING
    local ct = -1
    if has then
        local md = first.metadata
        ct = md.ct
        ctx.has, ctx.cur, ctx.cur_ct, ctx.cur_ttl = true, first.payload, ct, md.ttl
        if early then
            ctx.early = ct
        end
    end
    local value, how, waited = run(mutex_for(region, key, co), ctx, slow_gen, slow_read,
                                   slow_is_expired,
                                   region.async_creation_runner and slow_async or nil,
                                   has, has and first.payload or nil, ct)
    if early then
        if (how == "created" and not ctx.kept) or how == "async" then
            st.early_refreshes = st.early_refreshes + 1
        end
        return value
    end
    -- Counted by the first read: this lookup found no fresh value.
    st.misses = st.misses + 1
    if waited then
        st.lock_waits = st.lock_waits + 1
    end
    if how == "stale" or how == "async" then
        st.stale_served = st.stale_served + 1
    end
    return value
end

-- -- get_or_create_multi -------------------------------------------------------------

local function release_all(held)
    for i = 1, #held do
        local m = held[i].mutex
        if m then
            held[i].mutex = nil
            release_logged(m)
        end
    end
end

-- How many values a creator's array holds: `n` when it says, else up to its
-- last non-nil element (so a nil in the middle is a value, not an end).
local function count_values(t)
    local n = t.n
    if type(n) == "number" then
        return n
    end
    return maxn(t)
end

-- Under the locks in `held` (each {i =, mutex =}): read again, create what is
-- still needed with one creator call, store it. Fills `results`.
local function create_held(region, held, uniq, mangled, results, creator, exp, should_cache_fn)
    local st = region._stats
    -- Read again what we hold: another caller may have created it.
    local hk = {}
    for j = 1, #held do
        hk[j] = mangled[held[j].i]
    end
    local again = fetch_multi(region, hk)
    local create = {}
    for j = 1, #held do
        local e, cv = held[j], again[j]
        local state = judge_value(region, cv, exp)
        if state == FRESH then
            results[e.i] = cv.payload
            local m = e.mutex
            e.mutex = nil
            release_logged(m)
        else
            -- The value stale_if_error may serve.
            e.cv = state == STALE and cv or nil
            create[#create + 1] = e
        end
    end
    local n = #create
    if n == 0 then
        return
    end
    sort(create, function(a, b) return a.i < b.i end)
    local args = {}
    for j = 1, n do
        args[j] = uniq[create[j].i]
    end
    st.creations = st.creations + 1
    local beta = region._beta
    local t0 = C.dp_clock_monotonic()
    local ok, new, second = pcall(creator, unpack(args, 1, n))
    local took = C.dp_clock_monotonic() - t0
    observe(region, "create", took)
    local ttl
    if ok then
        -- `array, expiration_time` gives every value of the array its own;
        -- `nil, err` fails (nothing is stored).
        new, ttl = outcome(region, new, second, "get_or_create_multi")
        if new == nil then
            ttl = nil
        end
    end
    if not ok or rawequal(new, FAILED) then
        st.errors = st.errors + 1
        local err = ok and ttl or new
        -- Under stale_if_error, the keys being created all fall back to
        -- their stale values, or the error is raised.
        for j = 1, n do
            local cv = create[j].cv
            if cv == nil or not within_window(region, cv.metadata.ct, cv.metadata.ttl, exp) then
                error(err, 0)
            end
        end
        for j = 1, n do
            results[create[j].i] = create[j].cv.payload
        end
        st.stale_on_error = st.stale_on_error + n
        context.log_quietly("dogpile.cache: region " .. region:_label() .. ": get_or_create_multi: "
                            .. n .. " stale values are served (stale_if_error): " .. tostring(err))
        return
    end
    if type(new) ~= "table" then
        st.errors = st.errors + 1
        raise(region:_message("dogpile.cache: get_or_create_multi: the creator must return an "
              .. "array of " .. n .. " values, got " .. type(new)))
    end
    -- A value missing from the array would be cached as nil: refuse the
    -- array instead, and store none of it.
    local got = count_values(new)
    if got ~= n then
        st.errors = st.errors + 1
        raise(region:_message("dogpile.cache: get_or_create_multi: the creator was called with "
              .. n .. " keys and must return one value for each, in order (expected " .. n
              .. ", got " .. tostring(got) .. "; an array with nil values gives its length "
              .. "in a field n); nothing was stored"))
    end
    local delta = beta and took or nil
    local md = new_metadata(ttl, delta)
    local neg = ttl == nil and region.negative_expiration_time
    local md_nil = neg and new_metadata(neg, delta) or md
    local to_store, any = {}, false
    for j = 1, n do
        local v = new[j]
        results[create[j].i] = v
        if not should_cache_fn or should_cache_fn(v) then
            to_store[mangled[create[j].i]] = { payload = v, metadata = v == nil and md_nil or md }
            any = true
        end
    end
    if any then
        store_multi(region, to_store)
    end
end

-- Take the locks of the keys in `pending` (sorted by mangled key, so that
-- callers with overlapping key sets cannot deadlock): a stale value whose lock
-- is taken is served as it is; a missing one waits. Then create under them.
local function lock_and_create(region, pending, held, uniq, mangled, results, creator, exp,
                               should_cache_fn)
    local st = region._stats
    local co = running()
    for _, e in ipairs(pending) do
        local m = mutex_for(region, mangled[e.i], co)
        if e.state == STALE then
            if m:acquire(false) then
                e.mutex = m
                held[#held + 1] = e
            else
                st.stale_served = st.stale_served + 1
                results[e.i] = e.stale.payload
            end
        else
            if not m:acquire(false) then
                st.lock_waits = st.lock_waits + 1
                m:acquire(true)
            end
            e.mutex = m
            held[#held + 1] = e
        end
    end
    if #held > 0 then
        create_held(region, held, uniq, mangled, results, creator, exp, should_cache_fn)
    end
end

--- get_or_create_multi over checked arguments; `exp` nil: no expiry.
function _M.get_or_create_multi(region, keys, creator, exp, should_cache_fn)
    local n = #keys
    local uniq, index = {}, {}
    for i = 1, n do
        local k = keys[i]
        if not index[k] then
            uniq[#uniq + 1] = k
            index[k] = #uniq
        end
    end
    local mangled = {}
    for i = 1, #uniq do
        mangled[i] = region:_mangle(uniq[i])
    end
    local st = region._stats
    local got = fetch_multi(region, mangled)
    local results, pending = {}, {}
    for i = 1, #uniq do
        local cv = got[i]
        local state = judge_value(region, cv, exp)
        if state == FRESH then
            st.hits = st.hits + 1
            results[i] = cv.payload
        else
            st.misses = st.misses + 1
            pending[#pending + 1] = { i = i, state = state, stale = cv }
        end
    end
    if #pending > 0 then
        sort(pending, function(a, b) return mangled[a.i] < mangled[b.i] end)
        local held = {}
        local ok, err = pcall(lock_and_create, region, pending, held, uniq, mangled, results,
                              creator, exp, should_cache_fn)
        release_all(held)
        if not ok then
            error(err, 0)
        end
    end
    local out = {}
    for i = 1, n do
        out[i] = results[index[keys[i]]]
    end
    return out
end

return _M
