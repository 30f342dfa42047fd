-- dogpile.cache.redis_cluster inside nginx: the same arguments, bytes and
-- lock as the C backend (backends/redis_cluster.c), over nginx cosockets
-- (dogpile.cache.resp, one keepalive pool per node and worker), so that a
-- worker never blocks on the cluster. backends/redis_cluster.lua picks it
-- when the region is configured inside nginx.
--
-- Routing, as in C: the slot map from CLUSTER SLOTS (per worker, read at
-- the first use and again when a node fails), CRC16 of the key or of its
-- {hash tag}; MOVED rewrites the slot and retries, ASK sends ASKING and the
-- command to the named node for that one command, TRYAGAIN and CLUSTERDOWN
-- are retried (ngx.sleep) until socket_timeout has passed.
--
-- Multi forms: the keys are grouped by node, each node's pipeline (a GET,
-- SET or DEL per key) runs in a light thread of its own, so the nodes work
-- at once. A node that fails fails its keys only: get_multi raises
-- dogpile.cache.backends.c's partial error (the region makes the keys
-- misses under fail_open and raises otherwise), set_multi and delete_multi
-- do the live nodes' keys and raise naming the failed node.
--
-- The lock is the C backend's (SET <lock_prefix><key> <token> NX PX on the
-- lock key's node, released by the same script, which SPUBLISHes on the
-- lock key's shard channel). The waiters of a worker share one wait
-- (dogpile.cache.cosocket): the first SSUBSCRIBEs on the lock key's node and
-- wakes the others at the release's message; where SSUBSCRIBE is refused
-- (an ACL, Redis < 7) it polls, 1 ms doubling to lock_sleep, as it also
-- does between messages (an expired lock publishes nothing).
--
-- Circuit breakers: the C backend's, one per node (dogpile.cache.cosocket,
-- "Circuit breakers"): a node's round trips go through its breaker, a
-- refused one fails at once with the breaker's message, and a refused
-- node's slots are looked up again at most every 100 ms (a promoted replica
-- is a node of its own, its breaker closed).
local lib = require "dogpile.lib"
local cosocket = require "dogpile.cache.cosocket"
local resp = require "dogpile.cache.resp"
local partial_error = require("dogpile.cache.backends.c").partial_error
local bit = require "bit"

local ngx = ngx
local band, bxor, lshift, rshift = bit.band, bit.bxor, bit.lshift, bit.rshift
local byte, find, sub, format, concat = string.byte, string.find, string.sub, string.format,
    table.concat
local pairs, ipairs, tonumber, tostring, error, setmetatable, type =
      pairs, ipairs, tonumber, tostring, error, setmetatable, type

lib.own_source()

local _M = {}
local NSLOTS = 16384
local MAX_HOPS = 16

-- The C backend's release, byte for byte (backends/redis_cluster.c).
local UNLOCK_SCRIPT = "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) "
    .. "redis.pcall('spublish', KEYS[1], '') return 1 "
    .. "else return 0 end"

-- -- Slots ----------------------------------------------------------------------------

local crc_tab = {}
for i = 0, 255 do
    local crc = lshift(i, 8)
    for _ = 1, 8 do
        if band(crc, 0x8000) ~= 0 then
            crc = band(bxor(lshift(crc, 1), 0x1021), 0xffff)
        else
            crc = band(lshift(crc, 1), 0xffff)
        end
    end
    crc_tab[i] = crc
end

local function crc16(s, i, j)
    local crc = 0
    for k = i, j do
        crc = band(bxor(lshift(crc, 8), crc_tab[bxor(rshift(crc, 8), byte(s, k))]), 0xffff)
    end
    return crc
end

