--- Scaling curves: how a hit scales with the number of keys, the value size
-- and the threads, and how the miss path scales with concurrent waiters.
-- Each curve is written as $BENCH_OUT/curves/<name>.csv and drawn by gnuplot
-- (bench/curves.gp) as $BENCH_OUT/curves/<name>.png (BENCH_OUT defaults to
-- bench/results).
--
--   luajit bench/curves.lua [--only keys|values|threads|waiters]
--                           [--sizes 1e3,1e7] [--no-lmdb]   (keys curve only:
--                           these key counts; shared_memory and the table)
--
--  keys     region:get hit of a 16-byte string against the number of keys
--           (1e3 .. 1e7), keys read in uniform random order (every read a
--           different key, so CPU caches and TLBs are stressed), for
--           shared_memory and lmdb, with the anchor: a plain Lua table
--           holding the same keys, read as t[key] in the same order (what
--           reaching the key itself costs at that size; its runs alternate
--           with shared_memory's, both timed in CPU time); lmdb
--           twice: with the default
--           lru_resolution = 60 (pure reads over the run) and with
--           lru_resolution = 1 (a hit on a key not read in the last second
--           queues an access-time write).
--           The stores are filled once per size through the raw backend
--           (shared_memory) or one LMDB write transaction per million keys
--           from a child process (lmdb; the backend has no set_multi, so
--           region:set would commit once per key).
--  values   region:get hit against the value size (16 B .. 1 MiB), for
--           memory (values by reference), shared_memory and lmdb (copied
--           and decoded), 256 keys per size in random order.
--  threads  shared_memory hit throughput with 1 and 2 threads, from
--           bench/shm_threads.sh (plain pthreads on the C API, no Lua).
--  waiters  the miss path: N coroutines (1 .. 1000) ask a memory region for
--           one missing key whose creator sleeps 10 ms (or 100 ms) in a small
--           real-time scheduler (dogpile.set_sleep); the time until every
--           waiter has its value, minus the creator's time, is the engine's
--           overhead (waiters poll the lock with sleeps of 1, 2, 4, 8, 16,
--           then 20 ms). The creator must run once; the count is printed.
--
-- BENCH_QUICK=1: the smallest points only (keys up to 1e4, values up to
-- 4 KiB, waiters up to 100), still writing CSV and PNG. Data lives in a
-- temporary directory that is removed at the end. Prints ROW lines
-- (bench/lib.lua) for reference, without targets.
local ffi = require "ffi"

local script = debug.getinfo(1, "S").source:sub(2)
local bench_dir = script:match("^(.*)/[^/]*$") or "."

-- -- Child: fill an LMDB environment in big transactions -----------------------
-- luajit bench/curves.lua --fill-lmdb <path> <map_size> <n> <envelope hex>
-- Writes 'v'..key -> [expires 0][atime now][envelope] for keys
-- "key:%08d" 0..n-1, in key order with MDB_APPEND: the record format of
-- backends/lmdb.c (see its header comment). The environment must already
-- exist (opened once by the backend, which wrote its format tag).
local function fill_lmdb_child(path, map_size, n, hex)
    ffi.cdef [[
        typedef struct MDB_env MDB_env;
        typedef struct MDB_txn MDB_txn;
        typedef unsigned int MDB_dbi;
        typedef struct MDB_val { size_t mv_size; void *mv_data; } MDB_val;
        int mdb_env_create(MDB_env **env);
        int mdb_env_set_mapsize(MDB_env *env, size_t size);
        int mdb_env_set_maxreaders(MDB_env *env, unsigned int readers);
        int mdb_env_open(MDB_env *env, const char *path, unsigned int flags, unsigned int mode);
        void mdb_env_close(MDB_env *env);
        int mdb_txn_begin(MDB_env *env, MDB_txn *parent, unsigned int flags, MDB_txn **txn);
        int mdb_txn_commit(MDB_txn *txn);
        int mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, MDB_dbi *dbi);
        int mdb_put(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, unsigned int flags);
        char *mdb_strerror(int err);
    ]]
    local ok, L = pcall(ffi.load, "lmdb")
    if not ok then
        L = ffi.load("liblmdb.so.0")
    end
    local function check(rc, what)
        if rc ~= 0 then
            error(what .. ": " .. ffi.string(L.mdb_strerror(rc)), 0)
        end
    end
    local envelope = hex:gsub("..", function(h) return string.char(tonumber(h, 16)) end)
    local MDB_NOSYNC, MDB_NOMETASYNC, MDB_NOTLS = 0x10000, 0x40000, 0x200000
    local MDB_APPEND = 0x20000
    local envp = ffi.new("MDB_env *[1]")
    check(L.mdb_env_create(envp), "mdb_env_create")
    local env = envp[0]
    check(L.mdb_env_set_mapsize(env, map_size), "mdb_env_set_mapsize")
    check(L.mdb_env_set_maxreaders(env, 126), "mdb_env_set_maxreaders")
    check(L.mdb_env_open(env, path, bit.bor(MDB_NOSYNC, MDB_NOMETASYNC, MDB_NOTLS), 420),
          "mdb_env_open")
    -- header: expires = 0 (never), atime = now (wall clock), then the envelope
    local vlen = 16 + #envelope
    local vbuf = ffi.new("char[?]", vlen)
    local hdr = ffi.cast("double *", vbuf)
    hdr[0] = 0
    hdr[1] = os.time()
    ffi.copy(vbuf + 16, envelope, #envelope)
    local kbuf = ffi.new("char[32]")
    local k, v = ffi.new("MDB_val"), ffi.new("MDB_val")
    local txnp, dbip = ffi.new("MDB_txn *[1]"), ffi.new("MDB_dbi[1]")
    local i = 0
    while i < n do
        check(L.mdb_txn_begin(env, nil, 0, txnp), "mdb_txn_begin")
        local txn = txnp[0]
        check(L.mdb_dbi_open(txn, nil, 0, dbip), "mdb_dbi_open")
        local stop = math.min(n, i + 1e6)
        while i < stop do
            local key = string.format("vkey:%08d", i)
            ffi.copy(kbuf, key, #key)
            k.mv_size, k.mv_data = #key, kbuf
            v.mv_size, v.mv_data = vlen, vbuf
            check(L.mdb_put(txn, dbip[0], k, v, MDB_APPEND), "mdb_put")
            i = i + 1
        end
        check(L.mdb_txn_commit(txn), "mdb_txn_commit")
    end
    L.mdb_env_close(env)
end

if arg[1] == "--fill-lmdb" then
    fill_lmdb_child(arg[2], tonumber(arg[3]), tonumber(arg[4]), arg[5])
    os.exit(0)
end

-- -- The driver -------------------------------------------------------------------

local lib = dofile(bench_dir .. "/lib.lua")
local cache = require "dogpile.cache"
local dogpile = require "dogpile"
local C = require("dogpile.lib").C
local now = C.dp_clock_monotonic

local only, only_sizes, no_lmdb
for i = 1, #arg do
    if arg[i] == "--only" then
        only = arg[i + 1]
    elseif arg[i] == "--sizes" then
        only_sizes = {}
        for x in (arg[i + 1] or ""):gmatch("[^,]+") do
            only_sizes[#only_sizes + 1] = assert(tonumber(x), "--sizes takes numbers: " .. x)
        end
    elseif arg[i] == "--no-lmdb" then
        no_lmdb = true
    end
end
local quick = lib.quick

local function sh(cmd)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    local ok, how, code = p:close()
    if ok == false or (type(ok) == "number" and ok ~= 0) then
        error(("command failed (%s %s): %s\n%s"):format(tostring(how), tostring(code), cmd, out), 0)
    end
    return out
end

local function q(s) -- shell quoting
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local OUT = (os.getenv("BENCH_OUT") or (bench_dir .. "/results")) .. "/curves"
sh("mkdir -p " .. q(OUT))
local TMP = sh("mktemp -d " .. q((os.getenv("TMPDIR") or "/tmp") .. "/dogpile-curves-XXXXXX"))
    :gsub("%s+$", "")

local function fmt(v)
    if type(v) == "number" then
        if v == math.floor(v) and math.abs(v) < 1e15 then
            return string.format("%d", v)
        end
        return string.format("%.6g", v)
    end
    return tostring(v)
end

--- Writes $OUT/<name>.csv (header: array of column names; rows: arrays)
-- and draws $OUT/<name>.png with bench/curves.gp.
local function write_curve(name, header, rows)
    local csv = OUT .. "/" .. name .. ".csv"
    local f = assert(io.open(csv, "w"))
    f:write(table.concat(header, ","), "\n")
    for _, r in ipairs(rows) do
        local cells = {}
        for i = 1, #header do
            cells[i] = r[i] == nil and "" or fmt(r[i])
        end
        f:write(table.concat(cells, ","), "\n")
    end
    f:close()
    local png = OUT .. "/" .. name .. ".png"
    local ok, err = pcall(sh, ("gnuplot -e %s %s 2>&1"):format(
        q(("name='%s'; csv='%s'; png='%s'; quick=%d"):format(name, csv, png, quick and 1 or 0)),
        q(bench_dir .. "/curves.gp")))
    if ok then
        print(("  -> %s, %s"):format(csv, png))
    else
        print(("  -> %s (no PNG: %s)"):format(csv, err))
    end
end

local function shuffle_seed()
    math.randomseed(12345)
end

-- A loop of region:get over `seq` (keys), summing the lengths; returns a
-- function(n) for lib.ns_per_op that checks every get hit. Each call reads
-- the next n keys of seq (wrapping around), so that a run does not find the
-- keys of the run before still in the CPU caches.
local function get_loop(region, seq, vlen)
    local off = 0
    return function(n)
        if off + n > #seq then
            off = 0
        end
        local r, s, o = region, seq, off
        local total = 0
        for i = o + 1, o + n do
            total = total + #r:get(s[i])
        end
        off = o + n
        assert(total == n * vlen, "a get missed")
        return total
    end
end

-- The anchor of the keys curve: t[key] over the same seq, as get_loop.
local function table_loop(t, seq, vlen)
    local off = 0
    return function(n)
        if off + n > #seq then
            off = 0
        end
        local s, o = seq, off
        local total = 0
        for i = o + 1, o + n do
            total = total + #t[s[i]]
        end
        off = o + n
        assert(total == n * vlen, "a table lookup missed")
        return total
    end
end

-- Median ns per op of each loop of `fns` (as lib.ns_per_op's fn), their
-- runs alternating: one warm-up each, then `reps` rounds of one run each.
-- Timed in CPU seconds of the process (os.clock): a ratio between two loops
-- of one process then does not move when other processes take the CPU
-- (they still share the caches and the memory bus).
local function paired(fns, n, reps)
    local ts = {}
    for j, fn in ipairs(fns) do
        fn(n)
        ts[j] = {}
    end
    for r = 1, reps do
        for j, fn in ipairs(fns) do
            local t0 = os.clock()
            fn(n)
            ts[j][r] = (os.clock() - t0) * 1e9 / n
        end
    end
    local out = {}
    for j = 1, #fns do
        out[j] = lib.median(ts[j])
    end
    return out
end

local function free_memory()
    collectgarbage()
    collectgarbage()
end

-- -- keys ------------------------------------------------------------------------------

local VALUE16 = "0123456789abcdef"

local function keyname(i)
    return string.format("key:%08d", i)
end

-- Fills a shared_memory region with keys 0..n-1 holding VALUE16, through
-- the raw backend's set_multi with the envelope bytes region:set made.
local function fill_shm(region, n)
    region:set(keyname(0), VALUE16)
    local b = region.actual_backend
    local envelope = b:get(keyname(0))
    local chunk, c = {}, 0
    for i = 0, n - 1 do
        chunk[keyname(i)] = envelope
        c = c + 1
        if c == 10000 then
            b:set_multi(chunk)
            chunk, c = {}, 0
        end
    end
    if c > 0 then
        b:set_multi(chunk)
    end
end

local LMDB_MAP = 4 * 1024 ^ 3

local function lmdb_region(path, extra)
    local args = { path = path, map_size = LMDB_MAP, max_bytes = 3 * 1024 ^ 3, sync = "none" }
    for k, v in pairs(extra or {}) do
        args[k] = v
    end
    return cache.make_region():configure("dogpile.cache.lmdb", { arguments = args })
end

local function fill_lmdb(region, path, n)
    -- the envelope region:set makes for VALUE16 (read back through the backend)
    -- ("!" sorts before "key:", so the keys can still be appended in order)
    region:set("!probe", VALUE16)
    local envelope = region.actual_backend:get("!probe")
    local hex = envelope:gsub(".", function(ch) return string.format("%02x", ch:byte()) end)
    sh(("luajit %s --fill-lmdb %s %.0f %d %s 2>&1"):format(q(script), q(path), LMDB_MAP, n, hex))
end

-- lmdb at n keys over seq: ns per get with the default lru_resolution and
-- with lru_resolution = 1, and the seconds the fills took.
local function lmdb_point(n, seq, lookups, reps)
    local p1 = TMP .. "/keys-" .. n .. "-a"
    local t0 = now()
    local l1 = lmdb_region(p1)
    fill_lmdb(l1, p1, n)
    local fill_s = now() - t0
    local l1_ns = lib.ns_per_op(get_loop(l1, seq, #VALUE16), lookups, reps)
    -- lmdb, lru_resolution = 1 (access-time writes): the same data
    -- file, copied (only data.mdb: the lock files are made afresh)
    local p2 = TMP .. "/keys-" .. n .. "-b"
    t0 = now()
    sh(("mkdir -p %s && cp %s/data.mdb %s/"):format(q(p2), q(p1), q(p2)))
    local l2 = lmdb_region(p2, { lru_resolution = 1 })
    fill_s = fill_s + (now() - t0)
    local l2_ns = lib.ns_per_op(get_loop(l2, seq, #VALUE16), lookups / 10, reps)
    l1, l2 = nil, nil
    free_memory()
    sh("rm -rf " .. q(p1) .. " " .. q(p2))
    return l1_ns, l2_ns, fill_s
end

local function curve_keys()
    local sizes = only_sizes or (quick and { 1e3, 1e4 } or { 1e3, 1e4, 1e5, 1e6, 1e7 })
    table.sort(sizes)
    local reps = 3
    -- gets per run: fewer where each costs microseconds (DRAM- and TLB-bound)
    local function lookups_for(n)
        return quick and 1e5 or (n >= 1e6 and 2e5 or 1e6)
    end
    local header = { "keys", "shared_memory", "lmdb (default lru_resolution=60)",
                     "lmdb (lru_resolution=1)", "plain Lua table t[key]",
                     "shared_memory / table", "shared_memory Mgets/s",
                     "lmdb Mgets/s", "lmdb default Mgets/s" }
    local rows, by_n = {}, {}
    print(("keys: region:get of a 16-byte string, uniform random keys; median ns/get of %d; "
           .. "%g gets per run (%g from 1e6 keys; a tenth of that for lmdb with the default "
           .. "lru_resolution)"):format(reps, lookups_for(1), lookups_for(1e6)))
    print(("  %-10s %14s %11s %8s %14s %14s %9s"):format("keys", "shared_memory", "table",
                                                         "shm/tbl", "lmdb", "lmdb lru=1", "fill s"))
    for _, n in ipairs(sizes) do
        shuffle_seed()
        local lookups = lookups_for(n)
        local t0 = now()
        -- The anchor's table first, so that its key strings are made in key
        -- order and seq's (the same strings: LuaJIT interns them) lie in
        -- random order in memory, for both loops alike.
        local tbl = {}
        for i = 0, n - 1 do
            tbl[keyname(i)] = VALUE16
        end
        local seq = {} -- fresh keys for the warm-up and each run
        for i = 1, lookups * (reps + 1) do
            seq[i] = keyname(math.random(n) - 1)
        end
        -- shared_memory: a store of its own per size, freed before the next
        local shm = cache.make_region():configure("dogpile.cache.shared_memory", {
            arguments = { name = "curves.keys." .. n, max_bytes = "8g" },
        })
        fill_shm(shm, n)
        local fill_s = now() - t0
        local times = paired({ get_loop(shm, seq, #VALUE16), table_loop(tbl, seq, #VALUE16) },
                             lookups, reps)
        local shm_ns, tbl_ns = times[1], times[2]
        shm, tbl = nil, nil
        free_memory()
        local l1_ns, l2_ns
        if not no_lmdb then
            local lmdb_fill_s
            l1_ns, l2_ns, lmdb_fill_s = lmdb_point(n, seq, lookups, reps)
            fill_s = fill_s + lmdb_fill_s
        end
        seq = nil
        free_memory()
        print(("  %-10g %14.1f %11.1f %8.2f %14s %14s %9.1f"):format(n, shm_ns, tbl_ns,
              shm_ns / tbl_ns, l1_ns and ("%.1f"):format(l1_ns) or "-",
              l2_ns and ("%.1f"):format(l2_ns) or "-", fill_s))
        rows[#rows + 1] = { n, shm_ns, l1_ns, l2_ns, tbl_ns, shm_ns / tbl_ns, 1e3 / shm_ns,
                            l1_ns and 1e3 / l1_ns, l2_ns and 1e3 / l2_ns }
        by_n[n] = rows[#rows]
    end
    print("  (ns per get; lower is better)")
    write_curve("keys", header, rows)
    local big, small = sizes[#sizes], sizes[1]
    local tag = big >= 1e6 and string.format("1e%d", math.floor(math.log10(big) + 0.5)) or
        tostring(big)
    lib.row("curve_keys_shm_" .. tag, ("shared_memory region:get hit, %s keys, random order"):format(tag),
            by_n[big][2], "ns/op", ("same at %g keys"):format(small), by_n[small][2], "")
    lib.row("curve_keys_shm_vs_table_" .. tag,
            ("shared_memory region:get hit, %s keys, random order"):format(tag),
            by_n[big][2], "ns/op", "plain Lua table t[key], same keys and order", by_n[big][5],
            "<=2")
    if not no_lmdb then
        lib.row("curve_keys_lmdb_" .. tag, ("lmdb region:get hit, %s keys, random order"):format(tag),
                by_n[big][3], "ns/op", ("same at %g keys"):format(small), by_n[small][3], "")
        lib.row("curve_keys_lmdb_lru1_" .. tag,
                ("lmdb region:get hit, %s keys, lru_resolution=1"):format(tag),
                by_n[big][4], "ns/op", "default lru_resolution=60", by_n[big][3], "")
    end
end

-- -- values ----------------------------------------------------------------------------

local function size_label(b)
    if b >= 1024 ^ 2 then
        return string.format("%gMiB", b / 1024 ^ 2)
    elseif b >= 1024 then
        return string.format("%gKiB", b / 1024)
    end
    return string.format("%dB", b)
end

local function curve_values()
    local sizes = quick and { 16, 256, 4096 } or { 16, 256, 4096, 65536, 1048576 }
    local NK = 256
    local reps = 3
    local mem = cache.make_region():configure("dogpile.cache.memory")
    local shm = cache.make_region():configure("dogpile.cache.shared_memory", {
        arguments = { name = "curves.values", max_bytes = "2g" },
    })
    local lpath = TMP .. "/values"
    local lm = lmdb_region(lpath, { lru_resolution = 3600 })
    local rows, by_size = {}, {}
    print(("values: region:get hit against the value size (%d keys, random order); "
           .. "median ns/get of %d"):format(NK, reps))
    print(("  %-8s %12s %14s %12s %12s %12s"):format("size", "memory", "shared_memory", "lmdb",
                                                    "shm GB/s", "lmdb GB/s"))
    for _, size in ipairs(sizes) do
        shuffle_seed()
        local keys = {}
        for i = 1, NK do
            -- strings of the given size, each a little different
            keys[i] = ("v%d:%d"):format(size, i)
            local v = string.rep(string.char(97 + i % 26), size - 8) .. string.format("%08d", i)
            mem:set(keys[i], v)
            shm:set(keys[i], v)
            lm:set(keys[i], v)
        end
        -- enough gets for a few tenths of a second per run
        local n = math.max(200, math.min(quick and 1e5 or 1e6, math.floor((quick and 2e7 or 2e8) / size)))
        local seq = {}
        for i = 1, n do
            seq[i] = keys[math.random(NK)]
        end
        local ns = {}
        for j, r in ipairs({ mem, shm, lm }) do
            ns[j] = lib.ns_per_op(get_loop(r, seq, size), n, reps)
        end
        for i = 1, NK do -- make room for the next size
            shm:delete(keys[i])
            lm:delete(keys[i])
            mem:delete(keys[i])
        end
        free_memory()
        print(("  %-8s %12.1f %14.1f %12.1f %12.2f %12.2f"):format(size_label(size), ns[1], ns[2],
              ns[3], size / ns[2], size / ns[3]))
        rows[#rows + 1] = { size, ns[1], ns[2], ns[3], size / ns[2], size / ns[3] }
        by_size[size] = rows[#rows]
    end
    print("  (ns per get; GB/s = value bytes per ns)")
    write_curve("values", { "value bytes", "memory", "shared_memory", "lmdb",
                            "shared_memory GB/s", "lmdb GB/s" }, rows)
    local big = sizes[#sizes]
    lib.row("curve_values_shm_" .. size_label(big),
            ("shared_memory region:get hit, %s string"):format(size_label(big)),
            by_size[big][3], "ns/op", "same, 16 B", by_size[16][3], "")
    lib.row("curve_values_lmdb_" .. size_label(big),
            ("lmdb region:get hit, %s string"):format(size_label(big)),
            by_size[big][4], "ns/op", "same, 16 B", by_size[16][4], "")
    sh("rm -rf " .. q(lpath))
end

-- -- threads ---------------------------------------------------------------------------

local function stage_dir()
    local s = os.getenv("DP_STAGE_DIR")
    if s and s ~= "" then
        return s
    end
    -- the stage LUA_CPATH points at: <stage>/lib/lua/5.1/?.so
    for entry in (os.getenv("LUA_CPATH") or ""):gmatch("[^;]+") do
        local st = entry:match("^(.*)/lib/lua/5%.1/%?%.so$")
        if st then
            return st
        end
    end
    return nil
end

local function curve_threads()
    local seconds, reps = quick and 0.1 or 0.3, quick and 1 or 3
    local stage = stage_dir()
    local env = stage and ("STAGE=" .. q(stage) .. " ") or ""
    print(("threads: shared_memory hits from plain pthreads (bench/shm_threads.sh %g s, "
           .. "10000 keys, 16-byte values, median of %d)"):format(seconds, reps))
    local out = sh(("%ssh %s %g 10000 16 1,2 %d 2>&1"):format(env, q(bench_dir .. "/shm_threads.sh"),
                                                              seconds, reps))
    local series = {}
    local order = {}
    for line in out:gmatch("[^\n]+") do
        local policy, workload = line:match("^(%w+)%s+(%a[%w/ ]-)%s%s+[%d.]+M")
        if (policy == "s3fifo" or policy == "lru") and workload then
            local ms = {}
            for m in line:gmatch("([%d.]+)M") do
                ms[#ms + 1] = tonumber(m)
            end
            if #ms == 4 then
                local name = policy .. " " .. workload
                series[name] = { wall = { ms[1], ms[2] }, cpu = { ms[3], ms[4] } }
                order[#order + 1] = name
            end
        end
    end
    if #order == 0 then
        error("could not read bench/shm_threads.sh's output:\n" .. out, 0)
    end
    local header, rows = { "threads" }, { { 1 }, { 2 } }
    for _, name in ipairs(order) do
        header[#header + 1] = name
        rows[1][#header], rows[2][#header] = series[name].wall[1], series[name].wall[2]
    end
    print(("  %-18s %10s %10s %6s"):format("workload", "1 thread", "2 threads", "x2"))
    for _, name in ipairs(order) do
        local w = series[name].wall
        print(("  %-18s %9.2fM %9.2fM %6.2f"):format(name, w[1], w[2], w[2] / w[1]))
    end
    print("  (million gets per second, all threads; see bench/shm_threads.sh for the workloads)")
    write_curve("threads", header, rows)
    local s = series["s3fifo read"]
    if s then
        lib.row("curve_threads_shm_x2", "shared_memory hits/s, 2 threads vs 1 (C API, s3fifo)",
                s.wall[2], "M/s", "1 thread", s.wall[1], "")
    end
end

-- -- waiters ---------------------------------------------------------------------------

-- A small real-time scheduler, as a game server has one: coroutines sleep
-- by yielding their wake-up time; the thread sleeps when nobody is ready.
local function scheduler()
    local ready, sleeping = {}, {}
    local s = {}
    function s.spawn(fn)
        ready[#ready + 1] = coroutine.create(fn)
    end
    function s.sleep(seconds)
        coroutine.yield(now() + seconds)
    end
    local function by_time(a, b)
        return a.at < b.at
    end
    function s.run()
        while #ready > 0 or #sleeping > 0 do
            if #ready == 0 then
                table.sort(sleeping, by_time)
                local wait = sleeping[1].at - now()
                if wait > 0 then
                    C.dp_clock_sleep(wait)
                end
                local t, still = now(), {}
                for _, e in ipairs(sleeping) do
                    if e.at <= t then
                        ready[#ready + 1] = e.co
                    else
                        still[#still + 1] = e
                    end
                end
                sleeping = still
            end
            local batch = ready
            ready = {}
            for _, co in ipairs(batch) do
                local ok, wake = coroutine.resume(co)
                if not ok then
                    error(wake, 0)
                end
                if coroutine.status(co) ~= "dead" then
                    sleeping[#sleeping + 1] = { co = co, at = wake }
                end
            end
        end
    end
    return s
end

local function waiters_point(nw, creator_s)
    local sched = scheduler()
    dogpile.set_sleep(sched.sleep)
    local region = cache.make_region():configure("dogpile.cache.memory")
    local calls, returned = 0, nil
    local function creator()
        calls = calls + 1
        sched.sleep(creator_s)
        returned = now()
        return "value"
    end
    local got, lags, last = 0, {}, 0
    for _ = 1, nw do
        sched.spawn(function()
            local v = region:get_or_create("missing", creator)
            assert(v == "value")
            local t = now()
            got = got + 1
            lags[got] = t - returned
            if t > last then
                last = t
            end
        end)
    end
    local cpu0 = os.clock()
    local t0 = now()
    sched.run()
    local cpu = os.clock() - cpu0
    dogpile.set_sleep(nil)
    assert(got == nw, "a waiter did not finish")
    return {
        overhead = (last - t0) - creator_s,
        lag_median = lib.median(lags),
        lag_max = last - returned,
        calls = calls,
        cpu_per_waiter = cpu / nw,
    }
end

local function curve_waiters()
    local counts = quick and { 1, 10, 100 } or { 1, 10, 100, 1000 }
    local creators = quick and { 0.01 } or { 0.01, 0.1 }
    local reps = quick and 1 or 3
    print(("waiters: N coroutines on one missing key of a memory region, the creator sleeps "
           .. "in the scheduler; median of %d"):format(reps))
    print(("  %-8s %-9s %13s %15s %13s %9s %13s"):format("waiters", "creator", "overhead ms",
          "median lag ms", "max lag ms", "creators", "CPU us/waiter"))
    local header = { "waiters" }
    for _, c in ipairs(creators) do
        header[#header + 1] = ("overhead ms (%g ms creator)"):format(c * 1e3)
    end
    for _, c in ipairs(creators) do
        header[#header + 1] = ("creator calls (%g ms creator)"):format(c * 1e3)
    end
    for _, c in ipairs(creators) do
        header[#header + 1] = ("CPU us per waiter (%g ms creator)"):format(c * 1e3)
    end
    local rows, at = {}, {}
    waiters_point(10, 0.001) -- warm-up: compile the paths once
    for _, nw in ipairs(counts) do
        local row = { nw }
        for ci, c in ipairs(creators) do
            local runs = {}
            local calls = 0
            for r = 1, reps do
                runs[r] = waiters_point(nw, c)
                calls = math.max(calls, runs[r].calls)
            end
            local function med(field)
                local xs = {}
                for r = 1, reps do
                    xs[r] = runs[r][field]
                end
                return lib.median(xs)
            end
            local res = { overhead = med("overhead"), lag_median = med("lag_median"),
                          lag_max = med("lag_max"), cpu = med("cpu_per_waiter"), calls = calls }
            print(("  %-8d %-9s %13.2f %15.2f %13.2f %9d %13.1f"):format(nw, ("%g ms"):format(c * 1e3),
                  res.overhead * 1e3, res.lag_median * 1e3, res.lag_max * 1e3, calls, res.cpu * 1e6))
            if calls ~= 1 then
                print(("  !! the creator ran %d times for %d waiters (expected once)"):format(calls, nw))
            end
            row[1 + ci] = res.overhead * 1e3
            row[1 + #creators + ci] = calls
            row[1 + 2 * #creators + ci] = res.cpu * 1e6
            at[nw .. "/" .. c] = res
        end
        rows[#rows + 1] = row
    end
    print("  overhead: time until the last waiter has its value minus the creator's time;")
    print("  lag: per waiter, from the creator's return to its own value (the poll step)")
    write_curve("waiters", header, rows)
    local big = counts[#counts]
    lib.row("curve_waiters_" .. big, ("miss path, %d coroutines waiting on a 10 ms creator: "
            .. "time past the creator (memory region)"):format(big),
            at[big .. "/0.01"].overhead * 1e3, "ms", "1 waiter", at["1/0.01"].overhead * 1e3, "")
    lib.row("curve_waiters_creators_" .. big, ("creator calls for %d coroutines on one missing key")
            :format(big), at[big .. "/0.01"].calls, "calls", "-", nil, "")
end

-- -- Main ------------------------------------------------------------------------------

local curves = {
    { "keys", curve_keys },
    { "values", curve_values },
    { "threads", curve_threads },
    { "waiters", curve_waiters },
}

local ok, err = xpcall(function()
    local ran = false
    for _, c in ipairs(curves) do
        if not only or only == c[1] then
            local t0 = now()
            c[2]()
            print(("  (%s: %.1f s)"):format(c[1], now() - t0))
            print()
            ran = true
        end
    end
    if not ran then
        error("unknown curve '" .. tostring(only) .. "' (keys, values, threads, waiters)", 0)
    end
end, debug.traceback)
sh("rm -rf " .. q(TMP))
if not ok then
    io.stderr:write("curves.lua: ", tostring(err), "\n")
    os.exit(1)
end
