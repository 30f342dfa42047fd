--- memcached's text protocol over nginx cosockets, and where a key lives:
-- what dogpile.cache.memcached speaks inside nginx (libmemcached, the C
-- backend, would block the worker). A `ring` holds the servers of one url
-- list and places keys on them exactly as libmemcached's ketama setup in
-- backends/memcached.c does; every operation takes a connection from the
-- worker's keepalive pool of its server (`ngx.socket.tcp` + `setkeepalive`),
-- sends its command(s), reads the replies and gives the connection back.
--
-- Placement. libmemcached 1.x with MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA
-- and no weights puts 100 points per server on a circle of 32-bit hashes,
-- point i of a server at hash("host:port-i") ("host-i" when the port is
-- 11211), the key at hash(key), and the key goes to the first point at or
-- after it (wrapping). Both hashes are the hashkit's base hash, Jenkins'
-- one-at-a-time over C's signed chars: MEMCACHED_BEHAVIOR_KETAMA_HASH (the
-- `hash` argument) sets the hashkit's distribution hash, which libmemcached
-- never reads, so it moves no key. One server: every key, no hashing.
-- spec/ngx_memcached_spec.lua checks this against libmemcached's own
-- placement of keys that a plain process stored.
--
-- Failures, as libmemcached counts them for the C backend: a server that
-- cannot be connected to is left alone for retry_timeout (operations on its
-- keys fail at once, naming the failure), then tried again, so a restarted
-- server is used again without reloading nginx; with remove_failed_servers,
-- server_failure_limit such failures in a row take it off the circle for
-- dead_timeout (its keys move meanwhile). Each worker keeps its own counts.
-- The pool, its generations and the bounded exchange with one retry are
-- dogpile.cache.cosocket's (cosocket.Server); a connection that got an error
-- reply is closed, never pooled.
local bit = require "bit"
local cosocket = require "dogpile.cache.cosocket"

local ngx = ngx
local bxor, lshift, rshift, tobit = bit.bxor, bit.lshift, bit.rshift, bit.tobit
local byte, sub, find, format = string.byte, string.sub, string.find, string.format
local tonumber, tostring, setmetatable, floor = tonumber, tostring, setmetatable, math.floor
local sort = table.sort
local line_in = cosocket.line_in

local _M = {}

-- libmemcached's MEMCACHED_POINTS_PER_SERVER and MEMCACHED_DEFAULT_PORT.
local POINTS = 100
local DEFAULT_PORT = 11211

-- -- Placement --------------------------------------------------------------------

--- Jenkins' one-at-a-time hash as libhashkit computes it: bytes read as C's
-- (signed) char on the platforms nginx runs on, so a byte above 127 adds
-- its sign-extended value.
local function one_at_a_time(s)
    local v = 0
    for i = 1, #s do
        local c = byte(s, i)
        if c >= 128 then
            c = c - 256
        end
        v = tobit(v + c)
        v = tobit(v + lshift(v, 10))
        v = bxor(v, rshift(v, 6))
    end
    v = tobit(v + lshift(v, 3))
    v = bxor(v, rshift(v, 11))
    v = tobit(v + lshift(v, 15))
    if v < 0 then
        return v + 4294967296
    end
    return v
end
_M.one_at_a_time = one_at_a_time

