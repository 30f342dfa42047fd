--- dogpile.cache.tiered: several backends in front of one another, kept
-- coherent across Lua states, processes and hosts.
--
--     arguments = {
--       tiers = { {backend = NAME, arguments = {...}, max_age = SECONDS}, ... },
--       prefix = "dogpile:tiered:",  -- names the change channel and the invalidation key
--       name = nil,                  -- the invalidation's name (default: the region's)
--     }
--
-- Two to four tiers, the first nearest the caller, the last the most shared
-- (the "bottom"). The region hands this backend CachedValue tables; tiers
-- that store bytes get the envelope of the value codec, so the bottom's
-- bytes are the ones any other region on that backend reads and writes.
--
-- Reads go down the tiers; a value found in tier N is copied into the tiers
-- above it with its original created time. Writes and deletes go to the
-- bottom first; the shared tiers above it drop the key (readers fill them
-- again), the tiers of this Lua state take the new value.
--
-- Coherence. Every change is pushed into a change feed (core/feed.c): one per
-- bottom store and process, drained by each Lua state's reader before a hit
-- (one FFI load when nothing changed). A write in this process pushes
-- directly; a write in another process reaches it through the bottom's
-- notification: Redis PUBLISHes the changed keys on `prefix.."changes"` and
-- a listener thread of the redis backend pushes them into the feed; an lmdb
-- bottom has a host feed, a file beside the environment that every process
-- maps (the same ring and stamp, shared), into which writers push. A reader
-- that missed changes (its cursor fell off the ring, or the channel was lost
-- and came back) drops every copy above the bottom. A bottom with no
-- notification (memcached, a Lua backend) needs a max_age on every
-- tier above it: then a copy is served at most that long.
--
-- The region's read of tier 1: when tier 1 is a dogpile.cache.memory, the
-- backend exposes `front = {store = T, sync = fn}` (the region reads T after
-- fn()); otherwise it goes through get().
local ffi = require "ffi"
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local envelope = require "dogpile.cache.envelope"
local memory = require "dogpile.cache.backends.memory"

local C = lib.C
local NO_VALUE = api.NO_VALUE
local CachedValue = api.CachedValue
local VALUE_VERSION = api.VALUE_VERSION
local clock_upper = lib.clock_upper
local raise = lib.raise
local ffi_string, ffi_cast, ffi_new, ffi_gc = ffi.string, ffi.cast, ffi.new, ffi.gc
local type, pairs, ipairs, tostring, setmetatable, getmetatable, pcall, error, next, select =
      type, pairs, ipairs, tostring, setmetatable, getmetatable, pcall, error, next, select
local sort, concat = table.sort, table.concat
local math_min, math_max = math.min, math.max

lib.own_source()

local NAME = "dogpile.cache.tiered"
local ngx = ngx

-- The change feed (core/dogpile_feed.h) is declared in dogpile.lib.

-- How widely a tier is shared: a change seen at scope S makes the copies in
-- tiers of scope <= S suspect.
local STATE, PROCESS, HOST, FLEET = 1, 2, 3, 4
local SCOPES = {
    ["dogpile.cache.memory"] = STATE,
    ["dogpile.cache.shared_memory"] = PROCESS,
    ["dogpile.cache.ngx_shared"] = HOST,
    ["dogpile.cache.lmdb"] = HOST,
}
-- Bottoms whose writes reach every process that shares them.
local NOTIFYING = {
    ["dogpile.cache.redis"] = true,
    ["dogpile.cache.redis_sentinel"] = true,
    ["dogpile.cache.shared_memory"] = true, -- one process: the feed is enough
    ["dogpile.cache.memory"] = true,        -- one Lua state
    ["dogpile.cache.ngx_shared"] = true,    -- the dict's own feed (ngx_shared.lua)
    ["dogpile.cache.lmdb"] = true,          -- its host feed (backend.host_feed)
}

local DRAIN_BATCH = 256

-- -- Bytes of the tiers that store them ------------------------------------------
-- The bottom holds the plain envelope. A shared tier above it holds the
-- time the copy was taken (8 bytes) before the envelope: max_age and the
-- reset floor (see Reader) judge copies by it, never by the created time.

local pack_envelope, unpack_envelope, read_value = envelope.pack, envelope.unpack, envelope.read
local stored_double = envelope.stored_double
local u8p = envelope.u8p or ffi.typeof("const uint8_t *")
local dbl = ffi_new("double[1]")

local codec -- loaded on first use: a region of memory tiers only never needs it

