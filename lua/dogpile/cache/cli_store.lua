--- What the operator's CLI (dogpile.cache.cli) asks of a backend's storage
-- directly, where the backend interface has no operation for it: listing
-- keys, emptying a region, and what the storage really holds.
--
-- The C backend interface (core/dogpile.h) has get, set, delete and the
-- stats of this process's handle; it cannot enumerate. So:
--   lmdb   the environment is read (and, for flush, written) through liblmdb
--          by the FFI: values live under 'v'..key (backends/lmdb.c). The
--          CLI never opens the C backend on the same path in the same
--          process while it does (LMDB forbids two environments of one path
--          in one process).
--   redis  a small blocking RESP client over the FFI's sockets (the C
--          backend's hiredis connection is not reachable from Lua): SCAN,
--          DEL, DBSIZE, INFO. Keys are not namespaced by region in Redis,
--          so a region's keys are those of its database, less its locks.
-- Anything else answers nil, reason: memory and shared_memory live inside
-- one process, ngx_shared inside nginx; memcached cannot list its keys.
local ffi = require "ffi"
local lib = require "dogpile.lib"

local type, tostring, tonumber, pairs, ipairs, pcall = type, tostring, tonumber, pairs, ipairs, pcall
local concat, floor = table.concat, math.floor
local ffi_string, ffi_new = ffi.string, ffi.new

local _M = {}

