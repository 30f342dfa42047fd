-- What spec/ngx_redis_spec.lua and spec/ngx_memcached_spec.lua share: the
-- checks issue 13 asks of every backend that nginx reaches over cosockets
-- (a stampede of nginx requests and plain processes runs one creator, values
-- read byte for byte across, a SIGSTOPped server blocks no worker, the
-- phases that cannot yield), each run against one backend described by a
-- table `b`:
--   nginx     the server ngx_support.start gave (fixture handlers:
--             spec/fixtures/nginx_backend/backend_app.lua)
--   regions   the same regions file loaded in this process (the C backend)
--   region    the region the checks use, on both sides; `query` names it in
--             a request ("region=ring&", or "" for the fixture's default)
--   phase_region  the region of the fixture's phase handlers
--   tmp, fixtures  the spec's temporary folder and its fixture folder
--   env       "NAME=value ..." for the plain processes (the servers' ports)
--   port      the main server's port, handed to the processes' count()
--   count     Lua source defining count(port, key) in a plain process: a
--             creator's run counted where nginx's creators count theirs
--   paused_pid()  the pid of the server the region "paused" uses
--   timeout_error  what a get on "paused" answers while it is stopped
local support = require "support"
local ngx_support = require "ngx_support"
-- busted's assert (the spec's environment is not this module's).
local assert = require "luassert"

local now, sleep, sh, write, read = support.now, support.sleep, support.sh, support.write,
    support.read

local _M = {}

_M.values = dofile(debug.getinfo(1, "S").source:sub(2):gsub("ngx_backend_support%.lua$", "")
                   .. "fixtures/nginx_backend/values.lua")

--- Fail (as a test: busted's `it`) when nginx-extras is missing; true
-- when it is there.
function _M.need_nginx(it)
    if ngx_support.available() then
        return true
    end
    it("needs nginx-extras", function()
        error("nginx-extras is not installed (/usr/sbin/nginx with the Lua module; "
              .. ".ci/test installs it)", 0)
    end)
    return false
end

--- Stop nginx, then fail on an alert, emerg or crit line in its error.log.
function _M.stop_nginx(nginx)
    local log = nginx and nginx:log() or ""
    if nginx then
        nginx:stop()
    end
    return function()
        assert.is_nil(log:match("%[alert%][^\n]*") or log:match("%[emerg%][^\n]*")
                      or log:match("%[crit%][^\n]*"), "nginx error.log:\n" .. log)
    end
end

function _M.wait_for(what, fn, limit, why)
    local t0 = now()
    while not fn() do
        assert(now() - t0 < limit, what .. " did not happen within " .. limit .. " s"
               .. (why and (": " .. tostring(why())) or ""))
        sleep(0.05)
    end
end
local wait_for = _M.wait_for

local uniq = 0
function _M.fresh(prefix)
    uniq = uniq + 1
    return ("%s-%d-%d-%d"):format(prefix, os.time(), math.random(1e6), uniq)
end
local fresh = _M.fresh

-- Run `fn` with the server of region "paused" SIGSTOPped, continuing it
-- however fn ends.
local function stopped(b, fn)
    local pid = b.paused_pid()
    sh("kill -STOP " .. pid)
    local ok, err = pcall(fn)
    sh("kill -CONT " .. pid)
    if not ok then
        error(err, 0)
    end
end

--- The value in a fixture's "<value> <pid>" answer.
function _M.value_of(body)
    return (body:match("^(.*) %d+$"))
end
local value_of = _M.value_of

-- A plain LuaJIT process on the C backend, loading the fixture's regions
-- file (arg[1]) as nginx does; it starts `body` at the wall-clock time
-- arg[2].
local PROCESS = [[
local cache = require "dogpile.cache"
local ffi = require "ffi"
pcall(ffi.cdef, "int usleep(unsigned int usec);")
local function sleep(s) ffi.C.usleep(math.floor(math.max(s, 0) * 1e6)) end
local function now() return require("dogpile").now() end
local regions = cache.load_regions(arg[1])
local start = tonumber(arg[2])
while now() < start do sleep(0.001) end
]]

--- The script `name` in b.tmp: PROCESS, b.count's count(), then `body`.
function _M.process_script(b, name, body)
    local path = b.tmp .. "/" .. name .. ".lua"
    write(path, PROCESS .. (b.count or "") .. "\n" .. body)
    return path
end

--- Start the plain process `script` in the background: regions file, start
-- time, then `...`, its output to <tmp>/<out>.
function _M.spawn(b, script, start, out, ...)
    local args = {}
    for i, a in ipairs({ ... }) do
        args[i] = tostring(a)
    end
    os.execute(("%s luajit %s %s %.3f %s > %s/%s 2>&1 &")
               :format(b.env, script, b.fixtures .. "/regions.lua", start, table.concat(args, " "),
                       b.tmp, out))
end

--- Values written on either side are read on the other, and the stored
-- bytes are the same but for the created time; nginx reads raw what the C
-- client reads. Returns the C backend (raw bytes) for more checks.
function _M.values_across(b)
    local region = b.regions[b.region]
    local raw = region.actual_backend -- the C backend: the stored bytes
    local envelope = require "dogpile.cache.envelope"
    local kinds = 0
    for kind, v in pairs(_M.values) do
        kinds = kinds + 1
        local kn, kp = fresh("from-nginx-" .. kind), fresh("from-plain-" .. kind)
        local body, status = b.nginx:get("/set_value?" .. b.query .. "key=" .. kn .. "&kind="
                                         .. kind)
        assert.are.equal(200, status, body)
        region:set(kp, v)
        assert.are.same(v, region:get(kn), kind)
        body = b.nginx:get("/check_value?" .. b.query .. "key=" .. kp .. "&kind=" .. kind)
        assert.are.equal("same", body, kind)
        -- The same bytes but for the created time (envelope bytes 9-16);
        -- a table's hash part is written in its iteration order, which
        -- is not the same in two Lua states, so only its value counts.
        local bn, bp = raw:get(kn), raw:get(kp)
        assert.are.equal(bp:sub(1, 8), bn:sub(1, 8), kind)
        if kind ~= "table" then
            assert.are.equal(bp:sub(envelope.HEADER + 1), bn:sub(envelope.HEADER + 1), kind)
        end
        -- What nginx reads raw is what the C client reads.
        local hex = b.nginx:get("/raw?" .. b.query .. "key=" .. kn)
        assert.are.equal((bn:gsub(".", function(c) return ("%02x"):format(c:byte()) end)),
                         hex, kind)
    end
    assert.is_true(kinds >= 10)
    return raw
end

--- 200 requests in nginx and 2 plain processes on one missing key whose
-- creator takes 200 ms: one value, made once, both workers answering.
-- Returns the key (the spec checks its counter and lock key).
function _M.stampede(b)
    local key = fresh("stampede")
    local script = _M.process_script(b, "stampede", ([[
local key, port, out = arg[3], tonumber(arg[4]), arg[5]
local v = regions.%s:get_or_create(key, function()
    local n = count(port, key)
    sleep(0.2)
    return key .. "#" .. n .. "@plain"
end)
local f = io.open(out, "w")
f:write(v)
f:close()
]]):format(b.region))
    local start = now() + 1.5
    for i = 1, 2 do
        _M.spawn(b, script, start, "stampede" .. i .. ".err", key, b.port,
                 b.tmp .. "/stampede" .. i .. ".out")
    end
    while now() < start do
        sleep(0.001)
    end
    local res = b.nginx:concurrent("/get_or_create?" .. b.query .. "key=" .. key .. "&sleep=0.2",
                                   200)
    assert.are.equal(200, #res)
    local seen, pids = {}, {}
    for _, r in ipairs(res) do
        assert.are.equal(200, r.status, r.body)
        local v, pid = r.body:match("^(.*) (%d+)$")
        seen[v] = true
        pids[pid] = true
    end
    local out1, out2 = b.tmp .. "/stampede1.out", b.tmp .. "/stampede2.out"
    wait_for("the plain processes", function()
        return read(out1) and read(out2)
    end, 15, function()
        return (read(b.tmp .. "/stampede1.err") or "") .. (read(b.tmp .. "/stampede2.err") or "")
    end)
    seen[read(out1)] = true
    seen[read(out2)] = true
    local distinct = {}
    for v in pairs(seen) do
        distinct[#distinct + 1] = v
    end
    assert.are.same({ key .. "#1@" .. (distinct[1] or ""):match("@(%a+)$") }, distinct)
    local n = 0
    for _ in pairs(pids) do
        n = n + 1
    end
    assert.are.equal(2, n, "both workers answered")
    return key
end

--- A plain process takes the lock of `key` (b.region) 1 s from now, holds
-- it 0.6 s, stores "from the holder" and releases; returns 0.1 s into the
-- hold (the caller checks that the lock is taken).
function _M.plain_holds(b, key)
    local script = _M.process_script(b, "holder", ([[
local key = arg[3]
local m = regions.%s.backend:get_mutex(key)
assert(m:acquire(false))
sleep(0.6)
regions.%s:set(key, "from the holder")
m:release()
]]):format(b.region, b.region))
    local start = now() + 1
    _M.spawn(b, script, start, "holder.out", key)
    while now() < start + 0.1 do
        sleep(0.001)
    end
end

--- `n` requests of `path` at once, in the background (one curl); the body
-- of the i-th goes to <tmp>/w<i>. Returns a function that waits for them
-- all, checks that each answered 200, and returns the slowest's time.
function _M.requests(b, path, n)
    local out = b.tmp .. "/requests.txt"
    os.remove(out)
    os.execute(("%s -s -m 10 -Z --parallel-immediate --parallel-max %d -o '%s/w#1' "
                .. "-w '%%{http_code} %%{time_total}\\n' '%s' > %s 2>/dev/null &")
               :format(ngx_support.CURL, n, b.tmp, b.nginx:url(path .. "&n=[1-" .. n .. "]"), out))
    return function()
        wait_for("the " .. n .. " requests", function()
            local _, lines = (read(out) or ""):gsub("\n", "")
            return lines >= n
        end, 10)
        local max = 0
        for code, t in read(out):gmatch("(%d+) ([%d.]+)") do
            assert.are.equal("200", code)
            max = math.max(max, tonumber(t))
        end
        return max
    end, out
end

--- nginx takes the lock of `key` (b.region) and creates for 0.7 s; a plain
-- process asks meanwhile and must get nginx's value, its creator never
-- run, well before 1 s. b.lock_held(key) says when nginx holds it.
function _M.nginx_holds(b, key)
    local script = _M.process_script(b, "waiter", ([[
local key, port, out = arg[3], tonumber(arg[4]), arg[5]
local t0 = now()
local v = regions.%s:get_or_create(key, function()
    count(port, key)
    return "from the process"
end)
local f = io.open(out, "w")
f:write(v, " ", now() - t0)
f:close()
]]):format(b.region))
    local body = b.tmp .. "/holder.body"
    os.remove(body)
    os.execute(("%s -s -m 10 '%s' > %s 2>/dev/null &")
               :format(ngx_support.CURL, b.nginx:url("/get_or_create?" .. b.query .. "key=" .. key
                                                      .. "&sleep=0.7"), body))
    wait_for("nginx taking the lock", function() return b.lock_held(key) end, 5)
    local out, err = b.tmp .. "/waiter.out", b.tmp .. "/waiter.err"
    _M.spawn(b, script, 0, "waiter.err", key, b.port, out)
    wait_for("the process", function() return read(out) end, 10,
             function() return read(err) end)
    local v, t = read(out):match("^(.*) ([%d.]+)$")
    assert.are.equal(key .. "#1@nginx", v, read(err))
    assert.is_true(tonumber(t) < 0.7 + 0.3, "the process waited " .. t .. " s")
    wait_for("the holder's answer", function() return (read(body) or "") ~= "" end, 5)
    assert.are.equal(key .. "#1@nginx", value_of(read(body)))
end

--- While the server of region "paused" is SIGSTOPped, a location that does
-- not touch the cache answers in under 10 ms and cache requests fail within
-- socket_timeout (1 s), saying so.
function _M.not_blocked(b)
    local nginx = b.nginx
    assert.are.equal(200, select(2, nginx:get("/set?region=paused&key=p&value=v")))
    stopped(b, function()
        local dir = b.tmp .. "/paused"
        os.execute("mkdir -p " .. dir)
        os.execute(("%s -s -m 10 -Z --parallel-immediate --parallel-max 20 -o '%s/#1' "
                    .. "-w '%%{http_code} %%{time_total} %%{url_effective}\\n' '%s' > %s/codes 2>/dev/null &")
                   :format(ngx_support.CURL, dir, nginx:url("/get?region=paused&key=p&n=[1-20]"),
                           dir))
        sleep(0.05)
        -- A worker blocked on the stopped server would hold these for
        -- socket_timeout (1 s): all 20 are answered before the cache
        -- requests have even failed, each in under 10 ms (the median: the
        -- slowest also carries the test machine's scheduling noise).
        local out = sh(("%s -s -m 5 -o /dev/null -H 'Connection: close' -w '%%{http_code} "
                        .. "%%{time_total}\\n' '%s'"):format(ngx_support.CURL,
                                                            nginx:url("/plain?n=[1-20]")))
        local times = {}
        for code, t in out:gmatch("(%d+) ([%d.]+)") do
            assert.are.equal("200", code)
            times[#times + 1] = tonumber(t)
        end
        assert.are.equal(20, #times, out)
        table.sort(times)
        local said = "times: " .. table.concat(times, " ") .. " s"
        assert.is_true(times[10] < 0.010, said)
        assert.is_true(times[20] < 0.1, said)
        assert.are.equal("", read(dir .. "/codes") or "", "the cache requests ended first")
        wait_for("the cache requests", function()
            local _, n = (read(dir .. "/codes") or ""):gsub("\n", "")
            return n >= 20
        end, 10)
        local n = 0
        for code, t, i in read(dir .. "/codes"):gmatch("(%d+) ([%d.]+) [^\n]-n=(%d+)\n") do
            n = n + 1
            local body = read(dir .. "/" .. i)
            assert.are.equal("500", code, body)
            assert.is_true(tonumber(t) < 1 + 0.3, "took " .. t .. " s")
            assert.matches(b.timeout_error, body, 1, true)
        end
        assert.are.equal(20, n)
    end)
    assert.are.equal("v", value_of(nginx:get("/get?region=paused&key=p")))
end

--- In init_worker, set, header_filter, body_filter, log and balancer: a get
-- of a stored key is a miss, a set lands (through a timer), a creator runs
-- without the lock; nothing waits, not even on a stopped server.
function _M.phases(b)
    local nginx, region = b.nginx, b.regions[b.phase_region]
    local function result(phase, name)
        local r
        wait_for(phase .. "'s result", function()
            r = nginx:get("/result?name=" .. name)
            return r ~= "nil"
        end, 5)
        local ok, got, created, ms = r:match("^(%a+)|(.-)|(.-)|([%d.]+)$")
        assert.are.equal("ok", ok, r)
        assert.are.equal("miss", got, phase .. ": " .. r)
        assert.are.equal("created in " .. phase, created, r)
        return tonumber(ms)
    end
    local function landed(phase, key)
        wait_for(phase .. "'s deferred writes", function()
            return region:get(key .. ":written") == "written in " .. phase
                and region:get(key .. ":created") == "created in " .. phase
        end, 5)
    end
    -- init_worker ran at startup, where "iw0" and "iw1" were stored.
    for id = 0, 1 do
        assert.is_true(result("init_worker", "init_worker:iw" .. id) < 100)
        landed("init_worker", "iw" .. id)
    end
    local phases = { "set", "header_filter", "body_filter", "log", "balancer" }
    for _, phase in ipairs(phases) do
        local key = fresh(phase)
        region:set(key, "stored")
        local body, status = nginx:get("/phase_" .. phase .. "?key=" .. key)
        assert.are.equal(200, status, body)
        assert.is_true(result(phase, phase .. ":" .. key) < 100)
        landed(phase, key)
    end
    -- On a stopped server nothing waits: a call that did would take
    -- socket_timeout (1 s) at least.
    stopped(b, function()
        for _, phase in ipairs(phases) do
            local key = fresh(phase .. "-stopped")
            local body, status, t = nginx:get("/phase_" .. phase .. "?region=paused&key=" .. key)
            assert.are.equal(200, status, body)
            assert.is_true(t < 0.2, phase .. ": the request took " .. t .. " s")
            local ms = result(phase, phase .. ":" .. key)
            assert.is_true(ms < 100, phase .. " took " .. ms .. " ms")
        end
    end)
end

return _M
