-- Shared by the specs: leak checks and a small coroutine scheduler.
local lib = require "dogpile.lib"

local luassert = require "luassert"

local _M = {}

--- Run `fn` (written on ONE line, without `return` so that the call is not a
-- tail call) and check that it raises a string that starts with the position
-- of that line, then `prefix`, and that it mentions each of `...`.
function _M.raises_here(prefix, fn, ...)
    local info = debug.getinfo(fn, "S")
    local ok, err = pcall(fn)
    luassert.is_false(ok, "expected an error")
    luassert.is_string(err, "expected a string error, got " .. type(err))
    local where = info.short_src .. ":" .. info.linedefined .. ": "
    luassert.are.equal(where .. prefix, err:sub(1, #where + #prefix),
                       "error does not point at the caller's line: " .. err)
    for i = 1, select("#", ...) do
        local needle = select(i, ...)
        luassert.is_truthy(err:find(needle, 1, true),
                           ("error %q does not mention %q"):format(err, needle))
    end
    return err
end

--- Call inside a describe block: after each test, collect garbage and fail
-- if a lock is still held in the core's registry (then clean it up, so one
-- leak does not fail every later test).
function _M.no_leaks()
    -- busted's functions live in the spec file's environment, not in _G.
    local env = getfenv(2)
    local after_each, assert = env.after_each, env.assert
    after_each(function()
        collectgarbage()
        local n = tonumber(lib.C.dp_lock_count())
        if n ~= 0 then
            lib.C.dp_lock_release_owner(require("dogpile.context").OWNER)
        end
        assert.are.equal(0, n, "locks still held after the test")
    end)
end

