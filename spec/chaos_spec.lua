-- Chaos (issue 19, item 9): four plain LuaJIT processes run a mixed
-- get_or_create / get / get_multi / set / delete load on a redis region and
-- on a memcached region, with fail_open and without, while this spec stops
-- (SIGSTOP) and continues the server, and kills it (SIGKILL) and restarts it
-- on the same port. Judged from the processes' logs:
--   * no wrong value: every value read is its own key's, uncorrupted, and one
--     that some process wrote for that key (spec/fixtures/chaos/worker.lua);
--   * no call longer than its timeouts allow: waiting for a lock's holder
--     (wait_unlocked, then acquire, each bounded by lock_timeout plus the
--     round trip in flight at the deadline) is bounded apart; the rest of
--     the call (creator excluded) may spend ONE failed round trip
--     (connect_timeout + socket_timeout: a call that has seen its backend
--     fail does not wait on it again, item 7 of issue 19); each plus SLACK;
--   * every process succeeds again within RECOVERY seconds of each recovery
--     (SIGCONT, or the restarted server answering), without reconfiguring,
--     and every call fails no more once that time has passed;
--   * under fail_open nothing raises; without it, every error names the
--     backend.
-- One line of figures per phase is printed as a TAP comment ("# chaos ...").
-- The servers are the spec's own, on free loopback ports, data in a temporary
-- folder, stopped (with the load processes) even when a check fails.
local support = require "support"
local ffi = require "ffi"
local now, sleep, sh, write, read = support.now, support.sleep, support.sh, support.write, support.read

pcall(ffi.cdef, [[ int kill(int pid, int sig); ]])
local SIGKILL, SIGCONT, SIGSTOP = 9, 18, 19 -- Linux

local fmt = string.format

-- -- The bounds ------------------------------------------------------------------

local SOCKET_TIMEOUT, CONNECT_TIMEOUT, LOCK_TIMEOUT = 0.6, 0.2, 2
-- Scheduling delay on a loaded 2-core machine (the load processes, the
-- server and the sanitizer build share it); well under one socket_timeout,
-- so that a call that waited for two timeouts where one was allowed is seen.
local SLACK = 0.25
local RECOVERY = 3
local ROUND_TRIP = CONNECT_TIMEOUT + SOCKET_TIMEOUT
local NONLOCK_BOUND = ROUND_TRIP + SLACK
local LOCK_BOUND = 2 * (LOCK_TIMEOUT + ROUND_TRIP) + SLACK
local WORKERS, NKEYS = 4, 24

-- Seconds from the load's start. A phase lasts DURATION; each recovery is
-- followed by at least RECOVERY seconds of load and a stretch where every
-- call must succeed. The last restart leaves 6 s: restarting memcached right
-- after its SIGKILL was seen to take up to 1.5 s (4.5 s under the ASan run).
local DURATION = 20
local TIMELINE = {
    { at = 1.0, act = "stop" }, { at = 3.5, act = "cont" },
    { at = 7.0, act = "kill" }, { at = 8.0, act = "restart" },
    { at = 11.5, act = "stop" }, { at = 12.0, act = "cont" },
    { at = 14.0, act = "kill" }, { at = 14.0, act = "restart" },
}

local HERE = debug.getinfo(1, "S").source:match("^@(.*/)") or "spec/"
local WORKER = HERE .. "fixtures/chaos/worker.lua"
local TMP = (sh("mktemp -d /tmp/dogpile-chaos-XXXXXX"):gsub("%s+$", ""))

-- -- Processes ---------------------------------------------------------------------

-- Every server and load process started and not yet seen gone (pid ->
-- true), for the teardown: a pid seen gone may be reused, never signalled.
local started = {}

-- A zombie is not alive: the servers (daemons) and the load processes
-- (started through a shell that exits) are reaped by pid 1, which may take
-- its time.
local function alive(pid)
    if not pid or ffi.C.kill(pid, 0) ~= 0 then
        return false
    end
    local stat = read("/proc/" .. pid .. "/stat")
    return not (stat and stat:match("^%d+ %b() Z"))
end

