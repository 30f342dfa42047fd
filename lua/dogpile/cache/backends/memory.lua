--- dogpile.cache.memory: values in a Lua table of this Lua state, by
-- reference (nothing is copied or serialized). Arguments:
--
--     cache_dict  a table to keep the values in (default: a new one)
--     max_items   bound the number of keys; the least recently used is evicted
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local options = require "dogpile.cache.options"

local NO_VALUE = api.NO_VALUE
local VALUE_VERSION = api.VALUE_VERSION
local type, pairs, setmetatable, rawget, rawset, math_floor =
      type, pairs, setmetatable, rawget, rawset, math.floor

lib.own_source()

-- -- The stamp ------------------------------------------------------------------
-- A CachedValue of this format with no expiration time of its own gets its
-- created time copied onto itself, under STAMP, when it is stored: the
-- region's hit (read.lua's memory strategy) then judges it from that one
-- number, without reading the metadata table, which is one table fewer
-- between the key and the payload. Any other value (its own expiration time,
-- another format version, not a CachedValue) is stored as it is, and the hit
-- reads its metadata. A value handed out by get or get_multi loses its
-- stamp (whoever holds it may change its metadata, as a spec ageing a value
-- does, and the hit must then see the change) until it is stored again.
local STAMP = "_ct"
-- With the stamp, the creator's duration (metadata.delta, 0 when none), for
-- early_refresh's hit (read.lua's memory_early).
local DELTA_STAMP = "_dt"

local function stamp(v)
    if type(v) == "table" and rawget(v, STAMP) == nil then
        local md = rawget(v, "metadata")
        if type(md) == "table" and rawget(md, "v") == VALUE_VERSION
            and rawget(md, "ttl") == nil then
            local ct = rawget(md, "ct")
            local delta = rawget(md, "delta")
            if type(ct) == "number" and (delta == nil or type(delta) == "number") then
                rawset(v, STAMP, ct)
                rawset(v, DELTA_STAMP, delta or 0)
            end
        end
    end
    return v
end

-- The value `v` to hand out: without its stamp.
local function unstamped(v)
    if type(v) == "table" and rawget(v, STAMP) ~= nil then
        rawset(v, STAMP, nil)
        rawset(v, DELTA_STAMP, nil)
    end
    return v
end

-- -- Unbounded ----------------------------------------------------------------

local Memory = {}
Memory.__index = Memory
-- Pure Lua over a table: a get never raises, so the region calls it without pcall.
Memory.infallible = true

function Memory:get(key)
    local v = self._cache[key]
    if v == nil then
        return NO_VALUE
    end
    return unstamped(v)
end

function Memory:set(key, value)
    self._cache[key] = stamp(value)
end

function Memory:delete(key)
    self._cache[key] = nil
end

function Memory:get_multi(keys)
    local cache, out = self._cache, {}
    for i = 1, #keys do
        local v = cache[keys[i]]
        if v == nil then
            v = NO_VALUE
        end
        out[i] = unstamped(v)
    end
    return out
end

function Memory:set_multi(mapping)
    local cache = self._cache
    for k, v in pairs(mapping) do
        cache[k] = stamp(v)
    end
end

function Memory:delete_multi(keys)
    local cache = self._cache
    for i = 1, #keys do
        cache[keys[i]] = nil
    end
end

function Memory:stats()
    local n = 0
    for _ in pairs(self._cache) do
        n = n + 1
    end
    return { items = n, evictions = 0 }
end

-- -- Bounded: exact LRU over a doubly linked list ----------------------------------
-- The values stay in cache_dict; nodes keep the order. The list head is the
-- most recently used, and a hit moves its node there in constant time.

local LRU = setmetatable({}, { __index = Memory })
LRU.__index = LRU

local function unlink(node)
    node.prev.next = node.next
    node.next.prev = node.prev
end

local function push_front(head, node)
    node.next = head.next
    node.prev = head
    head.next.prev = node
    head.next = node
