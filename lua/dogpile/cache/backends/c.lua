--- Any C backend registered with the core (dp_backend_register), seen as a
-- Lua backend that stores bytes. Its get/set/delete go through the FFI.
local ffi = require "ffi"
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local dogpile = require "dogpile"

local C = lib.C
local NO_VALUE = api.NO_VALUE
local DP_OK, DP_ENOTFOUND = lib.DP_OK, lib.DP_ENOTFOUND
local ffi_string, ffi_new, ffi_gc = ffi.string, ffi.new, ffi.gc
local type, pairs, tostring, setmetatable = type, pairs, tostring, setmetatable

lib.own_source()

local CBackend = {}
CBackend.__index = CBackend

-- The region names the backend, the operation and the key around this.
local function failed(err)
    error(ffi_string(err.msg), 0)
end

function CBackend:get(key)
    local rc = C.dp_backend_get(self.handle, key, #key, self.bytes, self.err)
    if rc == DP_OK then
        local bytes = self.bytes
        return ffi_string(bytes.data, bytes.len)
    elseif rc == DP_ENOTFOUND then
        return NO_VALUE
    end
    failed(self.err)
end

function CBackend:set(key, value)
    if C.dp_backend_set(self.handle, key, #key, value, #value, self.err) ~= DP_OK then
        failed(self.err)
    end
end

function CBackend:delete(key)
    if C.dp_backend_delete(self.handle, key, #key, self.err) ~= DP_OK then
        failed(self.err)
    end
end

local function mutex_in_domain(self, key)
    return dogpile.core_mutex(self.lock_domain, key)
end

function CBackend:stats()
    local st = ffi_new("dp_backend_stats")
    C.dp_backend_stat(self.handle, st)
    return {
        items = st.items, bytes = st.bytes, max_items = st.max_items, max_bytes = st.max_bytes,
        hits = st.hits, misses = st.misses, evictions = st.evictions,
        expirations = st.expirations,
    }
end

--- Open an instance of the C backend registered as `name` with the region's
-- `arguments` (numbers, strings and booleans).
local function open(name, arguments)
    local n, args, keep = 0, {}, {}
    for k, v in pairs(arguments or {}) do
        if type(k) ~= "string" then
            lib.raise(name .. ": argument names must be strings, got " .. type(k))
        end
        local t = type(v)
        if t ~= "number" and t ~= "string" and t ~= "boolean" then
            lib.raise(name .. ": argument '" .. k .. "' must be a number, string or boolean, got " .. t)
        end
        n = n + 1
        args[n] = { k, v }
    end
    local cargs = ffi_new("dp_arg[?]", n > 0 and n or 1)
    for i = 1, n do
        local k, v = args[i][1], args[i][2]
        local a = cargs[i - 1]
        keep[#keep + 1] = k
        a.name = k
        if type(v) == "number" then
            a.type, a.number = 2, v
        elseif type(v) == "boolean" then
            a.type, a.number = 1, v and 1 or 0
        else
            keep[#keep + 1] = v
            a.type, a.string, a.len = 3, v, #v
        end
    end
    local out = ffi_new("dp_backend*[1]")
    local err = ffi_new("dp_err")
    if C.dp_backend_open(name, cargs, n, out, err) ~= DP_OK then
        lib.raise(ffi_string(err.msg))
    end
    local handle = ffi_gc(out[0], C.dp_backend_close)
    local self = setmetatable({
        name = name,
        handle = handle,
        serialized = true,
        infallible = C.dp_backend_infallible(handle) == 1,
        bytes = ffi_gc(ffi_new("dp_bytes"), C.dp_bytes_free),
        err = err,
        lock_domain = C.dp_backend_lock_domain(handle),
        _keep = keep,
    }, CBackend)
    if self.lock_domain ~= 0 then
        self.get_mutex = mutex_in_domain
    end
    return self
end

--- Close now rather than at garbage collection.
function CBackend:close()
    if self.handle ~= nil then
        C.dp_backend_close(ffi_gc(self.handle, nil))
        self.handle = nil
    end
end

return { open = open, CBackend = CBackend }