local function signal(pid, sig)
    assert(ffi.C.kill(pid, sig) == 0, "kill " .. sig .. " " .. pid .. " failed")
end

-- Kill and wait until gone (a killed server could otherwise answer once more).
local function kill_wait(pid)
    if not alive(pid) then
        started[pid or false] = nil
        return
    end
    ffi.C.kill(pid, SIGCONT)
    ffi.C.kill(pid, SIGKILL)
    local t0 = now()
    while alive(pid) and now() - t0 < 5 do
        sleep(0.005)
    end
    assert(not alive(pid), "process " .. pid .. " survived SIGKILL")
    started[pid] = nil
end

-- The servers and probes run without the sanitizer runtime that the test
-- command preloads into this process for the instrumented core (it would
-- slow every restart by seconds).
local BARE = "env -u LD_PRELOAD "

local port_open = support.port_open

local free_port = support.free_port


-- -- Servers ---------------------------------------------------------------------

-- Starts (or restarts, same port and folder) the server `srv`; sets srv.pid
-- and returns the time just before the probe that found it answering.
local function start_redis(srv)
    srv.dir = srv.dir or (TMP .. "/redis-" .. srv.port)
    os.execute("mkdir -p " .. srv.dir)
    local conf = srv.dir .. "/redis.conf"
    write(conf, table.concat({
        "port " .. srv.port, "bind 127.0.0.1", 'save ""', "appendonly no",
        "dir " .. srv.dir, "daemonize yes", "pidfile " .. srv.dir .. "/redis.pid",
        "logfile " .. srv.dir .. "/redis.log" }, "\n") .. "\n")
    os.remove(srv.dir .. "/redis.pid")
    local out = sh(BARE .. "redis-server " .. conf)
    local t0 = now()
    while true do
        local probe = now()
        srv.pid = tonumber((read(srv.dir .. "/redis.pid") or ""):match("%d+"))
        if srv.pid then
            started[srv.pid] = true
            if sh(BARE .. "redis-cli -p " .. srv.port .. " ping"):match("PONG") then
                return probe
            end
        end
        assert(now() - t0 < 10, "redis-server did not start: " .. out
               .. (read(srv.dir .. "/redis.log") or ""))
        sleep(0.01)
    end
end

local function start_memcached(srv)
    srv.dir = srv.dir or (TMP .. "/memcached-" .. srv.port)
    os.execute("mkdir -p " .. srv.dir)
    local pidfile = srv.dir .. "/memcached.pid"
    os.remove(pidfile)
    local out = sh(BARE .. fmt("memcached -d -P %s -l 127.0.0.1 -p %d -U 0 -m 64 -u root", pidfile,
                       srv.port))
    local t0 = now()
    while true do
        local probe = now()
        srv.pid = tonumber((read(pidfile) or ""):match("%d+"))
        if srv.pid then
            started[srv.pid] = true
            if port_open(srv.port) then
                return probe
            end
        end
        assert(now() - t0 < 10, "memcached did not start: " .. out)
        sleep(0.01)
    end
end

-- -- Logs ------------------------------------------------------------------------

