-- One validation rule (issue 20, item 2): every bad configuration, through
-- every entry point (make_region, configure, configure_from_config,
-- load_regions, the decorators) and every shipped backend's arguments (Lua
-- and C), is refused with one message format, checked here exactly: the
-- prefix (who refuses), what was wrong (an unknown name with the known ones,
-- or what the value must be), what was given (strings quoted and named, as
-- core/args.c shows them) and, last, the region: every error a region
-- raises ends with " (region 'name')" (" (region (unnamed))" without a
-- name), the message before it unchanged. The region's own calls are
-- checked the same way, and its backend failures (without fail_open) too:
-- those are tried against 127.0.0.1:1, where nothing listens, so no server
-- is needed.
local cache = require "dogpile.cache"

-- A message of configure, raised on the region named "v": every error a
-- region raises names it, after the message as it was (options.name_region).
local function R(s)
    return "dogpile.cache: " .. s .. " (region 'v')"
end

local function conf(b, o) return function() cache.make_region({ name = "v" }):configure(b, o) end end
local function args(b, a) return conf(b, { arguments = a }) end
local function mem() return cache.make_region({ name = "v" }):configure("dogpile.cache.memory") end

-- A region named "v" over a redis where nothing listens (connection
-- refused at once), failures raised (fail_open is false by default).
local function down(backend, arguments)
    return cache.make_region({ name = "v" }):configure(backend or "dogpile.cache.redis",
        { arguments = arguments or { host = "127.0.0.1", port = 1 }, fail_open = false })
end

-- A region named "v" over a backend of Lua values whose lock fails as
-- `mutex` says: `acquire` raising, or a get_mutex answer that is no mutex.
local function bad_lock(mutex)
    cache.register_backend("vspec.bad_lock", function()
        return { get = function() return nil end, set = function() end, delete = function() end,
                 get_mutex = function() return mutex end }
    end)
    return cache.make_region({ name = "v" }):configure("vspec.bad_lock")
end
local LOST = { acquire = function() error("connection lost", 0) end, release = function() end }

