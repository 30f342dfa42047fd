-- dogpile-cache, the operator's command line: the launcher run as a process
-- (as an operator runs it), and its module in-process where a test needs to
-- see inside.
local cache = require "dogpile.cache"
local cli = require "dogpile.cache.cli"
local support = require "support"

local here = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$") or "."
package.path = here .. "/fixtures/?.lua;" .. package.path
local LAUNCHER = here .. "/../lua/bin/dogpile-cache"

local function sh_quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function read(path)
    local f = io.open(path)
    if not f then return nil end
    local s = f:read("*a")
    f:close()
    return s
end

local TMP = os.tmpname()
os.remove(TMP)
assert(os.execute("mkdir -p " .. sh_quote(TMP)) == 0)

-- Runs the launcher with `args` (an array); returns status, stdout, stderr.
-- The child gets this process's module paths (busted's, from .busted or
-- LUA_PATH) and inherits the rest of the environment: under the asan stage
-- that includes LD_PRELOAD of the sanitizer runtimes, which the child's
-- instrumented core needs as much as this process's does.
local function run(args, env)
    local parts = {}
    for i, a in ipairs(args) do
        parts[i] = sh_quote(a)
    end
    local errfile = TMP .. "/stderr"
    local cmd = ("LUA_PATH=%s LUA_CPATH=%s %s luajit %s %s 2>%s; echo \"rc=$?\""):format(
        sh_quote(package.path), sh_quote(package.cpath), env or "", sh_quote(LAUNCHER),
        table.concat(parts, " "), sh_quote(errfile))
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    local body, rc = out:match("^(.-)rc=(%d+)\n$")
    return tonumber(rc), body, read(errfile)
end

