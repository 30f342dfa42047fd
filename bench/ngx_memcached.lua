--- memcached inside one nginx worker: dogpile.cache.memcached over cosockets
-- (dogpile.cache.mctext) against lua-resty-memcached (Debian's
-- lua-nginx-memcached, `nginx.memcached`), in the same request, each on a
-- keepalive pool (each operation connects from the pool and sets keepalive
-- after, as an application does). bench/ngx_backend_lib.lua starts nginx
-- with the fixture spec/fixtures/nginx_memcached on the memcached that
-- bench/run started (MEMCACHED_PORT), or on one of its own; GET /bench
-- (app.lua's bench()) runs the loops, taking turns.
--
--   luajit bench/ngx_memcached.lua [ops per loop] [repetitions] [rounds]
--
-- Row (bench/lib.lua), median us per operation:
--   ngx_memcached_get  region:get hit of a 100-byte value vs resty.memcached
--                      get of the same key (the stored envelope): no target
--                      given by the issue; <= 1.2, as for redis
require("ngx_backend_lib").run({
    server = "memcached", server_name = "memcached", fixture = "nginx_memcached",
    port_env = "DP_MEMCACHED_PORT", title = "memcached", width = 56,
    labels = {
        { "resty_get", "lua-resty-memcached get, 100-byte value" },
        { "region_get", "dogpile.cache.memcached region:get hit, 100-byte value" },
    },
    rows = {
        { "ngx_memcached_get", "nginx: memcached region:get hit, 100-byte value (cosocket)",
          "region_get", "lua-resty-memcached get", "resty_get", "<=1.2" },
    },
})
