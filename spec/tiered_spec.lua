-- dogpile.cache.tiered: configuration, reads down and promotion, writes
-- through, the lock, invalidation, stats and failures in one Lua state; then
-- coherence between real processes and threads on a redis-server of its own
-- (3 LuaJIT processes on memory -> redis, one process of 4 threads on
-- memory -> shared_memory -> redis, 4 threads on memory -> shared_memory with
-- no server): random operations checked for stale reads after 100 ms, a
-- stampede from all of them, hard and soft invalidation, a redis restart.
local cache = require "dogpile.cache"
local support = require "support"
local ffi = require "ffi"
local now, sleep, sh, write, read, count_lines = support.now, support.sleep, support.sh,
    support.write, support.read, support.count_lines

local NO_VALUE = cache.NO_VALUE
-- The region code maps "dogpile.cache.tiered" to its module once it
-- registers it; until then the spec does.
pcall(cache.register_backend, "dogpile.cache.tiered", "dogpile.cache.backends.tiered")

local TMP = (sh("mktemp -d /tmp/dogpile-tiered-XXXXXX"):gsub("%s+$", ""))
local SRC = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]+$") or "spec"
local FIX = SRC .. "/fixtures/tiered"

local T = dofile(FIX .. "/common.lua")
T.TMP = TMP
local servers, start_redis, stop_redis = T.servers, T.start_redis, T.stop_redis
local load_ops, check, check_max_age_in_nginx = T.load_ops, T.check, T.check_max_age_in_nginx

local REDIS
local function redis_port()
    if not REDIS then
        REDIS = start_redis()
    end
    return REDIS.port
end

-- -- Regions ----------------------------------------------------------------------

local uniq = 0
local function fresh(prefix)
    uniq = uniq + 1
    return string.format("%s:%d:%d", prefix, math.random(1e9), uniq)
end

local function tiered(tiers, conf, extra)
    conf = conf or {}
    local args = { tiers = tiers }
    for k, v in pairs(extra or {}) do
        args[k] = v
    end
    conf.arguments = args
    return cache.make_region(conf.make):configure("dogpile.cache.tiered", {
        expiration_time = conf.expiration_time, arguments = args, fail_open = conf.fail_open })
end

local function ms(name, l1_args, max_age)
    return { { backend = "dogpile.cache.memory", arguments = l1_args, max_age = max_age },
             { backend = "dogpile.cache.shared_memory", arguments = { name = name } } }
end

local function mr(extra)
    local args = { port = redis_port(), socket_timeout = 0.5, connect_timeout = 0.5 }
    for k, v in pairs(extra or {}) do
        args[k] = v
    end
    return { { backend = "dogpile.cache.memory" }, { backend = "dogpile.cache.redis", arguments = args } }
end


local THREADS_BIN
local function threads_bin()
    if not THREADS_BIN then
        THREADS_BIN = TMP .. "/threads"
        -- (The compiler runs without the sanitizer runtime the ASan variant
        -- preloads into busted; the harness runs with it, as nginx does.)
        local out = sh("env -u LD_PRELOAD cc -O1 -o " .. THREADS_BIN .. " " .. FIX .. "/threads.c "
                       .. "$(pkg-config --cflags --libs luajit) -pthread")
        assert(read(THREADS_BIN) ~= nil, "cannot build the threads harness: " .. out)
    end
    return THREADS_BIN
end