end

function LRU:get(key)
    local v = self._cache[key]
    if v == nil then
        return NO_VALUE
    end
    local node = self._nodes[key]
    local head = self._head
    if node and head.next ~= node then
        unlink(node)
        push_front(head, node)
    end
    return v
end

function LRU:set(key, value)
    local nodes = self._nodes
    local node = nodes[key]
    if node then
        unlink(node)
    else
        -- Every node, and the head, has the same shape (key, next, prev), so
        -- the traces' table guards hold whichever node a link points to.
        node = { key = key, next = false, prev = false }
        nodes[key] = node
        self._count = self._count + 1
    end
    push_front(self._head, node)
    self._cache[key] = value
    local head = self._head
    while self._count > self._max do
        local victim = head.prev
        unlink(victim)
        nodes[victim.key] = nil
        self._cache[victim.key] = nil
        self._count = self._count - 1
        self._evictions = self._evictions + 1
    end
end

function LRU:delete(key)
    local node = self._nodes[key]
    if node then
        unlink(node)
        self._nodes[key] = nil
        self._count = self._count - 1
    end
    self._cache[key] = nil
end

function LRU:get_multi(keys)
    local out = {}
    for i = 1, #keys do
        out[i] = self:get(keys[i])
    end
    return out
end

function LRU:set_multi(mapping)
    for k, v in pairs(mapping) do
        self:set(k, v)
    end
end

function LRU:delete_multi(keys)
    for i = 1, #keys do
        self:delete(keys[i])
    end
end

function LRU:stats()
    return { items = self._count, evictions = self._evictions, max_items = self._max }
end

-- The arguments, checked as core/args.c checks a C backend's: an unknown
-- name is refused (a misspelled max_items must not leave the cache unbounded).
local KNOWN = { cache_dict = true, max_items = true }

local function new(arguments)
    arguments = arguments or {}
    if type(arguments) ~= "table" then
        lib.raise("dogpile.cache.memory: arguments must be a table, got " .. options.show(arguments))
    end
    for k in pairs(arguments) do
        if not KNOWN[k] then
            lib.raise("dogpile.cache.memory: unknown argument '" .. tostring(k) .. "' (known: "
                      .. options.known(KNOWN) .. ")")
        end
    end
    local cache = arguments.cache_dict
    if cache ~= nil and type(cache) ~= "table" then
        lib.raise("dogpile.cache.memory: cache_dict must be a table, got " .. options.show(cache))
    end
    local max = arguments.max_items
    if max ~= nil and (type(max) ~= "number" or not (max >= 1 and max < math.huge)
                       or max ~= math_floor(max)) then
        lib.raise("dogpile.cache.memory: max_items must be a positive integer, got "
                  .. options.show(max))
    end
    cache = cache or {}
    if not max then
        for _, v in pairs(cache) do
            stamp(v) -- a given cache_dict's values: no key is added, so pairs goes on
        end
        return setmetatable({ _cache = cache }, Memory)
    end
    local head = { key = false, next = false, prev = false }
    head.next, head.prev = head, head
    local self = setmetatable({ _cache = cache, _nodes = {}, _head = head, _count = 0,
                                _max = max, _evictions = 0 }, LRU)
    -- Keys already in a given cache_dict enter the order, oldest first.
    local keys, values = {}, {}
    for k, v in pairs(cache) do
        keys[#keys + 1] = k
        values[#keys] = v
    end
    for i = 1, #keys do
        cache[keys[i]] = nil
    end
    for i = 1, #keys do
        self:set(keys[i], values[i])
    end
    return self
end

--- A backend over a Lua table of this state (the region calls it from `configure`).
-- @function new
-- @tparam[opt] table arguments the arguments listed above (default {}: each at its default)
-- @treturn table the backend
return { new = new, Memory = Memory, STAMP = STAMP, DELTA_STAMP = DELTA_STAMP }