-- Runs the module in-process; returns status, stdout, stderr.
local function main(args)
    local out, err = {}, {}
    local rc = cli.main(args, function(s) out[#out + 1] = s end, function(s) err[#err + 1] = s end)
    return rc, table.concat(out), table.concat(err)
end

local function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

local has_lmdb = package.searchpath("dogpile.backends.lmdb", package.cpath) ~= nil
local has_redis = package.searchpath("dogpile.backends.redis", package.cpath) ~= nil

local CONFIG = TMP .. "/regions.lua"
write(CONFIG, ([[
return {
    mem = { backend = "dogpile.cache.memory", expiration_time = 30 },
    disk = { backend = "dogpile.cache.lmdb", expiration_time = 60, arguments = { path = %q } },
    short = { backend = "dogpile.cache.lmdb", expiration_time = 0.2, arguments = { path = %q } },
    down = { backend = "dogpile.cache.redis", arguments = { host = "127.0.0.1", port = 1,
             socket_timeout = 1 } },
    shared = { backend = "thirdparty.cache.shared_inv" },
}
]]):format(TMP .. "/disk", TMP .. "/short"))

describe("dogpile-cache", function()
    support.no_leaks()

    teardown(function()
        collectgarbage()
        os.execute("rm -rf " .. sh_quote(TMP))
    end)

    describe("help", function()
        it("prints the usage for --help, -h and help, with status 0", function()
            for _, a in ipairs({ "--help", "-h", "help" }) do
                local rc, out, err = run({ a })
                assert.are.equal(0, rc)
                assert.are.equal("", err)
                assert.is_truthy(out:find("Usage: dogpile-cache [--config FILE] COMMAND", 1, true))
                for _, c in ipairs({ "list", "get", "inspect", "delete", "invalidate", "stats", "bench" }) do
                    assert.is_truthy(out:find("\n  " .. c .. " ", 1, true), c)
                end
            end
        end)

        it("has --help for every command, needing no config", function()
            for _, c in ipairs({ "list", "get", "inspect", "delete", "invalidate", "stats", "bench" }) do
                local rc, out, err = run({ c, "--help" })
                assert.are.equal(0, rc, c)
                assert.are.equal("", err, c)
                assert.is_truthy(out:find("Usage: dogpile-cache [--config FILE] " .. c, 1, true), c)
            end
            local rc, out = main({ "help", "invalidate" })
            assert.are.equal(0, rc)
            assert.is_truthy(out:find("deletes nothing", 1, true))
        end)
    end)

    describe("errors", function()
        it("names a missing config file", function()
            local rc, out, err = run({ "--config", TMP .. "/nope.lua", "list" })
            assert.are.equal(1, rc)
            assert.are.equal("", out)
            assert.is_truthy(err:find("^dogpile%-cache: cannot load config '" .. TMP:gsub("%p", "%%%0")
                                      .. "/nope.lua': "))
        end)

        it("takes the config from DOGPILE_CACHE_CONFIG, and says when there is none", function()
            local rc, out = run({ "list" }, "DOGPILE_CACHE_CONFIG=" .. sh_quote(CONFIG))
            assert.are.equal(0, rc)
            assert.is_truthy(out:find("mem\tdogpile.cache.memory", 1, true))
            local rc2, _, err = run({ "list" }, "DOGPILE_CACHE_CONFIG=")
            assert.are.equal(1, rc2)
            assert.is_truthy(err:find("no regions config file", 1, true))
        end)

        it("names an unknown region and lists the known ones", function()
            local rc, _, err = run({ "--config", CONFIG, "get", "nope", "k" })
            assert.are.equal(1, rc)
            assert.are.equal("dogpile-cache: unknown region 'nope' (regions: disk, down, mem, shared, short)\n", err)
        end)

        it("rejects an unknown command or option, and a missing key", function()
            local rc, _, err = main({ "--config", CONFIG, "frobnicate" })
            assert.are.equal(1, rc)
            assert.is_truthy(err:find("unknown command 'frobnicate'", 1, true))
            rc, _, err = main({ "--bogus" })
            assert.are.equal(1, rc)
            assert.is_truthy(err:find("unknown option '--bogus'", 1, true))
            rc, _, err = main({ "--config", CONFIG, "get", "mem" })
            assert.are.equal(1, rc)
            assert.is_truthy(err:find("missing KEY", 1, true))
            rc, _, err = main({ "--config", CONFIG, "bench", "mem", "--n", "zero" })
            assert.are.equal(1, rc)
            assert.is_truthy(err:find("--n expects a positive integer", 1, true))
            rc, _, err = main({})
            assert.are.equal(1, rc)
            assert.is_truthy(err:find("missing COMMAND", 1, true))
        end)

        it("reports a backend that is down with the backend's error", function()
            if not has_redis then
                error("the redis backend is not built (libhiredis-dev; .ci/test installs it)", 0)
                return
            end
            local rc, out, err = run({ "--config", CONFIG, "get", "down", "k" })
            assert.are.equal(1, rc)
            assert.are.equal("", out)
            assert.is_truthy(err:find("^dogpile%-cache: dogpile%.cache%.redis: get 'k' failed: "), err)
        end)
    end)

    it("lists the regions without opening them", function()
        local rc, out, err = run({ "--config", CONFIG, "list" })
        assert.are.equal(0, rc)
        assert.are.equal("", err)
        assert.are.equal(table.concat({
            "disk\tdogpile.cache.lmdb\texpiration_time=60",
            "down\tdogpile.cache.redis\tno expiration",
            "mem\tdogpile.cache.memory\texpiration_time=30",
            "shared\tthirdparty.cache.shared_inv\tno expiration",
            "short\tdogpile.cache.lmdb\texpiration_time=0.2",
        }, "\n") .. "\n", out)
    end)

    describe("with a backend shared between processes (lmdb)", function()
        local regions
        before_each(function()
            if has_lmdb and not regions then
                regions = cache.load_regions({ disk = dofile(CONFIG).disk, short = dofile(CONFIG).short })
            end
        end)

        it("gets, inspects and deletes a value the application stored", function()
            if not has_lmdb then
                error("the lmdb backend is not built (liblmdb-dev; .ci/test installs it)", 0)
                return
            end
            regions.disk:set("user:1", { name = "Ada", langs = { "lua", "c" }, admin = false })
            local rc, out, err = run({ "--config", CONFIG, "get", "disk", "user:1" })
            assert.are.equal(0, rc, err)
            assert.are.same({ name = "Ada", langs = { "lua", "c" }, admin = false },
                            assert(loadstring("return " .. out))())

            rc, out, err = run({ "--config", CONFIG, "inspect", "disk", "user:1" })
            assert.are.equal(0, rc, err)
            local ct = regions.disk:get_value_metadata("user:1").metadata.ct
            assert.is_truthy(out:find("region:     disk (dogpile.cache.lmdb)", 1, true))
            assert.is_truthy(out:find("key:        \"user:1\"", 1, true))
            assert.is_truthy(out:find("created:    " .. os.date("!%Y-%m-%dT%H:%M:", math.floor(ct)), 1, true))
            assert.is_truthy(out:find(("(%.6f)"):format(ct), 1, true))
            assert.is_truthy(out:find("\nage:        %d+%.%d+s\n"))
            assert.is_truthy(out:find("expiration: 1m 0s", 1, true))
            assert.is_truthy(out:find("expired:    no, expires in", 1, true))
            assert.is_truthy(out:find('name = "Ada"', 1, true))

            rc, out = run({ "--config", CONFIG, "delete", "disk", "user:1" })
            assert.are.equal(0, rc)
            assert.are.equal("deleted key 'user:1' from region 'disk'\n", out)
            assert.are.equal(cache.NO_VALUE, regions.disk:get("user:1"))

            rc, out, err = run({ "--config", CONFIG, "get", "disk", "user:1" })
            assert.are.equal(2, rc)
            assert.are.equal("", out)
            assert.are.equal("dogpile-cache: no value for key 'user:1' in region 'disk'\n", err)
            rc = run({ "--config", CONFIG, "inspect", "disk", "user:1" })
            assert.are.equal(2, rc)
        end)

        it("shows an expired value in inspect, and none in get", function()
            if not has_lmdb then
                error("the lmdb backend is not built (liblmdb-dev; .ci/test installs it)", 0)
                return
            end
            regions.short:set("k", "old")
            require("dogpile.lib").C.dp_clock_sleep(0.3)
            local rc, out = run({ "--config", CONFIG, "inspect", "short", "k" })
            assert.are.equal(0, rc)
            assert.is_truthy(out:find("expired:    yes, ", 1, true), out)
            assert.is_truthy(out:find('value:      "old"', 1, true), out)
            rc = run({ "--config", CONFIG, "get", "short", "k" })
            assert.are.equal(2, rc)
        end)

        it("prints region and backend stats, and benchmarks", function()
            if not has_lmdb then
                error("the lmdb backend is not built (liblmdb-dev; .ci/test installs it)", 0)
                return
            end
            local rc, out, err = run({ "--config", CONFIG, "stats", "disk" })
            assert.are.equal(0, rc, err)
            for _, c in ipairs({ "hits", "misses", "creations", "stale_served", "lock_waits",
                                 "errors", "evictions", "lock_overruns" }) do
                assert.is_truthy(out:find("\n  " .. c .. " +%d+\n"), c)
            end
            assert.is_truthy(out:find("\nbackend:\n  items ", 1, true))

            rc, out, err = run({ "--config", CONFIG, "bench", "disk", "--n", "50" })
            assert.are.equal(0, rc, err)
            assert.is_truthy(out:find("region disk (dogpile.cache.lmdb), 50 gets each, microseconds:", 1, true))
            assert.is_truthy(out:find("\n  hit:  mean [%d.]+  p50 [%d.]+  p99 [%d.]+  max [%d.]+\n"))
            assert.is_truthy(out:find("\n  miss: mean [%d.]+", 1))
            assert.are.equal("", err)
        end)
    end)

    it("stats every region in-process, and benchmarks a memory region", function()
        local rc, out, err = main({ "--config", CONFIG, "stats", "mem" })
        assert.are.equal(0, rc, err)
        assert.is_truthy(out:find("region mem (dogpile.cache.memory), this process:\n  hits ", 1, true))
        rc, out, err = main({ "--config", CONFIG, "bench", "mem", "-n", "20" })
        assert.are.equal(0, rc, err)
        assert.is_truthy(out:find("20 gets each", 1, true))
    end)

    describe("invalidate", function()
        it("refuses, saying why, where invalidation is per process", function()
            local rc, out, err = run({ "--config", CONFIG, "invalidate", "mem" })
            assert.are.equal(1, rc)
            assert.are.equal("", out)
            assert.is_truthy(err:find("^dogpile%-cache: region 'mem' %(backend dogpile%.cache%.memory%) "
                                      .. "keeps its invalidation in each process's Lua state"))
            assert.is_truthy(err:find("nothing was done", 1, true))
        end)

        it("invalidates, hard or soft, through a backend's shared invalidator", function()
            local mod = require "thirdparty.cache.shared_inv"
            local rc, out, err = main({ "--config", CONFIG, "invalidate", "shared" })
            assert.are.equal(0, rc, err)
            assert.are.equal("invalidated region 'shared' (hard)\n", out)
            rc, out = main({ "--config", CONFIG, "invalidate", "shared", "--soft" })
            assert.are.equal(0, rc)
            assert.are.equal("invalidated region 'shared' (soft)\n", out)
            assert.are.same({ true, false }, mod.invalidations)
        end)
    end)

    describe("pretty", function()
        local cases = {
            { "abc", '"abc"' },
            { 'a"b\nc', '"a\\"b\\nc"' },
            { 1, "1" },
            { 1.5, "1.5" },
            { -0.1, "-0.10000000000000001" },
            { 1 / 0, "math.huge" },
            { true, "true" },
            { false, "false" },
            { {}, "{}" },
            { { 1, 2 }, "{\n  1,\n  2,\n}" },
            { { b = 1, a = { x = "y" } }, '{\n  a = {\n    x = "y",\n  },\n  b = 1,\n}' },
            { { ["end"] = 1, ["a b"] = 2, [10] = 3 }, '{\n  [10] = 3,\n  ["a b"] = 2,\n  ["end"] = 1,\n}' },
        }
        for i, c in ipairs(cases) do
            it("prints case " .. i .. " as a Lua literal", function()
                assert.are.equal(c[2], cli.pretty(c[1]))
            end)
        end

        it("marks cycles", function()
            local t = {}
            t.self = t
            assert.are.equal("{\n  self = <cycle>,\n}", cli.pretty(t))
        end)
    end)
end)