local function encode(cv)
    codec = codec or require "dogpile.codec"
    local ok, payload = pcall(codec.encode, cv.payload)
    if not ok then
        error(payload, 0)
    end
    local md = cv.metadata
    -- The value's own expiration time and its creator's duration travel
    -- with it (format 2), as a plain region writes them.
    return pack_envelope(md.ct, payload, md.ttl, md.delta)
end

-- CachedValue, or nil with why.
local function decode(bytes)
    local ct, off, ttl, delta = unpack_envelope(bytes)
    if not ct then
        return nil, off
    end
    local ok, value = read_value(ffi_cast(u8p, bytes) + off, #bytes - off)
    if not ok then
        codec = codec or require "dogpile.codec"
        local v, derr = codec.decode(bytes:sub(off + 1))
        if v == nil and derr ~= nil then
            return nil, derr
        end
        value = v
    end
    return CachedValue.new(value, { ct = ct, v = VALUE_VERSION, ttl = ttl, delta = delta })
end

local function stamp_bytes(t)
    dbl[0] = t
    return ffi_string(dbl, 8)
end

-- -- Errors ---------------------------------------------------------------------

-- A tier failed: the message names the tier, its backend, the operation and
-- the key (the region adds its own prefix and applies fail_open).
local function tier_error(tier, op, key, err)
    if type(err) ~= "string" then
        return err
    end
    return "tier " .. tier.index .. " (" .. tier.name .. "): " .. op
        .. (key ~= nil and (" '" .. tostring(key) .. "'") or "") .. ": " .. err
end

-- -- Tiers ----------------------------------------------------------------------

local Tier = {}
Tier.__index = Tier

--- The CachedValue of `key` in this tier, or nil. `floor`: copies taken
-- before it are ignored (a shared upper tier after a reset).
-- @local
function Tier:get(key, floor, now)
    local v = self.backend:get(key)
    if v == NO_VALUE or v == nil then
        return nil
    end
    if not self.serialized then
        local max_age = self.max_age
        if max_age then
            local at = v.at
            if at == nil or now - at > max_age then
                return nil
            end
        end
        return v
    end
    if type(v) ~= "string" then
        return nil
    end
    if not self.bottom then
        if #v < 8 then
            return nil
        end
        local at = stored_double(ffi_cast(u8p, v))
        if not (at >= floor) or (self.max_age and now - at > self.max_age) then
            return nil
        end
        v = v:sub(9)
    end
    local cv = decode(v)
    return cv
end

function Tier:put(key, cv, at)
    if not self.serialized then
        if self.max_age then
            -- The copy time rides with the copy: a CachedValue of our own
            -- (same payload and metadata), dropped with it on eviction.
            cv = { payload = cv.payload, metadata = cv.metadata, at = at }
        end
        self.backend:set(key, cv)
        return
    end
    local bytes = encode(cv)
    if not self.bottom then
        bytes = stamp_bytes(at) .. bytes
    end
    self.backend:set(key, bytes)
end

function Tier:delete(key)
    self.backend:delete(key)
end

--- Drop every copy this Lua state can reach: a memory tier is emptied; a
-- shared tier is fenced by the floor instead (see Reader).
-- @local
function Tier:clear()
    local b = self.backend
    local cache = b._cache
    if cache then
        local keys = {}
        for k in pairs(cache) do
            keys[#keys + 1] = k
        end
        for i = 1, #keys do
            b:delete(keys[i])
        end
    end
end

local function canonical(arguments)
    local keys = {}
    for k in pairs(arguments or {}) do
        keys[#keys + 1] = tostring(k)
    end
    sort(keys)
    local out = {}
    for i, k in ipairs(keys) do
        out[i] = k .. "=" .. tostring(arguments[k])
    end
    return concat(out, "\n")
end

-- -- The reader of a change feed ----------------------------------------------------
-- One per tiered backend (one region in one Lua state): a cursor in the
-- process-wide feed of the bottom store, tagged with an origin so that it
-- skips what this backend pushed itself.

local Feed = {}
Feed.__index = Feed

local function open_feed(name)
    local out = ffi_new("dp_feed*[1]")
    local rc = C.dp_feed_open(name, #name, 0, out)
    if rc ~= lib.DP_OK then
        raise(NAME .. ": cannot open the change feed '" .. name .. "': " .. lib.strerror(rc))
    end
    local f = ffi_gc(out[0], C.dp_feed_close)
    local cur = ffi_new("dp_feed_cursor")
    cur.origin = C.dp_lock_owner_new()
    C.dp_feed_cursor_init(f, cur)
    return setmetatable({
        name = name,
        handle = f,
        stamp = C.dp_feed_stamp(f),
        cursor = cur,
        origin = cur.origin,
        keys = ffi_gc(ffi_new("dp_bytes"), C.dp_bytes_free),
        lens = ffi_new("size_t[?]", DRAIN_BATCH),
        scopes = ffi_new("int32_t[?]", DRAIN_BATCH),
        n = ffi_new("size_t[1]"),
    }, Feed)
end

function Feed:push(key, scope)
    C.dp_feed_push(self.handle, key, #key, self.origin, scope)
end

--- Read everything pushed since the last read: calls on_key(key, scope) for
-- each, or on_reset(reset_at) once when entries were missed.
-- @local
function Feed:drain(on_key, on_reset, ctx)
    local cur, keys, lens, scopes, n = self.cursor, self.keys, self.lens, self.scopes, self.n
    for _ = 1, 1e6 do
        C.dp_feed_read(self.handle, cur, keys, lens, scopes, DRAIN_BATCH, n)
        if cur.reset ~= 0 then
            on_reset(ctx, cur.reset_at)
        else
            local pos = 0
            for i = 0, tonumber(n[0]) - 1 do
                local len = tonumber(lens[i])
                on_key(ctx, ffi_string(keys.data + pos, len), scopes[i])
                pos = pos + len
            end
        end
        if cur.more == 0 then
            break
        end
    end
    return cur.stamp
end

-- -- Inside nginx over Redis: a SUBSCRIBE per worker -------------------------------
-- The cosocket redis backend PUBLISHes its writes as the C backend does; no
-- thread of ours can block on a socket inside nginx, so each worker runs a
-- timer that keeps a cosocket SUBSCRIBEd to the channel (a light thread reads
-- it, with no read timeout to log) and applies what others announce to every
-- tiered backend of the worker on that feed. Writes in the worker are
-- applied to its other backends at once. A lost subscription is retried
-- every 100 ms at most; once subscribed again every reader starts over.

local NGX_FEEDS = {} -- feed name -> feed, in this worker

local NgxRedisFeed = {}
NgxRedisFeed.__index = NgxRedisFeed

-- Each application counts as a drain of the reader: a read that yielded
-- meanwhile (a cosocket) then drops the copies it makes (see promote).
local function ngx_key(feed, r, key, scope)
    r.drains = r.drains + 1
    feed.on_key(r, key, scope)
end

local function ngx_reset(feed)
    for r in pairs(feed.readers) do
        r.drains = r.drains + 1
        feed.on_reset(r, ngx.now())
    end
end

function NgxRedisFeed:push(key, scope, from)
    for r in pairs(self.readers) do
        if r ~= from then
            ngx_key(self, r, key, scope)
        end
    end
end

local function ngx_apply(feed, payload)
    local own = feed.bottom.sender
    if #payload < 16 or (own and payload:sub(1, 16) == own) then
        return
    end
    local pos, len = 17, #payload
    while pos <= len do
        local digits, colon = payload:match("^(%d+)():", pos)
        local klen = tonumber(digits)
        if not klen or colon + klen > len then
            ngx_reset(feed)
            return
        end
        local key = payload:sub(colon + 1, colon + klen)
        for r in pairs(feed.readers) do
            ngx_key(feed, r, key, FLEET)
        end
        pos = colon + klen + 1
    end
end

local function ngx_listen(premature, feed)
    if premature then
        return
    end
    local resp = require "dogpile.cache.resp"
    local s = feed.bottom.s
    local backoff = 0.01
    while not ngx.worker.exiting() do
        local sock = s:connect()
        local ok = false
        if sock then
            local sent = sock:send(resp.encode({ "SUBSCRIBE", feed.channel, n = 2 }))
            local v, kind
            if sent then
                v, kind = resp.read_reply(sock)
            end
            ok = v ~= nil and kind == "*" and v[1] == "subscribe"
        end
        if ok then
            backoff = 0.01
            ngx_reset(feed)
            sock:settimeouts(s.connect_ms, s.socket_ms, 86400000)
            local reader = ngx.thread.spawn(function()
                while true do
                    local v, kind = resp.read_reply(sock)
                    if v == nil then
                        return
                    end
                    if kind == "*" and v[1] == "message" and type(v[3]) == "string" then
                        ngx_apply(feed, v[3])
                    end
                end
            end)
            while not ngx.worker.exiting() and coroutine.status(reader) ~= "dead" do
                ngx.sleep(0.05)
            end
            ngx.thread.kill(reader)
        end
        if sock then
            sock:close()
        end
        ngx.sleep(backoff)
        backoff = math_min(backoff * 2, 0.1)
    end
end

local function ngx_redis_feed(name, bottom, channel)
    local feed = NGX_FEEDS[name]
    if not feed then
        feed = setmetatable({ bottom = bottom, channel = channel,
                              readers = setmetatable({}, { __mode = "k" }) }, NgxRedisFeed)
        NGX_FEEDS[name] = feed
    end
    function feed.sync_fn(ctx, on_key, on_reset)
        feed.on_key, feed.on_reset = on_key, on_reset
        feed.readers[ctx] = true
        return function()
            if not feed.started and ngx.get_phase() ~= "init" then
                local ok, err = ngx.timer.at(0, ngx_listen, feed)
                if not ok then
                    error(NAME .. ": cannot start the change listener: " .. tostring(err), 0)
                end
                feed.started = true
            end
        end
    end
    return feed
end

-- -- A host feed opened at first use -------------------------------------------------
-- nginx's master, as root, makes no file a worker could not open (lmdb.lua
-- says so with a nil host_feed()): the feed is opened by each worker at
-- its first read or write. Copies made before that (in the master) are
-- dropped then, as after any reset.

local LazyFeed = {}
LazyFeed.__index = LazyFeed

function LazyFeed:real()
    local f = self.opened
    if f == nil then
        -- The feed lives in the environment's folder, which the worker's
        -- first operation makes (lmdb.lua defers the open): a read first.
        pcall(self.bottom.get, self.bottom, self.probe)
        local path = self.host_feed()
        if path == nil then
            return nil
        end
        f = open_feed(path)
        self.opened = f
    end
    return f
end

function LazyFeed:push(key, scope)
    local f = self:real()
    if f then
        f:push(key, scope)
    end
end

function LazyFeed:drain(on_key, on_reset, ctx)
    return self.opened:drain(on_key, on_reset, ctx)
end

local function lazy_host_feed(host_feed, bottom, probe)
    local feed = setmetatable({ host_feed = host_feed, bottom = bottom, probe = probe }, LazyFeed)
    -- The sync of the reader `ctx`: see Tiered's new for the usual one.
    function feed.sync_fn(ctx, _, on_reset, drain)
        local stamp_ptr, last
        return function()
            if stamp_ptr == nil then
                local f = feed:real()
                if f == nil then
                    return
                end
                stamp_ptr, last = f.stamp, f.cursor.stamp
                on_reset(ctx, C.dp_clock_now())
            end
            if stamp_ptr[0] ~= last then
                last = drain(ctx)
            end
        end
    end
    return feed
end

-- -- The region's invalidation, kept in the bottom tier ----------------------------
-- One signed number (the invalidation time: positive hard, negative soft)
-- stored as an ordinary value under `prefix.."invalidated:"..name`. Each
-- backend caches it; the feed tells when it changed (the key is pushed like
-- any other), and a reset reloads it.
--
-- The hit path judges it as the region judges its own default strategy: two
-- fields, `_invalidated` (the time, or false) and `_hard`, read in place
-- (invalidation.lua's judge_default, which the region picks for a strategy
-- whose `judge_fields` is true). What the hit path cannot
-- do, load the number from the bottom, waits for the backend's next read:
-- while a change is unloaded ("dirty") the fields say "hard-invalidated at
-- +inf", so a copy in the region's front table is judged missing, and the
-- region reads through get(), which loads first and so judges with the
-- stored number. A load that fails keeps what was known, and retries at the
-- next get().

local huge = math.huge

local Invalidator = {}
Invalidator.__index = Invalidator

function Invalidator:_mark_dirty()
    if not self.dirty then
        self.known_at, self.known_hard = self._invalidated, self._hard
    end
    self.dirty = true
    self._invalidated, self._hard = huge, true
end

function Invalidator:_load()
    local t = self.tiered
    local ok, cv = pcall(t.bottom.get, t.bottom, self.key, -1 / 0, 0)
    if not ok then
        -- Keep what we had; the next get() tries again.
        self._invalidated, self._hard = self.known_at, self.known_hard
        return
    end
    self.dirty = false
    local v = cv and cv.payload
    if type(v) == "number" and v == v then
        self._invalidated = v < 0 and -v or v
        self._hard = v > 0
    else
        self._invalidated, self._hard = false, false
    end
    if t.poll_every then
        self.next_load = clock_upper() + t.poll_every
    end
end

-- What is known: the invalidation time (or false) and whether it is hard,
-- loaded first if a change is pending.
function Invalidator:_current()
    if self.dirty then
        self:_load()
        if self.dirty then
            return self.known_at, self.known_hard
        end
    end
    return self._invalidated, self._hard
end

function Invalidator:invalidate(hard)
    hard = hard ~= false
    local t = self.tiered
    local at = C.dp_clock_stamp()
    local cv = CachedValue.new(hard and at or -at, { ct = at, v = VALUE_VERSION })
    local ok, err = pcall(t.bottom.put, t.bottom, self.key, cv, at)
    if not ok then
        error(tier_error(t.bottom, "invalidate", self.key, err), 0)
    end
    t.feed:push(self.key, FLEET, t)
    self._invalidated, self._hard, self.dirty = at, hard, false
end

function Invalidator:is_invalidated(ct)
    local at = self:_current()
    return at ~= false and ct < at
end

function Invalidator:is_hard_invalidated(ct)
    local at, hard = self:_current()
    return at ~= false and hard and ct < at
end

function Invalidator:is_soft_invalidated(ct)
    local at, hard = self:_current()
    return at ~= false and not hard and ct < at
end

-- Asked outside a read (by the user, say): apply what is pending first.
function Invalidator:was_hard_invalidated()
    self.tiered.sync()
    local at, hard = self:_current()
    return at ~= false and hard
end

function Invalidator:was_soft_invalidated()
    self.tiered.sync()
    local at, hard = self:_current()
    return at ~= false and not hard
end

local function new_invalidator(tiered, key)
    local inv = setmetatable({ tiered = tiered, key = key, dirty = false, known_at = false,
                               known_hard = false, next_load = 0, _invalidated = false,
                               _hard = false, judge_fields = true }, Invalidator)
    inv:_mark_dirty()
    return inv
end

-- -- The lock --------------------------------------------------------------------
-- The most shared tier's. Whoever takes it is about to create the value:
-- its next read skips the tiers of this Lua state, so that it sees what
-- another process stored in the shared tiers meanwhile, not an older copy.

local TMutex = {}
TMutex.__index = TMutex

function TMutex:acquire(wait)
    local got = self.inner:acquire(wait)
    if got then
        self.tiered.bypass[self.key] = true
    end
    return got
end

function TMutex:release()
    return self.inner:release()
end

function TMutex:locked()
    local f = self.inner.locked
    return f and f(self.inner)
end

local TWaitMutex = setmetatable({}, { __index = TMutex })
TWaitMutex.__index = TWaitMutex

function TWaitMutex:wait_unlocked()
    return self.inner:wait_unlocked()
end

-- -- The backend ----------------------------------------------------------------------

local Tiered = {}
Tiered.__index = Tiered
-- The region hands CachedValue tables; the tiers serialize for themselves.
Tiered.serialized = false

-- A key changed elsewhere: drop it from every tier above the bottom that may
-- hold a copy the change made stale.
local function on_key(self, key, scope)
    local tiers, n = self.tiers, self.n
    for i = 1, n - 1 do
        local t = tiers[i]
        if t.scope <= scope then
            t:delete(key)
        end
    end
    local inv = self.invalidator
    if inv and key == inv.key then
        inv:_mark_dirty()
    end
end

local function on_reset(self, reset_at)
    local tiers = self.tiers
    for i = 1, self.n - 1 do
        tiers[i]:clear()
    end
    if reset_at > self.floor then
        self.floor = reset_at
    end
    if self.invalidator then
        self.invalidator:_mark_dirty()
    end
end

local function drain(self)
    self.drains = self.drains + 1
    return self.feed:drain(on_key, on_reset, self)
end

--- Copy `cv`, read from tier `from`, into the tiers above it, most shared
-- first; then make sure no change pushed meanwhile is left unapplied to it.
local function promote(self, key, cv, from, at, drains0)
    local tiers = self.tiers
    for j = from - 1, 1, -1 do
        local t = tiers[j]
        local ok = pcall(t.put, t, key, cv, at)
        if not ok then
            break -- an upper tier that cannot take it (full, too big) only misses
        end
    end
    -- A change of this key announced while we read it below must win over the
    -- copies just made: drain now. If another coroutine drained while we were
    -- reading (a yielding tier), what it applied may predate our copies:
    -- drop them.
    if self.drains ~= drains0 then
        for j = from - 1, 1, -1 do
            pcall(tiers[j].delete, tiers[j], key)
        end
    end
    self.sync()
end

-- Read from tier `from` down; the CachedValue or NO_VALUE.
function Tiered:_read_down(key, from)
    local tiers, n = self.tiers, self.n
    local drains0 = self.drains
    local at = C.dp_clock_now()
    local floor = self.floor
    for i = from, n do
        local t = tiers[i]
        local ok, cv = pcall(t.get, t, key, floor, at)
        if not ok then
            error(tier_error(t, "get", key, cv), 0)
        end
        if cv then
            local hits = self.hits
            hits[i] = hits[i] + 1
            if i > 1 then
                promote(self, key, cv, i, at, drains0)
            end
            return cv
        end
    end
    return NO_VALUE
end

function Tiered:get(key)
    self.sync()
    local inv = self.invalidator
    if inv.dirty then
        -- Before the region judges what this read returns (see Invalidator).
        inv:_load()
    end
    local bypass = self.bypass
    if bypass[key] then
        bypass[key] = nil
        return self:_read_down(key, 2)
    end
    return self:_read_down(key, 1)
end

function Tiered:get_multi(keys)
    local out = {}
    for i = 1, #keys do
        out[i] = self:get(keys[i])
    end
    return out
end

-- The write protocol, for set and delete alike: the bottom first (Redis
-- publishes the change in the same round trip), then the shared tiers above
-- drop the key, then the change is pushed to the other Lua states of this
-- process, then the tiers of this Lua state take the new value. A reader
-- that copied an older value into a shared tier meanwhile drains the push
-- after copying, and drops it. A failing tier does not stop the others: the
-- error, naming the first tier that failed, is raised at the end.
local function write(self, op, keys, values)
    local tiers, n = self.tiers, self.n
    local drains0 = self.drains
    local first_err
    local bottom = tiers[n]
    local ok, err
    if op == "set" then
        if #keys == 1 then
            ok, err = pcall(bottom.put, bottom, keys[1], values[1], 0)
        else
            ok, err = pcall(self._bottom_set_multi, self, keys, values)
        end
    else
        if #keys == 1 then
            ok, err = pcall(bottom.delete, bottom, keys[1])
        else
            ok, err = pcall(self._bottom_delete_multi, self, keys)
        end
    end
    if not ok then
        first_err = tier_error(bottom, op, keys[1], err)
    end
    for i = n - 1, 1, -1 do
        local t = tiers[i]
        if t.scope > STATE then
            for j = 1, #keys do
                local dok, derr = pcall(t.delete, t, keys[j])
                if not dok and not first_err then
                    first_err = tier_error(t, "delete", keys[j], derr)
                end
            end
        end
    end
    local feed = self.feed
    for j = 1, #keys do
        feed:push(keys[j], PROCESS, self)
    end
    local at = C.dp_clock_now()
    for i = n - 1, 1, -1 do
        local t = tiers[i]
        if t.scope == STATE then
            for j = 1, #keys do
                local wok, werr
                if op == "set" then
                    wok, werr = pcall(t.put, t, keys[j], values[j], at)
                else
                    wok, werr = pcall(t.delete, t, keys[j])
                end
                if not wok and not first_err then
                    first_err = tier_error(t, op, keys[j], werr)
                end
            end
        end
    end
    -- Changes applied while the bottom write yielded (a cosocket) may be
    -- newer than ours: our copies must not outlive them.
    if self.drains ~= drains0 and op == "set" then
        for i = n - 1, 1, -1 do
            local t = tiers[i]
            if t.scope == STATE then
                for j = 1, #keys do
                    pcall(t.delete, t, keys[j])
                end
            end
        end
    end
    if first_err then
        error(first_err, 0)
    end
end

function Tiered:_bottom_set_multi(keys, values)
    local bottom = self.tiers[self.n]
    local b = bottom.backend
    if not b.set_multi then
        for i = 1, #keys do
            bottom:put(keys[i], values[i], 0)
        end
        return
    end
    local mapping = {}
    for i = 1, #keys do
        mapping[keys[i]] = bottom.serialized and encode(values[i]) or values[i]
    end
    b:set_multi(mapping)
end

function Tiered:_bottom_delete_multi(keys)
    local b = self.tiers[self.n].backend
    if b.delete_multi then
        b:delete_multi(keys)
    else
        for i = 1, #keys do
            b:delete(keys[i])
        end
    end
end

function Tiered:set(key, value)
    write(self, "set", { key }, { value })
end

function Tiered:delete(key)
    write(self, "delete", { key })
end

function Tiered:set_multi(mapping)
    local keys, values = {}, {}
    for k, v in pairs(mapping) do
        keys[#keys + 1] = k
        values[#keys] = v
    end
    if #keys > 0 then
        write(self, "set", keys, values)
    end
end

function Tiered:delete_multi(keys)
    if #keys > 0 then
        write(self, "delete", keys)
    end
end

function Tiered:get_mutex(key)
    local t = self.lock_tier
    if not t then
        return nil
    end
    local inner = t.backend:get_mutex(key)
    if inner == nil then
        return nil
    end
    local mt = (type(inner) == "table" and inner.wait_unlocked) and TWaitMutex or TMutex
    return setmetatable({ inner = inner, tiered = self, key = key }, mt)
end

--- Hits per tier since the backend opened; `front_hits`, the region's own
-- reads of tier 1 (front.store), are added to tier 1's.
-- @local
function Tiered:tier_hits(front_hits)
    local out = {}
    for i = 1, self.n do
        out[i] = self.hits[i]
    end
    out[1] = out[1] + (front_hits or 0)
    return out
end

function Tiered:stats()
    local b = self.tiers[1].backend
    local st = b.stats and b:stats() or {}
    return { evictions = st.evictions or 0, tier_hits = self:tier_hits(0) }
end

--- The region's invalidator (the region asks at configure), named after the
-- region unless the `name` argument says otherwise.
-- @local
function Tiered:region_invalidator(region)
    local inv = self.invalidator
    if not self.inv_named and region and region.name ~= nil then
        inv.key = self.prefix .. "invalidated:" .. tostring(region.name)
        inv:_mark_dirty()
    end
    return inv
end

function Tiered:close()
    for _, t in ipairs(self.tiers) do
        if t.backend.close then
            pcall(t.backend.close, t.backend)
        end
    end
end

-- -- Configure ------------------------------------------------------------------------

local function check_tiers(tiers)
    if type(tiers) ~= "table" then
        raise(NAME .. ": arguments.tiers must be an array of {backend = NAME, arguments = {...}, "
              .. "max_age = SECONDS}, got " .. type(tiers))
    end
    local n = #tiers
    if n < 2 or n > 4 then
        raise(NAME .. ": arguments.tiers must hold 2 to 4 tiers, got " .. n)
    end
    for i = 1, n do
        local spec = tiers[i]
        if type(spec) ~= "table" or type(spec.backend) ~= "string" then
            raise(NAME .. ": tier " .. i .. " must be {backend = NAME, ...}, got "
                  .. (type(spec) == "table" and ("backend = " .. type(spec.backend)) or type(spec)))
        end
        for k in pairs(spec) do
            if k ~= "backend" and k ~= "arguments" and k ~= "max_age" then
                raise(NAME .. ": tier " .. i .. ": unknown field '" .. tostring(k)
                      .. "' (known: backend, arguments, max_age)")
            end
        end
        if spec.arguments ~= nil and type(spec.arguments) ~= "table" then
            raise(NAME .. ": tier " .. i .. ": arguments must be a table, got " .. type(spec.arguments))
        end
        local m = spec.max_age
        if m ~= nil and (type(m) ~= "number" or not (m > 0)) then
            raise(NAME .. ": tier " .. i .. ": max_age must be a positive number of seconds, got "
                  .. tostring(m))
        end
        if spec.backend == NAME then
            raise(NAME .. ": tier " .. i .. " cannot itself be tiered")
        end
    end
    if tiers[n].max_age ~= nil then
        raise(NAME .. ": tier " .. n .. " is the bottom (the store of record); max_age applies "
              .. "to the tiers above it")
    end
end

local function copy(t)
    local out = {}
    for k, v in pairs(t or {}) do
        out[k] = v
    end
    return out
end

local function new(arguments)
    arguments = arguments or {}
    if type(arguments) ~= "table" then
        raise(NAME .. ": arguments must be a table, got " .. type(arguments))
    end
    for k in pairs(arguments) do
        if k ~= "tiers" and k ~= "prefix" and k ~= "name" then
            raise(NAME .. ": unknown argument '" .. tostring(k) .. "' (known: tiers, prefix, name)")
        end
    end
    local specs = arguments.tiers
    check_tiers(specs)
    local prefix = arguments.prefix or "dogpile:tiered:"
    if type(prefix) ~= "string" then
        raise(NAME .. ": prefix must be a string, got " .. type(prefix))
    end
    local n = #specs
    local bottom_name = specs[n].backend
    local in_nginx = bottom_name == "dogpile.cache.ngx_shared"
    local notifying = NOTIFYING[bottom_name]
    if not notifying then
        for i = 1, n - 1 do
            if not specs[i].max_age then
                raise(NAME .. ": tier " .. n .. " (" .. bottom_name .. ") tells nobody what "
                      .. "changed, so a copy above it could be served stale forever: give tier "
                      .. i .. " (" .. specs[i].backend .. ") a max_age (the longest a copy may "
                      .. "be served there)")
            end
        end
    end

    local region_mod = require "dogpile.cache.region"
    local feed_name = "tiered:" .. bottom_name .. "\n" .. canonical(specs[n].arguments)
        .. "\n#" .. prefix
    local tiers = {}
    for i = 1, n do
        local spec = specs[i]
        local args = copy(spec.arguments)
        if i == n and (bottom_name == "dogpile.cache.redis"
                       or bottom_name == "dogpile.cache.redis_sentinel") then
            -- The redis backend publishes every change on this channel, and
            -- its listener pushes what others publish into our feed.
            args.notify_channel = prefix .. "changes"
            args.notify_feed = feed_name
        end
        local backend = region_mod.load_backend(spec.backend, args)
        local scope = SCOPES[spec.backend] or FLEET
        local t = setmetatable({
            index = i,
            name = spec.backend,
            backend = backend,
            serialized = backend.serialized == true,
            scope = scope,
            max_age = spec.max_age,
            bottom = i == n,
        }, Tier)
        tiers[i] = t
    end

    local self = setmetatable({
        tiers = tiers,
        n = n,
        bottom = tiers[n],
        prefix = prefix,
        hits = {},
        bypass = {},
        drains = 0,
        floor = -1 / 0,
        inv_named = arguments.name ~= nil,
    }, Tiered)
    for i = 1, n do
        self.hits[i] = 0
    end
    for i = n, 1, -1 do
        if tiers[i].backend.get_mutex then
            self.lock_tier = tiers[i]
            break
        end
    end
    self.key_mangler = tiers[n].backend.key_mangler

    -- Without notification, the invalidation is reloaded as often as the
    -- shortest max_age lets a copy live.
    if not notifying then
        local m = math.huge
        for i = 1, n - 1 do
            m = math_min(m, specs[i].max_age)
        end
        self.poll_every = m
    end

    local host_feed = tiers[n].backend.host_feed
    if in_nginx then
        self.feed = tiers[n].backend:change_feed(prefix)
    elseif ngx and tiers[n].backend.s and not tiers[n].backend.handle
        and (bottom_name == "dogpile.cache.redis" or bottom_name == "dogpile.cache.redis_sentinel") then
        self.feed = ngx_redis_feed(feed_name, tiers[n].backend, prefix .. "changes")
    elseif host_feed then
        -- One file per environment whatever the prefix: keys are the
        -- environment's, and an invalidation key names its prefix.
        local path = host_feed()
        self.feed = path and open_feed(path)
            or lazy_host_feed(host_feed, tiers[n].backend, prefix .. "invalidated:")
    else
        self.feed = open_feed(feed_name)
    end
    local feed = self.feed

    -- The hit path's check: one load and compare while nothing changed.
    local sync
    if feed.sync_fn then
        sync = feed.sync_fn(self, on_key, on_reset, drain)
    else
        local stamp_ptr = feed.stamp
        local last = feed.cursor.stamp
        sync = function()
            if stamp_ptr[0] ~= last then
                last = drain(self)
            end
        end
    end
    self.sync = sync

    local inv = new_invalidator(self, prefix .. "invalidated:" .. tostring(arguments.name or ""))
    self.invalidator = inv
    if self.poll_every then
        -- Nothing announces a change of the invalidation: it is reloaded
        -- once a copy could have lived poll_every.
        local feed_sync = sync
        sync = function()
            feed_sync()
            if not inv.dirty and clock_upper() >= inv.next_load then
                inv:_mark_dirty()
            end
        end
        self.sync = sync
    end

    local t1 = tiers[1]
    if not t1.serialized and getmetatable(t1.backend) ~= nil and t1.backend._cache then
        local cache = t1.backend._cache
        local store = cache
        if t1.max_age then
            -- The region reads an empty table whose __index judges the
            -- copy's age (a sweep of the table from the hit path would put
            -- a loop in the hit's trace; a read through get(), a pcall).
            -- The clock's upper bound only ever makes a copy look older.
            local max_age = t1.max_age
            store = setmetatable({}, { __index = function(_, key)
                local v = cache[key]
                if v ~= nil then
                    local at = v.at
                    if at ~= nil and clock_upper() - at <= max_age then
                        return v
                    end
                end
                return nil
            end, __newindex = function()
                error(NAME .. ": the front table is read-only", 2)
            end })
        end
        self.front = { store = store, sync = sync }
    end
    return self
end

return { new = new, Tiered = Tiered, _memory = memory }
