-- Regions for the quickstart, as a service would describe them: a Lua file
-- that returns name = {backend = ..., any option of make_region or configure}.
local util = require "dogpile.cache.util"

return {
    -- Player profiles: slow to load, fine to serve a little stale.
    profiles = {
        backend = "dogpile.cache.memory",
        expiration_time = 1.0,
        arguments = { max_items = 10000 },
    },
    -- Leaderboards: long keys, hashed before they reach the backend.
    leaderboards = {
        backend = "dogpile.cache.memory",
        expiration_time = 30,
        key_mangler = util.length_conditional_mangler(64, util.sha1_mangle_key),
    },
}
