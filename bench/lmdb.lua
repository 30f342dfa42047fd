--- Get-hit throughput of dogpile.cache.lmdb from 1 and 2 processes, against
-- dogpile.cache.shared_memory and nginx's ngx.shared.DICT, in one run.
--
--   luajit bench/lmdb.lua [gets per process = 2e6]
--
-- Each process reads NKEYS keys in turn, all hits, for N gets, after a
-- warm-up; a process reports gets per second, and "2 processes" is the sum
-- of two processes started together. Paths:
--   region:get lmdb         the whole hit: FFI get, envelope, codec decode
--   region:get shm          the same over shared_memory (one store per process)
--   backend:get lmdb / shm  the C backend's bytes, no envelope or decoding
--   ngx.shared.DICT:get     nginx workers (worker_processes 1, then 2), a
--                           timer in each worker runs the same loop
-- LUA_PATH and LUA_CPATH must reach the modules (see bench/README.md).
local ffi = require "ffi"

local N = tonumber(arg and arg[1] ~= "worker" and arg[1]) or 2e6
local NKEYS = 1000
local VALUE = string.rep("x", 100)

pcall(ffi.cdef, [[
    typedef struct { long tv_sec; long tv_nsec; } dp_bench_ts;
    int clock_gettime(int clk_id, dp_bench_ts *tp);
    int usleep(unsigned int usec);
]])
local ts = ffi.new("dp_bench_ts")
local function clock()
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local function wall()
    ffi.C.clock_gettime(0, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local function keys()
    local ks = {}
    for i = 1, NKEYS do
        ks[i] = "bench:key:" .. i
    end
    return ks
end

-- -- A measuring process ------------------------------------------------------------

local function open(backend, path)
    local cache = require "dogpile.cache"
    local args = backend == "lmdb" and { path = path, map_size = "64m", sync = "none" }
        or { name = "bench" }
    return cache.make_region():configure("dogpile.cache." .. backend, { arguments = args })
end

local function worker(backend, layer, path, n, start)
    local r = open(backend, path)
    local ks = keys()
    if backend == "shared_memory" then -- a store per process: fill this one
        for i = 1, NKEYS do
            r:set(ks[i], VALUE)
        end
    end
    local b = r.actual_backend
    local function loop(count)
        local total = 0
        if layer == "region" then
            for i = 1, count do
                total = total + #r:get(ks[i % NKEYS + 1])
            end
        else
            for i = 1, count do
                total = total + #b:get(ks[i % NKEYS + 1])
            end
        end
        return total
    end
    loop(2e5)
    while wall() < start do
        ffi.C.usleep(1000)
    end
    local t0 = clock()
    local total = loop(n)
    local dt = clock() - t0
    assert(total >= n * #VALUE, "a get missed")
    io.write(string.format("%.0f\n", n / dt))
end

if arg and arg[1] == "worker" then
    worker(arg[2], arg[3], arg[4], tonumber(arg[5]), tonumber(arg[6]))
    os.exit(0)
end

-- -- The driver ------------------------------------------------------------------------

local function sh(cmd)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    return out
end

local dir = sh("mktemp -d /tmp/dogpile-bench-XXXXXX"):gsub("%s+$", "")
sh("chmod 755 " .. dir) -- nginx workers run as another user
local script = debug.getinfo(1, "S").source:sub(2)

local function run_procs(backend, layer, nprocs)
    local start = wall() + 1.0
    local cmd = {}
    for i = 1, nprocs do
        cmd[i] = string.format("luajit %s worker %s %s %s %d %.3f > %s/out%d &",
                               script, backend, layer, dir .. "/lmdb", N, start, dir, i)
    end
    sh(table.concat(cmd, " ") .. " wait")
    local sum = 0
    for i = 1, nprocs do
        local f = assert(io.open(dir .. "/out" .. i))
        local s = f:read("*a")
        f:close()
        local v = tonumber(s:match("%d+"))
        if not v then
            error("a worker failed: " .. s)
        end
        sum = sum + v
    end
    return sum
end

local rows = {}
local function row(name, one, two)
    rows[#rows + 1] = string.format("%-24s %14.2f %14.2f %8.2fx", name, one / 1e6, two / 1e6,
                                    two / one)
end

-- Fill the LMDB environment once; every worker reads it.
do
    local r = open("lmdb", dir .. "/lmdb")
    for _, k in ipairs(keys()) do
        r:set(k, VALUE)
    end
end

for _, p in ipairs({ { "lmdb", "region" }, { "shared_memory", "region" },
                     { "lmdb", "backend" }, { "shared_memory", "backend" } }) do
    local one = run_procs(p[1], p[2], 1)
    local two = run_procs(p[1], p[2], 2)
    row(p[2] .. ":get " .. (p[1] == "lmdb" and "lmdb" or "shm"), one, two)
end

-- -- ngx.shared.DICT, measured by nginx workers ----------------------------------------

local function nginx_run(workers)
    local ndir = dir .. "/nginx" .. workers
    sh("mkdir -p " .. ndir .. "/logs && chmod 777 " .. ndir .. " " .. ndir .. "/logs")
    local results = ndir .. "/results"
    local conf = string.format([[
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes %d;
daemon on;
pid %s/nginx.pid;
error_log %s/logs/error.log warn;
events { worker_connections 64; }
http {
    access_log off;
    lua_shared_dict bench 16m;
    init_by_lua_block {
        local d = ngx.shared.bench
        for i = 1, %d do d:set("bench:key:" .. i, string.rep("x", 100)) end
    }
    init_worker_by_lua_block {
        ngx.timer.at(0, function()
            local d, ks, n = ngx.shared.bench, {}, %d
            for i = 1, %d do ks[i] = "bench:key:" .. i end
            local function loop(count)
                local total = 0
                for i = 1, count do total = total + #d:get(ks[i %% %d + 1]) end
                return total
            end
            loop(200000)
            ngx.update_time()
            local t0 = ngx.now()
            local total = loop(n)
            ngx.update_time()
            local dt = ngx.now() - t0
            local f = io.open("%s", "a")
            f:write(string.format("%%.0f\n", total >= n * 100 and n / dt or -1))
            f:close()
        end)
    }
    server { listen unix:%s/nginx.sock; }
}
]], workers, ndir, ndir, NKEYS, N * 2, NKEYS, NKEYS, results, ndir)
    local f = assert(io.open(ndir .. "/nginx.conf", "w"))
    f:write(conf)
    f:close()
    local out = sh("nginx -p " .. ndir .. " -c " .. ndir .. "/nginx.conf 2>&1")
    local t0 = wall()
    local lines = {}
    while wall() - t0 < 30 do
        local rf = io.open(results)
        if rf then
            lines = {}
            for l in rf:lines() do
                lines[#lines + 1] = tonumber(l)
            end
            rf:close()
            if #lines >= workers then
                break
            end
        end
        ffi.C.usleep(50000)
    end
    local pidf = io.open(ndir .. "/nginx.pid")
    if pidf then
        local pid = pidf:read("*n")
        pidf:close()
        sh("kill -QUIT " .. pid)
    end
    if #lines < workers then
        io.stderr:write("nginx with ", workers, " workers gave no result: ", out, "\n",
                        sh("tail -5 " .. ndir .. "/logs/error.log"), "\n")
        return nil
    end
    local sum = 0
    for _, v in ipairs(lines) do
        sum = sum + v
    end
    return sum
end

if sh("command -v nginx") ~= "" then
    local one, two = nginx_run(1), nginx_run(2)
    if one and two then
        row("ngx.shared.DICT:get", one, two)
    end
else
    io.stderr:write("nginx not found: ngx.shared.DICT not measured\n")
end

print(string.format("%d keys of %d bytes, %g gets per process; million gets/s (sum over processes)",
                    NKEYS, #VALUE, N))
print(string.format("%-24s %14s %14s %9s", "path", "1 process", "2 processes", "scaling"))
for _, l in ipairs(rows) do
    print(l)
end
print(string.format("(%d CPUs)", tonumber(sh("nproc")) or 0))
sh("rm -rf " .. dir)
