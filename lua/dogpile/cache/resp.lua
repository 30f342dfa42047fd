--- RESP (the Redis protocol) over nginx cosockets: what dogpile.cache.redis
-- and dogpile.cache.redis_sentinel speak inside nginx (the C backend,
-- hiredis, blocks the worker). One `server` describes where to connect and
-- how; every operation takes a connection from the worker's keepalive pool
-- (`ngx.socket.tcp` + `setkeepalive`), runs its command or pipeline and
-- gives the connection back.
--
-- Connections. The pool, its generations and the bounded exchange with one
-- retry are dogpile.cache.cosocket's (cosocket.Server). A new connection
-- (never reused from the pool) is set up first: AUTH, SELECT, and for a
-- sentinel-found master a ROLE check, as the C backend does. A READONLY,
-- LOADING or MASTERDOWN reply breaks the connection like an I/O error.
--
-- Sentinel. The master's address is asked of the sentinels (each in turn)
-- when the worker knows none, and forgotten on any connection failure or a
-- READONLY, LOADING or MASTERDOWN reply, so that the next operation asks
-- again: a failover is followed without reloading nginx.
--
-- Replies: a bulk string is a Lua string (`false` for a nil one), an
-- integer a number, an array a table (n = its length); the second result
-- says which (`"$"`, `":"`, `"*"`, `"+"` status, `"-"` error reply). A
-- failure is `nil, message`, the message naming the operation and server
-- as the C backend's do ("GET: no answer from 127.0.0.1:6379 within
-- socket_timeout (1 s)").
local lib = require "dogpile.lib"
local cosocket = require "dogpile.cache.cosocket"

local ngx = ngx
local byte, sub, find, format = string.byte, string.sub, string.find, string.format
local tonumber, tostring, type, pairs, ipairs, setmetatable =
      tonumber, tostring, type, pairs, ipairs, setmetatable
local line_in = cosocket.line_in

lib.own_source()

local _M = {}

local CRLF = "\r\n"

-- -- Replies -----------------------------------------------------------------------

local read_reply

-- An array of `n` replies (nested arrays allowed). An error reply inside an
-- array (EXEC, say) stays a string: only the type of the top level is given.
local function read_array(sock, n)
    local t = { n = n }
    for i = 1, n do
        local v, kind = read_reply(sock)
        if v == nil then
            return nil, kind
        end
        t[i] = v
    end
    return t, "*"
end

--- One reply from `sock`: value, kind; nil, err on an I/O or protocol error.
function read_reply(sock)
    local line, err, partial = sock:receive()
    if not line then
        if err == "timeout" and partial and partial ~= "" then
            -- Part of a reply came and is now consumed: the connection is
            -- out of step, whatever the caller does next.
            err = "timeout, mid-reply"
        end
        return nil, err
    end
    local c = byte(line)
    if c == 36 then -- $
        local n = tonumber(sub(line, 2))
        if n == nil then
            return nil, "protocol error: bad bulk length '" .. line .. "'"
        end
        if n < 0 then
            return false, "$"
        end
        local data, err2 = sock:receive(n + 2)
        if not data then
            return nil, err2
        end
        return sub(data, 1, n), "$"
    elseif c == 43 then -- +
        return sub(line, 2), "+"
    elseif c == 45 then -- -
        return sub(line, 2), "-"
    elseif c == 58 then -- :
        return tonumber(sub(line, 2)), ":"
    elseif c == 42 then -- *
        local n = tonumber(sub(line, 2))
        if n == nil then
            return nil, "protocol error: bad array length '" .. line .. "'"
        end
        if n < 0 then
            return false, "*"
        end
        return read_array(sock, n)
    end
    return nil, "protocol error: unexpected reply '" .. sub(line, 1, 40) .. "'"
end
_M.read_reply = read_reply

-- -- Replies read in chunks --------------------------------------------------------
-- A reply of bulk strings (GET's, MGET's) read in chunks (cosocket.line_in)
-- and cut up here: one cosocket call for a whole small reply where
-- receive() needs two per string (the length line, then the bytes).