-- One load process's log: its calls, the versions it wrote and read.
local function parse_log(path)
    local w = { calls = {}, writes = {}, reads = {}, notes = {} }
    local text = read(path) or ""
    for line in text:gmatch("[^\n]+") do
        local tag = line:sub(1, 1)
        if tag == "c" then
            local op, t0, dur, wait, lockfail, release, creat, status, wrong =
                line:match("^c (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%d+)$")
            w.calls[#w.calls + 1] = { op = op, t0 = tonumber(t0), dur = tonumber(dur),
                                      wait = tonumber(wait), lockfail = tonumber(lockfail),
                                      release = tonumber(release),
                                      creator = tonumber(creat),
                                      status = status, wrong = tonumber(wrong) }
        elseif tag == "w" or tag == "r" then
            local i, v = line:match("^. (%d+) (%d+)$")
            local t = tag == "w" and w.writes or w.reads
            t[#t + 1] = { tonumber(i), v }
        elseif tag == "x" then
            w.notes[#w.notes + 1] = line:sub(3)
        elseif tag == "d" then
            local calls, wrong, logged = line:match("^done (%d+) (%d+) (%d+)$")
            w.done = { calls = tonumber(calls), wrong = tonumber(wrong), logged = tonumber(logged) }
        end
    end
    return w
end

-- -- One phase ---------------------------------------------------------------------

local function serialize(t)
    local parts = {}
    for k, v in pairs(t) do
        local val
        if type(v) == "table" then
            val = serialize(v)
        elseif type(v) == "string" then
            val = fmt("%q", v)
        else
            val = tostring(v)
        end
        parts[#parts + 1] = k .. " = " .. val
    end
    return "{ " .. table.concat(parts, ", ") .. " }"
end

local function name_of(ph)
    return ph.backend:match("[^.]+$") .. (ph.fail_open and "_fail_open" or "_strict")
end

-- Starts one server per phase and its load processes, plays TIMELINE on
-- every server at once (the phases of one call share the clock: the redis
-- and memcached phases run side by side, 8 processes, to keep the suite
-- short); returns each phase's run when its processes have ended. `ctx`
-- collects what must be stopped when a check fails (ctx.pids, ctx.servers).
local function run_phases(phases, ctx)
    local t_start
    local runs = {}
    for k, ph in ipairs(phases) do
        local name = name_of(ph)
        local srv = { port = free_port() }
        ctx.servers[#ctx.servers + 1] = srv
        local redis = ph.backend == "dogpile.cache.redis"
        srv.start = redis and start_redis or start_memcached
        local arguments = {
            socket_timeout = SOCKET_TIMEOUT, connect_timeout = CONNECT_TIMEOUT,
            lock_timeout = LOCK_TIMEOUT,
        }
        if redis then
            arguments.port = srv.port
        else
            arguments.url = "127.0.0.1:" .. srv.port
            arguments.retry_timeout, arguments.dead_timeout = 1, 1
        end
        srv.start(srv)
        t_start = t_start or (now() + 2) -- time for the processes to load and configure
        local run = { name = name, srv = srv, pids = {}, t_start = t_start,
                      disruptions = {}, recoveries = {} }
        runs[k] = run
        local prefix = fmt("chaos:%s:%d", name, os.time())
        for id = 1, WORKERS do
            local conf = serialize({
                backend = ph.backend, arguments = arguments, fail_open = ph.fail_open,
                expiration = 1, id = id, prefix = prefix, nkeys = NKEYS,
                start = t_start, stop = t_start + DURATION,
                log = fmt("%s/%s-%d.log", TMP, name, id),
            })
            local pid = tonumber(sh(fmt("LUA_PATH='%s' LUA_CPATH='%s' luajit %s '%s' >%s/%s-%d.err 2>&1 & echo $!",
                                        package.path, package.cpath, WORKER, conf, TMP, name, id))
                                 :match("%d+"))
            assert(pid, "could not start a load process")
            run.pids[id] = pid
            ctx.pids[#ctx.pids + 1] = pid
            started[pid] = true
        end
    end
    -- The chaos, on schedule. A recovery is the SIGCONT, or the moment the
    -- restarted server was first found answering.
    for _, ev in ipairs(TIMELINE) do
        local at = t_start + ev.at
        while now() < at do
            sleep(math.min(0.005, at - now()))
        end
        for _, run in ipairs(runs) do
            local srv = run.srv
            if ev.act == "stop" then
                run.disruptions[#run.disruptions + 1] = now()
                signal(srv.pid, SIGSTOP)
            elseif ev.act == "cont" then
                run.recoveries[#run.recoveries + 1] = { what = "SIGCONT", t = now() }
                signal(srv.pid, SIGCONT)
            elseif ev.act == "kill" then
                run.disruptions[#run.disruptions + 1] = now()
                kill_wait(srv.pid)
            else
                run.recoveries[#run.recoveries + 1] = { what = "restart", t = srv.start(srv) }
            end
        end
    end
    -- The processes stop by themselves after their last call, which the
    -- bounds limit.
    local deadline = t_start + DURATION + NONLOCK_BOUND + LOCK_BOUND + 5
    for _, pid in ipairs(ctx.pids) do
        while alive(pid) and now() < deadline do
            sleep(0.05)
        end
    end
    for _, run in ipairs(runs) do
        run.workers = {}
        for id, pid in ipairs(run.pids) do
            assert(not alive(pid), run.name .. ": load process " .. id
                   .. " still running well after its end")
            started[pid] = nil
            run.workers[id] = parse_log(fmt("%s/%s-%d.log", TMP, run.name, id))
            run.workers[id].stderr = read(fmt("%s/%s-%d.err", TMP, run.name, id)) or ""
        end
    end
    return runs
end

-- The figures of a phase, and what is wrong with it (a list of messages).
local function judge(fail_open, run)
    local f = { ops = 0, errors = 0, wrong = 0, unwritten = 0, unexpected = 0, raised = 0,
                longest = 0, longest_op = "-", longest_wait = 0, longest_rest = 0, over = 0, logged = 0,
                late_errors = 0, recovery = {} }
    local problems, t_start = {}, run.t_start
    local function problem(msg)
        if #problems < 12 then
            problems[#problems + 1] = msg
        end
    end
    local written = {}
    for _, w in ipairs(run.workers) do
        for _, wr in ipairs(w.writes) do
            written[wr[1] .. ":" .. wr[2]] = true
        end
    end
    for id, w in ipairs(run.workers) do
        if not w.done then
            problem(fmt("load process %d did not finish its run: %s", id, w.stderr:sub(1, 600)))
        else
            f.logged = f.logged + w.done.logged
        end
        if #w.calls < 100 then
            problem(fmt("load process %d made only %d calls", id, #w.calls))
        end
        for _, n in ipairs(w.notes) do
            problem(fmt("load process %d: %s", id, n))
        end
        for _, c in ipairs(w.calls) do
            f.ops = f.ops + 1
            f.wrong = f.wrong + c.wrong
            if c.status ~= "ok" then
                f.errors = f.errors + 1
            end
            if c.status == "bad" then
                f.unexpected = f.unexpected + 1
            elseif c.status == "err" and fail_open then
                f.raised = f.raised + 1
            end
            if c.dur > f.longest then
                f.longest, f.longest_op, f.longest_wait = c.dur, c.op, c.wait
            end
            local rest = c.dur - c.wait - c.creator
            f.longest_rest = math.max(f.longest_rest, rest)
            if rest > NONLOCK_BOUND or c.wait > LOCK_BOUND then
                f.over = f.over + 1
                problem(fmt("process %d: %s at +%.2f s took %.3f s (%s): %.3f s waiting for a "
                            .. "lock (bound %.2f), %.3f s in the creator, %.3f s else (bound %.2f; "
                            .. "%.3f s of it in lock calls that failed, %.3f s in releasing the lock)",
                            id, c.op, c.t0 - t_start, c.dur, c.status, c.wait, LOCK_BOUND,
                            c.creator, rest, NONLOCK_BOUND, c.lockfail, c.release))
            end
        end
        for _, rd in ipairs(w.reads) do
            if not written[rd[1] .. ":" .. rd[2]] then
                f.unwritten = f.unwritten + 1
                problem(fmt("process %d read version %s of key %d, which nobody wrote",
                            id, rd[2], rd[1]))
            end
        end
    end
    -- Recovery: each process's first call that succeeded (a backend error
    -- neither raised nor turned into a miss), ending after the recovery.
    local t_end = t_start + DURATION
    for k, rec in ipairs(run.recoveries) do
        if rec.t > t_end - RECOVERY then
            problem(fmt("the %s planned earlier came only at +%.2f s, too late to judge the "
                        .. "recovery before the load ends at +%d s (the spec's own delay)",
                        rec.what, rec.t - t_start, DURATION))
        end
        local worst = 0
        for id, w in ipairs(run.workers) do
            local first
            for _, c in ipairs(w.calls) do
                if c.status == "ok" and c.t0 + c.dur >= rec.t then
                    first = c.t0 + c.dur - rec.t
                    break
                end
            end
            if not first then
                problem(fmt("process %d never succeeded after the %s at +%.2f s", id, rec.what,
                            rec.t - t_start))
                first = math.huge
            end
            worst = math.max(worst, first)
        end
        f.recovery[k] = worst
        if worst > RECOVERY then
            problem(fmt("after the %s at +%.2f s, operations succeeded again only after %.2f s "
                        .. "(bound %d s)", rec.what, rec.t - t_start, worst, RECOVERY))
        end
    end
    -- Past RECOVERY seconds after a recovery (and before the first
    -- disruption), until the next disruption, every call succeeds.
    local windows = { { t_start, run.disruptions[1] } }
    for k, rec in ipairs(run.recoveries) do
        windows[#windows + 1] = { rec.t + RECOVERY, run.disruptions[k + 1] or t_end }
    end
    for id, w in ipairs(run.workers) do
        for _, c in ipairs(w.calls) do
            if c.status ~= "ok" then
                for _, win in ipairs(windows) do
                    if c.t0 >= win[1] and c.t0 + c.dur <= win[2] then
                        f.late_errors = f.late_errors + 1
                        problem(fmt("process %d: %s at +%.2f s failed (%s), %.2f s into a "
                                    .. "healthy stretch", id, c.op, c.t0 - t_start, c.status,
                                    c.t0 - win[1]))
                    end
                end
            end
        end
    end
    if f.wrong > 0 then
        problem(f.wrong .. " wrong values")
    end
    if f.unexpected > 0 then
        problem(f.unexpected .. " errors that do not name the backend")
    end
    if f.raised > 0 then
        problem(f.raised .. " calls raised although the region is fail_open")
    end
    -- A run the chaos did not reach proves nothing.
    if f.errors == 0 then
        problem("no call failed: the chaos did not reach the load processes")
    end
    return f, problems
end

describe("chaos", function()
    teardown(function()
        for pid in pairs(started) do
            pcall(kill_wait, pid)
        end
        -- DP_CHAOS_KEEP=1 keeps the load processes' logs for a look.
        if os.getenv("DP_CHAOS_KEEP") then
            print("# chaos logs kept in " .. TMP)
        else
            os.execute("rm -rf '" .. TMP .. "'")
        end
    end)

    for _, fail_open in ipairs({ true, false }) do
        it((fail_open and "fail_open" or "without fail_open") .. " regions on redis and on "
           .. "memcached: 4 processes each through SIGSTOP, SIGCONT, SIGKILL and restarts", function()
            local ctx = { pids = {}, servers = {} }
            finally(function()
                for _, pid in ipairs(ctx.pids) do
                    pcall(kill_wait, pid)
                end
                for _, srv in ipairs(ctx.servers) do
                    pcall(kill_wait, srv.pid)
                end
            end)
            local phases = {
                { backend = "dogpile.cache.redis", fail_open = fail_open },
                { backend = "dogpile.cache.memcached", fail_open = fail_open },
            }
            local failures = {}
            for _, run in ipairs(run_phases(phases, ctx)) do
                local f, problems = judge(fail_open, run)
                local rec = {}
                for k, r in ipairs(run.recoveries) do
                    rec[k] = fmt("%s %.2f", r.what, f.recovery[k])
                end
                print(fmt("# chaos %s: %d ops, %d errors, %d wrong values, %d values nobody "
                          .. "wrote, longest call %.3f s (%s, %.3f s of it waiting for a lock), longest outside "
                          .. "lock waits and creator %.3f s (bound %.2f), "
                          .. "%d calls over their bound, %d errors after recovery, recovery (s): "
                          .. "%s; fail_open log lines %d",
                          run.name, f.ops, f.errors, f.wrong, f.unwritten, f.longest,
                          f.longest_op, f.longest_wait, f.longest_rest, NONLOCK_BOUND, f.over, f.late_errors,
                          table.concat(rec, ", "), f.logged))
                if #problems > 0 then
                    failures[#failures + 1] = run.name .. ":\n  " .. table.concat(problems, "\n  ")
                end
            end
            assert(#failures == 0, table.concat(failures, "\n"))
        end)
    end
end)