-- -- Globs (Redis's MATCH syntax: * ? [abc] [^a] [a-z] \x) --------------------

--- A Lua pattern anchored at both ends for a glob.
function _M.glob_pattern(glob)
    local out, i, n = { "^" }, 1, #glob
    while i <= n do
        local c = glob:sub(i, i)
        if c == "*" then
            out[#out + 1] = ".*"
        elseif c == "?" then
            out[#out + 1] = "."
        elseif c == "\\" and i < n then
            i = i + 1
            out[#out + 1] = "%" .. glob:sub(i, i)
        elseif c == "[" then
            local j = glob:find("]", i + 2, true)
            if not j then
                out[#out + 1] = "%["
            else
                local body = glob:sub(i + 1, j - 1):gsub("^%^", "\0")
                body = body:gsub("[%%%]%[]", "%%%0"):gsub("^%z", "^")
                out[#out + 1] = "[" .. body .. "]"
                i = j
            end
        elseif c:match("%p") then
            out[#out + 1] = "%" .. c
        else
            out[#out + 1] = c
        end
        i = i + 1
    end
    out[#out + 1] = "$"
    return concat(out)
end

-- -- lmdb through liblmdb ----------------------------------------------------------

-- Private names (asm labels to liblmdb's symbols): a spec or another module
-- may declare liblmdb's own names with other types in this process.
pcall(ffi.cdef, [[
typedef struct dp_cli_mdb_val { size_t mv_size; const void *mv_data; } dp_cli_mdb_val;
typedef struct dp_cli_mdb_stat_t { unsigned int ms_psize, ms_depth; size_t ms_branch_pages,
    ms_leaf_pages, ms_overflow_pages, ms_entries; } dp_cli_mdb_stat_t;
int dp_cli_mdb_env_create(void **env) asm("mdb_env_create");
int dp_cli_mdb_env_set_maxreaders(void *env, unsigned int readers) asm("mdb_env_set_maxreaders");
int dp_cli_mdb_env_open(void *env, const char *path, unsigned int flags, unsigned int mode)
    asm("mdb_env_open");
void dp_cli_mdb_env_close(void *env) asm("mdb_env_close");
int dp_cli_mdb_txn_begin(void *env, void *parent, unsigned int flags, void **txn)
    asm("mdb_txn_begin");
int dp_cli_mdb_txn_commit(void *txn) asm("mdb_txn_commit");
void dp_cli_mdb_txn_abort(void *txn) asm("mdb_txn_abort");
int dp_cli_mdb_dbi_open(void *txn, const char *name, unsigned int flags, unsigned int *dbi)
    asm("mdb_dbi_open");
int dp_cli_mdb_stat(void *txn, unsigned int dbi, dp_cli_mdb_stat_t *stat) asm("mdb_stat");
int dp_cli_mdb_cursor_open(void *txn, unsigned int dbi, void **cursor) asm("mdb_cursor_open");
void dp_cli_mdb_cursor_close(void *cursor) asm("mdb_cursor_close");
int dp_cli_mdb_cursor_get(void *cursor, dp_cli_mdb_val *key, dp_cli_mdb_val *data, int op)
    asm("mdb_cursor_get");
int dp_cli_mdb_cursor_del(void *cursor, unsigned int flags) asm("mdb_cursor_del");
char *dp_cli_mdb_strerror(int err) asm("mdb_strerror");
]])

local MDB_NOSUBDIR, MDB_RDONLY, MDB_NOTLS = 0x4000, 0x20000, 0x200000
local MDB_NEXT, MDB_SET_RANGE = 8, 17
local MDB_NOTFOUND = -30798
local V_PREFIX = "v" -- values' keys start with it
local HDR = 16 -- expiry and access time before the region's bytes (lmdb.c)

local lmdb_lib
local function lmdb()
    if lmdb_lib == nil then
        for _, name in ipairs({ "lmdb", "liblmdb.so.0" }) do
            local ok, l = pcall(ffi.load, name)
            if ok then
                lmdb_lib = l
                break
            end
        end
        lmdb_lib = lmdb_lib or false
    end
    return lmdb_lib or nil
end

-- Runs fn(L, txn, dbi) in a transaction on the environment at `path`; the
-- environment is closed after. nil, err on failure.
local function with_lmdb(path, write, fn)
    local L = lmdb()
    if not L then
        return nil, "liblmdb cannot be loaded (liblmdb0)"
    end
    local function exists(p)
        local f = io.open(p)
        if f then
            f:close()
        end
        return f ~= nil
    end
    -- A directory holds data.mdb; a file path is the data file itself.
    local st = exists(path .. "/data.mdb") and 0
               or (exists(path) and not exists(path .. "/.") and MDB_NOSUBDIR)
    if not st then
        return nil, "'" .. path .. "' holds no LMDB environment"
    end
    local envp = ffi_new("void *[1]")
    local rc = L.dp_cli_mdb_env_create(envp)
    if rc ~= 0 then
        return nil, ffi_string(L.dp_cli_mdb_strerror(rc))
    end
    local env = envp[0]
    local function fail(what, code)
        return nil, ("%s on '%s': %s"):format(what, path, ffi_string(L.dp_cli_mdb_strerror(code)))
    end
    -- The map grows to the file's own size on open; readers: as lmdb.c's
    -- default, so that this open agrees with the table's size.
    L.dp_cli_mdb_env_set_maxreaders(env, 126)
    rc = L.dp_cli_mdb_env_open(env, path, st + MDB_NOTLS + (write and 0 or MDB_RDONLY), 420)
    if rc ~= 0 then
        L.dp_cli_mdb_env_close(env)
        return fail("opening", rc)
    end
    local txnp = ffi_new("void *[1]")
    rc = L.dp_cli_mdb_txn_begin(env, nil, write and 0 or MDB_RDONLY, txnp)
    if rc ~= 0 then
        L.dp_cli_mdb_env_close(env)
        return fail("a transaction", rc)
    end
    local txn = txnp[0]
    local dbi = ffi_new("unsigned int[1]")
    rc = L.dp_cli_mdb_dbi_open(txn, nil, 0, dbi)
    local ok, res, res2
    if rc ~= 0 then
        ok, res = true, nil
        res2 = select(2, fail("opening the database", rc))
    else
        ok, res, res2 = pcall(fn, L, txn, dbi[0])
    end
    if ok and res ~= nil and write then
        rc = L.dp_cli_mdb_txn_commit(txn)
        if rc ~= 0 then
            res, res2 = fail("committing", rc)
        end
    else
        L.dp_cli_mdb_txn_abort(txn)
    end
    L.dp_cli_mdb_env_close(env)
    if not ok then
        error(res, 0)
    end
    return res, res2
end

local now = lib.C.dp_clock_now

-- Calls each(key, expired) for every value key of the environment, in key
-- order, until it returns false; `del`: deletes each key it is called for
-- when it returns "delete".
local function walk(L, txn, dbi, each)
    local cur = ffi_new("void *[1]")
    local rc = L.dp_cli_mdb_cursor_open(txn, dbi, cur)
    if rc ~= 0 then
        return nil, ffi_string(L.dp_cli_mdb_strerror(rc))
    end
    local c = cur[0]
    local k, v = ffi_new("dp_cli_mdb_val"), ffi_new("dp_cli_mdb_val")
    k.mv_size, k.mv_data = 1, V_PREFIX
    local t = now()
    rc = L.dp_cli_mdb_cursor_get(c, k, v, MDB_SET_RANGE)
    local err
    while rc == 0 do
        local kp = ffi.cast("const char *", k.mv_data)
        if kp[0] ~= 118 then -- 'v'
            break
        end
        local expires = 0
        if v.mv_size >= HDR then
            expires = ffi.cast("const double *", v.mv_data)[0]
        end
        local what = each(ffi_string(kp + 1, k.mv_size - 1), expires > 0 and expires <= t)
        if what == false then
            break
        elseif what == "delete" then
            rc = L.dp_cli_mdb_cursor_del(c, 0)
            if rc ~= 0 then
                err = ffi_string(L.dp_cli_mdb_strerror(rc))
                break
            end
        end
        rc = L.dp_cli_mdb_cursor_get(c, k, v, MDB_NEXT)
    end
    if rc ~= 0 and rc ~= MDB_NOTFOUND and not err then
        err = ffi_string(L.dp_cli_mdb_strerror(rc))
    end
    L.dp_cli_mdb_cursor_close(c)
    if err then
        return nil, err
    end
    return true
end

-- -- A blocking RESP client over the FFI's sockets ------------------------------

pcall(ffi.cdef, [[
struct dp_cli_addrinfo { int ai_flags, ai_family, ai_socktype, ai_protocol;
    unsigned int ai_addrlen; void *ai_addr; char *ai_canonname;
    struct dp_cli_addrinfo *ai_next; };
struct dp_cli_sockaddr_un { unsigned short sun_family; char sun_path[108]; };
struct dp_cli_timeval { long tv_sec, tv_usec; };
int dp_cli_getaddrinfo(const char *node, const char *service,
                       const struct dp_cli_addrinfo *hints, struct dp_cli_addrinfo **res)
    asm("getaddrinfo");
void dp_cli_freeaddrinfo(struct dp_cli_addrinfo *res) asm("freeaddrinfo");
const char *dp_cli_gai_strerror(int errcode) asm("gai_strerror");
int dp_cli_socket(int domain, int type, int protocol) asm("socket");
int dp_cli_connect(int fd, const void *addr, unsigned int len) asm("connect");
int dp_cli_setsockopt(int fd, int level, int name, const void *val, unsigned int len)
    asm("setsockopt");
long dp_cli_send(int fd, const void *buf, size_t len, int flags) asm("send");
long dp_cli_recv(int fd, void *buf, size_t len, int flags) asm("recv");
int dp_cli_close(int fd) asm("close");
char *dp_cli_strerror(int errnum) asm("strerror");
]])

local C = ffi.C
local AF_UNIX, SOCK_STREAM, SOL_SOCKET, SO_RCVTIMEO, SO_SNDTIMEO = 1, 1, 1, 20, 21
local MSG_NOSIGNAL = 0x4000
local EINTR = 4

local Sock = {}
Sock.__index = Sock

local function errno_text()
    local e = ffi.errno()
    return ffi_string(C.dp_cli_strerror(e)), e
end

local function set_timeout(fd, seconds)
    local tv = ffi_new("struct dp_cli_timeval")
    tv.tv_sec = floor(seconds)
    tv.tv_usec = floor((seconds - floor(seconds)) * 1e6)
    C.dp_cli_setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, tv, ffi.sizeof(tv))
    C.dp_cli_setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, tv, ffi.sizeof(tv))
end

--- A connection to host:port (or the unix socket `unix`); nil, err.
function _M.connect(host, port, unix, timeout, connect_timeout)
    local where = unix or (host .. ":" .. port)
    if unix then
        local fd = C.dp_cli_socket(AF_UNIX, SOCK_STREAM, 0)
        if fd < 0 then
            return nil, "socket: " .. errno_text()
        end
        set_timeout(fd, connect_timeout or timeout)
        local sa = ffi_new("struct dp_cli_sockaddr_un")
        sa.sun_family = AF_UNIX
        ffi.copy(sa.sun_path, unix, math.min(#unix, 107))
        if C.dp_cli_connect(fd, sa, ffi.sizeof(sa)) ~= 0 then
            local e = errno_text()
            C.dp_cli_close(fd)
            return nil, "cannot connect to " .. where .. ": " .. e
        end
        set_timeout(fd, timeout)
        return setmetatable({ fd = fd, buf = "", where = where }, Sock)
    end
    local hints = ffi_new("struct dp_cli_addrinfo")
    hints.ai_socktype = SOCK_STREAM
    local res = ffi_new("struct dp_cli_addrinfo *[1]")
    local rc = C.dp_cli_getaddrinfo(host, tostring(port), hints, res)
    if rc ~= 0 then
        return nil, "cannot resolve " .. host .. ": " .. ffi_string(C.dp_cli_gai_strerror(rc))
    end
    local err = "no address"
    local ai = res[0]
    while ai ~= nil do
        local fd = C.dp_cli_socket(ai.ai_family, SOCK_STREAM, 0)
        if fd >= 0 then
            set_timeout(fd, connect_timeout or timeout)
            if C.dp_cli_connect(fd, ai.ai_addr, ai.ai_addrlen) == 0 then
                C.dp_cli_freeaddrinfo(res[0])
                set_timeout(fd, timeout)
                return setmetatable({ fd = fd, buf = "", where = where }, Sock)
            end
            err = errno_text()
            C.dp_cli_close(fd)
        end
        ai = ai.ai_next
    end
    C.dp_cli_freeaddrinfo(res[0])
    return nil, "cannot connect to " .. where .. ": " .. err
end

function Sock:send(data)
    if type(data) == "table" then
        data = concat(data)
    end
    local pos = 0
    while pos < #data do
        local n = C.dp_cli_send(self.fd, ffi.cast("const char *", data) + pos, #data - pos, MSG_NOSIGNAL)
        if n < 0 then
            local e, code = errno_text()
            if code ~= EINTR then
                return nil, e
            end
        else
            pos = pos + tonumber(n)
        end
    end
    return #data
end

local RECV = ffi_new("char[65536]")

function Sock:fill()
    local n = C.dp_cli_recv(self.fd, RECV, 65536, 0)
    if n > 0 then
        self.buf = self.buf .. ffi_string(RECV, n)
        return true
    elseif n == 0 then
        return nil, "closed"
    end
    local e, code = errno_text()
    if code == EINTR then
        return true
    elseif code == 11 then -- EAGAIN: SO_RCVTIMEO passed
        return nil, "timeout"
    end
    return nil, e
end

--- As a cosocket's: receive() a line without its CRLF, receive(n) n bytes.
function Sock:receive(n)
    for _ = 1, 1e6 do
        if n == nil then
            local e = self.buf:find("\r\n", 1, true)
            if e then
                local line = self.buf:sub(1, e - 1)
                self.buf = self.buf:sub(e + 2)
                return line
            end
        elseif #self.buf >= n then
            local s = self.buf:sub(1, n)
            self.buf = self.buf:sub(n + 1)
            return s
        end
        local ok, err = self:fill()
        if not ok then
            return nil, err, self.buf
        end
    end
    return nil, "reply too long"
end

function Sock:close()
    if self.fd then
        C.dp_cli_close(self.fd)
        self.fd = nil
    end
end

-- -- Redis ------------------------------------------------------------------------------

local Redis = {}
Redis.__index = Redis

--- One command: the reply; nil, err on an I/O failure or an error reply.
function Redis:call(...)
    local resp = require "dogpile.cache.resp"
    local args = { ... }
    local ok, err = self.sock:send(resp.encode(args))
    if not ok then
        return nil, args[1] .. ": " .. self.sock.where .. ": " .. err
    end
    local v, kind = resp.read_reply(self.sock)
    if v == nil then
        return nil, args[1] .. ": " .. self.sock.where .. ": " .. tostring(kind)
    elseif kind == "-" then
        return nil, args[1] .. ": " .. self.sock.where .. ": " .. v
    end
    return v
end

local function redis_open(name, arguments)
    local resp = require "dogpile.cache.resp"
    local s, err = resp.server(name, arguments or {})
    if not s then
        return nil, err
    end
    local sock
    sock, err = _M.connect(s.host, s.port, s.unix, s.socket_timeout, s.connect_timeout)
    if not sock then
        return nil, name .. ": " .. err
    end
    local r = setmetatable({ sock = sock, server = s, name = name }, Redis)
    local ok
    if s.password then
        if s.username then
            ok, err = r:call("AUTH", s.username, s.password)
        else
            ok, err = r:call("AUTH", s.password)
        end
        if not ok then
            sock:close()
            return nil, name .. ": " .. err
        end
    end
    if s.db and s.db ~= 0 then
        ok, err = r:call("SELECT", s.db)
        if not ok then
            sock:close()
            return nil, name .. ": " .. err
        end
    end
    return r
end

-- Every key of the db matching `glob` (nil: all) that is not a lock,
-- through SCAN: each(key) until it returns false.
function Redis:scan(glob, each)
    local lock_prefix = self.server.lock_prefix or "_lock"
    local cursor = "0"
    for _ = 1, 1e9 do
        local rep, err = self:call("SCAN", cursor, "MATCH", glob or "*", "COUNT", 1000)
        if not rep then
            return nil, err
        end
        cursor = rep[1]
        local keys = rep[2]
        for i = 1, keys.n or #keys do
            local k = keys[i]
            if k:sub(1, #lock_prefix) ~= lock_prefix then
                if each(k) == false then
                    return true
                end
            end
        end
        if cursor == "0" then
            return true
        end
    end
    return true
end

-- -- Per backend ---------------------------------------------------------------------------

local WHY = {
    ["dogpile.cache.memory"] = "its values live in the Lua state of each application process",
    ["dogpile.cache.shared_memory"] = "its values live inside each application process",
    ["dogpile.cache.null"] = "it stores nothing",
    ["dogpile.cache.ngx_shared"] = "its lua_shared_dict exists inside nginx only",
    ["dogpile.cache.memcached"] = "memcached cannot list its keys",
    ["dogpile.cache.redis_sentinel"] = "the CLI does not ask sentinels for the master (use "
        .. "dogpile.cache.redis with the master's address)",
    ["dogpile.cache.redis_cluster"] = "the CLI does not walk the cluster's nodes",
    ["dogpile.cache.tiered"] = "a tiered region's tiers are regions of their own: give each "
        .. "its own entry",
}

--- Whether the CLI can look inside `backend`'s storage: true, or nil, why.
function _M.can_enumerate(backend)
    if backend == "dogpile.cache.lmdb" or backend == "dogpile.cache.redis" then
        return true
    end
    return nil, WHY[backend] or "the backend has no way to list its keys"
end

--- The stored keys of a region (after its key mangler) matching `glob`, at
-- most `limit`: an array of {key =, expired =} (expired: lmdb only, nil
-- where unknown); nil, err.
function _M.keys(backend, arguments, glob, limit)
    local ok, why = _M.can_enumerate(backend)
    if not ok then
        return nil, "cannot list the keys of " .. backend .. ": " .. why
    end
    local pat = glob and _M.glob_pattern(glob)
    local out = {}
    local function each(k, expired)
        if pat == nil or k:find(pat) then
            out[#out + 1] = { key = k, expired = expired }
            if limit and #out >= limit then
                return false
            end
        end
    end
    local res, err
    if backend == "dogpile.cache.lmdb" then
        res, err = with_lmdb(arguments.path, false, function(L, txn, dbi)
            return walk(L, txn, dbi, each)
        end)
    else
        local r
        r, err = redis_open(backend, arguments)
        if r then
            res, err = r:scan(glob, function(k)
                out[#out + 1] = { key = k }
                if limit and #out >= limit then
                    return false
                end
            end)
            r.sock:close()
        end
    end
    if not res then
        return nil, backend .. ": " .. tostring(err)
    end
    table.sort(out, function(a, b) return a.key < b.key end)
    return out
end

--- Delete every value of the region's storage: the count deleted; nil, err.
function _M.flush(backend, arguments)
    local ok, why = _M.can_enumerate(backend)
    if not ok then
        return nil, "cannot flush " .. backend .. " from the CLI: " .. why
    end
    local n = 0
    local res, err
    if backend == "dogpile.cache.lmdb" then
        res, err = with_lmdb(arguments.path, true, function(L, txn, dbi)
            return walk(L, txn, dbi, function()
                n = n + 1
                return "delete"
            end)
        end)
    else
        local r
        r, err = redis_open(backend, arguments)
        if r then
            local batch = {}
            local function drop()
                if #batch > 0 then
                    local d, e = r:call("DEL", unpack(batch))
                    if not d then
                        return nil, e
                    end
                    n = n + d
                    batch = {}
                end
                return true
            end
            local derr
            res, err = r:scan(nil, function(k)
                batch[#batch + 1] = k
                if #batch >= 500 then
                    local d, e = drop()
                    if not d then
                        derr = e
                        return false
                    end
                end
            end)
            if res and not derr then
                res, err = drop()
            elseif derr then
                res, err = nil, derr
            end
            r.sock:close()
        end
    end
    if not res then
        return nil, backend .. ": " .. tostring(err)
    end
    return n
end

local function info_field(info, name)
    local v = info:match("\n" .. name .. ":([^\r\n]*)") or info:match("^" .. name .. ":([^\r\n]*)")
    return tonumber(v)
end

--- What the storage holds, asked of the storage itself: a table of
-- {name, value, note} rows; nil, why when the CLI cannot ask.
function _M.stats(backend, arguments)
    if backend == "dogpile.cache.lmdb" then
        local rows
        local res, err = with_lmdb(arguments.path, false, function(L, txn, dbi)
            local items, expired = 0, 0
            local ok, e = walk(L, txn, dbi, function(_, exp)
                items = items + 1
                if exp then
                    expired = expired + 1
                end
            end)
            if not ok then
                return nil, e
            end
            local st = ffi_new("dp_cli_mdb_stat_t")
            L.dp_cli_mdb_stat(txn, dbi, st)
            local pages = tonumber(st.ms_branch_pages + st.ms_leaf_pages + st.ms_overflow_pages)
            rows = {
                { "items", items, "values in the file" },
                { "expired", expired, "of them past the backend's expiration_time" },
                { "bytes", pages * st.ms_psize, "pages the tree uses" },
            }
            return true
        end)
        if not res then
            return nil, backend .. ": " .. tostring(err)
        end
        return rows
    elseif backend == "dogpile.cache.redis" then
        local r, err = redis_open(backend, arguments)
        if not r then
            return nil, err
        end
        local size, info
        size, err = r:call("DBSIZE")
        if size then
            info, err = r:call("INFO")
        end
        local locks = 0
        if info then
            local lp = r.server.lock_prefix or "_lock"
            local ok2, e2 = r:call("SCAN", "0", "MATCH", lp:gsub("[%*%?%[%]\\]", "\\%0") .. "*",
                                   "COUNT", 1000)
            if ok2 then
                locks = #ok2[2]
            end
            err = ok2 and err or e2
        end
        r.sock:close()
        if not (size and info) then
            return nil, backend .. ": " .. tostring(err)
        end
        return {
            { "items", size, "keys in db " .. (r.server.db or 0) .. " (DBSIZE)" },
            { "locks", locks, "of them held locks (" .. (r.server.lock_prefix or "_lock") .. "*)" },
            { "bytes", info_field(info, "used_memory"), "the server's (used_memory)" },
            { "max_bytes", info_field(info, "maxmemory"), "the server's maxmemory (0: none)" },
            { "hits", info_field(info, "keyspace_hits"), "the server's, every db" },
            { "misses", info_field(info, "keyspace_misses"), "the server's, every db" },
            { "evictions", info_field(info, "evicted_keys"), "the server's" },
            { "expirations", info_field(info, "expired_keys"), "the server's" },
        }
    end
    return nil, select(2, _M.can_enumerate(backend))
end

return _M
