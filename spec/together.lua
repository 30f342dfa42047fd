-- Starting child processes at the same moment, whatever their start-up costs
-- (a sanitizer build, a loaded machine): a fixed head start is too short on a
-- slow run and a waste on a fast one. Each child says it is ready, then waits
-- for the go, which the parent gives once every child is ready.
local support = require "support"

local _M = {}

-- For a child script (after a prelude that defines `sleep(seconds)`):
-- `start_together(prefix)` returns when the parent gives the go.
_M.CHILD = [[
local function start_together(prefix)
    local f = assert(io.open(prefix .. ".ready", "a")) -- O_APPEND: one write per line
    f:write("ready\n")
    f:close()
    local t0 = os.time()
    while os.time() - t0 < 60 do
        local go = io.open(prefix .. ".go")
        if go then
            go:close()
            return
        end
        sleep(0.001)
    end
    error("never got the go")
end
]]

local function wait_until(what, timeout, check)
    local t0 = support.now()
    while not check() do
        assert(support.now() - t0 < timeout, what .. " after " .. timeout .. " s")
        support.sleep(0.002)
    end
end

--- Wait until `n` children of `prefix` are ready (at most `timeout` s).
function _M.ready(prefix, n, timeout)
    wait_until(("fewer than %d children ready"):format(n), timeout or 60,
               function() return support.count_lines(prefix .. ".ready") >= n end)
end

--- Give the children of `prefix` the go.
function _M.go(prefix)
    support.write(prefix .. ".go", "")
end

--- Run the shell commands `cmds` (children that call start_together(prefix))
-- in the background, give the go when all are ready (after calling
-- `before_go`, if given), and return when all have exited (at most `timeout`
-- s for each step).
function _M.run(cmds, prefix, timeout, before_go)
    local done = prefix .. ".done"
    support.sh("( " .. table.concat(cmds, " & ") .. " & wait; echo done > '" .. done
               .. "' ) >/dev/null 2>&1 &")
    _M.ready(prefix, #cmds, timeout)
    if before_go then
        before_go()
    end
    _M.go(prefix)
    wait_until("children still running", timeout or 60, function()
        return (support.read(done) or ""):match("done") ~= nil
    end)
end

return _M