-- The circle of the servers not taken off it: parallel arrays of point
-- hashes and server indexes, sorted by hash then index (libmemcached's
-- continuum_item_cmp).
local function build(ring, now)
    local pts = {}
    local next_rebuild = false
    for idx, s in ipairs(ring) do
        if s.ejected_until and s.ejected_until > now then
            if not next_rebuild or s.ejected_until < next_rebuild then
                next_rebuild = s.ejected_until
            end
        else
            s.ejected_until = nil
            for i = 0, POINTS - 1 do
                local name = s.port == DEFAULT_PORT and (s.host .. "-" .. i)
                    or (s.host .. ":" .. s.port .. "-" .. i)
                pts[#pts + 1] = { one_at_a_time(name), idx }
            end
        end
    end
    sort(pts, function(a, b)
        if a[1] ~= b[1] then
            return a[1] < b[1]
        end
        return a[2] < b[2]
    end)
    local hashes, owners = {}, {}
    for i = 1, #pts do
        hashes[i], owners[i] = pts[i][1], pts[i][2]
    end
    ring.hashes, ring.owners, ring.npoints, ring.next_rebuild = hashes, owners, #pts,
        next_rebuild
end

--- The server of `key` (1 server: no hashing, as libmemcached).
local function server_of(ring, key)
    if ring.n == 1 then
        return ring[1]
    end
    if ring.next_rebuild and ngx.now() >= ring.next_rebuild then
        build(ring, ngx.now())
    end
    local n = ring.npoints
    if n == 0 then
        -- Every server taken off: libmemcached answers from the old circle
        -- (nothing rebuilt); ask the one the key hashed to before.
        build(ring, math.huge)
        n = ring.npoints
    end
    local hashes = ring.hashes
    local h = one_at_a_time(key)
    local lo, hi = 1, n + 1
    while lo < hi do
        local mid = floor((lo + hi) / 2)
        if hashes[mid] < h then
            lo = mid + 1
        else
            hi = mid
        end
    end
    if lo > n then
        lo = 1
    end
    return ring[ring.owners[lo]]
end
_M.server_of = server_of

-- -- Servers ----------------------------------------------------------------------

local Server = cosocket.server_class()
_M.Server = Server

function Server:where()
    return self.addr
end

function Server:pool_name(addr)
    return "dogpile.memcached:" .. addr
end

--- A failure while talking to the server, for messages: "<op> on server
-- h:p: <what>", as the C backend's.
function Server:io_fail(op, err)
    if cosocket.timed_out(err) then
        return format("%s on server %s: no answer within socket_timeout (%g s)", op, self.addr,
                      self.ring.socket_timeout)
    end
    return format("%s on server %s: %s", op, self.addr, tostring(err or "connection lost"))
end

-- A connect failure: count it, and leave the server alone for
-- retry_timeout (or, with remove_failed_servers after
-- server_failure_limit in a row, take it off the circle for dead_timeout).
local function connect_failed(self, msg)
    local ring = self.ring
    local now = ngx.now()
    self.failures = self.failures + 1
    self.retry_at = now + ring.retry_timeout
    self.last_error = msg
    if ring.remove_failed and self.failures >= ring.failure_limit and ring.n > 1 then
        self.failures = ring.failure_limit - 1
        self.ejected_until = now + ring.dead_timeout
        self.retry_at = self.ejected_until
        build(ring, now)
    end
    self:broken()
end

--- A connection: sock, reused (true when from the pool); or nil, err.
function Server:connect(op)
    local ring = self.ring
    if self.retry_at > 0 then
        local now = ngx.now()
        if now < self.retry_at then
            return nil, format("%s on server %s: not tried again until %.1f s after its last "
                               .. "failure (retry_timeout %g s): %s", op, self.addr,
                               ring.retry_timeout, ring.retry_timeout, self.last_error)
        end
    end
    local sock, reused = self:open(self.host, self.port, self:pool_opts(self.addr))
    if not sock then
        local err, msg = reused, nil
        if err == "timeout" then
            msg = format("cannot connect within connect_timeout (%g s)", ring.connect_timeout)
        else
            msg = "cannot connect: " .. tostring(err)
        end
        connect_failed(self, msg)
        return nil, format("%s on server %s: %s", op, self.addr, msg)
    end
    self.failures, self.retry_at = 0, 0
    return sock, reused
end

function Server:settle(sock, _, r1, r2)
    if r2 == "error" then
        sock:close()
    else
        self:keep(sock)
    end
    return r1, r2
end

--- Send `req` (a string or an array of strings) and read its reply with
-- `reader(sock, a, b)`, which returns r1, r2 (r1 nil: r2 is an I/O or
-- protocol error; r2 == "error": r1 is the server's error reply, and the
-- connection is not pooled). Returns r1, r2, or nil and the message
-- "<op> on server h:p: ...".
Server.call = Server.exchange

-- -- Replies ----------------------------------------------------------------------

-- An error reply line ("ERROR", "CLIENT_ERROR ...", "SERVER_ERROR ...").
local function is_error(line)
    local c = byte(line)
    return (c == 69 and find(line, "^ERROR") ~= nil) -- E
        or (c == 67 and find(line, "^CLIENT_ERROR") ~= nil) -- C
        or (c == 83 and find(line, "^SERVER_ERROR") ~= nil) -- S
end

--- A get's (or gets') reply to one key, read in as few cosocket calls as
-- the reply allows (one for a small value): value, "hit" (value, cas with
-- `gets`); false, "miss"; the error line, "error"; nil, err.
function _M.read_value(sock, with_cas)
    local buf, err, e = line_in(sock, nil, 1)
    if not buf then
        return nil, err
    end
    if e == 4 and byte(buf, 1) == 69 and sub(buf, 1, 3) == "END" then
        if #buf ~= 5 then
            return nil, "protocol error: bytes after END"
        end
        return false, "miss"
    end
    local _, n, cas
    if with_cas then
        _, _, n, cas = find(buf, "^VALUE %S+ %d+ (%d+) (%d+)\r\n")
    else
        _, _, n = find(buf, "^VALUE %S+ %d+ (%d+)\r\n")
    end
    if not n then
        local line = sub(buf, 1, e - 1)
        if is_error(line) then
            return line, "error"
        end
        return nil, "protocol error: unexpected reply '" .. sub(line, 1, 60) .. "'"
    end
    n = tonumber(n)
    local last = e + 1 + n + 7 -- the value, "\r\nEND\r\n"
    if #buf < last then
        -- The rest is exactly known: read no further than the reply.
        local more, err2 = sock:receive(last - #buf)
        if not more then
            return nil, err2
        end
        buf = buf .. more
    elseif #buf > last then
        return nil, "protocol error: bytes after END"
    end
    if sub(buf, last - 6) ~= "\r\nEND\r\n" then
        return nil, "protocol error: a value not followed by END"
    end
    return sub(buf, e + 2, e + 1 + n), with_cas and cas or "hit"
end

--- One status line ("STORED", "NOT_STORED", "EXISTS", "NOT_FOUND",
-- "DELETED", a number for incr): line, "ok"; error line, "error"; nil, err.
function _M.read_line(sock)
    local line, err = sock:receive("*l")
    if not line then
        return nil, err
    end
    if is_error(line) then
        return line, "error"
    end
    return line, "ok"
end

--- `n` status lines (a pipeline): array, "ok" (an error line stays in the
-- array, marked by "error" as the second result); nil, err.
function _M.read_lines(sock, n)
    local out, kind = {}, "ok"
    for i = 1, n do
        local line, err = sock:receive("*l")
        if not line then
            return nil, err
        end
        if is_error(line) then
            kind = "error"
        end
        out[i] = line
    end
    return out, kind
end

--- The replies of `ngets` pipelined multi-key gets: values into `out` by
-- key; count, "ok"; error line, "error"; nil, err.
function _M.read_values(sock, ngets, out)
    local buf, pos, ends, found = "", 1, 0, 0
    while ends < ngets do
        local e
        buf, pos, e = line_in(sock, buf, pos)
        if not buf then
            return nil, pos
        end
        local line = sub(buf, pos, e - 1)
        pos = e + 2
        if line == "END" then
            ends = ends + 1
        else
            local key, n = line:match("^VALUE (%S+) %d+ (%d+)")
            if not key then
                if is_error(line) then
                    return line, "error"
                end
                return nil, "protocol error: unexpected reply '" .. sub(line, 1, 60) .. "'"
            end
            n = tonumber(n)
            local have = #buf - pos + 1
            if have < n + 2 then
                local more, err = sock:receive(n + 2 - have)
                if not more then
                    return nil, err
                end
                buf, pos = sub(buf, pos) .. more, 1
            end
            if sub(buf, pos + n, pos + n + 1) ~= "\r\n" then
                return nil, "protocol error: a value not followed by CRLF"
            end
            out[key] = sub(buf, pos, pos + n - 1)
            found = found + 1
            pos = pos + n + 2
        end
    end
    if pos <= #buf then
        return nil, "protocol error: bytes after END"
    end
    return found, "ok"
end

--- `stats settings`: the table of its STAT lines, "ok"; nil, err.
function _M.read_stats(sock)
    local t = {}
    for _ = 1, 1000 do
        local line, err = sock:receive("*l")
        if not line then
            return nil, err
        end
        if line == "END" then
            return t, "ok"
        end
        local k, v = line:match("^STAT (%S+) (.*)$")
        if not k then
            if is_error(line) then
                return line, "error"
            end
            return nil, "protocol error: unexpected reply '" .. sub(line, 1, 60) .. "'"
        end
        t[k] = v
    end
    return nil, "protocol error: stats without END"
end

-- -- The ring ---------------------------------------------------------------------

--- The ring of the servers in `url` ("host:port,host:port", already checked
-- by the C backend's argument reader) with the settings `opts`:
-- socket_timeout, connect_timeout, retry_timeout, dead_timeout,
-- failure_limit, remove_failed, pool_size, pool_idle_timeout.
function _M.ring(url, opts)
    local ring = {
        n = 0, socket_timeout = opts.socket_timeout, connect_timeout = opts.connect_timeout,
        retry_timeout = opts.retry_timeout, dead_timeout = opts.dead_timeout,
        failure_limit = opts.failure_limit, remove_failed = opts.remove_failed,
    }
    -- Rounded up, as the C backend hands them to libmemcached.
    local socket_ms = math.max(1, math.ceil(opts.socket_timeout * 1000))
    local connect_ms = math.max(1, math.ceil(opts.connect_timeout * 1000))
    local idle_ms = math.floor(opts.pool_idle_timeout * 1000 + 0.5)
    for item in url:gmatch("[^,]+") do
        local host, port = item:match("^([^:]+):(%d+)$")
        if not host then
            host, port = item, DEFAULT_PORT
        end
        port = tonumber(port)
        local s = setmetatable({
            ring = ring, host = host, port = port, addr = host .. ":" .. port,
            socket_ms = socket_ms, connect_ms = connect_ms, idle_ms = idle_ms,
            pool_size = opts.pool_size, gen = 0, failures = 0, retry_at = 0, last_error = nil,
        }, Server)
        ring.n = ring.n + 1
        ring[ring.n] = s
    end
    build(ring, 0)
    return ring
end

return _M
