--- dogpile.cache.shared_memory: one bounded store per `name`, shared by every
-- Lua state and thread of the process, with a process-wide lock per key.
-- Arguments: name (default "default"), max_bytes (number or "64m"),
-- max_items, expiration_time (entries older than this are dropped),
-- eviction ("s3fifo", the default, or "lru").
require "dogpile.backends.shared_memory" -- registers the C backend
local c = require "dogpile.cache.backends.c"

--- A backend over the process-wide store `arguments.name` (the region calls it from `configure`).
-- @function new
-- @tparam[opt] table arguments the arguments listed above (default {}: each at its default)
-- @treturn table the backend
return {
    new = function(arguments)
        return c.open("dogpile.cache.shared_memory", arguments)
    end,
}
