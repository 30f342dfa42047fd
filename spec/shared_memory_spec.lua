-- dogpile.cache.shared_memory (API.md, "Backend names shipped"; the issue's
-- "shared_memory" part): regions over it round-trip values through the codec,
-- one instance per `name` in the process, keys of any bytes, the max_items /
-- max_bytes bounds with "lru" and "s3fifo" eviction, refused values and
-- configurations, the backend's expiration_time, its process-wide lock
-- domain, and undecodable bytes. Every test opens instances under names of
-- its own, so that tests do not see each other's entries.
local support = require "support"
local dogpile = require "dogpile"
local cache = require "dogpile.cache"
local lib = require "dogpile.lib"

local NO_VALUE = cache.NO_VALUE
local C = lib.C
local BACKEND = "dogpile.cache.shared_memory"

local function sleep(seconds)
    C.dp_clock_sleep(seconds)
end

local serial = 0
--- A name no other test uses.
local function fresh_name(what)
    serial = serial + 1
    return ("spec.shm.%s.%d.%d"):format(what or "t", serial, math.floor(C.dp_clock_now() * 1e3) % 1e6)
end

--- A region over shared_memory with `arguments` (name filled in when absent).
local function shm_region(arguments, conf, make_opts)
    arguments = arguments or {}
    if arguments.name == nil then
        arguments.name = fresh_name()
    end
    conf = conf or {}
    conf.arguments = arguments
    return cache.make_region(make_opts):configure(BACKEND, conf)
end

local function backend_stats(r)
    return r.actual_backend:stats()
end

local raises_here = support.raises_here

--- Is `key` cached in `r`?
local function present(r, key)
    return r:get(key) ~= NO_VALUE
end

-- -- Values and instances ---------------------------------------------------------

