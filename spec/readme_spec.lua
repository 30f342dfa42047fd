-- The README's examples run as written (issue 20 item 6). Every ```lua block,
-- and the Lua of every *_by_lua_block in an ```nginx block, is classified
-- below by its section's heading and its place in the section; a block
-- without a class fails, so a new example cannot go untested.
--
-- Every block is compiled, and the globals it reads must be Lua's own, set
-- by a block of the same nginx.conf (REGIONS), `ngx` inside nginx, or
-- defined by the block's prelude, which stands for what the text leaves to
-- the reader (a loader of their own, `mutex` of Lock.new's signature) and
-- says so. A function the reader cannot find (the `load_user_from_db` an
-- nginx.conf once called) fails here. Every module a block requires must be
-- this library's, Lua's, or a file the README gives (users.lua).
--
-- Blocks run, each in its own luajit under a guard that raises on any
-- undefined global: a file (regions.lua) is written out and loaded by the
-- block that loads it, a script (warm_users.lua) runs with its arguments and
-- prints what the README says. The nginx.confs run in nginx (Debian's
-- nginx-extras), after the others, and must answer what the README says
-- (OpenResty's serves user 7 from a stand-in users service once, then from
-- the cache; the fleet's serves the users the batch job put in Redis); the
-- Metrics fragment of http {} runs inside the least nginx.conf around it.
-- The only rewrites are paths (/etc/nginx/lua/..., /var/cache/myapp: to a
-- temporary directory), addresses (Redis: to a redis-server this spec
-- starts on a free port with the README's password; the users service
-- 10.0.0.9:8081: to the stand-in; nginx's listen port) and nginx's package
-- paths (to this build). Servers the examples only configure (memcached,
-- Redis Cluster, 10.0.0.x) are never connected to: configure is lazy.
--
-- DP_README=path checks another copy of the README (a proposed text).
local support = require "support"

local sh, read, write = support.sh, support.read, support.write

local README = os.getenv("DP_README") or "README.md"

-- Tools that must not inherit the sanitizer preload of the ASan run (curl
-- hangs with it, as spec/ngx_support.lua says).
local BARE = "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS "

-- -- The blocks ---------------------------------------------------------------

-- Every ```lua block, and each *_by_lua_block of every ```nginx block:
-- {key = "<heading> #<n>", line = first line in the README, lang, src,
-- chunks = {...} for nginx: {directive, line, src}}.
local function blocks_of(text)
    local lines = {}
    for l in (text .. "\n"):gmatch("([^\n]*)\n") do
        lines[#lines + 1] = l
    end
    local out, heading, ordinal = {}, "(top)", {}
    local i = 1
    while i <= #lines do
        local l = lines[i]
        heading = l:match("^#+%s+(.-)%s*$") or heading
        local lang = l:match("^```(%S*)")
        if lang then
            local first, body = i + 1, {}
            i = i + 1
            while lines[i] and not lines[i]:match("^```%s*$") do
                body[#body + 1] = lines[i]
                i = i + 1
            end
            if lang == "lua" or lang == "nginx" then
                ordinal[heading] = (ordinal[heading] or 0) + 1
                out[#out + 1] = { key = heading .. " #" .. ordinal[heading], line = first, lang = lang,
                                  src = table.concat(body, "\n") }
            end
        end
        i = i + 1
    end
    return out
end

-- The Lua of each `NAME_by_lua_block { ... }` of an nginx.conf, its braces
-- matched (Lua's own braces balance in the README's blocks).
local function lua_of_nginx(block)
    local chunks, src = {}, block.src
    for at, directive, open in src:gmatch("()([%w_]+_by_lua_block)%s*(){") do
        local depth, j = 0, open
        repeat
            local c = src:sub(j, j)
            if c == "{" then
                depth = depth + 1
            elseif c == "}" then
                depth = depth - 1
            end
            j = j + 1
        until depth == 0 or j > #src
        assert(depth == 0, ("%s:%d (%s): %s is not closed"):format(README, block.line, block.key, directive))
        local _, nl = src:sub(1, at):gsub("\n", "")
        chunks[#chunks + 1] = { directive = directive, line = block.line + nl, src = src:sub(open + 1, j - 2) }
    end
    return chunks
end

-- -- The classes -----------------------------------------------------------------

-- A fresh region where the text configures "a region" it has not made.
local FRESH = 'local cache = require "dogpile.cache"\nlocal region = cache.make_region()\n'
local CACHE = 'local cache = require "dogpile.cache"\n'

-- kind: "run" (a chunk, run once), "file" (written out as `file`; loaded by
-- another block, or by load_regions when `load`), "script" (run with `args`),
-- "nginx" (an nginx.conf, started after every other block ran, then asked
-- `requests` = {path, status, body}; `service_hits`: how often the stand-in
-- users service was asked each path), "static" (compiled and checked only;
-- `why`).
-- after: blocks whose source comes first (a continuation: their locals hold).
-- prelude: Lua put before the block, with `why`.
-- rewrite: {old, new} plain replacements, each of which must match.
-- expect: what the block prints; check(redis_cli): what must hold after.
-- ngx: the block may read the global `ngx` (it runs inside nginx, or asks
-- whether it does). regions_from_comment: the regions file the block's
-- comment shows ("-- /etc/nginx/lua/regions.lua returns" then the table),
-- written out as that path.
local CLASSES = {
    ["Regions from a config file #1"] = { kind = "file", file = "regions.lua" },
    ["Regions from a config file #2"] = {
        kind = "run",
        rewrite = { { '"regions.lua"', '"@TMP@/regions.lua"' } },
        prelude = 'local function load_profile() return { name = "ada" } end\n',
        why = "load_profile is the reader's own loader",
    },
    ["The API by example #1"] = {
        kind = "run",
        prelude = 'local a, b = { name = "ada" }, { name = "bob" }\n'
            .. 'local function load_user(id) return { id = id } end\n'
            .. 'local function load_user_by_key(key) return { key = key } end\n'
            .. 'local function fetch_token() return "token" end\n',
        why = "a, b, load_user, load_user_by_key and fetch_token are the reader's values and loaders",
    },
    ["The API by example #2"] = {
        kind = "run",
        after = { "The API by example #1" },
        prelude = "local function db_load_user(id) return { id = id } end\n"
            .. 'local value = { name = "ada" }\n',
        why = "db_load_user and value are the reader's; region is the previous example's",
    },
    ["Coroutines, threads and waiting #1"] = {
        kind = "run",
        prelude = "local scheduler = { sleep = function() coroutine.yield() end }\n",
        why = "scheduler is the host's",
    },
    ["Coroutines, threads and waiting #2"] = {
        kind = "run",
        after = { "Coroutines, threads and waiting #1" },
    },
    ["Coroutines, threads and waiting #3"] = {
        kind = "run",
        after = { "Coroutines, threads and waiting #1" },
        prelude = "local stored\n"
            .. "local mutex = { acquire = function() return true end, release = function() end }\n"
            .. "local function creator() stored = 42; return 42 end\n"
            .. "local function value_and_created_fn()\n"
            .. "    if stored == nil then error(dogpile.NeedRegenerationException) end\n"
            .. "    return stored, os.time()\n"
            .. "end\n"
            .. "local expiretime, async_creator = 60, nil\n",
        why = "the arguments of Lock.new's signature, as the text names them",
        epilogue = "assert(value == 42, 'lock:enter() returned ' .. tostring(value))\n",
    },
    ["Async regeneration #1"] = {
        kind = "run",
        prelude = CACHE .. "local scheduler = { spawn = function(fn) fn() end }\nlocal log = print\n",
        why = "scheduler and log are the host's",
    },
    ["A TTL per value #1"] = {
        kind = "run",
        after = { "The API by example #1" },
        prelude = 'local function fetch_token() return { access = "x", expires_in = 3600 } end\n'
            .. "local cfg = { motd = true }\n",
        why = "fetch_token and cfg are the reader's",
        expect = "3540\n",
    },
    ["`return nil, err` #1"] = {
        kind = "run",
        after = { "The API by example #1" },
        prelude = 'local id = 7\nlocal db = { query_user = function() return nil, "no such user" end }\n',
        why = "db and id are the reader's",
        epilogue = 'assert(ok == false and tostring(user):find("no such user", 1, true), tostring(user))\n',
    },
    ["Negative caching: `negative_expiration_time` #1"] = {
        kind = "run", prelude = FRESH, why = "a region not configured yet",
    },
    ["`stale_if_error` #1"] = { kind = "run", prelude = FRESH, why = "a region not configured yet" },
    ["`early_refresh` (XFetch) #1"] = { kind = "run", prelude = FRESH, why = "a region not configured yet" },
    ["dogpile.cache.shared_memory #1"] = { kind = "run", prelude = CACHE, why = "cache is dogpile.cache" },
    ["dogpile.cache.lmdb #1"] = {
        kind = "run", prelude = CACHE, why = "cache is dogpile.cache",
        rewrite = { { '"/var/cache/myapp"', '"@TMP@/myapp"' } },
    },
    ["dogpile.cache.redis #1"] = { kind = "run", prelude = CACHE, why = "cache is dogpile.cache" },
    ["dogpile.cache.redis_cluster #1"] = { kind = "run", prelude = FRESH, why = "a region not configured yet" },
    ["dogpile.cache.memcached #1"] = { kind = "run", prelude = CACHE, why = "cache is dogpile.cache" },
    ["Writing a backend in Lua #1"] = {
        kind = "run",
        epilogue = 'local r = cache.make_region():configure("myapp.table")\n'
            .. 'r:set("k", 1)\nassert(r:get("k") == 1)\n',
    },
    ["Writing a backend in Lua #2"] = { kind = "run", prelude = FRESH, why = "a region not configured yet" },
    ["Tiers #1"] = { kind = "run", prelude = CACHE, why = "cache is dogpile.cache" },
    -- Two tiered layouts of http {} (no server block to ask): their regions
    -- name a Redis at 10.0.0.5 and /var/cache/nginx, which spec/ngx_tiered_spec.lua
    -- runs for real (a root master, workers as nobody).
    ["Layouts #1"] = { kind = "static", why = "a fragment of http {}; spec/ngx_tiered_spec.lua runs both layouts" },
    -- Run in nginx, its regions.lua the one its comment shows, its creator
    -- (the next block) asking a stand-in users service on a free port.
    ["OpenResty #1"] = {
        kind = "nginx",
        regions_from_comment = "lua/regions.lua",
        rewrite = {
            { '"/usr/local/share/lua/5.1/?.lua;/etc/nginx/lua/?.lua;;"', '"@LUA_PATH@;@TMP@/lua/?.lua;;"' },
            { '"/usr/local/lib/lua/5.1/?.so;;"', '"@LUA_CPATH@;;"' },
            { '"/etc/nginx/lua/regions.lua"', '"@TMP@/lua/regions.lua"' },
            { "listen 8080;", "listen 127.0.0.1:@NGX_PORT@;" },
        },
        requests = {
            { "/user?id=7", 200, "@USER_7@" },
            { "/user?id=7", 200, "@USER_7@" },      -- from the cache: the service is asked once
            { "/user?id=x", 400 },
            { "/purge", 200 },
        },
        service_hits = { ["/users/7"] = 1 },
    },
    ["OpenResty #2"] = {
        kind = "file", file = "lua/users.lua", ngx = true,
        rewrite = { { 'sock:connect("10.0.0.9", 8081)', 'sock:connect("127.0.0.1", @USERS_PORT@)' } },
    },
    ["Redis across hosts: `dogpile.cache.redis` inside nginx #1"] = {
        kind = "file", file = "regions-fleet.lua", ngx = true,
        rewrite = { { "10.0.0.5:6379", "127.0.0.1:@REDIS_PORT@" } },
    },
    -- Run in nginx after the batch job (#3) warmed Redis: user 1 is served
    -- from Redis, never asked of the users service, which does not know it.
    ["Redis across hosts: `dogpile.cache.redis` inside nginx #2"] = {
        kind = "nginx",
        rewrite = {
            { '"/usr/local/share/lua/5.1/?.lua;/etc/nginx/lua/?.lua;;"', '"@LUA_PATH@;@TMP@/lua/?.lua;;"' },
            { '"/usr/local/lib/lua/5.1/?.so;;"', '"@LUA_CPATH@;;"' },
            { '"/etc/nginx/lua/regions.lua"', '"@TMP@/regions-fleet.lua"' },
            { "listen 8080;", "listen 127.0.0.1:@NGX_PORT@;" },
        },
        requests = {
            { "/health", 200, "ok" },
            { "/user?id=1", 200, '{"name":"ada"}' },
            { "/user?id=2", 200, '{"name":"bob"}' },
        },
        service_hits = { ["/users/1"] = 0, ["/users/2"] = 0 },
    },
    ["Redis across hosts: `dogpile.cache.redis` inside nginx #3"] = {
        kind = "script", args = { "@TMP@/users.tsv" },
        rewrite = { { '"/etc/nginx/lua/regions.lua"', '"@TMP@/regions-fleet.lua"' } },
        expect = "warmed 2 users\n",
        check = function(redis_cli)
            assert.are.equal("2", redis_cli("EXISTS user:1 user:2"))
        end,
    },
    -- A fragment of http {}: run inside a minimal nginx.conf around it, its
    -- server given a port; a scrape answers in Prometheus's text format.
    ["Metrics #1"] = {
        kind = "nginx",
        wrap = "worker_processes 2;\n"
            .. "load_module /usr/lib/nginx/modules/ndk_http_module.so;\n"
            .. "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;\n"
            .. "events { worker_connections 64; }\n"
            .. 'http {\n    lua_package_path "@LUA_PATH@;;";\n    lua_package_cpath "@LUA_CPATH@;;";\n'
            .. "@BLOCK@\n}\n",
        rewrite = { { "server {", "server {\n    listen 127.0.0.1:@NGX_PORT@;" } },
        requests = {
            { "/metrics", 200, match = "^# HELP dogpile_" },
            { "/metrics", 200, match = "^# HELP dogpile_" },
        },
    },
    ["Sharing a cache with Python #1"] = { kind = "file", file = "regions-python.lua", load = true },
}

-- -- Checks ------------------------------------------------------------------------

-- The globals of a plain luajit.
local BASE = {}
for name in sh([[luajit -e 'for k in pairs(_G) do print(k) end']]):gmatch("[^\n]+") do
    BASE[name] = true
end

-- The globals a chunk reads and sets (luajit -bl over every function in it),
-- or nil and the compiler's message.
local function globals_of(src, tmp)
    write(tmp, src)
    local listing = sh("luajit -bl " .. tmp .. " 2>&1")
    if listing:match("^luajit:") or not listing:match("BYTECODE") then
        return nil, listing
    end
    local gets, sets = {}, {}
    for op, name in listing:gmatch('(G[GS]ET)%s[^\n]-; "([^"]+)"') do
        (op == "GGET" and gets or sets)[name] = true
    end
    return gets, sets
end

-- The modules a chunk requires by a literal name.
local function requires_of(src)
    local out = {}
    for name in src:gmatch("require%s*%(?%s*[\"']([%w_%.]+)[\"']") do
        out[#out + 1] = name
    end
    return out
end

-- Whether something listens on the loopback port (bash: /bin/sh has no /dev/tcp).
local function listening(port)
    return sh("bash -c 'exec 3<>/dev/tcp/127.0.0.1/" .. port .. "' 2>/dev/null && echo up") ~= ""
end

local function free_port()
    for _ = 1, 100 do
        local port = math.random(20000, 31999)
        if not listening(port) then
            return port
        end
    end
    error("no free port")
end

local run_nginx

describe("the README's examples", function()
    local blocks, tmp, redis_port, redis_pid, users_port, users_pid
    local PASSWORD = "s3cret"
    -- What the stand-in users service answers for user 7.
    local USER_7 = '{"id":7,"name":"ada"}'

    local function redis_cli(cmd)
        return (sh(("redis-cli -p %d -a %s --no-auth-warning %s"):format(redis_port, PASSWORD, cmd))
                :gsub("%s+$", ""))
    end

    setup(function()
        blocks = blocks_of(assert(read(README), "cannot read " .. README))
        tmp = (sh("mktemp -d /tmp/dogpile-readme-XXXXXX"):gsub("%s+$", ""))
        -- nginx's workers (nobody) read the Lua files written here.
        sh("chmod 755 " .. tmp .. " && mkdir -p " .. tmp .. "/lua " .. tmp .. "/users-service/users")
        math.randomseed(os.time() + math.floor(os.clock() * 1e6))
        write(tmp .. "/users-service/users/7", USER_7)
        users_port = free_port()
        users_pid = sh(("cd %s/users-service && { " .. BARE .. "python3 -m http.server %d --bind 127.0.0.1 "
                        .. ">%s/users-service.log 2>&1 & echo $!; }"):format(tmp, users_port, tmp)):match("%d+")
        local ready = false
        for _ = 1, 20 do
            local port = free_port()
            do
                os.remove(tmp .. "/redis.pid")
                sh(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s "
                    .. "--requirepass %s --daemonize yes --pidfile %s/redis.pid --logfile %s/redis.log")
                   :format(port, tmp, PASSWORD, tmp, tmp))
                redis_port = port
                for _ = 1, 250 do
                    redis_pid = redis_pid or (read(tmp .. "/redis.pid") or ""):match("%d+")
                    ready = redis_pid ~= nil and redis_cli("PING") == "PONG"
                    if ready then
                        break
                    end
                    support.sleep(0.02)
                end
                if ready then
                    break
                end
                if redis_pid then
                    sh("kill " .. redis_pid)
                    redis_pid = nil
                end
            end
        end
        assert(ready, "redis-server did not start: " .. (read(tmp .. "/redis.log") or ""))
    end)

    local nginx_pids = {}

    teardown(function()
        for _, pid in ipairs(nginx_pids) do
            sh("kill -QUIT " .. pid)
        end
        if users_pid then
            sh("kill " .. users_pid)
        end
        if redis_pid then
            sh("kill " .. redis_pid)
        end
        if tmp then
            os.execute("rm -rf '" .. tmp .. "'")
        end
    end)

    local function where(b)
        return ("%s:%d (%s)"):format(README, b.line, b.key)
    end

    -- This process's module paths, absolute: a block runs in the temporary
    -- directory, where it writes and finds its files.
    local CWD = (sh("pwd"):gsub("%s+$", ""))
    local function absolute(paths)
        return (paths:gsub("[^;]+", function(p)
            return p:sub(1, 1) == "/" and p or CWD .. "/" .. p
        end))
    end

    local ngx_port
    local function subst(s)
        local vars = {
            TMP = tmp, REDIS_PORT = tostring(redis_port), USERS_PORT = tostring(users_port),
            NGX_PORT = tostring(ngx_port), USER_7 = USER_7,
            LUA_PATH = absolute(package.path), LUA_CPATH = absolute(package.cpath),
        }
        return (s:gsub("@([%u_%d]+)@", function(k)
            return assert(vars[k], "no value for @" .. k .. "@")
        end))
    end

    -- The block's source with its rewrites applied, each of which must match.
    local function rewritten(b, class)
        local src = b.src
        for _, rw in ipairs(class.rewrite or {}) do
            local at = src:find(rw[1], 1, true)
            assert(at, where(b) .. ": the text to rewrite is gone: " .. rw[1])
            src = src:sub(1, at - 1) .. subst(rw[2]) .. src:sub(at + #rw[1])
        end
        return src
    end

    local function by_key()
        local t = {}
        for _, b in ipairs(blocks) do
            t[b.key] = b
        end
        return t
    end

    -- What runs: the prelude, the blocks it continues, the block, its epilogue.
    local function program(b, class)
        local keyed, parts = by_key(), {}
        for _, k in ipairs(class.after or {}) do
            local a = assert(keyed[k], where(b) .. " continues " .. k .. ", which is gone")
            local ac = CLASSES[k]
            parts[#parts + 1] = ac.prelude or ""
            parts[#parts + 1] = rewritten(a, ac)
        end
        parts[#parts + 1] = class.prelude or ""
        local before = table.concat(parts, "\n") .. "\n"
        local _, offset = before:gsub("\n", "")
        parts[#parts + 1] = rewritten(b, class)
        parts[#parts + 1] = class.epilogue or ""
        return table.concat(parts, "\n"), offset
    end

    -- A message about line N of the program, told as the README's line.
    local function readme_lines(msg, b, offset, extra)
        local _, n = b.src:gsub("\n", "")
        return (msg:gsub("(%.lua):(%d+):", function(ext, l)
            l = tonumber(l) - (offset or 0) - (extra or 0)
            if l >= 1 and l <= n + 1 then
                return ext .. ": README line " .. (b.line + l - 1) .. ":"
            end
        end))
    end

    it("has a class for every example", function()
        local missing, seen = {}, {}
        for _, b in ipairs(blocks) do
            seen[b.key] = true
            if not CLASSES[b.key] then
                missing[#missing + 1] = where(b)
            end
        end
        assert.are.same({}, missing, "examples no class says how to run")
        local stale = {}
        for k in pairs(CLASSES) do
            if not seen[k] then
                stale[#stale + 1] = k
            end
        end
        table.sort(stale)
        assert.are.same({}, stale, "classes of examples that are gone")
    end)

    it("compile, and read no global that is not defined", function()
        local files = {}
        for _, b in ipairs(blocks) do
            local c = CLASSES[b.key]
            if c and c.file then
                files[c.file:match("([^/]+)%.lua$")] = true
            end
        end
        local problems = {}
        for _, b in ipairs(blocks) do
            local class = CLASSES[b.key]
            if class then
                local chunks
                if b.lang == "nginx" then
                    chunks = lua_of_nginx(b)
                else
                    local src, offset = program(b, class)
                    chunks = { { line = b.line, src = src, directive = "lua", offset = offset } }
                end
                -- A global set by one chunk of an nginx.conf is there for the others.
                local set_here, reads = {}, {}
                for i, ch in ipairs(chunks) do
                    local gets, sets = globals_of(ch.src, tmp .. "/chunk.lua")
                    if not gets then
                        problems[#problems + 1] = ("%s:%d (%s, %s): does not compile: %s")
                            :format(README, ch.line, b.key, ch.directive,
                                    ch.offset and readme_lines(sets, b, ch.offset) or sets)
                    else
                        for name in pairs(sets) do
                            set_here[name] = true
                        end
                        reads[i] = gets
                    end
                    for _, m in ipairs(requires_of(ch.src)) do
                        local found = files[m] or package.searchpath(m, package.path)
                            or package.searchpath(m, package.cpath) or m == "ffi" or m == "jit"
                        if not found then
                            problems[#problems + 1] = ("%s:%d (%s): requires %q, which is neither a module "
                                .. "nor a file the README gives"):format(README, ch.line, b.key, m)
                        end
                    end
                end
                local in_nginx = b.lang == "nginx" or class.ngx
                for i, ch in ipairs(chunks) do
                    for name in pairs(reads[i] or {}) do
                        local ok = BASE[name] or set_here[name] or (in_nginx and name == "ngx")
                        if not ok then
                            problems[#problems + 1] = ("%s:%d (%s, %s): reads the global %s, defined nowhere")
                                :format(README, ch.line, b.key, ch.directive, name)
                        end
                    end
                end
            end
        end
        table.sort(problems)
        assert.are.same({}, problems)
    end)

    -- A program run in its own luajit, every undefined global an error
    -- (`ngx` is nil outside nginx, as regions.lua expects).
    local GUARD = "setmetatable(_G, { __index = function(_, k)\n"
        .. "    if k ~= 'ngx' then error('undefined global ' .. tostring(k), 2) end\n"
        .. "end })\n"

    local function run(b, src, args)
        local path = tmp .. "/block-" .. b.line .. ".lua"
        write(path, GUARD .. src)
        local q = assert(io.popen(("cd %s && LUA_PATH='%s' LUA_CPATH='%s' luajit %s %s")
                                  :format(tmp, absolute(package.path), absolute(package.cpath), path,
                                          table.concat(args or {}, " "))
                                  .. " 2>&1; echo \"rc=$?\""))
        local out = q:read("*a")
        q:close()
        local rc = out:match("rc=(%d+)%s*$")
        return rc == "0", out:gsub("rc=%d+%s*$", "")
    end

    local function service_hits(path)
        local log = read(tmp .. "/users-service.log") or ""
        local n = 0
        for _ in log:gmatch('"GET ' .. path:gsub("%p", "%%%0") .. ' HTTP') do
            n = n + 1
        end
        return n
    end

    -- Starts the nginx.conf of block `b` (rewritten) in its own prefix, asks
    -- it the class's requests and stops it; what went wrong, as a list.
    function run_nginx(b, class)
        if sh("test -x /usr/sbin/nginx && test -f /usr/lib/nginx/modules/ngx_http_lua_module.so && echo yes")
            == "" then
            return { "needs nginx with its Lua module (apt-get install nginx-extras)" }
        end
        local problems = {}
        local prefix = tmp .. "/nginx-" .. b.line
        sh("mkdir -p " .. prefix .. "/logs")
        local started = false
        for _ = 1, 3 do
            ngx_port = free_port()
            local conf = rewritten(b, class)
            if class.wrap then
                local at = class.wrap:find("@BLOCK@", 1, true)
                conf = subst(class.wrap:sub(1, at - 1)) .. conf .. subst(class.wrap:sub(at + 7))
            end
            write(prefix .. "/nginx.conf", conf)
            sh(("/usr/sbin/nginx -p %s -c %s/nginx.conf -e logs/error.log -g 'pid logs/nginx.pid;'")
               :format(prefix, prefix))
            for _ = 1, 100 do
                -- Listening is enough (a request of our own would log a 404).
                if listening(ngx_port) then
                    started = true
                    break
                end
                support.sleep(0.05)
            end
            local pid = (read(prefix .. "/logs/nginx.pid") or ""):match("%d+")
            if started then
                nginx_pids[#nginx_pids + 1] = pid
                break
            elseif pid then
                sh("kill -QUIT " .. pid)
                os.remove(prefix .. "/logs/nginx.pid")
            end
        end
        local pid = nginx_pids[#nginx_pids]
        if not started then
            return { "nginx did not start: " .. (read(prefix .. "/logs/error.log") or "") }
        end
        local before = {}
        for path in pairs(class.service_hits or {}) do
            before[path] = service_hits(path)
        end
        for _, req in ipairs(class.requests) do
            local out = sh((BARE .. "curl -s -m 20 -w '\n%%{http_code}' 'http://127.0.0.1:%d%s'"):format(ngx_port, req[1]))
            local body, code = out:match("^(.*)\n(%d+)$")
            if tonumber(code) ~= req[2] or (req[3] and body ~= subst(req[3]))
                or (req.match and not (body or ""):match(req.match)) then
                problems[#problems + 1] = ("GET %s answered %s %q, the README's conf should answer %d %q")
                    :format(req[1], tostring(code), tostring(body), req[2],
                            req[3] and subst(req[3]) or req.match or "")
            end
        end
        for path, want in pairs(class.service_hits or {}) do
            local n = service_hits(path) - before[path]
            if n ~= want then
                problems[#problems + 1] = ("the users service was asked %s %d times, not %d"):format(path, n, want)
            end
        end
        sh("kill -QUIT " .. pid)
        local log = read(prefix .. "/logs/error.log") or ""
        for line in log:gmatch("[^\n]+") do
            if line:match("%[error%]") or line:match("%[emerg%]") or line:match("%[alert%]") then
                problems[#problems + 1] = "error.log: " .. line
            end
        end
        return problems
    end

    it("run as written", function()
        write(tmp .. "/users.tsv", "1\t{\"name\":\"ada\"}\n2\t{\"name\":\"bob\"}\n")
        local failures, ran = {}, 0
        -- Files first: the blocks that load them find them written.
        for _, b in ipairs(blocks) do
            local class = CLASSES[b.key]
            if class and class.file and class.kind == "file" then
                write(tmp .. "/" .. class.file, rewritten(b, class))
            end
            if class and class.regions_from_comment then
                local shown = b.src:match("%-%- /etc/nginx/lua/regions%.lua returns\n(.-)\n%s*[^%s%-]")
                assert(shown, where(b) .. ": no regions.lua in its comment")
                write(tmp .. "/" .. class.regions_from_comment,
                      "return " .. shown:gsub("%s*%-%-%s?", "\n"):gsub("^\n", "") .. "\n")
            end
        end
        for _, b in ipairs(blocks) do
            local class = CLASSES[b.key]
            local ok, out, offset
            if class and class.kind == "run" then
                local src
                src, offset = program(b, class)
                ok, out = run(b, src)
            elseif class and class.kind == "script" then
                local src
                src, offset = program(b, class)
                ok, out = run(b, src, class.args and { subst(table.concat(class.args, " ")) })
            elseif class and class.kind == "file" and class.load then
                ok, out = run(b, ('require("dogpile.cache").load_regions(%q)'):format(tmp .. "/" .. class.file))
            end
            if ok ~= nil then
                ran = ran + 1
                if not ok then
                    -- The guard is the program's first line.
                    failures[#failures + 1] = where(b) .. ": " .. (offset and readme_lines(out, b, offset, 3) or out)
                elseif class.expect and out ~= class.expect then
                    failures[#failures + 1] = ("%s: printed %q, the README says %q"):format(where(b), out, class.expect)
                elseif class.check then
                    class.check(redis_cli)
                end
            end
        end
        -- The nginx.confs, once the batch job has warmed Redis.
        for _, b in ipairs(blocks) do
            local class = CLASSES[b.key]
            if class and class.kind == "nginx" then
                ran = ran + 1
                for _, problem in ipairs(run_nginx(b, class)) do
                    failures[#failures + 1] = where(b) .. ": " .. problem
                end
            end
        end
        assert.are.same({}, failures)
        assert.is_true(ran >= 22, "only " .. ran .. " examples ran")
    end)
end)
