--- dogpile.cache.lmdb: a persistent cache in an LMDB environment, shared by
-- every process and thread of the machine, with a lock per key between
-- processes (released by the kernel when its holder dies).
-- Arguments (README, "dogpile.cache.lmdb"; read and checked by
-- backends/lmdb.c): path (required), map_size, max_bytes, max_readers, sync,
-- expiration_time, on_full, lru_resolution, sweep_interval, mode, lock_timeout.
-- What is Lua's here: the default key mangler, and logging the note of an
-- open that adopted another process's settings.
local clmdb = require "dogpile.backends.lmdb" -- registers the C backend
local c = require "dogpile.cache.backends.c"
local util = require "dogpile.cache.util"
local context = require "dogpile.context"
local lib = require "dogpile.lib"
local ffi = require "ffi"

local C = lib.C

lib.own_source()

-- Until dogpile.lib declares it and c.lua reads it (the mutex's wait bound).

local NAME = "dogpile.cache.lmdb"
-- LMDB's keys are at most 511 bytes; ours carry a one-byte prefix.
local MAX_KEY = 510
local KEY_MANGLER = util.length_conditional_mangler(MAX_KEY + 1, util.sha1_mangle_key)

pcall(ffi.cdef, "unsigned int geteuid(void);")

-- nginx's master runs init_by_lua as root; its workers, as the `user` of
-- nginx.conf, could not open files that root made there. So while the
-- master (root) builds regions, the C backend creates and opens nothing:
-- each worker opens at its first operation, and the first one creates the
-- files, owned by the workers' user (backends/lmdb.c, "Deferred opens").
local function in_root_master()
    local ngx = rawget(_G, "ngx")
    return type(ngx) == "table" and type(ngx.get_phase) == "function"
        and ngx.get_phase() == "init" and ffi.C.geteuid() == 0
end

local function new(arguments)
    if type(clmdb) == "table" and in_root_master() then
        clmdb.defer_until_fork()
    end
    local backend = c.open(NAME, arguments)
    -- A success with a message: the path was open in another process with
    -- other map_size / max_bytes, and this one uses the file's (lmdb.c,
    -- "Settings between processes"). Said once, where fail_open goes.
    local note = ffi.string(backend.err.msg)
    if note ~= "" then
        local region = package.loaded["dogpile.cache.region"]
        if region and region.log then
            region.log(note)
        else
            context.log(note)
        end
    end
    local t = C.dp_backend_lock_timeout(backend.handle)
    backend.lock_timeout = t < 0 and math.huge or t
    backend.key_mangler = KEY_MANGLER
    -- The environment's host change feed, for a tiered region over it
    -- (dogpile.cache.tiered): its path, made with the files' mode. nil in
    -- nginx's root master, where nothing is made: a worker asks again.
    local path, mode = arguments.path, arguments.mode
    function backend.host_feed()
        if in_root_master() then
            return nil
        end
        local feed, err = clmdb.feed_file(path, mode)
        if not feed then
            error(err, 0)
        end
        return feed
    end
    return backend
end

--- A backend over the LMDB environment at `arguments.path` (the region calls it from `configure`).
-- @function new
-- @tparam[opt] table arguments the arguments listed above (default {}: each at its default)
-- @treturn table the backend
return { new = new }
