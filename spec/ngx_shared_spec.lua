-- dogpile.cache.ngx_shared's read path inside a real nginx (2 workers, the
-- fixture spec/fixtures/nginx_shared): values read through shdict_get's FFI
-- into the worker's buffer (longer ones than it holds too), values that are
-- not bytes, the change page that spares a hit the read of the invalidation
-- record (exact across workers, kept across a reload), its 1 s re-read for
-- writes that bypass it, and the fallback to the dict's methods.
local support = require "ngx_support"

local function sleep(s)
    os.execute("sleep " .. s)
end

local function fields(body)
    local t = {}
    for w in body:gmatch("%S+") do
        t[#t + 1] = w
    end
    return t
end

describe("dogpile.cache.ngx_shared in nginx", function()
    if not support.available() then
        it("needs nginx-extras", function() error("nginx-extras is not installed (/usr/sbin/nginx with the Lua module; .ci/test installs it)", 0) end)
        return
    end

    local ngx
    setup(function()
        ngx = support.start({ fixture = "nginx_shared" })
    end)
    teardown(function()
        if ngx then
            local log = ngx:log()
            ngx:stop()
            assert.is_nil(log:match("%[alert%][^\n]*") or log:match("%[emerg%][^\n]*")
                          or log:match("%[crit%][^\n]*") or log:match("%[error%][^\n]*"),
                          "nginx error.log:\n" .. log)
        end
    end)

    local function get(path)
        local body, status = ngx:get(path)
        assert.are.equal(200, status, body)
        return fields(body)
    end

    -- Requests on new connections until both workers have answered `path`;
    -- `check(fields)` sees every answer. Returns the workers' pids.
    local function from_both(path, check)
        local pids, n = {}, 0
        for _ = 1, 60 do
            local f = get(path)
            check(f)
            local pid = f[#f]
            if not pids[pid] then
                pids[pid] = true
                n = n + 1
            end
            if n == 2 then
                return pids
            end
        end
        error("only one worker answered 60 requests")
    end

    it("reads values longer than its 4 KiB buffer whole, in both workers, and short ones after them", function()
        for _, size in ipairs({ 5000, 300000, 16, 70000, 4096 }) do
            local key = "big" .. size
            get("/set?key=" .. key .. "&size=" .. size)
            from_both("/read?key=" .. key .. "&size=" .. size, function(f)
                assert.are.same({ "true", tostring(size) }, { f[1], f[2] })
            end)
        end
    end)

    it("reads a hit in place (read.lua's in_place strategy), in every worker", function()
        from_both("/reader", function(f) assert.are.equal("in_place", f[1]) end)
    end)

    it("counts a value that is not bytes as an error and a miss", function()
        local f = get("/raw?key=number")
        assert.are.equal("NO_VALUE", f[1])
        assert.are.equal("1", f[2])
    end)

    it("maps the change page in init_by_lua: every worker's invalidator uses it", function()
        from_both("/page", function(f)
            assert.matches("^%d+:%d+$", f[1])
            assert.are.equal("true", f[2])
        end)
    end)

    it("an invalidation in one worker is seen by the very next hit in each worker", function()
        from_both("/goc?key=inv", function(f) assert.are.equal("inv#1", f[1]) end)
        for round = 1, 3 do
            get("/invalidate")
            -- Each worker's first hit after the invalidation creates anew (the
            -- two workers race for the lock: one creates, the other waits for it).
            local want = "inv#" .. (round + 1)
            from_both("/goc?key=inv", function(f) assert.are.equal(want, f[1]) end)
        end
    end)

    it("sees an invalidation written into the dict past the page within its 1 s re-read", function()
        from_both("/goc?key=raw", function(f) assert.are.equal("raw#1", f[1]) end)
        sleep(0.01)
        get("/raw")
        local t0 = os.time()
        -- Both workers answer raw#2 once each has re-read the record.
        local seen = {}
        for _ = 1, 200 do
            local f = get("/goc?key=raw")
            if f[1] == "raw#2" then
                seen[f[2]] = true
            else
                assert.are.equal("raw#1", f[1])
            end
            local n = 0
            for _ in pairs(seen) do n = n + 1 end
            if n == 2 then
                break
            end
            sleep(0.05)
        end
        local n = 0
        for _ in pairs(seen) do n = n + 1 end
        assert.are.equal(2, n, "a worker still served raw#1")
        assert.is_true(os.time() - t0 <= 3, "the re-read took more than 3 s")
    end)

    it("keeps the change page across a reload (HUP): new workers share it and see invalidations", function()
        local before = get("/page")[1]
        local old = from_both("/goc?key=hup", function(f) assert.are.equal("hup#1", f[1]) end)
        local f = assert(io.open(ngx.prefix .. "/logs/nginx.pid"))
        local master = f:read("*n")
        f:close()
        assert(os.execute("kill -HUP " .. master) == 0 or true)
        -- Wait for answers from workers of the new generation only.
        local fresh = 0
        for _ = 1, 100 do
            local g = get("/page")
            if old[g[#g]] then
                fresh = 0
            else
                fresh = fresh + 1
                assert.are.equal(before, g[1])
                assert.are.equal("true", g[2])
            end
            if fresh >= 6 then
                break
            end
            sleep(0.05)
        end
        assert.is_true(fresh >= 6, "no worker of the new generation answered")
        get("/invalidate")
        from_both("/goc?key=hup", function(g)
            assert.is_nil(old[g[#g]], "a worker of the old generation answered")
            assert.are.equal("hup#2", g[1])
        end)
    end)

    it("over a dict that is not an ngx.shared.DICT, uses its methods", function()
        local f = get("/proxied?n=1")
        assert.are.same({ "true", "one", "NO_VALUE" }, { f[1], f[2], f[3] })
    end)
end)