-- From `buf` at `pos`: one bulk string (or nil bulk) whose bytes may not all
-- have arrived yet. Returns value (false: nil bulk), the new buf and pos;
-- or nil, err.
local function cut_bulk(sock, buf, pos)
    local e
    buf, pos, e = line_in(sock, buf, pos)
    if not buf then
        return nil, pos
    end
    if byte(buf, pos) ~= 36 then -- $
        return nil, "protocol error: expected a bulk string, got '" .. sub(buf, pos, e - 1) .. "'"
    end
    local n = tonumber(sub(buf, pos + 1, e - 1))
    if n == nil then
        return nil, "protocol error: bad bulk length"
    end
    if n < 0 then
        return false, buf, e + 2
    end
    local last = e + 1 + n + 2 -- the value's final \n
    if #buf < last then
        -- The rest is exactly known: read no further than the reply.
        local more, err = sock:receive(last - #buf)
        if not more then
            return nil, err
        end
        buf = buf .. more
    end
    return sub(buf, e + 2, e + 1 + n), buf, last + 1
end

--- A GET's reply: the value (false: nil), "$"; an error reply: message, "-";
-- nil, err on an I/O or protocol error.
function _M.read_bulk(sock)
    local buf, err, e = line_in(sock, nil, 1)
    if not buf then
        return nil, err
    end
    local c = byte(buf)
    if c == 45 or c == 43 or c == 58 then -- -, +, : (one line)
        return sub(buf, 2, e - 1), c == 45 and "-" or c == 43 and "+" or ":"
    end
    local v, rest = cut_bulk(sock, buf, 1)
    if v == nil then
        return nil, rest
    end
    return v, "$"
end

--- An MGET's reply of `n` bulk strings into `out` (false for a nil one):
-- out, "*"; an error reply: message, "-"; nil, err.
function _M.read_bulks(sock, n, out)
    local buf, err, e = line_in(sock, nil, 1)
    if not buf then
        return nil, err
    end
    local c = byte(buf)
    if c == 45 then
        return sub(buf, 2, e - 1), "-"
    elseif c ~= 42 or tonumber(sub(buf, 2, e - 1)) ~= n then
        return nil, "protocol error: unexpected reply '" .. sub(buf, 1, e - 1) .. "'"
    end
    local pos = e + 2
    for i = 1, n do
        local v
        v, buf, pos = cut_bulk(sock, buf, pos)
        if v == nil then
            return nil, buf
        end
        out[i] = v
    end
    return out, "*"
end

-- -- Requests ----------------------------------------------------------------------

--- Append the command `args` (an array of strings and numbers, `n` of them)
-- to the fragments `out` from index `i`; returns the next index. The
-- fragments go to sock:send as they are (no concatenation).
local function encode_into(out, i, args, n)
    out[i] = "*"
    out[i + 1] = n
    out[i + 2] = CRLF
    i = i + 3
    for k = 1, n do
        local a = tostring(args[k])
        out[i] = "$"
        out[i + 1] = #a
        out[i + 2] = CRLF
        out[i + 3] = a
        out[i + 4] = CRLF
        i = i + 5
    end
    return i
end
_M.encode_into = encode_into

--- The fragments of one command.
function _M.encode(args)
    local out = {}
    encode_into(out, 1, args, args.n or #args)
    return out
end

-- -- Servers -----------------------------------------------------------------------

local Server = cosocket.server_class()
_M.Server = Server

--- Where the server is, for messages.
function Server:where()
    if self.sentinels then
        return format("master '%s' at %s", self.service,
                      self.master_host and (self.master_host .. ":" .. self.master_port)
                      or "(unknown)")
    elseif self.unix then
        return "unix:" .. self.unix
    end
    return self.host .. ":" .. self.port
end

-- The pool's name says where, as whom and which db.
function Server:pool_name(addr)
    return format("dogpile.redis:%s/%d/%s/%s", addr, self.db, self.username or "",
                  self.password and ngx.crc32_long(self.password) or "")
end

-- `port` nil: `host` is a unix socket's path.
local function raw_connect(self, host, port, opts)
    local addr = port and (host .. ":" .. port) or ("unix:" .. host)
    local sock, err = self:open(port and host or addr, port, opts)
    if not sock then
        if err == "timeout" then
            return nil, format("cannot connect to %s within connect_timeout (%g s)", addr,
                               self.connect_timeout)
        end
        return nil, "cannot connect to " .. addr .. ": " .. tostring(err)
    end
    return sock
end

--- A failure while talking to the server: a timeout says so with the limit.
function Server:io_fail(op, err)
    if cosocket.timed_out(err) then
        return format("%s: no answer from %s within socket_timeout (%g s)", op, self:where(),
                      self.socket_timeout)
    end
    return format("%s: %s: %s", op, self:where(), tostring(err or "connection lost"))
end

-- One command on a connection being set up; a refusal is a configuration
-- error ("AUTH with the password refused: WRONGPASS ...").
local function setup_cmd(self, sock, args, what)
    local ok, err = sock:send(_M.encode(args))
    local v, kind
    if ok then
        v, kind = read_reply(sock)
    end
    if not ok or v == nil then
        return nil, self:io_fail(what, err or kind)
    end
    if kind == "-" then
        return nil, what .. " refused: " .. v
    end
    return v, kind
end

-- Ask each sentinel in turn for the master's address.
local function find_master(self)
    local last = "no sentinel answered"
    for _, s in ipairs(self.sentinels) do
        local sock, err = raw_connect(self, s[1], s[2], nil)
        if not sock then
            last = err
        else
            local v, kind = setup_cmd(self, sock, { "SENTINEL", "get-master-addr-by-name",
                                                    self.service, n = 3 },
                                      format("sentinel %s:%d", s[1], s[2]))
            if v and kind == "*" and type(v[1]) == "string" and type(v[2]) == "string" then
                self:keep(sock)
                self.master_host, self.master_port = v[1], tonumber(v[2])
                return true
            end
            sock:close()
            if v == nil then
                last = kind
            else
                last = format("sentinel %s:%d knows no master named '%s'", s[1], s[2],
                              self.service)
            end
        end
    end
    return nil, format("cannot find the master of '%s' through %d sentinel(s): %s",
                       self.service, #self.sentinels, last)
end

-- A fresh connection: authenticated, on its db, and (sentinel) to a master.
local function setup(self, sock)
    local ok, err = true, nil
    if self.password then
        if self.username then
            ok, err = setup_cmd(self, sock, { "AUTH", self.username, self.password, n = 3 },
                                "AUTH as user '" .. self.username .. "'")
        else
            ok, err = setup_cmd(self, sock, { "AUTH", self.password, n = 2 },
                                "AUTH with the password")
        end
    end
    if ok and self.db ~= 0 then
        ok, err = setup_cmd(self, sock, { "SELECT", self.db, n = 2 },
                            "SELECT of db " .. self.db)
    end
    if ok and self.sentinels then
        local v
        v, err = setup_cmd(self, sock, { "ROLE", n = 1 }, "ROLE")
        ok = v ~= nil
        if ok and not (type(v) == "table" and v[1] == "master") then
            ok, err = nil, format("%s:%d, given by the sentinels as the master of '%s', is not "
                                  .. "a master (yet)", self.master_host, self.master_port,
                                  self.service)
        end
    end
    return ok, err
end

--- Forget what a failure may have made wrong: the pooled connections (a new
-- generation) and, with sentinels, the master's address.
function Server:broken()
    cosocket.Server.broken(self)
    if self.sentinels then
        self.master_host, self.master_port = nil, nil
    end
end

--- A connection: sock, reused (true when it came from the pool); or nil, err.
function Server:connect()
    local host, port, known = self.host, self.port, self.master_host ~= nil
    if self.sentinels then
        if not known then
            local ok, err = find_master(self)
            if not ok then
                return nil, err
            end
        end
        host, port = self.master_host, self.master_port
    elseif self.unix then
        host, port = self.unix, nil
    end
    local sock, err = raw_connect(self, host, port,
                                  self:pool_opts(port and (host .. ":" .. port) or host))
    if not sock and known and not find(err, "within connect_timeout", 1, true) then
        -- A master this worker knew is gone (refused, not slow): the
        -- sentinels may already name its successor. Ask once more now.
        self:broken()
        local ok = find_master(self)
        if ok and (self.master_host ~= host or self.master_port ~= port) then
            host, port = self.master_host, self.master_port
            sock, err = raw_connect(self, host, port, self:pool_opts(host .. ":" .. port))
        end
    end
    if not sock then
        self:broken()
        return nil, err
    end
    if sock:getreusedtimes() > 0 then
        return sock, true
    end
    local ok
    ok, err = setup(self, sock)
    if not ok then
        sock:close()
        self:broken()
        return nil, err
    end
    return sock, false
end

-- A reply after which this connection (and, with sentinels, this master)
-- must not be used again.
local function breaks(v, kind)
    return kind == "-" and (find(v, "^READONLY") or find(v, "^LOADING")
                            or find(v, "^MASTERDOWN")) ~= nil
end

function Server:settle(sock, op, v, kind)
    if breaks(v, kind) then
        sock:close()
        local w = self:where()
        self:broken()
        return nil, format("%s: %s: %s", op, w, v)
    end
    self:keep(sock)
    return v, kind
end

-- `n` replies of a pipeline: an array of values and one of kinds.
local function read_replies(sock, n)
    local vs, kinds = {}, {}
    for i = 1, n do
        local v, kind = read_reply(sock)
        if v == nil then
            return nil, kind
        end
        vs[i], kinds[i] = v, kind
    end
    return vs, kinds
end

--- Send `req` (fragments, see encode_into) and read `nrep` replies (1 when
-- nil). One reply: value, kind. Several: an array of values and one of
-- kinds. nil, err on failure (connection, I/O, protocol, or a reply that
-- breaks the connection); an ordinary error reply is returned as kind "-".
-- `reader` (optional, one reply): reads it instead of read_reply, as
-- reader(sock, ra, rb) (read_bulk, read_bulks).
function Server:call(op, req, nrep, reader, ra, rb)
    if nrep then
        return self:exchange(op, req, read_replies, nrep)
    end
    return self:exchange(op, req, reader or read_reply, ra, rb)
end

--- One command (an array of strings and numbers): value, kind or nil, err.
function Server:command(op, args)
    return self:call(op, _M.encode(args))
end

-- -- Configuration -------------------------------------------------------------------

-- "redis://[user:password@]host[:port][/db]" or "unix:///path[?db=N]", as
-- the C backend reads it.
local function parse_url(s, name, url)
    if sub(url, 1, 7) == "unix://" then
        local path, q = url:match("^unix://([^?]*)%??(.*)$")
        if q ~= "" then
            local db = q:match("^db=(%d+)$")
            if not db then
                return nil, name .. ": url '" .. url .. "': the only query is ?db=N"
            end
            s.db = tonumber(db)
        end
        if sub(path, 1, 1) ~= "/" then
            return nil, name .. ": url '" .. url .. "' needs an absolute socket path "
                        .. "(unix:///path/to/socket)"
        end
        s.unix = path
        return true
    end
    if sub(url, 1, 8) ~= "redis://" then
        return nil, name .. ": url '" .. url .. "' must start with redis:// or unix://"
    end
    local p = sub(url, 9)
    local userinfo, rest = p:match("^(.*)@([^@]*)$")
    if userinfo then
        p = rest
        local user, pass = userinfo:match("^([^:]*):(.*)$")
        if user then
            s.password = pass
            if user ~= "" then
                s.username = user
            end
        elseif userinfo ~= "" then
            s.password = userinfo -- redis://password@host, as redis-py reads it
        end
    end
    local hostport, db = p:match("^([^/]*)/?(.*)$")
    if db ~= "" then
        if not db:match("^%d+$") then
            return nil, name .. ": url: db '" .. db .. "' is not a number"
        end
        s.db = tonumber(db)
    end
    local host, port = hostport:match("^(.*):(%d+)$")
    if not host then
        host = hostport
    else
        s.port = tonumber(port)
    end
    host = host:match("^%[(.*)%]$") or host
    if host ~= "" then
        s.host = host
    end
    return true
end

local KNOWN = "url, host, port, db, username, password, socket_timeout, connect_timeout, "
    .. "redis_expiration_time, lock_timeout, lock_sleep, lock_prefix, "
    .. "notify_channel, notify_feed, circuit_failures, circuit_cooldown, circuit_slow, "
    .. "pool_size, pool_idle_timeout"

local function seconds(name, k, v)
    if type(v) ~= "number" or not (v > 0) or v == math.huge then
        return nil, name .. ": " .. k .. " must be a positive number of seconds"
    end
    return v
end

--- The server (and the backend's settings) from the arguments of
-- dogpile.cache.redis or dogpile.cache.redis_sentinel: the same names,
-- defaults and checks as the C backend's, plus pool_size and
-- pool_idle_timeout. `sentinels` is {{host, port}, ...}. nil, err on a bad
-- argument.
function _M.server(name, arguments, sentinels)
    local s = setmetatable({
        name = name, host = "127.0.0.1", port = 6379, db = 0, socket_timeout = 1,
        connect_timeout = 1, lock_timeout = 30, lock_sleep = 0.1, lock_prefix = "_lock",
        ttl = 0, gen = 0,
    }, Server)
    if arguments.url ~= nil then
        if type(arguments.url) ~= "string" then
            return nil, name .. ": url must be a string"
        end
        local ok, err = parse_url(s, name, arguments.url)
        if not ok then
            return nil, err
        end
    end
    local keys = {}
    for k in pairs(arguments) do
        keys[#keys + 1] = k
    end
    table.sort(keys)
    for _, k in ipairs(keys) do
        local v, err = arguments[k], nil
        if k == "url" or (sentinels and (k == "sentinels" or k == "service_name")) then
            if k == "service_name" then
                if type(v) ~= "string" then
                    return nil, name .. ": service_name must be a string"
                end
                s.service = v
            end
        elseif k == "host" or k == "username" or k == "password" or k == "lock_prefix"
            or k == "notify_channel" or k == "notify_feed" then
            if type(v) ~= "string" then
                return nil, name .. ": " .. k .. " must be a string"
            end
            s[k] = v
        elseif k == "port" or k == "db" then
            if type(v) ~= "number" or v < 0 or v > 65535 or v ~= math.floor(v) then
                return nil, name .. ": " .. k .. " must be a non-negative integer"
            end
            s[k] = v
        elseif k == "socket_timeout" or k == "connect_timeout" or k == "lock_timeout"
            or k == "lock_sleep" then
            s[k], err = seconds(name, k, v)
        elseif k == "redis_expiration_time" then
            s.ttl, err = seconds(name, k, v)
        elseif k == "circuit_failures" or k == "circuit_cooldown" or k == "circuit_slow" then
            -- The C core's circuit breaker (core/breaker.c): accepted so
            -- that one regions file serves both; not applied over cosockets.
            if type(v) ~= "number" or v < 0 or v ~= v then
                return nil, name .. ": " .. k .. " must be a number >= 0"
            end
        elseif k ~= "distributed_lock" and k ~= "pool_size" and k ~= "pool_idle_timeout" then
            return nil, format("%s: unknown argument '%s' (known: %s%s)", name, tostring(k),
                               sentinels and "sentinels, service_name, " or "", KNOWN)
        end
        if err then
            return nil, err
        end
    end
    local idle
    s.pool_size, idle = cosocket.pool_args(name, arguments.pool_size, arguments.pool_idle_timeout,
                                           "worker")
    if not s.pool_size then
        return nil, idle
    end
    s.pool_idle_timeout = idle
    if s.notify_feed and not s.notify_channel then
        return nil, name .. ": notify_feed needs notify_channel"
    elseif s.notify_channel == "" then
        return nil, name .. ": notify_channel must not be empty"
    end
    if sentinels then
        if #sentinels == 0 or not s.service then
            return nil, name .. ": the arguments 'sentinels' (a list of {host, port}) and "
                        .. "'service_name' are required"
        end
        s.sentinels = sentinels
    end
    s.socket_ms = math.max(1, math.floor(s.socket_timeout * 1000 + 0.5))
    s.connect_ms = math.max(1, math.floor(s.connect_timeout * 1000 + 0.5))
    s.idle_ms = math.floor(s.pool_idle_timeout * 1000 + 0.5)
    s.ttl_ms = s.ttl > 0 and math.ceil(s.ttl * 1000) or nil
    return s
end

return _M