--- A cooperative scheduler, as a game server would run: `spawn(fn, ...)`
-- adds a coroutine, `sleep(s)` (inside one) yields it for s seconds of a
-- virtual clock, `run()` runs until every coroutine is done. Errors inside a
-- coroutine are re-raised by run().
function _M.scheduler()
    local s = { now = 0, ready = {}, sleeping = {}, done = 0 }
    function s.spawn(fn, ...)
        local co = coroutine.create(fn)
        s.ready[#s.ready + 1] = { co = co, args = { n = select("#", ...), ... } }
        return co
    end
    function s.sleep(seconds)
        assert(coroutine.running(), "scheduler sleep outside a coroutine")
        coroutine.yield("sleep", seconds)
    end
    local function resume(task)
        local ok, what, arg = coroutine.resume(task.co, unpack(task.args, 1, task.args.n))
        task.args = { n = 0 }
        if not ok then
            error(what, 0)
        end
        if coroutine.status(task.co) == "dead" then
            s.done = s.done + 1
        elseif what == "sleep" then
            s.sleeping[#s.sleeping + 1] = { at = s.now + (arg or 0), task = task }
        else
            s.ready[#s.ready + 1] = task
        end
    end
    function s.run(max_steps)
        local steps = 0
        while #s.ready > 0 or #s.sleeping > 0 do
            steps = steps + 1
            assert(steps < (max_steps or 1e6), "scheduler: too many steps (deadlock?)")
            if #s.ready == 0 then
                table.sort(s.sleeping, function(a, b) return a.at < b.at end)
                s.now = s.sleeping[1].at
                local still = {}
                for _, e in ipairs(s.sleeping) do
                    if e.at <= s.now then
                        s.ready[#s.ready + 1] = e.task
                    else
                        still[#still + 1] = e
                    end
                end
                s.sleeping = still
            end
            local ready = s.ready
            s.ready = {}
            for _, task in ipairs(ready) do
                resume(task)
            end
        end
    end
    return s
end

-- -- Processes and files, for the specs that drive servers ---------------------

local ffi = require "ffi"
pcall(ffi.cdef, [[ int usleep(unsigned int usec); ]])

--- Wall-clock seconds.
function _M.now()
    return require("dogpile").now()
end

--- Block for `s` seconds; none when `s` <= 0. usleep takes an unsigned
-- int: a slightly negative remainder (a deadline passed between the check
-- and the call) became 4295 s, one CI run's 71-minute stall in chaos_spec.
function _M.sleep(s)
    ffi.C.usleep(math.floor(math.max(s, 0) * 1e6))
end

-- Probes run without the sanitizer runtime the ASan variant preloads into
-- busted (it would slow each probe, and every server restart, by seconds).
local BARE = "env -u LD_PRELOAD "

--- Whether something listens on 127.0.0.1:`port`.
function _M.port_open(port)
    return os.execute(BARE .. "bash -c '(exec 3<>/dev/tcp/127.0.0.1/" .. port .. ") 2>/dev/null'") == 0
end

--- A loopback TCP port nobody listens on, below the ephemeral range
-- (.ci/lib.sh free_port says why).
function _M.free_port()
    local p = assert(io.popen(BARE .. [[bash -c 'while :; do p=$((20000 + RANDOM % 12000)); ]]
        .. [[(exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo $p; exit; }; done']]))
    local out = p:read("*a")
    p:close()
    return assert(tonumber(out:match("%d+")), "no free loopback port: " .. out)
end

--- A stand-in Redis server (spec/fixtures/redis/half_answering.py) that
-- leaves the commands named in `silent` unanswered: its port, and a function
-- that stops it.
function _M.half_answering_redis(silent)
    local file = os.tmpname()
    local pid = _M.sh(("python3 spec/fixtures/redis/half_answering.py %s >%s 2>&1 & echo $!")
                      :format(table.concat(silent, " "), file)):match("%d+")
    local port
    for _ = 1, 500 do
        port = tonumber((_M.read(file) or ""):match("^(%d+)\n"))
        if port then
            break
        end
        _M.sleep(0.01)
    end
    local out = _M.read(file) or ""
    os.remove(file)
    local function stop()
        os.execute("kill -9 " .. pid .. " 2>/dev/null")
    end
    if not port then
        stop()
        error("the stand-in redis server did not start: " .. out)
    end
    return port, stop
end

--- Run a shell command; its stdout and stderr.
function _M.sh(cmd)
    local p = assert(io.popen(cmd .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    return out
end

function _M.write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

--- The file's contents, or nil if it cannot be read.
function _M.read(path)
    local f = io.open(path)
    if not f then
        return nil
    end
    local s = f:read("*a")
    f:close()
    return s
end

function _M.count_lines(path)
    local _, n = (_M.read(path) or ""):gsub("\n", "")
    return n
end

-- -- A two-tier Lua backend with a front (front.md) ------------------------------

--- A backend of two tiers, each a table of CachedValues: `front.store` (tier
-- 1, read by the region directly) and `below` (tier 2, what another process
-- would see). `get` reads both, returns the newer copy and promotes it;
-- `set`/`delete` write through both. `front.sync()` drops the keys queued in
-- `pending` (as a change feed would) and counts its calls; it costs one table
-- load when nothing is pending. `invalidator` is shared by every region over
-- it. Counters: gets (calls of get), syncs, tier1/tier2 (hits of get per tier).
function _M.front_backend(invalidator)
    local api = require "dogpile.cache.api"
    local NO_VALUE = api.NO_VALUE
    local T, below = {}, {}
    local b = { gets = 0, syncs = 0, tier1 = 0, tier2 = 0, pending = {}, npending = 0,
                below = below, invalidator = invalidator }
    local state = b
    b.front = {
        store = T,
        sync = function()
            state.syncs = state.syncs + 1
            if state.npending ~= 0 then
                for k in pairs(state.pending) do
                    T[k] = nil
                end
                state.pending, state.npending = {}, 0
            end
        end,
    }
    -- The newer of the two copies; tier 2's is promoted.
    function b.get(self, key)
        self.gets = self.gets + 1
        local v1, v2 = T[key], below[key]
        if v2 ~= nil and (v1 == nil or v2.metadata.ct > v1.metadata.ct) then
            self.tier2 = self.tier2 + 1
            T[key] = v2
            return v2
        elseif v1 ~= nil then
            self.tier1 = self.tier1 + 1
            return v1
        end
        return NO_VALUE
    end
    function b.set(_, key, value)
        T[key], below[key] = value, value
    end
    function b.delete(_, key)
        T[key], below[key] = nil, nil
    end
    --- Another process changed `key` in tier 2: queue it for sync().
    function b.changed_elsewhere(self, key, value)
        below[key] = value
        self.pending[key] = true
        self.npending = self.npending + 1
    end
    function b.tier_hits(self, front_hits)
        return { self.tier1 + front_hits, self.tier2 }
    end
    return b
end

return _M
