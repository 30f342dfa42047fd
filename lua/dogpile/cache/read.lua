--- The read path of a region: the one judgement of freshness, and the read
-- strategies a region chooses once, at configure:
--
--   memory   the unbounded memory backend's own table, read directly;
--   direct   an infallible backend of Lua values: its get, without pcall;
--   c        a C backend with the default codec, read in place in its buffer;
--   front    a backend with a `front` (a memory tier: `{store = T, sync =
--            fn}`): sync, read T, and on anything but a fresh value there,
--            the backend's full read;
--   generic  `backend:get`, under pcall unless the backend is infallible.
--
-- Every strategy answers a lookup the same way: `true, payload` for a fresh
-- value, else `false, value` where value is a CachedValue (stale, or not
-- usable at all) or NO_VALUE, for the miss path to judge again. `get` and
-- `get_or_create` share that one hit path. A value's own expiration time
-- (metadata.ttl; the envelope's in C buffers) overrides the call's.
--
-- A region with early_refresh (XFetch, Vattani et al., VLDB 2015) gives
-- get_or_create a second lookup of each strategy: on a fresh value whose
-- remaining life r satisfies r <= -delta * beta * ln(rand()) (delta: how long
-- its creator took, stored with it), it answers `true, payload, cv`, and
-- get_or_create refreshes cv under the lock (judge_early). Regions without
-- it never run that code.
local ffi = require "ffi"
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local proxy = require "dogpile.cache.proxy"
local envelope = require "dogpile.cache.envelope"
local values = require "dogpile.cache.values"
local CBackend = require("dogpile.cache.backends.c").CBackend
local partial_of = require("dogpile.cache.backends.c").partial_of
local VLEN_FAILED = require("dogpile.cache.backends.c").VLEN_FAILED
local Memory = require("dogpile.cache.backends.memory").Memory
local STAMP = require("dogpile.cache.backends.memory").STAMP
-- The creator's duration copied onto a stamped value, where the memory
-- backend copies it (nil otherwise: the metadata's is read).
local DELTA_STAMP = require("dogpile.cache.backends.memory").DELTA_STAMP or "_dt"
local latency = require "dogpile.cache.latency"

local C = lib.C
local raise = lib.raise
local is_callable = require("dogpile").is_callable
local clock_upper = lib.clock_upper
local NO_VALUE = api.NO_VALUE
local VALUE_VERSION = api.VALUE_VERSION
local read_value, header = envelope.read, envelope.header
local u8p = envelope.u8p
local decode = values.decode
local ffi_string, ffi_cast = ffi.string, ffi.cast
local DP_OK, DP_ENOTFOUND = lib.DP_OK, lib.DP_ENOTFOUND
local rawequal, rawget, pcall, getmetatable, tonumber, type, ipairs, load, assert =
      rawequal, rawget, pcall, getmetatable, tonumber, type, ipairs, load, assert
local log, random = math.log, math.random

lib.own_source()

-- The cheapest upper bound of the wall clock, for a hit far from its expiry:
-- time() is one load from the vDSO page (no seqlock, no timespec), and it
-- returns the seconds of the same tick CLOCK_REALTIME_COARSE reads, so one
-- second more, plus the coarse clock's margin, bounds the true time as
-- clock_upper does. A value within that of its expiry asks clock_upper,
-- then the precise clock. Linux only (elsewhere clock_upper alone), and only
-- over the real clock: a stand-in for lib.C (the specs' virtual clock, a
-- table) is read through clock_upper and C alone.
local clock_seconds = clock_upper
if ffi.os == "Linux" and type(C) == "userdata" and (pcall(ffi.typeof, "dp_read_time_fn")
    or pcall(ffi.cdef, [[
        typedef int64_t (*dp_read_time_fn)(void *);
        int64_t dp_read_time(void *t) __asm__("time");
    ]])) then
    local time = ffi.C.dp_read_time
    local slack = 1 + C.dp_clock_margin()
    if tonumber(time(nil)) > 0 then
        clock_seconds = function()
            return tonumber(time(nil)) + slack
        end
    end
end

local _M = {}

-- -- The judgement ----------------------------------------------------------------

local FRESH, STALE, MISSING = "fresh", "stale", "missing"
_M.FRESH, _M.STALE, _M.MISSING = FRESH, STALE, MISSING

--- What a value created at `ct` is to `region`: FRESH (usable as it is),
-- STALE (expired, or soft-invalidated: may be served while another caller
-- regenerates) or MISSING (hard-invalidated). `exp` nil: no expiry. `now`
-- (optional) is one clock reading for many values; without it, the cheap
-- upper bound of the clock first, and the precise clock only near the
-- expiry. Small enough for the JIT to inline into every hit.
local function judge(region, ct, exp, now)
    local invalidated = region._inv_judge(region.region_invalidator, ct)
    if invalidated then
        return invalidated
    end
    if exp ~= nil then
        if now ~= nil then
            if now - ct > exp then
                return STALE
            end
        elseif clock_seconds() - ct > exp and clock_upper() - ct > exp
            and C.dp_clock_now() - ct > exp then
            return STALE
        end
    end
    return FRESH
end
_M.judge = judge

--- The expiration time that applies to a value whose own is `ttl` (nil:
-- none; negative: never expires), for a call whose own is `exp`.
local function own_exp(ttl, exp)
    if ttl == nil then
        return exp
    elseif ttl < 0 then
        return nil
    end
    return ttl
end
_M.own_exp = own_exp

--- The judgement of a CachedValue or NO_VALUE: a miss, or a value of another
-- format version, is MISSING.
local function judge_value(region, cv, exp, now)
    if rawequal(cv, NO_VALUE) then
        return MISSING
    end
    local md = cv.metadata
    if md.v ~= VALUE_VERSION then
        return MISSING
    end
    return judge(region, md.ct, own_exp(md.ttl, exp), now)
end
_M.judge_value = judge_value

--- The judgement with XFetch's draw, for early_refresh: the state of a
-- value created at `ct` that expires after `exp` (nil: never) and whose
-- creator took `delta` seconds, and true when this read should refresh it
-- (a fresh value whose remaining life r <= -delta * beta * ln(rand())). One
-- reading of the clock's upper bound serves both: r is then a little short,
-- so a refresh comes a little early, never late; the precise clock is read
-- only near the expiry, as judge does. Past 37 times delta * beta,
-- -ln(rand()) (at most 36.7 for a double in [2^-53, 1)) cannot reach r: no
-- draw, so a hit far from its expiry costs a subtraction and a comparison.
local function judge_early(region, ct, exp, delta)
    local invalidated = region._inv_judge(region.region_invalidator, ct)
    if invalidated then
        return invalidated, false
    end
    if exp == nil then
        return FRESH, false
    end
    local r = ct + exp - clock_upper()
    if r < 0 and C.dp_clock_now() - ct > exp then
        return STALE, false
    end
    if delta == nil or delta <= 0 then
        return FRESH, false
    end
    local w = delta * region._beta
    if r > 37 * w then
        return FRESH, false
    end
    return FRESH, r <= -w * log(random())
end
_M.judge_early = judge_early

-- -- Reading ------------------------------------------------------------------------

-- Bytes -> CachedValue; bytes that do not decode count as an error, are
-- logged, and are a miss.
local function decode_counted(region, bytes)
    local cv, err = decode(region._codec, bytes)
    if err then
        region:_undecodable(err)
    end
    return cv
end

--- One read from the backend, normalized to a CachedValue or NO_VALUE; no
-- judgement. A backend failure goes through the region's failure policy.
local function fetch(region, key)
    local backend = region.backend
    local v
    if region._direct then
        -- A built-in in-process backend that cannot fail: no pcall, so a hit
        -- compiles into one trace (a trace that starts in a function called
        -- through pcall aborts when it returns into the pcall frame).
        v = backend:get(key)
    else
        local ok
        ok, v = pcall(backend.get, backend, key)
        if not ok then
            region:_failed("get", key, v)
            return NO_VALUE
        end
    end
    if region._codec then
        return decode_counted(region, v)
    end
    if v == nil then
        return NO_VALUE
    end
    return v
end
_M.fetch = fetch

-- A multi-get that failed for the keys at `bad` only (a cluster node down)
-- and read the others: raised without fail_open (the backend's `msg` names
-- the node and counts the keys); under fail_open those keys are misses,
-- each counted as an error, and the others are served.
local function partial_failed(region, keys, bad, msg)
    region:_failed("get_multi", keys[bad[1]], msg)
    local st = region._stats
    st.errors = st.errors + #bad - 1
end

--- The values of `keys` from the backend (its get_multi, or a loop), each a
-- CachedValue or NO_VALUE; no judgement.
local function fetch_multi(region, keys)
    local ok, vs = pcall(proxy.get_multi, region.backend, keys)
    if not ok then
        local values, bad, msg = partial_of(vs)
        if values and #bad > 0 then
            partial_failed(region, keys, bad, msg)
        else
            region:_failed("get_multi", keys[1], values and msg or vs)
        end
        vs = values or {}
    end
    local codec = region._codec
    local out = {}
    for i = 1, #keys do
        local v = vs[i]
        if codec then
            v = decode_counted(region, v)
        elseif v == nil then
            v = NO_VALUE
        end
        out[i] = v
    end
    return out
end
_M.fetch_multi = fetch_multi

-- -- Single-key strategies ------------------------------------------------------------

local function judged(region, cv, exp)
    if not rawequal(cv, NO_VALUE) then
        local md = cv.metadata
        if md.v == VALUE_VERSION then
            -- rawget: a field that is absent (nil) is then one load, with no
            -- look for an __index in the metadata's metatable.
            local ttl = rawget(md, "ttl")
            if ttl ~= nil then
                exp = ttl >= 0 and ttl or nil
            end
            if judge(region, md.ct, exp) == FRESH then
                return true, cv.payload
            end
        end
    end
    return false, cv
end

-- The same, with early_refresh's draw on a fresh value.
local function judged_early(region, cv, exp)
    if not rawequal(cv, NO_VALUE) then
        local md = cv.metadata
        if md.v == VALUE_VERSION then
            local state, elected = judge_early(region, md.ct, own_exp(rawget(md, "ttl"), exp),
                                               rawget(md, "delta"))
            if state == FRESH then
                if elected then
                    return true, cv.payload, cv
                end
                return true, cv.payload
            end
        end
    end
    return false, cv
end

local function generic_lookup(region, key, exp)
    return judged(region, fetch(region, key), exp)
end

local function generic_early(region, key, exp)
    return judged_early(region, fetch(region, key), exp)
end

-- An infallible backend of Lua values (the LRU memory backend, null): its
-- get, called without pcall, returns a CachedValue or NO_VALUE.
local function direct_get(region, key)
    local backend = region.backend
    local cv = backend:get(key)
    if cv == nil then
        cv = NO_VALUE
    end
    return cv
end

local function direct_lookup(region, key, exp)
    return judged(region, direct_get(region, key), exp)
end

local function direct_early(region, key, exp)
    return judged_early(region, direct_get(region, key), exp)
end

-- The memory backend's table, read directly. A value the backend stamped
-- (its created time on the value itself, STAMP: it has no expiration time of
-- its own and is of this format version) that is fresh by the cheap clock is
-- a hit without reading its metadata table; anything else, including a
-- value near or past its expiry, is judged in full, as every other strategy
-- judges.
local function memory_lookup(region, key, exp)
    -- The clock first: fewer values are live across the call, so fewer are
    -- saved and restored around it in the compiled hit.
    local now = exp ~= nil and clock_seconds() or nil
    local cv = region._mem[key]
    if cv == nil then
        return false, NO_VALUE
    end
    local ct = rawget(cv, STAMP)
    if ct ~= nil and not region._inv_judge(region.region_invalidator, ct)
        and (exp == nil or now - ct <= exp) then
        return true, rawget(cv, "payload")
    end
    return judged(region, cv, exp)
end

-- With early_refresh: a stamped value whose remaining life by the cheap
-- clock is past the reach of any draw (37 times delta * beta, as
-- judge_early says) is a hit without the draw; its metadata table is read
-- for delta only. The cheap clock reads late, never early, so the remaining
-- life it gives is short: such a value is fresh, and the draw could not
-- have elected it. Anything else is judged in full, with the draw.
local function memory_early(region, key, exp)
    local now = exp ~= nil and clock_seconds() or nil
    local cv = region._mem[key]
    if cv == nil then
        return false, NO_VALUE
    end
    local ct = rawget(cv, STAMP)
    if ct ~= nil and not region._inv_judge(region.region_invalidator, ct) then
        if exp == nil then
            return true, rawget(cv, "payload")
        end
        -- delta: the backend's copy (DELTA_STAMP, 0 for none) where it
        -- stamps one, else the metadata's.
        local delta = rawget(cv, DELTA_STAMP)
        if delta == nil then
            delta = rawget(cv.metadata, "delta") or 0
        end
        if ct + exp - now > delta * region._reach then
            return true, rawget(cv, "payload")
        end
    end
    return judged_early(region, cv, exp)
end

-- In place: one FFI call fills the backend's buffer, the envelope is read
-- there, and a fresh value is decoded from it; no envelope string, no
-- CachedValue. A fresh value the Lua reader declines is the C decoder's;
-- anything else takes the slow path as a decoded CachedValue. `early`: with
-- early_refresh's draw (constant in each of the two functions below, so
-- each compiles without the other's branch).
-- The envelope at `p` (`n` bytes, in a backend's buffer) read in place: no
-- envelope string, no CachedValue for a fresh value.
local function in_place(region, p, n, exp, early)
    local ct, off, ttl, delta = header(p, n)
    if ct then
        if ttl ~= nil then
            exp = ttl >= 0 and ttl or nil
        end
        local state, elected
        if early then
            state, elected = judge_early(region, ct, exp, delta)
        else
            state = judge(region, ct, exp)
        end
        if state == FRESH then
            local ok, value = read_value(p + off, n - off)
            if not ok then
                local cv = decode_counted(region, ffi_string(p, n))
                if rawequal(cv, NO_VALUE) then
                    return false, cv
                end
                value = cv.payload
            end
            if elected then
                return true, value, { payload = value, metadata = { ct = ct, v = VALUE_VERSION,
                                                                    ttl = ttl, delta = delta } }
            end
            return true, value
        end
    end
    return false, decode_counted(region, ffi_string(p, n))
end

local function c_read(region, key, exp, early)
    local cb = region._cb
    local bytes = cb.bytes
    local rc = C.dp_backend_get(cb.handle, key, #key, bytes, cb.err)
    if rc ~= DP_OK then
        if rc ~= DP_ENOTFOUND then
            region:_failed("get", key, ffi_string(cb.err.msg))
        end
        return false, NO_VALUE
    end
    return in_place(region, ffi_cast(u8p, bytes.data), tonumber(bytes.len), exp, early)
end

local function c_lookup(region, key, exp)
    return c_read(region, key, exp, false)
end

local function c_early(region, key, exp)
    return c_read(region, key, exp, true)
end

-- An infallible serialized Lua backend that reads into a buffer of its own
-- (ngx_shared: `get_in_place(key)` -> pointer and length, nil on a miss,
-- false for a value that is not bytes): the envelope read there, as c_read
-- does. A value that is not bytes is the generic read's, which counts it.
local function place_read(region, key, exp, early)
    local backend = region.backend
    local p, n = backend:get_in_place(key)
    if p == nil then
        return false, NO_VALUE
    elseif p == false then
        if early then
            return generic_early(region, key, exp)
        end
        return generic_lookup(region, key, exp)
    end
    return in_place(region, p, n, exp, early)
end

local function place_lookup(region, key, exp)
    return place_read(region, key, exp, false)
end

local function place_early(region, key, exp)
    return place_read(region, key, exp, true)
end

-- The front tier first (front.md): sync (cheap when nothing is pending), then
-- its table; anything but a fresh value there is the backend's full read.
local function front_read(region, key, exp, early)
    local sync = region._front_sync
    if sync then
        sync()
    end
    local cv = region._front[key]
    if cv ~= nil then
        -- A value a memory tier stamped (as memory_lookup reads it), fresh
        -- by the cheap clock: a hit without its metadata table.
        local ct = not early and rawget(cv, STAMP)
        if ct and not region._inv_judge(region.region_invalidator, ct)
            and (exp == nil or clock_seconds() - ct <= exp) then
            return true, rawget(cv, "payload")
        end
        local md = cv.metadata
        if md.v == VALUE_VERSION then
            local e = own_exp(rawget(md, "ttl"), exp)
            local state, elected
            if early then
                state, elected = judge_early(region, md.ct, e, rawget(md, "delta"))
            else
                state = judge(region, md.ct, e)
            end
            if state == FRESH then
                if elected then
                    return true, cv.payload, cv
                end
                return true, cv.payload
            end
        end
    end
    -- A hit from here on is not the front's: counted apart, so that the
    -- front's hits are the region's hits less these (Region:stats), and a
    -- front hit bumps one counter, not two.
    local hit, v, cv
    if early then
        hit, v, cv = judged_early(region, fetch(region, key), exp)
    else
        hit, v = judged(region, fetch(region, key), exp)
    end
    if hit then
        region._deep_hits = region._deep_hits + 1
    end
    return hit, v, cv
end

local function front_lookup(region, key, exp)
    return front_read(region, key, exp, false)
end

local function front_early(region, key, exp)
    return front_read(region, key, exp, true)
end

-- -- Multi-key strategies --------------------------------------------------------------
-- `multi(region, keys, exp)` -> an array of payloads (NO_VALUE where there is
-- no fresh value) and the number of hits.

local function generic_multi(region, keys, exp)
    local got = fetch_multi(region, keys)
    local now = C.dp_clock_now()
    local out, hits = {}, 0
    for i = 1, #keys do
        local cv = got[i]
        if judge_value(region, cv, exp, now) == FRESH then
            hits = hits + 1
            out[i] = cv.payload
        else
            out[i] = NO_VALUE
        end
    end
    return out, hits
end

-- One call of the backend's get_multi, every value read in place (as
-- c_lookup does), the clock read once. Values the Lua reader declines take
-- the slow path.
local function c_multi(region, keys, exp)
    local n = #keys
    local out = {}
    local cb = region._cb
    local ok, data, lens, partial = pcall(cb.get_multi_in_place, cb, keys, true)
    if not ok then
        region:_failed("get_multi", keys[1], data)
        for i = 1, n do
            out[i] = NO_VALUE
        end
        return out, 0
    end
    local p = ffi_cast(u8p, data)
    local now = C.dp_clock_now()
    local pos, hits = 0, 0
    for i = 1, n do
        local len = tonumber(lens[i - 1])
        local v = NO_VALUE
        if len >= 0 then
            local q = p + pos
            pos = pos + len
            local ct, off, ttl = header(q, len)
            if ct then
                if judge(region, ct, own_exp(ttl, exp), now) == FRESH then
                    local decoded
                    decoded, v = read_value(q + off, len - off)
                    if not decoded then
                        v = decode_counted(region, ffi_string(q, len))
                        v = rawequal(v, NO_VALUE) and v or v.payload
                    end
                end
            else
                decode_counted(region, ffi_string(q, len)) -- counts and logs the bad bytes
            end
        end
        if not rawequal(v, NO_VALUE) then
            hits = hits + 1
        end
        out[i] = v
    end
    if partial then
        -- Some keys' node failed (VLEN_FAILED), the others were read: after
        -- the loop, so a log line under fail_open cannot touch the buffer.
        local bad = {}
        for i = 1, n do
            if tonumber(lens[i - 1]) == VLEN_FAILED then
                bad[#bad + 1] = i
            end
        end
        if #bad > 0 then
            partial_failed(region, keys, bad, partial)
        else
            region:_failed("get_multi", keys[1], partial)
        end
    end
    return out, hits
end

-- The front table for each key, the backend's get_multi for the rest.
local function front_multi(region, keys, exp)
    local sync = region._front_sync
    if sync then
        sync()
    end
    local front, st = region._front, region._stats
    local now = C.dp_clock_now()
    local out, hits, rest, where = {}, 0, {}, {}
    for i = 1, #keys do
        local cv = front[keys[i]]
        if cv ~= nil and judge_value(region, cv, exp, now) == FRESH then
            hits = hits + 1
            out[i] = cv.payload
        else
            rest[#rest + 1] = keys[i]
            where[#rest] = i
        end
    end
    st.front_hits = st.front_hits + hits
    if #rest > 0 then
        local got, more = generic_multi(region, rest, exp)
        for j = 1, #rest do
            out[where[j]] = got[j]
        end
        hits = hits + more
    end
    return out, hits
end

-- -- The choice, at configure ---------------------------------------------------------

-- -- Sampling -----------------------------------------------------------------------
-- Every strategy's single-key lookup (and its early_refresh form) has a
-- sampled twin: latency.tick counts the lookup down, and the one that reaches
-- zero is timed into the region's get histogram (latency.timed). The
-- multi-key lookups are not sampled. Each twin is its own function, made from
-- its own chunk: the trace compiler treats the upvalues of a function
-- instantiated once as constants (the twin's lookup then costs nothing to
-- find), and would read them through the closure on every hit if the twins
-- shared one prototype.
local SAMPLED = [[
local own_source, tick, timed, lookup = ...
own_source()
return function(region, key, exp)
    if tick() then
        return timed(lookup, region, key, exp)
    end
    return lookup(region, key, exp)
end
]]
local SAMPLED_OF = {}
local function sampled(lookup)
    local f = SAMPLED_OF[lookup]
    if f == nil and lookup ~= nil then
        f = assert(load(SAMPLED, "=dogpile/cache/read.lua (sampled lookup)"))(
            lib.own_source, latency.tick, latency.timed, lookup)
        SAMPLED_OF[lookup] = f
    end
    return f
end

for _, f in ipairs({ generic_lookup, generic_early, direct_lookup, direct_early, memory_lookup,
                     memory_early, c_lookup, c_early, place_lookup, place_early, front_lookup,
                     front_early }) do
    sampled(f)
end

-- The strategy `s` with its lookups sampled when `on` is true, or when it
-- is nil and sampling is on (latency.set_sampling).
local function with_sampling(s, on)
    if on == nil then
        on = latency.sampling()
    end
    if on then
        s.lookup, s.early = sampled(s.lookup), sampled(s.early)
    end
    return s
end

--- The read strategy for a region whose outermost backend is `backend` (after
-- wrapping) and whose backend object is `actual`, with codec `codec` (nil:
-- Lua values). Returns `{name =, lookup =, early =, multi =, direct =, mem =,
-- cb =, front =, sync =}` (`early`: the lookup with early_refresh's draw) for the region to keep: a proxy in between, a
-- serializer of the user's, or wire_format's codec (no raw_decode: the C
-- in-place reader knows only this library's envelope) leaves the generic
-- strategy. `histograms` (optional): false leaves the lookups unsampled
-- (no get latency histogram), true samples them; nil: as latency.sampling().
function _M.choose(backend, actual, codec, histograms)
    local unwrapped = backend == actual
    local s = { name = "generic", lookup = generic_lookup, early = generic_early,
                multi = generic_multi, direct = unwrapped and actual.infallible == true }
    if not unwrapped then
        return with_sampling(s, histograms)
    end
    local front = actual.front
    if front ~= nil then
        if type(front) ~= "table" or type(front.store) ~= "table"
            or (front.sync ~= nil and not is_callable(front.sync)) then
            raise("dogpile.cache: configure: the backend's front must be {store = table, "
                  .. "sync = function or nil}, got " .. type(front))
        end
        s.name, s.lookup, s.early, s.multi = "front", front_lookup, front_early, front_multi
        s.front, s.sync = front.store, front.sync
    elseif getmetatable(actual) == Memory then
        s.name, s.lookup, s.early = "memory", memory_lookup, memory_early
        s.mem = actual._cache
    elseif codec and codec.raw_decode and actual.handle ~= nil
        and getmetatable(actual) == CBackend then
        s.name, s.lookup, s.early, s.multi = "c", c_lookup, c_early, c_multi
        s.cb = actual
    elseif codec and codec.raw_decode and s.direct and is_callable(actual.get_in_place) then
        s.name, s.lookup, s.early = "in_place", place_lookup, place_early
    elseif s.direct and not codec then
        s.name, s.lookup, s.early = "direct", direct_lookup, direct_early
    end
    return with_sampling(s, histograms)
end

return _M
