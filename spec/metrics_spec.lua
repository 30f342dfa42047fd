-- cache.metrics(): every configured region's counters in the Prometheus text
-- exposition format (version 0.0.4).
local cache = require "dogpile.cache"
local support = require "support"

local FAMILIES = { "hits", "misses", "creations", "stale_served", "lock_waits", "errors",
                   "evictions", "lock_overruns" }

-- The sample of `family` for the region labelled `label` (already escaped).
local function sample(text, family, label)
    for line in text:gmatch("[^\n]+") do
        local f, l, v = line:match('^dogpile_cache_([%w_]+)_total{region="(.-)"} (%S+)$')
        if f == family and l == label then
            return tonumber(v)
        end
    end
    return nil
end

describe("cache.metrics", function()
    support.no_leaks()

    it("has a HELP and a TYPE counter line for every family, before its samples", function()
        local r = cache.make_region({ name = "metrics-families" }):configure("dogpile.cache.memory")
        local text = cache.metrics()
        assert.are.equal("\n", text:sub(-1))
        for _, f in ipairs(FAMILIES) do
            local name = "dogpile_cache_" .. f .. "_total"
            local help = text:find("# HELP " .. name .. " ", 1, true)
            local typ = text:find("# TYPE " .. name .. " counter\n", 1, true)
            local first = text:find("\n" .. name .. "{", 1, true)
            assert.is_truthy(help, name)
            assert.is_truthy(typ and help < typ and typ < first, name)
            assert.are.equal(0, sample(text, f, "metrics-families"))
        end
        -- Every line is a comment or a sample.
        for line in text:gmatch("[^\n]*\n") do
            assert.is_truthy(line:match("^# HELP dogpile_cache_[%w_]+_total %S") or
                             line:match("^# TYPE dogpile_cache_[%w_]+_total counter\n$") or
                             line:match('^dogpile_cache_[%w_]+_total{region=".*"} %d+\n$'), line)
        end
        r:get("x")
    end)

    it("counts what the regions did", function()
        local r = cache.make_region({ name = "metrics-counts" }):configure("dogpile.cache.memory")
        r:get("a")
        r:get_or_create("a", function() return 1 end)
        r:get("a")
        r:get("a")
        local text = cache.metrics()
        assert.are.equal(2, sample(text, "hits", "metrics-counts"))
        assert.are.equal(2, sample(text, "misses", "metrics-counts"))
        assert.are.equal(1, sample(text, "creations", "metrics-counts"))
        for k, v in pairs(r:stats()) do
            assert.are.equal(v, sample(text, k, "metrics-counts"), k)
        end
    end)

    it("escapes label values and keeps every series unique", function()
        local a = cache.make_region({ name = 'we"ird\\na\nme' }):configure("dogpile.cache.memory")
        local b = cache.make_region({ name = "metrics-twice" }):configure("dogpile.cache.memory")
        local c = cache.make_region({ name = "metrics-twice" }):configure("dogpile.cache.memory")
        local u1 = cache.make_region():configure("dogpile.cache.memory")
        local u2 = cache.make_region():configure("dogpile.cache.memory")
        c:get("x")
        local text = cache.metrics()
        assert.are.equal(0, sample(text, "hits", 'we\\"ird\\\\na\\nme'))
        assert.are.equal(0, sample(text, "misses", "metrics-twice"))
        assert.are.equal(1, sample(text, "misses", "metrics-twice (2)"))
        local seen, unnamed = {}, 0
        for label in text:gmatch('dogpile_cache_hits_total{region="(.-)"}') do
            assert.is_nil(seen[label], "duplicate series " .. label)
            seen[label] = true
            if label:match("^%(unnamed %d+%)$") then
                unnamed = unnamed + 1
            end
        end
        assert.is_true(unnamed >= 2)
        assert.is_truthy(a and b and u1 and u2)
    end)

    it("lists only configured regions, and lets regions be collected", function()
        local r = cache.make_region({ name = "metrics-unconfigured" })
        assert.is_nil(cache.metrics():find("metrics-unconfigured", 1, true))
        r:configure("dogpile.cache.memory")
        assert.is_truthy(cache.metrics():find('region="metrics-unconfigured"', 1, true))
        r = nil
        cache.make_region({ name = "metrics-dropped" }):configure("dogpile.cache.memory")
        collectgarbage()
        collectgarbage()
        local text = cache.metrics()
        assert.is_nil(text:find("metrics-unconfigured", 1, true))
        assert.is_nil(text:find("metrics-dropped", 1, true))
    end)

    it("exports a tiered region's hits per tier with a tier label", function()
        local r = cache.make_region({ name = "metrics-tiered" }):configure("dogpile.cache.tiered", {
            arguments = { tiers = {
                { backend = "dogpile.cache.memory" },
                { backend = "dogpile.cache.shared_memory", arguments = { name = "metrics_spec_tiered" } },
            } } })
        r:set("a", 1)
        r:get("a") -- served by tier 1
        local th = r:stats().tier_hits
        assert.is_table(th)
        local text = cache.metrics()
        assert.is_truthy(text:find("# TYPE dogpile_cache_tier_hits_total counter\n", 1, true))
        for t = 1, #th do
            local line = ('dogpile_cache_tier_hits_total{region="metrics-tiered",tier="%d"} %d'):format(t, th[t])
            assert.is_truthy(text:find(line, 1, true), line .. " in\n" .. text)
        end
        assert.is_true(th[1] >= 1)
    end)
    it("exports latency histograms per region with cumulative Prometheus buckets", function()
        local latency = require "dogpile.cache.latency"
        local r = cache.make_region({ name = "metrics-latency" }):configure("dogpile.cache.memory")
        local other = cache.make_region({ name = "metrics-quiet" }):configure("dogpile.cache.memory")
        for _, s in ipairs({ 0.0000005, 0.000003, 0.000003, 0.0002, 0.02, 20 }) do
            latency.observe(r, "create", s)
        end
        latency.observe(r, "get", 0.000001) -- on a bound: counted in that bucket (le)
        local text = cache.metrics()
        assert.is_truthy(text:find("# TYPE dogpile_cache_create_seconds histogram\n", 1, true))
        assert.is_truthy(text:find("# TYPE dogpile_cache_get_seconds histogram\n", 1, true))
        local want = { ["1e-06"] = 1, ["5e-06"] = 3, ["1e-05"] = 3, ["5e-05"] = 3, ["0.0001"] = 3,
                       ["0.0005"] = 4, ["0.001"] = 4, ["0.005"] = 4, ["0.01"] = 4, ["0.05"] = 5,
                       ["0.1"] = 5, ["0.5"] = 5, ["1"] = 5, ["5"] = 5, ["10"] = 5, ["+Inf"] = 6 }
        local les, prev = {}, -1
        for le, v in text:gmatch('dogpile_cache_create_seconds_bucket{region="metrics%-latency",le="([^"]+)"} (%d+)\n') do
            les[#les + 1] = le
            assert.are.equal(want[le], tonumber(v), le)
            assert.is_true(tonumber(v) >= prev, "buckets are cumulative, in order of le")
            prev = tonumber(v)
        end
        assert.are.equal(16, #les)
        assert.are.equal("+Inf", les[16])
        assert.are.equal(6, tonumber(text:match('dogpile_cache_create_seconds_count{region="metrics%-latency"} (%S+)')))
        local sum = tonumber(text:match('dogpile_cache_create_seconds_sum{region="metrics%-latency"} (%S+)'))
        assert.is_true(math.abs(sum - 20.0202065) < 1e-9, tostring(sum))
        assert.are.equal(1, tonumber(text:match('dogpile_cache_get_seconds_bucket{region="metrics%-latency",le="1e%-06"} (%d+)')))
        -- A region that recorded nothing has no histogram series.
        assert.is_nil(text:find('_seconds_count{region="metrics-quiet"}', 1, true))
        -- HELP and TYPE once per family, before its first sample.
        local _, n = text:gsub("# TYPE dogpile_cache_create_seconds histogram", "")
        assert.are.equal(1, n)
        assert.is_truthy(other)
    end)

    it("refuses a dict outside nginx, and options that are not a table", function()
        assert.has_error(function() cache.metrics("x") end)
        local ok, err = pcall(cache.metrics, { dict = "dogpile_metrics" })
        assert.is_false(ok)
        assert.is_truthy(tostring(err):find("dict works inside nginx only", 1, true), err)
        ok, err = pcall(cache.metrics_sync, { dict = "dogpile_metrics" })
        assert.is_false(ok)
        assert.is_truthy(tostring(err):find("inside nginx only", 1, true), err)
    end)

    it("records every creation's duration in the create histogram", function()
        local r = cache.make_region({ name = "metrics-creates" }):configure("dogpile.cache.memory")
        r:get_or_create("a", function()
            require("dogpile.lib").C.dp_clock_sleep(0.02)
            return 1
        end)
        r:get_or_create("a", function() return 2 end) -- a hit: not a creation
        r:get_or_create_multi({ "b", "c" }, function() return { 3, 4 } end)
        local text = cache.metrics()
        assert.are.equal(2, tonumber(text:match('dogpile_cache_create_seconds_count{region="metrics%-creates"} (%S+)')))
        local sum = tonumber(text:match('dogpile_cache_create_seconds_sum{region="metrics%-creates"} (%S+)'))
        assert.is_true(sum >= 0.02 and sum < 5, tostring(sum))
        -- configure starts the histograms again with the other counters
        r:configure("dogpile.cache.memory", { replace_existing_backend = true })
        assert.is_nil(cache.metrics():match('dogpile_cache_create_seconds_count{region="metrics%-creates"} [1-9]'))
    end)
end)

-- The get histogram (issue 20): every read strategy samples its lookups,
-- about one in latency.SAMPLE_EVERY of this Lua state's lookups, at a
-- countdown drawn between a half and one and a half times that.
describe("the get latency histogram", function()
    support.no_leaks()
    local latency = require "dogpile.cache.latency"
    local ProxyBackend = require("dogpile.cache.proxy").ProxyBackend
    local EVERY = latency.SAMPLE_EVERY

    cache.register_backend("spec.metrics_front", function() return support.front_backend() end)
    cache.register_backend("spec.metrics_plain", "fixtures.dict_backend")

    -- name, configure's backend and options, the read strategy it must get
    local BACKENDS = {
        { "memory", "dogpile.cache.memory", { expiration_time = 60 }, "memory" },
        { "memory, early_refresh", "dogpile.cache.memory",
          { expiration_time = 60, early_refresh = 1 }, "memory" },
        { "memory LRU", "dogpile.cache.memory",
          { expiration_time = 60, arguments = { max_items = 100 } }, "direct" },
        { "shared_memory", "dogpile.cache.shared_memory",
          { expiration_time = 60, arguments = { name = "metrics_spec_hist" } }, "c" },
        { "a front table", "spec.metrics_front", { expiration_time = 60 }, "front" },
        { "a Lua backend of its own", "spec.metrics_plain", { expiration_time = 60 }, "generic" },
        { "memory behind a proxy", "dogpile.cache.memory",
          { expiration_time = 60, wrap = { ProxyBackend } }, "generic" },
        { "tiered", "dogpile.cache.tiered",
          { expiration_time = 60, arguments = { tiers = {
              { backend = "dogpile.cache.memory" },
              { backend = "dogpile.cache.shared_memory", arguments = { name = "metrics_spec_tier" } },
          } } }, nil },
    }

    -- The get histogram's series of `label` in cache.metrics(): buckets in
    -- the order written, count and sum.
    local function get_series(label)
        local text = cache.metrics()
        local esc = label:gsub("%p", "%%%0")
        local buckets = {}
        for le, v in text:gmatch('dogpile_cache_get_seconds_bucket{region="' .. esc
                                 .. '",le="([^"]+)"} (%d+)\n') do
            buckets[#buckets + 1] = { le = le, n = tonumber(v) }
        end
        local count = tonumber(text:match('dogpile_cache_get_seconds_count{region="' .. esc
                                          .. '"} (%S+)'))
        local sum = tonumber(text:match('dogpile_cache_get_seconds_sum{region="' .. esc
                                        .. '"} (%S+)'))
        return buckets, count, sum
    end

    local function check_series(label, want_count)
        local buckets, count, sum = get_series(label)
        assert.are.equal(#latency.BOUNDS + 1, #buckets, label)
        local prev = 0
        for i, b in ipairs(buckets) do
            assert.are.equal(i <= #latency.BOUNDS and ("%g"):format(latency.BOUNDS[i]) or "+Inf",
                             b.le, label)
            assert.is_true(b.n >= prev, label .. ": buckets are cumulative, in order of le")
            prev = b.n
        end
        assert.are.equal(count, buckets[#buckets].n, label .. ": +Inf is the count")
        if want_count then
            assert.are.equal(want_count, count, label)
        end
        assert.is_true(sum > 0 and sum < count, label .. ": the sum is seconds, got "
                       .. tostring(sum))
        return count
    end

    for _, b in ipairs(BACKENDS) do
        it("grows with get and get_or_create, hits and misses, on " .. b[1], function()
            local label = "metrics-get-" .. b[1]
            local r = cache.make_region({ name = label }):configure(b[2], b[3])
            if b[4] then
                assert.are.equal(b[4], r._reader, "read strategy")
            end
            for i = 1, 50 do
                r:set("k" .. i, i)
            end
            -- Each round: 4 lookups per key, hits and misses of both calls.
            local n, counts = 0, {}
            for round = 1, 3 do
                for _ = 1, 2 * EVERY / 50 do
                    for i = 1, 50 do
                        assert.are.equal(i, r:get("k" .. i))
                        assert.are.equal(i, r:get_or_create("k" .. i, error))
                        assert.are.equal(cache.NO_VALUE, r:get("absent" .. i))
                        r:get_or_create("new" .. round .. ":" .. i, function() return i end)
                        n = n + 4
                    end
                end
                counts[round] = check_series(label)
                -- Every countdown is at least EVERY/2 and less than 3*EVERY/2.
                assert.is_true(counts[round] >= math.floor(n / (1.5 * EVERY)) - 1,
                               label .. ": " .. counts[round] .. " samples of " .. n .. " lookups")
                assert.is_true(counts[round] <= n / (0.5 * EVERY) + 1,
                               label .. ": " .. counts[round] .. " samples of " .. n .. " lookups")
                if round > 1 then
                    assert.is_true(counts[round] > counts[round - 1], label .. ": the count grows")
                end
            end
            -- The creations went to the create histogram, not to this one:
            -- 50 keys created per round (a sample of the lookup of a miss is
            -- one sample, and only the lookup is timed).
            local text = cache.metrics()
            local esc = label:gsub("%p", "%%%0")
            assert.are.equal(150, tonumber(text:match('dogpile_cache_create_seconds_count{region="'
                                                      .. esc .. '"} (%S+)')))
        end)
    end

    it("counts misses alone too (a region that never hits)", function()
        local r = cache.make_region({ name = "metrics-get-misses" }):configure("dogpile.cache.null")
        for i = 1, 4 * EVERY do
            r:get("k" .. i)
        end
        local count = check_series("metrics-get-misses")
        assert.is_true(count >= 2, tostring(count))
        assert.are.equal(0, r:stats().hits)
    end)

    it("has no series for a region configured with the sampling off", function()
        local was = latency.set_sampling(false)
        local ok, r = pcall(function()
            return cache.make_region({ name = "metrics-get-off" }):configure("dogpile.cache.memory")
        end)
        latency.set_sampling(was)
        assert(ok, r)
        r:set("k", 1)
        for _ = 1, 4 * EVERY do
            r:get("k")
        end
        local _, count = get_series("metrics-get-off")
        assert.is_nil(count)
        assert.are.equal(4 * EVERY, r:stats().hits)
    end)

    it("puts each duration in the first bucket whose bound is not below it", function()
        local B = latency.BOUNDS
        for i, bound in ipairs(B) do
            assert.are.equal(i, latency.bucket(bound), "on the bound " .. bound)
            assert.are.equal(i, latency.bucket(bound * (1 - 1e-12)), "just under " .. bound)
            assert.are.equal(i + 1, latency.bucket(bound * (1 + 1e-12)), "just over " .. bound)
        end
        assert.are.equal(1, latency.bucket(0))
        assert.are.equal(#B + 1, latency.bucket(1e9))
        assert.are.equal(#B + 1, latency.bucket(math.huge))
    end)
end)

-- The timed lookup is a side trace of the hit loop (and makes the region's
-- histogram on the first sample): it must compile as the hit does, with no
-- trace abort. jit_spec's loops are too short for a sample's exit to become
-- hot, so this runs enough lookups for several dozen samples.
describe("a hit loop with its lookups sampled", function()
    support.no_leaks()
    local jit = require "jit"
    local jutil = require "jit.util"
    local vmdef = require "jit.vmdef"
    local format, tostring, pcall, type = string.format, tostring, pcall, type
    local latency = require "dogpile.cache.latency"
    local EVERY = latency.SAMPLE_EVERY
    local NKEYS, N = 1000, 40 * EVERY
    local KEYS = {}
    for i = 1, NKEYS do
        KEYS[i] = "key:" .. i
    end
    -- A local function: a global looked up through busted's environment
    -- is a metamethod call the trace compiler does not follow.
    local function creator()
        return -1e9
    end

    -- Run loop() with the trace compiler watched; the aborts' texts.
    local function aborts_of(loop)
        local aborts = {}
        local function on_trace(what, tr, func, pc, otr, oex)
            if what == "abort" then
                local fi = func and jutil.funcinfo(func, pc) or {}
                local reason = vmdef.traceerr[otr] or tostring(otr)
                if type(oex) == "function" then
                    oex = jutil.funcinfo(oex).loc
                end
                local ok, msg = pcall(format, reason, oex)
                aborts[#aborts + 1] = format("%s at %s", ok and msg or reason, tostring(fi.loc))
            end
        end
        jit.flush()
        jit.opt.start("hotloop=56")
        jit.attach(on_trace, "trace")
        local ok, err = pcall(loop)
        jit.attach(on_trace)
        assert(ok, err)
        return aborts
    end

    local CASES = {
        { "memory", "dogpile.cache.memory", { expiration_time = 3600 } },
        { "shared_memory", "dogpile.cache.shared_memory",
          { expiration_time = 3600, arguments = { name = "metrics_spec_jit" } } },
    }
    for _, c in ipairs(CASES) do
        for _, call in ipairs({ "get", "get_or_create" }) do
            it("compiles with no trace abort: " .. call .. " on " .. c[1], function()
                local r = cache.make_region({ name = "metrics-jit-" .. c[1] .. call })
                    :configure(c[2], c[3])
                for i = 1, NKEYS do
                    r:set(KEYS[i], i + 0.5)
                end
                local acc = 0
                local aborts = aborts_of(function()
                    local a = 0
                    if call == "get" then
                        for i = 1, N do
                            a = a + r:get(KEYS[i % NKEYS + 1])
                        end
                    else
                        for i = 1, N do
                            a = a + r:get_or_create(KEYS[i % NKEYS + 1], creator)
                        end
                    end
                    acc = a
                end)
                assert.are.equal(0, #aborts, table.concat(aborts, "\n"))
                assert.is_true(acc > 0)
                local h = latency.of(r)
                assert.is_truthy(h and h.get, "the loop's lookups were sampled")
                assert.is_true(h.get.count >= N / (1.5 * EVERY) - 1, tostring(h.get.count))
            end)
        end
    end
end)
