-- Regions of the game-server example (examples/game_server.c). Every
-- thread's Lua state loads this file with cache.load_regions; regions over a
-- shared backend meet across states: one store, one lock per key.
return {
    -- Player profiles: one shared_memory store for the whole process, named
    -- "game.profiles"; every state that opens the name joins it (and must give
    -- the same bounds). One creator runs per player across all threads.
    profiles = {
        backend = "dogpile.cache.shared_memory",
        expiration_time = 300,
        arguments = { name = "game.profiles", max_items = 100000 },
    },
    -- Guilds: on the host's own C backend, registered by game_server.c with
    -- dp_backend_register and exposed to each state by name.
    guilds = {
        backend = "game.fixed_array",
        expiration_time = 300,
        arguments = { max_items = 64 },
    },
}