-- { what, function that must raise, the message (after the position); "<...>"
-- stands for any text: the C backends' known lists are long, and a
-- connection's failure is the system's }
local CASES = {
    { "make_region unknown", function() cache.make_region({ nme = "x" }) end,
      "dogpile.cache: make_region: unknown option 'nme' (known: async_creation_runner, deserializer, function_key_generator, function_multi_key_generator, key_mangler, name, serializer, wire_format, wire_options) (region (unnamed))" },
    { "make_region unknown named", function() cache.make_region({ name = "r", nme = "x" }) end,
      "dogpile.cache: make_region: unknown option 'nme' (known: async_creation_runner, deserializer, function_key_generator, function_multi_key_generator, key_mangler, name, serializer, wire_format, wire_options) (region 'r')" },
    { "make_region name type", function() cache.make_region({ name = 5 }) end,
      "dogpile.cache: make_region: name must be a string, got 5 (region '5')" },
    { "make_region key_mangler", function() cache.make_region({ name = "r", key_mangler = "md5" }) end,
      "dogpile.cache: make_region: key_mangler must be a function or \"sha1\", got string \"md5\" (region 'r')" },
    { "make_region serializer", function() cache.make_region({ name = "r", serializer = "yaml" }) end,
      "dogpile.cache: make_region: serializer must be a function or \"pickle\" or \"json\", got string \"yaml\" (region 'r')" },
    { "make_region not table", function() cache.make_region("r") end,
      "dogpile.cache: make_region: options must be a table, got string \"r\" (region (unnamed))" },
    { "make_region wire_format", function() cache.make_region({ name = "r", wire_format = "pickle" }) end,
      "dogpile.cache: make_region: wire_format must be \"dogpile.cache\" (values as Python's dogpile.cache stores them) or nil, got string \"pickle\" (region 'r')" },
    { "configure unknown", conf("dogpile.cache.memory", { expiraton_time = 5 }),
      R("configure: unknown option 'expiraton_time' (known: arguments, early_refresh, expiration_time, fail_open, negative_expiration_time, region_invalidator, replace_existing_backend, stale_if_error, wire_format, wire_options, wrap)") },
    { "configure exp string", conf("dogpile.cache.memory", { expiration_time = "60" }),
      R("configure: expiration_time must be a number of seconds, got string \"60\"") },
    { "configure exp negative", conf("dogpile.cache.memory", { expiration_time = -5 }),
      R("configure: expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years) or nil (never), got -5") },
    { "configure exp -1", conf("dogpile.cache.memory", { expiration_time = -1 }),
      R("configure: expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years) or nil (never), got -1") },
    { "configure exp zero", conf("dogpile.cache.memory", { expiration_time = 0 }),
      R("configure: expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years) or nil (never), got 0") },
    { "configure exp absurd", conf("dogpile.cache.memory", { expiration_time = 1e12 }),
      R("configure: expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years) or nil (never), got 1000000000000") },
    { "configure exp nan", conf("dogpile.cache.memory", { expiration_time = 0 / 0 }),
      R("configure: expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years) or nil (never), got nan") },
    { "configure exp huge", conf("dogpile.cache.memory", { expiration_time = math.huge }),
      R("configure: expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years) or nil (never), got math.huge") },
    { "configure neg exp -5", conf("dogpile.cache.memory", { negative_expiration_time = -5 }),
      R("configure: negative_expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years), -1 (never) or nil (never), got -5") },
    { "configure arguments type", conf("dogpile.cache.memory", { arguments = "max_items=1" }),
      R("configure: arguments must be a table, got string \"max_items=1\"") },
    { "configure fail_open type", conf("dogpile.cache.memory", { fail_open = "yes" }),
      R("configure: fail_open must be a boolean, got string \"yes\"") },
    { "configure stale_if_error", conf("dogpile.cache.memory", { stale_if_error = -1 }),
      R("configure: stale_if_error must be a finite number of seconds >= 0, got -1") },
    { "configure early_refresh", conf("dogpile.cache.memory", { early_refresh = 0 }),
      R("configure: early_refresh must be a finite number > 0 (XFetch's beta; 1 is usual), got 0") },
    { "configure early_refresh str", conf("dogpile.cache.memory", { early_refresh = "1" }),
      R("configure: early_refresh must be a number or a boolean, got string \"1\"") },
    { "configure backend type", function() cache.make_region({ name = "v" }):configure(5) end,
      R("configure: backend name must be a string, got number") },
    { "configure opts type", function() cache.make_region({ name = "v" }):configure("dogpile.cache.memory", 5) end,
      R("configure: options must be a table, got 5") },
    { "memory unknown", args("dogpile.cache.memory", { max_item = 10 }),
      "dogpile.cache.memory: unknown argument 'max_item' (known: cache_dict, max_items) (region 'v')" },
    { "memory max_items string", args("dogpile.cache.memory", { max_items = "10000" }),
      "dogpile.cache.memory: max_items must be a positive integer, got string \"10000\" (region 'v')" },
    { "memory max_items 0", args("dogpile.cache.memory", { max_items = 0 }),
      "dogpile.cache.memory: max_items must be a positive integer, got 0 (region 'v')" },
    { "memory max_items frac", args("dogpile.cache.memory", { max_items = 2.5 }),
      "dogpile.cache.memory: max_items must be a positive integer, got 2.5 (region 'v')" },
    { "memory cache_dict", args("dogpile.cache.memory", { cache_dict = "t" }),
      "dogpile.cache.memory: cache_dict must be a table, got string \"t\" (region 'v')" },
    { "null unknown", args("dogpile.cache.null", { max_items = 1 }),
      "dogpile.cache.null: unknown argument 'max_items' (known: none) (region 'v')" },
    { "shm unknown", args("dogpile.cache.shared_memory", { max_item = 1 }),
      "dogpile.cache.shared_memory: unknown argument 'max_item' (known: name, max_bytes, max_items, expiration_time, eviction) (region 'v')" },
    { "shm max_items string", args("dogpile.cache.shared_memory", { name = "vspec", max_items = "10000" }),
      "dogpile.cache.shared_memory: max_items must be a positive integer, got string \"10000\" (region 'v')" },
    { "shm eviction", args("dogpile.cache.shared_memory", { name = "vspec", eviction = "fifo" }),
      "dogpile.cache.shared_memory: eviction must be \"s3fifo\" or \"lru\", got string \"fifo\" (region 'v')" },
    { "shm max_bytes", args("dogpile.cache.shared_memory", { name = "vspec", max_bytes = "lots" }),
      "dogpile.cache.shared_memory: max_bytes must be a positive number of bytes or a size such as \"64m\", got string \"lots\" (region 'v')" },
    { "shm exp", args("dogpile.cache.shared_memory", { name = "vspec", expiration_time = -5 }),
      "dogpile.cache.shared_memory: expiration_time must be a positive number of seconds, got -5 (region 'v')" },
    { "lmdb unknown", args("dogpile.cache.lmdb", { pth = "/nonexistent-vspec/db" }),
      "dogpile.cache.lmdb: unknown argument 'pth' (known: path, map_size, max_bytes, max_readers, sync, expiration_time, on_full, lru_resolution, sweep_interval, mode, lock_timeout) (region 'v')" },
    { "lmdb path type", args("dogpile.cache.lmdb", { path = 5 }),
      "dogpile.cache.lmdb: path must be a non-empty string of at most 4095 bytes, got 5 (region 'v')" },
    { "lmdb sync", args("dogpile.cache.lmdb", { path = "/nonexistent-vspec/db", sync = "yes" }),
      "dogpile.cache.lmdb: sync must be one of \"full\", \"meta\", \"none\", got string \"yes\" (region 'v')" },
    { "lmdb map_size", args("dogpile.cache.lmdb", { path = "/nonexistent-vspec/db", map_size = "10000" }),
      "dogpile.cache.lmdb: map_size must be a number of bytes >= 65536 and <= 1e+15 or a size such as \"64m\", got string \"10000\" (region 'v')" },
    { "redis unknown", args("dogpile.cache.redis", { prt = 6379 }),
      "dogpile.cache.redis: unknown argument 'prt' (known: url, <...>) (region 'v')" },
    { "redis port string", args("dogpile.cache.redis", { port = "6379" }),
      "dogpile.cache.redis: port must be an integer from 1 to 65535, got string \"6379\" (region 'v')" },
    { "redis port range", args("dogpile.cache.redis", { port = 70000 }),
      "dogpile.cache.redis: port must be an integer from 1 to 65535, got 70000 (region 'v')" },
    { "redis db", args("dogpile.cache.redis", { db = -1 }),
      "dogpile.cache.redis: db must be a non-negative integer, got -1 (region 'v')" },
    { "redis distributed_lock", args("dogpile.cache.redis", { distributed_lock = "true" }),
      "dogpile.cache.redis: distributed_lock must be a boolean, got string \"true\" (region 'v')" },
    { "memcached unknown", args("dogpile.cache.memcached", { urls = "127.0.0.1:1" }),
      "dogpile.cache.memcached: unknown argument 'urls' (known: url, <...>) (region 'v')" },
    { "memcached binary", args("dogpile.cache.memcached", { url = "127.0.0.1:1", binary = 1 }),
      "dogpile.cache.memcached: binary must be a boolean, got 1 (region 'v')" },
    { "memcached limit", args("dogpile.cache.memcached", { url = "127.0.0.1:1", server_failure_limit = "2" }),
      "dogpile.cache.memcached: server_failure_limit must be a positive integer, got string \"2\" (region 'v')" },
    { "tiered unknown", args("dogpile.cache.tiered", { tier = {} }),
      "dogpile.cache.tiered: unknown argument 'tier' (known: tiers, prefix, name) (region 'v')" },
    { "tiered one tier", args("dogpile.cache.tiered", { tiers = { { backend = "dogpile.cache.memory" } } }),
      "dogpile.cache.tiered: arguments.tiers must hold 2 to 4 tiers, got 1 (region 'v')" },
    { "decorator unknown", function() mem():cache_on_arguments({ namespce = "x" }) end,
      "dogpile.cache: cache_on_arguments: unknown option 'namespce' (known: expiration_time, function_key_generator, namespace, should_cache_fn, to_str) (region 'v')" },
    { "decorator exp negative", function() mem():cache_on_arguments({ expiration_time = -5 }) end,
      "dogpile.cache: cache_on_arguments: expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years) or nil (never), got -5 (region 'v')" },
    { "decorator exp string", function() mem():cache_on_arguments({ expiration_time = "60" }) end,
      "dogpile.cache: cache_on_arguments: expiration_time must be a number of seconds or a function returning one, got string \"60\" (region 'v')" },
    { "multi decorator unknown", function() mem():cache_multi_on_arguments({ as_dict = true }) end,
      "dogpile.cache: cache_multi_on_arguments: unknown option 'as_dict' (known: asdict, expiration_time, function_multi_key_generator, namespace, should_cache_fn, to_str) (region 'v')" },
    { "multi decorator asdict", function() mem():cache_multi_on_arguments({ asdict = "yes" }) end,
      "dogpile.cache: cache_multi_on_arguments: asdict must be a boolean, got string \"yes\" (region 'v')" },
    { "load_regions unknown", function() cache.load_regions({ a = { backend = "dogpile.cache.memory", colour = "red" } }) end,
      "dogpile.cache: load_regions: region 'a' in the given table: unknown option 'colour' (known: arguments, async_creation_runner, backend, deserializer, early_refresh, expiration_time, fail_open, function_key_generator, function_multi_key_generator, key_mangler, name, negative_expiration_time, region_invalidator, replace_existing_backend, serializer, stale_if_error, wire_format, wire_options, wrap)" },
    { "load_regions exp string", function() cache.load_regions({ a = { backend = "dogpile.cache.memory", expiration_time = "60" } }) end,
      "dogpile.cache: load_regions: region 'a' in the given table: configure: expiration_time must be a number of seconds, got string \"60\"" },
    { "load_regions exp negative", function() cache.load_regions({ a = { backend = "dogpile.cache.memory", expiration_time = -5 } }) end,
      "dogpile.cache: load_regions: region 'a' in the given table: configure: expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years) or nil (never), got -5" },
    { "load_regions backend arg", function() cache.load_regions({ a = { backend = "dogpile.cache.memory", arguments = { max_item = 10 } } }) end,
      "dogpile.cache: load_regions: region 'a' in the given table: dogpile.cache.memory: unknown argument 'max_item' (known: cache_dict, max_items)" },
    { "load_regions no backend", function() cache.load_regions({ a = { expiration_time = 5 } }) end,
      "dogpile.cache: load_regions: region 'a' in the given table: backend must be a backend name, got nil" },
    { "cfc exp", function() cache.make_region({ name = "v" }):configure_from_config({ ["c.backend"] = "dogpile.cache.memory", ["c.expiration_time"] = "-5" }, "c.") end,
      R("configure: expiration_time must be a finite number of seconds > 0 and <= 315360000 (ten years) or nil (never), got -5") },
    { "cfc exp word", function() cache.make_region({ name = "v" }):configure_from_config({ ["c.backend"] = "dogpile.cache.memory", ["c.expiration_time"] = "soon" }, "c.") end,
      "dogpile.cache: configure_from_config: c.expiration_time must be a finite number of seconds, got 'soon' (region 'v')" },
    { "cfc arg", function() cache.make_region({ name = "v" }):configure_from_config({ ["c.backend"] = "dogpile.cache.memory", ["c.arguments.max_item"] = "10" }, "c.") end,
      "dogpile.cache.memory: unknown argument 'max_item' (known: cache_dict, max_items) (region 'v')" },
    { "cfc no backend", function() cache.make_region({ name = "v" }):configure_from_config({}, "c.") end,
      "dogpile.cache: configure_from_config: no 'c.backend' in config (region 'v')" },
    -- Through the region, whoever raised: the registry, a C backend, the region's own calls.
    { "C backend unknown argument", function() cache.make_region({ name = "users" }):configure("dogpile.cache.redis", { arguments = { nosuch = 1 } }) end,
      "dogpile.cache.redis: unknown argument 'nosuch' (known: url, <...>) (region 'users')" },
    { "C backend unknown argument, unnamed", function() cache.make_region():configure("dogpile.cache.lmdb", { arguments = { nosuch = 1 } }) end,
      "dogpile.cache.lmdb: unknown argument 'nosuch' (known: path, <...>) (region (unnamed))" },
    { "unknown backend", conf("dogpile.cache.memroy"),
      "dogpile.cache: unknown backend 'dogpile.cache.memroy'; registered backends: <...>, and no Lua module 'dogpile.cache.memroy' was found either (region 'v')" },
    { "configure wrap", conf("dogpile.cache.memory", { wrap = { 5 } }),
      R("configure: wrap[1] is not a ProxyBackend class or instance (got number)") },
    { "configure region_invalidator", conf("dogpile.cache.memory", { region_invalidator = {} }),
      R("configure: region_invalidator has no method invalidate") },
    { "configure codec name", function() cache.make_region({ name = "v", serializer = "json" }):configure("dogpile.cache.memory") end,
      R("configure: serializer \"json\" names a codec of wire_format = \"dogpile.cache\"; set wire_format, or give serializer and deserializer functions") },
    { "configured twice", function() mem():configure("dogpile.cache.memory") end,
      "dogpile.cache: region 'v' is already configured with backend 'dogpile.cache.memory'; pass replace_existing_backend = true to replace it" },
    { "not configured", function() cache.make_region({ name = "v" }):get("k") end,
      "dogpile.cache: region 'v' is not configured; call region:configure(backend_name, opts) first" },
    { "wrap", function() mem():wrap(5) end,
      R("wrap: wrap[1] is not a ProxyBackend class or instance (got number)") },
    { "get key", function() mem():get(5) end,
      R("get: key must be a string, got 5") },
    { "get key, unnamed", function() cache.make_region():configure("dogpile.cache.memory"):get({}) end,
      "dogpile.cache: get: key must be a string, got a table (region (unnamed))" },
    { "get expiration_time", function() mem():get("k", "60") end,
      R("get: expiration_time must be a number of seconds or nil, got string \"60\"") },
    { "set delta", function() mem():set("k", 1, nil, -1) end,
      R("set: delta (the creator's duration) must be a finite number of seconds >= 0 or nil, got -1") },
    { "set_multi mapping", function() mem():set_multi("k") end,
      R("set_multi: mapping must be a table {key = value}, got string") },
    { "get_or_create creator", function() mem():get_or_create("k", 5) end,
      R("get_or_create: creator must be a function, got number") },
    { "get_or_create_multi keys", function() mem():get_or_create_multi("k", print) end,
      R("get_or_create_multi: keys must be an array of strings, got string") },
    { "invalidate hard", function() mem():invalidate("no") end,
      R("invalidate: hard must be true, false or nil, got string no") },
    { "key_mangler result", function() cache.make_region({ name = "v", key_mangler = function() return 5 end }):configure("dogpile.cache.memory"):get("k") end,
      R("key_mangler returned a number, not a string") },
    { "configure_from_config config", function() cache.make_region({ name = "v" }):configure_from_config(5, "c.") end,
      R("configure_from_config: config must be a table, got number") },
    -- Decorator misuse: at decoration, at a call, at refresh and set.
    { "decorate a non-function", function() mem():cache_on_arguments()(5) end,
      R("cache_on_arguments: can only decorate a function, got number") },
    { "multi decorate a non-function", function() mem():cache_multi_on_arguments()("f") end,
      R("cache_multi_on_arguments: can only decorate a function, got string") },
    { "decorator expiration function", function() mem():cache_on_arguments({ expiration_time = function() return "60" end })(function(x) return x end)(1) end,
      R("cache_on_arguments: the expiration_time function returned a string; it must return a finite number of seconds (-1: never expires) or nil") },
    { "decorator refresh second value", function() mem():cache_on_arguments()(function() return 1, true end):refresh() end,
      R("cache_on_arguments: refresh: the creator returned a boolean after its value; a second value must be the value's expiration time (a number of seconds) or, after nil, an error message (a string)") },
    { "multi decorator asdict result", function() mem():cache_multi_on_arguments({ asdict = true })(function() return 5 end)(1) end,
      R("cache_multi_on_arguments (asdict): the function must return a table keyed by argument, got number") },
    { "multi decorator refresh result", function() mem():cache_multi_on_arguments()(function() return 5 end):refresh(1) end,
      R("cache_multi_on_arguments: the function must return a table, got number") },
    { "multi decorator set", function() mem():cache_multi_on_arguments()(function(...) return { ... } end):set(5) end,
      R("cache_multi_on_arguments: set: mapping must be a table {argument = value}, got number") },
    -- What a creator returned, judged by the region.
    { "creator second value", function() mem():get_or_create("k", function() return 1, true end) end,
      R("get_or_create: the creator returned a boolean after its value; a second value must be the value's expiration time (a number of seconds) or, after nil, an error message (a string)") },
    { "creator expiration time", function() mem():get_or_create("k", function() return 1, math.huge end) end,
      R("get_or_create: the creator returned an expiration time of inf; it must be a finite number of seconds (-1: never expires)") },
    { "multi creator count", function() mem():get_or_create_multi({ "a", "b" }, function() return { 1 } end) end,
      R("get_or_create_multi: the creator was called with 2 keys and must return one value for each, in order (expected 2, got 1; an array with nil values gives its length in a field n); nothing was stored") },
    { "multi creator result", function() mem():get_or_create_multi({ "a" }, function() return 5 end) end,
      R("get_or_create_multi: the creator must return an array of 1 values, got number") },
    -- A backend's lock: one that is no mutex, one whose server went away.
    { "backend get_mutex answer", function() bad_lock(5):get_or_create("k", function() return 1 end) end,
      R("backend get_mutex: mutex must be an object with :acquire(wait) and :release(), got number") },
    { "backend lock failure", function() bad_lock(LOST):get_or_create("k", function() return 1 end) end,
      "vspec.bad_lock: lock 'k' failed: connection lost (region 'v')" },
    -- Backend failures without fail_open: the backend's message, then the region.
    { "redis down: get", function() down():get("k") end,
      "dogpile.cache.redis: get 'k' failed: <...> (region 'v')" },
    { "redis down: set", function() down():set("k", 1) end,
      "dogpile.cache.redis: set 'k' failed: <...> (region 'v')" },
    { "redis down: get_or_create", function() down():get_or_create("k", function() return 1 end) end,
      "dogpile.cache.redis: get 'k' failed: <...> (region 'v')" },
    { "redis down: get_multi", function() down():get_multi({ "a", "b" }) end,
      "dogpile.cache.redis: get_multi 'a' failed: <...> (region 'v')" },
    { "redis down: set_multi", function() down():set_multi({ a = 1 }) end,
      "dogpile.cache.redis: set_multi 'a' failed: <...> (region 'v')" },
    { "redis down: delete", function() down():delete("k") end,
      "dogpile.cache.redis: delete 'k' failed: <...> (region 'v')" },
    { "redis down: get_or_create_multi", function() down():get_or_create_multi({ "a" }, function() return { 1 } end) end,
      "dogpile.cache.redis: get_multi 'a' failed: <...> (region 'v')" },
    { "memcached down: get", function() down("dogpile.cache.memcached", { url = "127.0.0.1:1" }):get("k") end,
      "dogpile.cache.memcached: get 'k' failed: <...> (region 'v')" },
}

