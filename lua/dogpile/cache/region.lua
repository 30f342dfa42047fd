--- CacheRegion: a backend, an expiration time, a key generator and an
-- optional key mangler, with get/set/delete and get_or_create under the lock.
local ffi = require "ffi"
local lib = require "dogpile.lib"
local dogpile = require "dogpile"
local api = require "dogpile.cache.api"
local proxy = require "dogpile.cache.proxy"
local util = require "dogpile.cache.util"
local envelope = require "dogpile.cache.envelope"
local CBackend = require("dogpile.cache.backends.c").CBackend
local memory_backend = require "dogpile.cache.backends.memory"

local C = lib.C
local clock_upper = lib.clock_upper
local raise = lib.raise
local NO_VALUE = api.NO_VALUE
local VALUE_VERSION = api.VALUE_VERSION
local CachedValue = api.CachedValue
local is_callable = dogpile.is_callable
local run = dogpile._run
local core_mutex = dogpile.core_mutex
local rawequal, next, type, pairs, ipairs, tostring, select, setmetatable, getmetatable, rawget,
      pcall, error, unpack, require = rawequal, next, type, pairs, ipairs, tostring, select, setmetatable, getmetatable, rawget,
      pcall, error, unpack, require
local sort, concat = table.sort, table.concat
local char, byte = string.char, string.byte

lib.own_source()

local _M = {}

-- -- Invalidation --------------------------------------------------------------

--- dogpile.cache's DefaultInvalidationStrategy: one invalidation time, hard or
-- soft, kept in this region object.
local DefaultInvalidation = {}
DefaultInvalidation.__index = DefaultInvalidation
_M.DefaultInvalidationStrategy = DefaultInvalidation

function DefaultInvalidation.new()
    return setmetatable({ _hard = nil, _invalidated = nil }, DefaultInvalidation)
end

function DefaultInvalidation:invalidate(hard)
    self._hard = hard ~= false
    self._invalidated = C.dp_clock_stamp()
end

function DefaultInvalidation:is_invalidated(ct)
    local at = self._invalidated
    return at ~= nil and ct < at
end

function DefaultInvalidation:was_hard_invalidated()
    return self._hard == true
end

function DefaultInvalidation:is_hard_invalidated(ct)
    return self._hard == true and self:is_invalidated(ct)
end

function DefaultInvalidation:was_soft_invalidated()
    return self._hard == false
end

function DefaultInvalidation:is_soft_invalidated(ct)
    return self._hard == false and self:is_invalidated(ct)
end

local INVALIDATOR_METHODS = { "invalidate", "is_invalidated", "is_hard_invalidated",
    "is_soft_invalidated", "was_hard_invalidated", "was_soft_invalidated" }

-- -- The envelope of serialized values ------------------------------------------
-- (dogpile/cache/envelope.lua): magic, format, flags, the created time, then
-- the payload.

local HEADER = envelope.HEADER
local pack_envelope, unpack_envelope = envelope.pack, envelope.unpack
local read_value, created_at, write_scalar = envelope.read, envelope.created, envelope.write_scalar
local u8p = envelope.u8p
local ffi_string, ffi_cast = ffi.string, ffi.cast
local DP_OK, DP_ENOTFOUND = lib.DP_OK, lib.DP_ENOTFOUND

_M.pack_envelope, _M.unpack_envelope = pack_envelope, unpack_envelope

-- -- Region ----------------------------------------------------------------------

local Region = {}
-- A configured region looks its methods up in Region directly (the hit path);
-- an unconfigured one goes through a function that refuses `backend`.
local CONFIGURED = { __index = Region }
local UNCONFIGURED = {
    __index = function(self, k)
        local v = Region[k]
        if v ~= nil then
            return v
        end
        if k == "backend" or k == "actual_backend" then
            raise("dogpile.cache: region " .. self:_label() .. " is not configured; "
                  .. "call region:configure(backend_name, opts) first")
        end
        return nil
    end,
}
_M.Region = Region

function Region:_label()
    local name = rawget(self, "name")
    return name and ("'" .. tostring(name) .. "'") or "(unnamed)"
end

local MAKE_OPTS = {
    name = "string", function_key_generator = "function",
    function_multi_key_generator = "function", key_mangler = "function",
    serializer = "function", deserializer = "function", async_creation_runner = "function",
}
_M.MAKE_OPTS = MAKE_OPTS

local CONFIGURE_OPTS = {
    expiration_time = "number", arguments = "table", wrap = "table",
    replace_existing_backend = "boolean", region_invalidator = "table", fail_open = "boolean",
}
_M.CONFIGURE_OPTS = CONFIGURE_OPTS

local function check_opts(who, opts, allowed)
    if opts == nil then
        return {}
    end
    if type(opts) ~= "table" then
        raise("dogpile.cache: " .. who .. ": options must be a table, got " .. type(opts))
    end
    for k, v in pairs(opts) do
        local want = allowed[k]
        if not want then
            raise("dogpile.cache: " .. who .. ": unknown option '" .. tostring(k) .. "'")
        end
        local ok = type(v) == want or (want == "function" and is_callable(v))
        if k == "key_mangler" and v == "sha1" then
            ok = true
        end
        if not ok then
            raise("dogpile.cache: " .. who .. ": " .. k .. " must be a " .. want .. ", got " .. type(v))
        end
    end
    return opts
end

-- Regions by creation sequence number, weak keys: see _M.regions().
local REGIONS = setmetatable({}, { __mode = "k" })
local REGIONS_SEQ = 0

--- `cache.make_region(opts)`.
function _M.make_region(opts)
    opts = check_opts("make_region", opts, MAKE_OPTS)
    local mangler = opts.key_mangler
    if mangler == "sha1" then
        mangler = util.sha1_mangle_key
    end
    local self = {
        name = opts.name,
        function_key_generator = opts.function_key_generator or util.function_key_generator,
        function_multi_key_generator = opts.function_multi_key_generator
            or util.function_multi_key_generator,
        key_mangler = mangler,
        _user_key_mangler = mangler ~= nil,
        serializer = opts.serializer,
        deserializer = opts.deserializer,
        async_creation_runner = opts.async_creation_runner,
        is_configured = false,
        region_invalidator = DefaultInvalidation.new(),
    }
    REGIONS_SEQ = REGIONS_SEQ + 1
    REGIONS[self] = REGIONS_SEQ
    return setmetatable(self, UNCONFIGURED)
