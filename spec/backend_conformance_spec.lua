-- The backend contract (docs/BACKENDS.md), one spec for every backend that
-- shares its instances through the core: the same cases run against each
-- entry of BACKENDS below, through regions as users use them and through
-- region.actual_backend where the interface itself matters. A new backend
-- adds one entry; its own spec keeps only what is specific to it.
--
-- dogpile.cache.template is docs/template/template.c, built (not installed)
-- into the build directory of the stage under test.
local support = require "support"
local dogpile = require "dogpile"
local cache = require "dogpile.cache"
local lib = require "dogpile.lib"

local NO_VALUE = cache.NO_VALUE
local C = lib.C
local raises_here = support.raises_here

local function load_template()
    local build = "_build/" .. (os.getenv("DP_STAGE") or "main")
    local path = build .. "/template.so"
    -- The core is loaded already (dogpile.lib): the module's libdogpile.so.0
    -- resolves to that same copy, so it registers where regions look.
    local open, err = package.loadlib(path, "luaopen_dogpile_backends_template")
    assert(open, "cannot load the template backend from " .. path .. " (build the stage "
                 .. "with -Dtests=true): " .. tostring(err))
    open()
end

local serial = 0
local function fresh(what)
    serial = serial + 1
    return ("spec.conf.%s.%d.%d"):format(what, serial, math.floor(C.dp_clock_now() * 1e3) % 1e6)
end

-- Each entry: the backend's name, how to load it, arguments naming a fresh
-- instance, two settings that cannot share one instance, and a refused
-- argument with the message the core writes for it.
local BACKENDS = {
    {
        name = "dogpile.cache.shared_memory",
        load = function() require "dogpile.backends.shared_memory" end,
        args = function(id) return { name = id } end,
        differ = { { max_items = 10 }, { max_items = 20 }, "max_items 10, not 20" },
        bad = { "max_items", "10", 'max_items must be a positive integer, got string "10"' },
        own_lock = false,
    },
    {
        name = "dogpile.cache.template",
        load = load_template,
        args = function(id) return { name = id } end,
        differ = { { max_value_bytes = "1k" }, { max_value_bytes = 2048 },
                   "max_value_bytes 1024, not 2048" },
        bad = { "max_value_bytes", true, "max_value_bytes must be a positive number of bytes "
                .. 'or a size such as "64m", got true' },
        own_lock = true,
    },
}

local function with(t, extra)
    local out = {}
    for k, v in pairs(t) do
        out[k] = v
    end
    for k, v in pairs(extra or {}) do
        out[k] = v
    end
    return out
end

for _, B in ipairs(BACKENDS) do
    local NAME = B.name
    B.load()

    local function region(arguments)
        return cache.make_region():configure(NAME, { arguments = arguments })
    end

    describe(NAME .. " conformance", function()
        support.no_leaks()

        it("get, set and delete bytes of any kind; a miss is NO_VALUE", function()
            local b = region(B.args(fresh("bytes"))).actual_backend
            assert.are.equal(NO_VALUE, b:get("missing"))
            local all = {}
            for i = 0, 255 do
                all[#all + 1] = string.char(i)
            end
            local values = { "", "v", "\0a\0", table.concat(all), ("x"):rep(100000) }
            for i, v in ipairs(values) do
                b:set("k" .. i, v)
            end
            for i, v in ipairs(values) do
                assert.are.equal(v, b:get("k" .. i))
            end
            b:set("k1", "again")
            assert.are.equal("again", b:get("k1"))
            b:delete("k1")
            b:delete("never-set")
            assert.are.equal(NO_VALUE, b:get("k1"))
            b:set("\0key\255", "binary key")
            assert.are.equal("binary key", b:get("\0key\255"))
        end)

        it("the multi forms keep key order and report misses", function()
            local b = region(B.args(fresh("multi"))).actual_backend
            b:set_multi({ a = "1", b = "2", c = "3" })
            assert.are.same({ "1", NO_VALUE, "3", "2" }, b:get_multi({ "a", "x", "c", "b" }))
            b:delete_multi({ "a", "c" })
            assert.are.same({ NO_VALUE, "2", NO_VALUE }, b:get_multi({ "a", "b", "c" }))
            assert.are.same({}, b:get_multi({}))
        end)

        it("regions round-trip values and run a creator once per key", function()
            local r = region(B.args(fresh("region")))
            local calls = 0
            local function creator()
                calls = calls + 1
                return { n = calls, list = { 1, 2.5, "three" }, flag = false }
            end
            local v = r:get_or_create("k", creator)
            assert.are.same({ n = 1, list = { 1, 2.5, "three" }, flag = false }, v)
            assert.are.same(v, r:get_or_create("k", creator))
            assert.are.equal(1, calls)
            r:delete("k")
            assert.are.equal(NO_VALUE, r:get("k"))
        end)

        it("one instance per identity: regions on it share values and one lock per key", function()
            local id = fresh("shared")
            local a, b = region(B.args(id)), region(B.args(id))
            local other = region(B.args(fresh("other")))
            a:set("k", "from a")
            assert.are.equal("from a", b:get("k"))
            assert.are.equal(NO_VALUE, other:get("k"))
            local full = NAME .. ":" .. id
            local dom = C.dp_lock_domain(full, #full)
            assert.are.equal(dom, a.actual_backend.lock_domain)
            assert.are.equal(dom, b.actual_backend.lock_domain)
            assert.are_not.equal(dom, other.actual_backend.lock_domain)
            local m = a.backend:get_mutex("k")
            assert.is_true(m:acquire(false))
            assert.is_false(b.backend:get_mutex("k"):acquire(false))
            local mo = other.backend:get_mutex("k")
            assert.is_true(mo:acquire(false))
            mo:release()
            m:release()
            local mb = b.backend:get_mutex("k")
            assert.is_true(mb:acquire(false))
            mb:release()
        end)

        it("get_or_create from coroutines on two regions of one instance: the creator runs once", function()
            local sched = support.scheduler()
            dogpile.set_sleep(sched.sleep)
            finally(function() dogpile.set_sleep(nil) end)
            local id = fresh("goc")
            local a, b = region(B.args(id)), region(B.args(id))
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
        end)

        it("the same identity with other settings is refused, naming both values", function()
            local id = fresh("mismatch")
            local first = region(with(B.args(id), B.differ[1]))
            raises_here(NAME .. ":", function() region(with(B.args(id), B.differ[2])) end, id, "is already open with " .. B.differ[3])
            -- once every handle is closed, the identity opens with the other settings
            first.actual_backend:close()
            first = nil
            collectgarbage()
            collectgarbage()
            local second = region(with(B.args(id), B.differ[2]))
            second:set("k", "v")
            assert.are.equal("v", second:get("k"))
        end)

        it("refuses an unknown argument, listing the known ones, and a bad value in one format", function()
            local err = raises_here(NAME .. ": unknown argument 'bogus' (known: ", function() region({ bogus = 1 }) end)
            assert.is_truthy(err:find("name", 1, true), err)
            raises_here(NAME .. ": " .. B.bad[3], function() region({ [B.bad[1]] = B.bad[2] }) end)
        end)

        it("reports stats and whether it has a lock of its own", function()
            local r = region(B.args(fresh("stats")))
            r:set("a", 1)
            r:set("b", 2)
            assert.are.equal(1, r:get("a"))
            local st = r.actual_backend:stats()
            assert.are.equal(2, st.items)
            assert.is_true(st.hits >= 1)
            assert.are.equal(B.own_lock, C.dp_backend_has_lock(r.actual_backend.handle) == 1)
        end)
    end)
end
