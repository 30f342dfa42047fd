-- What spec/pickle_spec.lua and spec/wire_spec.lua share: running Debian's
-- Python on spec/fixtures/python/dogpile_wire.py, the canonical text of a
-- value (the same text dogpile_wire.py's canon() writes for the Python
-- value), and input buffers followed by an unreadable page, so that any read
-- past the end of an input is a crash the spec cannot miss.
local ffi = require "ffi"
local pyvalue = require "dogpile.cache.pyvalue"

local _M = {}

_M.PYTHON = "/usr/bin/python3"
_M.SCRIPT = "spec/fixtures/python/dogpile_wire.py"

--- Runs the fixture script; its output, and whether it exited 0.
function _M.python(...)
    local args = { _M.PYTHON, _M.SCRIPT }
    for _, a in ipairs { ... } do
        args[#args + 1] = "'" .. tostring(a):gsub("'", "'\\''") .. "'"
    end
    local p = assert(io.popen(table.concat(args, " ") .. " 2>&1; echo \"exit=$?\""))
    local out = p:read("*a")
    p:close()
    local code = tonumber(out:match("exit=(%d+)%s*$"))
    return out:gsub("exit=%d+%s*$", ""), code == 0
end

--- A fresh temporary folder.
function _M.tmpdir()
    local p = assert(io.popen("mktemp -d /tmp/dogpile-py.XXXXXX"))
    local d = p:read("*l")
    p:close()
    return d
end

function _M.rmdir(d)
    assert(d:match("^/tmp/dogpile%-py%."))
    os.execute("rm -rf '" .. d .. "'")
    made = {}
end

function _M.read(path)
    local f = io.open(path, "rb")
    if not f then
        return nil
    end
    local s = f:read("*a")
    f:close()
    return s
end

local made = {}

function _M.write(path, data)
    local dir = path:match("^(.*)/")
    if not made[dir] then
        os.execute("mkdir -p '" .. dir .. "'")
        made[dir] = true
    end
    local f = assert(io.open(path, "wb"))
    f:write(data)
    f:close()
end

--- Names of the files in `dir` (ls order).
function _M.list(dir)
    local out = {}
    local p = assert(io.popen("ls '" .. dir .. "'"))
    for line in p:lines() do
        out[#out + 1] = line
    end
    p:close()
    return out
end

local function hex(s)
    return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local canon

local function items(t, len)
    local out = {}
    for i = 1, len do
        out[i] = canon(t[i] == nil and pyvalue.null or t[i])
    end
    return table.concat(out, ",")
end

local function sorted_keys(t, fmt)
    local out = {}
    for k, v in pairs(t) do
        out[#out + 1] = fmt(k, v)
    end
    table.sort(out)
    return table.concat(out, ",")
end

--- The canonical text of a Lua value read with marked decoding (every
-- Python type told apart), as dogpile_wire.py's canon() writes it.
canon = function(v)
    if v == nil or v == pyvalue.null then
        return "None"
    elseif v == true then
        return "True"
    elseif v == false then
        return "False"
    elseif type(v) == "number" then
        if pyvalue.is_int(v) then
            return string.format("int:%d", v)
        end
        return "float:" .. pyvalue.float_repr(v)
    elseif type(v) == "string" then
        return "str:" .. hex(v)
    elseif pyvalue.is_int64(v) then
        return "int:" .. tostring(v):gsub("U?LL$", "")
    end
    local mt = getmetatable(v)
    if mt == pyvalue.bytes_mt then
        return "bytes:" .. hex(v[1])
    elseif mt == pyvalue.float_mt then
        return "float:" .. pyvalue.float_repr(v[1])
    elseif mt == pyvalue.CachedValue_mt then
        return "CachedValue(" .. canon(v.payload) .. "," .. canon(v.metadata) .. ")"
    elseif mt == pyvalue.list_mt or mt == pyvalue.tuple_mt then
        return mt.__pytype .. "[" .. items(v, rawget(v, "n") or #v) .. "]"
    elseif mt == pyvalue.set_mt or mt == pyvalue.frozenset_mt then
        return mt.__pytype .. "{" .. sorted_keys(v, function(k) return canon(k) end) .. "}"
    elseif mt == pyvalue.dict_mt then
        return "dict{" .. sorted_keys(v, function(k, x) return canon(k) .. "=" .. canon(x) end) .. "}"
    end
    error("no canonical text for an unmarked " .. type(v))
end
_M.canon = canon

-- -- Guarded buffers ----------------------------------------------------------------

pcall(ffi.cdef, [[
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int mprotect(void *addr, size_t len, int prot);
]])

local PAGE = 4096
local PROT_NONE, PROT_RW = 0, 3
local MAP_PRIVATE_ANON = 0x02 + 0x20

--- A buffer of `size` bytes whose end touches a PROT_NONE page: `put(s)`
-- copies `s` against that page and returns a pointer to its first byte.
function _M.guarded(size)
    local data = math.ceil((size + 1) / PAGE) * PAGE
    local base = ffi.C.mmap(nil, data + PAGE, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
    assert(ffi.cast("intptr_t", base) ~= -1, "mmap failed")
    base = ffi.cast("uint8_t *", base)
    assert(ffi.C.mprotect(base + data, PAGE, PROT_NONE) == 0, "mprotect failed")
    local g = {}
    function g.put(s)
        assert(#s <= data)
        local p = base + data - #s
        ffi.copy(p, s, #s)
        return p
    end
    function g.free()
        ffi.C.munmap(base, data + PAGE)
    end
    return g
end

-- -- Servers -------------------------------------------------------------------
-- The test command's redis and memcached (DP_TEST_REDIS_PORT,
-- DP_TEST_MEMCACHED_PORTS), else servers of the caller's own on free loopback
-- ports below the ephemeral range (.ci/lib.sh free_port), data in `dir`:
-- `servers:redis_port(dir)`, `servers:memcached_port(dir)`, and
-- `servers:stop()` for the ones it started.

local support = require "support"
local free_port, port_open, shell = support.free_port, support.port_open, support.sh

local Servers = {}
Servers.__index = Servers

function _M.servers()
    return setmetatable({ own = {} }, Servers)
end

function Servers:started(port, pidfile, what)
    for _ = 1, 500 do
        local pid = (_M.read(pidfile) or ""):match("%d+")
        if pid and port_open(port) then
            self.own[#self.own + 1] = pid
            return port
        end
        support.sleep(0.02)
    end
    error(what .. " did not start on port " .. port)
end

function Servers:redis_port(dir)
    local env = tonumber(os.getenv("DP_TEST_REDIS_PORT"))
    if env then
        return env
    end
    local port = free_port()
    shell(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --daemonize yes "
           .. "--dir %s --pidfile %s/redis.pid --logfile %s/redis.log"):format(port, dir, dir, dir))
    return self:started(port, dir .. "/redis.pid", "redis-server")
end

function Servers:memcached_port(dir)
    local env = (os.getenv("DP_TEST_MEMCACHED_PORTS") or ""):match("%d+")
    if env then
        return tonumber(env)
    end
    local port = free_port()
    shell(("memcached -d -P %s/memcached.pid -l 127.0.0.1 -p %d -U 0 -m 64 -u root"):format(dir, port))
    return self:started(port, dir .. "/memcached.pid", "memcached")
end

function Servers:stop()
    for _, pid in ipairs(self.own) do
        os.execute("kill -9 " .. pid .. " 2>/dev/null")
    end
    self.own = {}
end

return _M
