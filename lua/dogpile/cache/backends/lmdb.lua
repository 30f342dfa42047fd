--- dogpile.cache.lmdb: a persistent cache in an LMDB environment, shared by
-- every process and thread of the machine, with a lock per key between
-- processes (released by the kernel when its holder dies).
-- Arguments (README, "dogpile.cache.lmdb"): path (required), map_size,
-- max_bytes, max_readers, sync, expiration_time, on_full, lru_resolution,
-- sweep_interval, mode, lock_timeout.
require "dogpile.backends.lmdb" -- registers the C backend
local c = require "dogpile.cache.backends.c"
local util = require "dogpile.cache.util"
local lib = require "dogpile.lib"
local ffi = require "ffi"

local type, pairs, tostring = type, pairs, tostring

lib.own_source()

local NAME = "dogpile.cache.lmdb"
-- The longest a stuck holder can keep the others waiting, in seconds; a
-- dead holder's lock is released by the kernel at once.
local DEFAULT_LOCK_TIMEOUT = 30
-- LMDB's keys are at most 511 bytes; ours carry a one-byte prefix.
local MAX_KEY = 510

local function new(arguments)
    arguments = arguments or {}
    if type(arguments) ~= "table" then
        lib.raise(NAME .. ": arguments must be a table, got " .. type(arguments))
    end
    local lock_timeout = arguments.lock_timeout
    if lock_timeout == nil then
        lock_timeout = DEFAULT_LOCK_TIMEOUT
    elseif type(lock_timeout) ~= "number" or not (lock_timeout > 0) then
        lib.raise(NAME .. ": lock_timeout must be a positive number of seconds (math.huge: "
                  .. "wait for a stuck holder forever), got " .. tostring(lock_timeout))
    end
    -- lock_timeout belongs to this handle (the Lua mutex applies it); the
    -- rest describes the shared environment.
    local rest = {}
    for k, v in pairs(arguments) do
        if k ~= "lock_timeout" then
            rest[k] = v
        end
    end
    local backend = c.open(NAME, rest)
    -- A success with a message: the path was open in another process with
    -- other map_size / max_bytes, and this one uses the file's (lmdb.c,
    -- "Settings between processes"). Said once, where fail_open goes.
    local note = ffi.string(backend.err.msg)
    if note ~= "" then
        local region = package.loaded["dogpile.cache.region"]
        if region and region.log then
            region.log(note)
        else
            io.stderr:write(note, "\n")
        end
    end
    backend.lock_timeout = lock_timeout
    backend.key_mangler = util.length_conditional_mangler(MAX_KEY + 1, util.sha1_mangle_key)
    return backend
end

--- A backend over the LMDB environment at `arguments.path` (the region calls it from `configure`).
-- @function new
-- @tparam[opt] table arguments the arguments listed above
-- @treturn table the backend
return { new = new, DEFAULT_LOCK_TIMEOUT = DEFAULT_LOCK_TIMEOUT }
