--- What every Lua benchmark shares: a monotonic clock, medians, the quick
-- mode, and the ROW lines that bench/run gathers into one table
-- (bench/summary.lua makes it, from one run or the medians of several).
--
-- A ROW line is tab-separated:
--   ROW  id  path  ours  unit  anchor  anchor_value  target
-- `ours` and `anchor_value` are in `unit` (ns/op, us, M/s...), so that
-- ratio = ours / anchor_value. `target` is "" (shown for reference), "<=R" or
-- ">=R" (a ratio to the anchor), or "abs<=V" / "abs>=V" (ours alone, in unit;
-- anchor may then be "-"). `id` is a short stable name (letters, digits, _).
local ffi = require "ffi"

local M = {}

pcall(ffi.cdef, [[
    typedef struct { long tv_sec; long tv_nsec; } dp_bench_timespec;
    int clock_gettime(int clk_id, dp_bench_timespec *tp);
]])
local ts = ffi.new("dp_bench_timespec")
local C = ffi.C

--- Monotonic seconds.
function M.clock()
    C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

--- Wall-clock seconds (comparable between processes).
function M.wall()
    C.clock_gettime(0, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

--- BENCH_QUICK=1 (bench/run --quick): small counts, just prove it runs.
M.quick = os.getenv("BENCH_QUICK") == "1"

--- `n` normally, `q` (default n/100, at least 1) in quick mode.
function M.count(n, q)
    if M.quick then
        return q or math.max(1, math.floor(n / 100))
    end
    return n
end

function M.median(xs)
    local s = {}
    for i = 1, #xs do
        s[i] = xs[i]
    end
    table.sort(s)
    local n = #s
    if n == 0 then
        return 0 / 0
    elseif n % 2 == 1 then
        return s[(n + 1) / 2]
    end
    return (s[n / 2] + s[n / 2 + 1]) / 2
end

--- Median ns per operation of `fn(n)` (which runs n operations) over `reps`
-- repetitions, after one warm-up run.
function M.ns_per_op(fn, n, reps)
    reps = reps or (M.quick and 3 or 7)
    fn(n)
    local t = {}
    for r = 1, reps do
        local t0 = M.clock()
        fn(n)
        t[r] = (M.clock() - t0) * 1e9 / n
    end
    return M.median(t)
end

local function fmt(v)
    if type(v) == "number" then
        return string.format("%.6g", v)
    end
    return tostring(v == nil and "-" or v)
end

--- Print one ROW line (see the top of this file).
function M.row(id, path, ours, unit, anchor, anchor_value, target)
    io.write(table.concat({ "ROW", id, path, fmt(ours), unit, anchor or "-", fmt(anchor_value),
                            target or "" }, "\t"), "\n")
    io.flush()
end

return M
