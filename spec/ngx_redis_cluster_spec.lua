-- dogpile.cache.redis_cluster inside a real nginx (nginx-extras, 2 workers,
-- spec/fixtures/nginx_redis_cluster) over cosockets, on a cluster of 3
-- masters without replicas that this spec starts, against the C backend in
-- this process on the same cluster: values read byte for byte across, every
-- region method, a url, a stampede on one missing key (one creator), a
-- master SIGSTOPped (only its keys fail, or miss under fail_open), and a
-- write from a phase that cannot yield.
local cache = require "dogpile.cache"
local support = require "support"
local ngx_support = require "ngx_support"
local nb = require "ngx_backend_support"
local CL = require "fixtures.redis_cluster.cluster"

local NO_VALUE = cache.NO_VALUE
local now, sleep, sh = support.now, support.sleep, support.sh
local wait_for = nb.wait_for

local uniq = 0
local function fresh(prefix)
    uniq = uniq + 1
    return string.format("%s:%d:%d:%d", prefix, os.time(), math.random(1e9), uniq)
end

local keyslot = CL.keyslot

describe("dogpile.cache.redis_cluster inside nginx (cosockets)", function()
    if not nb.need_nginx(it) then
        return
    end

    local c0, nginx, plain, victim, vpid, topo

    -- The master (port) serving `slot`, in the topology read at setup.
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

    local function run(query)
        local body, code = nginx:get("/run?" .. query)
        assert.are.equal(200, code)
        return body
    end

    setup(function()
        c0 = CL.start({ masters = 3, replicas = 0, node_timeout = 1000 })
        victim, vpid = c0.nodes[1].port, c0.nodes[1].pid
        topo = c0:topology(c0.nodes[2].port)
        local nodes = table.concat(c0:startup_nodes(), ",")
        nginx = ngx_support.start({ fixture = "nginx_redis_cluster", ready = "/ready",
                                    env = { DP_RC_NODES = nodes } })
        plain = cache.make_region():configure("dogpile.cache.redis_cluster", {
            arguments = { startup_nodes = c0:startup_nodes(), socket_timeout = 0.3,
                          connect_timeout = 0.3 } })
    end)

    teardown(function()
        local check = nb.stop_nginx(nginx)
        if c0 then
            c0:stop() -- every node at once, a stopped one too
        end
        check()
    end)

    it("every region method, byte for byte with the C backend on the same cluster; a url", function()
        local p = fresh("m")
        -- keys on every master (and some sharing a {tag}), set by the C backend
        local m = {}
        for i = 1, 60 do
            m[p .. ":" .. i] = "c" .. i
        end
        plain:set_multi(m)
        local masters = {}
        for i = 1, 60 do
            masters[owner(keyslot(p .. ":" .. i))] = true
        end
        local nm = 0
        for _ in pairs(masters) do
            nm = nm + 1
        end
        assert.are.equal(3, nm)
        local lines = run("op=get_multi&n=60&prefix=" .. p)
        for i = 1, 60 do
            assert.matches("\n?" .. i .. "=c" .. i .. "\n", lines .. "\n")
        end
        -- written in nginx, read by C
        assert.are.equal("ok", run("op=set_multi&n=60&value=n&prefix=" .. p))
        local keys = {}
        for i = 1, 60 do
            keys[i] = p .. ":" .. i
        end
        local got = plain:get_multi(keys)
        for i = 1, 60 do
            assert.are.equal("n" .. i, got[i])
        end
        -- a {hash tag} ("%7B", "%7D" in the query: curl globs braces)
        assert.are.equal("ok", run("op=set&key=%7Bt%7D" .. p .. "&value=one"))
        assert.are.equal("one", plain:get("{t}" .. p))
        assert.are.equal("one", run("op=get&region=url&key=%7Bt%7D" .. p))
        assert.are.equal("ok", run("op=delete&key=%7Bt%7D" .. p))
        assert.are.equal(NO_VALUE, plain:get("{t}" .. p))
        assert.are.equal("ok", run("op=delete_multi&n=60&prefix=" .. p))
        got = plain:get_multi(keys)
        for i = 1, 60 do
            assert.are.equal(NO_VALUE, got[i])
        end
        -- a write from the log phase is handed to a timer
        local k = fresh("log")
        nginx:get("/phase_log?key=" .. k)
        wait_for("the log phase's set", function() return plain:get(k) == "from-log" end, 5)
    end)

    it("40 requests on one missing key: the creator runs once, the others wait for its value", function()
        local k = fresh("stampede")
        local res = nginx:concurrent("/run?op=get_or_create&key=" .. k, 40)
        assert.are.equal(40, #res)
        for _, r in ipairs(res) do
            assert.are.equal(200, r.status)
            assert.are.equal("made", r.body)
        end
        local port = owner(keyslot("count:" .. k))
        assert.are.equal("1", c0:cli(port, "GET count:" .. k))
    end)

    it("MOVED and ASK: a slot moved behind the workers' back is followed; a half-migrated slot's key with ASKING", function()
        local function id_of(port)
            for _, t in ipairs(c0:topology(port)) do
                if t.port == port then
                    return t.id
                end
            end
        end
        local k = fresh("{mv}")
        local k2 = "{mv}" .. fresh("ask")
        assert.are.equal("ok", run("op=set&key=" .. k:gsub("[{}]", { ["{"] = "%7B", ["}"] = "%7D" })
                                   .. "&value=before"))
        plain:set(k2, "asked")
        local slot = keyslot(k)
        local src = owner(slot)
        local dst
        for _, n in ipairs(c0.nodes) do
            if n.port ~= src then
                dst = n.port
                break
            end
        end
        local sid, did = id_of(src), id_of(dst)
        local function q(key)
            return "'" .. key .. "'"
        end
        local function enc(key)
            return (key:gsub("[{}]", { ["{"] = "%7B", ["}"] = "%7D" }))
        end
        -- half-migrated: k2 moved, k not yet: k2 is asked for with ASKING
        assert.are.equal("OK", c0:cli(dst, "CLUSTER SETSLOT " .. slot .. " IMPORTING " .. sid))
        assert.are.equal("OK", c0:cli(src, "CLUSTER SETSLOT " .. slot .. " MIGRATING " .. did))
        assert.are.equal("OK", c0:cli(src, "MIGRATE 127.0.0.1 " .. dst .. " " .. q(k2) .. " 0 5000"))
        for _ = 1, 4 do -- both workers
            assert.are.equal("asked", run("op=get&key=" .. enc(k2)))
            assert.are.equal("before", run("op=get&key=" .. enc(k)))
        end
        -- the whole slot moved: MOVED
        assert.are.equal("OK", c0:cli(src, "MIGRATE 127.0.0.1 " .. dst .. " " .. q(k) .. " 0 5000"))
        for _, n in ipairs(c0.nodes) do
            c0:cli(n.port, "CLUSTER SETSLOT " .. slot .. " NODE " .. did)
        end
        for _ = 1, 4 do -- each worker meets the MOVED
            assert.are.equal("before", run("op=get&key=" .. enc(k)))
        end
        for i = 1, 4 do
            assert.are.equal("ok", run("op=set&key=" .. enc(k) .. "&value=after" .. i))
            assert.are.equal("after" .. i, run("op=get&key=" .. enc(k)))
        end
        assert.are.equal("1", c0:cli(dst, "EXISTS " .. q(k)))
        assert.matches("^MOVED " .. slot .. " ", c0:cli(src, "EXISTS " .. q(k)))
        assert.are.equal("ok", run("op=set&key=" .. enc(k) .. "&value=before"))
        topo = c0:topology(c0.nodes[2].port)
    end)

    it("a master stopped: only its keys fail, or miss under fail_open; the writes do the live nodes' keys", function()
        local p = fresh("stop")
        assert.are.equal("ok", run("op=set_multi&n=60&value=v&prefix=" .. p))
        local on, nv = {}, 0
        for i = 1, 60 do
            on[i] = owner(keyslot(p .. ":" .. i)) == victim
            nv = nv + (on[i] and 1 or 0)
        end
        assert.is_true(nv > 0 and nv < 60)
        sh("kill -STOP " .. vpid)
        local ok, err = pcall(function()
            local node = "127.0.0.1:" .. victim
            local body = run("op=get_multi&n=60&prefix=" .. p)
            assert.matches("^ERROR: ", body)
            assert.matches(node, body, 1, true)
            assert.matches("(" .. nv .. " of 60 keys failed", body, 1, true)
            body = run("op=get_multi&region=open&n=60&prefix=" .. p)
            for i = 1, 60 do
                assert.matches("\n?" .. i .. "=" .. (on[i] and "%-" or ("v" .. i)) .. "\n",
                               body .. "\n")
            end
            local errors = tonumber(body:match("errors=(%d+)"))
            assert.is_true(errors >= nv, "errors " .. tostring(errors))
            body = run("op=set_multi&n=60&value=w&prefix=" .. p)
            assert.matches("^ERROR: ", body)
            assert.matches(node, body, 1, true)
            for i = 1, 60 do
                if not on[i] then
                    assert.are.equal("w" .. i, plain:get(p .. ":" .. i))
                end
            end
        end)
        sh("kill -CONT " .. vpid)
        assert(ok, err)
    end)
end)