-- Start the participants (each an array: "luajit" or "threads N"), with the
-- worker's arguments after MODE LAYOUT PORT OUT START; wait for all; return
-- their output files (a threaded one expands to one file per thread).
local function run_all(mode, parts, rest, start)
    local cmd, files = {}, {}
    for i, p in ipairs(parts) do
        local out = string.format("%s/%s-%d-%d", TMP, mode, uniq, i)
        local runner = p.threads and (threads_bin() .. " " .. p.threads) or "luajit"
        cmd[#cmd + 1] = string.format("%s %s/worker.lua %s %s %d %s %.3f %s > %s.err 2>&1 &",
                                      runner, FIX, mode, p.layout, p.port or 0, out, start,
                                      rest, out)
        if p.threads then
            for t = 1, p.threads do
                files[#files + 1] = out .. "." .. t
            end
        else
            files[#files + 1] = out
        end
        files.err = files.err or {}
        files.err[#files.err + 1] = out .. ".err"
    end
    sh(table.concat(cmd, " ") .. " wait")
    for _, e in ipairs(files.err) do
        local text = read(e) or ""
        assert.are.equal("", text, "a participant failed: " .. text)
    end
    return files
end


describe("dogpile.cache.tiered", function()
    support.no_leaks()

    teardown(function()
        for _, srv in ipairs(servers) do
            stop_redis(srv)
        end
        os.execute("rm -rf " .. TMP)
    end)

    describe("configure", function()
        it("takes two to four tiers, each {backend, arguments, max_age}", function()
            support.raises_here("dogpile.cache.tiered: arguments.tiers must hold 2 to 4", function() tiered({ { backend = "dogpile.cache.memory" } }) end)
            support.raises_here("dogpile.cache.tiered: tier 2: unknown field 'size'", function() tiered({ { backend = "dogpile.cache.memory" }, { backend = "dogpile.cache.memory", size = 1 } }) end)
            support.raises_here("dogpile.cache.tiered: tier 1: max_age must be a positive", function() tiered({ { backend = "dogpile.cache.memory", max_age = -1 }, { backend = "dogpile.cache.memory" } }) end)
            support.raises_here("dogpile.cache.tiered: unknown argument 'tier'", function() cache.make_region():configure("dogpile.cache.tiered", { arguments = { tier = {} } }) end)
        end)

        it("refuses a bottom without notification unless every tier above has a max_age",
           function()
            local port = 1 -- never connected: the refusal comes first
            support.raises_here("dogpile.cache.tiered: tier 2 (dogpile.cache.memcached) tells nobody", function() tiered({ { backend = "dogpile.cache.memory" }, { backend = "dogpile.cache.memcached", arguments = { url = "127.0.0.1:" .. port } } }) end)
        end)

        it("an lmdb bottom needs no max_age: its host feed, made with the files' mode, "
           .. "tells every process", function()
            local dir = TMP .. "/" .. fresh("lmdb-conf"):gsub(":", "-")
            local function lm()
                return { { backend = "dogpile.cache.memory" },
                         { backend = "dogpile.cache.lmdb", arguments = { path = dir, mode = "0640" } } }
            end
            local r = tiered(lm(), { expiration_time = 60 })
            assert.are.equal("640", sh("stat -c %a " .. dir .. "/dogpile-feed"):match("%d+"))
            r:set("k", "mine")
            assert.are.equal("mine", r:get("k"))
            local f = TMP .. "/lmdb-set.lua"
            write(f, [[
local cache = require "dogpile.cache"
pcall(cache.register_backend, "dogpile.cache.tiered", "dogpile.cache.backends.tiered")
local r = cache.make_region():configure("dogpile.cache.tiered", { arguments = { tiers = {
    { backend = "dogpile.cache.memory" },
    { backend = "dogpile.cache.lmdb", arguments = { path = arg[1] } } } } })
if arg[3] == "delete" then r:delete(arg[2]) else r:set(arg[2], arg[3]) end
]])
            sh(string.format("luajit %s '%s' k theirs", f, dir))
            -- Nothing to wait for: the other process pushed before it exited.
            assert.are.equal("theirs", r:get("k"))
            sh(string.format("luajit %s '%s' k delete", f, dir))
            assert.are.equal(NO_VALUE, r:get("k"))
        end)

        it("works from a load_regions config file", function()
            local path = TMP .. "/regions.lua"
            write(path, [[
return {
    layered = {
        backend = "dogpile.cache.tiered",
        expiration_time = 60,
        arguments = { tiers = {
            { backend = "dogpile.cache.memory", arguments = { max_items = 100 } },
            { backend = "dogpile.cache.shared_memory", arguments = { name = "tiered-conf" } },
        } },
    },
}]])
            local r = cache.load_regions(path).layered
            r:set("a", { 1, 2 })
            assert.are.same({ 1, 2 }, r:get("a"))
        end)
    end)

    describe("in one Lua state (memory -> shared_memory)", function()
        it("reads down and promotes with the original created time", function()
            local name = fresh("promote")
            local a = tiered(ms(name), { expiration_time = 60 })
            local b = tiered(ms(name), { expiration_time = 60 })
            a:set("k", "v")
            local ct = a:get_value_metadata("k").metadata.ct
            sleep(0.01)
            assert.are.equal("v", b:get("k"))
            assert.are.same({ 0, 1 }, b.actual_backend:tier_hits(0))
            local l1 = b.actual_backend.tiers[1].backend._cache
            assert.are.equal(ct, l1.k.metadata.ct)
            assert.are.equal(ct, b:get_value_metadata("k").metadata.ct)
        end)

        it("keeps a value's own expiration time and its creator's duration in every tier",
           function()
            local name = fresh("ttl")
            local a = tiered(ms(name), { expiration_time = 60 })
            local b = tiered(ms(name), { expiration_time = 60 })
            a:set("k", "v", 5)
            assert.are.equal(5, b:get_value_metadata("k").metadata.ttl)
            assert.are.equal("w", a:get_or_create("c", function() return "w", 7 end))
            local md = b:get_value_metadata("c").metadata
            assert.are.equal(7, md.ttl)
            -- The shared tier holds format 2 bytes that a plain region reads.
            local plain = cache.make_region():configure("dogpile.cache.shared_memory",
                                                       { arguments = { name = name } })
            assert.are.equal(7, plain:get_value_metadata("c").metadata.ttl)
        end)

        it("set, delete, set_multi, delete_multi in one region are seen by another at once",
           function()
            local name = fresh("coherent")
            local a = tiered(ms(name), { expiration_time = 60 })
            local b = tiered(ms(name), { expiration_time = 60 })
            a:set("k", 1)
            assert.are.equal(1, b:get("k"))
            a:set("k", 2)
            assert.are.equal(2, b:get("k"))
            b:delete("k")
            assert.are.equal(NO_VALUE, a:get("k"))
            a:set_multi({ x = "x1", y = "y1" })
            assert.are.same({ "x1", "y1" }, b:get_multi({ "x", "y" }))
            b:set_multi({ x = "x2", y = "y2" })
            assert.are.same({ "x2", "y2" }, a:get_multi({ "x", "y" }))
            a:delete_multi({ "x", "y" })
            assert.are.same({ NO_VALUE, NO_VALUE }, b:get_multi({ "x", "y" }))
        end)

        it("get_or_create_multi and the decorators go through the tiers", function()
            local name = fresh("multi")
            local a = tiered(ms(name), { expiration_time = 60 })
            local b = tiered(ms(name), { expiration_time = 60 })
            local calls = 0
            local vals = a:get_or_create_multi({ "p", "q", "p" }, function(...)
                calls = calls + 1
                local out = {}
                for i, k in ipairs({ ... }) do
                    out[i] = k .. "!"
                end
                return out
            end)
            assert.are.same({ "p!", "q!", "p!" }, vals)
            assert.are.equal(1, calls)
            assert.are.same({ "p!", "q!" }, b:get_multi({ "p", "q" }))
            local n = 0
            local f = b:cache_on_arguments({ namespace = "sq" })(function(x)
                n = n + 1
                return x * x
            end)
            assert.are.equal(9, f(3))
            assert.are.equal(9, f(3))
            assert.are.equal(1, n)
            f:invalidate(3)
            assert.are.equal(9, f(3))
            assert.are.equal(2, n)
        end)

        it("hard and soft invalidation in one region reach the other", function()
            local name = fresh("inv")
            local a = tiered(ms(name), { expiration_time = 60, make = { name = "r" } })
            local b = tiered(ms(name), { expiration_time = 60, make = { name = "r" } })
            a:set("k", "old")
            assert.are.equal("old", b:get("k"))
            sleep(0.002)
            a:invalidate(true)
            assert.are.equal(NO_VALUE, b:get("k"))
            assert.is_true(b.region_invalidator:was_hard_invalidated())
            b:set("k", "new")
            sleep(0.002)
            b:invalidate(false)
            assert.is_true(a.region_invalidator:was_soft_invalidated())
            local calls = 0
            assert.are.equal("regen", a:get_or_create("k", function()
                calls = calls + 1
                return "regen"
            end))
            assert.are.equal(1, calls)
            assert.are.equal("regen", b:get("k"))
        end)

        it("a max_age on the memory tier bounds how long its copy is served", function()
            local name = fresh("maxage")
            local a = tiered(ms(name, nil, 0.2), { expiration_time = 60 })
            a:set("k", "v")
            -- Changed behind the tiers' back: only max_age can bring it back.
            local shm = a.actual_backend.tiers[2]
            shm:put("k", cache.CachedValue.new("changed", { ct = now(), v = cache.VALUE_VERSION }), 0)
            assert.are.equal("v", a:get("k"))
            sleep(0.25)
            assert.are.equal("changed", a:get("k"))
            -- The region's direct read of such a tier 1 judges the copy's
            -- age on each hit: a loop of hits compiles without an abort.
            -- (The handler runs inside the trace compiler: no global look-up,
            -- which busted's environment resolves through a metamethod.)
            local aborts = {}
            local funcinfo, traceerr = require("jit.util").funcinfo, require("jit.vmdef").traceerr
            local format, flush, start, attach = string.format, jit.flush, jit.opt.start, jit.attach
            local function on_trace(what, _, func, pc, code, info)
                if what == "abort" then
                    aborts[#aborts + 1] = funcinfo(func, pc).loc .. ": " .. format(traceerr[code], info)
                end
            end
            -- As spec/jit_spec.lua does: no trace, and every hot counter
            -- reset, so that the loop (not a function it calls) roots it.
            flush()
            start("hotloop=56")
            attach(on_trace, "trace")
            local hits = 0
            for _ = 1, 20000 do
                if a:get("k") == "changed" then
                    hits = hits + 1
                end
            end
            attach(on_trace)
            assert.are.equal(20000, hits)
            assert.are.same({}, aborts)
            assert.is_true(a:stats().tier_hits[1] >= 20000)
        end)

        it("over a bottom without notification, another region's invalidation is seen once "
           .. "max_age has passed", function()
            -- A Lua backend: nothing announces its changes. The two regions
            -- give it different arguments, so they share no change feed
            -- either: only the reload every max_age can tell b.
            local store = {}
            local Shared = {}
            Shared.__index = Shared
            function Shared:get(k)
                local v = store[k]
                if v == nil then
                    return NO_VALUE
                end
                return v
            end
            function Shared:set(k, v) store[k] = v end
            function Shared:delete(k) store[k] = nil end
            pcall(cache.register_backend, "spec.tiered_lua_bottom",
                  function() return setmetatable({}, Shared) end)
            local function layout(tag)
                return { { backend = "dogpile.cache.memory", max_age = 0.2 },
                         { backend = "spec.tiered_lua_bottom", arguments = { tag = tag } } }
            end
            local a = tiered(layout("a"), { expiration_time = 60 })
            local b = tiered(layout("b"), { expiration_time = 60 })
            a:set("k", "v")
            assert.are.equal("v", b:get("k"))
            a:invalidate(true)
            assert.are.equal("v", b:get("k")) -- within max_age: b's copy, b's knowledge
            sleep(0.25)
            assert.are.equal(NO_VALUE, b:get("k"))
            assert.is_true(b.region_invalidator:was_hard_invalidated())
        end)

        it("the lock is the most shared tier's: one creator across Lua states", function()
            local name = fresh("lock")
            local a = tiered(ms(name), { expiration_time = 60 })
            local m = a.actual_backend:get_mutex("k")
            assert.is_not_nil(m)
            assert.is_true(m:acquire(false))
            local b = tiered(ms(name), { expiration_time = 60 })
            local m2 = b.actual_backend:get_mutex("k")
            assert.is_false(m2:acquire(false))
            m:release()
            assert.is_true(m2:acquire(false))
            m2:release()
        end)
    end)

    describe("memory -> redis", function()
        it("a change in another process reaches this one's memory tier", function()
            local k = fresh("proc")
            local r = tiered(mr(), { expiration_time = 60 })
            r:set(k, "mine")
            assert.are.equal("mine", r:get(k))
            local t0 = now()
            local f = TMP .. "/set.lua"
            write(f, [[
local cache = require "dogpile.cache"
pcall(cache.register_backend, "dogpile.cache.tiered", "dogpile.cache.backends.tiered")
local r = cache.make_region():configure("dogpile.cache.tiered", { arguments = { tiers = {
    { backend = "dogpile.cache.memory" },
    { backend = "dogpile.cache.redis", arguments = { port = tonumber(arg[1]), socket_timeout = 0.5,
      connect_timeout = 0.5 } } } } })
if arg[3] == "delete" then r:delete(arg[2]) else r:set(arg[2], arg[3]) end
]])
            sh(string.format("luajit %s %d '%s' theirs", f, redis_port(), k))
            local seen
            while now() - t0 < 2 do
                seen = r:get(k)
                if seen == "theirs" then
                    break
                end
                sleep(0.001)
            end
            assert.are.equal("theirs", seen)
            sh(string.format("luajit %s %d '%s' delete", f, redis_port(), k))
            sleep(0.1)
            assert.are.equal(NO_VALUE, r:get(k))
        end)

        it("without fail_open a failing bottom names the tier, its backend, the operation "
           .. "and the key; with it, the memory tier is still served", function()
            local srv = start_redis()
            local tiers = { { backend = "dogpile.cache.memory" },
                            { backend = "dogpile.cache.redis", arguments = { port = srv.port,
                              socket_timeout = 0.3, connect_timeout = 0.3 } } }
            local strict = tiered(tiers, { expiration_time = 60 })
            local open = tiered(tiers, { expiration_time = 60, fail_open = true })
            open:set("held", "v")
            stop_redis(srv)
            local ok, err = pcall(strict.get, strict, "missing")
            assert.is_false(ok)
            assert.matches("tier 2 %(dogpile.cache.redis%): get 'missing'", err)
            cache.set_logger(function() end)
            assert.are.equal("v", open:get("held"))
            local calls = 0
            assert.are.equal("made", open:get_or_create("other", function()
                calls = calls + 1
                return "made"
            end))
            assert.are.equal(1, calls)
            assert.is_true(open:stats().errors > 0)
            cache.set_logger(function(msg) io.stderr:write(msg, "\n") end)
        end)
    end)

    describe("between processes and threads", function()
        it("1,000+ random operations: 3 processes on memory -> redis and 4 threads on "
           .. "memory -> shared_memory -> redis never read a value older than 100 ms", function()
            local port = redis_port()
            sh("redis-cli -p " .. port .. " flushall")
            uniq = uniq + 1
            local start = now() + 1.0
            local files = run_all("random", {
                { layout = "mr", port = port }, { layout = "mr", port = port },
                { layout = "mr", port = port }, { layout = "msr", port = port, threads = 4 },
            }, string.format("160 40 %d", uniq), start)
            local ops = load_ops(files)
            assert.is_true(#ops >= 1000, "only " .. #ops .. " operations")
            local bad, judged = check(ops, 0.1)
            assert.is_true(judged >= 300, "only " .. judged .. " reads judged")
            assert.are.same({}, bad)
        end)

        it("1,000+ random operations: 3 processes on memory -> lmdb and 4 threads on "
           .. "memory -> shared_memory -> lmdb never read a value older than 100 ms", function()
            uniq = uniq + 1
            local files = run_all("random", {
                { layout = "ml" }, { layout = "ml" }, { layout = "ml" },
                { layout = "msl", threads = 4 },
            }, string.format("160 40 %d", uniq), now() + 1.0)
            local ops = load_ops(files)
            assert.is_true(#ops >= 1000, "only " .. #ops .. " operations")
            local bad, judged = check(ops, 0.1)
            assert.is_true(judged >= 300, "only " .. judged .. " reads judged")
            assert.are.same({}, bad)
        end)

        it("the checker catches a hand-made memory region in front of lmdb (no coherence)",
           function()
            uniq = uniq + 1
            local files = run_all("random", {
                { layout = "naive_lmdb" }, { layout = "naive_lmdb" }, { layout = "naive_lmdb" },
            }, string.format("160 20 %d", uniq), now() + 0.5)
            local bad = check(load_ops(files), 0.1)
            assert.is_true(#bad > 0, "the checker found nothing stale in an incoherent setup")
        end)

        it("the checker catches a hand-made memory region in front of redis (no coherence)",
           function()
            local port = redis_port()
            sh("redis-cli -p " .. port .. " flushall")
            uniq = uniq + 1
            local files = run_all("random", {
                { layout = "naive", port = port }, { layout = "naive", port = port },
                { layout = "naive", port = port },
            }, string.format("160 20 %d", uniq), now() + 0.5)
            local bad = check(load_ops(files), 0.1)
            assert.is_true(#bad > 0, "the checker found nothing stale in an incoherent setup")
        end)

        it("4 threads on memory -> shared_memory, no server: never stale", function()
            uniq = uniq + 1
            local files = run_all("random", { { layout = "ms", threads = 4 } },
                                  string.format("300 30 %d", uniq), now() + 0.3)
            local ops = load_ops(files)
            assert.is_true(#ops >= 1000, "only " .. #ops .. " operations")
            local bad, judged = check(ops, 0.1)
            assert.is_true(judged >= 300, "only " .. judged .. " reads judged")
            assert.are.same({}, bad)
        end)

        it("a stampede from 3 processes and 4 threads runs the creator once", function()
            local port = redis_port()
            local key = fresh("stampede")
            local counter = TMP .. "/stampede-count-" .. uniq
            local files = run_all("stampede", {
                { layout = "mr", port = port }, { layout = "mr", port = port },
                { layout = "mr", port = port }, { layout = "msr", port = port, threads = 4 },
            }, string.format("'%s' '%s'", key, counter), now() + 1.0)
            assert.are.equal(1, count_lines(counter))
            local ops = load_ops(files)
            assert.are.equal(7, #ops)
            for _, o in ipairs(ops) do
                assert.are.equal("created", o.v)
            end
        end)

        it("hard and soft invalidation from this process are seen by the others", function()
            local port = redis_port()
            local hk, sk = fresh("hard"), fresh("soft")
            local r = tiered(mr(), { expiration_time = 600, make = { name = "spec" } },
                             { prefix = "tiered-spec:" })
            r:set(hk, "old")
            r:set(sk, "orig")
            uniq = uniq + 1
            local t_start = now() + 0.8
            local stop = t_start + 1.2
            local t_hard, t_soft = t_start + 0.3, t_start + 0.7
            -- The watchers run in the background while this process invalidates.
            local cmd, files = {}, {}
            for i = 1, 2 do
                local out = string.format("%s/watch-%d-%d", TMP, uniq, i)
                files[i] = out
                cmd[i] = string.format("luajit %s/worker.lua watch mr %d %s %.3f %.3f '%s' '%s' "
                                       .. "> %s.err 2>&1 &", FIX, port, out, t_start, stop, hk, sk,
                                       out)
            end
            sh(table.concat(cmd, " "))
            while now() < t_hard do
                sleep(0.001)
            end
            t_hard = now()
            r:invalidate(true)
            while now() < t_soft do
                sleep(0.001)
            end
            t_soft = now()
            r:invalidate(false)
            while now() < stop + 0.5 do
                sleep(0.01)
            end
            -- Hard: each watcher's get turns into a miss within 100 ms.
            -- Soft: within 100 ms each watcher's get_or_create returns a new
            -- value, made by one creator call across both (the other serves
            -- the old value meanwhile, then hears of the new one).
            local soft_creations = 0
            for _, out in ipairs(files) do
                assert.are.equal("", read(out .. ".err") or "")
                local ops = load_ops({ out })
                assert.are.equal("old", ops[1].v)
                local miss, changed
                local before_soft
                for _, o in ipairs(ops) do
                    if o.op == "H" and o.v == "~" then
                        miss = miss or o
                    elseif o.op == "G" then
                        if o.t0 < t_soft then
                            before_soft = o.v
                        elseif o.v ~= before_soft then
                            changed = changed or o
                        end
                    elseif o.op == "C" and o.t0 >= t_soft then
                        soft_creations = soft_creations + 1
                    end
                end
                assert.is_not_nil(miss, "the hard invalidation was never seen")
                assert.is_true(miss.t0 >= t_hard - 0.01 and miss.t0 < t_hard + 0.1,
                               string.format("hard seen %.3f s after", miss.t0 - t_hard))
                assert.is_not_nil(changed, "the soft invalidation was never seen")
                assert.is_true(changed.t0 < t_soft + 0.1,
                               string.format("soft seen %.3f s after", changed.t0 - t_soft))
            end
            assert.are.equal(1, soft_creations)
        end)

        it("inside nginx, 2 workers on memory -> ngx_shared: 1,000 random operations never "
           .. "read a value older than 100 ms; a memory tier's max_age holds on front hits",
           function()
            local ngx_support = require "ngx_support"
            assert.is_true(ngx_support.available(), "nginx-extras (the Lua module) is not installed")
            uniq = uniq + 1
            -- Workers may run as another user (nobody): a folder they can write.
            local dir = (sh("mktemp -d /tmp/dogpile-tiered-ngx-XXXXXX"):gsub("%s+$", ""))
            os.execute("chmod 777 " .. dir)
            finally(function() os.execute("rm -rf " .. dir) end)
            local out = dir .. "/ops"
            local srv = ngx_support.start({ fixture = "tiered/nginx", ready = "/ready",
                                            vars = { OUT = out, LAYOUT = "ngx", RPORT = 0 } })
            finally(function() srv:stop() end)
            local body, code = srv:get(string.format("/start?at=%.3f&n=500&keys=30&seed=%d",
                                                     now() + 0.5, uniq))
            assert.are.equal(200, code, body)
            local t0 = now()
            while srv:get("/done") ~= "2\n" do
                assert.is_true(now() - t0 < 60, "the workers did not finish: " .. srv:log())
                sleep(0.1)
            end
            local files = {}
            for path in sh("ls " .. out .. ".*"):gmatch("[^\n]+") do
                files[#files + 1] = path
            end
            assert.are.equal(2, #files)
            local ops = load_ops(files)
            assert.is_true(#ops >= 1000, "only " .. #ops .. " operations")
            local bad, judged = check(ops, 0.1)
            assert.is_true(judged >= 300, "only " .. judged .. " reads judged")
            assert.are.same({}, bad)
            check_max_age_in_nginx(srv)
            assert.is_nil(srv:log():find("[error]", 1, true), srv:log())
        end)

        it("inside nginx, 2 workers on memory -> ngx_shared -> redis and a plain process on "
           .. "memory -> redis: random operations never read a value older than 100 ms; over "
           .. "redis, a memory tier's max_age holds on front hits", function()
            local ngx_support = require "ngx_support"
            assert.is_true(ngx_support.available(), "nginx-extras (the Lua module) is not installed")
            local port = redis_port()
            sh("redis-cli -p " .. port .. " flushall")
            uniq = uniq + 1
            local dir = (sh("mktemp -d /tmp/dogpile-tiered-ngx-XXXXXX"):gsub("%s+$", ""))
            os.execute("chmod 777 " .. dir)
            finally(function() os.execute("rm -rf " .. dir) end)
            local out = dir .. "/ops"
            local srv = ngx_support.start({ fixture = "tiered/nginx", ready = "/ready",
                                            vars = { OUT = out, LAYOUT = "ngx_redis", RPORT = port } })
            finally(function() srv:stop() end)
            local start = now() + 1.0
            local body, code = srv:get(string.format("/start?at=%.3f&n=400&keys=30&seed=%d",
                                                     start, uniq))
            assert.are.equal(200, code, body)
            local plain = run_all("random", { { layout = "mr", port = port } },
                                  string.format("400 30 %d", uniq), start)
            local t0 = now()
            while srv:get("/done") ~= "2\n" do
                assert.is_true(now() - t0 < 60, "the workers did not finish: " .. srv:log())
                sleep(0.1)
            end
            local files = { plain[1] }
            for path in sh("ls " .. out .. ".*"):gmatch("[^\n]+") do
                files[#files + 1] = path
            end
            assert.are.equal(3, #files)
            local ops = load_ops(files)
            assert.is_true(#ops >= 1000, "only " .. #ops .. " operations")
            local bad, judged = check(ops, 0.1)
            assert.is_true(judged >= 300, "only " .. judged .. " reads judged")
            assert.are.same({}, bad)
            check_max_age_in_nginx(srv)
            assert.is_nil(srv:log():find("[error]", 1, true), srv:log())
        end)

        it("redis restarted mid-run: nothing stale once it is back", function()
            local srv = start_redis()
            uniq = uniq + 1
            local start = now() + 1.0
            local until_t = start + 6.0
            local cmd, files = {}, {}
            for i = 1, 3 do
                local out = string.format("%s/restart-%d-%d", TMP, uniq, i)
                files[i] = out
                cmd[i] = string.format("luajit %s/worker.lua random mr %d %s %.3f 0 20 %d %.3f "
                                       .. "> %s.err 2>&1 &", FIX, srv.port, out, start, uniq + i,
                                       until_t, out)
            end
            sh(table.concat(cmd, " "))
            while now() < start + 1.0 do
                sleep(0.01)
            end
            stop_redis(srv)
            sleep(0.5)
            local restarting = now()
            start_redis(srv.port)
            local back = now()
            assert.is_true(back + 1.5 < until_t, "the restart took too long to leave time to check")
            while now() < until_t + 1.0 do
                sleep(0.05)
            end
            for _, out in ipairs(files) do
                assert.are.equal("", read(out .. ".err") or "")
            end
            local ops = load_ops(files)
            local failed = 0
            for _, o in ipairs(ops) do
                if not o.ok then
                    failed = failed + 1
                end
            end
            assert.is_true(failed > 0, "no operation failed while redis was down")
            -- Reads after the server is back and the listener resubscribed
            -- (it retries every 100 ms at most) are judged against the
            -- writes made since.
            local bad, judged = check(ops, 0.1, restarting, back - restarting + 0.2)
            assert.is_true(judged >= 100, "only " .. judged .. " reads judged")
            assert.are.same({}, bad)
        end)
    end)
end)
