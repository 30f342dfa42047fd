-- The cache hit must stay in LuaJIT's compiled code (DESIGN.md, "The hot
-- path"). As lua-resty-core's tests do, run a hot loop of hits with
-- jit.attach watching the trace compiler, and fail on any trace abort,
-- naming its reason and place.
local jit = require "jit"
local jutil = require "jit.util"
local vmdef = require "jit.vmdef"
local cache = require "dogpile.cache"
local support = require "support"

local NO_VALUE = cache.NO_VALUE
-- The trace handler runs inside the trace compiler: it must not look up a
-- global, because busted's spec environment resolves globals through an
-- __index function, and a metamethod call from a VM event handler finds the
-- stack in an unexpected state (the handler fails, or the run hangs).
local format, concat = string.format, table.concat
local type, tostring, pcall, ipairs, assert = type, tostring, pcall, ipairs, assert

local N = 2000       -- iterations of each hot loop
local NKEYS = 1000   -- distinct keys, cycled through
local THIS = debug.getinfo(1, "S").source
local HOTLOOP = 56   -- LuaJIT's default

-- -- Watching the trace compiler ------------------------------------------------

local function where(func, pc)
    if func == nil then
        return "?", nil
    end
    local fi = jutil.funcinfo(func, pc)
    if fi.loc then
        return fi.loc, fi.source
    elseif fi.ffid then
        return vmdef.ffnames[fi.ffid], nil
    end
    return "(?)", nil
end

-- As jit/v.lua formats it: traceerr[otr] with oex (a number or a function).
local function abort_reason(otr, oex)
    if type(otr) ~= "number" then
        return tostring(otr)
    end
    local fmt = vmdef.traceerr[otr] or ("trace error " .. otr)
    if type(oex) == "function" then
        oex = (where(oex))
    end
    local ok, msg = pcall(format, fmt, oex)
    return ok and msg or fmt
end

local function ours(source)
    return source ~= nil and (source == THIS or source:find("/dogpile/", 1, true) ~= nil
                              or source:find("dogpile/cache", 1, true) ~= nil)
end

--- Flush every trace, run `loop()` with a trace event handler attached, and
-- return what the compiler did: aborts (with reason and place) and stops
-- (with where the trace started and its link type). jit.attach keeps one
-- handler per event, so while this runs it replaces -jv's.
local function watch(loop)
    local started, aborts, stops = {}, {}, {}
    local function on_trace(what, tr, func, pc, otr, oex)
        if what == "start" then
            local loc, source = where(func, pc)
            started[tr] = { loc = loc, source = source,
                            parent = otr and format("(%d/%s) ", otr, tostring(oex)) or "" }
        elseif what == "abort" then
            local s = started[tr] or { loc = "?", parent = "" }
            local reason = abort_reason(otr, oex)
            aborts[#aborts + 1] = { loc = s.loc, reason = reason, at = (where(func, pc)),
                                    text = format("%s%s -- %s at %s", s.parent, s.loc,
                                                  reason, (where(func, pc))) }
        elseif what == "stop" then
            local s = started[tr] or { loc = "?", parent = "" }
            local info = jutil.traceinfo(tr)
            stops[#stops + 1] = { tr = tr, loc = s.loc, source = s.source,
                                  linktype = info and info.linktype or "?" }
        end
    end
    -- A collection cycle finished while a trace records runs holders.lua's
    -- finalizer, which aborts that recording (see GC_HOOK): start from a
    -- fresh cycle, so that one is unlikely within the loop.
    collectgarbage()
    jit.flush()
    -- Setting hotloop resets every hot counter: without it, a counter that a
    -- loop or call before this one left near zero (the counters are shared by
    -- hashed bytecode address) can start a trace at the entry of the function
    -- holding the loop, which then aborts with "inner loop in root trace".
    jit.opt.start("hotloop=" .. HOTLOOP)
    jit.attach(on_trace, "trace")
    local ok, err = pcall(loop)
    jit.attach(on_trace)
    assert(ok, err)
    return aborts, stops
end

