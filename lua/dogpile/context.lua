--- What belongs to one Lua state rather than to a module: the lock owner tag,
-- the sleep a waiter yields through, and the logger. Every module asks here;
-- only this module keeps them, so a setting made through `dogpile.set_sleep`
-- or `cache.set_logger` is seen by every module of the state at once.
-- (As luv keeps one luv_ctx_t per Lua state.)
local lib = require "dogpile.lib"

local C = lib.C
local getmetatable, newproxy, pcall, tostring = getmetatable, newproxy, pcall, tostring
local io_stderr = io.stderr

lib.own_source()

local _M = {}

-- -- The lock owner --------------------------------------------------------------

--- This state's owner tag for the core's locks: a blocking wait on a lock
-- that this state holds could never end, and the core refuses it by this tag.
-- A constant for the life of the state: modules may cache it in a local.
_M.OWNER = C.dp_lock_owner_new()

-- When this Lua state closes, whatever locks it still holds are released, so
-- that a host closing a state never strands the threads of other states.
local guard = newproxy(true)
do
    local owner = _M.OWNER
    getmetatable(guard).__gc = function()
        C.dp_lock_release_owner(owner)
    end
end
_M._owner_guard = guard

-- -- Sleep -----------------------------------------------------------------------

local user_sleep

-- Phases of lua-nginx-module where ngx.sleep may yield.
local NGX_YIELDABLE = {
    rewrite = true, access = true, content = true, timer = true,
    ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
    server_rewrite = true,
}

--- Set (or, with nil, clear) the host's sleep: `fn(seconds)` yields the
-- running coroutine to the host's scheduler. The caller has checked `fn`.
function _M.set_sleep(fn)
    user_sleep = fn
end

--- The yielding sleep in force here: the host's, else ngx.sleep where the
-- nginx phase can yield, else nil (waiting must block the thread).
function _M.sleep()
    if user_sleep then
        return user_sleep
    end
    local ngx = ngx
    if ngx and ngx.sleep and ngx.get_phase and NGX_YIELDABLE[ngx.get_phase()] then
        return ngx.sleep
    end
    return nil
end

-- -- Logger ----------------------------------------------------------------------

-- ngx is looked up on each call: a state may load the module before nginx
-- hands it the ngx table (init_by_lua), or outside nginx altogether.
local function default_logger(msg)
    local ngx = ngx
    if ngx and ngx.log then
        ngx.log(ngx.WARN, msg)
    else
        io_stderr:write(msg, "\n")
    end
end

local logger = default_logger

--- Set the logger, a function(message); nil restores the default (ngx.log
-- at WARN inside nginx, stderr elsewhere). The caller has checked `fn`.
function _M.set_logger(fn)
    if fn == nil then
        fn = default_logger
    end
    logger = fn
end

--- The logger in force.
function _M.logger()
    return logger
end

--- Log one line through the logger in force.
function _M.log(msg)
    return logger(msg)
end

--- A logger that never raises into the caller: a failing logger is itself
-- reported on stderr (the message is not lost).
function _M.log_quietly(msg)
    local ok, err = pcall(logger, msg)
    if not ok then
        io_stderr:write(msg, "\n(the logger raised: ", tostring(err), ")\n")
    end
end

return _M