describe("one validation rule", function()
    it("tables at least 40 bad configurations", function()
        assert.is_true(#CASES >= 40, tostring(#CASES))
    end)

    for _, case in ipairs(CASES) do
        it(case[1] .. " is refused with the exact message", function()
            local ok, err = pcall(case[2])
            assert.is_false(ok, "accepted: " .. case[1])
            assert.is_string(err)
            -- Raised at the caller's line (in this file), not inside the library.
            local pos, msg = err:match("^([^\n]-:%d+): (.*)$")
            assert.is_truthy(pos, err)
            assert.is_truthy(pos:find("validation_spec.lua", 1, true), err)
            local want = case[3]
            local head, tail = want:match("^(.-)<%.%.%.>(.*)$")
            if head then
                assert.are.equal(head, msg:sub(1, #head))
                assert.are.equal(tail, msg:sub(#msg - #tail + 1))
                assert.is_true(#msg >= #head + #tail, msg)
            else
                assert.are.equal(want, msg)
            end
        end)
    end

    it("an error that is not a string, raised by a backend through the region, keeps its type", function()
        local boom = setmetatable({}, { __tostring = function() return "boom" end })
        cache.register_backend("vspec.object_errors", function(arguments)
            if arguments.at_open then
                error(boom)
            end
            local function fail() error(boom) end
            return { get = fail, set = fail, delete = fail }
        end)
        local ok, err = pcall(function() cache.make_region({ name = "v" }):configure("vspec.object_errors", { arguments = { at_open = true } }) end)
        assert.is_false(ok)
        assert.is_true(rawequal(boom, err), tostring(err))
        local r = cache.make_region({ name = "v" }):configure("vspec.object_errors")
        for _, call in ipairs({
            function() r:get("k") end, function() r:set("k", 1) end, function() r:delete("k") end,
            function() r:get_multi({ "a" }) end, function() r:set_multi({ a = 1 }) end,
            function() r:get_or_create("k", function() return 1 end) end,
        }) do
            ok, err = pcall(call)
            assert.is_false(ok)
            assert.is_true(rawequal(boom, err), tostring(err))
        end
    end)

    it("accepts what the rule allows: a positive expiration_time, -1 for get's override and "
       .. "negative_expiration_time, strings coerced by configure_from_config only", function()
        local r = cache.make_region({ name = "v" }):configure("dogpile.cache.memory",
            { expiration_time = 60, negative_expiration_time = -1, arguments = { max_items = 10 } })
        assert.are.equal(60, r.expiration_time)
        r:set("k", "v")
        assert.are.equal("v", r:get("k", -1))
        local f = cache.make_region({ name = "w" }):configure_from_config(
            { ["c.backend"] = "dogpile.cache.memory", ["c.expiration_time"] = "60",
              ["c.arguments.max_items"] = "10" }, "c.")
        assert.are.equal(60, f.expiration_time)
        assert.are.equal(10, f.actual_backend:stats().max_items)
        local regions = cache.load_regions({ a = { backend = "dogpile.cache.memory", expiration_time = 60 } })
        assert.are.equal(60, regions.a.expiration_time)
        assert.has_no.errors(function() cache.make_region():configure("dogpile.cache.null", { arguments = {} }) end)
    end)
end)
