-- Regions with wire_format = "dogpile.cache" sharing one cache and one lock
-- with Python's dogpile.cache (python3-dogpile.cache 1.1.8) on real servers:
-- Python regions (redis with pickle and json, pymemcache, python-memcached,
-- pymemcache with json) write every case, Lua regions read them equal with
-- the same created time; Lua regions write, the Python regions read them
-- equal; oslo.cache's protocol-0 values read; a value of another dogpile.cache
-- version is a miss, one that does not decode a logged miss that
-- get_or_create overwrites; 3 Python and 3 Lua processes on one missing key
-- run one creator (counted on the server), and on one expired key one
-- regeneration while the others get the stale value at once.
-- Servers: the test command's (DP_TEST_REDIS_PORT, DP_TEST_MEMCACHED_PORTS),
-- else our own on free loopback ports, stopped in teardown.
local cache = require "dogpile.cache"
local pickle = require "dogpile.cache.pickle"
local pyjson = require "dogpile.cache.pyjson"
local pyvalue = require "dogpile.cache.pyvalue"
local context = require "dogpile.context"
local py = require "python_support"

local canon, read, write = py.canon, py.read, py.write
local NO_VALUE = cache.NO_VALUE
local HERE = "spec/fixtures/python"
local MARKED = { mark = true, int64 = true }

local DIR
local PORTS = {}
local RUN = ("%d%d"):format(os.time(), math.random(1e6))

