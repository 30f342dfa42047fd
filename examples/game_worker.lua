-- The request loop of one game-server thread (examples/game_server.c loads
-- this file once per Lua state). It returns serve(requests), which runs
-- `sessions` coroutines under a small scheduler until they have served
-- `requests` in all, and returns this round's counters and the set of player
-- ids touched.
--
-- A request looks up a player's profile (the shared_memory region
-- "profiles"), then the player's guild (region "guilds", on the host's C
-- backend). Both creators query the slow database through host.db_query,
-- which yields to the scheduler; waiters for a lock yield too (the host set
-- dogpile's sleep hook), so one thread serves its other sessions meanwhile.
local host, regions, thread, players, sessions, db_ms = ...

local profiles, guilds = regions.profiles, regions.guilds
local db_query, now, block = host.db_query, host.now, host.block
local floor, exp, log, random = math.floor, math.exp, math.log, math.random
local co_create, co_resume, co_status = coroutine.create, coroutine.resume, coroutine.status
local sort, error = table.sort, error

local GUILDS = 32
local LOG_PLAYERS = log(players + 1)

math.randomseed(thread) -- each state has its own generator

local function load_profile(id)
    db_query("players", db_ms)
    return { id = id, name = "player" .. id, level = id % 60 + 1, guild = id % GUILDS + 1 }
end

local function load_guild(gid)
    db_query("guilds", db_ms)
    return { id = gid, name = "guild" .. gid, motto = "for the dogpile" }
end

-- Zipf-like ids: P(id <= k) = log(k + 1) / log(players + 1), so a few players
-- get most of the requests and many are asked for only now and then.
local function pick_player()
    return floor(exp(random() * LOG_PLAYERS))
end

local function session(n, seen)
    for _ = 1, n do
        local id = pick_player()
        local p = profiles:get_or_create("player:" .. id, load_profile, nil, nil, { id })
        local gid = p.guild
        local g = guilds:get_or_create("guild:" .. gid, load_guild, nil, nil, { gid })
        if p.id ~= id or g.id ~= gid then
            error(("thread %d: wrong value for player %d"):format(thread, id))
        end
        seen[id] = true
    end
end

-- The scheduler: a coroutine yields the monotonic time it wants to resume at
-- (host.sleep, host.db_query); when none is ready, the thread blocks until
-- the earliest.
local function by_wake(a, b) return a.at < b.at end

local function run(fns)
    local ready, sleeping = {}, {}
    for i, fn in ipairs(fns) do ready[i] = co_create(fn) end
    while #ready > 0 or #sleeping > 0 do
        if #sleeping > 0 then
            sort(sleeping, by_wake)
            if #ready == 0 then block(sleeping[1].at - now()) end
            local t, i = now(), 1
            while i <= #sleeping and sleeping[i].at <= t do i = i + 1 end
            for j = 1, i - 1 do ready[#ready + 1] = sleeping[j].co end
            local still = {}
            for j = i, #sleeping do still[#still + 1] = sleeping[j] end
            sleeping = still
        end
        local batch = ready
        ready = {}
        for _, co in ipairs(batch) do
            local ok, wake = co_resume(co)
            if not ok then error(wake, 0) end
            if co_status(co) ~= "dead" then
                sleeping[#sleeping + 1] = { co = co, at = wake or 0 }
            end
        end
    end
end

return function(requests)
    local p0, g0 = profiles:stats(), guilds:stats()
    local seen, fns = {}, {}
    for s = 1, sessions do
        local n = floor(requests * s / sessions) - floor(requests * (s - 1) / sessions)
        fns[s] = function() session(n, seen) end
    end
    run(fns)
    local p, g = profiles:stats(), guilds:stats()
    return {
        hits = p.hits - p0.hits,
        misses = p.misses - p0.misses,
        creations = p.creations - p0.creations,
        lock_waits = p.lock_waits - p0.lock_waits,
        evictions = p.evictions,
        guild_hits = g.hits - g0.hits,
        guild_misses = g.misses - g0.misses,
        guild_creations = g.creations - g0.creations,
    }, seen
end
