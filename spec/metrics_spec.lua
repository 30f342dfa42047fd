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
