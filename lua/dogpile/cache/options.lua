--- Checking what a caller hands the region: option tables (make_region,
-- configure, the decorators), keys, expiration times and invalidate's `hard`.
-- Each check raises a `dogpile.cache:` error at the caller's line.
local lib = require "dogpile.lib"
local dogpile = require "dogpile"

local raise = lib.raise
local is_callable = dogpile.is_callable
local type, pairs, tostring = type, pairs, tostring
local HUGE = math.huge

lib.own_source()

local _M = {}

--- make_region's options and their types.
_M.MAKE_OPTS = {
    name = "string", function_key_generator = "function",
    function_multi_key_generator = "function", key_mangler = "function",
    serializer = "function", deserializer = "function", async_creation_runner = "function",
    wire_format = "string", wire_options = "table",
}

--- configure's options and their types.
_M.CONFIGURE_OPTS = {
    expiration_time = "number", arguments = "table", wrap = "table",
    replace_existing_backend = "boolean", region_invalidator = "table", fail_open = "boolean",
    negative_expiration_time = "number", stale_if_error = "number", early_refresh = "number",
    wire_format = "string", wire_options = "table",
}

--- cache_on_arguments's options (expiration_time may also be a function).
_M.DECORATOR_OPTS = {
    namespace = "string", expiration_time = "number", should_cache_fn = "function",
    to_str = "function", function_key_generator = "function",
}

--- cache_multi_on_arguments's options.
_M.MULTI_DECORATOR_OPTS = {
    namespace = "string", expiration_time = "number", should_cache_fn = "function",
    to_str = "function", asdict = "boolean", function_multi_key_generator = "function",
}

-- Values accepted besides the declared type: key_mangler = "sha1" and
-- serializer = "pickle" or "json" (for make_region; the names are checked
-- against wire_format at configure), and an expiration_time function (for
-- the decorators).
local CALLABLE_EXPIRATION = { [_M.DECORATOR_OPTS] = true, [_M.MULTI_DECORATOR_OPTS] = true }

local function also_accepted(k, v, allowed)
    if k == "key_mangler" then
        return v == "sha1"
    elseif k == "serializer" then
        return v == "pickle" or v == "json"
    elseif k == "early_refresh" then
        return type(v) == "boolean" -- true: beta 1
    end
    return k == "expiration_time" and CALLABLE_EXPIRATION[allowed] == true and is_callable(v)
end

--- Is `exp` a usable expiration time: a finite number (negative: never
-- expires)? NaN and the infinities are not (a NaN compares false with every
-- time, so it would silently never expire).
local function finite(exp)
    return type(exp) == "number" and exp > -HUGE and exp < HUGE
end
_M.finite = finite

--- `exp` nil or a finite number of seconds; `name` (default
-- "expiration_time") names it in the message.
-- @raise otherwise
function _M.check_expiration(exp, who, name)
    if exp == nil or finite(exp) then
        return
    end
    name = name or "expiration_time"
    if type(exp) == "number" then
        raise("dogpile.cache: " .. who .. ": " .. name .. " must be a finite number of seconds "
              .. "(-1: never expires) or nil, got " .. tostring(exp))
    end
    raise("dogpile.cache: " .. who .. ": " .. name .. " must be a number of seconds or nil, got "
          .. type(exp))
end

--- Check an option table against `allowed` ({name = type}); returns the
-- table ({} for nil).
-- @raise on a non-table, an unknown option or a value of the wrong type
function _M.check(who, opts, allowed)
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
            or also_accepted(k, v, allowed)
        if not ok then
            raise("dogpile.cache: " .. who .. ": " .. k .. " must be a " .. want .. ", got " .. type(v))
        end
        if (k == "expiration_time" or k == "negative_expiration_time") and type(v) == "number" then
            _M.check_expiration(v, who, k)
        elseif k == "wire_format" and v ~= "dogpile.cache" then
            raise("dogpile.cache: " .. who .. ": wire_format must be \"dogpile.cache\" (values "
                  .. "as Python's dogpile.cache stores them) or nil, got \"" .. tostring(v) .. "\"")
        elseif (k == "stale_if_error" or k == "early_refresh") and type(v) == "number"
            and not (finite(v) and (v > 0 or (v == 0 and k == "stale_if_error"))) then
            raise("dogpile.cache: " .. who .. ": " .. k .. " must be a finite number "
                  .. (k == "stale_if_error" and "of seconds >= 0" or "> 0 (XFetch's beta; 1 is usual)")
                  .. ", got " .. tostring(v))
        end
    end
    return opts
end

--- @raise when `key` is not a string
function _M.check_key(key, who)
    if type(key) ~= "string" then
        raise("dogpile.cache: " .. who .. ": key must be a string, got " .. type(key))
    end
end

--- invalidate's `hard`: nil (true) or a boolean. Anything else is refused
-- rather than read as true: `invalidate("no")` must not invalidate hard.
-- @raise otherwise
function _M.check_hard(hard, who)
    if hard ~= nil and type(hard) ~= "boolean" then
        raise("dogpile.cache: " .. who .. ": hard must be true, false or nil, got "
              .. type(hard) .. " " .. tostring(hard))
    end
end

return _M
