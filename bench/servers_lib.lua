--- What bench/redis.lua, bench/memcached.lua and bench/lmdb.lua share: CPU
-- pinning, servers on loopback (those of bench/run, or their own), the C
-- floors (bench/floors.sh) and the Python anchors (bench/servers_anchors.py).
-- Loaded with dofile() next to the bench, like bench/lib.lua:
--   local S = dofile(BENCH_DIR .. "/servers_lib.lua")
local ffi = require "ffi"
local bit = require "bit"

local M = {}

M.dir = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$") or "."
M.root = M.dir .. "/.."
M.PY = "/usr/bin/python3" -- Debian's: it has the python3-* packages

pcall(ffi.cdef, [[
    int sched_setaffinity(int pid, size_t cpusetsize, const unsigned char *mask);
    int usleep(unsigned int usec);
]])

--- Runs `cmd` through the shell; returns its output (stderr included) and
-- whether it exited with 0.
function M.sh(cmd)
    local p = assert(io.popen(cmd .. " 2>&1; echo \"~rc=$?\""))
    local out = p:read("*a")
    p:close()
    local rc = tonumber(out:match("~rc=(%d+)%s*$"))
    return (out:gsub("~rc=%d+%s*$", "")), rc == 0
end

function M.sleep(s)
    ffi.C.usleep(math.floor(math.max(s, 0) * 1e6))
end

--- Pins this process (and every process it starts afterwards) to CPU `cpu`
-- (default 0), where bench/run and M.redis/M.memcached put the servers:
-- "client and server on one CPU". Returns true when it worked.
function M.pin(cpu)
    cpu = cpu or 0
    local mask = ffi.new("unsigned char[128]")
    mask[math.floor(cpu / 8)] = bit.lshift(1, cpu % 8)
    return ffi.C.sched_setaffinity(0, 128, mask) == 0
end

local function port_open(port)
    local _, ok = M.sh("bash -c 'exec 3<>/dev/tcp/127.0.0.1/" .. port .. "'")
    return ok
end

local function free_port()
    math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16) % 1000)
    while true do
        local p = 20000 + math.random(0, 11999)
        if not port_open(p) and not port_open(p + 1) then
            return p
        end
    end
end

local function wait_port(port, what)
    local t = 0
    while not port_open(port) do
        assert(t < 10, what .. " did not start on port " .. port)
        M.sleep(0.05)
        t = t + 0.05
    end
end

local function stopper(pidfile, tmpdir)
    return function()
        local f = io.open(pidfile)
        if f then
            local pid = f:read("*a"):match("%d+")
            f:close()
            if pid then
                os.execute("kill " .. pid .. " 2>/dev/null")
            end
        end
        os.remove(pidfile)
        if tmpdir then
            os.execute("rm -rf '" .. tmpdir .. "'")
        end
    end
end

--- A Redis server: REDIS_PORT's when set (bench/run's), else one of our own
-- on a free loopback port pinned to CPU 0. Returns port, stop(), origin.
function M.redis()
    local env = tonumber(os.getenv("REDIS_PORT"))
    if env then
        return env, function() end, "REDIS_PORT (bench/run's server)"
    end
    local dir = (M.sh("mktemp -d /tmp/dogpile-bench-redis-XXXXXX")):gsub("%s+$", "")
    local port = free_port()
    local out, ok = M.sh(("taskset -c 0 redis-server --port %d --bind 127.0.0.1 --save '' "
        .. "--appendonly no --dir %s --daemonize yes --pidfile %s/redis.pid --logfile %s/redis.log")
        :format(port, dir, dir, dir))
    assert(ok, "redis-server: " .. out)
    wait_port(port, "redis-server")
    return port, stopper(dir .. "/redis.pid", dir), "own redis-server, pinned to CPU 0"
end

--- A memcached: MEMCACHED_PORT's when set, else our own (as M.redis).
function M.memcached()
    local env = tonumber(os.getenv("MEMCACHED_PORT"))
    if env then
        return env, function() end, "MEMCACHED_PORT (bench/run's server)"
    end
    local port = free_port()
    local pidfile = os.tmpname()
    local out, ok = M.sh(("taskset -c 0 memcached -d -P %s -l 127.0.0.1 -p %d -U 0 -m 64 -t 1 -u %s")
        :format(pidfile, port, (M.sh("id -un")):gsub("%s+$", "")))
    assert(ok, "memcached: " .. out)
    wait_port(port, "memcached")
    return port, stopper(pidfile), "own memcached, pinned to CPU 0"
end

--- Builds the C floors (bench/floors.sh) and returns their directory.
function M.floors()
    local out, ok = M.sh("bash " .. M.dir .. "/floors.sh")
    assert(ok, "bench/floors.sh failed:\n" .. out)
    return (out:match("([^\n]+)%s*$"))
end

--- Runs a command that prints "name number" lines; returns {name = number}
-- (nil and the output when it failed).
function M.figures(cmd)
    local out, ok = M.sh(cmd)
    local t = {}
    for name, v in out:gmatch("([%w_]+) ([%d.]+)") do
        t[name] = tonumber(v)
    end
    if not ok or next(t) == nil then
        return nil, out
    end
    return t
end

--- bench/servers_anchors.py `args`; nil and the reason when it fails.
function M.python(args)
    return M.figures(M.PY .. " " .. M.dir .. "/servers_anchors.py " .. args)
end

return M
