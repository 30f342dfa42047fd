-- Quickstart: regions from a config file, then a stampede of coroutines on a
-- slow creator, twice: once with the key missing (all wait, one creates) and
-- once with it expired (one regenerates, everyone else gets the old value at
-- once).
--
--   luajit examples/quickstart.lua [regions.lua] [coroutines]
local cache = require "dogpile.cache"
local dogpile = require "dogpile"
local lib = require "dogpile.lib"

local config = arg[1] or "examples/regions.lua"
local N = tonumber(arg[2]) or 1000
local now, sleep_thread = lib.C.dp_clock_monotonic, lib.C.dp_clock_sleep

-- A tiny real-time scheduler, as a game server or an event loop has one.
local ready, sleeping = {}, {}
local function spawn(fn) ready[#ready + 1] = coroutine.create(fn) end
local function sleep(seconds) coroutine.yield(now() + seconds) end
local function run()
    while #ready > 0 or #sleeping > 0 do
        if #ready == 0 then
            table.sort(sleeping, function(a, b) return a.at < b.at end)
            sleep_thread(sleeping[1].at - now())
            local t, still = now(), {}
            for _, s in ipairs(sleeping) do
                if s.at <= t then ready[#ready + 1] = s.co else still[#still + 1] = s end
            end
            sleeping = still
        end
        local batch = ready
        ready = {}
        for _, co in ipairs(batch) do
            local ok, wake = coroutine.resume(co)
            if not ok then error(wake, 0) end
            if coroutine.status(co) ~= "dead" then
                sleeping[#sleeping + 1] = { co = co, at = wake }
            end
        end
    end
end

-- Waiters yield to the scheduler instead of blocking the thread.
dogpile.set_sleep(sleep)

local regions = cache.load_regions(config)
local profiles = regions.profiles

local creator_calls = 0
local function load_profile(id)
    creator_calls = creator_calls + 1
    sleep(0.2) -- a slow database query
    return { id = id, name = "player" .. id, loaded_at = os.time() }
end

local function stampede(label)
    local before = creator_calls
    local got, waits = 0, {}
    local t0 = now()
    for i = 1, N do
        spawn(function()
            local started = now()
            local p = profiles:get_or_create("profile:42", load_profile, nil, nil, { 42 })
            assert(p.id == 42)
            got = got + 1
            waits[i] = now() - started
        end)
    end
    run()
    table.sort(waits)
    local instant = 0
    for _, w in ipairs(waits) do
        if w < 0.01 then instant = instant + 1 end
    end
    print(("%-34s %d coroutines, creator ran %d time(s), %d answered at once, "
           .. "slowest %.0f ms, wall %.0f ms"):format(label, got, creator_calls - before,
           instant, waits[#waits] * 1e3, (now() - t0) * 1e3))
end

print(("dogpile for Lua %s: regions from %s"):format(cache._VERSION, config))
stampede("1. key missing (all wait for one):")
stampede("2. key fresh (all hits):")
sleep_thread(1.1) -- past the region's expiration_time
stampede("3. key expired (stale served):")

-- The decorator form, on another region from the same file.
local board = regions.leaderboards
local top = board:cache_on_arguments({ namespace = "top" })(function(game, n)
    creator_calls = creator_calls + 1
    local t = {}
    for i = 1, n do t[i] = game .. "-player-" .. i end
    return t
end)
spawn(function() assert(#top("chess", 10) == 10) end)
run()
assert(top("chess", 10)[1] == "chess-player-1")

local st = profiles:stats()
print(("profiles stats: hits=%d misses=%d creations=%d stale_served=%d lock_waits=%d errors=%d")
      :format(st.hits, st.misses, st.creations, st.stale_served, st.lock_waits, st.errors))
print(("creator ran %d times in all, for %d requests"):format(creator_calls, 3 * N + 2))
