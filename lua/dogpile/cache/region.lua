--- CacheRegion: a backend, an expiration time, a key generator and an
-- optional key mangler, with get/set/delete and get_or_create under the lock.
--
-- This file is the region object: make_region, configure (which chooses,
-- once, everything a call would otherwise re-derive), the public methods, the
-- failure policy and the counters. The rest lives by concern:
--
--     options.lua       checks of options, keys, expiration times
--     invalidation.lua  invalidation strategies
--     registry.lua      backend names -> backends
--     read.lua          the freshness judgement and the read strategies
--     write.lua         storing values
--     values.lua        the codec and the envelope, for byte-storing backends
--     create.lua        locks and the miss path (get_or_create, _multi)
--     decorators.lua    cache_on_arguments, cache_multi_on_arguments
local lib = require "dogpile.lib"
local context = require "dogpile.context"
local dogpile = require "dogpile"
local api = require "dogpile.cache.api"
local proxy = require "dogpile.cache.proxy"
local util = require "dogpile.cache.util"
local options = require "dogpile.cache.options"
local invalidation = require "dogpile.cache.invalidation"
local registry = require "dogpile.cache.registry"
local values = require "dogpile.cache.values"
local read = require "dogpile.cache.read"
local write = require "dogpile.cache.write"
local create = require "dogpile.cache.create"
local latency = require "dogpile.cache.latency"
local decorators = require "dogpile.cache.decorators"

local C = lib.C
local raise = lib.raise
local NO_VALUE = api.NO_VALUE
local is_callable = dogpile.is_callable
local check_key, check_expiration, check_opts = options.check_key, options.check_expiration,
    options.check
local name_region = options.name_region
local FRESH = read.FRESH
local fetch, fetch_multi, judge_value = read.fetch, read.fetch_multi, read.judge_value
local store, store_multi = write.store, write.store_multi
local new_value, new_metadata = write.new_value, write.new_metadata
local type, pairs, ipairs, tostring, setmetatable, rawget, rawset, rawequal, pcall, error =
      type, pairs, ipairs, tostring, setmetatable, rawget, rawset, rawequal, pcall, error
local sort = table.sort
local HUGE = math.huge

lib.own_source()

local _M = {
    MAKE_OPTS = options.MAKE_OPTS,
    CONFIGURE_OPTS = options.CONFIGURE_OPTS,
    DefaultInvalidationStrategy = invalidation.DefaultInvalidationStrategy,
    register_backend = registry.register_backend,
    load_backend = registry.load_backend,
    pack_envelope = values.pack_envelope,
    unpack_envelope = values.unpack_envelope,
}

-- `region_module.log`, read or assigned, is the logger of dogpile.context
-- (cache.set_logger): kept for code written when the logger lived here.
setmetatable(_M, {
    __index = function(_, k)
        if k == "log" then
            return context.logger()
        end
        return nil
    end,
    __newindex = function(t, k, v)
        if k == "log" then
            context.set_logger(v)
        else
            rawset(t, k, v)
        end
    end,
})

-- -- Region ----------------------------------------------------------------------

local Region = {}

-- A configured region holds its methods itself (copied at configure): a
-- call such as region:get(k) is then one load from the region's own table,
-- not a miss there, a look into the metatable and a second table. Its
-- expiration_time and key_mangler live in fields the hit reads without a
-- miss either (a field that holds nil is absent, and a read of an absent
-- field walks the hash chain): `_exp` (seconds >= 0, or false: never) and
-- `_km` (the mangler, or false), with `_expiration_time` as given. The
-- public names are views of them, read and assigned through the metatable.
local set_expiration
local function view(self, k)
    if k == "expiration_time" then
        return rawget(self, "_expiration_time")
    elseif k == "key_mangler" then
        return rawget(self, "_km") or nil
    end
    return nil
end
local CONFIGURED = {
    __index = function(self, k)
        local v = Region[k]
        if v ~= nil then
            return v
        end
        return view(self, k)
    end,
    __newindex = function(self, k, v)
        if k == "expiration_time" then
            set_expiration(self, v)
        elseif k == "key_mangler" then
            if v ~= nil and not is_callable(v) then
                self:_raise("dogpile.cache: key_mangler must be a function or nil, got " .. type(v))
            end
            rawset(self, "_km", v or false)
        else
            rawset(self, k, v)
        end
    end,
}
local NEEDS_CONFIGURE = { backend = true, actual_backend = true, _lookup = true,
                          _lookup_create = true, _lookup_multi = true }
