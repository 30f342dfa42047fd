-- The circuit breakers of dogpile.cache.redis and dogpile.cache.redis_cluster
-- inside a real nginx (one worker: breakers are per worker process, and the
-- counts here are exact), over cosockets: the C core's breaker joined
-- through the FFI, the same arguments, states, messages and stats as the C
-- backends'. A server SIGSTOPped (a slow failure opens it at once) and a
-- closed port (3 fast failures open it): the calls that follow fail at once
-- without reaching the server (the server's own command count says so),
-- fail_open makes them misses, and the next call after the cool-down
-- probes and closes it. On a cluster, per node: a stopped master's keys are
-- refused at once, the others' are served. And the cluster's lock waiters
-- (here with the cluster at hand): woken by the release's SPUBLISH through
-- one SSUBSCRIBE per worker on the lock key's node, polling where SSUBSCRIBE
-- is refused (an ACL).
local cache = require "dogpile.cache"
local support = require "support"
local ngx_support = require "ngx_support"
local nb = require "ngx_backend_support"
local CL = require "fixtures.redis_cluster.cluster"

local now, sleep, sh, read = support.now, support.sleep, support.sh, support.read

local uniq = 0
local function fresh(prefix)
    uniq = uniq + 1
    return string.format("%s:%d:%d:%d", prefix, os.time(), math.random(1e9), uniq)
end

local keyslot = CL.keyslot

-- A redis-server on `port`: its pid.
local function start_redis(dir, port)
    os.execute("mkdir -p " .. dir)
    sh(string.format("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no "
                     .. "--daemonize yes --dir %s --pidfile %s/redis.pid --logfile %s/redis.log",
                     port, dir, dir, dir))
    local t0 = now()
    while true do
        local pid = (support.read(dir .. "/redis.pid") or ""):match("%d+")
        if pid and sh("redis-cli -p " .. port .. " ping"):match("PONG") then
            return pid
        end
        assert(now() - t0 < 10, "redis-server on " .. port .. " did not start: "
               .. tostring(support.read(dir .. "/redis.log")))
        sleep(0.02)
    end
end

-- The GETs a server ran since its CONFIG RESETSTAT.
local function gets(port)
    return tonumber(sh("redis-cli -p " .. port .. " INFO commandstats")
                    :match("cmdstat_get:calls=(%d+)") or 0)
end

describe("circuit breakers inside nginx (cosockets): the C core's, per worker", function()
    if not nb.need_nginx(it) then
        return
    end

    local nginx, c0, tmp, port, pid, down, down_pid, topo, victim, vpid, half, half_stop

    -- "name=value" lines of a loop.
    local function loop(query)
        local body, code = nginx:get("/run?op=loop&" .. query)
        assert.are.equal(200, code, body)
        local t = {}
        for k, v in body:gmatch("([%w_]+)=([^\n]*)") do
            t[k] = tonumber(v) or v
        end
        assert.is_not_nil(t.ok, body)
        return t, body
    end

    -- The C backend on the cluster, in this process (one instance: every
    -- region on it must agree).
    local plain
    local function plain_region()
        plain = plain or cache.make_region():configure("dogpile.cache.redis_cluster", {
            arguments = { startup_nodes = c0:startup_nodes(), socket_timeout = 0.3,
                          lock_timeout = 10 } })
        return plain
    end

    local function owner(slot)
        for _, n in ipairs(topo) do
            if n.master then
                for a, b in n.slots:gmatch("(%d+)%-?(%d*)") do
                    a, b = tonumber(a), tonumber(b ~= "" and b or a)
                    if slot >= a and slot <= b then
                        return n.port
                    end
                end
            end
        end
    end

    setup(function()
        tmp = (sh("mktemp -d /tmp/dogpile-ngx-breaker-XXXXXX"):gsub("%s+$", ""))
        port = CL.free_port()
        pid = start_redis(tmp .. "/up", port)
        down = CL.free_port()
        c0 = CL.start({ masters = 3, replicas = 0, node_timeout = 1000 })
        -- Not the first startup node: the map is read from that one, so
        -- every refusal counted here is a call's.
        victim, vpid = c0.nodes[3].port, c0.nodes[3].pid
        topo = c0:topology(c0.nodes[1].port)
        half, half_stop = support.half_answering_redis({ "SUBSCRIBE", "SSUBSCRIBE" })
        nginx = ngx_support.start({ fixture = "nginx_breaker", ready = "/ready",
                                    env = { DP_RC_NODES = table.concat(c0:startup_nodes(), ","),
                                            DP_BR_PORT = port, DP_BR_DOWN = down,
                                            DP_BR_HALF = half } })
    end)

    teardown(function()
        local check = nb.stop_nginx(nginx)
        local pids = (pid or "") .. " " .. (down_pid or "")
        sh("kill -CONT " .. pids .. " " .. (vpid or "") .. " 2>/dev/null; kill -9 " .. pids
           .. " 2>/dev/null")
        if c0 then
            c0:stop()
        end
        if half_stop then
            half_stop()
        end
        if tmp and tmp:match("^/tmp/dogpile%-ngx%-breaker%-") then
            sh("rm -rf '" .. tmp .. "'")
        end
        check()
    end)

    it("the core checks the circuit_* arguments, with the C backend's messages; one store, one set of settings", function()
        -- the C backend in this process says the same of the same arguments
        local function c_says(arg, value)
            local ok, err = pcall(function()
                cache.make_region():configure("dogpile.cache.redis", {
                    arguments = { port = port, [arg] = value } })
            end)
            assert.is_false(ok)
            return tostring(err)
        end
        for _, case in ipairs({ { "circuit_failures", "-1" }, { "circuit_failures", "1.5" },
                                { "circuit_cooldown", "0" }, { "circuit_slow", "-2" } }) do
            local body = nginx:get("/run?op=configure&arg=" .. case[1] .. "&value=" .. case[2])
            local want = c_says(case[1], tonumber(case[2])):match("(dogpile%.cache%.redis: "
                                                                  .. case[1] .. ".*)$")
            assert.is_not_nil(want)
            assert.matches(want, body, 1, true)
        end
        -- the store's breaker exists in this worker with circuit_failures 3
        local body = nginx:get("/run?op=configure&arg=circuit_failures&value=5")
        assert.matches("dogpile.cache.redis: the circuit breaker of this server (one per server "
                       .. "in a process) is already in use with circuit_failures", body, 1, true)
        body = nginx:get("/run?op=configure&arg=circuit_cooldown&value=1")
        assert.are.equal("configured", body)
        body = nginx:get("/run?op=configure&backend=dogpile.cache.redis_cluster"
                         .. "&arg=circuit_slow&value=0.5")
        assert.matches("dogpile.cache.redis_cluster: the circuit breaker", body, 1, true)
    end)

    it("a server SIGSTOPped: one timeout opens it, the next calls fail at once without reaching the server (misses under fail_open), the probe after the cool-down closes it", function()
        local k = fresh("slow")
        assert.are.equal(1, loop("region=single&call=set&n=1&value=v&key=" .. k).ok)
        assert.are.equal(1, loop("region=single_open&call=set&n=1&value=v&key=" .. k).ok)
        local t = loop("region=single&n=1&key=" .. k)
        assert.are.equal(1, t.ok)
        assert.are.equal("v", t.values)
        assert.are.equal("closed", t.state)
        sh("redis-cli -p " .. port .. " CONFIG RESETSTAT")
        sh("kill -STOP " .. pid)
        local ok, err = pcall(function()
            -- one timeout (slow: at once, though circuit_failures is 3)
            t = loop("region=single&n=1&key=" .. k)
            assert.are.equal(1, t.err)
            assert.is_true(t.elapsed >= 0.25, t.elapsed)
            assert.matches("no answer from 127.0.0.1:" .. port .. " within socket_timeout",
                           t.first, 1, true)
            assert.are.equal("open", t.state)
            assert.are.equal(1, t.opened)
            assert.are.equal(0, t.refused)
            -- then 20 refused: together well under one timeout
            t = loop("region=single&n=20&key=" .. k)
            assert.are.equal(20, t.err)
            assert.is_true(t.elapsed < 0.25, t.elapsed)
            assert.matches("circuit open since %d%d:%d%d:%d%d%.%d%d%d UTC %(after a failure "
                           .. "that took 0%.[3-9]%d s; the next call probes in [%d.]+ s%): "
                           .. "last failure: .*no answer from 127%.0%.0%.1:" .. port, t.first)
            assert.are.equal(20, t.refused)
            assert.are.equal(1, t.opened)
            -- fail_open: misses, counted as errors (its own store's breaker)
            t = loop("region=single_open&n=21&key=" .. k)
            assert.are.equal(21, t.ok)
            assert.are.equal(21, t.misses)
            assert.are.equal(21, t.errors)
            assert.are.equal(20, t.refused)
            assert.is_true(t.elapsed < 0.3 + 0.25, t.elapsed)
        end)
        sh("kill -CONT " .. pid)
        assert(ok, err)
        sleep(1.1) -- circuit_cooldown
        t = loop("region=single&n=3&key=" .. k)
        assert.are.equal(3, t.ok)
        assert.are.equal("v", t.values)
        assert.are.equal("closed", t.state)
        assert.are.equal(1, t.probes)
        assert.are.equal(20, t.refused)
        t = loop("region=single_open&n=1&key=" .. k)
        assert.are.equal("v", t.values)
        assert.are.equal("closed", t.state)
        -- what reached the server: 4 probes and successes, and at most the
        -- two GETs sent before the timeouts (run once it woke), none of the
        -- 40 refused
        local n = gets(port)
        assert.is_true(n >= 4 and n <= 6, "GETs run: " .. n)
    end)

    it("a closed port: 3 refused connections open it, the next calls fail at once; a server started there is used after the cool-down", function()
        local t = loop("region=down&n=10&key=k")
        assert.are.equal(10, t.err)
        assert.are.equal("open", t.state)
        assert.are.equal(1, t.opened)
        assert.are.equal(7, t.refused)
        assert.matches("cannot connect to 127.0.0.1:" .. down .. ": connection refused", t.first,
                       1, true)
        assert.matches("circuit open since .* %(after 3 failures; the next call probes in "
                       .. "[%d.]+ s%): last failure: .*cannot connect to 127%.0%.0%.1:" .. down,
                       t.last)
        down_pid = start_redis(tmp .. "/down", down)
        t = loop("region=down&n=2&key=k")
        assert.are.equal(2, t.err) -- still in its cool-down
        assert.are.equal(9, t.refused)
        sleep(1.1)
        t = loop("region=down&n=2&call=set&value=d&key=k")
        assert.are.equal(2, t.ok)
        assert.are.equal("closed", t.state)
        assert.are.equal(1, t.probes)
        assert.are.equal("1", sh("redis-cli -p " .. down .. " EXISTS k"):gsub("%s+$", ""))
        assert.are.equal("d", loop("region=down&n=1&key=k").values)
    end)

    it("a cluster master SIGSTOPped: its breaker opens, its keys are refused at once, the other masters' served; get_multi fails only its keys; the probe closes it", function()
        local p = fresh("node")
        local plain = plain_region()
        local kv, ko
        local m, on, nv = {}, {}, 0
        for i = 1, 30 do
            local key = p .. ":" .. i
            m[key] = "v" .. i
            on[i] = owner(keyslot(key)) == victim
            nv = nv + (on[i] and 1 or 0)
            if on[i] then
                kv = kv or key
            else
                ko = ko or key
            end
        end
        assert.is_true(kv ~= nil and ko ~= nil)
        plain:set_multi(m)
        local t = loop("region=cluster&n=1&key=" .. kv)
        assert.are.equal("closed", t.state)
        sh("kill -STOP " .. vpid)
        local ok, err = pcall(function()
            t = loop("region=cluster&n=1&key=" .. kv)
            assert.are.equal(1, t.err)
            assert.is_true(t.elapsed >= 0.25, t.elapsed)
            assert.are.equal("open", t.state)
            assert.are.equal(1, t.opened)
            t = loop("region=cluster&n=20&key=" .. kv)
            assert.are.equal(20, t.err)
            assert.is_true(t.elapsed < 0.25, t.elapsed)
            assert.are.equal(20, t.refused)
            assert.matches("circuit of 127.0.0.1:" .. victim .. " open since ", t.first, 1, true)
            -- the other masters' keys: served, nothing refused
            t = loop("region=cluster&n=20&key=" .. ko)
            assert.are.equal(20, t.ok)
            assert.are.equal(m[ko], t.values)
            assert.are.equal(20, t.refused)
            -- get_multi: the stopped node's keys fail at once, the others read
            t = loop("region=cluster&call=get_multi&n=1&m=30&prefix=" .. p)
            assert.are.equal(1, t.err)
            assert.is_true(t.elapsed < 0.25, t.elapsed)
            assert.matches("circuit of 127.0.0.1:" .. victim .. " open since .* %(" .. nv
                           .. " of 30 keys failed", t.first)
            assert.are.equal(21, t.refused)
            t = loop("region=cluster_open&call=get_multi&n=1&m=30&prefix=" .. p)
            assert.are.equal(1, t.ok)
            local vals = {}
            for v in t.values:gmatch("[^,]+") do
                vals[#vals + 1] = v
            end
            for i = 1, 30 do
                assert.are.equal(on[i] and "-" or ("v" .. i), vals[i])
            end
            assert.is_true(t.elapsed < 0.3 + 0.25, t.elapsed)
        end)
        sh("kill -CONT " .. vpid)
        assert(ok, err)
        sleep(1.1)
        t = loop("region=cluster&n=2&key=" .. kv)
        assert.are.equal(2, t.ok)
        assert.are.equal(m[kv], t.values)
        assert.are.equal("closed", t.state)
        assert.are.equal(1, t.probes)
        assert.are.equal(21, t.refused)
    end)
    -- `n` get_or_create requests of `key` on `region`, in the background:
    -- a function that waits for them and returns their bodies.
    local function waiters(region, key, n)
        local out = tmp .. "/requests.txt"
        os.remove(out)
        os.execute(("%s -s -m 15 -Z --parallel-immediate --parallel-max %d -o '%s/w#1' "
                    .. "-w '%%{http_code}\\n' '%s' > %s 2>/dev/null &")
                   :format(ngx_support.CURL, n, tmp, nginx:url("/run?op=goc&region=" .. region
                                                               .. "&key=" .. key .. "&n=[1-"
                                                               .. n .. "]"), out))
        return function()
            local t0 = now()
            while select(2, (read(out) or ""):gsub("\n", "")) < n do
                assert(now() - t0 < 15, "the requests did not end")
                sleep(0.02)
            end
            local bodies = {}
            for i = 1, n do
                bodies[i] = read(tmp .. "/w" .. i)
            end
            return bodies
        end
    end

    -- The spec (the C backend) holds `key`'s lock for `hold` s while nginx's
    -- waiters ask for it, then stores "from the holder" and releases; the
    -- lock key's node's MONITOR meanwhile. Returns the bodies, the MONITOR's
    -- text and the most SSUBSCRIBEd seen on the lock key's channel.
    local function held_while(region, key, hold)
        local plain = plain_region()
        local lk = "_lock" .. key
        local node = owner(keyslot(lk))
        local mon = tmp .. "/monitor-" .. region .. ".txt"
        local mon_pid = sh(("redis-cli -p %d MONITOR > %s 2>&1 & echo $!"):format(node, mon))
            :match("%d+")
        local t0 = now()
        while not (read(mon) or ""):match("^OK") do
            assert(now() - t0 < 5, "MONITOR did not start")
            sleep(0.01)
        end
        local m = plain.backend:get_mutex(key)
        assert.is_true(m:acquire(false))
        local done = waiters(region, key, 20)
        local most = 0
        t0 = now()
        while now() - t0 < hold do
            local subs = tonumber(sh("redis-cli -p " .. node .. " PUBSUB SHARDNUMSUB " .. lk)
                                  :match("(%d+)%s*$"))
            most = math.max(most, subs or 0)
            sleep(0.05)
        end
        plain:set(key, "from the holder")
        m:release()
        local bodies = done()
        sh("kill " .. mon_pid)
        return bodies, read(mon) or "", most
    end

    it("a lock wait whose SUBSCRIBE (redis) or SSUBSCRIBE (redis_cluster) gets no answer fails within one socket_timeout", function()
        for _, case in ipairs({ { "half", "dogpile.cache.redis", "SUBSCRIBE" },
                                { "half_cluster", "dogpile.cache.redis_cluster", "SSUBSCRIBE" } }) do
            local body = nginx:get("/run?op=timed_goc&region=" .. case[1] .. "&key=" .. fresh("half"))
            local elapsed = tonumber(body:match("elapsed=([%d.]+)"))
            local result = body:match("result=(.*)$") or body
            assert.matches("^ERROR: ", result, nil, false)
            assert.matches(case[2] .. ": lock '", result, 1, true)
            assert.matches("waiting for the release", result, 1, true)
            assert.matches(case[3] .. ": no answer", result, 1, true)
            -- socket_timeout 0.3 (the fixture's CIRCUIT)
            assert.is_true(elapsed and elapsed < 0.3 + 0.25, case[1] .. " took " .. tostring(elapsed))
        end
    end)

    it("cluster lock waiters: one SSUBSCRIBE per worker on the lock key's node, woken by the release's SPUBLISH, not a poll", function()
        local key = fresh("wake")
        local bodies, text, most = held_while("wake", key, 0.6)
        for i = 1, 20 do
            assert.are.equal("from the holder", bodies[i])
        end
        assert.are.equal(1, most) -- one worker, one subscription
        -- after the release's SPUBLISH, no waiter looked at the lock key
        -- again (a poll would have, at 1.023 s)
        local lk = "_lock" .. key
        local at = text:find('"spublish" "' .. lk .. '"', 1, true)
        assert.is_not_nil(at, text)
        local pat = '%] "GET" "' .. lk:gsub("%p", "%%%0") .. '"'
        local _, polls = text:sub(1, at):gsub(pat, "")
        local _, late = text:sub(at):gsub(pat, "")
        assert.is_true(polls >= 1, "the first waiter read the holder's token")
        assert.are.equal(0, late, text:sub(at))
        assert.are.equal("0", sh("redis-cli -p " .. owner(keyslot(lk)) .. " PUBSUB SHARDNUMSUB "
                                 .. lk):match("(%d+)%s*$"))
    end)

    it("cluster lock waiters whose SSUBSCRIBE is refused (an ACL) poll, and get the holder's value", function()
        for _, n in ipairs(c0.nodes) do
            assert.are.equal("OK", sh("redis-cli -p " .. n.port .. " ACL SETUSER nosub on '>pw' "
                                      .. "'~*' '&*' +@all -ssubscribe"):gsub("%s+$", ""))
        end
        local key = fresh("nosub")
        local bodies, text, most = held_while("nosub", key, 0.4)
        for i = 1, 20 do
            assert.are.equal("from the holder", bodies[i])
        end
        assert.are.equal(0, most)
        local lk = "_lock" .. key
        -- asked, and refused (a refused command is in the ACL log, not in
        -- MONITOR's output)
        assert.matches("ssubscribe", sh("redis-cli -p " .. owner(keyslot(lk)) .. " ACL LOG"), 1,
                       true)
        local at = text:find('"spublish" "' .. lk .. '"', 1, true)
        assert.is_not_nil(at, text)
        -- the release was seen by a poll: a GET of the lock key after it
        local _, late = text:sub(at):gsub('%] "GET" "' .. lk:gsub("%p", "%%%0") .. '"', "")
        assert.is_true(late >= 1, text:sub(at))
    end)
end)
