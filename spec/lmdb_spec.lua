-- dogpile.cache.lmdb: region methods, persistence across processes, errors
-- naming the path, the lock between processes (8-process stampede, SIGKILLed
-- and stuck holders), eviction in a small map. Child processes are real
-- `luajit` processes that inherit LUA_PATH and LUA_CPATH.
local cache = require "dogpile.cache"
local support = require "support"
local together = require "together"
local now, sh, write, read = support.now, support.sh, support.write, support.read
local sleep = support.sleep
local ffi = require "ffi"

local NO_VALUE = cache.NO_VALUE

pcall(ffi.cdef, [[ int usleep(unsigned int usec); ]])



local function mktemp()
    return (sh("mktemp -d /tmp/dogpile-lmdb-XXXXXX"):gsub("%s+$", ""))
end

local dirs = {}
local function tmpdir()
    local d = mktemp()
    dirs[#dirs + 1] = d
    return d
end



local function count_lines(path)
    local s = read(path) or ""
    local _, n = s:gsub("\n", "")
    return n
end

-- A child script: `prelude` opens region `r` on arg[1] with the arguments
-- in arg[2] (a Lua table constructor), then runs `body`.
local PRELUDE = [[
local cache = require "dogpile.cache"
local ffi = require "ffi"
pcall(ffi.cdef, "int usleep(unsigned int usec);")
local function sleep(s) ffi.C.usleep(math.floor(math.max(s, 0) * 1e6)) end
local function now() return require("dogpile").now() end
local path, args, exp = arg[1], assert(loadstring("return " .. arg[2]))(), tonumber(arg[3])
args.path = path
local r = cache.make_region():configure("dogpile.cache.lmdb",
    { expiration_time = exp, arguments = args })
local function append(file, line)
    local f = assert(io.open(file, "a")) -- O_APPEND: one write per line
    f:write(line, "\n")
    f:close()
end
]]

local function script(dir, name, body)
    local path = dir .. "/" .. name .. ".lua"
    write(path, PRELUDE .. together.CHILD .. body)
    return path
end

local function run(file, ...)
    local args = { ... }
    for i, a in ipairs(args) do
        args[i] = "'" .. tostring(a) .. "'"
    end
    return sh("luajit " .. file .. " " .. table.concat(args, " "))
end

local function region(path, arguments, exp)
    arguments = arguments or {}
    arguments.path = path
    return cache.make_region():configure("dogpile.cache.lmdb",
        { expiration_time = exp, arguments = arguments })
end

describe("dogpile.cache.lmdb", function()
    support.no_leaks()

    teardown(function()
        for _, d in ipairs(dirs) do
            os.execute("rm -rf '" .. d .. "' '" .. d .. "-file'*")
        end
    end)

    describe("region methods", function()
        local r, dir
        before_each(function()
            dir = tmpdir()
            r = region(dir, { map_size = "4m" })
        end)

        it("get, set, delete and metadata", function()
            assert.are.equal(NO_VALUE, r:get("missing"))
            r:set("t", { 1, 2, name = "x", nested = { false } })
            assert.are.same({ 1, 2, name = "x", nested = { false } }, r:get("t"))
            r:set("nil", nil)
            assert.is_nil(r:get("nil"))
            r:set("false", false)
            assert.are.equal(false, r:get("false"))
            local md = r:get_value_metadata("t")
            assert.are.equal("x", md.payload.name)
            assert.is_true(md.metadata.ct <= now() and md.metadata.ct > now() - 5)
            r:delete("t")
            assert.are.equal(NO_VALUE, r:get("t"))
            r:delete("t") -- deleting a missing key is fine
            r:set("", "empty key")
            assert.are.equal("empty key", r:get(""))
            local long = string.rep("k", 2000) -- mangled: LMDB keys are <= 511 bytes
            r:set(long, "long key")
            assert.are.equal("long key", r:get(long))
        end)

        it("multi forms", function()
            r:set_multi({ a = 1, b = 2, c = 3 })
            assert.are.same({ 1, NO_VALUE, 3 }, r:get_multi({ "a", "zz", "c" }))
            r:delete_multi({ "a", "b" })
            assert.are.same({ NO_VALUE, NO_VALUE, 3 }, r:get_multi({ "a", "b", "c" }))
            local calls = 0
            local vals = r:get_or_create_multi({ "c", "x", "y", "x" }, function(...)
                calls = calls + 1
                local out = {}
                for i, k in ipairs({ ... }) do
                    out[i] = k .. "!"
                end
                return out
            end)
            assert.are.same({ 3, "x!", "y!", "x!" }, vals)
            assert.are.equal(1, calls)
            assert.are.equal("y!", r:get("y"))
        end)

        it("get_or_create, expiration, invalidation and stats", function()
            local calls = 0
            local function creator()
                calls = calls + 1
                return "v" .. calls
            end
            assert.are.equal("v1", r:get_or_create("k", creator))
            assert.are.equal("v1", r:get_or_create("k", creator))
            assert.are.equal("v1", r:get_or_create("k", creator, 60, nil))
            r:invalidate(true)
            assert.are.equal(NO_VALUE, r:get("k"))
            assert.are.equal("v2", r:get_or_create("k", creator))
            r:invalidate(false)
            assert.are.equal("v2", r:get("k", nil, true))
            assert.are.equal("v3", r:get_or_create("k", creator))
            assert.are.equal("no", r:get_or_create("n", function() return "no" end, nil,
                function() return false end))
            assert.are.equal(NO_VALUE, r:get("n"))
            local st = r:stats()
            assert.is_true(st.hits > 0 and st.misses > 0)
            assert.are.equal(4, st.creations)
            local bs = r.actual_backend:stats()
            assert.is_true(bs.items >= 1 and bs.bytes > 0)
        end)

        it("decorators", function()
            local calls = 0
            local f = r:cache_on_arguments({ namespace = "sq" })(function(x)
                calls = calls + 1
                return x * x
            end)
            assert.are.equal(9, f(3))
            assert.are.equal(9, f(3))
            assert.are.equal(1, calls)
            f:invalidate(3)
            assert.are.equal(9, f(3))
            assert.are.equal(2, calls)
            local g = r:cache_multi_on_arguments({ namespace = "m" })(function(...)
                local out = {}
                for i, v in ipairs({ ... }) do
                    out[i] = v + 1
                end
                return out
            end)
            assert.are.same({ 2, 3 }, g(1, 2))
            assert.are.same({ 2, 3 }, g:get(1, 2))
        end)

        it("configure_from_config and two regions on one path share the environment", function()
            local r2 = cache.make_region():configure_from_config({
                ["cache.backend"] = "dogpile.cache.lmdb",
                ["cache.arguments.path"] = dir,
                ["cache.arguments.map_size"] = "4m",
            }, "cache.")
            r:set("shared", "yes")
            assert.are.equal("yes", r2:get("shared"))
            assert.are.equal(r.actual_backend.lock_domain, r2.actual_backend.lock_domain)
            assert.has_error(function()
                region(dir, { map_size = "8m" })
            end, nil)
            local ok, err = pcall(region, dir, { map_size = "8m" })
            assert.is_false(ok)
            -- the core's one mismatch format: the path, then both values
            assert.matches(dir .. " is already open with map_size 4194304, not 8388608; every "
                           .. "region sharing it must agree", err, 1, true)
        end)

        it("refuses bad arguments with clear errors", function()
            local cases = {
                { {}, "the argument 'path' is required" },
                { { path = dir, bogus = 1 }, "unknown argument 'bogus'" },
                { { path = dir, map_size = "lots" }, "map_size must be" },
                { { path = dir, sync = "sometimes" }, "sync must be" },
                { { path = dir, on_full = "panic" }, "on_full must be" },
                { { path = dir, lock_timeout = -1 }, "lock_timeout must be a positive number" },
                { { path = dir, lock_timeout = "5" }, "lock_timeout must be a positive number" },
            }
            for _, c in ipairs(cases) do
                local ok, err = pcall(function()
                    cache.make_region():configure("dogpile.cache.lmdb", { arguments = c[1] })
                end)
                assert.is_false(ok)
                assert.matches(c[2], err, 1, true)
            end
        end)

        it("takes its lock per key: try-acquire is refused while held, across mutexes", function()
            local b = r.actual_backend
            local m1, m2 = b:get_mutex("key"), b:get_mutex("key")
            assert.is_true(m1:acquire(false))
            assert.is_false(m2:acquire(false))
            local other = b:get_mutex("other")
            assert.is_true(other:acquire(false))
            other:release()
            assert.has_error(function() other:release() end)
            m1:release()
            assert.is_true(m2:acquire(false))
            m2:release()
        end)
    end)

    describe("errors naming the path", function()
        it("a directory holding a file that is not LMDB", function()
            local dir = tmpdir()
            write(dir .. "/data.mdb", string.rep("not an lmdb file\n", 1000))
            local ok, err = pcall(region, dir)
            assert.is_false(ok)
            assert.matches("'" .. dir .. "' is not an LMDB environment", err, 1, true)
        end)

        it("a regular file that is not LMDB", function()
            local file = tmpdir() .. "-file"
            write(file, string.rep("garbage ", 2000))
            local ok, err = pcall(region, file)
            assert.is_false(ok)
            assert.matches("'" .. file .. "' is not an LMDB environment", err, 1, true)
        end)

        it("a path that cannot be created (root cannot either)", function()
            local ok, err = pcall(region, "/etc/passwd/cache")
            assert.is_false(ok)
            assert.matches("cannot create the directory '/etc/passwd/cache'", err, 1, true)
            ok, err = pcall(region, "/proc/dogpile-cache")
            assert.is_false(ok)
            assert.matches("'/proc/dogpile-cache'", err, 1, true)
        end)

        it("an LMDB environment that dogpile did not make", function()
            local dir = tmpdir()
            -- Write one record with liblmdb itself, as another program would.
            pcall(ffi.cdef, [[
                typedef struct MDB_env MDB_env; typedef struct MDB_txn MDB_txn;
                typedef struct { size_t mv_size; const void *mv_data; } MDB_val;
                int mdb_env_create(MDB_env **env);
                int mdb_env_open(MDB_env *env, const char *path, unsigned int flags, int mode);
                void mdb_env_close(MDB_env *env);
                int mdb_txn_begin(MDB_env *env, MDB_txn *parent, unsigned int flags, MDB_txn **txn);
                int mdb_txn_commit(MDB_txn *txn);
                int mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, unsigned int *dbi);
                int mdb_put(MDB_txn *txn, unsigned int dbi, MDB_val *key, MDB_val *data, unsigned int flags);
            ]])
            local L = ffi.load("lmdb")
            local env, txn, dbi = ffi.new("MDB_env*[1]"), ffi.new("MDB_txn*[1]"), ffi.new("unsigned int[1]")
            assert.are.equal(0, L.mdb_env_create(env))
            assert.are.equal(0, L.mdb_env_open(env[0], dir, 0, 420))
            assert.are.equal(0, L.mdb_txn_begin(env[0], nil, 0, txn))
            assert.are.equal(0, L.mdb_dbi_open(txn[0], nil, 0, dbi))
            local k, v = ffi.new("MDB_val", 3, "foo"), ffi.new("MDB_val", 3, "bar")
            assert.are.equal(0, L.mdb_put(txn[0], dbi[0], k, v, 0))
            assert.are.equal(0, L.mdb_txn_commit(txn[0]))
            L.mdb_env_close(env[0])
            local ok, err = pcall(region, dir)
            assert.is_false(ok)
            assert.matches("'" .. dir .. "' is an LMDB environment that dogpile did not make", err, 1, true)
        end)
    end)

    describe("between processes", function()
        it("values outlive the process that set them, and fork()ed children reopen", function()
            local dir = tmpdir()
            local f = script(dir, "setter", [[
r:set("from-child", { n = 42 })
-- fork: the child must reopen its own environment
ffi.cdef "int fork(void); int waitpid(int pid, int *status, int options); void _exit(int);"
local pid = ffi.C.fork()
if pid == 0 then
    local ok = pcall(function()
        assert(r:get("from-child").n == 42)
        r:set("from-grandchild", "forked")
    end)
    ffi.C._exit(ok and 0 or 3)
end
local st = ffi.new("int[1]")
ffi.C.waitpid(pid, st, 0)
assert(r:get("from-grandchild") == "forked", "parent does not see the forked child's value")
io.write("status=", st[0], "\n")
]])
            local out = run(f, dir, "{}")
            assert.matches("status=0", out, 1, true)
            local r = region(dir)
            assert.are.equal(42, r:get("from-child").n)
            assert.are.equal("forked", r:get("from-grandchild"))
            r:set("from-parent", "p")
            local g = script(dir, "getter", [[io.write(tostring(r:get("from-parent")), "\n")]])
            assert.matches("^p\n", run(g, dir, "{}"))
        end)

        it("8 processes asking for one missing key run the creator once", function()
            local dir = tmpdir()
            local counter = dir .. "/creations"
            local f = script(dir, "stampede", [[
local counter = arg[4]
start_together(arg[5])
local t0 = now()
local v = r:get_or_create("hot", function()
    append(counter, "x")
    sleep(0.2)
    return "created"
end)
io.write(v, " ", string.format("%.3f", now() - t0), "\n")
]])
            local start = dir .. "/start"
            local cmd = {}
            for i = 1, 8 do
                cmd[i] = string.format("luajit %s '%s' '{}' '' '%s' '%s' > %s/out%d",
                                       f, dir, counter, start, dir, i)
            end
            together.run(cmd, start)
            assert.are.equal(1, count_lines(counter))
            for i = 1, 8 do
                local out = read(dir .. "/out" .. i)
                assert.matches("^created ", out)
                -- everyone waited for the creator instead of failing or creating
                assert.is_true(tonumber(out:match(" ([%d.]+)")) < 5, out)
            end
        end)

        -- Counts, in `blocking`, the waits to take the lock (acquire(true)) of
        -- this process's region `r`: a waiter that reads the value when the
        -- holder releases (wait_unlocked) never takes the lock.
        local COUNT_BLOCKING = [[
local blocking = arg[6]
local mt = getmetatable(r.backend:get_mutex("probe"))
assert(mt.wait_unlocked, "the lmdb mutex has no wait_unlocked")
local acquire = mt.acquire
mt.acquire = function(self, wait)
    if wait ~= false then
        append(blocking, "x")
    end
    return acquire(self, wait)
end
]]

        it("8 processes on a missing key: one creator; the 7 waiters read its value when it "
           .. "releases, none takes the lock", function()
            local dir = tmpdir()
            local counter, blocking = dir .. "/creations", dir .. "/blocking"
            local f = script(dir, "waiters", COUNT_BLOCKING .. [[
local counter = arg[4]
start_together(arg[5])
local t0 = now()
local v = r:get_or_create("hot", function()
    append(counter, "x")
    sleep(0.3)
    return "created"
end)
io.write(v, " ", string.format("%.3f", now() - t0), "\n")
]])
            local start = dir .. "/start"
            local cmd = {}
            for i = 1, 8 do
                cmd[i] = string.format("luajit %s '%s' '{ lock_timeout = 10 }' '' '%s' '%s' "
                                       .. "'%s' > %s/out%d 2>&1", f, dir, counter, start,
                                       blocking, dir, i)
            end
            together.run(cmd, start)
            assert.are.equal(1, count_lines(counter))
            for i = 1, 8 do
                assert.matches("^created ", read(dir .. "/out" .. i))
            end
            assert.are.equal(0, count_lines(blocking), "waiters took the lock to read the value")
        end)

        it("a holder whose creator fails: exactly one waiter creates after the release, the "
           .. "others get its value", function()
            local dir = tmpdir()
            local started, counter, blocking = dir .. "/started", dir .. "/creations",
                                               dir .. "/blocking"
            local holder = script(dir, "failing", [[
r:get_or_create("fails", function()
    append(arg[4], "started")
    sleep(0.3)
    error("the holder's creator failed")
end)
]])
            sh(string.format("luajit %s '%s' '{ lock_timeout = 10 }' '' '%s' >/dev/null 2>&1 &",
                             holder, dir, started))
            local t0 = now()
            while count_lines(started) == 0 do
                assert.is_true(now() - t0 < 10, "the holder never started")
                ffi.C.usleep(5000)
            end
            local waiter = script(dir, "waiter", COUNT_BLOCKING .. [[
local v = r:get_or_create("fails", function()
    append(arg[4], "x")
    sleep(0.1)
    return "from a waiter"
end)
io.write(v, "\n")
]])
            local cmd = {}
            for i = 1, 4 do
                cmd[i] = string.format("luajit %s '%s' '{ lock_timeout = 10 }' '' '%s' '' '%s' "
                                       .. "> %s/wout%d 2>&1 &", waiter, dir, counter, blocking,
                                       dir, i)
            end
            sh(table.concat(cmd, " ") .. " wait")
            assert.are.equal(1, count_lines(counter), "waiters that created")
            for i = 1, 4 do
                assert.are.equal("from a waiter\n", read(dir .. "/wout" .. i))
            end
            assert.are.equal("from a waiter", region(dir):get("fails"))
        end)

        it("8 processes with an expired key: one regenerates, the others get the stale value at once", function()
            local dir = tmpdir()
            local counter = dir .. "/creations"
            region(dir, {}, 0.3):set("hot", "old")
            local set_at = now()
            local f = script(dir, "stale", [[
local counter = arg[4]
start_together(arg[5])
local t0 = now()
local v = r:get_or_create("hot", function()
    append(counter, "x")
    sleep(0.2)
    return "new"
end)
io.write(v, " ", string.format("%.3f", now() - t0), "\n")
]])
            local start = dir .. "/start"
            local cmd = {}
            for i = 1, 8 do
                cmd[i] = string.format("luajit %s '%s' '{}' 0.3 '%s' '%s' > %s/out%d",
                                       f, dir, counter, start, dir, i)
            end
            -- the go only once "old" is stale (0.3 s)
            together.run(cmd, start, nil, function()
                sleep(math.max(0, set_at + 0.35 - now()))
            end)
            assert.are.equal(1, count_lines(counter))
            local stale, created = 0, 0
            for i = 1, 8 do
                local out = read(dir .. "/out" .. i)
                local v, t = out:match("^(%a+) ([%d.]+)")
                if v == "old" then
                    stale = stale + 1
                    assert.is_true(tonumber(t) < 0.1, "a stale reader waited: " .. out)
                else
                    assert.are.equal("new", v, out)
                    created = created + 1
                end
            end
            assert.are.equal(1, created, "only the creator sees the new value right away")
            assert.are.equal(7, stale)
        end)

        it("a process asking for other map_size and max_bytes than the processes that have "
           .. "the path open uses theirs, says so once, and evicts none of their data", function()
            local dir = tmpdir()
            local ready, done = dir .. "/ready", dir .. "/done"
            local first = script(dir, "first", [[
local val = string.rep("f", 10000)
for i = 1, 300 do r:set("f" .. i, val) end -- ~3 MB: more than the other's map
append(arg[4], "ready")
local t0 = now()
while not io.open(arg[5]) and now() - t0 < 30 do sleep(0.01) end
local kept = 0
for i = 1, 300 do
    if r:get("f" .. i) == val then kept = kept + 1 end
end
io.write("kept=", kept, " evictions=", r.actual_backend:stats().evictions, "\n")
]])
            sh(("(luajit %s '%s' '{ map_size = 8 * 2^20, max_bytes = 4 * 2^20 }' '' '%s' '%s'; "
                .. "echo rc=$?) > %s/first.out 2>&1 &"):format(first, dir, ready, done, dir))
            local t0 = now()
            while count_lines(ready) == 0 do
                assert.is_true(now() - t0 < 20, "the first process never got ready: "
                               .. tostring(read(dir .. "/first.out")))
                ffi.C.usleep(10000)
            end
            local regmod = require "dogpile.cache.region"
            local old_log, logged = regmod.log, {}
            cache.set_logger(function(msg) logged[#logged + 1] = msg end)
            local ok, r = pcall(region, dir, { map_size = "2m" })
            regmod.log = old_log
            write(done, "")
            assert.is_true(ok, tostring(r))
            assert.are.equal(1, #logged, table.concat(logged, "\n"))
            assert.matches("dogpile.cache.lmdb: '" .. dir .. "' is open in another process with "
                           .. "map_size 8388608 and max_bytes 4194304: using those, not the "
                           .. "2097152 and 1258291 asked for (settings change when no other "
                           .. "process has it open)",
                           logged[1], 1, true)
            local b = r.actual_backend
            assert.are.equal(4 * 2 ^ 20, b:stats().max_bytes)
            -- it reads past its own 2m map, and its sets evict nothing
            local val = string.rep("f", 10000)
            for i = 1, 300 do
                assert.are.equal(val, r:get("f" .. i), "f" .. i)
            end
            for i = 1, 20 do
                r:set("s" .. i, val)
            end
            assert.are.equal(0, b:stats().evictions)
            t0 = now()
            while not (read(dir .. "/first.out") or ""):match("rc=%d+") do
                assert.is_true(now() - t0 < 30, "the first process never finished")
                ffi.C.usleep(10000)
            end
            assert.matches("kept=300 evictions=0\nrc=0\n$", read(dir .. "/first.out"))
            -- Nobody else has it open now: the next opener's settings apply,
            -- silently (this process closes its own first).
            b:close()
            r, b = nil, nil
            collectgarbage()
            logged = {}
            cache.set_logger(function(msg) logged[#logged + 1] = msg end)
            r = region(dir, { map_size = "16m", max_bytes = "2m" })
            regmod.log = old_log
            assert.are.same({}, logged)
            assert.are.equal(2 * 2 ^ 20, r.actual_backend:stats().max_bytes)
            r:set("after", val) -- over its bound: evicts down to it
            assert.is_true(r.actual_backend:stats().bytes <= 2 * 2 ^ 20)
            assert.are.equal(val, r:get("after"))
            -- and a later process adopts these
            local g = script(dir, "later", [[io.write(r.actual_backend:stats().max_bytes, "\n")]])
            assert.matches("\n2097152\n$", run(g, dir, "{}"))
        end)

        local HOLDER = [[
local started = arg[4]
r:get_or_create("held", function()
    append(started, "started")
    sleep(30) -- killed or stopped long before this ends
    return "from the holder"
end)
]]
        local WAITER = [[
local t0 = now()
local v = r:get_or_create("held", function() return "from the waiter" end)
io.write(v, " ", string.format("%.3f", now() - t0), "\n")
]]

        local function start_holder(dir, args)
            local holder = script(dir, "holder", HOLDER)
            local started = dir .. "/started"
            local pid = sh(string.format("luajit %s '%s' '%s' '' '%s' >/dev/null 2>&1 & echo $!",
                                         holder, dir, args, started)):match("%d+")
            local t0 = now()
            while count_lines(started) == 0 do
                assert.is_true(now() - t0 < 10, "the holder never started")
                ffi.C.usleep(5000)
            end
            return pid
        end

        it("a holder killed with SIGKILL mid-creation releases the lock at once", function()
            local dir = tmpdir()
            local args = "{ lock_timeout = 10 }"
            local pid = start_holder(dir, args)
            local waiter = script(dir, "waiter", WAITER)
            local out_file = dir .. "/waiter.out"
            sh(string.format("luajit %s '%s' '%s' > %s 2>&1 &", waiter, dir, args, out_file))
            ffi.C.usleep(300000)
            local killed_at = now()
            sh("kill -9 " .. pid)
            local t0 = now()
            while not (read(out_file) or ""):match("\n") do
                assert.is_true(now() - t0 < 15, "the waiter never finished")
                ffi.C.usleep(5000)
            end
            local done_at = now()
            local out = read(out_file)
            assert.matches("^from the waiter ", out)
            -- The kernel released the lock: far less than lock_timeout (10 s).
            local after_kill = done_at - killed_at
            assert.is_true(after_kill < 1.0, "waited " .. after_kill .. " s after the kill")
            assert.are.equal("from the waiter", region(dir):get("held"))
        end)

        it("a stuck holder (SIGSTOP) keeps others waiting no longer than lock_timeout", function()
            local dir = tmpdir()
            local args = "{ lock_timeout = 1 }"
            local pid = start_holder(dir, args)
            sh("kill -STOP " .. pid)
            local waiter = script(dir, "waiter", WAITER)
            local out = run(waiter, dir, args)
            sh("kill -9 " .. pid)
            local v, t = out:match("^(.-) ([%d.]+)\n")
            assert.are.equal("from the waiter", v, out)
            t = tonumber(t)
            assert.is_true(t >= 0.9 and t < 1.0 + 1.0, "waited " .. t .. " s")
        end)
    end)

    describe("a full disk", function()
        -- Each case mounts a small tmpfs of its own (the specs run as root,
        -- in CI too: a mount that fails fails the case) and runs the region in
        -- a child process, so that a SIGBUS shows as the child's status
        -- instead of killing busted.
        local function with_tmpfs(size, fn)
            local mnt = tmpdir()
            local out = sh(("mount -t tmpfs -o size=%s tmpfs '%s'; echo rc=$?"):format(size, mnt))
            assert.matches("rc=0\n$", out, 1, false,
                           "cannot mount a tmpfs (the lmdb specs need root): " .. out)
            finally(function()
                sh("umount '" .. mnt .. "'")
            end)
            fn(mnt)
        end

        local function fill(dir)
            sh("dd if=/dev/zero of='" .. dir .. "/filler' bs=4k")
        end

        -- Runs a child script; its output and exit status (128 + n: signal n).
        local function run_status(file, ...)
            local args = { ... }
            for i, a in ipairs(args) do
                args[i] = "'" .. tostring(a) .. "'"
            end
            local out = sh("(luajit " .. file .. " " .. table.concat(args, " ") .. ") 2>&1; echo rc=$?")
            return out:gsub("rc=%d+\n$", ""), tonumber(out:match("rc=(%d+)\n$"))
        end

        local FULL = "no space left on device"

        it("opening a region on a full file system is an error naming the path", function()
            with_tmpfs("256k", function(mnt)
                fill(mnt)
                local path = mnt .. "/cache"
                local f = tmpdir() .. "/open.lua"
                write(f, [[
local cache = require "dogpile.cache"
local ok, err = pcall(function()
    cache.make_region():configure("dogpile.cache.lmdb", { arguments = { path = arg[1] } })
end)
io.write(tostring(ok), " ", tostring(err), "\n")
]])
                local out, status = run_status(f, path)
                assert.are.equal(0, status, "the child died (status " .. tostring(status)
                                 .. "; 135 is SIGBUS): " .. out)
                assert.matches("^false ", out)
                assert.matches(FULL, out, 1, true)
                assert.matches("'" .. path, out, 1, true)
                assert.not_matches("Input/output error", out, 1, true)
            end)
        end)

        it("the data file growing on a full file system: an error naming the path, the "
           .. "values kept, and sets work again once there is room", function()
            with_tmpfs("1m", function(mnt)
                local path = mnt .. "/cache"
                write(mnt .. "/room", string.rep("r", 256 * 1024)) -- freed later
                local f = script(tmpdir(), "grow", [[
local val = string.rep("g", 10000)
local stored, err = 0, nil
for i = 1, 1000 do
    local ok, e = pcall(r.set, r, "k" .. i, val)
    if not ok then err = e break end
    stored = i
end
io.write("stored=", stored, "\n", "err=", tostring(err), "\n")
local kept = 0
for i = 1, stored do
    if r:get("k" .. i) == val then kept = kept + 1 end
end
io.write("kept=", kept, "\n")
os.remove(arg[4])
local ok, e = pcall(r.set, r, "after", val)
io.write("after=", tostring(ok), " ", tostring(e), " ", tostring(r:get("after") == val), "\n")
]])
                local out, status = run_status(f, path, "{ map_size = 16 * 2^20, max_bytes = 8 * 2^20 }",
                                               "", mnt .. "/room")
                assert.are.equal(0, status, "the child died (status " .. tostring(status) .. "): "
                                 .. out)
                local stored = tonumber(out:match("stored=(%d+)"))
                assert.is_true(stored > 10 and stored < 1000, out)
                local err = out:match("err=([^\n]*)")
                assert.matches("dogpile.cache.lmdb: set 'k" .. (stored + 1) .. "' failed", err, 1,
                               true)
                assert.matches(FULL, err, 1, true)
                assert.matches("'" .. path .. "'", err, 1, true)
                assert.are.equal(stored, tonumber(out:match("kept=(%d+)")), out)
                assert.matches("after=true nil true", out, 1, true)
            end)
        end)

        it("lock waits when the lock file's page has no block: the holder and its waiters "
           .. "poll instead, the release reaches them, nobody dies", function()
            with_tmpfs("1m", function(mnt)
                local path = mnt .. "/cache"
                -- The environment exists and holds a value, but dogpile-locks
                -- has never been mapped: its page needs a block, and there is
                -- none left.
                local r = region(path, { map_size = "256k" })
                r:set("before", "kept")
                r.actual_backend:close()
                r = nil
                collectgarbage()
                fill(mnt)
                local work = tmpdir()
                local started = work .. "/started"
                local holder = script(work, "holder", [[
local ok, err = pcall(r.get_or_create, r, "held", function()
    append(arg[4], "started")
    sleep(0.5)
    return "from the holder"
end)
io.write(tostring(ok), " ", tostring(err), "\n")
io.write("released=", string.format("%.6f", now()), "\n")
io.write("before=", tostring(r:get("before")), "\n")
]])
                local waiter = script(work, "waiter", [[
start_together(arg[4])
local ok, err = pcall(r.get_or_create, r, "held", function() return "from a waiter" end)
io.write(tostring(ok), " ", tostring(err), "\n")
io.write("done=", string.format("%.6f", now()), "\n")
]])
                local args = "{ map_size = 262144, lock_timeout = 10 }"
                -- The waiters are loaded and ready first; they ask once the
                -- holder has the lock.
                local start = work .. "/start"
                local cmd = {}
                for i = 1, 3 do
                    cmd[i] = ("(luajit %s '%s' '%s' '' '%s'; echo rc=$?) > %s/waiter%d.out 2>&1")
                        :format(waiter, path, args, start, work, i)
                end
                together.run(cmd, start, nil, function()
                    sh(("(luajit %s '%s' '%s' '' '%s'; echo rc=$?) > %s/holder.out 2>&1 &")
                       :format(holder, path, args, started, work))
                    local t0 = now()
                    while count_lines(started) == 0 do
                        assert.is_true(now() - t0 < 10, "the holder never started: "
                                       .. tostring(read(work .. "/holder.out")))
                        ffi.C.usleep(5000)
                    end
                end)
                local t0 = now()
                while not (read(work .. "/holder.out") or ""):match("rc=%d+") do
                    assert.is_true(now() - t0 < 10, "the holder never finished")
                    ffi.C.usleep(5000)
                end
                local hout = read(work .. "/holder.out")
                assert.matches("rc=0\n$", hout, 1, false, "the holder died: " .. hout)
                -- the creator ran; storing its value failed on the full disk
                assert.matches("^false ", hout)
                assert.matches(FULL, hout, 1, true)
                assert.matches("before=kept", hout, 1, true)
                local released = tonumber(hout:match("released=([%d.]+)"))
                for i = 1, 3 do
                    local out = read(work .. "/waiter" .. i .. ".out")
                    assert.matches("rc=0\n$", out, 1, false, "a waiter died: " .. out)
                    assert.matches(FULL, out, 1, true)
                    local done = tonumber(out:match("done=([%d.]+)"))
                    -- polled: noticed the release well before lock_timeout
                    assert.is_true(done - released < 1, "waited " .. (done - released)
                                   .. " s after the release: " .. out)
                end
            end)
        end)
    end)

    describe("space", function()
        it("evicts expired entries first, then least recently used, never the rest", function()
            -- The "new" entries must not expire while they are written and
            -- read back: an attempt where that took longer than JUDGE (a
            -- loaded machine; 0.1 s here when idle) cannot tell an eviction
            -- from an expiry, and is made again.
            local TTL, JUDGE = 1.5, 1.0
            local val = string.rep("v", 1000)
            for attempt = 1, 4 do
                local dir = tmpdir()
                local r = region(dir, { map_size = "1m", max_bytes = 400 * 1024, lru_resolution = 0.05,
                                        expiration_time = TTL })
                for i = 1, 150 do
                    r:set("old" .. i, val)
                end
                ffi.C.usleep(1600000) -- the "old" entries expire in the backend
                local t0 = support.now()
                for i = 1, 200 do
                    r:set("new" .. i, val)
                end
                local st = r.actual_backend:stats()
                local got = {}
                for i = 1, 200 do
                    got[i] = r:get("new" .. i)
                end
                local took = support.now() - t0
                if took < JUDGE or attempt == 4 then
                    assert.is_true(took < JUDGE, "4 attempts took over " .. JUDGE
                                   .. " s to write and read 200 entries: the machine is too slow to judge")
                    assert.is_true(st.expirations > 0, "nothing expired")
                    assert.are.equal(0, st.evictions, "fresh entries were evicted while expired ones remained")
                    for i = 1, 200 do
                        assert.are.equal(val, got[i], "new" .. i .. " lost")
                    end
                    break
                end
            end
        end)

        it("evicts least recently used entries when the map is full, never the hot or recent ones", function()
            local dir = tmpdir()
            local args = { map_size = "1m", max_bytes = 400 * 1024, lru_resolution = 0.02 }
            local r = region(dir, args)
            local val = string.rep("v", 1000)
            for i = 1, 20 do
                r:set("hot" .. i, val)
            end
            for i = 1, 1500 do
                r:set("more" .. i, val)
                if i % 100 == 0 then -- keep the hot keys recently used
                    ffi.C.usleep(60000)
                    for j = 1, 20 do
                        assert.are.equal(val, r:get("hot" .. j), "hot key hot" .. j .. " evicted")
                    end
                end
            end
            local st = r.actual_backend:stats()
            assert.is_true(st.evictions > 0, "nothing was evicted")
            assert.are.equal(0, st.expirations)
            assert.is_true(st.bytes <= 400 * 1024, "tree of " .. st.bytes .. " bytes")
            -- the most recent writes all survive (well under the bound)
            for i = 1500 - 100, 1500 do
                assert.are.equal(val, r:get("more" .. i), "more" .. i .. " lost")
            end
            -- the oldest writes, never read, went first
            assert.are.equal(NO_VALUE, r:get("more1"))
            -- a new process reads the file: it is intact
            local g = script(dir, "check", [[
local n = 0
for i = 1, 20 do if r:get("hot" .. i) ~= cache.NO_VALUE then n = n + 1 end end
for i = 1400, 1500 do if r:get("more" .. i) ~= cache.NO_VALUE then n = n + 1 end end
io.write(n, "\n")
]])
            assert.matches("^121\n", run(g, dir, "{ map_size = 1048576, max_bytes = 409600, "
                                         .. "lru_resolution = 0.02 }"))
        end)

        it("on_full = 'error' refuses a set with a clear error and keeps every entry", function()
            local dir = tmpdir()
            local r = region(dir, { map_size = "1m", max_bytes = 200 * 1024, on_full = "error" })
            local val = string.rep("e", 1000)
            local stored, err = 0, nil
            for i = 1, 1000 do
                local ok, e = pcall(r.set, r, "k" .. i, val)
                if not ok then
                    err = e
                    break
                end
                stored = i
            end
            assert.is_not_nil(err, "never full")
            assert.matches("dogpile.cache.lmdb: set 'k" .. (stored + 1) .. "' failed", err, 1, true)
            assert.matches("'" .. dir .. "' is full", err, 1, true)
            assert.matches('on_full = "error"', err, 1, true)
            for i = 1, stored do
                assert.are.equal(val, r:get("k" .. i), "k" .. i .. " lost")
            end
            assert.are.equal(0, r.actual_backend:stats().evictions)
            -- Full, but an overwrite that fits once the old value is freed
            -- succeeds: the same size, a smaller one, and back.
            local same, smaller = string.rep("s", 1000), string.rep("m", 10)
            for i = 1, stored, math.max(1, math.floor(stored / 20)) do
                r:set("k" .. i, same)
                assert.are.equal(same, r:get("k" .. i))
                r:set("k" .. i, smaller)
                assert.are.equal(smaller, r:get("k" .. i))
                r:set("k" .. i, val)
                assert.are.equal(val, r:get("k" .. i))
            end
            -- one that does not fit is still refused, and changes nothing
            local ok, e = pcall(r.set, r, "k1", string.rep("B", 60 * 1024))
            assert.is_false(ok)
            assert.matches("'" .. dir .. "' is full", e, 1, true)
            assert.are.equal(val, r:get("k1"))
            for i = 1, stored do
                assert.are.equal(val, r:get("k" .. i), "k" .. i .. " lost")
            end
            assert.are.equal(0, r.actual_backend:stats().evictions)
            for i = 1, 40 do -- spread over the tree: pages are freed once emptied
                r:delete("k" .. i)
            end
            r:set("k-after-delete", val)
            assert.are.equal(val, r:get("k-after-delete"))
        end)

        it("refuses a value larger than max_bytes", function()
            local r = region(tmpdir(), { map_size = "1m", max_bytes = 100 * 1024 })
            local ok, err = pcall(r.set, r, "big", string.rep("b", 200 * 1024))
            assert.is_false(ok)
            assert.matches("is larger than max_bytes", err, 1, true)
        end)
    end)
    describe("file modes and nginx's root master", function()
        it("gives files and directory the mode asked for, whatever the umask", function()
            local dir = tmpdir()
            local path = dir .. "/made"
            local script = dir .. "/open.lua"
            write(script, [[
local r = require("dogpile.cache").make_region():configure("dogpile.cache.lmdb",
    { arguments = { path = arg[1], mode = arg[2] } })
if arg[3] == "set" then
    r:set("k", 1)
    local m = r.actual_backend:get_mutex("k")
    assert(m:acquire(false))
    m:release()
end
print(r:get("k"))
]])
            local out = sh(("umask 077 && luajit %s %s 0664 set"):format(script, path))
            assert.are.equal("1\n", out)
            assert.are.equal("775\n", sh("stat -c %a " .. path))
            for _, f in ipairs({ "data.mdb", "lock.mdb", "dogpile-locks" }) do
                assert.are.equal("664\n", sh("stat -c %a " .. path .. "/" .. f), f)
            end
            -- Existing files are left as they are.
            sh("chmod 600 " .. path .. "/data.mdb")
            out = sh(("umask 077 && luajit %s %s 0666"):format(script, path))
            assert.are.equal("1\n", out)
            assert.are.equal("600\n", sh("stat -c %a " .. path .. "/data.mdb"))
        end)

        it("works in nginx with regions built in init_by_lua (root) and workers as nobody", function()
            local ngx_support = require "ngx_support"
            assert(ngx_support.available(), "nginx-extras with the Lua module is needed "
                   .. "(.ci/test installs it)")
            assert(sh("id -u"):match("^0"), "this case starts nginx's master as root (CI runs as root)")
            local data = tmpdir()
            sh("chmod 1777 " .. data) -- a folder the workers may create in, as /var/cache/nginx
            local srv = ngx_support.start({ fixture = "nginx_lmdb", ready = "/ready",
                                            vars = { DATA = data } })
            local ok, err = pcall(function()
                local workers = {}
                for round = 1, 3 do
                    local values = {}
                    for _, r in ipairs(srv:concurrent("/get_or_create?key=k" .. round, 20)) do
                        assert.are.equal(200, r.status, r.body .. "\n" .. srv:log())
                        local v, w = r.body:match("^(.-) (%d+)$")
                        workers[w] = true
                        values[v] = true
                    end
                    -- one value for the key, whichever worker made it
                    local n = 0
                    for _ in pairs(values) do n = n + 1 end
                    assert.are.equal(1, n)
                end
                assert.is_true(workers["0"] and workers["1"] or false, "both workers answered")
                -- The files are the workers' (nobody's): none was made by the root master.
                for _, f in ipairs({ "", "/data.mdb", "/lock.mdb", "/dogpile-locks" }) do
                    assert.are.equal("nobody\n", sh("stat -c %U " .. data .. "/cache" .. f), f)
                end
                assert.is_nil(srv:log():find("Permission denied", 1, true), srv:log())
                -- Another process (this one, root) reads what the workers stored.
                local r = cache.make_region():configure("dogpile.cache.lmdb",
                    { arguments = { path = data .. "/cache" } })
                assert.is_truthy(tostring(r:get("k1")):match("^made by %d$"))
                r.actual_backend:close()
            end)
            srv:stop()
            assert(ok, err)
        end)
    end)
end)
