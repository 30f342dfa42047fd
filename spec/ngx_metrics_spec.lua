-- cache.metrics() inside a real nginx (nginx-extras, 2 workers,
-- spec/fixtures/nginx_metrics): each worker pushes its counters to a
-- lua_shared_dict (metrics_sync), so that a scrape answered by either worker
-- is the sum over both, and successive scrapes never go backwards; or every
-- worker's series with a worker label; or, without the dict, the answering
-- worker's own, labelled.
local ngx_support = require "ngx_support"
local support = require "support"

local function samples(text, family)
    local out = {}
    for line in text:gmatch("[^\n]+") do
        local labels, v = line:match("^" .. family .. "{(.-)} (%S+)$")
        if labels then
            out[labels] = tonumber(v)
        end
    end
    return out
end

describe("cache.metrics inside nginx with 2 workers", function()
    local srv

    setup(function()
        assert(ngx_support.available(), "nginx-extras with the Lua module is needed "
               .. "(.ci/test installs it)")
        srv = ngx_support.start({ fixture = "nginx_metrics", ready = "/ready" })
    end)

    teardown(function()
        if srv then
            srv:stop()
        end
    end)

    it("sums every worker's counters, and successive scrapes never decrease", function()
        local requests, workers = 0, {}
        local last = {}
        local scrapes = 0
        for round = 1, 8 do
            -- 40 lookups at once, over new connections: both workers answer.
            local res = srv:concurrent("/user?key=k" .. (round % 3), 40)
            for _, r in ipairs(res) do
                assert.are.equal(200, r.status, r.body)
                workers[r.body:match(" (%d+)$")] = true
                requests = requests + 1
            end
            for _ = 1, 4 do
                local text, status = srv:get("/metrics")
                assert.are.equal(200, status, text)
                scrapes = scrapes + 1
                for _, fam in ipairs({ "dogpile_cache_hits_total", "dogpile_cache_misses_total",
                                       "dogpile_cache_creations_total" }) do
                    for labels, v in pairs(samples(text, fam)) do
                        assert.is_nil(labels:find("worker=", 1, true), labels)
                        local key = fam .. "{" .. labels .. "}"
                        assert.is_true(v >= (last[key] or 0),
                                       key .. " went from " .. tostring(last[key]) .. " to " .. v)
                        last[key] = v
                    end
                end
            end
        end
        assert.is_true(workers["0"] and workers["1"], "both workers answered")
        assert.are.equal(32, scrapes)
        -- Once every worker has pushed (interval 0.2 s), the sum is exact:
        -- each request looked its key up once.
        support.sleep(0.5)
        local text = srv:get("/metrics")
        local hits = samples(text, "dogpile_cache_hits_total")['region="users"']
        local misses = samples(text, "dogpile_cache_misses_total")['region="users"']
        assert.are.equal(requests, hits + misses, text)
        -- One creation per key and worker at most (memory: per worker).
        local creations = samples(text, "dogpile_cache_creations_total")['region="users"']
        assert.is_true(creations >= 3 and creations <= 6, tostring(creations))
        assert.are.equal(0, samples(text, "dogpile_cache_hits_total")['region="pages"'])
    end)

    it("labels every worker's series with per_worker, adding up to the sum", function()
        srv:concurrent("/user?key=pw", 20)
        support.sleep(0.5)
        local sum = samples(srv:get("/metrics"), "dogpile_cache_hits_total")['region="users"']
        local per = samples(srv:get("/metrics_per_worker"), "dogpile_cache_hits_total")
        local w0, w1 = per['region="users",worker="0"'], per['region="users",worker="1"']
        assert.is_truthy(w0 and w1, "a series per worker")
        assert.are.equal(sum, w0 + w1)
    end)

    it("labels the answering worker's own series when no dict is given", function()
        local seen = {}
        for _ = 1, 20 do
            local text = srv:get("/metrics_local")
            local n = 0
            for labels in pairs(samples(text, "dogpile_cache_hits_total")) do
                local w = labels:match('worker="(%d+)"')
                assert.is_truthy(w, labels)
                seen[w] = true
                n = n + 1
            end
            assert.are.equal(2, n) -- users and pages, of one worker
        end
        assert.is_truthy(next(seen))
    end)

    it("sums the latency histograms over the workers", function()
        local before = samples(srv:get("/metrics"), "dogpile_cache_create_seconds_count")
        local n0 = before['region="users"'] or 0
        local res = srv:concurrent("/observe?s=0.003", 30)
        local workers = {}
        for _, r in ipairs(res) do
            assert.are.equal(200, r.status)
            workers[r.body] = true
        end
        support.sleep(0.5)
        local text = srv:get("/metrics")
        assert.is_truthy(text:find("# TYPE dogpile_cache_create_seconds histogram\n", 1, true))
        assert.are.equal(n0 + 30, samples(text, "dogpile_cache_create_seconds_count")['region="users"'])
        local b = samples(text, "dogpile_cache_create_seconds_bucket")
        assert.are.equal(n0 + 30, b['region="users",le="0.005"'])
        assert.are.equal(n0 + 30, b['region="users",le="+Inf"'])
        assert.is_true(workers["0"] and workers["1"] or false, "both workers observed")
    end)
end)
