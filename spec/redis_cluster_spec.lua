-- dogpile.cache.redis_cluster against a real Redis Cluster that this spec
-- starts itself (spec/fixtures/redis_cluster/cluster.lua: 3 masters and 3
-- replicas on free loopback ports, data in a temporary folder, every server
-- killed in teardown whatever failed): region methods, arguments, hash tags,
-- MOVED and ASK provoked by hand, multi forms split by node, the lock (an
-- 8-process stampede), a reshard under load, and a master SIGKILLed under
-- load. The whole file stays under 90 s.
local cache = require "dogpile.cache"
local support = require "support"
local together = require "together"
local CL = require "fixtures.redis_cluster.cluster"
local ffi = require "ffi"
local LC = require("dogpile.lib").C

local NO_VALUE = cache.NO_VALUE
local now, sleep, sh, write, read = support.now, support.sleep, support.sh, support.write,
    support.read

local TMP = (sh("mktemp -d /tmp/dogpile-rc-spec-XXXXXX"):gsub("%s+$", ""))
local cl -- the cluster, started in setup

local function region(arguments, conf)
    conf = conf or {}
    arguments = arguments or {}
    if arguments.startup_nodes == nil and arguments.url == nil then
        arguments.startup_nodes = { cl:startup_nodes()[1], cl:startup_nodes()[2] }
    end
    conf.arguments = arguments
    return cache.make_region():configure("dogpile.cache.redis_cluster", conf)
end

local uniq = 0
local function fresh(prefix)
    uniq = uniq + 1
    return string.format("%s:%d:%d:%d", prefix, os.time(), math.random(1e9), uniq)
end

local function q(s)
    return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- redis-cli following redirections, on any live node.
local function ccli(cmd)
    return cl:cli(cl:alive()[1].port, "-c " .. cmd)
end

local keyslot = CL.keyslot

local function server_keyslot(key)
    return tonumber(cl:cli(cl:alive()[1].port, "CLUSTER KEYSLOT " .. q(key)))
end

-- The master serving `slot` in a topology read once (cl:master_of reads it
-- each time).
local function owner(topo, slot)
    for _, n in ipairs(topo) do
        if n.master and not n.fail then
            for a, b in n.slots:gmatch("(%d+)%-(%d+)") do
                if slot >= tonumber(a) and slot <= tonumber(b) then
                    return n
                end
            end
            for a in (" " .. n.slots .. " "):gmatch(" (%d+) ") do
                if slot == tonumber(a) then
                    return n
                end
            end
        end
    end
end