local function sh(cmd)
    local p = assert(io.popen(cmd .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    return out
end

local SERVERS = py.servers() -- stopped in teardown
local function redis_port()
    return SERVERS:redis_port(DIR)
end
local function memcached_port()
    return SERVERS:memcached_port(DIR)
end

-- Python runs without the sanitizer runtime the ASan variant preloads into
-- busted (Python is not built with it).
local PYTHON = "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS " .. py.PYTHON

local function interop(...)
    local args = { PYTHON, HERE .. "/interop.py" }
    for _, a in ipairs { ... } do
        args[#args + 1] = "'" .. tostring(a):gsub("'", "'\\''") .. "'"
    end
    local out = sh(table.concat(args, " ") .. "; echo \"exit=$?\"")
    local code = tonumber(out:match("exit=(%d+)%s*$"))
    return out:gsub("exit=%d+%s*$", ""), code == 0
end

local function check_output(out, ok)
    assert(ok, out)
    local count, failed = out:match("checked (%d+), (%d+) failed")
    assert(failed == "0", out)
    return tonumber(count)
end

local function is_redis(kind)
    return kind:match("^redis") ~= nil
end

local function is_json(kind)
    return kind:match("json$") ~= nil
end

local function port_of(kind)
    return is_redis(kind) and PORTS.redis or PORTS.memcached
end

-- The Lua region that shares the Python region of `kind` (interop.py).
local function lua_region(kind, opts, exp)
    local make = { wire_format = "dogpile.cache", wire_options = opts }
    if is_json(kind) then
        make.serializer = "json"
    end
    local backend, args
    if is_redis(kind) then
        backend, args = "dogpile.cache.redis", { host = "127.0.0.1", port = PORTS.redis,
                                                 lock_timeout = 10 }
    else
        backend, args = "dogpile.cache.memcached", { url = "127.0.0.1:" .. PORTS.memcached,
                                                     lock_timeout = 10 }
    end
    return cache.make_region(make):configure(backend, { arguments = args, expiration_time = exp })
end

-- A native region on the same server: raw bytes in and out.
local function raw_backend(kind)
    local r
    if is_redis(kind) then
        r = cache.make_region():configure("dogpile.cache.redis",
                                          { arguments = { host = "127.0.0.1", port = PORTS.redis } })
    else
        r = cache.make_region():configure("dogpile.cache.memcached",
                                          { arguments = { url = "127.0.0.1:" .. PORTS.memcached } })
    end
    return r.actual_backend
end

-- Every case of dogpile_wire.py: name -> canonical text.
local function case_texts()
    local out = {}
    for name, text in read(DIR .. "/cases.txt"):gmatch("([^\t\n]+)\t([^\n]*)") do
        out[name] = text
    end
    return out
end

local KINDS = { "redis-pickle", "redis-json", "pymemcache", "memcached", "pymemcache-json" }

-- Runs `procs` ({cmd, ...}) at once, each bounded by 60 s; their outputs.
local function run_all(procs)
    local parts = {}
    for i, cmd in ipairs(procs) do
        parts[#parts + 1] = ("timeout 60 %s > %s/proc%d.out 2>&1 &"):format(cmd, DIR, i)
    end
    os.execute("bash -c '" .. table.concat(parts, " "):gsub("'", "'\\''") .. " wait'")
    local outs = {}
    for i = 1, #procs do
        outs[i] = read(("%s/proc%d.out"):format(DIR, i)) or ""
    end
    return outs
end

local function quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- 3 Python and 3 Lua processes calling get_or_create(key) at `start`; their
-- outputs ("got <value>") in that order, and the creators counted.
local function stampede(kind, key, exp, sleep)
    local counter = key .. ":count"
    local start = require("dogpile.lib").C.dp_clock_now() + 2.5
    local procs = {}
    for i = 1, 3 do
        procs[#procs + 1] = table.concat({ PYTHON, HERE .. "/interop.py", "stampede", kind,
                                           port_of(kind), quote(key), quote(counter),
                                           ("%.3f"):format(start), sleep, exp, "py" .. i }, " ")
    end
    for i = 1, 3 do
        procs[#procs + 1] = table.concat({ "luajit", HERE .. "/lua_worker.lua", kind,
                                           port_of(kind), quote(key), quote(counter),
                                           ("%.3f"):format(start), sleep, exp, "lua" .. i }, " ")
    end
    local outs = run_all(procs)
    local got = {}
    for i, out in ipairs(outs) do
        got[i] = out:match("got (%S+)")
        assert(got[i], ("process %d (%s) printed no value: %s"):format(i, procs[i], out))
    end
    local out, ok = interop("incr", kind, port_of(kind), counter)
    assert(ok, out)
    return got, tonumber(out:match("%d+")) - 1
end

describe("wire_format = \"dogpile.cache\" with Python's dogpile.cache", function()
    setup(function()
        DIR = py.tmpdir()
        local out, ok = py.python("gen-pickle", DIR)
        assert(ok, "the Python fixture failed (python3-dogpile.cache installed?): " .. out)
        PORTS.redis = redis_port()
        PORTS.memcached = memcached_port()
    end)

    teardown(function()
        SERVERS:stop()
        if DIR then
            py.rmdir(DIR)
        end
    end)

    for _, kind in ipairs(KINDS) do
        it(kind .. ": Lua reads what the Python region writes, equal, same created time", function()
            local prefix = ("h18:%s:py:%s:"):format(RUN, kind)
            local folder = DIR .. "/pw/" .. kind
            local out, ok = interop("write", kind, port_of(kind), prefix, folder)
            assert(ok, out)
            local region = lua_region(kind, MARKED)
            local n = 0
            for _, f in ipairs(py.list(folder)) do
                local name = f:match("^(.*)%.expect$")
                if name then
                    local key = prefix .. name
                    local v = region:get(key)
                    assert.are_not.equal(NO_VALUE, v, name)
                    assert.are.equal(read(folder .. "/" .. f), canon(v), name)
                    local md = region:get_value_metadata(key)
                    assert.are.equal(read(folder .. "/" .. name .. ".ct"),
                                     pyvalue.float_repr(md.metadata.ct), name)
                    n = n + 1
                end
            end
            assert.is_true(n >= (is_json(kind) and 30 or 60), kind .. ": only " .. n .. " cases")
            assert.are.equal(0, region:stats().errors)
            -- Expiry agrees: the created time is Python's time.time().
            local key = prefix .. "int_7"
            local age = require("dogpile.lib").C.dp_clock_now()
                - tonumber(read(folder .. "/int_7.ct"))
            assert.are.equal(7, region:get(key, age + 5))
            assert.are.equal(NO_VALUE, region:get(key, math.max(age - 0.5, 0)))
        end)

        it(kind .. ": the Python region reads what the Lua region writes, equal", function()
            local prefix = ("h18:%s:lua:%s:"):format(RUN, kind)
            local folder = DIR .. "/lw/" .. kind
            local region = lua_region(kind, MARKED)
            local n = 0
            local function put(name, value, expect, r)
                r = r or region
                local key = prefix .. name
                r:set(key, value)
                local md = r:get_value_metadata(key)
                write(folder .. "/" .. name .. ".expect", expect)
                write(folder .. "/" .. name .. ".ct", pyvalue.float_repr(md.metadata.ct))
                n = n + 1
            end
            if is_json(kind) then
                for _, f in ipairs(py.list(DIR .. "/json")) do
                    local name = f:match("^(.*)%.json$")
                    if name then
                        local v = pyjson.loads(read(DIR .. "/json/" .. f), MARKED)
                        put(name, v, read(DIR .. "/json/" .. name .. ".expect"))
                    end
                end
            else
                for name, text in pairs(case_texts()) do
                    local v = pickle.loads(read(DIR .. "/pickle/" .. name .. ".p4"), MARKED)
                    put(name, v, text)
                end
            end
            -- Plain Lua values (no marks) map as README's table says.
            local plain = lua_region(kind, nil)
            put("plain_list", { 1, 2, 3 }, "list[int:1,int:2,int:3]", plain)
            put("plain_dict", { a = 1.5 }, "dict{str:61=float:1.5}", plain)
            put("plain_str", "h\195\169", "str:68c3a9", plain)
            put("plain_nil", nil, "None", plain)
            put("plain_bool", false, "False", plain)
            if not is_json(kind) then
                put("plain_bytes", "\255\0", "bytes:ff00", plain)
            end
            local count = check_output(interop("read", kind, port_of(kind), prefix, folder))
            assert.are.equal(n, count)
        end)
    end

    it("reads oslo.cache's protocol-0 values (python-memcached, flags 1)", function()
        local key = ("h18:%s:oslo"):format(RUN)
        local out, ok = interop("oslo", PORTS.memcached, key)
        assert(ok, out)
        local region = lua_region("memcached", MARKED)
        local md = region:get_value_metadata(key).metadata
        assert.are.equal(read(DIR .. "/oslo.expect"),
                         "CachedValue(" .. canon(region:get(key)) .. ","
                         .. canon(pyvalue.dict { ct = pyvalue.float(md.ct), v = md.v }) .. ")")
    end)

    for _, kind in ipairs { "redis-pickle", "pymemcache" } do
        it(kind .. ": metadata v other than 2 is a miss, not an error", function()
            local raw = raw_backend(kind)
            local region = lua_region(kind)
            local key = ("h18:%s:v1:%s"):format(RUN, kind)
            local function bytes(v)
                if is_redis(kind) then
                    return '{"ct": 1700000000.5, "v": ' .. v .. '}|' .. pickle.dumps("x")
                end
                return pickle.dumps(pyvalue.CachedValue("x", { ct = 1700000000.5, v = v }))
            end
            raw:set(key, bytes(1))
            assert.are.equal(NO_VALUE, region:get(key))
            assert.are.equal(0, region:stats().errors)
            -- and the bytes with v = 2 are a hit: only v differed
            raw:set(key, bytes(2))
            assert.are.equal("x", region:get(key))
        end)

        it(kind .. ": a value that does not decode is a logged miss; get_or_create "
           .. "overwrites it", function()
            local region = lua_region(kind)
            local prefix = ("h18:%s:foreign:%s:"):format(RUN, kind)
            local key = prefix .. "x"
            -- The Python region stores datetime.date(2024, 1, 1): a class
            -- outside the subset.
            local out, ok = interop("foreign", kind, port_of(kind), key)
            assert(ok, out)
            local lines = {}
            local old = context.logger()
            context.set_logger(function(l) lines[#lines + 1] = l end)
            local v = region:get(key)
            local calls = 0
            local made = region:get_or_create(key, function()
                calls = calls + 1
                return { made = "by lua" }
            end)
            context.set_logger(old)
            assert.are.equal(NO_VALUE, v)
            assert.are.equal(1, calls)
            assert.are.equal("by lua", made.made)
            assert.is_true(region:stats().errors >= 2)
            assert.matches("does not decode.*datetime", table.concat(lines, "\n"))
            -- Overwritten: both languages now read Lua's value.
            assert.are.equal("by lua", region:get(key).made)
            local folder = DIR .. "/over/" .. kind
            write(folder .. "/x.expect", "dict{str:6d616465=str:6279206c7561}")
            write(folder .. "/x.ct", pyvalue.float_repr(region:get_value_metadata(key).metadata.ct))
            check_output(interop("read", kind, port_of(kind), prefix, folder))
        end)
    end

    describe("the region options", function()
        local lib = require "dogpile.lib"
        local function raw_get(backend, key)
            local v = backend:get(key)
            return v ~= NO_VALUE and v or nil
        end

        it("wire_format from make_region, configure, load_regions and configure_from_config",
           function()
            local args = { host = "127.0.0.1", port = PORTS.redis }
            local raw = raw_backend("redis-pickle")
            local key = ("h18:%s:opts:"):format(RUN)
            local regions = {
                cache.make_region({ wire_format = "dogpile.cache" })
                    :configure("dogpile.cache.redis", { arguments = args }),
                cache.make_region():configure("dogpile.cache.redis",
                                              { arguments = args, wire_format = "dogpile.cache" }),
                cache.load_regions({ r = { backend = "dogpile.cache.redis", arguments = args,
                                           wire_format = "dogpile.cache" } }).r,
                cache.make_region():configure_from_config({
                    ["c.backend"] = "dogpile.cache.redis", ["c.wire_format"] = "dogpile.cache",
                    ["c.arguments.host"] = "127.0.0.1", ["c.arguments.port"] = tostring(PORTS.redis),
                }, "c."),
            }
            for i, r in ipairs(regions) do
                r:set(key .. i, { i })
                local bytes = raw_get(raw, key .. i)
                assert.matches('^{"ct": %d+%.%d+, "v": 2}|\128\4', bytes)
                assert.are.same({ i }, pickle.loads(bytes:match("|(.*)$")))
                assert.are.same({ i }, r:get(key .. i))
            end
            -- json, by name, from a config file's table
            local j = cache.load_regions({ j = { backend = "dogpile.cache.redis", arguments = args,
                                                 wire_format = "dogpile.cache",
                                                 serializer = "json" } }).j
            j:set(key .. "j", { a = { 1, 2 } })
            assert.matches('^{"ct": %d+%.%d+, "v": 2}|{"a": %[1, 2%]}$', raw_get(raw, key .. "j"))
            -- functions, as Python's make_region(serializer=, deserializer=)
            local f = cache.make_region({ wire_format = "dogpile.cache",
                                          serializer = function(v) return "<" .. v .. ">" end,
                                          deserializer = function(b) return b:sub(2, -2) end })
                :configure("dogpile.cache.redis", { arguments = args })
            f:set(key .. "f", "x")
            assert.matches('^{"ct": %d+%.%d+, "v": 2}|<x>$', raw_get(raw, key .. "f"))
            assert.are.equal("x", f:get(key .. "f"))
        end)

        it("refuses what it cannot do, naming it", function()
            local args = { host = "127.0.0.1", port = PORTS.redis }
            assert.has_error(function()
                cache.make_region({ wire_format = "python" })
            end, nil)
            local ok, err = pcall(cache.make_region, { wire_format = "python" })
            assert.is_false(ok)
            assert.matches('wire_format must be "dogpile.cache"', err)
            ok, err = pcall(function()
                cache.make_region({ serializer = "json" }):configure("dogpile.cache.redis",
                                                                      { arguments = args })
            end)
            assert.is_false(ok)
            assert.matches('serializer "json" names a codec of wire_format', err)
            ok, err = pcall(function()
                cache.make_region({ wire_format = "dogpile.cache" }):configure("dogpile.cache.memory")
            end)
            assert.is_false(ok)
            assert.matches("needs a backend that stores the bytes", err)
            ok, err = pcall(function()
                cache.make_region({ wire_format = "dogpile.cache", serializer = tostring })
                    :configure("dogpile.cache.redis", { arguments = args })
            end)
            assert.is_false(ok)
            assert.matches("serializer but no deserializer", err)
            ok, err = pcall(function()
                cache.make_region({ wire_format = "dogpile.cache", serializer = "yaml" })
            end)
            assert.is_false(ok)
        end)

        it("any other byte-storing backend holds the same bytes (shared_memory)", function()
            local r = cache.make_region({ wire_format = "dogpile.cache", serializer = "json" })
                :configure("dogpile.cache.shared_memory", { arguments = { name = "h18-wire" } })
            r:set("k", { 1, "a" })
            assert.matches('^{"ct": %d+%.%d+, "v": 2}|%[1, "a"%]$', r.actual_backend:get("k"))
            assert.are.same({ 1, "a" }, r:get("k"))
        end)

        for _, kind in ipairs { "redis-pickle", "pymemcache" } do
            it(kind .. ": the lock key is Python's \"_lock\" .. key; a native memcached "
               .. "region's stays \"dogpile-lock:\" .. key", function()
                local raw = raw_backend(kind)
                local key = ("h18:%s:lockkey:%s"):format(RUN, kind)
                local r = lua_region(kind)
                local m = r:_mutex(key)
                assert.is_true(m:acquire(false))
                local ok, token = pcall(raw_get, raw, "_lock" .. key)
                m:release()
                assert.is_true(ok, token)
                assert.matches("^%S+$", token)
                assert.is_nil(raw_get(raw, "_lock" .. key))
                if not is_redis(kind) then
                    local native = cache.make_region():configure("dogpile.cache.memcached", {
                        arguments = { url = "127.0.0.1:" .. PORTS.memcached } })
                    m = native:_mutex(key)
                    assert.is_true(m:acquire(false))
                    local held = raw_get(raw, "dogpile-lock:" .. key)
                    local python = raw_get(raw, "_lock" .. key)
                    m:release()
                    assert.is_not_nil(held)
                    assert.is_nil(python)
                end
            end)

            it(kind .. ": multi forms, a value's own expiration time and early_refresh", function()
                local r = lua_region(kind)
                local key = ("h18:%s:multi:%s:"):format(RUN, kind)
                r:set_multi({ [key .. "a"] = 1, [key .. "b"] = { x = true } })
                local got = r:get_multi({ key .. "a", key .. "b", key .. "c" })
                assert.are.equal(1, got[1])
                assert.are.same({ x = true }, got[2])
                assert.are.equal(NO_VALUE, got[3])
                local calls = 0
                local made = r:get_or_create_multi({ key .. "a", key .. "d" }, function(...)
                    calls = calls + 1
                    return { select("#", ...) }
                end)
                assert.are.same({ 1, 1 }, made)
                assert.are.equal(1, calls)
                -- A creator's own expiration time travels as metadata "ttl":
                -- Lua honours it, Python's region ignores it.
                local v = r:get_or_create(key .. "ttl", function() return "short", 0.5 end)
                assert.are.equal("short", v)
                assert.are.equal("short", r:get(key .. "ttl"))
                lib.C.dp_clock_sleep(0.7)
                assert.are.equal(NO_VALUE, r:get(key .. "ttl"))
                local folder = DIR .. "/ttl/" .. kind
                write(folder .. "/ttl.expect", "str:" .. ("short"):gsub(".", function(c)
                    return ("%02x"):format(c:byte())
                end))
                write(folder .. "/ttl.ct", pyvalue.float_repr(
                    r:get_value_metadata(key .. "ttl", nil, true).metadata.ct))
                check_output(interop("read", kind, port_of(kind), key, folder))
                local e = cache.make_region({ wire_format = "dogpile.cache" }):configure(
                    is_redis(kind) and "dogpile.cache.redis" or "dogpile.cache.memcached",
                    { arguments = is_redis(kind) and { host = "127.0.0.1", port = PORTS.redis }
                          or { url = "127.0.0.1:" .. PORTS.memcached },
                      expiration_time = 60, early_refresh = 1 })
                assert.are.equal("e", e:get_or_create(key .. "early", function() return "e" end))
                local md = e:get_value_metadata(key .. "early").metadata
                assert.is_number(md.delta)
            end)
        end
    end)

    for _, kind in ipairs { "redis-pickle", "pymemcache", "memcached" } do
        it(kind .. ": 3 Python and 3 Lua processes on one missing key run one creator", function()
            local key = ("h18:%s:miss:%s"):format(RUN, kind)
            local got, creators = stampede(kind, key, -1, 1)
            assert.are.equal(1, creators, table.concat(got, " "))
            for i = 2, #got do
                assert.are.equal(got[1], got[i], table.concat(got, " "))
            end
            assert.matches("^new:", got[1])
        end)
    end

    for _, kind in ipairs { "redis-pickle", "pymemcache" } do
        it(kind .. ": on an expired key one process regenerates, the others get the stale "
           .. "value", function()
            local key = ("h18:%s:stale:%s"):format(RUN, kind)
            local region = lua_region(kind, nil, 1)
            region:set(key, "old")
            require("dogpile.lib").C.dp_clock_sleep(1.3)
            assert.are.equal(NO_VALUE, region:get(key))
            local got, creators = stampede(kind, key, 1, 1.5)
            assert.are.equal(1, creators, table.concat(got, " "))
            local new, old = 0, 0
            for _, v in ipairs(got) do
                if v == "old" then
                    old = old + 1
                elseif v:match("^new:") then
                    new = new + 1
                end
            end
            assert.are.equal(1, new, table.concat(got, " "))
            assert.are.equal(5, old, table.concat(got, " "))
        end)
    end
end)

describe("wire_format = \"dogpile.cache\" inside nginx (cosocket backends) with Python", function()
    local ngx_support = require "ngx_support"
    if not ngx_support.available() then
        it("needs nginx-extras", function()
            error("nginx-extras is not installed (/usr/sbin/nginx with the Lua module)")
        end)
        return
    end
    local nginx

    setup(function()
        DIR = py.tmpdir()
        local out, ok = py.python("gen-pickle", DIR)
        assert(ok, "the Python fixture failed (python3-dogpile.cache installed?): " .. out)
        PORTS.redis = redis_port()
        PORTS.memcached = memcached_port()
        -- nginx's workers (nobody) read the cases' files.
        os.execute("chmod -R a+rX '" .. DIR .. "'")
        nginx = ngx_support.start({ fixture = "python/nginx", ready = "/ready",
                                    env = { DP_REDIS_PORT = PORTS.redis,
                                            DP_MEMCACHED_PORT = PORTS.memcached } })
    end)

    teardown(function()
        local log = nginx and nginx:log() or ""
        if nginx then
            nginx:stop()
        end
        SERVERS:stop()
        if DIR then
            py.rmdir(DIR)
        end
        assert(not log:match("%[error%]") and not log:match("%[alert%]"), "nginx error.log:\n" .. log)
    end)

    for _, kind in ipairs { "redis-pickle", "redis-json", "pymemcache", "pymemcache-json" } do
        it(kind .. ": nginx reads what Python writes and Python reads what nginx writes", function()
            local prefix = ("h18:%s:ngx-py:%s:"):format(RUN, kind)
            local folder = DIR .. "/ngx-pw/" .. kind
            local out, ok = interop("write", kind, port_of(kind), prefix, folder)
            assert(ok, out)
            local n = 0
            for _, f in ipairs(py.list(folder)) do
                local name = f:match("^(.*)%.expect$")
                if name then
                    local body, status = nginx:get("/get?kind=" .. kind .. "&key=" .. prefix .. name)
                    assert.are.equal(200, status, body)
                    assert.are.equal(read(folder .. "/" .. f) .. "\n"
                                     .. read(folder .. "/" .. name .. ".ct"), body, name)
                    n = n + 1
                end
            end
            assert.is_true(n >= (is_json(kind) and 30 or 60), kind .. ": only " .. n .. " cases")
            -- nginx writes every case; the Python region reads them.
            prefix = ("h18:%s:ngx-lua:%s:"):format(RUN, kind)
            folder = DIR .. "/ngx-lw/" .. kind
            local texts, sub, ext = case_texts(), "pickle", ".p4"
            if is_json(kind) then
                texts, sub, ext = {}, "json", ".json"
                for _, f in ipairs(py.list(DIR .. "/json")) do
                    local name = f:match("^(.*)%.json$")
                    if name then
                        texts[name] = read(DIR .. "/json/" .. name .. ".expect")
                    end
                end
            end
            n = 0
            for name, text in pairs(texts) do
                local file = DIR .. "/" .. sub .. "/" .. name .. ext
                local ct, status = nginx:get("/set_case?kind=" .. kind .. "&key=" .. prefix .. name
                                             .. "&file=" .. file)
                assert.are.equal(200, status, ct)
                write(folder .. "/" .. name .. ".expect", text)
                write(folder .. "/" .. name .. ".ct", ct)
                n = n + 1
            end
            assert.are.equal(n, check_output(interop("read", kind, port_of(kind), prefix, folder)))
        end)
    end

    for _, kind in ipairs { "redis-pickle", "pymemcache" } do
        it(kind .. ": 3 Python, 3 Lua processes and 10 nginx requests on one missing key run "
           .. "one creator", function()
            local key = ("h18:%s:ngx-miss:%s"):format(RUN, kind)
            local counter = key .. ":count"
            local start = require("dogpile.lib").C.dp_clock_now() + 2.5
            local procs = {}
            for i = 1, 3 do
                procs[#procs + 1] = table.concat({ PYTHON, HERE .. "/interop.py", "stampede",
                    kind, port_of(kind), quote(key), quote(counter), ("%.3f"):format(start), 1, -1,
                    "py" .. i }, " ")
                procs[#procs + 1] = table.concat({ "luajit", HERE .. "/lua_worker.lua", kind,
                    port_of(kind), quote(key), quote(counter), ("%.3f"):format(start), 1, -1,
                    "lua" .. i }, " ")
            end
            procs[#procs + 1] = ngx_support.CURL .. " -s -m 30 -Z --parallel-immediate "
                .. "--parallel-max 10 " .. quote(nginx:url(("/get_or_create?kind=%s&key=%s"
                .. "&counter=%s&start=%.3f&sleep=1&n=[1-10]"):format(kind, key, counter, start)))
            local outs = run_all(procs)
            local got = {}
            for i, o in ipairs(outs) do
                local before = #got
                for v in o:gmatch("got (%S+)") do
                    got[#got + 1] = v
                end
                assert(#got > before, ("process %d printed no value: %s"):format(i, o))
            end
            assert.are.equal(16, #got, table.concat(got, " "))
            local out, ok = interop("incr", kind, port_of(kind), counter)
            assert(ok, out)
            assert.are.equal(1, tonumber(out:match("%d+")) - 1, table.concat(got, " "))
            for i = 2, #got do
                assert.are.equal(got[1], got[i], table.concat(got, " "))
            end
        end)
    end
end)
