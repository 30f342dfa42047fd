-- Writes the fuzz seeds: encodings of values that reach every tag and the
-- table shapes, into the directory given as argument (spec/fuzz/corpus).
--   LUA_CPATH="_build/<build>-stage/lib/lua/5.1/?.so;;" luajit spec/fuzz/make_corpus.lua spec/fuzz/corpus
local codec = require "dogpile.codec"

local dir = assert(arg[1], "usage: luajit make_corpus.lua DIR")

local function nest(depth, leaf)
    local v = leaf
    for _ = 1, depth do
        v = { v }
    end
    return v
end

-- nil cannot be a table value, hence its own entry below
local seeds = {
    ["true"] = true,
    ["false"] = false,
    zero = 0,
    negzero = -0.0,
    nan = 0 / 0,
    int = 300,
    negint = -123456789,
    big = 2 ^ 63,
    minint = -2 ^ 63,
    frac = 0.1,
    tiny = 5e-324,
    inf = math.huge,
    str = "players\0socket",
    allbytes = (function()
        local t = {}
        for i = 0, 255 do t[#t + 1] = string.char(i) end
        return table.concat(t)
    end)(),
    empty = {},
    array = { 1, 2, 3, "four", 5.5, true, false },
    hash = { a = 1, b = "two", ["with space"] = { x = -0.0 } },
    mixed = { 10, 20, name = "ann", [2.5] = "half", [true] = false, [{ 1 }] = { k = "v" } },
    sparse = { 1, nil, 3, [100] = 4 },
    deep = nest(40, "bottom"),
    limit = nest(200, 1),
    keys = { [{ [{ 1 }] = 2 }] = { [false] = { [-1] = 0 / 0 } } },
}

local function write(name, bytes)
    local f = assert(io.open(dir .. "/" .. name .. ".bin", "wb"))
    f:write(bytes)
    f:close()
end

local n = 1
write("nil", codec.encode(nil))
for name, value in pairs(seeds) do
    write(name, codec.encode(value))
    n = n + 1
end
-- and a few that are refused, so the fuzzer starts near the error paths
local bad = {
    truncated = codec.encode({ 1, "abc", { x = 1 } }):sub(1, -3),
    newer = "\193\2\0",
    hugecount = "\193\1\6\255\255\255\255\15\0",
    nilkey = "\193\1\6\0\1\0\2",
}
for name, bytes in pairs(bad) do
    write("bad-" .. name, bytes)
    n = n + 1
end
print(("wrote %d seeds to %s"):format(n, dir))
