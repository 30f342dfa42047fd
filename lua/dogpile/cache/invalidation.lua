--- Invalidation strategies: dogpile.cache's DefaultInvalidationStrategy (one
-- invalidation time, hard or soft, in this Lua state), the check of a
-- user's or a backend's strategy, and the choice of one at configure.
local lib = require "dogpile.lib"
local dogpile = require "dogpile"
local options = require "dogpile.cache.options"

local C = lib.C
local raise = lib.raise
local is_callable = dogpile.is_callable
local setmetatable, rawget, ipairs = setmetatable, rawget, ipairs

lib.own_source()

local _M = {}

-- What an invalidated value counts as (read.lua's judgement uses the same).
local MISSING, STALE = "missing", "stale"
_M.MISSING, _M.STALE = MISSING, STALE

local DefaultInvalidation = {}
DefaultInvalidation.__index = DefaultInvalidation
_M.DefaultInvalidationStrategy = DefaultInvalidation

-- `_invalidated` is false, not nil, until the first invalidation: a field
-- that exists is read without a look into the metatable on every hit.
-- `judge_fields`: see judge_for.
function DefaultInvalidation.new()
    return setmetatable({ _hard = false, _invalidated = false, judge_fields = true },
                        DefaultInvalidation)
end

--- @raise when `hard` is neither nil nor a boolean
function DefaultInvalidation:invalidate(hard)
    options.check_hard(hard, "invalidate")
    self._hard = hard ~= false
    self._invalidated = C.dp_clock_stamp()
end

function DefaultInvalidation:is_invalidated(ct)
    local at = self._invalidated
    return at ~= false and ct < at
end

function DefaultInvalidation:was_hard_invalidated()
    return self._invalidated ~= false and self._hard == true
end

function DefaultInvalidation:is_hard_invalidated(ct)
    return self._hard == true and self:is_invalidated(ct)
end

function DefaultInvalidation:was_soft_invalidated()
    return self._invalidated ~= false and self._hard == false
end

function DefaultInvalidation:is_soft_invalidated(ct)
    return self._hard == false and self:is_invalidated(ct)
end

-- -- What a value created at `ct` counts as ------------------------------------
-- nil: not invalidated; MISSING: hard-invalidated; STALE: soft. One function
-- per kind of strategy, chosen at configure: the default one reads its own
-- fields (a hit costs two loads); any other is asked through its methods, the
-- second call only for a value it has invalidated.

local function judge_default(inv, ct)
    local at = inv._invalidated
    if at == false or ct >= at then
        return nil
    end
    return inv._hard and MISSING or STALE
end

local function judge_methods(inv, ct)
    if not inv:is_invalidated(ct) then
        return nil
    end
    if inv:is_hard_invalidated(ct) then
        return MISSING
    end
    return STALE
end

--- The judging function for strategy `inv`: judge(inv, ct) -> nil,
-- "missing" or "stale". A strategy whose own field `judge_fields` is true
-- (the default one; another that keeps the same two fields, as a tiered
-- backend's does) is judged from `_invalidated` (the time, or false) and
-- `_hard`, read in place; any other through its methods. A flag rather than
-- the metatable, so that such a strategy need not pass for the default one.
function _M.judge_for(inv)
    if rawget(inv, "judge_fields") == true then
        return judge_default
    end
    return judge_methods
end

-- -- Choosing -------------------------------------------------------------------

local METHODS = { "invalidate", "is_invalidated", "is_hard_invalidated",
    "is_soft_invalidated", "was_hard_invalidated", "was_soft_invalidated" }
_M.METHODS = METHODS

--- @raise when `inv` lacks one of the strategy's methods
function _M.check(inv, who)
    for _, m in ipairs(METHODS) do
        if not is_callable(inv[m]) then
            raise("dogpile.cache: " .. who .. " has no method " .. m)
        end
    end
    return inv
end

--- The strategy a region configured with `backend` uses, and whether it came
-- from the backend. In order: the one given to configure; the backend's
-- `region_invalidator(region)` method, or its `invalidator` object (a backend
-- whose storage is shared between processes keeps the invalidation there,
-- so that it reaches every process); else the region's current one, unless
-- that came from the previous backend (then a new default one).
function _M.choose(given, backend, region, current, current_from_backend)
    if given then
        return given, false
    end
    if is_callable(backend.region_invalidator) then
        return _M.check(backend:region_invalidator(region),
                        "the backend's region_invalidator(region)"), true
    end
    local own = backend.invalidator
    if own ~= nil then
        return _M.check(own, "the backend's invalidator"), true
    end
    if current_from_backend or current == nil then
        return DefaultInvalidation.new(), false
    end
    return current, false
end

return _M
