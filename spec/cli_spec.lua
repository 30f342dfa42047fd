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
                for _, c in ipairs({ "check", "list", "get", "inspect", "delete", "invalidate", "keys",
                                 "flush", "stats", "bench" }) do
                    assert.is_truthy(out:find("\n  " .. c .. " ", 1, true), c)
                end
            end
        end)

        it("has --help for every command, needing no config", function()
            for _, c in ipairs({ "check", "list", "get", "inspect", "delete", "invalidate", "keys",
                                 "flush", "stats", "bench" }) do
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
            -- What the file holds, read by the CLI's own process.
            regions.disk:delete("user:1")
            local _, out0 = run({ "--config", CONFIG, "stats", "disk" })
            local items0 = assert(tonumber(out0:match("\n  items +(%d+) ")), out0)
            regions.disk:set("stats:1", 1)
            regions.disk:set("stats:2", 2)
            local rc, out, err = run({ "--config", CONFIG, "stats", "disk" })
            assert.are.equal(0, rc, err)
            assert.is_truthy(out:find("^region disk %(dogpile%.cache%.lmdb%), its storage:\n"), out)
            assert.are.equal(items0 + 2, tonumber(out:match("\n  items +(%d+) ")), out)
            assert.is_truthy(out:find("\n  bytes +%d+ "), out)
            assert.is_nil(out:find("hits", 1, true), out)
            rc, out = run({ "--config", CONFIG, "--json", "stats", "disk" })
            assert.are.equal(0, rc)
            assert.is_truthy(out:find('"storage":{"bytes":%d+,"expired":%d+,"items":' .. (items0 + 2) .. "}"), out)

            rc, out, err = run({ "--config", CONFIG, "bench", "disk", "--n", "50" })
            assert.are.equal(0, rc, err)
            assert.is_truthy(out:find("region disk (dogpile.cache.lmdb), 50 gets each, microseconds:", 1, true))
            assert.is_truthy(out:find("\n  hit:  mean [%d.]+  p50 [%d.]+  p99 [%d.]+  max [%d.]+\n"))
            assert.is_truthy(out:find("\n  miss: mean [%d.]+", 1))
            assert.are.equal("", err)
        end)
    end)

    it("says why a memory region's storage cannot be read, and benchmarks it", function()
        local rc, out, err = main({ "--config", CONFIG, "stats", "mem" })
        assert.are.equal(0, rc, err)
        assert.are.equal("region mem (dogpile.cache.memory): its storage cannot be read from here: "
                         .. "its values live in the Lua state of each application process\n", out)
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

    describe("check", function()
        it("opens every region and fails on a misspelled backend, naming the region", function()
            local bad = TMP .. "/check_bad.lua"
            write(bad, ([[
return {
    mem = { backend = "dogpile.cache.memory" },
    typo = { backend = "dogpile.cache.memroy" },
    disk = { backend = "dogpile.cache.lmdb", arguments = { path = %q } },
}
]]):format(TMP .. "/check_disk"))
            local rc, out, err = run({ "--config", bad, "check" })
            assert.are.equal(1, rc, err)
            assert.is_truthy(out:find("disk\tdogpile.cache.lmdb\tok\n", 1, true), out)
            assert.is_truthy(out:find("mem\tdogpile.cache.memory\tok\n", 1, true), out)
            assert.is_truthy(out:find("typo\tdogpile.cache.memroy\tFAIL: dogpile.cache: unknown backend "
                                      .. "'dogpile.cache.memroy'", 1, true), out)
            assert.are.equal("dogpile-cache: 1 of 3 regions in '" .. bad .. "' have problems\n", err)

            rc, out = run({ "--config", bad, "--json", "check" })
            assert.are.equal(1, rc)
            assert.is_truthy(out:find('^{"ok":false,"problems":1,"regions":%['), out)
            assert.is_truthy(out:find('{"backend":"dogpile.cache.memroy","name":"typo","ok":false,'
                                      .. '"problem":"dogpile.cache: unknown backend', 1, true), out)
        end)

        it("fails on an argument a backend refuses and on a server that is down", function()
            local bad = TMP .. "/check_args.lua"
            write(bad, ([[
return {
    disk = { backend = "dogpile.cache.lmdb", arguments = { path = %q, map_sise = 1 } },
    down = { backend = "dogpile.cache.redis", arguments = { host = "127.0.0.1", port = 1 } },
}
]]):format(TMP .. "/check_disk2"))
            local rc, out = run({ "--config", bad, "check" })
            assert.are.equal(1, rc)
            assert.is_truthy(out:find("disk\tdogpile.cache.lmdb\tFAIL: [^\n]*map_sise"), out)
            assert.is_truthy(out:find("down\tdogpile.cache.redis\tFAIL: dogpile.cache.redis: [^\n]*[Rr]efused"), out)
        end)

        it("exits 0 when every region opens", function()
            local good = TMP .. "/check_good.lua"
            write(good, ([[
return {
    mem = { backend = "dogpile.cache.memory" },
    disk = { backend = "dogpile.cache.lmdb", arguments = { path = %q } },
}
]]):format(TMP .. "/check_disk3"))
            local rc, out, err = run({ "--config", good, "check" })
            assert.are.equal(0, rc, err)
            assert.are.equal("disk\tdogpile.cache.lmdb\tok\nmem\tdogpile.cache.memory\tok\n", out)
            assert.are.equal("", err)
        end)
    end)

    describe("keys and flush", function()
        it("lists an lmdb region's keys by glob, with a limit, and flushes them", function()
            local conf = TMP .. "/keys.lua"
            write(conf, ([[
return {
    k = { backend = "dogpile.cache.lmdb", arguments = { path = %q, expiration_time = 1 } },
    mem = { backend = "dogpile.cache.memory" },
}
]]):format(TMP .. "/keys_disk"))
            do
                local r = cache.load_regions(conf)
                for i = 1, 12 do
                    r.k:set(("user:%02d"):format(i), i)
                end
                r.k:set("page:a", "a")
                r.k:set("odd\nkey", "b")
                r.k.actual_backend:close()
            end
            local t_set = support.now()
            local rc, out, err = run({ "--config", conf, "keys", "k" })
            assert.are.equal(0, rc, err)
            local lines = {}
            for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
            assert.are.equal(14, #lines - 1) -- "odd\nkey" prints on two lines
            assert.are.equal("page:a", lines[3])

            rc, out, err = run({ "--config", conf, "keys", "k", "user:0[2-4]" })
            assert.are.equal(0, rc, err)
            assert.are.equal("user:02\nuser:03\nuser:04\n", out)

            rc, out, err = run({ "--config", conf, "keys", "k", "user:*", "--limit", "3" })
            assert.are.equal(0, rc)
            assert.are.equal("user:01\nuser:02\nuser:03\n", out)
            assert.are.equal("dogpile-cache: more than 3 keys; the first 3 are shown (--limit N)\n", err)

            rc, out = run({ "--config", conf, "--json", "keys", "k", "odd*" })
            assert.are.equal(0, rc)
            assert.is_truthy(out:find('^{"backend":"dogpile.cache.lmdb","keys":%[{"expired":%a+,'
                                      .. '"key":"odd\\u000akey"}%],"limit":1000,"pattern":"odd%*",'
                                      .. '"region":"k","truncated":false}\n$'), out)

            support.sleep(math.max(0, t_set + 1.1 - support.now()))
            rc, out = run({ "--config", conf, "keys", "k", "page:?" })
            assert.are.equal("page:a\t(expired)\n", out)

            rc, out, err = run({ "--config", conf, "flush", "k" })
            assert.are.equal(0, rc, err)
            assert.are.equal("flushed region 'k' (dogpile.cache.lmdb): 14 values deleted\n", out)
            rc, out = run({ "--config", conf, "--json", "keys", "k" })
            assert.are.equal(0, rc)
            assert.is_truthy(out:find('"keys":[],', 1, true), out)
            local r = cache.load_regions(conf)
            assert.are.equal(cache.NO_VALUE, r.k:get("user:01"))
            r.k:set("after", 1) -- the environment is still usable
            assert.are.equal(1, r.k:get("after"))
            r.k.actual_backend:close()
        end)

        it("refuses where the backend cannot enumerate, saying why", function()
            local rc, out, err = run({ "--config", CONFIG, "keys", "mem" })
            assert.are.equal(1, rc)
            assert.are.equal("", out)
            assert.are.equal("dogpile-cache: region 'mem': cannot list the keys of dogpile.cache.memory: "
                             .. "its values live in the Lua state of each application process\n", err)
            rc, _, err = run({ "--config", CONFIG, "flush", "mem" })
            assert.are.equal(1, rc)
            assert.is_truthy(err:find("cannot flush dogpile.cache.memory from the CLI", 1, true), err)
            rc, _, err = run({ "--config", CONFIG, "keys", "nope" })
            assert.are.equal(1, rc)
            assert.is_truthy(err:find("unknown region 'nope'", 1, true), err)
            rc, _, err = run({ "--config", CONFIG, "keys", "disk", "--limit", "0" })
            assert.are.equal(1, rc)
            assert.is_truthy(err:find("--limit expects a positive integer", 1, true), err)
        end)
    end)

    describe("with a redis server", function()
        local port, dir
        setup(function()
            if not has_redis then
                return
            end
            dir = TMP .. "/redis"
            os.execute("mkdir -p " .. sh_quote(dir))
            for _ = 1, 20 do
                port = math.random(20000, 31999)
                if support.sh("bash -c '(exec 3<>/dev/tcp/127.0.0.1/" .. port .. ") 2>/dev/null && echo busy'") == "" then
                    break
                end
            end
            support.sh(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s "
                        .. "--daemonize yes --pidfile %s/redis.pid --logfile %s/redis.log")
                       :format(port, sh_quote(dir), sh_quote(dir), sh_quote(dir)))
            for _ = 1, 200 do
                if support.sh("redis-cli -p " .. port .. " ping"):match("PONG") then
                    break
                end
                support.sleep(0.02)
            end
        end)
        teardown(function()
            local pid = dir and read(dir .. "/redis.pid")
            if pid and pid:match("%d+") then
                os.execute("kill " .. pid:match("%d+") .. " 2>/dev/null")
            end
        end)

        it("counts what the database holds, lists and flushes its keys, not its locks", function()
            if not has_redis then
                error("the redis backend is not built (libhiredis-dev; .ci/test installs it)", 0)
            end
            local conf = TMP .. "/redis.lua"
            write(conf, ([[
return {
    r = { backend = "dogpile.cache.redis", arguments = { url = "redis://127.0.0.1:%d/3" } },
    other = { backend = "dogpile.cache.redis", arguments = { url = "redis://127.0.0.1:%d/4" } },
}
]]):format(port, port))
            local regions = cache.load_regions(conf)
            for i = 1, 25 do
                regions.r:set("item:" .. i, { i = i })
            end
            regions.other:set("keep", 1)
            -- A lock held by the application: a key of the db, not a value.
            local m = regions.r.actual_backend:get_mutex("item:1")
            assert.is_true(m:acquire(false))

            local rc, out, err = run({ "--config", conf, "stats", "r" })
            assert.are.equal(0, rc, err)
            assert.is_truthy(out:find("\n  items +26 +keys in db 3 %(DBSIZE%)\n"), out)
            assert.is_truthy(out:find("\n  locks +1 "), out)
            assert.is_truthy(out:find("\n  bytes +%d+ "), out)

            rc, out, err = run({ "--config", conf, "keys", "r", "item:1*" })
            assert.are.equal(0, rc, err)
            assert.are.same({ "item:1", "item:10", "item:11", "item:12", "item:13", "item:14",
                              "item:15", "item:16", "item:17", "item:18", "item:19" },
                            (function() local t = {} for l in out:gmatch("[^\n]+") do t[#t + 1] = l end return t end)())
            rc, out = run({ "--config", conf, "--json", "keys", "r", "--limit", "5" })
            assert.are.equal(0, rc)
            assert.is_truthy(out:find('"truncated":true', 1, true), out)
            local n = 0
            for _ in out:gmatch('"key":') do n = n + 1 end
            assert.are.equal(5, n)

            rc, out, err = run({ "--config", conf, "flush", "r" })
            assert.are.equal(0, rc, err)
            assert.are.equal("flushed region 'r' (dogpile.cache.redis): 25 values deleted\n", out)
            assert.are.equal(cache.NO_VALUE, regions.r:get("item:2"))
            assert.are.equal(1, regions.other:get("keep"))
            m:release()
            rc, out = run({ "--config", conf, "--json", "stats", "r" })
            assert.is_truthy(out:find('"items":0', 1, true), out)
        end)
    end)

    describe("--json", function()
        it("prints list, get, inspect, delete and bench as JSON documents", function()
            local conf = TMP .. "/json.lua"
            write(conf, ([[
return { d = { backend = "dogpile.cache.lmdb", expiration_time = 60, arguments = { path = %q } } }
]]):format(TMP .. "/json_disk"))
            do
                local r = cache.load_regions(conf)
                r.d:set("v", { name = "Ada", tags = { "x", "y" }, bin = "\0\255\"\\", n = 1.5 })
                r.d.actual_backend:close()
            end
            local rc, out = run({ "--config", conf, "--json", "list" })
            assert.are.equal(0, rc)
            assert.are.equal('{"regions":[{"backend":"dogpile.cache.lmdb","expiration_time":60,"name":"d"}]}\n', out)
            rc, out = run({ "--config", conf, "get", "d", "v", "--json" })
            assert.are.equal(0, rc)
            assert.are.equal('{"key":"v","region":"d","value":{"bin":"\\u0000\\u00ff\\"\\\\","n":1.5,'
                             .. '"name":"Ada","tags":["x","y"]}}\n', out)
            rc, out = run({ "--config", conf, "--json", "inspect", "d", "v" })
            assert.are.equal(0, rc)
            assert.is_truthy(out:find('"expired":false', 1, true), out)
            assert.is_truthy(out:find('"created":%d+%.?%d*,"created_iso":"%d%d%d%d%-'), out)
            rc, out = run({ "--config", conf, "--json", "bench", "d", "--n", "5" })
            assert.are.equal(0, rc)
            assert.is_truthy(out:find('"hit":{"max":[%d.e-]+,"mean":'), out)
            rc, out = run({ "--config", conf, "--json", "delete", "d", "v" })
            assert.are.equal('{"deleted":true,"key":"v","region":"d"}\n', out)
        end)

        it("writes valid JSON for any bytes", function()
            assert.are.equal('"a\\u000ab\\u0001\\u00c3(\\u00e2\\u0082"', cli.json("a\nb\1\195(\226\130"))
            assert.are.equal('"h\195\169 \226\130\172"', cli.json("h\195\169 \226\130\172"))
            assert.are.equal('{"1":true,"x":[1,null]}', cli.json({ [1] = true, x = { 1, 0 / 0 } }))
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
