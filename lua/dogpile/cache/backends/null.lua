--- dogpile.cache.null: stores nothing. Every get is a miss and its lock never
-- blocks, so every caller runs the creator, as with dogpile.cache's null backend.
local lib = require "dogpile.lib"
local api = require "dogpile.cache.api"
local options = require "dogpile.cache.options"

lib.own_source()

local NO_VALUE = api.NO_VALUE

local NullLock = {}
NullLock.__index = NullLock
function NullLock.acquire() return true end
function NullLock.release() end
local NULL_LOCK = setmetatable({}, NullLock)

local Null = {}
Null.__index = Null
-- Pure Lua over a table: a get never raises, so the region calls it without pcall.
Null.infallible = true

function Null.get() return NO_VALUE end
function Null.set() end
function Null.delete() end
function Null.set_multi() end
function Null.delete_multi() end
function Null.get_multi(_, keys)
    local out = {}
    for i = 1, #keys do
        out[i] = NO_VALUE
    end
    return out
end
function Null.get_mutex() return NULL_LOCK end

--- A backend that stores nothing (the region calls it from `configure`).
-- @function new
-- @tparam[opt] table arguments the arguments listed above (default {}: each at its default)
-- @treturn table the backend
return {
    new = function(arguments)
        -- It takes no argument; one given is a mistake (refused, as every
        -- backend refuses a name it does not know).
        if arguments ~= nil and type(arguments) ~= "table" then
            lib.raise("dogpile.cache.null: arguments must be a table, got " .. options.show(arguments))
        end
        for k in pairs(arguments or {}) do
            lib.raise("dogpile.cache.null: unknown argument '" .. tostring(k) .. "' (known: none)")
        end
        return setmetatable({}, Null)
    end,
}