end

--- Every region made in this Lua state and still alive, in creation order
-- (for cache.metrics()). The registry holds them weakly: an unreferenced
-- region is still collected.
function _M.regions()
    local out = {}
    for r in pairs(REGIONS) do
        out[#out + 1] = r
    end
    sort(out, function(a, b) return REGIONS[a] < REGIONS[b] end)
    return out
end

local function new_stats()
    return { hits = 0, misses = 0, creations = 0, stale_served = 0, lock_waits = 0,
             errors = 0, evictions = 0 }
end

--- Wrap the backend in proxies: the first in `wrap` is outermost.
local function apply_wrap(backend, wrap)
    for i = #wrap, 1, -1 do
        local p = wrap[i]
        if proxy.is_class(p) then
            p = p.new()
        elseif not proxy.is_instance(p) then
            raise("dogpile.cache: configure: wrap[" .. i .. "] is not a ProxyBackend class "
                  .. "or instance (got " .. type(p) .. ")")
        end
        backend = p:wrap(backend) or p
    end
    return backend
end

--- `region:configure(backend_name, opts)` -> region.
-- @raise when already configured, on an unknown backend or a bad option
function Region:configure(backend_name, opts)
    opts = check_opts("configure", opts, CONFIGURE_OPTS)
    if rawget(self, "is_configured") and not opts.replace_existing_backend then
        raise("dogpile.cache: region " .. self:_label() .. " is already configured with backend '"
              .. tostring(self._backend_name) .. "'; pass replace_existing_backend = true to replace it")
    end
    if type(backend_name) ~= "string" then
        raise("dogpile.cache: configure: backend name must be a string, got " .. type(backend_name))
    end
    local inv = opts.region_invalidator
    if inv then
        for _, m in ipairs(INVALIDATOR_METHODS) do
            if not is_callable(inv[m]) then
                raise("dogpile.cache: configure: region_invalidator has no method " .. m)
            end
        end
    end
    local backend = _M.load_backend(backend_name, opts.arguments or {})
    local serialized = backend.serialized == true
    if (self.serializer == nil) ~= (self.deserializer == nil) then
        raise("dogpile.cache: region " .. self:_label() .. " has a "
              .. (self.serializer and "serializer but no deserializer" or "deserializer but no serializer")
              .. "; give both or neither")
    end
    local encode_payload, decode_payload = self.serializer, self.deserializer
    local raw_decode
    if serialized and not encode_payload then
        -- The default codec: exact for every plain Lua value.
        local codec = require "dogpile.codec"
        local codec_decode = codec.decode
        raw_decode = codec_decode
        encode_payload = codec.encode
        decode_payload = function(bytes)
            local value, err = codec_decode(bytes)
            if value == nil and err ~= nil then
                error(err, 0)
            end
            return value
        end
    end

    self._backend_name = backend_name
    self.actual_backend = backend
    self.backend = apply_wrap(backend, opts.wrap or {})
    self.expiration_time = opts.expiration_time
    if not self._user_key_mangler then
        self.key_mangler = backend.key_mangler
    end
    if inv then
        self.region_invalidator = inv
        self._backend_inv = nil
    elseif is_callable(backend.region_invalidator) then
        -- A backend whose storage is shared between processes may keep the
        -- invalidation there too, so that it reaches every process.
        self.region_invalidator = backend:region_invalidator(self)
        self._backend_inv = true
    elseif self._backend_inv then
        self.region_invalidator = DefaultInvalidation.new()
        self._backend_inv = nil
    end
    self._default_inv = getmetatable(self.region_invalidator) == DefaultInvalidation
    self._serialized = serialized
    self._encode_payload, self._decode_payload = encode_payload, decode_payload
    self._raw_decode = raw_decode
    self._direct = self.backend == backend and backend.infallible == true
    -- Read C backends in place (c_fetch) unless a proxy or a serializer of
    -- the user's stands between.
    -- The unbounded memory backend's table, read directly on the hit.
    self._mem = nil
    if self.backend == backend and getmetatable(backend) == memory_backend.Memory then
        self._mem = backend._cache
    end
    self._cb = nil
    if self.backend == backend and raw_decode and backend.handle ~= nil
        and getmetatable(backend) == CBackend then
        self._cb = backend
    end
    self.fail_open = opts.fail_open == true
    self._domain = C.dp_lock_domain_new()
    self._stats = new_stats()
    -- A shared backend counts evictions since it opened; report ours since now.
    self._evictions_base = 0
    local base = self:_backend_evictions()
    self._evictions_base = base or 0
    self.is_configured = true
    return setmetatable(self, CONFIGURED)
end

--- `region:configure_from_config(config, prefix)`: a flat table, as from an
-- ini file; strings are coerced.
function Region:configure_from_config(config, prefix)
    if type(config) ~= "table" then
        raise("dogpile.cache: configure_from_config: config must be a table, got " .. type(config))
    end
    if type(prefix) ~= "string" then
        raise("dogpile.cache: configure_from_config: prefix must be a string, got " .. type(prefix))
    end
    local conf = util.coerce_string_conf(config)
    local backend = conf[prefix .. "backend"]
    if backend == nil then
        raise("dogpile.cache: configure_from_config: no '" .. prefix .. "backend' in config")
    end
    local args_prefix = prefix .. "arguments."
    local arguments = {}
    for k, v in pairs(conf) do
        if type(k) == "string" and k:sub(1, #args_prefix) == args_prefix then
            arguments[k:sub(#args_prefix + 1)] = v
        end
    end
    local exp = conf[prefix .. "expiration_time"]
    if exp ~= nil and type(exp) ~= "number" then
        raise("dogpile.cache: configure_from_config: " .. prefix .. "expiration_time must be a "
              .. "number of seconds, got '" .. tostring(exp) .. "'")
    end
    return self:configure(backend, {
        expiration_time = exp,
        arguments = arguments,
        replace_existing_backend = conf[prefix .. "replace_existing_backend"] == true,
        fail_open = conf[prefix .. "fail_open"] == true or nil,
    })
end

--- `region:wrap(proxy)`: wrap the configured backend in one more proxy.
function Region:wrap(p)
    self.backend = apply_wrap(self.backend, { p })
    -- Every read now goes through the proxy.
    self._mem, self._cb, self._direct = nil, nil, false
end

function Region:invalidate(hard)
    if hard == nil then
        hard = true
    end
    self.region_invalidator:invalidate(hard)
end

function Region:stats()
    local st = self._stats or new_stats()
    local out = {}
    for k, v in pairs(st) do
        out[k] = v
    end
    local ev = self:_backend_evictions()
    if ev then
        out.evictions = ev - (self._evictions_base or 0)
    end
    -- Creations that outlived a distributed lock's timeout, where the backend
    -- counts them (per Lua state).
    local b = rawget(self, "actual_backend")
    local overruns = b and rawget(b, "lock_overruns")
    out.lock_overruns = type(overruns) == "number" and overruns or 0
    return out
end

function Region:_backend_evictions()
    local b = rawget(self, "actual_backend")
    if b and b.stats then
        local ok, bs = pcall(b.stats, b)
        if ok and type(bs) == "table" and type(bs.evictions) == "number" then
            return bs.evictions
        end
    end
    return nil
end

-- -- Talking to the backend ------------------------------------------------------

local function log(msg)
    local ngx = ngx
    if ngx and ngx.log then
        ngx.log(ngx.WARN, msg)
    else
        io.stderr:write(msg, "\n")
    end
end
_M.log = log

--- A backend call raised `err`. Under fail_open: log, count, carry on as a
-- miss. Otherwise raise an error naming the backend, the operation and the
-- key (a non-string error object propagates unchanged).
function Region:_failed(op, key, err)
    self._stats.errors = self._stats.errors + 1
    local what = tostring(self._backend_name) .. ": " .. op
        .. (key ~= nil and (" '" .. tostring(key) .. "'") or "")
    if not self.fail_open then
        if type(err) ~= "string" then
            error(err, 0)
        end
        raise(what .. " failed: " .. err)
    end
    _M.log("dogpile.cache: region " .. self:_label() .. ": " .. what
           .. " failed (treated as a miss, fail_open): " .. tostring(err))
end

local function decode(self, bytes)
    if bytes == NO_VALUE or bytes == nil then
        return NO_VALUE
    end
    local ct, err = unpack_envelope(bytes)
    local ok, value = false, err
    if ct then
        local raw = self._raw_decode
        if raw then
            -- The default codec: scalars are read in Lua, in compiled code;
            -- the rest by the C decoder, which returns nil, err on bad bytes
            -- and never raises, so it needs no pcall.
            ok, value = read_value(ffi_cast(u8p, bytes) + HEADER, #bytes - HEADER)
            if not ok then
                value, err = raw(bytes:sub(HEADER + 1))
                ok = value ~= nil or err == nil
                if not ok then
                    value = err
                end
            end
        else
            ok, value = pcall(self._decode_payload, bytes:sub(HEADER + 1))
        end
    end
    if not ok then
        self._stats.errors = self._stats.errors + 1
        _M.log("dogpile.cache: region " .. self:_label() .. ": a stored value does not decode "
               .. "(treated as a miss): " .. tostring(value))
        return NO_VALUE
    end
    return CachedValue.new(value, { ct = ct, v = VALUE_VERSION })
end

local function encode(self, cv, key)
    local ok, payload = pcall(self._encode_payload, cv.payload)
    if not ok then
        if type(payload) ~= "string" then
            error(payload, 0)
        end
        raise("dogpile.cache: region " .. self:_label() .. ": cannot store key '" .. tostring(key)
              .. "': " .. payload)
    end
    if type(payload) ~= "string" then
        raise("dogpile.cache: region " .. self:_label() .. ": the serializer returned a "
              .. type(payload) .. ", not a string")
    end
    return pack_envelope(cv.metadata.ct, payload)
end

-- One read from the backend, normalized to a CachedValue or NO_VALUE.
local function fetch(self, backend, key)
    local v
    if self._direct then
        -- A built-in in-process backend that cannot fail: no pcall, so a hit
        -- compiles into one trace (a trace that starts in a function called
        -- through pcall aborts when it returns into the pcall frame).
        v = backend:get(key)
    else
        local ok
        ok, v = pcall(backend.get, backend, key)
        if not ok then
            self:_failed("get", key, v)
            return NO_VALUE
        end
    end
    if self._serialized then
        return decode(self, v)
    end
    if v == nil then
        return NO_VALUE
    end
    return v
end

-- Is a value created at `ct` usable on a hit: within `exp` seconds (nil: no
-- expiry; the cheap clock bound first, the precise clock only near the
-- expiry) and not invalidated since? `now` (optional) is a clock reading
-- taken once for many values. Small enough for the JIT to inline.
local function fresh(self, ct, exp, now)
    if exp ~= nil then
        if now ~= nil then
            if now - ct > exp then
                return false
            end
        elseif clock_upper() - ct > exp and C.dp_clock_now() - ct > exp then
            return false
        end
    end
    if self._default_inv then
        local at = self.region_invalidator._invalidated
        return at == nil or ct >= at
    end
    return not self.region_invalidator:is_invalidated(ct)
end

-- A C backend with the default codec, read in place: one FFI call fills the
-- backend's buffer, the created time is read there, and a fresh value is
-- decoded from it; no envelope string, no CachedValue. Returns true and the
-- value on a fresh hit; otherwise false and a CachedValue or NO_VALUE for the
-- slow path to judge. `exp` nil: no expiry. Raises nothing but what
-- _failed raises.
local function c_fetch(self, cb, key, exp)
    local bytes = cb.bytes
    local rc = C.dp_backend_get(cb.handle, key, #key, bytes, cb.err)
    if rc ~= DP_OK then
        if rc ~= DP_ENOTFOUND then
            self:_failed("get", key, ffi_string(cb.err.msg))
        end
        return false, NO_VALUE
    end
    local p, n = ffi_cast(u8p, bytes.data), tonumber(bytes.len)
    local ct = created_at(p, n)
    if ct and fresh(self, ct, exp) then
        local ok, value = read_value(p + HEADER, n - HEADER)
        if ok then
            return true, value
        end
    end
    return false, decode(self, ffi_string(p, n))
end

local function fetch_multi(self, backend, keys)
    local ok, vs = pcall(proxy.get_multi, backend, keys)
    if not ok then
        self:_failed("get_multi", keys[1], vs)
        vs = {}
    end
    local out = {}
    for i = 1, #keys do
        local v = vs[i]
        if self._serialized then
            v = decode(self, v)
        elseif v == nil then
            v = NO_VALUE
        end
        out[i] = v
    end
    return out
end

local function store(self, backend, key, cv)
    local cb = self._cb
    if cb then
        -- In place (envelope.write_scalar), or the encoded string; either way
        -- straight to the C backend, which reports failure in err.
        local md = cv.metadata
        local p, n = write_scalar(md.ct, cv.payload)
        if not p then
            p = encode(self, cv, key)
            n = #p
        end
        if C.dp_backend_set(cb.handle, key, #key, p, n, cb.err) ~= DP_OK then
            self:_failed("set", key, ffi_string(cb.err.msg))
        end
        return
    end
    local v = cv
    if self._serialized then
        v = encode(self, cv, key)
    end
    local ok, err = pcall(backend.set, backend, key, v)
    if not ok then
        self:_failed("set", key, err)
    end
end

local function store_multi(self, backend, mapping)
    if self._serialized then
        local enc = {}
        for k, cv in pairs(mapping) do
            enc[k] = encode(self, cv, k)
        end
        mapping = enc
    end
    local ok, err = pcall(proxy.set_multi, backend, mapping)
    if not ok then
        self:_failed("set_multi", next(mapping), err)
    end
end

local function check_key(key, who)
    if type(key) ~= "string" then
        raise("dogpile.cache: " .. who .. ": key must be a string, got " .. type(key))
    end
end

local function check_expiration(exp, who)
    if exp ~= nil and type(exp) ~= "number" then
        raise("dogpile.cache: " .. who .. ": expiration_time must be a number of seconds or nil, got "
              .. type(exp))
    end
end

local function mangle(self, key)
    local km = self.key_mangler
    if km then
        key = km(key)
        if type(key) ~= "string" then
            raise("dogpile.cache: region " .. self:_label() .. ": key_mangler returned a "
                  .. type(key) .. ", not a string")
        end
    end
    return key
end

-- Is a value usable as it is (not a miss, not invalidated, not expired)?
-- Also says whether it may be served stale while another caller regenerates.
local function classify(self, value, exp)
    if value == NO_VALUE then
        return "missing"
    end
    local md = value.metadata
    local ct = md.ct
    if md.v ~= VALUE_VERSION then
        return "missing"
    end
    local inv = self.region_invalidator
    if inv:is_hard_invalidated(ct) then
        return "missing"
    end
    if inv:is_soft_invalidated(ct) or (exp ~= nil and C.dp_clock_now() - ct > exp) then
        return "stale"
    end
    return "fresh"
end

-- -- get / set / delete -----------------------------------------------------------

--- `region:get(key, expiration_time, ignore_expiration)` -> value or NO_VALUE.
function Region:get(key, expiration_time, ignore_expiration)
    local backend = self.backend
    if type(key) ~= "string" then
        check_key(key, "get")
    end
    if expiration_time ~= nil and type(expiration_time) ~= "number" then
        check_expiration(expiration_time, "get")
    end
    if self.key_mangler then
        key = mangle(self, key)
    end
    local st = self._stats
    local mem, cb, value = self._mem, self._cb, nil
    if mem then
        value = mem[key]
        if value == nil then
            value = NO_VALUE
        end
    elseif cb and not ignore_expiration then
        local exp = expiration_time or self.expiration_time
        local hit
        hit, value = c_fetch(self, cb, key, (exp ~= nil and exp >= 0) and exp or nil)
        if hit then
            st.hits = st.hits + 1
            return value
        end
    else
        value = fetch(self, backend, key)
    end
    if not rawequal(value, NO_VALUE) then
        if ignore_expiration then
            st.hits = st.hits + 1
            return value.payload
        end
        local exp = expiration_time or self.expiration_time
        if fresh(self, value.metadata.ct, (exp ~= nil and exp >= 0) and exp or nil) then
            st.hits = st.hits + 1
            return value.payload
        end
    end
    st.misses = st.misses + 1
    return NO_VALUE
end

local function unexpired(self, value, exp, ignore_expiration)
    if value == NO_VALUE or ignore_expiration then
        return value
    end
    local ct = value.metadata.ct
    if exp ~= nil and exp >= 0 and C.dp_clock_now() - ct > exp then
        return NO_VALUE
    end
    if self.region_invalidator:is_invalidated(ct) then
        return NO_VALUE
    end
    return value
end

-- get_multi on a C backend with the default codec: one call of the
-- backend's get_multi, every value read in place (as c_fetch does), the
-- clock read once. Values the Lua reader declines take the slow path.
local function c_get_multi(self, cb, keys, exp)
    local n = #keys
    local st, out = self._stats, {}
    local ok, data, lens = pcall(cb.get_multi_in_place, cb, keys)
    if not ok then
        self:_failed("get_multi", keys[1], data)
        st.misses = st.misses + n
        for i = 1, n do
            out[i] = NO_VALUE
        end
        return out
    end
    local p = ffi_cast(u8p, data)
    local now = exp ~= nil and C.dp_clock_now() or nil
    local pos, hits = 0, 0
    for i = 1, n do
        local len = tonumber(lens[i - 1])
        local v = NO_VALUE
        if len >= 0 then
            local q = p + pos
            pos = pos + len
            local ct = created_at(q, len)
            if ct then
                if fresh(self, ct, exp, now) then
                    local decoded
                    decoded, v = read_value(q + HEADER, len - HEADER)
                    if not decoded then
                        v = decode(self, ffi_string(q, len))
                        v = v == NO_VALUE and v or v.payload
                    end
                else
                    v = NO_VALUE
                end
            else
                v = decode(self, ffi_string(q, len)) -- counts and logs the bad bytes
            end
        end
        if v == NO_VALUE then
            out[i] = NO_VALUE
        else
            hits = hits + 1
            out[i] = v
        end
    end
    st.hits = st.hits + hits
    st.misses = st.misses + (n - hits)
    return out
end

--- `region:get_multi(keys, expiration_time, ignore_expiration)` -> array.
function Region:get_multi(keys, expiration_time, ignore_expiration)
    local backend = self.backend
    if type(keys) ~= "table" then
        raise("dogpile.cache: get_multi: keys must be an array of strings, got " .. type(keys))
    end
    check_expiration(expiration_time, "get_multi")
    local n = #keys
    if n == 0 then
        return {}
    end
    local mangled = {}
    for i = 1, n do
        check_key(keys[i], "get_multi")
        mangled[i] = mangle(self, keys[i])
    end
    local exp = expiration_time or self.expiration_time
    local st, out = self._stats, {}
    if self._cb and not ignore_expiration then
        return c_get_multi(self, self._cb, mangled, (exp ~= nil and exp >= 0) and exp or nil)
    end
    local values = fetch_multi(self, backend, mangled)
    for i = 1, n do
        local v = unexpired(self, values[i], exp, ignore_expiration)
        if v == NO_VALUE then
            st.misses = st.misses + 1
            out[i] = NO_VALUE
        else
            st.hits = st.hits + 1
            out[i] = v.payload
        end
    end
    return out
end

--- `region:get_value_metadata(key, expiration_time, ignore_expiration)` ->
-- CachedValue or nil.
function Region:get_value_metadata(key, expiration_time, ignore_expiration)
    local backend = self.backend
    check_key(key, "get_value_metadata")
    check_expiration(expiration_time, "get_value_metadata")
    local value = fetch(self, backend, mangle(self, key))
    value = unexpired(self, value, expiration_time or self.expiration_time, ignore_expiration)
    if value == NO_VALUE then
        return nil
    end
    return value
end

local function new_value(payload)
    return CachedValue.new(payload, { ct = C.dp_clock_stamp(), v = VALUE_VERSION })
end

function Region:set(key, value)
    local backend = self.backend
    check_key(key, "set")
    store(self, backend, mangle(self, key), new_value(value))
end

-- Store keys[i] = values[i] for i = 1..n, nil values included (a mapping
-- table cannot hold them).
function Region:_set_pairs(keys, values, n)
    local backend = self.backend
    local md = { ct = C.dp_clock_stamp(), v = VALUE_VERSION }
    local out, any = {}, false
    for i = 1, n do
        check_key(keys[i], "set_multi")
        out[mangle(self, keys[i])] = CachedValue.new(values[i], md)
        any = true
    end
    if any then
        store_multi(self, backend, out)
    end
end

function Region:set_multi(mapping)
    local backend = self.backend
    if type(mapping) ~= "table" then
        raise("dogpile.cache: set_multi: mapping must be a table {key = value}, got " .. type(mapping))
    end
    local md = { ct = C.dp_clock_stamp(), v = VALUE_VERSION }
    local out, any = {}, false
    for k, v in pairs(mapping) do
        check_key(k, "set_multi")
        out[mangle(self, k)] = CachedValue.new(v, md)
        any = true
    end
    if any then
        store_multi(self, backend, out)
    end
end

function Region:delete(key)
    local backend = self.backend
    check_key(key, "delete")
    key = mangle(self, key)
    local ok, err = pcall(backend.delete, backend, key)
    if not ok then
        self:_failed("delete", key, err)
    end
end

function Region:delete_multi(keys)
    local backend = self.backend
    if type(keys) ~= "table" then
        raise("dogpile.cache: delete_multi: keys must be an array of strings, got " .. type(keys))
    end
    local mangled = {}
    for i = 1, #keys do
        check_key(keys[i], "delete_multi")
        mangled[i] = mangle(self, keys[i])
    end
    if #mangled == 0 then
        return
    end
    local ok, err = pcall(proxy.delete_multi, backend, mangled)
    if not ok then
        self:_failed("delete_multi", mangled[1], err)
    end
end

-- -- Mutexes ---------------------------------------------------------------------

-- Under fail_open a backend lock that cannot be taken because the backend is
-- down lets the creator run without it.
local FailOpenMutex = {}
FailOpenMutex.__index = FailOpenMutex

function FailOpenMutex:acquire(wait)
    local ok, got = pcall(self.inner.acquire, self.inner, wait)
    if ok then
        self.unlocked = false
        return got
    end
    self.region:_failed("lock", self.key, got)
    self.unlocked = true
    return true
end

-- Waiting for the holder to let go (dogpile's run()) goes through too; a
-- failure there is logged and the caller goes on to acquire.
function FailOpenMutex:wait_unlocked()
    local inner = self.inner
    local f = type(inner) == "table" and inner.wait_unlocked
    if not f then
        return false
    end
    local ok, r = pcall(f, inner)
    if not ok then
        self.region:_failed("lock", self.key, r)
        return false
    end
    return r
end

function FailOpenMutex:release()
    if self.unlocked then
        self.unlocked = false
        return
    end
    local ok, err = pcall(self.inner.release, self.inner)
    if not ok then
        self.region:_failed("unlock", self.key, err)
    end
end

--- The mutex for a mangled key: the backend's own lock when it has one,
-- otherwise the core's per-key lock in this region's domain.
function Region:_mutex(key)
    local backend = self.backend
    if backend.get_mutex then
        local ok, m = pcall(backend.get_mutex, backend, key)
        if not ok then
            self:_failed("get_mutex", key, m)
            m = nil
        elseif m ~= nil then
            dogpile.check_mutex(m, "dogpile.cache: backend get_mutex")
            if self.fail_open then
                return setmetatable({ inner = m, region = self, key = key }, FailOpenMutex)
            end
            return m
        end
    end
    return core_mutex(self._domain, key)
end

-- -- get_or_create ----------------------------------------------------------------

local function call_creator(creator, creator_args)
    if creator_args == nil then
        return creator()
    end
    return creator(unpack(creator_args, 1, creator_args.n or #creator_args))
end

-- The miss path's callbacks for dogpile's run(), over a context table (no
-- closures: LuaJIT does not compile their creation).
local function slow_read(ctx)
    local self = ctx.region
    local v = fetch(self, ctx.backend, ctx.key)
    if classify(self, v, ctx.exp) == "missing" then
        return false
    end
    return true, v.payload, v.metadata.ct
end

local function slow_is_expired(ctx, ct)
    local exp = ctx.exp
    return ctx.region.region_invalidator:is_soft_invalidated(ct)
        or (exp ~= nil and C.dp_clock_now() - ct > exp)
end

local function slow_gen(ctx)
    local self = ctx.region
    local st = self._stats
    st.creations = st.creations + 1
    local ok, value = pcall(call_creator, ctx.creator, ctx.creator_args)
    if not ok then
        st.errors = st.errors + 1
        error(value, 0)
    end
    local should_cache_fn = ctx.should_cache_fn
    if not should_cache_fn or should_cache_fn(value) then
        store(self, ctx.backend, ctx.key, new_value(value))
    end
    return value
end

local function slow_async(ctx, mutex)
    local self = ctx.region
    local creator, creator_args = ctx.creator, ctx.creator_args
    local function go()
        return call_creator(creator, creator_args)
    end
    self._stats.creations = self._stats.creations + 1
    return self.async_creation_runner(self, ctx.orig_key, go, mutex)
end

function Region:_get_or_create_slow(key, orig_key, creator, exp, should_cache_fn,
                                    creator_args, first)
    local st = self._stats
    local ctx = { region = self, backend = self.backend, key = key, orig_key = orig_key,
                  creator = creator, creator_args = creator_args, exp = exp,
                  should_cache_fn = should_cache_fn }
    local has = classify(self, first, exp) ~= "missing"
    local value, how, waited = run(self:_mutex(key), ctx, slow_gen, slow_read, slow_is_expired,
                                   self.async_creation_runner and slow_async or nil,
                                   has, has and first.payload or nil,
                                   has and first.metadata.ct or -1)
    -- Counted by the first read: this lookup found no fresh value.
    st.misses = st.misses + 1
    if waited then
        st.lock_waits = st.lock_waits + 1
    end
    if how == "stale" or how == "async" then
        st.stale_served = st.stale_served + 1
    end
    return value
end

--- `region:get_or_create(key, creator, expiration_time, should_cache_fn,
-- creator_args)` -> value, under the dogpile lock.
-- @raise whatever the creator raises, after releasing the lock
function Region:get_or_create(key, creator, expiration_time, should_cache_fn, creator_args)
    local backend = self.backend
    if type(key) ~= "string" then
        check_key(key, "get_or_create")
    end
    if type(creator) ~= "function" and not is_callable(creator) then
        raise("dogpile.cache: get_or_create: creator must be a function, got " .. type(creator))
    end
    local exp = expiration_time
    if exp == nil then
        exp = self.expiration_time
    elseif type(exp) ~= "number" then
        check_expiration(exp, "get_or_create")
    end
    if exp ~= nil and exp < 0 then
        exp = nil
    end
    local orig_key = key
    if self.key_mangler then
        key = mangle(self, key)
    end
    local value = nil
    local mem, cb = self._mem, self._cb
    if mem then
        value = mem[key]
        if value == nil then
            value = NO_VALUE
        end
    elseif cb then
        local hit
        hit, value = c_fetch(self, cb, key, exp)
        if hit then
            local st = self._stats
            st.hits = st.hits + 1
            return value
        end
    else
        value = fetch(self, backend, key)
    end
    -- The hit: one read, no closure, no lock; the cheap clock bound first.
    if not rawequal(value, NO_VALUE) then
        local md = value.metadata
        local ct = md.ct
        if md.v == VALUE_VERSION and fresh(self, ct, exp) then
            local st = self._stats
            st.hits = st.hits + 1
            return value.payload
        end
    end
    if should_cache_fn ~= nil and not is_callable(should_cache_fn) then
        raise("dogpile.cache: get_or_create: should_cache_fn must be a function or nil, got "
              .. type(should_cache_fn))
    end
    if creator_args ~= nil and type(creator_args) ~= "table" then
        raise("dogpile.cache: get_or_create: creator_args must be an array, got " .. type(creator_args))
    end
    return self:_get_or_create_slow(key, orig_key, creator, exp, should_cache_fn, creator_args, value)
end

local function release_all(held)
    for i = 1, #held do
        local m = held[i].mutex
        if m then
            held[i].mutex = nil
            pcall(m.release, m)
        end
    end
end

--- `region:get_or_create_multi(keys, creator, expiration_time, should_cache_fn)`
-- -> array. The creator is called once, with the distinct keys that need
-- creating in the order they first appear. Locks are taken in the order of
-- the mangled keys, so that callers with overlapping key sets cannot deadlock,
-- and every held key is read again before creating, so that a key another
-- caller has just created is not created twice.
function Region:get_or_create_multi(keys, creator, expiration_time, should_cache_fn)
    local backend = self.backend
    if type(keys) ~= "table" then
        raise("dogpile.cache: get_or_create_multi: keys must be an array of strings, got " .. type(keys))
    end
    if not is_callable(creator) then
        raise("dogpile.cache: get_or_create_multi: creator must be a function, got " .. type(creator))
    end
    check_expiration(expiration_time, "get_or_create_multi")
    if should_cache_fn ~= nil and not is_callable(should_cache_fn) then
        raise("dogpile.cache: get_or_create_multi: should_cache_fn must be a function or nil, got "
              .. type(should_cache_fn))
    end
    local n = #keys
    if n == 0 then
        return {}
    end
    local exp = expiration_time or self.expiration_time
    if exp ~= nil and exp < 0 then
        exp = nil
    end
    local uniq, index = {}, {}
    for i = 1, n do
        local k = keys[i]
        check_key(k, "get_or_create_multi")
        if not index[k] then
            uniq[#uniq + 1] = k
            index[k] = #uniq
        end
    end
    local mangled = {}
    for i = 1, #uniq do
        mangled[i] = mangle(self, uniq[i])
    end
    local st = self._stats
    local values = fetch_multi(self, backend, mangled)
    local results, pending = {}, {}
    for i = 1, #uniq do
        local v = values[i]
        local state = classify(self, v, exp)
        if state == "fresh" then
            st.hits = st.hits + 1
            results[i] = v.payload
        else
            st.misses = st.misses + 1
            pending[#pending + 1] = { i = i, state = state, stale = v }
        end
    end
    if #pending > 0 then
        sort(pending, function(a, b) return mangled[a.i] < mangled[b.i] end)
        local held = {}
        local ok, err = pcall(function()
            for _, e in ipairs(pending) do
                local m = self:_mutex(mangled[e.i])
                if e.state == "stale" then
                    if m:acquire(false) then
                        e.mutex = m
                        held[#held + 1] = e
                    else
                        st.stale_served = st.stale_served + 1
                        results[e.i] = e.stale.payload
                    end
                else
                    if not m:acquire(false) then
                        st.lock_waits = st.lock_waits + 1
                        m:acquire(true)
                    end
                    e.mutex = m
                    held[#held + 1] = e
                end
            end
            if #held == 0 then
                return
            end
            -- Read again what we hold: another caller may have created it.
            local hk = {}
            for j = 1, #held do
                hk[j] = mangled[held[j].i]
            end
            local again = fetch_multi(self, backend, hk)
            local create = {}
            for j = 1, #held do
                local e, v = held[j], again[j]
                if classify(self, v, exp) == "fresh" then
                    results[e.i] = v.payload
                    local m = e.mutex
                    e.mutex = nil
                    m:release()
                else
                    create[#create + 1] = e
                end
            end
            if #create == 0 then
                return
            end
            sort(create, function(a, b) return a.i < b.i end)
            local args = {}
            for j = 1, #create do
                args[j] = uniq[create[j].i]
            end
            st.creations = st.creations + 1
            local cok, new = pcall(creator, unpack(args, 1, #create))
            if not cok then
                st.errors = st.errors + 1
                error(new, 0)
            end
            if type(new) ~= "table" then
                raise("dogpile.cache: get_or_create_multi: the creator must return an array of "
                      .. #create .. " values, got " .. type(new))
            end
            local md = { ct = C.dp_clock_stamp(), v = VALUE_VERSION }
            local to_store, any = {}, false
            for j = 1, #create do
                local v = new[j]
                results[create[j].i] = v
                if not should_cache_fn or should_cache_fn(v) then
                    to_store[mangled[create[j].i]] = CachedValue.new(v, md)
                    any = true
                end
            end
            if any then
                store_multi(self, backend, to_store)
            end
        end)
        release_all(held)
        if not ok then
            error(err, 0)
        end
    end
    local out = {}
    for i = 1, n do
        out[i] = results[index[keys[i]]]
    end
    return out
end

-- -- Decorators ----------------------------------------------------------------

local function pack(...)
    return { n = select("#", ...), ... }
end

local Cached = {}
Cached.__index = Cached

Cached.__call = function(self, ...)
    local key = self._keygen(...)
    local exp = self._exp
    if self._exp_fn then
        exp = exp()
    end
    return self._region:get_or_create(key, self.original, exp, self._should_cache, pack(...))
end

function Cached:invalidate(...)
    self._region:delete(self._keygen(...))
end

function Cached:set(value, ...)
    self._region:set(self._keygen(...), value)
end

function Cached:get(...)
    return self._region:get(self._keygen(...))
end

function Cached:refresh(...)
    local value = self.original(...)
    self._region:set(self._keygen(...), value)
    return value
end

local DECORATOR_OPTS = { namespace = "string", expiration_time = "number",
    should_cache_fn = "function", to_str = "function", function_key_generator = "function" }

local function check_decorator_opts(who, opts, allowed)
    if opts == nil then
        return {}
    end
    if type(opts) ~= "table" then
        raise("dogpile.cache: " .. who .. ": options must be a table, got " .. type(opts))
    end
    for k, v in pairs(opts) do
        local want = allowed[k]
        if not want then
            raise("dogpile.cache: " .. who .. ": unknown option '" .. tostring(k) .. "'")
        end
        local ok = type(v) == want or (want == "function" and is_callable(v))
            or (k == "expiration_time" and is_callable(v))
        if not ok then
            raise("dogpile.cache: " .. who .. ": " .. k .. " must be a " .. want .. ", got " .. type(v))
        end
    end
    return opts
end

--- `region:cache_on_arguments(opts)` -> decorator.
function Region:cache_on_arguments(opts)
    opts = check_decorator_opts("cache_on_arguments", opts, DECORATOR_OPTS)
    local keygen_factory = opts.function_key_generator or self.function_key_generator
    return function(fn)
        if not is_callable(fn) then
            raise("dogpile.cache: cache_on_arguments: can only decorate a function, got " .. type(fn))
        end
        return setmetatable({
            original = fn,
            _region = self,
            _keygen = keygen_factory(opts.namespace, fn, opts.to_str),
            _exp = opts.expiration_time,
            _exp_fn = is_callable(opts.expiration_time),
            _should_cache = opts.should_cache_fn,
        }, Cached)
    end
end

local CachedMulti = {}
CachedMulti.__index = CachedMulti

CachedMulti.__call = function(self, ...)
    local n = select("#", ...)
    local args = { ... }
    local keys = self._keygen(...)
    local by_key = {}
    for i = 1, n do
        by_key[keys[i]] = args[i]
    end
    local fn = self.original
    local function creator(...)
        local m = select("#", ...)
        local a = { ... }
        for i = 1, m do
            a[i] = by_key[a[i]]
        end
        return fn(unpack(a, 1, m))
    end
    local exp = self._exp
    if self._exp_fn then
        exp = exp()
    end
    local region = self._region
    if not self._asdict then
        return region:get_or_create_multi(keys, creator, exp, self._should_cache)
    end
    local should_cache = self._should_cache
    local function dict_create(...)
        local m = select("#", ...)
        local d = creator(...)
        if type(d) ~= "table" then
            raise("dogpile.cache: cache_multi_on_arguments (asdict): the function must return "
                  .. "a table keyed by argument, got " .. type(d))
        end
        local out = {}
        for i = 1, m do
            local v = d[by_key[(select(i, ...))]]
            if v == nil then
                v = NO_VALUE
            end
            out[i] = v
        end
        return out
    end
    local function cache_fn(v)
        if v == NO_VALUE then
            return false
        end
        return not should_cache or should_cache(v)
    end
    local res = region:get_or_create_multi(keys, dict_create, exp, cache_fn)
    local out = {}
    for i = 1, n do
        local v = res[i]
        if v ~= NO_VALUE and args[i] ~= nil then
            out[args[i]] = v
        end
    end
    return out
end

function CachedMulti:invalidate(...)
    self._region:delete_multi(self._keygen(...))
end

function CachedMulti:set(mapping)
    local args = {}
    for k in pairs(mapping) do
        args[#args + 1] = k
    end
    local keys = self._keygen(unpack(args))
    local out = {}
    for i = 1, #args do
        out[keys[i]] = mapping[args[i]]
    end
    self._region:set_multi(out)
end

function CachedMulti:get(...)
    return self._region:get_multi(self._keygen(...))
end

function CachedMulti:refresh(...)
    local n = select("#", ...)
    local args = { ... }
    local keys = self._keygen(...)
    local values = self.original(...)
    if type(values) ~= "table" then
        raise("dogpile.cache: cache_multi_on_arguments: the function must return a table, got "
              .. type(values))
    end
    local ks, vs, m = {}, {}, 0
    for i = 1, n do
        local v
        if self._asdict then
            if args[i] ~= nil then
                v = values[args[i]]
            end
            -- As in the call: an argument absent from the result is not cached.
            if v == nil then
                goto continue
            end
        else
            v = values[i]
        end
        m = m + 1
        ks[m], vs[m] = keys[i], v
        ::continue::
    end
    self._region:_set_pairs(ks, vs, m)
    return values
end

local MULTI_DECORATOR_OPTS = { namespace = "string", expiration_time = "number",
    should_cache_fn = "function", to_str = "function", asdict = "boolean",
    function_multi_key_generator = "function" }

--- `region:cache_multi_on_arguments(opts)` -> decorator.
function Region:cache_multi_on_arguments(opts)
    opts = check_decorator_opts("cache_multi_on_arguments", opts, MULTI_DECORATOR_OPTS)
    local keygen_factory = opts.function_multi_key_generator or self.function_multi_key_generator
    return function(fn)
        if not is_callable(fn) then
            raise("dogpile.cache: cache_multi_on_arguments: can only decorate a function, got "
                  .. type(fn))
        end
        return setmetatable({
            original = fn,
            _region = self,
            _keygen = keygen_factory(opts.namespace, fn, opts.to_str),
            _exp = opts.expiration_time,
            _exp_fn = is_callable(opts.expiration_time),
            _should_cache = opts.should_cache_fn,
            _asdict = opts.asdict == true,
        }, CachedMulti)
    end
end

-- -- The backend registry ---------------------------------------------------------

local BACKENDS = {
    ["dogpile.cache.memory"] = "dogpile.cache.backends.memory",
    ["dogpile.cache.null"] = "dogpile.cache.backends.null",
    ["dogpile.cache.shared_memory"] = "dogpile.cache.backends.shared_memory",
    ["dogpile.cache.lmdb"] = "dogpile.cache.backends.lmdb",
    ["dogpile.cache.redis"] = "dogpile.cache.backends.redis",
    ["dogpile.cache.redis_sentinel"] = "dogpile.cache.backends.redis_sentinel",
    ["dogpile.cache.ngx_shared"] = "dogpile.cache.backends.ngx_shared",
    ["dogpile.cache.memcached"] = "dogpile.cache.backends.memcached",
}

--- `cache.register_backend(name, module_name_or_factory)`.
function _M.register_backend(name, module_or_factory)
    if type(name) ~= "string" then
        raise("dogpile.cache: register_backend: name must be a string, got " .. type(name))
    end
    if type(module_or_factory) ~= "string" and not is_callable(module_or_factory) then
        raise("dogpile.cache: register_backend: expected a module name or a factory "
              .. "function(arguments), got " .. type(module_or_factory))
    end
    BACKENDS[name] = module_or_factory
end

local function registered_names()
    local names = {}
    for k in pairs(BACKENDS) do
        names[#names + 1] = k
    end
    sort(names)
    return concat(names, ", ")
end

--- A new backend object for `name`, made from `arguments`.
function _M.load_backend(name, arguments)
    local factory = BACKENDS[name]
    if factory == nil and C.dp_backend_find(name) ~= nil then
        -- A C backend the host registered with dp_backend_register().
        return require("dogpile.cache.backends.c").open(name, arguments)
    end
    local plugin = false
    if factory == nil then
        -- A plugin: a backend installed as a rock is found by its module
        -- name, as dogpile.cache finds plugins by entry points.
        local ok, mod = pcall(require, name)
        if ok then
            factory, plugin = mod, true
        elseif type(mod) == "string" and mod:find("module '" .. name .. "' not found", 1, true) then
            raise("dogpile.cache: unknown backend '" .. name .. "'; registered backends: "
                  .. registered_names() .. " (cache.register_backend adds one), and no Lua "
                  .. "module '" .. name .. "' was found either")
        else
            raise("dogpile.cache: backend '" .. name .. "': loading module '" .. name
                  .. "' failed: " .. tostring(mod))
        end
    end
    if type(factory) == "string" or plugin then
        local mod = factory
        if not plugin then
            local ok
            ok, mod = pcall(require, factory)
            if not ok then
                raise("dogpile.cache: backend '" .. name .. "': cannot load module '" .. factory
                      .. "': " .. tostring(mod))
            end
        else
            factory = name
        end
        if type(mod) == "table" and is_callable(mod.new) then
            factory = mod.new
        elseif is_callable(mod) then
            factory = mod
        else
            raise("dogpile.cache: backend '" .. name .. "': module '" .. factory
                  .. "' returned neither a factory nor a table with .new(arguments)")
        end
    end
    local backend = factory(arguments)
    if (type(backend) ~= "table" and type(backend) ~= "userdata") or not is_callable(backend.get)
        or not is_callable(backend.set) or not is_callable(backend.delete) then
        raise("dogpile.cache: backend '" .. name .. "': the factory returned a " .. type(backend)
              .. ", not an object with get, set and delete methods")
    end
    return backend
end

return _M
