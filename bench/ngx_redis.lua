--- Redis inside one nginx worker: dogpile.cache.redis over cosockets
-- (dogpile.cache.resp) against lua-resty-redis (Debian's lua-nginx-redis,
-- `nginx.redis`), in the same request, on the same keepalive pool (each
-- operation connects from the pool and sets keepalive after, as an
-- application does). bench/ngx_backend_lib.lua starts nginx with the fixture
-- spec/fixtures/nginx_redis on the redis-server that bench/run started
-- (REDIS_PORT), or on one of its own; GET /bench (app.lua's bench()) runs
-- the loops, taking turns.
--
--   luajit bench/ngx_redis.lua [ops per loop] [repetitions] [rounds]
--
-- Rows (bench/lib.lua), median us per operation:
--   ngx_redis_get        region:get hit of a 100-byte value vs resty.redis
--                        GET of the same key: target <= 1.2
--   ngx_redis_get_multi  region:get_multi of 100 such keys vs resty.redis
--                        MGET of them: target <= 1.3
require("ngx_backend_lib").run({
    server = "redis", server_name = "redis-server", fixture = "nginx_redis",
    port_env = "DP_REDIS_PORT", title = "redis", width = 52,
    labels = {
        { "resty_get", "lua-resty-redis GET, 100-byte value" },
        { "region_get", "dogpile.cache.redis region:get hit, 100-byte value" },
        { "resty_mget", "lua-resty-redis MGET of 100 keys" },
        { "region_get_multi", "dogpile.cache.redis region:get_multi(100)" },
    },
    rows = {
        { "ngx_redis_get", "nginx: redis region:get hit, 100-byte value (cosocket)",
          "region_get", "lua-resty-redis GET", "resty_get", "<=1.2" },
        { "ngx_redis_get_multi", "nginx: redis region:get_multi(100) (cosocket)",
          "region_get_multi", "lua-resty-redis MGET of 100", "resty_mget", "<=1.3" },
    },
})