describe("dogpile.cache.shared_memory values", function()
    support.no_leaks()

    it("round-trips values through the codec: tables, nil, false, numbers, binary strings", function()
        local r = shm_region()
        local all_bytes = {}
        for i = 0, 255 do
            all_bytes[#all_bytes + 1] = string.char(i)
        end
        all_bytes = table.concat(all_bytes)
        local cases = {
            { "table", { name = "ada", list = { 1, 2.5, "three" }, nested = { deep = { [true] = "y", [7] = false } } } },
            { "empty table", {} },
            { "false", false },
            { "true", true },
            { "zero", 0 },
            { "int", 2 ^ 53 },
            { "negative", -123456789 },
            { "float", 0.1 },
            { "huge", math.huge },
            { "minus huge", -math.huge },
            { "binary", all_bytes },
            { "nul", "\0\0a\0" },
            { "empty string", "" },
        }
        for _, c in ipairs(cases) do
            r:set(c[1], c[2])
        end
        for _, c in ipairs(cases) do
            local got = r:get(c[1])
            assert.are.same(c[2], got, c[1])
        end
        assert.is_string(r.actual_backend:get("table"), "the backend stores bytes")
        assert.are_not.equal(cases[1][2], r:get("table"), "a copy, not the same table")

        r:set("nil", nil)
        assert.is_nil(r:get("nil"))
        assert.are_not.equal(NO_VALUE, r:get("nil"))
        r:set("minus zero", -0.0)
        assert.are.equal(-math.huge, 1 / r:get("minus zero"))
        r:set("nan", 0 / 0)
        local nan = r:get("nan")
        assert.is_true(nan ~= nan)
        assert.are.equal(NO_VALUE, r:get("never set"))
    end)

    it("two regions configured with the same name share values; other names do not", function()
        local name, other = fresh_name("shared"), fresh_name("other")
        local a = shm_region({ name = name })
        local b = shm_region({ name = name })
        local c = shm_region({ name = other })
        a:set("k", { from = "a" })
        assert.are.same({ from = "a" }, b:get("k"))
        assert.are.equal(NO_VALUE, c:get("k"))
        b:set("k2", "from b")
        assert.are.equal("from b", a:get("k2"))
        c:set("k3", "from c")
        assert.are.equal(NO_VALUE, a:get("k3"))
        assert.are.equal(NO_VALUE, b:get("k3"))
        b:delete("k")
        assert.are.equal(NO_VALUE, a:get("k"))
        -- the backend objects are distinct handles on one instance
        assert.are_not.equal(a.actual_backend, b.actual_backend)
        assert.are.equal(1, backend_stats(a).items)
        assert.are.equal(1, backend_stats(b).items)
        assert.are.equal(1, backend_stats(c).items)
    end)

    it("values of every length from 0 to 80 bytes come back whole (the short copies' edges)", function()
        local b = shm_region().actual_backend
        for n = 0, 80 do
            local v = {}
            for i = 1, n do
                v[i] = string.char((i * 7 + n) % 256)
            end
            b:set("len" .. n, table.concat(v))
        end
        for n = 0, 80 do
            local got = b:get("len" .. n)
            assert.are.equal(n, #got, "length " .. n)
            for i = 1, n do
                assert.are.equal((i * 7 + n) % 256, got:byte(i), "byte " .. i .. " of the " .. n .. "-byte value")
            end
        end
    end)

    it("keys of 0 to 24 bytes that differ in one byte only are distinct (the word compares' edges)", function()
        local b = shm_region().actual_backend
        local keys = {}
        for n = 0, 24 do
            keys[#keys + 1] = ("a"):rep(n)
            for i = 1, n do
                keys[#keys + 1] = ("a"):rep(i - 1) .. "b" .. ("a"):rep(n - i)
            end
        end
        for i, k in ipairs(keys) do
            b:set(k, tostring(i))
        end
        for i, k in ipairs(keys) do
            assert.are.equal(tostring(i), b:get(k), ("key %q"):format(k))
        end
    end)

    it("keys of any bytes are distinct and work: NUL, 0xff, empty, long", function()
        local r = shm_region()
        local long = ("x"):rep(100000)
        local keys = {
            "a", "a\0", "a\0b", "a\0c", "\0", "\0\0", "", "\255", "\255\254", "\255\0\255",
            "caf\195\169", long, long:sub(1, -2) .. "y", long .. "\0",
        }
        for i, k in ipairs(keys) do
            r:set(k, i)
        end
        for i, k in ipairs(keys) do
            assert.are.equal(i, r:get(k), ("key #%d"):format(i))
        end
        assert.are.equal(#keys, backend_stats(r).items)
        r:delete("a\0b")
        assert.are.equal(NO_VALUE, r:get("a\0b"))
        assert.are.equal(4, r:get("a\0c"))
        assert.are.equal(2, r:get("a\0"))
        assert.are.equal(#keys - 1, backend_stats(r).items)
    end)

    it("delete, get_multi, set_multi and delete_multi work through the region", function()
        local r = shm_region()
        r:set_multi({ a = 1, b = false, ["c\0"] = { 3 } })
        assert.are.same({ 1, false, { 3 }, NO_VALUE }, r:get_multi({ "a", "b", "c\0", "d" }))
        r:delete("a")
        assert.are.equal(NO_VALUE, r:get("a"))
        r:delete("never set")
        r:delete_multi({ "b", "c\0", "missing" })
        assert.are.same({ NO_VALUE, NO_VALUE, NO_VALUE }, r:get_multi({ "a", "b", "c\0" }))
        assert.are.equal(0, backend_stats(r).items)
        assert.are.equal(0, backend_stats(r).bytes)
        local st = r:stats()
        assert.are.equal(3, st.hits)
        assert.are.equal(5, st.misses)
    end)

    it("undecodable bytes are a miss and count an error", function()
        local r = shm_region()
        local messages = {}
        cache.set_logger(function(msg) messages[#messages + 1] = msg end)
        finally(function() cache.set_logger(function(msg) io.stderr:write(msg, "\n") end) end)
        r:set("ok", "fine")
        local errors = r:stats().errors
        for i, junk in ipairs({ "garbage", "", "DPLV", "DPLV\1\0\0\0" .. ("\0"):rep(8) .. "\255\255" }) do
            r.actual_backend:set("k", junk)
            assert.are.equal(NO_VALUE, r:get("k"), "junk #" .. i)
            assert.are.equal(errors + i, r:stats().errors)
        end
        assert.are.equal(4, #messages)
        assert.are.equal("fine", r:get("ok"))
        assert.are.equal("new", r:get_or_create("k", function() return "new" end))
        assert.are.equal("new", r:get("k"))
    end)
end)

-- -- Bounds and eviction --------------------------------------------------------------

describe("dogpile.cache.shared_memory bounds", function()
    support.no_leaks()

    for _, policy in ipairs({ "lru", "s3fifo" }) do
        it(policy .. ": max_items bounds the count, and stats().evictions counts", function()
            local r = shm_region({ max_items = 10, eviction = policy })
            for i = 1, 30 do
                r:set("k" .. i, i)
                assert.is_true(backend_stats(r).items <= 10, "items over the bound at " .. i)
            end
            local bs = backend_stats(r)
            assert.are.equal(10, bs.items)
            assert.are.equal(10, bs.max_items)
            assert.are.equal(20, bs.evictions)
            assert.are.equal(20, r:stats().evictions)
            -- the newest ten survive inserts that were never read
            for i = 21, 30 do
                assert.are.equal(i, r:get("k" .. i))
            end
            -- replacing a key evicts nothing
            r:set("k30", "again")
            assert.are.equal(20, backend_stats(r).evictions)
            assert.are.equal(10, backend_stats(r).items)
        end)
    end

    it("lru: evicts in exact least-recently-used order", function()
        local r = shm_region({ max_items = 3, eviction = "lru" })
        r:set("a", 1); r:set("b", 2); r:set("c", 3)
        assert.are.equal(1, r:get("a"))           -- recency: a c b
        r:set("d", 4)                              -- evicts b; d a c
        assert.is_false(present(r, "b"))
        assert.are.equal(3, r:get("c"))            -- c d a
        r:set("e", 5)                              -- evicts a; e c d
        assert.are.equal(NO_VALUE, r.actual_backend:get("a"))
        assert.are.equal(4, r:get("d"))            -- d e c
        r:set("c", 33)                             -- a set refreshes too: c d e
        r:set("f", 6)                              -- evicts e
        assert.are.equal(NO_VALUE, r.actual_backend:get("e"))
        assert.are.same({ 33, 4, 6 }, r:get_multi({ "c", "d", "f" }))
        assert.are.equal(3, backend_stats(r).evictions)

        -- a longer trace against a reference LRU
        local r2 = shm_region({ max_items = 8, eviction = "lru" })
        local ref, order, seed = {}, {}, 12345
        local function touch(k)
            for i = #order, 1, -1 do
                if order[i] == k then table.remove(order, i) end
            end
            table.insert(order, 1, k)
            ref[k] = true
            if #order > 8 then
                ref[table.remove(order)] = nil
            end
        end
        for _ = 1, 2000 do
            seed = (seed * 1103515245 + 12345) % 2147483648
            local k = "k" .. (seed % 20)
            if r2:get(k) ~= NO_VALUE then
                assert.is_true(ref[k] == true, "hit on " .. k .. " that the reference evicted")
                touch(k)
            else
                assert.is_nil(ref[k], "miss on " .. k .. " that the reference holds")
                r2:set(k, k)
                touch(k)
            end
        end
    end)

    it("s3fifo: a key that was read survives a burst of one-time inserts; unread ones go", function()
        local r = shm_region({ max_items = 20, eviction = "s3fifo" })
        r:set("hot", "h")
        r:set("cold", "c")
        assert.are.equal("h", r:get("hot"))
        for i = 1, 500 do
            r:set("scan" .. i, i)
        end
        assert.are.equal("h", r:get("hot"))
        assert.is_false(present(r, "cold"))
        assert.is_false(present(r, "scan1"))
        assert.are.equal(500, r:get("scan500"))
        assert.are.equal(20, backend_stats(r).items)
        assert.are.equal(482, backend_stats(r).evictions)

        -- the same trace under lru loses the hot key
        local l = shm_region({ max_items = 20, eviction = "lru" })
        l:set("hot", "h")
        assert.are.equal("h", l:get("hot"))
        for i = 1, 500 do
            l:set("scan" .. i, i)
        end
        assert.is_false(present(l, "hot"))
    end)

    it("s3fifo is the default eviction", function()
        local r = shm_region({ max_items = 20 })
        r:set("hot", 1)
        r:get("hot")
        for i = 1, 200 do
            r:set("scan" .. i, i)
        end
        assert.are.equal(1, r:get("hot"))
    end)

    it("max_bytes bounds the bytes held, in numbers or a string like \"64k\"", function()
        for _, case in ipairs({ { "64k", 65536 }, { "64K", 65536 }, { 8192, 8192 }, { "0.5m", 524288 } }) do
            local r = shm_region({ max_bytes = case[1] })
            local bs = backend_stats(r)
            assert.are.equal(case[2], bs.max_bytes, tostring(case[1]))
            local value = ("v"):rep(900)
            local n = math.ceil(case[2] / 900) * 3
            for i = 1, n do
                r:set("k" .. i, value)
                assert.is_true(backend_stats(r).bytes <= case[2], "bytes over the bound at " .. i)
            end
            bs = backend_stats(r)
            assert.is_true(bs.evictions > 0)
            assert.are.equal(n - bs.items, bs.evictions)
            assert.are.equal(bs.evictions, r:stats().evictions)
            assert.are.equal(value, r:get("k" .. n))
        end
    end)

    -- A large bound is split over eviction stripes (each evicts its own
    -- share), so that writers of different stripes do not wait for each
    -- other; the sum of the shares is the bound.
    for _, policy in ipairs({ "lru", "s3fifo" }) do
        it(policy .. ": a bound split over stripes still holds the count and the bytes, and evictions count", function()
            local r = shm_region({ max_items = 20000, eviction = policy })
            local b = r.actual_backend
            for i = 1, 40000 do
                b:set("k" .. i, "v")
                if i % 5000 == 0 then
                    assert.is_true(backend_stats(r).items <= 20000, "items over the bound at " .. i)
                end
            end
            local bs = backend_stats(r)
            -- every stripe was sent about 2500 keys for a share of 1250: all full
            assert.are.equal(20000, bs.items)
            assert.are.equal(20000, bs.evictions)
            assert.are.equal("v", b:get("k40000"))

            local rb = shm_region({ max_bytes = "64m", eviction = policy })
            local value = ("v"):rep(4000)
            local n = math.floor(2 * 64 * 1024 * 1024 / 4000)
            for i = 1, n do
                rb:set("k" .. i, value)
            end
            bs = backend_stats(rb)
            assert.is_true(bs.bytes <= 64 * 1024 * 1024, "bytes over the bound: " .. bs.bytes)
            assert.is_true(bs.bytes > 0.9 * 64 * 1024 * 1024, "stripes left much room: " .. bs.bytes)
            assert.are.equal(n - bs.items, bs.evictions)
        end)
    end

    it("s3fifo: in a store split over stripes, a key that was read survives a burst of one-time inserts", function()
        local r = shm_region({ max_items = 32768, eviction = "s3fifo" })
        r:set("hot", "h")
        assert.are.equal("h", r:get("hot"))
        local b = r.actual_backend
        for i = 1, 200000 do
            b:set("scan" .. i, "x")
        end
        assert.are.equal("h", r:get("hot"))
        assert.is_false(present(r, "scan1"))
        assert.are.equal(32768, backend_stats(r).items)
    end)

    it("a value larger than max_bytes is refused, naming its size and the bound, evicting nothing", function()
        local r = shm_region({ max_bytes = 4096 })
        for i = 1, 5 do
            r:set("k" .. i, i)
        end
        r:set("big", "old")
        local before = backend_stats(r)
        local errors = r:stats().errors
        local err = raises_here("dogpile.cache.shared_memory:", function() r:set("big", ("x"):rep(5000)) end,
                                "max_bytes 4096", "'big'")
        local size = tonumber(err:match("value of (%d+) bytes"))
        assert.is_truthy(size, "no size in: " .. err)
        assert.is_true(size >= 5000, err)
        local after = backend_stats(r)
        assert.are.equal(before.evictions, after.evictions)
        assert.are.equal(before.items, after.items)
        assert.are.equal(before.bytes, after.bytes)
        for i = 1, 5 do
            assert.are.equal(i, r:get("k" .. i))
        end
        assert.are.equal("old", r:get("big"), "the key's previous value is left as it was")
        assert.are.equal(errors + 1, r:stats().errors)
        -- the same through get_or_create: the creator's value is returned, the error raised
        raises_here("dogpile.cache.shared_memory:", function() r:get_or_create("big2", function() return ("y"):rep(5000) end) end,
                    "max_bytes 4096")
        assert.are.equal(NO_VALUE, r:get("big2"))
        assert.are.equal(before.evictions, backend_stats(r).evictions)
    end)
end)

-- -- Configuration --------------------------------------------------------------------

describe("dogpile.cache.shared_memory configuration", function()
    support.no_leaks()

    it("the same name with different bounds raises, naming both values", function()
        local name = fresh_name("conf")
        local first = shm_region({ name = name, max_items = 100 })
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ name = name, max_items = 200 }) end,
                    name, "max_items", "100", "200")
        local name2 = fresh_name("conf")
        local second = shm_region({ name = name2, max_bytes = "64k" })
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ name = name2, max_bytes = "32k" }) end,
                    name2, "max_bytes", "65536", "32768")
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ name = name2 }) end,
                    name2, "max_bytes", "65536")
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ name = name2, max_bytes = "64k", eviction = "lru" }) end,
                    name2, "s3fifo", "lru")
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ name = name2, max_bytes = "64k", expiration_time = 5 }) end,
                    name2, "expiration_time", "5")
        -- the same bounds, written either way, join the instance
        local third = shm_region({ name = name2, max_bytes = 65536 })
        second:set("k", 1)
        assert.are.equal(1, third:get("k"))
        assert.is_truthy(first)
    end)

    it("the same name with large bounds that differ names both values exactly", function()
        local name = fresh_name("conf")
        local first = shm_region({ name = name, max_items = 1234567 })
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ name = name, max_items = 1234568 }) end,
                    "1234567", "1234568")
        local name2 = fresh_name("conf")
        local second = shm_region({ name = name2, max_bytes = "1g" })
        local err = raises_here("dogpile.cache.shared_memory:", function() shm_region({ name = name2, max_bytes = "1025m" }) end,
                                "max_bytes")
        assert.is_truthy((err:find("1073741824", 1, true) or err:find("1g", 1, true))
                         and (err:find("1074790400", 1, true) or err:find("1025m", 1, true)), err)
        assert.is_truthy(first and second)
    end)

    it("once every region on a name is gone, the name can be opened with other bounds", function()
        local name = fresh_name("reopen")
        local r = shm_region({ name = name, max_items = 5 })
        r:set("k", 1)
        r.actual_backend:close()
        r = nil
        collectgarbage()
        collectgarbage()
        local r2 = shm_region({ name = name, max_items = 6 })
        assert.are.equal(NO_VALUE, r2:get("k"))
        assert.are.equal(6, backend_stats(r2).max_items)
    end)

    it("refuses unknown arguments, a bad eviction, bad bounds and a bad expiration_time", function()
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ bogus = 1 }) end,
                    "unknown argument 'bogus'")
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ eviction = "fifo" }) end,
                    "eviction", "s3fifo", "lru")
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ eviction = 1 }) end, "eviction")
        for _, bad in ipairs({ 0, -1, 1.5, "10", 0 / 0, true }) do
            raises_here("dogpile.cache.shared_memory:", function() shm_region({ max_items = bad }) end,
                        "max_items must be a positive integer")
        end
        for _, bad in ipairs({ 0, -5, "abc", "", "64x", "k", math.huge, true }) do
            raises_here("dogpile.cache.shared_memory:", function() shm_region({ max_bytes = bad }) end,
                        "max_bytes")
        end
        for _, bad in ipairs({ 0, -1, "1", true }) do
            raises_here("dogpile.cache.shared_memory:", function() shm_region({ expiration_time = bad }) end,
                        "expiration_time")
        end
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ name = "" }) end, "name")
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ name = 5 }) end, "name")
        raises_here("dogpile.cache.shared_memory:", function() shm_region({ max_items = {} }) end, "max_items")
    end)
