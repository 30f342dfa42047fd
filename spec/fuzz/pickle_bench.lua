-- Decode/encode speed of a 10-field dict, against Python's pickle on the
-- same machine: `luajit spec/fuzz/pickle_bench.lua [N]` (after use_stage),
-- then `/usr/bin/python3 spec/fixtures/python/dogpile_wire.py bench N`.
local pickle = require "dogpile.cache.pickle"
local pyjson = require "dogpile.cache.pyjson"
local wire = require "dogpile.cache.wire"
local pyvalue = require "dogpile.cache.pyvalue"
local clock = require("dogpile").now

local N = tonumber(arg[1]) or 200000
local v = { id = 12345, name = "alice", email = "alice@example.com", active = true, score = 98.5,
    tags = { "a", "b" }, age = 42, city = "Paris", balance = -17.25, note = pyvalue.null }

local function time(label, f)
    for _ = 1, N / 10 do f() end
    local t = clock()
    for _ = 1, N do f() end
    local us = (clock() - t) / N * 1e6
    print(("%-28s %.3f us"):format(label, us))
end

local bytes = pickle.dumps(v)
print(("pickle protocol 4: %d bytes"):format(#bytes))
time("pickle.load", function() return pickle.load(bytes) end)
time("pickle.load (mark)", function() return pickle.load(bytes, { mark = true }) end)
time("pickle.dumps", function() return pickle.dumps(v) end)
local text = pyjson.dumps(v)
time("pyjson.load", function() return pyjson.load(text) end)
time("pyjson.dumps", function() return pyjson.dumps(v) end)
local wired = wire.encode(v, 1700000000.123456)
time("wire.decode (pickle)", function() return wire.decode(wired) end)
time("wire.encode (pickle)", function() return wire.encode(v, 1700000000.123456) end)
