--- Get-hit and get_multi(100) throughput of dogpile.cache.memcached against
-- python3-pymemcache on the same memcached server, in one run.
--
--   luajit bench/memcached.lua [gets = 1e5]
--
-- Starts its own memcached (-t 4 -m 64) on a free loopback port, stores
-- NKEYS keys with 100-byte values, then, one client, one connection each:
--   region:get             the whole hit: FFI get, envelope, codec decode
--   backend:get            the C backend's bytes, no envelope or decoding
--   region:get_multi(100)  100 keys per call, one multi-get (keys/s)
--   pymemcache get / get_many(100)   the anchor (Client, default serde:
--                          bytes in, bytes out), same keys and server
-- pymemcache comes from Debian's python3-pymemcache (installed with apt-get
-- when missing) and runs under /usr/bin/python3.
-- LUA_PATH and LUA_CPATH must reach the modules (see bench/README.md).
local ffi = require "ffi"
local cache = require "dogpile.cache"

local N = tonumber(arg and arg[1]) or 1e5
local NKEYS = 1000
local VALUE = string.rep("x", 100)
local PY = "/usr/bin/python3"

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

local function sh(cmd)
    local p = assert(io.popen(cmd .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    return out
end

local function port_open(port)
    return os.execute("bash -c '(exec 3<>/dev/tcp/127.0.0.1/" .. port .. ") 2>/dev/null'") == 0
end

-- -- The server and the anchor's package -----------------------------------------

if os.execute(PY .. " -c 'import pymemcache' 2>/dev/null") ~= 0 then
    io.stderr:write("installing python3-pymemcache\n")
    local sudo = sh("id -u"):match("^0") and "" or "sudo "
    assert(os.execute(sudo .. "apt-get install -y -qq --no-install-recommends python3-pymemcache"
                      .. " >/dev/null") == 0, "cannot install python3-pymemcache")
end

local port = tonumber(sh([[bash -c 'while :; do p=$((20000 + RANDOM % 20000)); ]]
    .. [[(exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo $p; exit; }; done']]):match("%d+"))
local pidfile = os.tmpname()
sh(("memcached -d -P %s -l 127.0.0.1 -p %d -U 0 -m 64 -t 4 -u root"):format(pidfile, port))
local t0 = clock()
while not port_open(port) do
    assert(clock() - t0 < 10, "memcached did not start")
    ffi.C.usleep(20000)
end
local function stop()
    local f = io.open(pidfile)
    if f then
        local pid = f:read("*a"):match("%d+")
        f:close()
        if pid then
            os.execute("kill " .. pid)
        end
        os.remove(pidfile)
    end
end

local results = {}
local function report(name, per_s, unit)
    results[#results + 1] = { name, per_s, unit }
    io.write(("%-26s %10.0f %s/s\n"):format(name, per_s, unit))
    io.flush()
end

local ok, err = pcall(function()
    local r = cache.make_region():configure("dogpile.cache.memcached", {
        arguments = { url = "127.0.0.1:" .. port },
    })
    local keys = {}
    for i = 1, NKEYS do
        keys[i] = "bench:" .. i
        r:set(keys[i], VALUE)
    end
    local b = r.actual_backend

    local function run(name, n, fn, unit, per_call)
        for i = 1, math.min(n, 2000) do -- warm-up
            fn(i)
        end
        local t = clock()
        for i = 1, n do
            fn(i)
        end
        report(name, n * (per_call or 1) / (clock() - t), unit)
    end

    run("region:get", N, function(i)
        local v = r:get(keys[i % NKEYS + 1])
        if v ~= VALUE then error("not a hit") end
    end, "gets")
    run("backend:get", N, function(i)
        b:get(keys[i % NKEYS + 1])
    end, "gets")
    local batches = {}
    for j = 0, NKEYS / 100 - 1 do
        local batch = {}
        for i = 1, 100 do
            batch[i] = keys[j * 100 + i]
        end
        batches[j + 1] = batch
    end
    local nb = #batches
    run("region:get_multi(100)", math.floor(N / 100), function(i)
        local vs = r:get_multi(batches[i % nb + 1])
        if vs[100] ~= VALUE then error("not a hit") end
    end, "keys", 100)

    -- The anchor, same keys (raw bytes of the same size as our envelopes).
    local envelope = #b:get(keys[1])
    local py = ([[
import time
from pymemcache.client.base import Client
c = Client(("127.0.0.1", %d), no_delay=True)
N, NKEYS = %d, %d
keys = ["pybench:%%d" %% i for i in range(1, NKEYS + 1)]
val = b"x" * %d
for k in keys:
    c.set(k, val)
def run(name, n, fn, per):
    for i in range(min(n, 2000)):
        fn(i)
    t = time.monotonic()
    for i in range(n):
        fn(i)
    print("%%s %%f" %% (name, n * per / (time.monotonic() - t)), flush=True)
def get(i):
    if c.get(keys[i %% NKEYS]) is None: raise SystemExit("miss")
run("get", N, get, 1)
batches = [keys[j * 100:(j + 1) * 100] for j in range(NKEYS // 100)]
def many(i):
    if len(c.get_many(batches[i %% len(batches)])) != 100: raise SystemExit("miss")
run("get_many", N // 100, many, 100)
]]):format(port, N, NKEYS, envelope)
    local out = sh(PY .. " -c '" .. py:gsub("'", [['"'"']]) .. "'")
    local g = out:match("get ([%d.]+)")
    local m = out:match("get_many ([%d.]+)")
    assert(g and m, "pymemcache run failed: " .. out)
    report("pymemcache get", tonumber(g), "gets")
    report("pymemcache get_many(100)", tonumber(m), "keys")
end)
stop()
if not ok then
    error(err, 0)
end