-- The cluster slot of `key`: CRC16 of its {hash tag} when it has a
-- non-empty one, else of the whole key, mod 16384.
local function key_slot(key)
    local open = find(key, "{", 1, true)
    if open then
        local close = find(key, "}", open + 1, true)
        if close and close > open + 1 then
            return crc16(key, open + 1, close - 1) % NSLOTS
        end
    end
    return crc16(key, 1, #key) % NSLOTS
end
_M.key_slot = key_slot

-- -- Nodes and the map ----------------------------------------------------------------

local Backend = cosocket.backend({})
Backend.__index = Backend

-- The server object (resp) of node "host:port", made on first use.
local function node(self, addr)
    local s = self.nodes[addr]
    if s then
        return s
    end
    local host, port = addr:match("^(.*):(%d+)$")
    local args = {}
    for k, v in pairs(self.node_args) do
        args[k] = v
    end
    args.host, args.port = host, tonumber(port)
    local err
    s, err = resp.server(self.name, args)
    if not s then
        error(err, 0)
    end
    s.addr = addr
    -- The node's own breaker (the C backend's, per node: a dead master
    -- refuses its own keys, the others' go on).
    s.circuit = self.circuit:server(addr) or false
    self.nodes[addr] = s
    self.order[#self.order + 1] = addr
    return s
end

-- Read CLUSTER SLOTS from the known nodes in turn until one answers. nil,
-- err when none does.
local function refresh(self)
    local last = "no node is known"
    for _, addr in ipairs(self.order) do
        local s = node(self, addr)
        local v, kind = s:command("CLUSTER SLOTS", { "CLUSTER", "SLOTS", n = 2 })
        if v ~= nil and kind == "*" and #v > 0 then
            local slots = {}
            for _, e in ipairs(v) do
                local m = e[3]
                if type(m) == "table" and type(e[1]) == "number" then
                    local host = (m[1] ~= nil and m[1] ~= "" and m[1] ~= "?") and m[1] or s.host
                    local a = host .. ":" .. m[2]
                    node(self, a)
                    for sl = e[1], e[2] do
                        slots[sl] = a
                    end
                end
            end
            self.slots = slots
            return true
        end
        last = v == nil and kind or ("CLUSTER SLOTS on " .. addr .. ": " .. tostring(v))
    end
    return nil, format("cannot read the slot map from any of %d node(s); the last said: %s",
                       #self.order, tostring(last))
end

local function route(self, slot)
    local addr = self.slots and self.slots[slot]
    if not addr then
        local ok, err = refresh(self)
        if not ok then
            return nil, err
        end
        addr = self.slots[slot]
        if not addr then
            return nil, format("no node serves slot %d (is every slot of the cluster assigned?)",
                               slot)
        end
    end
    return node(self, addr)
end

-- A node's breaker refused: may the map be read again (a failover may have
-- given its slots to a replica)? At most every 100 ms, as in C.
local REFUSED_RELOAD = 0.1
local function reload_due(self)
    local now = ngx.now()
    if now - self.refused_at >= REFUSED_RELOAD then
        self.refused_at = now
        return true
    end
    return false
end

-- What an error reply asks: "moved"/"ask" with the slot and node, "retry".
local function redirect(v)
    local kind, slot, addr = v:match("^(%u+) (%d+) (%S+)$")
    if kind == "MOVED" or kind == "ASK" then
        return kind, tonumber(slot), addr
    end
    if find(v, "^TRYAGAIN") or find(v, "^CLUSTERDOWN") then
        return "retry"
    end
    return nil
end

-- Run one command (an array, with n) on the node of `slot`, following
-- MOVED and ASK, retrying TRYAGAIN and CLUSTERDOWN until socket_timeout,
-- and finding the slot's new master when its node fails. value, kind (an
-- ordinary error reply is kind "-"), or raises naming the node.
local function run(self, slot, op, args)
    local ask, deadline
    for _ = 1, MAX_HOPS do
        local s, err = ask or route(self, slot)
        if not s then
            error(op .. ": " .. err, 0)
        end
        local v, kind, refused
        if ask then
            local vs, kinds
            vs, kinds, refused = s:call(op, { resp.encode({ "ASKING", n = 1 }),
                                              resp.encode(args) }, 2)
            if vs ~= nil then
                v, kind = vs[2], kinds[2]
            else
                v, kind = nil, kinds
            end
        else
            v, kind, refused = s:command(op, args)
        end
        if refused then
            -- The breaker's message (it names the node), as in C.
            local before = s.addr
            if ask or not reload_due(self) or not refresh(self)
               or (self.slots[slot] or before) == before then
                error(kind, 0)
            end
        elseif v == nil then
            -- Down, or failed over: if the map now names another node, go there.
            local before = s.addr
            if ask or not refresh(self) or (self.slots[slot] or before) == before then
                error(op .. ": node " .. before .. ": " .. tostring(kind), 0)
            end
            ask = nil
        elseif kind == "-" then
            local what, sl, addr = redirect(v)
            if what == "MOVED" then
                self.slots[sl] = addr
                node(self, addr)
                ask = nil
            elseif what == "ASK" then
                ask = node(self, addr)
            elseif what == "retry" then
                deadline = deadline or ngx.now() + self.socket_timeout
                if ngx.now() >= deadline then
                    error(format("%s: node %s: %s (still after socket_timeout, %g s)", op, s.addr,
                                 v, self.socket_timeout), 0)
                end
                ngx.sleep(0.01)
                if find(v, "^CLUSTERDOWN") then
                    refresh(self)
                end
                ask = nil
            else
                return v, kind
            end
        else
            return v, kind
        end
    end
    error(format("%s: more than %d redirections for slot %d", op, MAX_HOPS, slot), 0)
end

-- -- Values ---------------------------------------------------------------------------

function Backend:_get(key)
    local v, kind = run(self, key_slot(key), "GET", { "GET", key, n = 2 })
    if kind == "$" then
        return v
    elseif kind == "-" then
        error("GET: " .. v, 0)
    elseif v == nil or v == false or kind == "_" then
        return false
    end
    error("GET: the key holds a value of another type", 0)
end

local function set_args(self, key, value)
    if self.ttl_ms then
        return { "SET", key, value, "PX", self.ttl_ms, n = 5 }
    end
    return { "SET", key, value, n = 3 }
end

local function checked(op, v, kind)
    if kind == "-" then
        error(op .. ": " .. v, 0)
    end
    return v
end

function Backend:_set(key, value)
    checked("SET", run(self, key_slot(key), "SET", set_args(self, key, value)))
end

function Backend:_delete(key)
    checked("DEL", run(self, key_slot(key), "DEL", { "DEL", key, n = 2 }))
end

-- The keys at idx[1..] (commands args_of(i)) grouped by node, each node's
-- pipeline in a light thread: done(i, v, kind) for each reply. A key whose
-- reply redirects is run alone (run: redirections); a node that fails has
-- its keys run alone when the map, read again, names another node for them
-- (a failover), and failed otherwise. Returns the failed keys {i = message}
-- and their count.
local function multi(self, op, n, args_of, done)
    local groups, failed, nfailed = {}, {}, 0
    for i = 1, n do
        local args = args_of(i)
        local s, err = route(self, key_slot(args[2]))
        if not s then
            failed[i], nfailed = op .. ": " .. err, nfailed + 1
        else
            local g = groups[s.addr]
            if not g then
                g = { s = s, idx = {}, req = {} }
                groups[s.addr] = g
            end
            g.idx[#g.idx + 1] = i
            g.req[#g.req + 1] = resp.encode(args)
        end
    end
    local function one(g)
        local vs, kinds, refused = g.s:call(op .. " (pipeline)", g.req, #g.idx)
        g.refused = refused
        return vs, kinds
    end
    local threads = {}
    for _, g in pairs(groups) do
        threads[#threads + 1] = { g = g, t = ngx.thread.spawn(one, g) }
    end
    local again, down = {}, {}
    for _, th in ipairs(threads) do
        local ok, vs, kinds = ngx.thread.wait(th.t)
        local g = th.g
        if not ok or vs == nil then
            g.err = not ok and tostring(vs) or tostring(kinds)
            down[#down + 1] = g
        else
            for j, i in ipairs(g.idx) do
                if kinds[j] == "-" and redirect(vs[j]) then
                    again[#again + 1] = i
                else
                    done(i, vs[j], kinds[j])
                end
            end
        end
    end
    if #down > 0 then
        -- A node failed: failed over? Its keys go again (alone) where the
        -- map now sends them elsewhere, and fail at once otherwise. Nodes
        -- refused by their breakers only: the map read at most every 100 ms.
        local io = false
        for _, g in ipairs(down) do
            io = io or not g.refused
        end
        local fresh = (io or reload_due(self)) and refresh(self)
        for _, g in ipairs(down) do
            for _, i in ipairs(g.idx) do
                local sl = key_slot(args_of(i)[2])
                if fresh and self.slots[sl] and self.slots[sl] ~= g.s.addr then
                    again[#again + 1] = i
                elseif g.refused then
                    failed[i], nfailed = g.err, nfailed + 1
                else
                    failed[i], nfailed = format("%s: node %s: %s", op, g.s.addr, g.err),
                        nfailed + 1
                end
            end
        end
    end
    for _, i in ipairs(again) do
        local args = args_of(i)
        local ok, v, kind = pcall(run, self, key_slot(args[2]), op, args)
        if ok then
            done(i, v, kind)
        else
            failed[i], nfailed = v, nfailed + 1
        end
    end
    return failed, nfailed
end

-- "<first message> (k of n keys failed, the first '<key>')", as in C.
local function failure(failed, nfailed, n, keys)
    local first
    for i = 1, n do
        if failed[i] then
            first = i
            break
        end
    end
    return format("%s (%d of %d keys failed, the first '%s')", failed[first], nfailed, n,
                  keys[first])
end

function Backend:_get_multi(keys, n, out)
    local errs = {}
    local failed, nfailed = multi(self, "GET", n, function(i)
        return { "GET", keys[i], n = 2 }
    end, function(i, v, kind)
        if kind == "$" then
            out[i] = v
        elseif kind == "-" then
            errs[i] = "GET: " .. v
        else
            out[i] = false
        end
    end)
    for i, e in pairs(errs) do
        failed[i], nfailed = e, nfailed + 1
    end
    if nfailed > 0 then
        self.partial = failure(failed, nfailed, n, keys)
        self.partial_failed = failed
    end
end

-- The region's get_multi: the cosocket base's, then a node's failure as
-- dogpile.cache.backends.c's partial error (the values of the others kept).
local base_get_multi = Backend.get_multi
function Backend:get_multi(keys)
    self.partial, self.partial_failed = nil, nil
    local out = base_get_multi(self, keys)
    local msg, failed = self.partial, self.partial_failed
    if msg then
        self.partial, self.partial_failed = nil, nil
        local bad = {}
        for i = 1, #keys do
            if failed[i] then
                bad[#bad + 1] = i
            end
        end
        error(partial_error(msg, out, bad), 0)
    end
    return out
end

local function write_multi(self, op, keys, args_of)
    local n = #keys
    if n == 0 then
        return
    end
    local errs = {}
    local failed, nfailed = multi(self, op, n, args_of, function(i, v, kind)
        if kind == "-" then
            errs[i] = op .. ": " .. v
        end
    end)
    for i, e in pairs(errs) do
        failed[i], nfailed = e, nfailed + 1
    end
    if nfailed > 0 then
        error(failure(failed, nfailed, n, keys), 0)
    end
end

function Backend:_set_multi(mapping)
    local keys, vals = {}, {}
    for k, v in pairs(mapping) do
        keys[#keys + 1], vals[#keys + 1] = k, v
    end
    write_multi(self, "SET", keys, function(i)
        return set_args(self, keys[i], vals[i])
    end)
end

function Backend:_delete_multi(keys)
    write_multi(self, "DEL", keys, function(i)
        return { "DEL", keys[i], n = 2 }
    end)
end

-- -- The lock ------------------------------------------------------------------------

local redis_cosocket = require "dogpile.cache.backends.redis_cosocket"
local Mutex = cosocket.mutex_class()
Mutex.new_token = redis_cosocket.new_token

function Mutex:take(token)
    local b = self.b
    local ok, v, kind = pcall(run, b, key_slot(self.lk), "SET NX (lock)",
                              { "SET", self.lk, token, "NX", "PX", b.lock_px, n = 6 })
    if not ok then
        self:fail("taking", v)
    elseif kind == "-" then
        self:fail("taking", "SET NX (lock): " .. v)
    end
    return kind == "+"
end

function Mutex:token_of()
    local ok, v, kind = pcall(run, self.b, key_slot(self.lk), "GET (lock)",
                              { "GET", self.lk, n = 2 })
    if not ok then
        self:fail("waiting for the release", v)
    elseif kind == "$" then
        return v
    elseif kind == "-" then
        self:fail("waiting for the release", "GET (lock): " .. v)
    end
    return false
end

local function unlock(b, lk, token)
    local v, kind = run(b, key_slot(lk), "EVAL (unlock)",
                        { "EVAL", UNLOCK_SCRIPT, 1, lk, token, n = 5 })
    checked("EVAL (unlock)", v, kind)
    if v ~= 1 then
        return false, format("the lock had expired (lock_timeout %g s) and was no longer ours",
                             b.lock_timeout)
    end
    return true
end

function Mutex:unlock(token)
    return unlock(self.b, self.lk, token)
end

function Backend:_unlock(lk, token)
    unlock(self, lk, token)
end

function Mutex:locked()
    local ok, v, kind = pcall(run, self.b, key_slot(self.lk), "EXISTS (lock)",
                              { "EXISTS", self.lk, n = 2 })
    return ok and kind == ":" and v == 1
end

-- The waiters' watch: SSUBSCRIBE to the lock key's shard channel on its
-- node, where the release SPUBLISHes (a bare wake-up: the value's key lies
-- in another slot than the lock key's, so the script cannot read it). nil
-- (the waiters poll) when refused: an ACL, Redis < 7, a slot on the move.
function Mutex:watch()
    local ok, s = pcall(route, self.b, key_slot(self.lk))
    if not (ok and s) then
        return nil
    end
    return redis_cosocket.subscribe(s, self.lk, true)
end

local function get_mutex(self, key)
    return cosocket.new_mutex(Mutex, self, key, self.lock_prefix .. key)
end

-- -- Opening --------------------------------------------------------------------------

local NODE_ARGS = { username = true, password = true, socket_timeout = true,
                    connect_timeout = true, redis_expiration_time = true, lock_timeout = true,
                    lock_sleep = true, lock_prefix = true, pool_size = true,
                    pool_idle_timeout = true }
local CIRCUIT_ARGS = { circuit_failures = true, circuit_cooldown = true, circuit_slow = true }

-- The backend for the region's `arguments` (startup_nodes already joined
-- into "host:port,..." in `nodes`; `distributed` false: the region's lock).
-- @raise on a bad argument
function _M.open(name, arguments, nodes, distributed)
    local node_args = {}
    for k, v in pairs(arguments) do
        if NODE_ARGS[k] then
            node_args[k] = v
        elseif not CIRCUIT_ARGS[k] -- the core's, checked below
               and k ~= "startup_nodes" and k ~= "url" and k ~= "distributed_lock" then
            lib.raise(format("%s: '%s' is not an argument of a cluster (known: startup_nodes, "
                             .. "url, username, password, socket_timeout, connect_timeout, "
                             .. "redis_expiration_time, distributed_lock, lock_timeout, "
                             .. "lock_sleep, lock_prefix, circuit_*, pool_size, "
                             .. "pool_idle_timeout)", name, tostring(k)))
        end
    end
    -- One check of every argument: a server made from them (its settings are
    -- every node's).
    local s, err = resp.server(name, node_args)
    if not s then
        lib.raise(err)
    end
    local self = setmetatable({
        name = name, nodes = {}, order = {}, slots = nil, node_args = node_args,
        socket_timeout = s.socket_timeout, ttl_ms = s.ttl_ms, lock_prefix = s.lock_prefix,
        lock_timeout = s.lock_timeout, lock_px = math.ceil(s.lock_timeout * 1000),
        lock_growth = 2, lock_step_max = s.lock_sleep,
        domain = name .. ":" .. nodes .. "/" .. s.lock_prefix,
        hits = 0, misses = 0, lock_overruns = 0, refused_at = -math.huge,
    }, Backend)
    -- The C backend's breakers, the core's own: the store's (this cluster
    -- and lock prefix, per worker process), one per node under it.
    self.circuit = cosocket.circuit(name, self.domain, arguments)
    for addr in nodes:gmatch("[^,%s]+") do
        if not addr:match("^.+:%d+$") then
            lib.raise(name .. ": startup_nodes: '" .. addr .. "' is not \"host:port\"")
        end
        node(self, addr)
    end
    if #self.order == 0 then
        lib.raise(name .. ": startup_nodes names no node")
    end
    if distributed then
        self.get_mutex = get_mutex
    end
    return self
end

_M.Backend, _M.Mutex = Backend, Mutex

return _M
