--- Hits inside a real nginx worker (nginx-extras; spec/ngx_support.lua starts
-- it with the fixture spec/fixtures/nginx, loading the dogpile modules of the
-- stage that LUA_PATH/LUA_CPATH name): dogpile regions against
-- ngx.shared.DICT:get, resty.lrucache and lua-resty-mlcache's L2 hit, all
-- measured in one request, in one worker (GET /bench, app.lua's bench()).
--
--   luajit bench/ngx_hit.lua [hits per loop] [repetitions] [rounds]
--
-- Run from the repository root with bench/ and spec/ on LUA_PATH (bench/run
-- does that). Rows (ROW lines, bench/lib.lua), median ns per hit over 1000 keys:
--   ngx_shm_get, ngx_shm_goc  shared_memory region:get / get_or_create of a
--                             16-byte string vs ngx.shared.DICT:get of one:
--                             target <= 0.5
--   ngx_shared_goc            ngx_shared region get_or_create vs DICT:get
--                             (the region over the DICT itself): target <= 2
--   ngx_memory_goc            memory region get_or_create vs resty.lrucache
--                             get (reference; hit.lua has the target row)
--   ngx_table                 shared_memory region:get of a 10-field record
--                             vs DICT:get of its JSON + cjson.decode (what
--                             mlcache's L2 hit does by default): target <= 0.4
local blib = require "lib"
local support = require "ngx_support"

local n = tonumber(arg and arg[1]) or blib.count(2e5, 1e4)
local reps = tonumber(arg and arg[2]) or (blib.quick and 3 or 5)
local rounds = tonumber(arg and arg[3]) or (blib.quick and 1 or 3)

local server = support.start()
local res = {}
local ok, err = pcall(function()
    -- Our own curl: the whole request can take longer than ngx_support's
    -- 20 s limit.
    local out = support.read(support.CURL .. " -s -m 600 -w '\\n%{http_code}' "
                             .. support.q(server:url(("/bench?n=%d&reps=%d&rounds=%d"):format(n, reps, rounds))))
    local body, code = out:match("^(.*)\n(%d+)$")
    assert(code == "200", "GET /bench failed: " .. out .. "\n" .. server:log())
    for line in body:gmatch("[^\n]+") do
        local name, med, lo, hi, good = line:match("^(%S+)\t(%S+)\t(%S+)\t(%S+)\t(%S+)$")
        assert(name, "bad line from /bench: " .. line)
        res[name] = { ns = tonumber(med), lo = tonumber(lo), hi = tonumber(hi), ok = good == "true" }
    end
end)
server:stop()
assert(ok, err)

local LABELS = {
    { "dict_get_str", "ngx.shared.DICT:get, 16-byte string" },
    { "shm_get_str", "shared_memory region:get, 16-byte string" },
    { "shm_goc_str", "shared_memory region:get_or_create hit, 16-byte string" },
    { "ngx_shared_goc_str", "ngx_shared region:get_or_create hit, 16-byte string" },
    { "lrucache_get", "resty.lrucache:get (number)" },
    { "memory_goc", "memory region:get_or_create hit (number)" },
    { "dict_json_decode", "DICT:get + cjson.decode, 10-field record (mlcache L2)" },
    { "shm_get_record", "shared_memory region:get, 10-field record" },
}
print(("hits in one nginx worker, one request: %d hits per loop over 1000 keys, median of %d"
       .. " (%d rounds of %d, the paths taking turns)"):format(n, reps * rounds, rounds, reps))
local failed = false
for _, l in ipairs(LABELS) do
    local r = res[l[1]]
    if r then
        print(("  %-56s %8.1f ns/hit  (%.1f-%.1f)%s"):format(l[2], r.ns, r.lo, r.hi,
                                                             r.ok and "" or "  WRONG CHECKSUM"))
        failed = failed or not r.ok
    else
        print(("  %-56s missing from /bench"):format(l[2]))
        failed = true
    end
end

local function ns(name)
    return res[name] and res[name].ns
end
blib.row("ngx_shm_get", "nginx: shared_memory region:get, 16-byte string", ns("shm_get_str"),
         "ns/op", "ngx.shared.DICT:get", ns("dict_get_str"), "<=0.5")
blib.row("ngx_shm_goc", "nginx: shared_memory get_or_create hit, 16-byte string", ns("shm_goc_str"),
         "ns/op", "ngx.shared.DICT:get", ns("dict_get_str"), "<=0.5")
blib.row("ngx_shared_goc", "nginx: ngx_shared get_or_create hit, 16-byte string",
         ns("ngx_shared_goc_str"), "ns/op", "ngx.shared.DICT:get", ns("dict_get_str"), "<=2")
blib.row("ngx_memory_goc", "nginx: memory region get_or_create hit", ns("memory_goc"), "ns/op",
         "resty.lrucache get", ns("lrucache_get"), "")
blib.row("ngx_table", "nginx: shared_memory region:get, 10-field record", ns("shm_get_record"),
         "ns/op", "mlcache L2 (DICT:get + cjson.decode)", ns("dict_json_decode"), "<=0.4")
if failed then
    io.stderr:write("ngx_hit: a loop missed (wrong checksum) or a path is missing\n")
    os.exit(1)
end
