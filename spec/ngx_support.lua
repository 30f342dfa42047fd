-- Starts and stops a real nginx (Debian's nginx-extras) for spec/ngx_spec.lua,
-- spec/ngx_redis_spec.lua, bench/ngx_hit.lua, bench/ngx_redis.lua and others: its own
-- prefix in a temporary folder, a loopback port, 2 workers, a fixture folder
-- (spec/fixtures/nginx unless told), and the dogpile modules this Lua state
-- loads (found through package.path and package.cpath, so the stage that
-- LUA_PATH/LUA_CPATH name is the one nginx uses too).
local _M = {}

_M.NGINX = os.getenv("DP_TEST_NGINX") or "/usr/sbin/nginx"

local function sh(cmd)
    local ok = os.execute(cmd)
    return ok == true or ok == 0
end

local function read(cmd)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    return out
end
_M.read = read

local function dir_of(found, suffix)
    assert(found, "cannot find the module file")
    assert(found:sub(-#suffix) == suffix, found)
    return found:sub(1, #found - #suffix)
end

-- curl runs without the sanitizer runtime that the ASan variant preloads
-- into busted (and so into nginx, which needs it for the ASan-built modules):
-- curl preloaded with it hangs on its first request.
_M.CURL = "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS curl"

local function q(s)
    return "'" .. s:gsub("'", "'\\''") .. "'"
end
_M.q = q

function _M.available()
    return sh("test -x " .. _M.NGINX .. " && test -f /usr/lib/nginx/modules/ngx_http_lua_module.so")
end

-- A loopback port nobody listens on (as .ci/lib.sh's free_port).
local function free_port()
    local out = read([[bash -c 'while :; do p=$((20000 + RANDOM % 12000));
        (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo $p; break; }; done']])
    return assert(tonumber(out), "free_port: " .. out)
end

--- Starts nginx; returns a server object with :url(path), :get(path),
-- :concurrent(path, n), :log(), :stop(). `opts` (optional): `fixture` (a
-- folder under spec/fixtures, default "nginx"), `vars` (more ${NAME}s for
-- its nginx.conf), `env` (environment variables for nginx, which its
-- nginx.conf passes on with `env NAME;`), `ready` (a path that answers 200
-- once nginx is up, default /stats?name=x).
function _M.start(opts)
    opts = opts or {}
    local root = dir_of(debug.getinfo(1, "S").source:sub(2), "spec/ngx_support.lua")
    local fixtures = root .. "spec/fixtures/" .. (opts.fixture or "nginx")
    local lmod = dir_of(package.searchpath("dogpile.cache.region", package.path),
                        "dogpile/cache/region.lua")
    local cmod = dir_of(package.searchpath("dogpile.core", package.cpath), "dogpile/core.so")
    local prefix = read("mktemp -d /tmp/dogpile-nginx.XXXXXX"):gsub("%s+$", "")
    assert(sh("mkdir -p " .. q(prefix) .. "/conf " .. q(prefix) .. "/logs " .. q(prefix) .. "/tmp"))
    local self = setmetatable({ prefix = prefix, ready = opts.ready }, { __index = _M })
    local env = ""
    for k, v in pairs(opts.env or {}) do
        env = env .. " " .. k .. "=" .. q(tostring(v))
    end
    local template = assert(io.open(fixtures .. "/nginx.conf")):read("*a")
    for attempt = 1, 5 do
        self.port = free_port()
        local vars = {
            PORT = tostring(self.port),
            -- nginx_backend: the handlers the backend fixtures share.
            LUA_PATH = lmod .. "?.lua;" .. fixtures .. "/?.lua;" .. root
                .. "spec/fixtures/nginx_backend/?.lua;/usr/share/lua/5.1/?.lua;;",
            LUA_CPATH = cmod .. "?.so;;",
            FIXTURES = fixtures,
        }
        for k, v in pairs(opts.vars or {}) do
            vars[k] = tostring(v)
        end
        local conf = template:gsub("%${([%w_]+)}", vars)
        local f = assert(io.open(prefix .. "/conf/nginx.conf", "w"))
        f:write(conf)
        f:close()
        -- Under the ASan variant busted runs with LD_PRELOAD=libasan: nginx
        -- inherits it, which the ASan-built C modules nginx loads need (the
        -- sanitizer runtime must come first); leak checking stays off, as
        -- for busted (nginx and LuaJIT are not instrumented).
        local cmd = (env ~= "" and ("env" .. env .. " ") or "") .. _M.NGINX .. " -p " .. q(prefix) .. " -c conf/nginx.conf -e logs/error.log"
            .. " -g 'daemon on; master_process on;' >" .. q(prefix) .. "/logs/start.log 2>&1"
        if sh(cmd) and self:wait_up() then
            return self
        end
        local log = self:log() .. read("cat " .. q(prefix) .. "/logs/start.log")
        if not log:find("Address already in use", 1, true) or attempt == 5 then
            self:stop()
            error("nginx did not start:\n" .. log)
        end
        -- Another port: the failed bind's [emerg] lines are not this
        -- server's (the specs fail on any [emerg] left in error.log).
        os.remove(prefix .. "/logs/error.log")
    end
end

function _M:url(path)
    return "http://127.0.0.1:" .. self.port .. path
end

function _M:wait_up()
    for _ = 1, 100 do
        if read(_M.CURL .. " -s -m 2 -o /dev/null -w '%{http_code}' " .. q(self:url(self.ready or "/stats?name=x")))
            == "200" then
            return true
        end
        sh("sleep 0.05")
    end
    return false
end

--- One request: body, status, seconds, and the response headers.
function _M:get(path, headers)
    local out = read(_M.CURL .. " -s -m 20 -D - -w '\n%{http_code} %{time_total}' " .. q(self:url(path)))
    local head, body, code, t = out:match("^(.-)\r\n\r\n(.*)\n(%d+) ([%d.]+)$")
    assert(code, "bad curl output: " .. out)
    return body, tonumber(code), tonumber(t), head
end

--- `n` requests at once, from one curl running them in parallel (each on its
-- own connection): an array of {body =, status =, time =}.
function _M:concurrent(path, n)
    local dir = read("mktemp -d"):gsub("%s+$", "")
    local sep = path:find("?", 1, true) and "&" or "?"
    local url = self:url(path) .. sep .. "n=[1-" .. n .. "]"
    -- time: seen by curl (connection queueing on a busy machine included);
    -- server_time: what the handler measured, where it sends X-Elapsed.
    local out = read(_M.CURL .. " -s -m 20 -Z --parallel-immediate --parallel-max " .. n
                     .. " -o " .. q(dir .. "/#1")
                     .. " -w '%{http_code} %{time_total} %header{x-elapsed}|%{url_effective}\\n' "
                     .. q(url) .. " 2>/dev/null")
    local res = {}
    for code, t, st, i in out:gmatch("(%d+) ([%d.]+) ([%d.]*)|[^\n]-n=(%d+)\n") do
        local f = io.open(dir .. "/" .. i)
        res[#res + 1] = { body = f and f:read("*a") or "", status = tonumber(code),
                          time = tonumber(t), server_time = tonumber(st) }
        if f then f:close() end
    end
    sh("rm -rf " .. q(dir))
    return res
end

function _M:log()
    local f = io.open(self.prefix .. "/logs/error.log")
    if not f then
        return ""
    end
    local s = f:read("*a")
    f:close()
    return s
end

function _M:stop()
    local f = io.open(self.prefix .. "/logs/nginx.pid")
    if f then
        local pid = tonumber(f:read("*a"))
        f:close()
        if pid then
            sh("kill -QUIT " .. pid .. " 2>/dev/null")
            for _ = 1, 100 do
                if not sh("kill -0 " .. pid .. " 2>/dev/null") then
                    break
                end
                sh("sleep 0.05")
            end
            sh("kill -KILL " .. pid .. " 2>/dev/null")
        end
    end
    sh("rm -rf " .. q(self.prefix))
end

return _M
