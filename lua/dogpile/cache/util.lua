--- Key generators, key manglers and config coercion.
local ffi = require "ffi"
local lib = require "dogpile.lib"

local C = lib.C
local raise = lib.raise
local type, tostring, select, pairs, tonumber = type, tostring, select, pairs, tonumber
local concat, sort = table.concat, table.sort
local debug_getinfo = debug.getinfo
local is_callable = require("dogpile").is_callable

lib.own_source()

local _M = {}

local function check_args(who, namespace, fn, to_str)
    if namespace ~= nil and type(namespace) ~= "string" then
        raise("dogpile.cache: " .. who .. ": namespace must be a string or nil, got " .. type(namespace))
    end
    if not is_callable(fn) then
        raise("dogpile.cache: " .. who .. ": fn must be a function, got " .. type(fn))
    end
    if to_str ~= nil and not is_callable(to_str) then
        raise("dogpile.cache: " .. who .. ": to_str must be a function or nil, got " .. type(to_str))
    end
end

--- The key prefix: the namespace, or where fn is defined.
local function prefix_for(namespace, fn)
    if namespace then
        return namespace
    end
    local info = type(fn) == "function" and debug_getinfo(fn, "S")
    if not info or info.what == "C" then
        -- Every C function is "[C]:-1"; its tostring differs ("builtin#N" for
        -- LuaJIT's own, an address otherwise): pass a namespace to be stable.
        return tostring(fn)
    end
    return info.short_src .. ":" .. info.linedefined
end

--- `function(...) return key end`: prefix.."|"..the arguments through to_str,
-- joined by one space.
-- @tparam[opt] string namespace prefix of the keys (default: where fn is defined, "file:line")
-- @tparam function fn the decorated function (its definition names the default prefix)
-- @tparam[opt=tostring] function to_str turns each argument into a string
-- @treturn function the key generator
function _M.function_key_generator(namespace, fn, to_str)
    check_args("function_key_generator", namespace, fn, to_str)
    to_str = to_str or tostring
    local prefix = prefix_for(namespace, fn) .. "|"
    return function(...)
        local n = select("#", ...)
        if n == 0 then
            return prefix
        elseif n == 1 then
            return prefix .. to_str((...))
        end
        local parts = { ... }
        for i = 1, n do
            parts[i] = to_str(parts[i])
        end
        return prefix .. concat(parts, " ", 1, n)
    end
end

--- `function(...)` returning one key per argument, prefix.."|"..to_str(arg).
-- @tparam[opt] string namespace prefix of the keys (default: where fn is defined, "file:line")
-- @tparam function fn the decorated function (its definition names the default prefix)
-- @tparam[opt=tostring] function to_str turns each argument into a string
-- @treturn function the key generator, returning an array of keys
function _M.function_multi_key_generator(namespace, fn, to_str)
    check_args("function_multi_key_generator", namespace, fn, to_str)
    to_str = to_str or tostring
    local prefix = prefix_for(namespace, fn) .. "|"
    return function(...)
        local n = select("#", ...)
        local keys = { ... }
        for i = 1, n do
            keys[i] = prefix .. to_str(keys[i])
        end
        return keys
    end
end

--- For functions taking one table of named arguments: its keys sorted,
-- `k=v` joined by one space, to_str applied to the values.
-- @tparam[opt] string namespace prefix of the keys (default: where fn is defined, "file:line")
-- @tparam function fn the decorated function (its definition names the default prefix)
-- @tparam[opt=tostring] function to_str turns each argument into a string
-- @treturn function the key generator
function _M.kwarg_function_key_generator(namespace, fn, to_str)
    check_args("kwarg_function_key_generator", namespace, fn, to_str)
    to_str = to_str or tostring
    local prefix = prefix_for(namespace, fn) .. "|"
    return function(kwargs, ...)
        if select("#", ...) > 0 or (kwargs ~= nil and type(kwargs) ~= "table") then
            raise("dogpile.cache: kwarg_function_key_generator: the function takes one table "
                  .. "of named arguments")
        end
        local names = {}
        for k in pairs(kwargs or {}) do
            names[#names + 1] = tostring(k)
        end
        sort(names)
        local lookup = {}
        for k, v in pairs(kwargs or {}) do
            lookup[tostring(k)] = v
        end
        for i = 1, #names do
            names[i] = names[i] .. "=" .. to_str(lookup[names[i]])
        end
        return prefix .. concat(names, " ")
    end
end

local hexbuf = ffi.new("char[41]")

--- 40 lowercase hex characters of SHA-1(key).
-- @tparam string key the key
-- @treturn string 40 hex characters
function _M.sha1_mangle_key(key)
    if type(key) ~= "string" then
        raise("dogpile.cache: sha1_mangle_key: key must be a string, got " .. type(key))
    end
    C.dp_sha1_hex(key, #key, hexbuf)
    return ffi.string(hexbuf, 40)
end

--- A mangler applied only to keys of at least `length` bytes.
-- @tparam number length the shortest key (in bytes) that is mangled
-- @tparam function mangler applied to those keys, such as sha1_mangle_key
-- @treturn function the mangler
function _M.length_conditional_mangler(length, mangler)
    if type(length) ~= "number" then
        raise("dogpile.cache: length_conditional_mangler: length must be a number, got " .. type(length))
    end
    if not is_callable(mangler) then
        raise("dogpile.cache: length_conditional_mangler: mangler must be a function, got "
              .. type(mangler))
    end
    return function(key)
        if #key >= length then
            return mangler(key)
        end
        return key
    end
end

-- -- Config coercion, as from an ini file --------------------------------------

local function is_float(s)
    local mant, exp = s:match("^[-+]?([%d%.]+)(.*)$")
    if not mant then
        return false
    end
    if not (mant:match("^%d+%.?%d*$") or mant:match("^%.%d+$")) then
        return false
    end
    return exp == "" or exp:match("^[eE][-+]?%d+$") ~= nil
end

--- Strings become numbers, booleans (`true`/`false` in any case) or nil
-- (`None`, `nil`); everything else is kept as given.
-- @tparam any v only a string is converted
-- @return the converted value
function _M.coerce_string(v)
    if type(v) ~= "string" then
        return v
    end
    local s = v:match("^%s*(.-)%s*$")
    if s:match("^[-+]?%d+$") or is_float(s) then
        return tonumber(s)
    end
    local lower = s:lower()
    if lower == "true" then
        return true
    elseif lower == "false" then
        return false
    elseif s == "None" or s == "nil" then
        return nil
    end
    return s
end

function _M.coerce_string_conf(conf)
    local out = {}
    for k, v in pairs(conf) do
        out[k] = _M.coerce_string(v)
    end
    return out
end

return _M