end)

-- -- Expiry ------------------------------------------------------------------------------

describe("dogpile.cache.shared_memory expiration_time", function()
    support.no_leaks()

    it("entries older than expiration_time are misses", function()
        local r = shm_region({ expiration_time = 0.05 })
        r:set("k", "v")
        assert.are.equal("v", r:get("k"))
        sleep(0.08)
        assert.are.equal(NO_VALUE, r:get("k"))
        assert.are.equal(NO_VALUE, r.actual_backend:get("k"))
        local calls = 0
        assert.are.equal("new", r:get_or_create("k", function() calls = calls + 1; return "new" end))
        assert.are.equal("new", r:get("k"))
        assert.are.equal(1, calls)
    end)

    for _, policy in ipairs({ "s3fifo", "lru" }) do
        it(policy .. ": expired entries are dropped by later writes and counted as expirations", function()
            local r = shm_region({ expiration_time = 0.05, eviction = policy })
            for i = 1, 20 do
                r:set("old" .. i, i)
            end
            assert.are.equal(20, backend_stats(r).items)
            sleep(0.08)
            for i = 1, 3 do
                r:set("new" .. i, i)
            end
            local bs = backend_stats(r)
            assert.are.equal(3, bs.items)
            assert.are.equal(20, bs.expirations)
            assert.are.equal(0, bs.evictions)
            assert.are.same({ 1, 2, 3 }, r:get_multi({ "new1", "new2", "new3" }))
        end)

        it(policy .. ": under a bound, expired entries go before fresh ones", function()
            local r = shm_region({ expiration_time = 0.05, max_items = 10, eviction = policy })
            for i = 1, 5 do
                r:set("old" .. i, i)
            end
            sleep(0.08)
            for i = 1, 10 do
                r:set("new" .. i, i)
            end
            local bs = backend_stats(r)
            assert.are.equal(10, bs.items)
            assert.are.equal(0, bs.evictions)
            assert.are.equal(5, bs.expirations)
            for i = 1, 10 do
                assert.are.equal(i, r:get("new" .. i))
            end
        end)
    end
end)