local function describe_stops(stops)
    local out = {}
    for _, s in ipairs(stops) do
        out[#out + 1] = format("#%d %s %s", s.tr, s.loc, s.linktype)
    end
    return #out > 0 and concat(out, "; ") or "(none)"
end

-- A root trace that starts at a short inner loop (a table's fields) on
-- that loop's last iteration aborts with "leaving loop in root trace":
-- which iteration the hot counter fires on depends on counters shared by
-- hashed bytecode address, so on where the allocator put the code. LuaJIT
-- then starts the trace again on a later iteration. Such an abort is
-- forgiven only when a trace from the same place did compile.
local TRANSIENT = "leaving loop in root trace"
-- The same for a recording that a collection cycle interrupts by running
-- the finalizer of holders.lua (its sweep of abandoned locks, armed again
-- at every cycle): the loop allocates nothing, but this spec's trace hook
-- does. Forgiven only at that finalizer, and when the place did compile.
local GC_HOOK = "error thrown or hook called during recording"

local function transient(a, compiled_at)
    if not compiled_at[a.loc] then
        return false
    end
    return a.reason == TRANSIENT
        or (a.reason == GC_HOOK and tostring(a.at):match("holders%.lua") ~= nil)
end

local function assert_compiled(aborts, stops)
    local compiled_at, real = {}, {}
    for _, s in ipairs(stops) do
        compiled_at[s.loc] = true
    end
    for _, a in ipairs(aborts) do
        if not transient(a, compiled_at) then
            real[#real + 1] = a.text
        end
    end
    assert.are.equal(0, #real, "trace aborts in the hit loop:\n  " .. concat(real, "\n  ")
                     .. "\ntraces compiled: " .. describe_stops(stops))
    local found = false
    for _, s in ipairs(stops) do
        if ours(s.source) and s.linktype ~= "interpreter" then
            found = true
        end
    end
    assert.is_true(found, "no trace of the spec or the library was compiled; traces: "
                   .. describe_stops(stops))
end

-- -- The hot loops --------------------------------------------------------------

local KEYS = {}
for i = 1, NKEYS do
    KEYS[i] = "key:" .. i
end

local function get_loop(region, n)
    local acc = 0
    for i = 1, n do
        acc = acc + region:get(KEYS[i % NKEYS + 1])
    end
    return acc
end

local creator_calls = 0
local function creator()
    creator_calls = creator_calls + 1
    return -1
end

local function get_or_create_loop(region, n)
    local acc = 0
    for i = 1, n do
        acc = acc + region:get_or_create(KEYS[i % NKEYS + 1], creator)
    end
    return acc
end

-- The sum of the values over a loop of n hits: key i holds i.
local function expected_sum(n)
    local s = 0
    for i = 1, n do
        s = s + (i % NKEYS + 1)
    end
    return s
end

-- -- Specs -------------------------------------------------------------------------

describe("the JIT", function()
    it("is on", function()
        local on = jit.status()
        assert.is_true(on, "LuaJIT's JIT compiler is off (jit.status())")
        assert.is_truthy(jit.version:match("^LuaJIT"))
    end)
end)

local REGIONS = {
    { "memory with expiration_time", { expiration_time = 3600 } },
    { "memory without expiration_time", {} },
    { "memory LRU (max_items) with expiration_time",
      { expiration_time = 3600, arguments = { max_items = 2 * NKEYS } } },
    { "memory LRU (max_items) without expiration_time",
      { arguments = { max_items = 2 * NKEYS } } },
    -- Stored as doubles (i + 0.5), so every value decodes through one path:
    -- integers of one and two varint bytes take different branches, and when
    -- the compiler happens to root a trace inside the region rather than at
    -- the loop, a side trace of the other branch cannot link back and aborts
    -- (loop unroll limit) -- a fact of trace linking, seen in 4 runs of 30.
    { "shared_memory with expiration_time",
      { expiration_time = 3600, arguments = { name = "jit_spec_exp" } }, "dogpile.cache.shared_memory",
      0.5 },
    { "shared_memory without expiration_time",
      { arguments = { name = "jit_spec" } }, "dogpile.cache.shared_memory", 0.5 },
}

-- Issue 16: values with their own expiration time (format 2 envelopes,
-- read in place on shared_memory), and regions with early_refresh, whose
-- get_or_create draws on every hit of a value with a creator's duration
-- (set's fourth argument here). The 5th field: set's extra arguments.
REGIONS[#REGIONS + 1] = { "memory, values with their own expiration time",
                          { expiration_time = 3600 }, nil, 0, { 7200 } }
REGIONS[#REGIONS + 1] = { "shared_memory, values with their own expiration time",
                          { expiration_time = 3600, arguments = { name = "jit_spec_ttl" } },
                          "dogpile.cache.shared_memory", 0.5, { 7200 } }
REGIONS[#REGIONS + 1] = { "memory with early_refresh",
                          { expiration_time = 3600, early_refresh = 1 }, nil, 0, { nil, 0.001 } }
REGIONS[#REGIONS + 1] = { "shared_memory with early_refresh",
                          { expiration_time = 3600, early_refresh = 1,
                            arguments = { name = "jit_spec_early" } },
                          "dogpile.cache.shared_memory", 0.5, { nil, 0.001 } }

-- A backend with a front (front.md, support.front_backend): the region
-- reads its table after its sync function.
cache.register_backend("spec.jit_front", function() return support.front_backend() end)
REGIONS[#REGIONS + 1] = { "a front table with expiration_time", { expiration_time = 3600 },
                          "spec.jit_front" }
REGIONS[#REGIONS + 1] = { "a front table without expiration_time", {}, "spec.jit_front" }

-- A key_mangler (the 6th field: make_region's options): the hit calls it.
REGIONS[#REGIONS + 1] = { "memory with a key_mangler", { expiration_time = 3600 }, nil, 0, {},
                          { key_mangler = function(k) return "m:" .. k end } }

local LOOPS = {
    { "region:get", get_loop },
    { "region:get_or_create", get_or_create_loop },
}

describe("a cache hit compiles with no trace abort", function()
    support.no_leaks()

    for _, r in ipairs(REGIONS) do
        for _, l in ipairs(LOOPS) do
            local rname, conf, backend = r[1], r[2], r[3] or "dogpile.cache.memory"
            local bias = r[4] or 0
            local extra = r[5] or {}
            local lname, loop = l[1], l[2]
            it(lname .. " on " .. rname, function()
                local region = cache.make_region(r[6]):configure(backend, conf)
                for i = 1, NKEYS do
                    region:set(KEYS[i], i + bias, extra[1], extra[2])
                end
                assert.are_not.equal(NO_VALUE, region:get(KEYS[1]))
                creator_calls = 0
                local hits0 = region:stats().hits
                local acc
                local aborts, stops = watch(function()
                    acc = loop(region, N)
                end)
                assert_compiled(aborts, stops)
                assert.are.equal(expected_sum(N) + N * bias, acc, "every iteration must be a hit")
                assert.are.equal(N, region:stats().hits - hits0)
                assert.are.equal(0, creator_calls)
            end)
        end
    end
end)

-- A table value read in place from a C backend's buffer (envelope.lua).
describe("a hit on a table value in shared_memory", function()
    support.no_leaks()

    it("compiles with no trace abort and decodes every field", function()
        local region = cache.make_region():configure("dogpile.cache.shared_memory", {
            expiration_time = 3600, arguments = { name = "jit_spec_tables" } })
        for i = 1, NKEYS do
            -- Integers of two varint bytes each (see REGIONS above).
            region:set(KEYS[i], { id = 1000 + i, name = "user" .. i, email = "u" .. i .. "@example.com",
                                  age = 100 + i % 50, score = i + 0.5, admin = i % 7 == 0,
                                  active = true, country = "NO", plan = "pro", logins = 200 + i })
        end
        local acc
        local aborts, stops = watch(function()
            local a = 0
            for i = 1, N do
                local t = region:get(KEYS[i % NKEYS + 1])
                a = a + t.id - 1000 + (t.active and 0 or 1e9)
            end
            acc = a
        end)
        assert_compiled(aborts, stops)
        assert.are.equal(expected_sum(N), acc)
    end)
end)
