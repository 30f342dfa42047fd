--- Checking what a caller hands the region: option tables (make_region,
-- configure, the decorators), keys, expiration times and invalidate's `hard`.
-- Each check raises a `dogpile.cache:` error at the caller's line, in the
-- format of the C backends' core/args.c: an unknown name with the list of
-- known ones, a wrong value as "<name> must be <what>, got <value>" where
-- <value> shows a string quoted (`got string "60"`). Given the region that
-- checks, a check names it as every error of a region does (name_region):
-- `dogpile.cache: get: key must be a string, got 5 (region 'users')`.
--
-- Strings are not coerced: a Lua table says what it means, so `"60"` is
-- refused wherever a number is expected (configure, make_region,
-- load_regions, the decorators, every backend's arguments). The one
-- exception is `configure_from_config`, whose flat table stands for an ini
-- file of strings, as in dogpile.cache (util.coerce_string_conf).
local lib = require "dogpile.lib"
local dogpile = require "dogpile"

local raise = lib.raise
local is_callable = dogpile.is_callable
local type, pairs, tostring, sort, concat, find =
      type, pairs, tostring, table.sort, table.concat, string.find
local HUGE = math.huge

--- The longest expiration time accepted in an option table: ten years. A
-- larger one is a unit mistake (milliseconds, or a timestamp).
local MAX_EXPIRATION = 10 * 365 * 86400

lib.own_source()

local _M = { MAX_EXPIRATION = MAX_EXPIRATION }

--- The one form of every error a region raises: the message as it was,
-- whole (specs and logs match on it), then " (region 'users')", or
-- " (region (unnamed))"; `label` is Region:_label()'s. A message that
-- names the region already ("region 'users' is already configured ...")
-- is returned as it is.
-- @tparam string msg the message
-- @tparam string label the region's label
-- @treturn string the message naming the region
function _M.name_region(msg, label)
    local tag = "region " .. label
    if find(msg, tag, 1, true) then
        return msg
    end
    return msg .. " (" .. tag .. ")"
end
local name_region = _M.name_region

-- Raise `msg`, naming the region of label `label` when a region checks.
local function refuse(label, msg)
    if label ~= nil then
        msg = name_region(msg, label)
    end
    raise(msg)
end

-- Raise `msg`, naming `region` when a region checks.
local function fail(region, msg)
    refuse(region ~= nil and region:_label() or nil, msg)
end

--- `v` as core/args.c shows an argument: a string quoted (cut at 40 bytes,
-- with the type named), a number as Lua prints it, nil and booleans as
-- they read, anything else by its type.
function _M.show(v)
    local t = type(v)
    if t == "string" then
        local s = v:sub(1, 40):gsub('[%c"\\\128-\255]', function(c)
            if c == '"' or c == "\\" then
                return "\\" .. c
            end
            return "\\" .. c:byte()
        end)
        return 'string "' .. s .. (#v > 40 and '"...' or '"')
    elseif t == "number" then
        if v ~= v then
            return "nan"
        elseif v == HUGE then
            return "math.huge"
        elseif v == -HUGE then
            return "-math.huge"
        end
        return tostring(v)
    elseif t == "nil" or t == "boolean" then
        return tostring(v)
    end
    return "a " .. t
end
local show = _M.show

--- The names of `allowed`, sorted and joined: "a, b, c".
function _M.known(allowed)
    local names = {}
    for k in pairs(allowed) do
        names[#names + 1] = tostring(k)
    end
    sort(names)
    return #names > 0 and concat(names, ", ") or "none"
end

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

--- `exp` nil or a finite number of seconds (negative: never expires), as a
-- call's own expiration time (get's override, set, a creator's second
-- value); `name` (default "expiration_time") names it in the message;
-- `region` (optional) is named too.
-- @raise otherwise
function _M.check_expiration(exp, who, name, region)
    if exp == nil or finite(exp) then
        return
    end
    name = name or "expiration_time"
    if type(exp) == "number" then
        fail(region, "dogpile.cache: " .. who .. ": " .. name .. " must be a finite number of "
             .. "seconds (-1: never expires) or nil, got " .. show(exp))
    end
    fail(region, "dogpile.cache: " .. who .. ": " .. name .. " must be a number of seconds or "
         .. "nil, got " .. show(exp))
end

-- An option table's lifetime: expiration_time from 0 (exclusive) to ten
-- years (nil: never expires); negative_expiration_time the same or -1
-- (misses kept for good, as a creator's -1). Anything else negative was
-- accepted once and silently meant "never": a sign mistake, refused.
local function check_lifetime(who, k, v, label)
    if finite(v) and ((v > 0 and v <= MAX_EXPIRATION) or (v == -1 and k == "negative_expiration_time")) then
        return
    end
    refuse(label, "dogpile.cache: " .. who .. ": " .. k .. " must be a finite number of seconds > 0 and <= "
           .. MAX_EXPIRATION .. " (ten years)" .. (k == "negative_expiration_time" and ", -1 (never)" or "")
           .. " or nil (never), got " .. show(v))
end

--- Check an option table against `allowed` ({name = type}); returns the
-- table ({} for nil). `label` (optional, "'name'" or "(unnamed)", as
-- Region:_label) names the region in every message, as every error of a
-- region does: "dogpile.cache: configure: ... (region 'r')".
-- @raise on a non-table, an unknown option or a value of the wrong type
function _M.check(who, opts, allowed, label)
    if opts == nil then
        return {}
    end
    if type(opts) ~= "table" then
        refuse(label, "dogpile.cache: " .. who .. ": options must be a table, got " .. show(opts))
    end
    for k, v in pairs(opts) do
        local want = allowed[k]
        if not want then
            refuse(label, "dogpile.cache: " .. who .. ": unknown option '" .. tostring(k) .. "' (known: "
                   .. _M.known(allowed) .. ")")
        end
        local ok = type(v) == want or (want == "function" and is_callable(v))
            or also_accepted(k, v, allowed)
        if not ok then
            local what = (want == "number" and (k == "expiration_time" or k == "negative_expiration_time"))
                and "a number of seconds" or (want == "table" or want == "function") and "a " .. want
                or want == "boolean" and "a boolean" or want == "string" and "a string"
                or "a number"
            if k == "expiration_time" and CALLABLE_EXPIRATION[allowed] then
                what = what .. " or a function returning one"
            elseif k == "key_mangler" then
                what = what .. " or \"sha1\""
            elseif k == "serializer" then
                what = what .. " or \"pickle\" or \"json\""
            elseif k == "early_refresh" then
                what = what .. " or a boolean"
            end
            refuse(label, "dogpile.cache: " .. who .. ": " .. k .. " must be " .. what .. ", got " .. show(v))
        end
        if (k == "expiration_time" or k == "negative_expiration_time") and type(v) == "number" then
            check_lifetime(who, k, v, label)
        elseif k == "wire_format" and v ~= "dogpile.cache" then
            refuse(label, "dogpile.cache: " .. who .. ": wire_format must be \"dogpile.cache\" (values "
                   .. "as Python's dogpile.cache stores them) or nil, got " .. show(v))
        elseif (k == "stale_if_error" or k == "early_refresh") and type(v) == "number"
            and not (finite(v) and (v > 0 or (v == 0 and k == "stale_if_error"))) then
            refuse(label, "dogpile.cache: " .. who .. ": " .. k .. " must be a finite number "
                   .. (k == "stale_if_error" and "of seconds >= 0" or "> 0 (XFetch's beta; 1 is usual)")
                   .. ", got " .. show(v))
        end
    end
    return opts
end

--- @raise when `key` is not a string (naming `region`, when given)
function _M.check_key(key, who, region)
    if type(key) ~= "string" then
        fail(region, "dogpile.cache: " .. who .. ": key must be a string, got " .. show(key))
    end
end

--- invalidate's `hard`: nil (true) or a boolean. Anything else is refused
-- rather than read as true: `invalidate("no")` must not invalidate hard.
-- @raise otherwise (naming `region`, when given)
function _M.check_hard(hard, who, region)
    if hard ~= nil and type(hard) ~= "boolean" then
        fail(region, "dogpile.cache: " .. who .. ": hard must be true, false or nil, got "
             .. type(hard) .. " " .. tostring(hard))
    end
end

return _M
