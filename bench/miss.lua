--- The engine's overhead on a miss: region:get_or_create of a key that is
-- not there, with a creator that returns a constant, so that what is timed is
-- the region's own work (the read that misses, the dogpile lock, the creator
-- call, the store, the release) and not the creator.
--
--   luajit bench/miss.lua [misses per repetition] [repetitions] [rounds]
--
-- Every repetition uses the same N keys, all deleted beforehand (outside the
-- timed part), so each get_or_create is a miss followed by a create. Regions:
-- "dogpile.cache.memory" (Lua values by reference) and
-- "dogpile.cache.shared_memory" (the C store: encode, envelope, copy into the
-- process-wide store), both with an expiration_time. ROW lines: ns per
-- miss+create, target at most 2 us (abs<=2000 ns), with Python
-- dogpile.cache's memory get_or_create miss (bench/anchors.py, this same run,
-- the same number of keys) as the anchor. lua-resty-mlcache's L3 (its miss path) is the other anchor
-- the issue names, but mlcache is not packaged in Debian, so it is not run.
local blib = require "lib"
local cache = require "dogpile.cache"

local format = string.format

local N = tonumber(arg and arg[1]) or blib.count(2e4, 4e3)
local REPS = tonumber(arg and arg[2]) or (blib.quick and 3 or 5)
local ROUNDS = tonumber(arg and arg[3]) or (blib.quick and 1 or 3)

local KEYS = {}
for i = 1, N do
    KEYS[i] = "miss:" .. i
end

local function constant()
    return "value-16-bytes!!"
end

local regions = {
    { id = "miss_memory", path = "memory region get_or_create miss+create",
      region = cache.make_region():configure("dogpile.cache.memory", { expiration_time = 3600 }) },
    { id = "miss_shm", path = "shared_memory region get_or_create miss+create",
      region = cache.make_region():configure("dogpile.cache.shared_memory", {
          expiration_time = 3600,
          arguments = { name = "bench-miss", max_bytes = "256m", max_items = 4 * N },
      }) },
}

local function clear(region)
    for i = 1, N do
        region:delete(KEYS[i])
    end
end

local function loop(region)
    local keys, n, creator = KEYS, N, constant
    local misses0 = region._stats and region._stats.misses
    for i = 1, n do
        region:get_or_create(keys[i], creator)
    end
    return misses0
end

local function measure(r, times)
    local region = r.region
    -- A first run warms up (compiles the traces); then REPS timed runs.
    for rep = 0, REPS do
        clear(region)
        collectgarbage()
        local t0 = blib.clock()
        loop(region)
        local t1 = blib.clock()
        if rep > 0 then
            times[#times + 1] = (t1 - t0) * 1e9 / N
        end
    end
    -- Every key must now hold the constant (a miss that did not store would
    -- make the next repetition cheaper, and this run wrong).
    for i = 1, N, math.max(1, math.floor(N / 100)) do
        assert(region:get(KEYS[i]) == "value-16-bytes!!", "bench: a created value was not stored")
    end
end

local function python_anchor(case, n)
    local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
    local p = io.popen("/usr/bin/python3 " .. dir .. "/anchors.py " .. case .. " " .. n .. " 2>&1")
    local out = p and p:read("*a") or ""
    if p then p:close() end
    local v = tonumber(out:match("^%s*([%d.]+)%s*$"))
    if not v then
        io.stderr:write("bench/anchors.py ", case, " failed: ", out, "\n")
    end
    return v
end

print(format("miss + create, constant creator: %d distinct missing keys x %d repetitions x %d rounds,"
             .. " median", N, REPS, ROUNDS))
-- The regions take turns ROUNDS times (a change in the machine's load falls
-- on both alike); each figure is the median of all the repetitions.
local samples = {}
for _ = 1, ROUNDS do
    for i, r in ipairs(regions) do
        samples[i] = samples[i] or {}
        measure(r, samples[i])
    end
end
-- Bytes of Lua heap one miss allocates, the collector stopped: the value
-- and its metadata must be made; the lock's and the context's tables need
-- not be (sunk by the compiled miss). Which traces a process compiles first
-- moves it, so it is a figure here, not a check in the specs.
local function bytes_per_miss(region)
    clear(region)
    collectgarbage()
    collectgarbage("stop")
    local before = collectgarbage("count")
    loop(region)
    local per = (collectgarbage("count") - before) * 1024 / N
    collectgarbage("restart")
    return per
end
local results = {}
for i, r in ipairs(regions) do
    local times = samples[i]
    table.sort(times)
    results[i] = blib.median(times)
    print(format("%-48s %9.1f ns/op  (%.1f-%.1f)", r.path, results[i], times[1], times[#times]))
end
local py = python_anchor("memory_miss", N) -- as many keys as ours
print(format("%-48s %9s ns/op", "Python dogpile.cache memory get_or_create miss",
             py and format("%.1f", py) or "failed"))
print("(lua-resty-mlcache's L3 is not packaged in Debian: not measured)")
for i, r in ipairs(regions) do
    blib.row(r.id, r.path, results[i], "ns/op", "Python dogpile.cache memory miss", py, "abs<=2000")
end
for _, r in ipairs(regions) do
    local bytes = bytes_per_miss(r.region)
    print(format("%-48s %9.0f bytes/miss", r.path, bytes))
    blib.row(r.id .. "_bytes", r.path .. ", Lua heap allocated", bytes, "bytes", "-", "-", "")
end
