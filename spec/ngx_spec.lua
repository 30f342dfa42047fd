-- dogpile inside a real nginx (Debian's nginx-extras): 2 workers, the
-- ngx_shared backend, creators that sleep with ngx.sleep, requests from many
-- parallel curl connections at once. The spec starts its own nginx (spec/ngx_support.lua)
-- with the fixture in spec/fixtures/nginx and stops it at the end.
local support = require "ngx_support"

local CREATOR = 0.4   -- seconds the slow creators sleep
local MARGIN = 0.25   -- what a request may take beyond that (a loaded machine)
local FAST = 0.2      -- a stale value or a hit returns within this: half the creator's time

local function sleep(s)
    os.execute("sleep " .. s)
end

local function value_pid(body)
    local v, pid = body:match("^(.*) (%d+)$")
    return v, pid
end

describe("dogpile in nginx", function()
    if not support.available() then
        it("needs nginx-extras", function() error("nginx-extras is not installed (/usr/sbin/nginx with the Lua module; .ci/test installs it)", 0) end)
        return
    end

    local ngx
    setup(function()
        ngx = support.start()
    end)
    teardown(function()
        if ngx then
            local log = ngx:log()
            ngx:stop()
            assert.is_nil(log:match("%[alert%][^\n]*") or log:match("%[emerg%][^\n]*")
                          or log:match("%[crit%][^\n]*"), "nginx error.log:\n" .. log)
        end
    end)

    local function stat(name)
        local body = ngx:get("/stats?name=" .. name)
        return tonumber(body) or body
    end

    -- Requests from new connections until both workers have answered.
    local function from_both(path, check)
        local pids, n = {}, 0
        for _ = 1, 40 do
            local body, status = ngx:get(path)
            assert.are.equal(200, status, body)
            local v, pid = value_pid(body)
            check(v, pid)
            if not pids[pid] then
                pids[pid] = true
                n = n + 1
            end
            if n == 2 then
                return pids
            end
        end
        error("only one worker answered 40 requests")
    end

    it("loads from init_by_lua and runs in init_worker and content", function()
        for id = 0, 1 do
            assert.matches("^iw#%d$", stat("init_worker:" .. id))
        end
        local body, status = ngx:get("/get_or_create?key=basic")
        assert.are.equal(200, status, body)
        assert.are.equal("basic#1", (value_pid(body)))
        -- Created once, seen by both workers.
        from_both("/get_or_create?key=basic", function(v)
            assert.are.equal("basic#1", v)
        end)
        assert.are.equal(1, stat("creations:basic"))
    end)

    it("runs the creator once across workers for 200 requests on a missing key", function()
        local res = ngx:concurrent("/get_or_create?key=cold&sleep=" .. CREATOR, 200)
        assert.are.equal(200, #res)
        local pids, n, max = {}, 0, 0
        for _, r in ipairs(res) do
            assert.are.equal(200, r.status, r.body)
            local v, pid = value_pid(r.body)
            assert.are.equal("cold#1", v)
            if not pids[pid] then pids[pid] = true; n = n + 1 end
            max = math.max(max, r.server_time or r.time)
        end
        assert.are.equal(1, stat("creations:cold"))
        assert.are.equal(2, n, "both workers must have served")
        assert.is_true(max < CREATOR + MARGIN, "slowest request took " .. max .. " s")
    end)

    it("serves the stale value at once while one request regenerates", function()
        local path = "/get_or_create?key=hot&exp=1&sleep=" .. CREATOR
        assert.are.equal("hot#1", (value_pid((ngx:get(path)))))
        sleep(1.1)
        local res = ngx:concurrent(path, 200)
        assert.are.equal(200, #res)
        local stale, fresh, max, max_stale, pids, n = 0, 0, 0, 0, {}, 0
        for _, r in ipairs(res) do
            assert.are.equal(200, r.status, r.body)
            local v, pid = value_pid(r.body)
            if not pids[pid] then pids[pid] = true; n = n + 1 end
            if v == "hot#1" then
                stale = stale + 1
                max_stale = math.max(max_stale, r.server_time or r.time)
            else
                assert.are.equal("hot#2", v)
                fresh = fresh + 1
            end
            max = math.max(max, r.server_time or r.time)
        end
        assert.are.equal(2, stat("creations:hot"))
        assert.are.equal(2, n, "both workers must have served")
        assert.is_true(stale > 0 and fresh > 0, stale .. " stale, " .. fresh .. " fresh")
        assert.is_true(max_stale < FAST, "a stale response took " .. max_stale .. " s")
        assert.is_true(max < CREATOR + MARGIN, "slowest request took " .. max .. " s")
        assert.are.equal("free", ngx:get("/locked?key=hot"))
    end)

    it("fails only the request whose creator raised; the next one regenerates", function()
        local path = "/get_or_create?key=err&exp=1&sleep=" .. CREATOR
        assert.are.equal("err#1", (value_pid((ngx:get(path)))))
        sleep(1.1)
        ngx:get("/flag?name=fail:err&value=1")
        local res = ngx:concurrent(path, 50)
        local failed, stale = 0, 0
        for _, r in ipairs(res) do
            if r.status == 500 then
                failed = failed + 1
            else
                assert.are.equal(200, r.status)
                assert.are.equal("err#1", (value_pid(r.body)))
                local took = r.server_time or r.time
                assert.is_true(took < FAST, "a stale response took " .. took .. " s")
                stale = stale + 1
            end
        end
        -- Each failed run of the creator failed its own request only; the
        -- value stays stale, so a request arriving after a failure runs it again.
        assert.is_true(failed >= 1)
        assert.are.equal(50, failed + stale)
        assert.are.equal(1 + failed, stat("creations:err"))
        assert.are.equal("free", ngx:get("/locked?key=err"))
        ngx:get("/flag?name=fail:err")
        local body, status = ngx:get(path)
        assert.are.equal(200, status)
        local want = "err#" .. (2 + failed)
        assert.are.equal(want, (value_pid(body)))
        assert.are.equal(want, (value_pid((ngx:get(path)))))

        -- With no value at all: the failing request gets the error, the lock is free.
        ngx:get("/flag?name=fail:err2&value=1")
        local _, st2 = ngx:get("/get_or_create?key=err2")
        assert.are.equal(500, st2)
        assert.are.equal("free", ngx:get("/locked?key=err2"))
        ngx:get("/flag?name=fail:err2")
        assert.are.equal("err2#2", (value_pid((ngx:get("/get_or_create?key=err2")))))
        assert.matches("creator of err failed on purpose", ngx:log(), 1, true)
    end)

    it("a hard invalidation in one worker is seen by the other", function()
        ngx:get("/set?key=inv&value=v1")
        from_both("/get?key=inv", function(v) assert.are.equal("v1", v) end)
        local body = ngx:get("/invalidate?hard=1")
        local _, by = value_pid(body)
        local pids = from_both("/get?key=inv", function(v) assert.are.equal("NO_VALUE", v) end)
        assert.is_true(pids[by] ~= nil)
        -- A value stored after the invalidation is valid everywhere.
        ngx:get("/set?key=inv&value=v2")
        from_both("/get?key=inv", function(v) assert.are.equal("v2", v) end)
    end)

    it("a soft invalidation makes one request regenerate, in any worker", function()
        assert.are.equal("soft#1", (value_pid((ngx:get("/get_or_create?key=soft")))))
        ngx:get("/invalidate?hard=0")
        from_both("/get?key=soft", function(v) assert.are.equal("NO_VALUE", v) end)
        assert.are.equal("soft#2", (value_pid((ngx:get("/get_or_create?key=soft")))))
        from_both("/get_or_create?key=soft", function(v) assert.are.equal("soft#2", v) end)
        assert.are.equal(2, stat("creations:soft"))
    end)

    it("works in access_by_lua and rewrite_by_lua, waiting with ngx.sleep", function()
        for _, phase in ipairs({ "access", "rewrite" }) do
            local res = ngx:concurrent("/" .. phase .. "?key=ph_" .. phase .. "&sleep=0.1", 20)
            for _, r in ipairs(res) do
                assert.are.equal(200, r.status)
                assert.are.equal(phase .. "#1\n", r.body)
            end
            assert.are.equal(1, stat("creations:ph_" .. phase))
        end
    end)

    -- Request A regenerates `key` slowly in content_by_lua; 0.1 s later B asks
    -- for it in header_filter_by_lua, which cannot yield.
    -- A slow creation of `key` started by one request; once it holds the
    -- lock (polled, not a fixed head start a loaded machine may outrun), a
    -- header_filter request for the key. Its headers, and the seconds it
    -- took in the worker (X-Elapsed).
    local function during_slow_creation(key, exp)
        local a = support.q(ngx:url("/get_or_create?key=" .. key .. "&sleep=0.5" .. exp))
        local b = support.q(ngx:url("/header_filter?key=" .. key .. exp))
        local done = os.tmpname()
        os.remove(done)
        os.execute("(" .. support.CURL .. " -s -o /dev/null " .. a .. "; touch " .. support.q(done)
                   .. ") >/dev/null 2>&1 &")
        for _ = 1, 300 do
            if ngx:get("/locked?key=" .. key) == "held" then
                break
            end
            sleep(0.01)
        end
        local out = support.read(support.CURL .. " -s -D - -o /dev/null " .. b)
        for _ = 1, 500 do
            local f = io.open(done)
            if f then
                f:close()
                break
            end
            sleep(0.01)
        end
        os.remove(done)
        return out, tonumber(out:match("X%-Elapsed: ([%d.]+)"))
    end

    it("in header_filter, serves the stale value without waiting", function()
        assert.are.equal("hfs#1", (value_pid((ngx:get("/get_or_create?key=hfs&exp=1")))))
        sleep(1.1)
        local out, t = during_slow_creation("hfs", "&exp=1")
        assert.matches("X%-Value: hfs#1\r\n", out)
        assert.is_true(t < FAST, "took " .. t .. " s")
        assert.are.equal(2, stat("creations:hfs"))
    end)

    it("in header_filter, runs the creator itself when there is no value to serve", function()
        local out, t = during_slow_creation("hfm", "")
        assert.matches("X%-Value: header_filter#2\r\n", out)
        assert.is_true(t < FAST, "took " .. t .. " s")
        assert.are.equal(2, stat("creations:hfm"))
        assert.are.equal("free", ngx:get("/locked?key=hfm"))
    end)

    it("works in log_by_lua", function()
        ngx:get("/log?key=lg")
        for _ = 1, 20 do
            if stat("log:lg") ~= "nil" then break end
            sleep(0.05)
        end
        assert.are.equal("log#1", stat("log:lg"))
    end)

    it("regenerates in a timer with the ngx async_creation_runner", function()
        local path = "/get_or_create?region=async&key=as&exp=1&sleep=" .. CREATOR
        assert.are.equal("as#1", (value_pid((ngx:get(path)))))
        sleep(1.1)
        local res = ngx:concurrent(path, 50)
        for _, r in ipairs(res) do
            assert.are.equal(200, r.status)
            -- Stale, or the new value once the timer stored it.
            assert.matches("^as#[12]$", (value_pid(r.body)))
            local took = r.server_time or r.time
            assert.is_true(took < FAST, "a stale response took " .. took .. " s")
        end
        sleep(CREATOR + 0.2)
        assert.are.equal(2, stat("creations:as"))
        assert.are.equal("free", ngx:get("/locked?key=as"))
        -- Read with region:get, which never regenerates: on a loaded machine
        -- the 50 requests can take long enough for as#2 to be stale already,
        -- and a get_or_create would then start the next regeneration.
        assert.are.equal("as#2", (value_pid((ngx:get("/get?region=async&key=as")))))
        -- A failing regeneration is logged, releases the lock, keeps the stale value.
        sleep(1.1)
        ngx:get("/flag?name=fail:as&value=1")
        assert.are.equal("as#2", (value_pid((ngx:get(path)))))
        sleep(CREATOR + 0.2)
        assert.are.equal("free", ngx:get("/locked?key=as"))
        assert.matches("async regeneration of key 'as' failed", ngx:log(), 1, true)
        ngx:get("/flag?name=fail:as")
        assert.are.equal("as#2", (value_pid((ngx:get(path)))))
        sleep(CREATOR + 0.2)
        assert.are.equal("as#4", (value_pid((ngx:get(path)))))
        assert.are.equal(4, stat("creations:as"))
    end)

    -- A hit inside nginx, on a worker's memory region and on the shared dict
    -- (a scalar value: the region decodes it in Lua, without the C codec):
    -- the loop's trace compiles and never aborts.
    for _, case in ipairs({ { "memory", "get" }, { "memory", "get_or_create" },
                            { "shared", "get" }, { "shared", "get_or_create" } }) do
        local which, loop = case[1], case[2]
        it("a " .. which .. "-region hit (region:" .. loop .. ") compiles with no trace abort", function()
            local body, status = ngx:get("/jit?region=" .. which .. "&loop=" .. loop)
            assert.are.equal(200, status, body)
            local aborts, stops = body:match("^aborts=(%d+) stops=(%d+) hits_ok=true\n")
            assert.are.equal("0", aborts, body)
            assert.is_true(tonumber(stops) > 0, body)
        end)
    end
end)