-- -- Locks --------------------------------------------------------------------------------

describe("dogpile.cache.shared_memory locks", function()
    support.no_leaks()

    it("get_mutex uses a process-wide lock domain shared by every region on the name", function()
        local name = fresh_name("lock")
        local a = shm_region({ name = name })
        local b = shm_region({ name = name })
        local c = shm_region()
        assert.is_function(a.backend.get_mutex)
        local dom = a.actual_backend.lock_domain
        assert.are_not.equal(0, dom)
        assert.are.equal(dom, b.actual_backend.lock_domain)
        assert.are_not.equal(dom, c.actual_backend.lock_domain)
        local full = BACKEND .. ":" .. name
        assert.are.equal(dom, C.dp_lock_domain(full, #full), "a named, process-wide domain")

        local ma = a.backend:get_mutex("k")
        assert.is_true(ma:acquire(false))
        assert.is_false(b.backend:get_mutex("k"):acquire(false))
        assert.is_true(b.backend:get_mutex("other"):acquire(false))
        b.backend:get_mutex("other"):release()
        local mc = c.backend:get_mutex("k")
        assert.is_true(mc:acquire(false))
        mc:release()
        -- released by another handle: a lock is not owned by its taker
        b.backend:get_mutex("k"):release()
        assert.is_true(a.backend:get_mutex("k"):acquire(false))
        a.backend:get_mutex("k"):release()
    end)

    it("instances with different names have different lock domains (long names, names with NUL)", function()
        local long = ("n"):rep(300)
        local pairs_of_names = { { long .. "a", long .. "b" }, { "nul\0a", "nul\0b" } }
        for _, names in ipairs(pairs_of_names) do
            local suffix = fresh_name("d")
            local a = shm_region({ name = names[1] .. suffix })
            local b = shm_region({ name = names[2] .. suffix })
            a:set("k", 1)
            assert.are.equal(NO_VALUE, b:get("k"), "separate instances")
            assert.are_not.equal(a.actual_backend.lock_domain, b.actual_backend.lock_domain,
                                 ("names of %d bytes share a lock domain"):format(#names[1]))
        end
    end)

    it("get_or_create under the lock with coroutines: the creator (which yields) runs once", function()
        local sched = support.scheduler()
        dogpile.set_sleep(sched.sleep)
        finally(function() dogpile.set_sleep(nil) end)
        local name = fresh_name("goc")
        local a = shm_region({ name = name })
        local b = shm_region({ name = name })
        local calls, got = 0, {}
        local function creator()
            calls = calls + 1
            sched.sleep(0.05)
            return { made = calls }
        end
        for i = 1, 6 do
            local r = i % 2 == 1 and a or b
            sched.spawn(function() got[i] = r:get_or_create("k", creator) end)
        end
        sched.run()
        assert.are.equal(1, calls)
        for i = 1, 6 do
            assert.are.same({ made = 1 }, got[i])
        end
        assert.are.equal(5, a:stats().lock_waits + b:stats().lock_waits)
        assert.are.same({ made = 1 }, b:get("k"))
        assert.is_false(a.backend:get_mutex("k"):locked())
    end)

    it("a creator error releases the lock for the waiters", function()
        local sched = support.scheduler()
        dogpile.set_sleep(sched.sleep)
        finally(function() dogpile.set_sleep(nil) end)
        local r = shm_region()
        local calls, got, errs = 0, {}, 0
        local function creator()
            calls = calls + 1
            sched.sleep(0.02)
            if calls == 1 then
                error("boom", 0)
            end
            return "ok"
        end
        for i = 1, 3 do
            sched.spawn(function()
                local ok, v = pcall(r.get_or_create, r, "k", creator)
                if ok then got[i] = v else errs = errs + 1; assert.are.equal("boom", v) end
            end)
        end
        sched.run()
        assert.are.equal(1, errs)
        assert.are.equal(2, calls)
        assert.are.equal("ok", r:get("k"))
    end)
end)

describe("region:stats() over a shared store", function()
    it("counts evictions since this region was configured", function()
        local cache = require "dogpile.cache"
        local args = { name = "stats-baseline-" .. tostring({}):sub(8), max_items = 2, eviction = "lru" }
        local first = cache.make_region():configure("dogpile.cache.shared_memory", { arguments = args })
        for i = 1, 5 do first:set("k" .. i, i) end
        assert.are.equal(3, first:stats().evictions)
        local second = cache.make_region():configure("dogpile.cache.shared_memory", { arguments = args })
        assert.are.equal(0, second:stats().evictions)
        second:set("k6", 6)
        assert.are.equal(1, second:stats().evictions)
        assert.are.equal(4, first:stats().evictions)
    end)
end)
