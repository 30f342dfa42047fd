--- dogpile.cache.ngx: helpers for OpenResty.
-- `async_creation_runner(region, key, creator, mutex)`: regenerates in an
-- ngx.timer.at(0) timer, so the request that found the value expired returns
-- the stale value at once and no request waits for the regeneration. Give it
-- to make_region (or in a load_regions file):
--
--     async_creation_runner = require("dogpile.cache.ngx").async_creation_runner
local lib = require "dogpile.lib"

local ngx = ngx
local pcall, tostring = pcall, tostring

lib.own_source()

local _M = { _VERSION = lib.version }

local function regenerate(premature, region, key, creator, mutex)
    local ok, err = true, nil
    -- premature: nginx is exiting or reloading; leave the stale value.
    if not premature then
        ok, err = pcall(function()
            region:set(key, creator())
        end)
    end
    local rok, rerr = pcall(mutex.release, mutex)
    if not ok then
        ngx.log(ngx.ERR, "dogpile.cache.ngx: async regeneration of key '", tostring(key),
                "' failed: ", tostring(err))
    end
    if not rok then
        ngx.log(ngx.ERR, "dogpile.cache.ngx: releasing the lock of key '", tostring(key),
                "' after async regeneration failed: ", tostring(rerr))
    end
end

--- The runner: the mutex is released whatever happens (creator error, timer
-- refused). When no timer can be created (lua_max_pending_timers reached, or a
-- phase without timers) the error is logged, the lock released, and the
-- caller still gets the stale value; a later request tries again.
-- @tparam table region the region
-- @tparam string key the key as the caller gave it
-- @tparam function creator makes the value: the runner stores it with region:set
-- @tparam table mutex the lock, held: the runner releases it
function _M.async_creation_runner(region, key, creator, mutex)
    local ok, err = ngx.timer.at(0, regenerate, region, key, creator, mutex)
    if not ok then
        pcall(mutex.release, mutex)
        ngx.log(ngx.ERR, "dogpile.cache.ngx: cannot start the regeneration of key '",
                tostring(key), "' in a timer: ", tostring(err))
    end
end

return _M