-- The masters (topology entries), live ones.
local function masters()
    local out = {}
    for _, t in ipairs(cl:topology()) do
        if t.master and not t.fail and t.slots ~= "" then
            out[#out + 1] = t
        end
    end
    return out
end

-- A key (or, with lock_prefix, its lock key) served by `master_port`: try
-- suffixes until CRC16 lands there.
local function key_on(master_port, prefix, lock_prefix)
    local topo = cl:topology()
    for i = 1, 10000 do
        local k = prefix .. ":" .. i
        local o = owner(topo, keyslot((lock_prefix or "") .. k))
        if o and o.port == master_port then
            return k
        end
    end
    error("no key found on " .. master_port)
end

local PRELUDE = [[
local cache = require "dogpile.cache"
local ffi = require "ffi"
pcall(ffi.cdef, "int usleep(unsigned int usec);")
local function sleep(s) ffi.C.usleep(math.floor(math.max(s, 0) * 1e6)) end
local function now() return require("dogpile").now() end
local args = assert(loadstring("return " .. arg[1]))()
local r = cache.make_region():configure("dogpile.cache.redis_cluster", { arguments = args })
local function append(file, line)
    local f = assert(io.open(file, "a"))
    f:write(line, "\n")
    f:close()
end
]] .. together.CHILD

local function script(name, body)
    local path = TMP .. "/" .. name .. ".lua"
    write(path, PRELUDE .. body)
    return path
end

local function args_text()
    local nodes = {}
    for _, a in ipairs(cl:startup_nodes()) do
        nodes[#nodes + 1] = string.format("%q", a)
    end
    return "{startup_nodes = {" .. table.concat(nodes, ",") .. "}, socket_timeout = 0.5, "
           .. "connect_timeout = 0.5, lock_timeout = 5}"
end

-- Every server of cluster `c` killed at once, and waited for together
-- (Cluster:stop), then its folder removed.
local function stop_cluster(c)
    c:stop()
end

local function lines(path)
    local out = {}
    for l in (read(path) or ""):gmatch("[^\n]+") do
        out[#out + 1] = l
    end
    return out
end

describe("dogpile.cache.redis_cluster", function()
    support.no_leaks()

    setup(function()
        cl = CL.start({ masters = 3, replicas = 1, node_timeout = 1000 })
    end)

    teardown(function()
        if cl then
            stop_cluster(cl)
        end
        os.execute("rm -rf '" .. TMP .. "'")
    end)

    describe("region methods", function()
        it("get, set, delete, metadata, values of every kind, binary keys", function()
            local r = region()
            local k = fresh("basic")
            assert.are.equal(NO_VALUE, r:get(k))
            r:set(k, { a = 1, nested = { "x", true }, f = 1.5 })
            assert.are.same({ a = 1, nested = { "x", true }, f = 1.5 }, r:get(k))
            r:set(k .. "false", false)
            assert.is_false(r:get(k .. "false"))
            local md = r:get_value_metadata(k)
            assert.is_true(math.abs(md.metadata.ct - now()) < 5)
            r:delete(k)
            assert.are.equal(NO_VALUE, r:get(k))
            assert.is_nil(r:get_value_metadata(k))
            local bk = k .. "\0\255 key"
            r:set(bk, "\0\1\2 value \255")
            assert.are.equal("\0\1\2 value \255", r:get(bk))
            r:delete(bk)
            r:delete(k .. "false")
        end)

        it("get_or_create, expiration, invalidation, decorators and stats", function()
            local r = region({}, { expiration_time = 0.3 })
            local k = fresh("goc")
            local calls = 0
            local function creator()
                calls = calls + 1
                return "v" .. calls
            end
            assert.are.equal("v1", r:get_or_create(k, creator))
            assert.are.equal("v1", r:get_or_create(k, creator))
            sleep(0.35)
            assert.are.equal("v2", r:get_or_create(k, creator))
            r:invalidate()
            assert.are.equal("v3", r:get_or_create(k, creator))
            assert.are.equal(3, calls)
            local ns, fcalls = fresh("deco"), 0
            local f = r:cache_on_arguments({ namespace = ns })(function(a, b)
                fcalls = fcalls + 1
                return a + b
            end)
            assert.are.equal(3, f(1, 2))
            assert.are.equal(3, f(1, 2))
            f:invalidate(1, 2)
            assert.are.equal(3, f(1, 2))
            assert.are.equal(2, fcalls)
            assert.are.equal(0, r:stats().errors)
            local st = r.backend:stats()
            assert.is_true(st.hits >= 1 and st.misses >= 1)
        end)

        it("get_multi, set_multi and delete_multi over every master, in the caller's order", function()
            local r = region()
            local k = fresh("multi")
            local keys, mapping = {}, {}
            for i = 1, 200 do
                keys[i] = k .. ":" .. i
                if i % 3 ~= 0 then
                    mapping[keys[i]] = { i = i }
                end
            end
            -- spread: every master holds some of them. Keys of one slot
            -- share an MGET (200 keys over 16384 slots: about one pair).
            local per, mgets, slots = {}, {}, {}
            local topo = cl:topology()
            for i = 1, 200 do
                local sl = keyslot(keys[i])
                slots[sl] = (slots[sl] or 0) + 1
            end
            for sl, n in pairs(slots) do
                local p = owner(topo, sl).port
                if n == 1 then
                    per[p] = (per[p] or 0) + 1
                else
                    mgets[p] = (mgets[p] or 0) + 1
                end
            end
            local nmasters = 0
            for _ in pairs(per) do
                nmasters = nmasters + 1
            end
            assert.are.equal(3, nmasters)
            for _, m in ipairs(masters()) do
                cl:cli(m.port, "CONFIG RESETSTAT")
            end
            r:set_multi(mapping)
            local vals = r:get_multi(keys)
            assert.are.equal(200, #vals)
            for i = 1, 200 do
                if i % 3 ~= 0 then
                    assert.are.same({ i = i }, vals[i])
                else
                    assert.are.equal(NO_VALUE, vals[i])
                end
            end
            -- each master saw exactly the GETs (and MGETs) of its own keys:
            -- no redirection
            for _, m in ipairs(masters()) do
                local stats = cl:cli(m.port, "INFO commandstats")
                assert.matches("cmdstat_get:calls=" .. per[m.port] .. ",", stats)
                if mgets[m.port] then
                    assert.matches("cmdstat_mget:calls=" .. mgets[m.port] .. ",", stats)
                else
                    assert.is_nil(stats:match("cmdstat_mget:"))
                end
            end
            r:delete_multi(keys)
            for i = 1, 200, 37 do
                assert.are.equal("0", ccli("EXISTS " .. q(keys[i])))
            end
            local got = r:get_or_create_multi({ keys[1], keys[2], keys[1] }, function(...)
                local out = {}
                for i, key in ipairs({ ... }) do
                    out[i] = "made " .. key
                end
                return out
            end)
            assert.are.same({ "made " .. keys[1], "made " .. keys[2], "made " .. keys[1] }, got)
            r:delete_multi({ keys[1], keys[2] })
        end)

        it("get_multi: the keys of one slot in one MGET, misses and repeats among them", function()
            local r = region()
            local tag = fresh("mget")
            local keys, mapping = {}, {}
            for i = 1, 50 do
                keys[i] = "{" .. tag .. "}." .. i
                if i % 5 ~= 0 then
                    mapping[keys[i]] = "v" .. i
                end
            end
            local other = fresh("single") -- almost surely a slot of its own
            mapping[other] = "alone"
            r:set_multi(mapping)
            local ask = {}
            for i = 1, 50 do
                ask[#ask + 1] = keys[i]
                if i == 10 then
                    ask[#ask + 1] = other
                    ask[#ask + 1] = keys[3] -- again
                end
            end
            local m = cl:master_of(keyslot(keys[1]))
            for _, mm in ipairs(masters()) do
                cl:cli(mm.port, "CONFIG RESETSTAT")
            end
            local vals = r:get_multi(ask)
            assert.are.equal(#ask, #vals)
            for j, key in ipairs(ask) do
                assert.are.equal(mapping[key] or NO_VALUE, vals[j], key)
            end
            -- the 51 tagged keys were one command on their master
            local stats = cl:cli(m.port, "INFO commandstats")
            assert.matches("cmdstat_mget:calls=1,", stats)
            if cl:master_of(keyslot(other)).port ~= m.port then
                assert.is_nil(stats:match("cmdstat_get:"))
            end
            r:delete_multi(ask)
            for i = 1, 50, 7 do
                assert.are.equal("0", ccli("EXISTS " .. q(keys[i])))
            end
        end)

        it("values far past the read buffer, and empty ones, through get and get_multi", function()
            local r = region()
            local k = fresh("big")
            local mapping, keys = {}, {}
            local sizes = { 0, 1, 16383, 16384, 70000, 1000000, 5, 300000 }
            for i, n in ipairs(sizes) do
                keys[i] = k .. ":" .. i
                mapping[keys[i]] = string.rep(string.char(65 + i), n)
            end
            -- a tagged pair: one MGET carrying a big value
            keys[#keys + 1] = "{" .. k .. "}.a"
            keys[#keys + 1] = "{" .. k .. "}.b"
            mapping[keys[#keys - 1]] = string.rep("t", 200000)
            mapping[keys[#keys]] = "small"
            r:set_multi(mapping)
            for _, key in ipairs(keys) do
                assert.are.equal(mapping[key], r:get(key), key)
            end
            local vals = r:get_multi(keys)
            for j, key in ipairs(keys) do
                assert.are.equal(#mapping[key], #vals[j], key)
                assert.are.equal(mapping[key], vals[j], key)
            end
            -- a get after the big ones still reads a small value right
            r:set(k, "after")
            assert.are.equal("after", r:get(k))
            r:delete_multi(keys)
            r:delete(k)
        end)

        it("redis_expiration_time makes Redis drop old entries itself", function()
            local r = region({ redis_expiration_time = 5 })
            local k = fresh("ttl")
            r:set(k, "x")
            local pttl = tonumber(ccli("PTTL " .. q(k)))
            assert.is_true(pttl > 4000 and pttl <= 5000, "PTTL " .. pttl)
            r:set_multi({ [k .. "m"] = "y" })
            pttl = tonumber(ccli("PTTL " .. q(k .. "m")))
            assert.is_true(pttl > 4000 and pttl <= 5000, "PTTL " .. pttl)
            r:delete_multi({ k, k .. "m" })
        end)
    end)

    describe("arguments", function()
        it("startup_nodes in three shapes, or a redis+cluster:// url", function()
            local k = fresh("args")
            local p1, p2 = cl.nodes[1].port, cl.nodes[2].port
            region({ startup_nodes = { { "127.0.0.1", p1 } } }):set(k, "a")
            assert.are.equal("a", region({ startup_nodes = { { host = "127.0.0.1", port = p2 } } }):get(k))
            assert.are.equal("a", region({ url = "redis+cluster://127.0.0.1:" .. p2 .. ",127.0.0.1:" .. p1 }):get(k))
            -- one reachable node among dead ones is enough
            assert.are.equal("a", region({ startup_nodes = { "127.0.0.1:1", "127.0.0.1:" .. p1 } }):get(k))
            region():delete(k)
        end)

        it("refuses the arguments that mean nothing in a cluster, saying which", function()
            local function conf(args)
                return select(2, pcall(region, args))
            end
            assert.matches("'db' is not an argument of a cluster: a cluster has database 0 only",
                           conf({ db = 1 }))
            assert.matches("'host' is not an argument of a cluster", conf({ host = "127.0.0.1" }))
            assert.matches("'port' is not an argument of a cluster", conf({ port = 1 }))
            assert.matches("'notify_channel' is not an argument of a cluster",
                           conf({ notify_channel = "x" }))
            assert.matches("unknown argument 'prot'", conf({ prot = 1 }))
            assert.matches("url .* a cluster has database 0 only",
                           conf({ url = "redis+cluster://127.0.0.1:1/3" }))
            assert.matches("must start with redis%+cluster://", conf({ url = "unix:///x" }))
            assert.matches("lock_timeout must be a positive, finite number",
                           conf({ lock_timeout = math.huge }))
            assert.matches("distributed_lock must be a boolean", conf({ distributed_lock = 1 }))
            assert.matches("startup_nodes%[1%] must be", conf({ startup_nodes = { "nope" } }))
            assert.matches("startup_nodes .* or url .* is required",
                           select(2, pcall(function()
                               return cache.make_region():configure("dogpile.cache.redis_cluster",
                                                                    { arguments = {} })
                           end)))
        end)
    end)

    describe("routing", function()
        it("hash tags: keys of one {tag} share a slot and a node; CRC16 agrees with CLUSTER KEYSLOT", function()
            local r = region()
            local tag = fresh("user")
            local keys = { "{" .. tag .. "}.a", "{" .. tag .. "}.b", "x{" .. tag .. "}y", "{}" .. tag,
                           "{" .. tag, tag .. "}{", "{{" .. tag .. "}}" }
            local mapping = {}
            for _, key in ipairs(keys) do
                mapping[key] = "v:" .. key
            end
            r:set_multi(mapping)
            for _, key in ipairs(keys) do
                -- the value is on the master CLUSTER KEYSLOT names, asked
                -- without following redirections
                assert.are.equal(server_keyslot(key), keyslot(key), key)
                local m = cl:master_of(keyslot(key))
                assert.are.equal("1", cl:cli(m.port, "EXISTS " .. q(key)), key)
                assert.are.same("v:" .. key, r:get(key))
            end
            assert.are.equal(keyslot(keys[1]), keyslot(keys[2]))
            assert.are.equal(keyslot(keys[1]), keyslot(keys[3]))
            r:delete_multi(keys)
        end)

        it("MOVED: a slot moved behind the client's back is followed, and the map learns it", function()
            local r = region()
            local k = fresh("{moved}")
            r:set(k, "before")
            local slot = keyslot(k)
            local src = cl:master_of(slot)
            local dst
            for _, m in ipairs(masters()) do
                if m.port ~= src.port then
                    dst = m
                    break
                end
            end
            -- migrate the slot by hand: IMPORTING, MIGRATING, MIGRATE, NODE
            assert.are.equal("OK", cl:cli(dst.port, "CLUSTER SETSLOT " .. slot .. " IMPORTING " .. src.id))
            assert.are.equal("OK", cl:cli(src.port, "CLUSTER SETSLOT " .. slot .. " MIGRATING " .. dst.id))
            assert.are.equal("OK", cl:cli(src.port, "MIGRATE 127.0.0.1 " .. dst.port .. " " .. q(k) .. " 0 5000"))
            for _, m in ipairs(masters()) do
                cl:cli(m.port, "CLUSTER SETSLOT " .. slot .. " NODE " .. dst.id)
            end
            cl:cli(dst.port, "CONFIG RESETSTAT")
            cl:cli(src.port, "CONFIG RESETSTAT")
            assert.are.equal("before", r:get(k)) -- MOVED from src, then dst
            r:set(k, "after")
            assert.are.equal("after", r:get(k))
            assert.are.equal("1", cl:cli(dst.port, "EXISTS " .. q(k)))
            -- src answered once (the MOVED); dst got the rest
            assert.matches("cmdstat_get:calls=0,.*rejected_calls=1,", cl:cli(src.port, "INFO commandstats"))
            assert.matches("cmdstat_get:calls=2,", cl:cli(dst.port, "INFO commandstats"))
            assert.is_nil(cl:cli(src.port, "INFO commandstats"):match("cmdstat_set:"))
            r:delete(k)
        end)

        it("ASK: a slot being migrated is followed with ASKING for one command", function()
            local r = region()
            local base = fresh("{ask}")
            local k1, k2, k3 = base .. ":1", base .. ":2", base .. ":3"
            r:set_multi({ [k1] = "one", [k2] = "two" })
            local slot = keyslot(k1)
            local src = cl:master_of(slot)
            local dst
            for _, m in ipairs(masters()) do
                if m.port ~= src.port then
                    dst = m
                    break
                end
            end
            assert.are.equal("OK", cl:cli(dst.port, "CLUSTER SETSLOT " .. slot .. " IMPORTING " .. src.id))
            assert.are.equal("OK", cl:cli(src.port, "CLUSTER SETSLOT " .. slot .. " MIGRATING " .. dst.id))
            -- k1 moves now, k2 stays for a while
            assert.are.equal("OK", cl:cli(src.port, "MIGRATE 127.0.0.1 " .. dst.port .. " " .. q(k1) .. " 0 5000"))
            cl:cli(dst.port, "CONFIG RESETSTAT")
            assert.are.equal("one", r:get(k1))   -- src: ASK -> ASKING + GET on dst
            assert.are.equal("two", r:get(k2))   -- still on src
            r:set(k3, "three")                   -- a new key of a migrating slot: ASK to dst
            assert.are.same({ "one", "two", "three" }, r:get_multi({ k1, k2, k3 }))
            local stats = cl:cli(dst.port, "INFO commandstats")
            assert.matches("cmdstat_asking:calls=", stats)
            -- the slot still belongs to src: no MOVED learnt from an ASK
            assert.are.equal("1", cl:cli(src.port, "EXISTS " .. q(k2)))
            -- finish the migration
            cl:cli(src.port, "MIGRATE 127.0.0.1 " .. dst.port .. " " .. q(k2) .. " 0 5000")
            for _, m in ipairs(masters()) do
                cl:cli(m.port, "CLUSTER SETSLOT " .. slot .. " NODE " .. dst.id)
            end
            assert.are.same({ "one", "two", "three" }, r:get_multi({ k1, k2, k3 }))
            -- k3 was written on dst (only k2 was migrated since)
            assert.are.equal("1", cl:cli(dst.port, "EXISTS " .. q(k3)))
            r:delete_multi({ k1, k2, k3 })
        end)
    end)

    describe("the lock", function()
        it("a lock wait whose SSUBSCRIBE gets no answer fails within one socket_timeout", function()
            -- As a node stopped between the SET NX that found the lock held
            -- and the SSUBSCRIBE: the call fails then, not after polling it
            -- for lock_timeout, each poll another socket_timeout.
            local port, stop = support.half_answering_redis({ "SSUBSCRIBE" })
            finally(stop)
            local r = region({ startup_nodes = { "127.0.0.1:" .. port }, socket_timeout = 0.4,
                               lock_timeout = 5 })
            local t0 = now()
            local ok, err = pcall(r.get_or_create, r, fresh("ssub"), function() return "made" end)
            local took = now() - t0
            assert.is_false(ok, "the call went on without the lock")
            assert.matches("dogpile.cache.redis_cluster", tostring(err), 1, true)
            assert.matches("SSUBSCRIBE (lock wait)", tostring(err), 1, true)
            assert.matches("socket_timeout", tostring(err), 1, true)
            assert.is_true(took >= 0.35 and took < 0.4 + 0.3, "took " .. took)
        end)

        it("the redis backend's key, token and PX on the lock key's node; refused while held", function()
            local r = region({ lock_timeout = 7 })
            local k = fresh("lock")
            local m1, m2 = r:_mutex(k), r:_mutex(k)
            assert.is_true(m1:acquire(false))
            assert.is_false(m2:acquire(false))
            local lk = "_lock" .. k
            local token = cl:cli(cl:master_of(keyslot(lk)).port, "GET " .. q(lk))
            assert.matches("^%x+$", token)
            assert.are.equal(32, #token)
            local pttl = tonumber(ccli("PTTL " .. q(lk)))
            assert.is_true(pttl > 6000 and pttl <= 7000, "PTTL " .. pttl)
            local other = script("try", [[io.write(tostring(r:_mutex(arg[2]):acquire(false)))]])
            assert.are.equal("false", sh(string.format("luajit %s %q %s", other, args_text(), q(k))))
            m1:release()
            assert.are.equal("", ccli("GET " .. q(lk)))
            assert.is_true(m2:acquire(false))
            m2:release()
        end)

        it("8 processes on one missing key run the creator once, woken by the release", function()
            local k = fresh("stampede")
            local prefix = TMP .. "/stampede"
            local child = script("stampede", [[
start_together(arg[3])
local v = r:get_or_create(arg[2], function()
    append(arg[3] .. ".created", "1")
    sleep(0.5)
    return "made once"
end)
append(arg[3] .. ".got", v)
]])
            local cmds = {}
            for i = 1, 8 do
                cmds[i] = string.format("luajit %s %q %s %s", child, args_text(), q(k), q(prefix))
            end
            local t0 = now()
            together.run(cmds, prefix, 60)
            local took = now() - t0
            assert.are.equal(1, #lines(prefix .. ".created"))
            local got = lines(prefix .. ".got")
            assert.are.equal(8, #got)
            for _, v in ipairs(got) do
                assert.are.equal("made once", v)
            end
            assert.is_true(took < 10, "took " .. took)
            region():delete(k)
        end)
    end)

    -- A load of `n` processes for `seconds`: each writes its own keys (the
    -- value names the key and a sequence number) and reads them back, and
    -- reads get_or_create keys shared by all (the value names the key).
    -- Each line of <prefix>.log: "ok <t>", "err <t> <msg>" or "wrong <t> <what>".
    local LOAD = [[
start_together(arg[3])
local me, prefix, seconds = arg[2], arg[3], tonumber(arg[4])
local log = assert(io.open(prefix .. "." .. me .. ".log", "w"))
local t_end = now() + seconds
local seq, n = 0, 0
-- <prefix>.stop: the test has seen what it needed under load (the reshard
-- ended): stop before `seconds`.
local function stopped()
    local f = n % 32 == 0 and io.open(prefix .. ".stop")
    if f then
        f:close()
    end
    return f
end
while now() < t_end and not stopped() do
    n = n + 1
    local key = "load:" .. me .. ":" .. (n % 50)
    local shared = "load:shared:" .. (n % 20)
    local ok, err = pcall(function()
        seq = seq + 1
        r:set(key, key .. "#" .. seq)
        local v = r:get(key)
        if v ~= cache.NO_VALUE and not (type(v) == "string" and v:sub(1, #key + 1) == key .. "#") then
            log:write("wrong ", now(), " ", tostring(v), " for ", key, "\n")
        end
        local s = r:get_or_create(shared, function() return "made:" .. shared end)
        if s ~= "made:" .. shared then
            log:write("wrong ", now(), " ", tostring(s), " for ", shared, "\n")
        end
        local keys = {}
        for i = 0, 9 do keys[#keys + 1] = "load:" .. me .. ":" .. i end
        local vs = r:get_multi(keys)
        for i, v in ipairs(vs) do
            if v ~= cache.NO_VALUE and v:sub(1, #keys[i] + 1) ~= keys[i] .. "#" then
                log:write("wrong ", now(), " ", tostring(v), " for ", keys[i], "\n")
            end
        end
    end)
    if ok then
        log:write("ok ", now(), "\n")
    else
        log:write("err ", now(), " ", tostring(err):gsub("\n", " "), "\n")
        sleep(0.01)
    end
    log:flush()
end
log:close()
]]

    local function run_load(name, n, seconds, before_go)
        local prefix = TMP .. "/" .. name
        local child = script(name, LOAD)
        local cmds = {}
        for i = 1, n do
            cmds[i] = string.format("luajit %s %q p%d %s %g", child, args_text(), i, q(prefix), seconds)
        end
        together.run(cmds, prefix, 90, before_go)
        local oks, errs, wrong, last_ok = 0, {}, {}, {}
        for i = 1, n do
            for _, l in ipairs(lines(prefix .. ".p" .. i .. ".log")) do
                local kind, t, rest = l:match("^(%a+) (%S+) ?(.*)$")
                if kind == "ok" then
                    oks = oks + 1
                    last_ok[i] = tonumber(t)
                elseif kind == "err" then
                    errs[#errs + 1] = { t = tonumber(t), msg = rest }
                elseif kind == "wrong" then
                    wrong[#wrong + 1] = l
                end
            end
        end
        return { oks = oks, errs = errs, wrong = wrong, last_ok = last_ok }
    end

    -- Wait (bounded) for a background job's file to hold something.
    local function wait_file(path, timeout)
        local t0 = now()
        while (read(path) or "") == "" and now() - t0 < timeout do
            sleep(0.05)
        end
        return read(path)
    end

    describe("under load", function()
        it("a reshard with redis-cli --cluster reshard: no error, no wrong value", function()
            local ms = masters()
            local from, to = ms[1], ms[2]
            local out = TMP .. "/reshard.out"
            local res = run_load("reshard", 4, 6, function()
                -- starts with the load, in the background; the load goes on
                -- for half a second after it (at most 6 s in all)
                sh(string.format("( sleep 0.5; redis-cli --cluster reshard 127.0.0.1:%d --cluster-from %s "
                                 .. "--cluster-to %s --cluster-slots 1500 --cluster-yes > %s 2>&1; "
                                 .. "echo END >> %s; sleep 0.5; touch %s ) >/dev/null 2>&1 &",
                                 from.port, from.id, to.id, q(out), q(out),
                                 q(TMP .. "/reshard.stop")))
            end)
            local t0 = now()
            while not (read(out) or ""):match("END") and now() - t0 < 30 do
                sleep(0.05)
            end
            local text = read(out) or ""
            assert.matches("Moving slot", text)
            assert.matches("END", text)
            cl:wait_ok(20)
            assert.are.same({}, res.wrong)
            assert.are.equal(0, #res.errs, res.errs[1] and res.errs[1].msg)
            assert.is_true(res.oks > 100, "only " .. res.oks .. " operations")
            -- the slots moved
            local moved = 0
            for _, m in ipairs(masters()) do
                if m.id == to.id then
                    for a, b in m.slots:gmatch("(%d+)%-?(%d*)") do
                        moved = moved + (tonumber(b ~= "" and b or a) - tonumber(a) + 1)
                    end
                end
            end
            assert.is_true(moved > 5461 + 1000, "slots of the target: " .. moved)
        end)

        it("a master SIGKILLed under load: 0 wrong values, every process succeeds again within 5 s of the promotion; its lock expires by lock_timeout on the promoted replica", function()
            local victim = masters()[1]
            local replica
            for _, t in ipairs(cl:topology()) do
                if not t.master and t.master_id == victim.id then
                    replica = t
                end
            end
            assert.is_not_nil(replica, "the victim has a replica")
            local pid
            for _, n in ipairs(cl.nodes) do
                if n.port == victim.port then
                    pid = n.pid
                end
            end
            -- a lock on the victim, replicated
            local r = region({ lock_timeout = 3 })
            local lkey = key_on(victim.port, fresh("lockfail"), "_lock") -- the lock key on the victim
            local m = r:_mutex(lkey)
            assert.is_true(m:acquire(false))
            local locked_at = now()
            cl:cli(victim.port, "WAIT 1 2000")
            local killed, promoted = TMP .. "/killed", TMP .. "/promoted"
            local res = run_load("failover", 4, 9, function()
                sh(string.format("( sleep 2; kill -9 %s; date +%%s.%%N > %s; for i in $(seq 1 1000); do "
                                 .. "redis-cli -p %d ROLE 2>/dev/null | head -1 | grep -q master && "
                                 .. "{ date +%%s.%%N > %s; break; }; sleep 0.01; done ) >/dev/null 2>&1 &",
                                 pid, q(killed), replica.port, q(promoted)))
            end)
            for _, n in ipairs(cl.nodes) do
                if n.port == victim.port then
                    n.pid = nil -- killed above
                end
            end
            local t_kill = tonumber(wait_file(killed, 10))
            local t_prom = tonumber(wait_file(promoted, 20))
            assert.is_not_nil(t_kill, "killed")
            assert.is_not_nil(t_prom, "the replica was promoted")
            local last_err = -math.huge
            for _, e in ipairs(res.errs) do
                last_err = math.max(last_err, e.t)
            end
            io.stderr:write(string.format("# failover: promoted %.2f s after the kill; %d operations, "
                                          .. "%d errors, the last %.2f s after the promotion\n",
                                          t_prom - t_kill, res.oks, #res.errs, last_err - t_prom))
            assert.are.same({}, res.wrong)
            for _, e in ipairs(res.errs) do
                assert.is_true(e.t < t_prom + 5, string.format("an error %.2f s after the promotion: %s",
                                                                e.t - t_prom, e.msg))
            end
            for i = 1, 4 do
                assert.is_true((res.last_ok[i] or 0) > t_prom, "process " .. i .. " succeeded after the promotion")
            end
            -- the lock: the promoted replica expires it on the master's schedule
            local lk = "_lock" .. lkey
            local pttl = tonumber(cl:cli(replica.port, "PTTL " .. q(lk)))
            assert.is_true(pttl <= math.max(0, 3000 - (now() - locked_at) * 1000) + 50,
                           "PTTL " .. tostring(pttl))
            while now() < locked_at + 3.05 do
                sleep(0.05)
            end
            assert.are.equal("0", cl:cli(replica.port, "EXISTS " .. q(lk)))
            m:release() -- expired: reported as an overrun, not an error
            cl:wait_ok(20)
        end)

        it("one node down: a multi call fails only for that node's keys (the backend's report)", function()
            local r = region()
            local k = fresh("down")
            local keys, mapping = {}, {}
            for i = 1, 60 do
                keys[i] = k .. ":" .. i
                mapping[keys[i]] = "v" .. i
            end
            r:set_multi(mapping)
            -- a master with no replica left would lose its slots for good:
            -- kill one that still has a replica? Every one will do here, this
            -- is the last test.
            local victim = masters()[1]
            local on_victim = {}
            local topo = cl:topology()
            for i = 1, 60 do
                on_victim[i] = owner(topo, keyslot(keys[i])).port == victim.port
            end
            cl:kill(victim.port)
            local b = r.backend
            local n = #keys
            local ks, kl = ffi.new("const char *[?]", n), ffi.new("size_t[?]", n)
            for i = 1, n do
                ks[i - 1], kl[i - 1] = keys[i], #keys[i]
            end
            local vl = ffi.new("int64_t[?]", n)
            local bytes = ffi.gc(ffi.new("dp_bytes"), LC.dp_bytes_free)
            local err = ffi.new("dp_err")
            local rc = LC.dp_backend_get_multi(b.handle, n, ks, kl, bytes, vl, err)
            assert.are.equal(14, rc) -- DP_EPARTIAL: the others were read
            assert.matches("of 60 keys failed", ffi.string(err.msg))
            local nvictim = 0
            for i = 1, n do
                if on_victim[i] then
                    nvictim = nvictim + 1
                    assert.are.equal(-2, tonumber(vl[i - 1]), keys[i]) -- DP_VLEN_FAILED
                else
                    assert.is_true(tonumber(vl[i - 1]) > 0, keys[i])
                    -- and the single form works for the others
                    assert.are.equal("v" .. i, r:get(keys[i]))
                end
            end
            assert.is_true(nvictim > 0 and nvictim < 60)
            -- the region: without fail_open the call raises, naming the node
            assert.has_error(function() r:get_multi(keys) end)
        end)
    end)
end)

-- A cluster without replicas: a master that stops (SIGSTOP: a hung server,
-- every request waits socket_timeout) is never failed over, so its keys
-- stay down for as long as the test needs, while the other masters serve
-- theirs (cluster-require-full-coverage no).
describe("dogpile.cache.redis_cluster with one master stopped", function()
    support.no_leaks()
    local c0, victim, pid, topo0
    local context = require "dogpile.context"
    local region_mod = require "dogpile.cache.region"
    local SOCKET = 0.3

    local function region0(conf)
        conf = conf or {}
        conf.arguments = { startup_nodes = c0:startup_nodes(), socket_timeout = SOCKET,
                           connect_timeout = SOCKET, lock_timeout = 2,
                           circuit_cooldown = conf.cooldown or 1 }
        conf.cooldown = nil
        return cache.make_region():configure("dogpile.cache.redis_cluster", conf)
    end

    -- keys[i] and whether its slot is the victim's
    local function keyset(prefix, n)
        local topo = topo0 -- read while every node answers (a stopped one is marked failed soon)
        local keys, on = {}, {}
        for i = 1, n do
            keys[i] = prefix .. ":" .. i
            on[i] = owner(topo, keyslot(keys[i])).port == victim
        end
        return keys, on
    end

    local function logs()
        local lines = {}
        for name in pairs(region_mod._log_limits) do
            region_mod._log_limits[name] = nil
        end
        context.set_logger(function(l) lines[#lines + 1] = l end)
        return lines
    end

    setup(function()
        c0 = CL.start({ masters = 3, replicas = 0, node_timeout = 1000 })
        victim = c0.nodes[1].port
        pid = c0.nodes[1].pid
        topo0 = c0:topology(c0.nodes[2].port)
    end)

    teardown(function()
        context.set_logger(nil)
        if c0 then
            stop_cluster(c0)
        end
    end)

    before_each(function()
        sh("kill -STOP " .. pid)
    end)

    after_each(function()
        sh("kill -CONT " .. pid)
        context.set_logger(nil)
    end)

    -- keys on every master, stored while all answer; then the victim stopped
    local function stored(prefix)
        local keys, on = keyset(fresh(prefix), 60)
        local nv = 0
        for i = 1, 60 do
            nv = nv + (on[i] and 1 or 0)
        end
        assert.is_true(nv > 0 and nv < 60)
        sh("kill -CONT " .. pid)
        local r = region0()
        local mapping = {}
        for i = 1, 60 do
            mapping[keys[i]] = "v" .. i
        end
        r:set_multi(mapping)
        sh("kill -STOP " .. pid)
        return r, keys, on, nv
    end

    it("get_multi raises naming the node and counting its keys; set_multi and delete_multi do the live nodes' keys, then raise naming the node", function()
        local r, keys, on, nv = stored("part")
        local node = "127.0.0.1:" .. victim
        local ok, err = pcall(r.get_multi, r, keys)
        assert.is_false(ok)
        assert.matches(node, err, 1, true)
        assert.matches("(" .. nv .. " of 60 keys failed", err, 1, true)
        -- set_multi stores on the live nodes and raises naming the node
        local mapping = {}
        for i = 1, 60 do
            mapping[keys[i]] = "w" .. i
        end
        ok, err = pcall(r.set_multi, r, mapping)
        assert.is_false(ok)
        assert.matches(node, err, 1, true)
        assert.matches("(" .. nv .. " of 60 keys failed", err, 1, true)
        for i = 1, 60 do
            if not on[i] then
                assert.are.equal("w" .. i, r:get(keys[i]))
            end
        end
        -- under fail_open: logged, no error
        local ro = region0({ fail_open = true })
        local lines = logs()
        ro:set_multi(mapping)
        assert.matches(node, lines[1] or "", 1, true)
        -- delete_multi deletes on the live nodes, raises naming the node
        ok, err = pcall(r.delete_multi, r, keys)
        assert.is_false(ok)
        assert.matches(node, err, 1, true)
        for i = 1, 60 do
            if not on[i] then
                assert.are.equal(NO_VALUE, r:get(keys[i]))
            end
        end
        -- back: every key answers again (the stopped node kept its values)
        sh("kill -CONT " .. pid)
        sleep(1.05) -- the node's circuit_cooldown
        local got = r:get_multi(keys)
        for i = 1, 60 do
            assert.are.equal(on[i] and "v" .. i or NO_VALUE, got[i], keys[i])
        end
    end)

    it("a circuit breaker per node: the stopped node's keys are refused at once, the others' go on", function()
        local keys, on = keyset(fresh("brk"), 30)
        local down, up
        for i = 1, 30 do
            if on[i] then down = down or keys[i] else up = up or keys[i] end
        end
        local r = region0({ fail_open = true })
        logs()
        -- the first call waits socket_timeout, and that slow failure opens
        -- the node's breaker at once
        local t0 = now()
        assert.are.equal(NO_VALUE, r:get(down))
        assert.is_true(now() - t0 >= SOCKET * 0.9, "the first call waited")
        -- then 50 calls on its keys cost less than one timeout in all
        t0 = now()
        for _ = 1, 50 do
            assert.are.equal(NO_VALUE, r:get(down))
        end
        local refused_time = now() - t0
        assert.is_true(refused_time < SOCKET, string.format("50 refused calls took %.3f s", refused_time))
        -- while the other nodes' keys still work
        r:set(up, "up")
        assert.are.equal("up", r:get(up))
        t0 = now()
        r:get_multi(keys)
        assert.is_true(now() - t0 < SOCKET, "a multi call does not wait for the stopped node")
        local st = r:stats()
        assert.are.equal("open", st.circuit_state)
        assert.are.equal(1, st.circuit_opened)
        assert.is_true(st.circuit_refused >= 50, "refused " .. tostring(st.circuit_refused))
        -- resumed: after the cool-down one call probes and closes it
        sh("kill -CONT " .. pid)
        sleep(1.05)
        r:set(down, "back")
        assert.are.equal("back", r:get(down))
        assert.are.equal("closed", r:stats().circuit_state)
    end)
    it("under fail_open: get_multi serves the live nodes' keys, the stopped node's are misses counted as errors; get_or_create_multi creates those alone", function()
        local _, keys, on, nv = stored("fo")
        local node = "127.0.0.1:" .. victim
        local ro = region0({ fail_open = true })
        local lines = logs()
        local e0 = ro:stats().errors
        for _, ignore in ipairs({ false, true }) do -- read in place, and through fetch_multi
            local got = ro:get_multi(keys, nil, ignore)
            for i = 1, 60 do
                if on[i] then
                    assert.are.equal(NO_VALUE, got[i], keys[i])
                else
                    assert.are.equal("v" .. i, got[i], keys[i])
                end
            end
        end
        assert.are.equal(e0 + 2 * nv, ro:stats().errors)
        assert.matches(node, lines[1] or "", 1, true)
        local asked = {}
        local vals = ro:get_or_create_multi(keys, function(...)
            local out = {}
            for j, k in ipairs({ ... }) do
                asked[#asked + 1] = k
                out[j] = "c:" .. k
            end
            return out
        end)
        assert.are.equal(nv, #asked)
        for i = 1, 60 do
            assert.are.equal(on[i] and "c:" .. keys[i] or "v" .. i, vals[i])
        end
    end)
end)
