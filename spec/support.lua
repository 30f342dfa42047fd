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

--- Block for `s` seconds.
function _M.sleep(s)
    ffi.C.usleep(math.floor(s * 1e6))
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

return _M