local UNCONFIGURED = {
    __index = function(self, k)
        local v = Region[k]
        if v ~= nil then
            return v
        end
        if NEEDS_CONFIGURE[k] then
            raise("dogpile.cache: region " .. self:_label() .. " is not configured; "
                  .. "call region:configure(backend_name, opts) first")
        end
        -- Inside configure, before the public fields become views.
        return view(self, k)
    end,
}
_M.Region = Region

-- The label of a region named `name` in errors, logs and stats: 'users',
-- or (unnamed).
local function label_of(name)
    return name ~= nil and ("'" .. tostring(name) .. "'") or "(unnamed)"
end

function Region:_label()
    return label_of(rawget(self, "name"))
end

--- `msg` naming the region, in the one form of every error a region
-- raises (options.name_region): the message whole, then " (region 'users')",
-- as in "dogpile.cache.redis: get 'k' failed: ... (region 'users')".
-- @local
function Region:_message(msg)
    return name_region(msg, self:_label())
end

--- Raise `msg` naming the region, at the caller's line.
-- @local
function Region:_raise(msg)
    raise(self:_message(msg))
end

--- Raise again, naming the region, an error caught (pcall) inside one of
-- its methods: a string loses the position raise() put in front (the
-- caller's line, which raise() names again) and is named; any other error
-- object propagates unchanged, keeping its type.
-- @local
function Region:_reraise(err)
    if type(err) ~= "string" then
        error(err, 0)
    end
    -- The position raise() gives from here: the same first frame outside
    -- this package as the failed call's.
    local _, where = pcall(raise, "")
    if where ~= "" and err:sub(1, #where) == where then
        err = err:sub(#where + 1)
    end
    raise(name_region(err, self:_label()))
end

-- Regions by creation sequence number, weak keys: see _M.regions().
local REGIONS = setmetatable({}, { __mode = "k" })
local REGIONS_SEQ = 0

--- `cache.make_region(opts)`.
-- @tparam[opt] table opts `name` (string, the label in stats, logs and errors), `function_key_generator`,
-- `function_multi_key_generator`, `key_mangler` (a function or "sha1"), `serializer` and `deserializer`
-- (functions, or "pickle"/"json" with wire_format), `async_creation_runner`, `wire_format`
-- ("dogpile.cache"), `wire_options` (table); each absent by default
-- @treturn table the region, not configured yet
-- @raise on an unknown option (listing the known ones) or a value of the wrong type
function _M.make_region(opts)
    -- Named as the region will be; (unnamed) when opts does not say.
    local label = label_of(type(opts) == "table" and opts.name or nil)
    opts = check_opts("make_region", opts, options.MAKE_OPTS, label)
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
        wire_format = opts.wire_format,
        wire_options = opts.wire_options,
        async_creation_runner = opts.async_creation_runner,
        is_configured = false,
        region_invalidator = invalidation.DefaultInvalidationStrategy.new(),
    }
    REGIONS_SEQ = REGIONS_SEQ + 1
    REGIONS[self] = REGIONS_SEQ
    return setmetatable(self, UNCONFIGURED)
end

--- Every region made in this Lua state and still alive, in creation order
-- (for cache.metrics()). The registry holds them weakly: an unreferenced
-- region is still collected.
-- @treturn table an array of regions
function _M.regions()
    local out = {}
    for r in pairs(REGIONS) do
        out[#out + 1] = r
    end
    sort(out, function(a, b) return REGIONS[a] < REGIONS[b] end)
    return out
end

-- The region's expiration_time set to `exp` (nil: never; negative: never).
function set_expiration(self, exp)
    if exp ~= nil and not options.finite(exp) then
        self:_raise("dogpile.cache: expiration_time must be a finite number of seconds (-1: never "
                    .. "expires) or nil, got " .. tostring(exp))
    end
    rawset(self, "_expiration_time", exp)
    rawset(self, "_exp", exp ~= nil and exp >= 0 and exp or false)
end

local function new_stats(front)
    return { hits = 0, misses = 0, creations = 0, stale_served = 0, lock_waits = 0,
             errors = 0, evictions = 0, stale_on_error = 0, early_refreshes = 0,
             front_hits = front and 0 or nil }
end

--- Wrap the backend of `region` in proxies: the first in `wrap` is outermost.
local function apply_wrap(region, backend, wrap, who)
    for i = #wrap, 1, -1 do
        local p = wrap[i]
        if proxy.is_class(p) then
            p = p.new()
        elseif not proxy.is_instance(p) then
            region:_raise("dogpile.cache: " .. who .. ": wrap[" .. i .. "] is not a ProxyBackend "
                          .. "class or instance (got " .. type(p) .. ")")
        end
        backend = p:wrap(backend) or p
    end
    return backend
end

-- The read strategy (read.choose) and the matching store, kept in the
-- region's own fields: a call reads them and derives nothing.
local function set_reader(self)
    local s = read.choose(self.backend, self.actual_backend, self._codec)
    self._reader = s.name
    self._lookup, self._lookup_multi = s.lookup, s.multi
    -- get_or_create's: with early_refresh's draw when the region has it.
    self._lookup_create = self._beta and s.early or s.lookup
    self._direct = s.direct
    self._mem, self._cb = s.mem, s.cb
    self._front, self._front_sync = s.front, s.sync
    self._store = write.choose(s)
end

-- The invalidation strategy and how the hit judges it.
local function set_invalidator(self, inv, from_backend)
    self.region_invalidator = inv
    self._backend_inv = from_backend
    self._inv_judge = invalidation.judge_for(inv)
end

-- Backends a wire_format region may use: those that hold dogpile.cache's
-- bytes as they are (a tiered region's tiers read this library's envelope).
local WIRE_REFUSED = { ["dogpile.cache.tiered"] = true }
local MEMCACHED = "dogpile.cache.memcached"

-- The arguments a wire_format region opens its backend with: on memcached,
-- Python's lock key ("_lock" .. key, MemcachedLock) and the item flags of
-- the layout, unless the region's arguments say otherwise. Redis needs
-- none: its lock_prefix already defaults to redis-py's "_lock".
local function wire_arguments(backend_name, arguments, serializer)
    if backend_name ~= MEMCACHED or type(arguments) ~= "table" then
        return arguments
    end
    local args = {}
    for k, v in pairs(arguments) do
        args[k] = v
    end
    if args.lock_prefix == nil then
        args.lock_prefix = "_lock"
    end
    if args.flags == nil then
        -- Python's memcached backends have no serializer: the client pickles
        -- the CachedValue (flags 1); with one, the bytes are stored (0).
        args.flags = (serializer == nil or serializer == "pickle") and 1 or 0
    end
    return args
end

-- The codec of a region being configured with `backend` (opened from
-- `backend_name`), `wire_format` and `wire_options` given or made with.
local function choose_codec(self, backend, backend_name, wire_format, wire_options)
    local label = self:_label()
    if not wire_format then
        if type(self.serializer) == "string" then
            self:_raise("dogpile.cache: configure: serializer \"" .. self.serializer
                        .. "\" names a codec of wire_format = \"dogpile.cache\"; set wire_format, "
                        .. "or give serializer and deserializer functions")
        end
        return values.codec(self.serializer, self.deserializer, backend.serialized == true, label)
    end
    if backend.serialized ~= true or WIRE_REFUSED[backend_name] then
        self:_raise("dogpile.cache: configure: wire_format = \"dogpile.cache\" needs a backend "
                    .. "that stores the bytes as they are (redis, redis_sentinel, redis_cluster, "
                    .. "memcached, or another that stores bytes), not '" .. tostring(backend_name)
                    .. "'")
    end
    return values.wire_codec(self.serializer, self.deserializer, backend_name == MEMCACHED,
                             wire_options, label)
end

--- `region:configure(backend_name, opts)` -> region.
-- @raise when already configured, on an unknown backend or a bad option
-- @tparam string backend_name a registered backend ("dogpile.cache.memory", ...) or a module name
-- @tparam[opt] table opts `expiration_time` (seconds > 0 and <= ten years; default nil: never expires),
-- `arguments` (table, the backend's: see the Backend arguments page; default {}), `wrap` (array of proxies),
-- `replace_existing_backend` (boolean, default false), `region_invalidator` (table),
-- `fail_open` (boolean, default false), `negative_expiration_time` (seconds or -1, default nil),
-- `stale_if_error` (seconds >= 0, default nil), `early_refresh` (number > 0 or true, default nil),
-- `wire_format`, `wire_options`
-- @treturn table the region
function Region:configure(backend_name, opts)
    local ok, err = pcall(Region._configure, self, backend_name, opts)
    if not ok then
        -- Whoever refused (an option check, the registry, the backend's own
        -- check of its arguments, the read strategy): named as this region.
        self:_reraise(err)
    end
    return self
end

--- configure's work; any error it raises, configure raises naming the region.
-- @local
function Region:_configure(backend_name, opts)
    opts = check_opts("configure", opts, options.CONFIGURE_OPTS, self:_label())
    if rawget(self, "is_configured") and not opts.replace_existing_backend then
        raise("dogpile.cache: region " .. self:_label() .. " is already configured with backend '"
              .. tostring(self._backend_name) .. "'; pass replace_existing_backend = true to replace it")
    end
    if type(backend_name) ~= "string" then
        raise("dogpile.cache: configure: backend name must be a string, got " .. type(backend_name))
    end
    local given_inv = opts.region_invalidator
    if given_inv then
        invalidation.check(given_inv, "configure: region_invalidator")
    end
    local wire_format = opts.wire_format or rawget(self, "wire_format")
    local wire_options = opts.wire_options or rawget(self, "wire_options")
    local arguments = opts.arguments or {}
    if wire_format then
        arguments = wire_arguments(backend_name, arguments, self.serializer)
    end
    local backend = registry.load_backend(backend_name, arguments)
    local codec = choose_codec(self, backend, backend_name, wire_format, wire_options)
    self.wire_format, self.wire_options = wire_format, wire_options

    self._backend_name = backend_name
    self.actual_backend = backend
    self.backend = apply_wrap(self, backend, opts.wrap or {}, "configure")
    local km = self.key_mangler
    if not self._user_key_mangler then
        km = backend.key_mangler
    end
    set_expiration(self, opts.expiration_time)
    rawset(self, "_km", km or false)
    set_invalidator(self, invalidation.choose(given_inv, backend, self,
                                              rawget(self, "region_invalidator"),
                                              rawget(self, "_backend_inv")))
    self._codec = codec
    self.negative_expiration_time = opts.negative_expiration_time
    self.stale_if_error = opts.stale_if_error
    local beta = opts.early_refresh
    if beta == true then
        beta = 1
    end
    self.early_refresh = beta or nil
    self._beta = beta or nil
    -- How far a draw can reach, per second of a creator's duration (37:
    -- read.lua's judge_early): one multiplication fewer in the memory hit.
    self._reach = beta and 37 * beta or nil
    set_reader(self)
    self.fail_open = opts.fail_open == true
    self._domain = C.dp_lock_domain_new()
    self._stats = new_stats(self._front ~= nil)
    -- The hits of get and get_or_create's hit path, counted apart from
    -- _stats (whose other counters the miss path bumps): one field of the
    -- region, which the hit has in hand. stats() adds them up.
    self._hits = 0
    -- Of those, the ones a front strategy's lookup did not find in its
    -- front (read.lua's front_read): stats() derives front_hits from both.
    self._deep_hits = 0
    latency.reset(self)
    -- A shared backend counts evictions since it opened; report ours since now.
    self._evictions_base = 0
    local base = self:_backend_evictions()
    self._evictions_base = base or 0
    self.is_configured = true
    for k, f in pairs(Region) do
        rawset(self, k, f)
    end
    -- The public fields, raw until now, become views (CONFIGURED); only
    -- here, so that a configure that fails leaves them as they were.
    rawset(self, "expiration_time", nil)
    rawset(self, "key_mangler", nil)
    return setmetatable(self, CONFIGURED)
end

--- `region:configure_from_config(config, prefix)`: a flat table, as from an
-- ini file; strings are coerced.
-- Strings are coerced there only (numbers, true/false, None/nil), as an ini file holds only strings.
-- @tparam table config flat table: `prefix.."backend"`, `prefix.."expiration_time"`,
-- `prefix.."arguments.<name>"`, ... (see configure)
-- @tparam string prefix the prefix of this region's keys, such as "cache.local."
-- @treturn table the region
-- @raise as configure does, or on a key without a backend
function Region:configure_from_config(config, prefix)
    if type(config) ~= "table" then
        self:_raise("dogpile.cache: configure_from_config: config must be a table, got " .. type(config))
    end
    if type(prefix) ~= "string" then
        self:_raise("dogpile.cache: configure_from_config: prefix must be a string, got " .. type(prefix))
    end
    local conf = util.coerce_string_conf(config)
    local backend = conf[prefix .. "backend"]
    if backend == nil then
        self:_raise("dogpile.cache: configure_from_config: no '" .. prefix .. "backend' in config")
    end
    local args_prefix = prefix .. "arguments."
    local arguments = {}
    for k, v in pairs(conf) do
        if type(k) == "string" and k:sub(1, #args_prefix) == args_prefix then
            arguments[k:sub(#args_prefix + 1)] = v
        end
    end
    local exp = conf[prefix .. "expiration_time"]
    if exp ~= nil and not options.finite(exp) then
        self:_raise("dogpile.cache: configure_from_config: " .. prefix .. "expiration_time must "
                    .. "be a finite number of seconds, got '" .. tostring(exp) .. "'")
    end
    local seconds = {}
    for _, name in ipairs({ "negative_expiration_time", "stale_if_error", "early_refresh" }) do
        local v = conf[prefix .. name]
        if v ~= nil and not (name == "early_refresh" and type(v) == "boolean") then
            if not options.finite(v) then
                self:_raise("dogpile.cache: configure_from_config: " .. prefix .. name .. " must "
                            .. "be a finite number, got '" .. tostring(v) .. "'")
            end
        end
        seconds[name] = v
    end
    return self:configure(backend, {
        expiration_time = exp,
        arguments = arguments,
        replace_existing_backend = conf[prefix .. "replace_existing_backend"] == true,
        fail_open = conf[prefix .. "fail_open"] == true or nil,
        negative_expiration_time = seconds.negative_expiration_time,
        stale_if_error = seconds.stale_if_error,
        early_refresh = seconds.early_refresh,
        wire_format = conf[prefix .. "wire_format"],
    })
end

--- `region:wrap(proxy)`: wrap the configured backend in one more proxy.
-- @tparam table p a ProxyBackend instance (dogpile.cache.proxy), or its class
-- @treturn table the region
function Region:wrap(p)
    self.backend = apply_wrap(self, self.backend, { p }, "wrap")
    -- Every read now goes through the proxy.
    set_reader(self)
end

--- `region:invalidate(hard)`: `hard` nil or true: hard; false: soft.
-- @raise when hard is not a boolean or nil
-- @tparam[opt=true] boolean hard true: every value created before now is a miss; false (soft): such
-- values are served while one caller regenerates them
function Region:invalidate(hard)
    options.check_hard(hard, "invalidate", self)
    if hard == nil then
        hard = true
    end
    self.region_invalidator:invalidate(hard)
end

--- `region:stats()` -> the region's counters since configure.
-- @treturn table `hits`, `misses`, `creations`, `stale_served`, `lock_waits`, `errors`, `evictions`,
-- `stale_on_error`, `early_refreshes`; with a tiered front, `front_hits` and `tier_hits`; with a
-- circuit breaker, `circuit_state`, `circuit_opened`, `circuit_probes`, `circuit_refused`; where the
-- backend counts them, `lock_overruns`
function Region:stats()
    local st = self._stats or new_stats()
    local out = {}
    for k, v in pairs(st) do
        out[k] = v
    end
    local hits = rawget(self, "_hits") or 0
    out.hits = out.hits + hits
    if out.front_hits ~= nil then
        -- get_multi's front hits are counted as they come; get's and
        -- get_or_create's are the hits of their lookups less those served
        -- past the front.
        out.front_hits = out.front_hits + hits - (rawget(self, "_deep_hits") or 0)
    end
    local ev, bs = self:_backend_evictions()
    if ev then
        out.evictions = ev - (self._evictions_base or 0)
    end
    -- The circuit breaker of a networked C backend (shared by the process).
    if bs and bs.circuit_state then
        out.circuit_state = bs.circuit_state
        out.circuit_opened, out.circuit_refused = bs.circuit_opened, bs.circuit_refused
        out.circuit_probes = bs.circuit_probes
    end
    -- Creations that outlived a distributed lock's timeout, where the backend
    -- counts them (per Lua state).
    local b = rawget(self, "actual_backend")
    local overruns = b and rawget(b, "lock_overruns")
    out.lock_overruns = type(overruns) == "number" and overruns or 0
    -- Hits per tier, where the backend has tiers (front.md).
    if b and is_callable(b.tier_hits) then
        out.tier_hits = b:tier_hits(out.front_hits or 0)
    end
    return out
end

function Region:_backend_evictions()
    local b = rawget(self, "actual_backend")
    if b and b.stats then
        local ok, bs = pcall(b.stats, b)
        if ok and type(bs) == "table" and type(bs.evictions) == "number" then
            return bs.evictions, bs
        end
    end
    return nil
end

-- -- The failure policy ----------------------------------------------------------

--- A backend call raised `err`. Under fail_open: log, count, carry on as a
-- miss. Otherwise raise an error naming the backend, the operation and the
-- key (a non-string error object propagates unchanged).
-- Failure lines under fail_open: at most one a second per backend name in
-- this Lua state, the next one saying how many were left out. A server that
-- is down fails every call; its log should say so, not drown in it.
local LOG_EVERY = 1
local log_limits = {}

local function log_limited(name, line)
    local now = C.dp_clock_monotonic()
    local lim = log_limits[name]
    if lim == nil then
        lim = { at = -math.huge, suppressed = 0 }
        log_limits[name] = lim
    end
    if now - lim.at < LOG_EVERY then
        lim.suppressed = lim.suppressed + 1
        return
    end
    if lim.suppressed > 0 then
        line = line .. " (" .. lim.suppressed .. " more failure(s) of " .. name
            .. " not logged in the last " .. string.format("%.1f", now - lim.at) .. " s)"
    end
    lim.at, lim.suppressed = now, 0
    context.log(line)
end
_M._log_limits = log_limits

function Region:_failed(op, key, err)
    self._stats.errors = self._stats.errors + 1
    local name = tostring(self._backend_name)
    local what = name .. ": " .. op .. (key ~= nil and (" '" .. tostring(key) .. "'") or "")
    if type(err) == "string" then
        -- A backend's own message may already say which backend, op and key.
        local prefix = what .. " failed: "
        if err:sub(1, #prefix) == prefix then
            err = err:sub(#prefix + 1)
        elseif err:sub(1, #name + 2) == name .. ": " then
            err = err:sub(#name + 3)
        end
    end
    if not self.fail_open then
        if type(err) ~= "string" then
            error(err, 0)
        end
        self:_raise(what .. " failed: " .. err)
    end
    log_limited(name, "dogpile.cache: region " .. self:_label() .. ": " .. what
                .. " failed (treated as a miss, fail_open): " .. tostring(err))
end

--- Stored bytes that do not decode: counted, logged, and a miss.
-- @local
function Region:_undecodable(err)
    self._stats.errors = self._stats.errors + 1
    context.log("dogpile.cache: region " .. self:_label() .. ": a stored value does not decode "
                .. "(treated as a miss): " .. err)
end

--- The backend's key for `key`.
-- @local
function Region:_mangle(key)
    local km = self.key_mangler
    if km then
        key = km(key)
        if type(key) ~= "string" then
            self:_raise("dogpile.cache: key_mangler returned a " .. type(key) .. ", not a string")
        end
    end
    return key
end
local mangle = Region._mangle

-- The expiration time of a call: the caller's, else the region's (`_exp`,
-- false when none); nil when it never expires (negative). Checked only when
-- given, off the common path.
local function expiration(self, exp, who)
    if exp == nil then
        return self._exp or nil
    elseif not (type(exp) == "number" and exp > -HUGE and exp < HUGE) then
        check_expiration(exp, who, nil, self)
    end
    if exp < 0 then
        return nil
    end
    return exp
end

-- -- get -------------------------------------------------------------------------

--- `region:get(key, expiration_time, ignore_expiration)` -> value or NO_VALUE.
-- @tparam string key the key as the caller gives it (the key mangler applies)
-- @tparam[opt] number expiration_time seconds, overriding the region's for this call; -1: never expires (default: the region's)
-- @tparam[opt=false] boolean ignore_expiration true: return the value however old, and whatever the invalidation
-- @return the value, or cache.NO_VALUE when missing, expired or invalidated
function Region:get(key, expiration_time, ignore_expiration)
    local lookup = self._lookup
    if type(key) ~= "string" then
        check_key(key, "get", self)
    end
    local exp = expiration(self, expiration_time, "get")
    if self._km then
        key = mangle(self, key)
    end
    if ignore_expiration then
        local st = self._stats
        local cv = fetch(self, key)
        if rawequal(cv, NO_VALUE) then
            st.misses = st.misses + 1
            return NO_VALUE
        end
        st.hits = st.hits + 1
        return cv.payload
    end
    local hit, value = lookup(self, key, exp)
    if hit then
        self._hits = self._hits + 1
        return value
    end
    -- _stats read here, not before the lookup: one value fewer live across
    -- the hit's call to the clock.
    local st = self._stats
    st.misses = st.misses + 1
    return NO_VALUE
end

--- `region:get_multi(keys, expiration_time, ignore_expiration)` -> array.
-- @tparam {string,...} keys an array of keys
-- @tparam[opt] number expiration_time seconds, overriding the region's for this call; -1: never expires (default: the region's)
-- @tparam[opt=false] boolean ignore_expiration true: return the value however old, and whatever the invalidation
-- @treturn table an array of values (cache.NO_VALUE for each one missing), in the order of keys
function Region:get_multi(keys, expiration_time, ignore_expiration)
    local lookup_multi = self._lookup_multi
    if type(keys) ~= "table" then
        self:_raise("dogpile.cache: get_multi: keys must be an array of strings, got " .. type(keys))
    end
    local exp = expiration(self, expiration_time, "get_multi")
    local n = #keys
    if n == 0 then
        return {}
    end
    local mangled = {}
    for i = 1, n do
        check_key(keys[i], "get_multi", self)
        mangled[i] = mangle(self, keys[i])
    end
    local st = self._stats
    local out, hits
    if ignore_expiration then
        out, hits = fetch_multi(self, mangled), 0
        for i = 1, n do
            local cv = out[i]
            if not rawequal(cv, NO_VALUE) then
                hits = hits + 1
                out[i] = cv.payload
            end
        end
    else
        out, hits = lookup_multi(self, mangled, exp)
    end
    st.hits = st.hits + hits
    st.misses = st.misses + (n - hits)
    return out
end

--- `region:get_value_metadata(key, expiration_time, ignore_expiration)` ->
-- CachedValue or nil.
-- @tparam string key the key
-- @tparam[opt] number expiration_time seconds, overriding the region's for this call; -1: never expires (default: the region's)
-- @tparam[opt=false] boolean ignore_expiration true: return the value however old, and whatever the invalidation
-- @treturn ?table the CachedValue (payload and metadata), or nil when missing or expired
function Region:get_value_metadata(key, expiration_time, ignore_expiration)
    local _ = self.backend
    check_key(key, "get_value_metadata", self)
    local exp = expiration(self, expiration_time, "get_value_metadata")
    local cv = fetch(self, mangle(self, key))
    if rawequal(cv, NO_VALUE) then
        return nil
    end
    if ignore_expiration or judge_value(self, cv, exp) == FRESH then
        return cv
    end
    return nil
end

-- -- set / delete ----------------------------------------------------------------

--- `region:set(key, value, expiration_time)`: `expiration_time` (seconds;
-- negative: never expires) is the value's own, stored with it, as a
-- creator's second return value. `delta` (seconds its creator took) is kept
-- for early_refresh, so that an async_creation_runner's
-- `region:set(key, creator())` stores what the creator returned.
-- @raise when expiration_time or delta is not a finite number or nil
-- @tparam string key the key
-- @tparam any value what to store (nil included)
-- @tparam[opt] number expiration_time seconds; -1: never expires (default: the region's)
-- @tparam[opt] number delta seconds its creator took, >= 0 (default nil)
function Region:set(key, value, expiration_time, delta)
    local _ = self.backend
    check_key(key, "set", self)
    if expiration_time ~= nil and not options.finite(expiration_time) then
        check_expiration(expiration_time, "set", nil, self)
    end
    if delta ~= nil and not (options.finite(delta) and delta >= 0) then
        self:_raise("dogpile.cache: set: delta (the creator's duration) must be a finite number of "
              .. "seconds >= 0 or nil, got " .. tostring(delta))
    end
    if not self._beta then
        delta = nil
    end
    store(self, mangle(self, key), new_value(value, expiration_time, delta))
end

-- Store keys[i] = values[i] for i = 1..n, nil values included (a mapping
-- table cannot hold them).
function Region:_set_pairs(keys, vals, n)
    local _ = self.backend
    local md = new_metadata()
    local out, any = {}, false
    for i = 1, n do
        check_key(keys[i], "set_multi", self)
        out[mangle(self, keys[i])] = { payload = vals[i], metadata = md }
        any = true
    end
    if any then
        store_multi(self, out)
    end
end

--- `region:set_multi(mapping)`: store every value of the mapping.
-- @tparam table mapping {key = value, ...}
function Region:set_multi(mapping)
    local _ = self.backend
    if type(mapping) ~= "table" then
        self:_raise("dogpile.cache: set_multi: mapping must be a table {key = value}, got " .. type(mapping))
    end
    local md = new_metadata()
    local out, any = {}, false
    for k, v in pairs(mapping) do
        check_key(k, "set_multi", self)
        out[mangle(self, k)] = { payload = v, metadata = md }
        any = true
    end
    if any then
        store_multi(self, out)
    end
end

--- `region:delete(key)`: remove the key's value.
-- @tparam string key the key
function Region:delete(key)
    local backend = self.backend
    check_key(key, "delete", self)
    key = mangle(self, key)
    local ok, err = pcall(backend.delete, backend, key)
    if not ok then
        self:_failed("delete", key, err)
    end
end

--- `region:delete_multi(keys)`: remove the values of every key.
-- @tparam {string,...} keys an array of keys
function Region:delete_multi(keys)
    local backend = self.backend
    if type(keys) ~= "table" then
        self:_raise("dogpile.cache: delete_multi: keys must be an array of strings, got " .. type(keys))
    end
    local mangled = {}
    for i = 1, #keys do
        check_key(keys[i], "delete_multi", self)
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

-- -- get_or_create -------------------------------------------------------------------

--- `region:get_or_create(key, creator, expiration_time, should_cache_fn,
-- creator_args)` -> value, under the dogpile lock.
-- @raise whatever the creator raises, after releasing the lock
-- @tparam string key the key
-- @tparam function creator called with creator_args on a miss; returns the value (and optionally its own
-- expiration time in seconds, -1: never)
-- @tparam[opt] number expiration_time seconds, overriding the region's for this call; -1: never expires (default: the region's)
-- @tparam[opt] function should_cache_fn called with the new value: false keeps it out of the cache
-- (default: every value is stored)
-- @tparam[opt] table creator_args an array of the creator's arguments (`n` gives its length when it has
-- nil holes; default: none)
-- @return the value
function Region:get_or_create(key, creator, expiration_time, should_cache_fn, creator_args)
    local lookup = self._lookup_create
    if type(key) ~= "string" then
        check_key(key, "get_or_create", self)
    end
    if type(creator) ~= "function" and not is_callable(creator) then
        self:_raise("dogpile.cache: get_or_create: creator must be a function, got " .. type(creator))
    end
    local exp = expiration(self, expiration_time, "get_or_create")
    local orig_key = key
    if self._km then
        key = mangle(self, key)
    end
    -- The hit, as get's: one read, no closure, no lock. `early` (a
    -- CachedValue) only with early_refresh: this read was drawn to refresh it.
    local hit, value, early = lookup(self, key, exp)
    if hit then
        self._hits = self._hits + 1
        if early == nil then
            return value
        end
        value = early
    end
    if should_cache_fn ~= nil and not is_callable(should_cache_fn) then
        self:_raise("dogpile.cache: get_or_create: should_cache_fn must be a function or nil, got "
              .. type(should_cache_fn))
    end
    if creator_args ~= nil and type(creator_args) ~= "table" then
        self:_raise("dogpile.cache: get_or_create: creator_args must be an array, got " .. type(creator_args))
    end
    return create.get_or_create(self, key, orig_key, creator, exp, should_cache_fn, creator_args,
                                value, hit)
end

--- `region:get_or_create_multi(keys, creator, expiration_time, should_cache_fn)`
-- -> array. The creator is called once, with the distinct keys that need
-- creating in the order they first appear, and must return one value for
-- each. Locks are taken in the order of the mangled keys, so that callers
-- with overlapping key sets cannot deadlock, and every held key is read
-- again before creating, so that a key another caller has just created is
-- not created twice.
-- @raise whatever the creator raises, or when it returns the wrong number of
-- values (then nothing is stored), after releasing every lock
-- @tparam {string,...} keys an array of keys
-- @tparam function creator called with the keys to create (varargs); returns one value for each
-- @tparam[opt] number expiration_time seconds, overriding the region's for this call; -1: never expires (default: the region's)
-- @tparam[opt] function should_cache_fn called with each new value: false keeps it out of the cache
-- (default: every value is stored)
-- @treturn table an array of values, in the order of keys
function Region:get_or_create_multi(keys, creator, expiration_time, should_cache_fn)
    local _ = self.backend
    if type(keys) ~= "table" then
        self:_raise("dogpile.cache: get_or_create_multi: keys must be an array of strings, got " .. type(keys))
    end
    if not is_callable(creator) then
        self:_raise("dogpile.cache: get_or_create_multi: creator must be a function, got " .. type(creator))
    end
    local exp = expiration(self, expiration_time, "get_or_create_multi")
    if should_cache_fn ~= nil and not is_callable(should_cache_fn) then
        self:_raise("dogpile.cache: get_or_create_multi: should_cache_fn must be a function or nil, got "
              .. type(should_cache_fn))
    end
    if #keys == 0 then
        return {}
    end
    for i = 1, #keys do
        check_key(keys[i], "get_or_create_multi", self)
    end
    return create.get_or_create_multi(self, keys, creator, exp, should_cache_fn)
end

--- The mutex for a mangled key (the backend's own lock, or the core's).
-- @local
function Region:_mutex(key)
    return create.mutex_for(self, key)
end

-- -- Decorators ----------------------------------------------------------------------

--- `region:cache_on_arguments(opts)` -> decorator.
-- @tparam[opt] table opts `namespace` (string), `expiration_time` (seconds > 0, or a function returning
-- them; default: the region's), `should_cache_fn`, `to_str` (default tostring), `function_key_generator`
-- (default: the region's)
-- @treturn function the decorator: `decorator(fn)` returns a callable with invalidate, set, get,
-- refresh and original
function Region:cache_on_arguments(opts)
    return decorators.cache_on_arguments(self, opts)
end

--- `region:cache_multi_on_arguments(opts)` -> decorator.
-- @tparam[opt] table opts as cache_on_arguments's, with `asdict` (boolean, default false) and
-- `function_multi_key_generator` instead of function_key_generator
-- @treturn function the decorator
function Region:cache_multi_on_arguments(opts)
    return decorators.cache_multi_on_arguments(self, opts)
end

return _M
