-- Hit throughput inside a real nginx worker (spec/ngx_support.lua starts it):
-- dogpile regions (ngx_shared, memory) against ngx.shared.DICT:get and
-- resty.lrucache (lua-resty-mlcache's L1), measured in the same request.
-- Run from the repository root:
--   LUA_PATH="$PWD/lua/?.lua;$PWD/spec/?.lua;;" \
--   LUA_CPATH="_build/main-stage/lib/lua/5.1/?.so;;" luajit bench/ngx_hit.lua [N]
local support = require "ngx_support"

local n = tonumber(arg[1]) or 2000000
local server = support.start()
local ok, err = pcall(function()
    local body, status = server:get("/bench?n=" .. n)
    assert(status == 200, body)
    io.write(("hits in one nginx worker, %d iterations over 1000 keys\n"):format(n), body)
end)
server:stop()
assert(ok, err)
