-- Every function the core exports is declared in lua/dogpile/lib.lua or
-- skipped here on purpose, as luv checks its bindings.
local lib = require "dogpile.lib"

-- Exported for C hosts and the dogpile.codec C module; Lua reaches the
-- codec through that module (classic C API: it builds Lua values), not the FFI.
local SKIPPED = {}
for _, name in ipairs({ "dp_buf_init", "dp_buf_reset", "dp_buf_free", "dp_buf_finish",
    "dp_buf_put_nil", "dp_buf_put_boolean", "dp_buf_put_number", "dp_buf_put_string",
    "dp_buf_put_table", "dp_reader_init", "dp_reader_next", "dp_reader_finish",
    -- C hosts register C backends (an ops table of function pointers); Lua opens them.
    -- (dogpile.cache.cosocket declares dp_backend_register, dp_circuit_declare and the
    -- per-server breaker calls itself: its stand-in backend hands the core's breakers
    -- to the cosocket backends.)
    "dp_backend_register", "dp_err_set", "dp_arg_size",
    -- C backends fill their settings from declared arguments, and say they
    -- talk to a server (a circuit breaker of their own).
    "dp_args_fill", "dp_args_free", "dp_args_diff", "dp_circuit_declare",
    -- C backends with several servers guard each with a breaker of its own.
    "dp_circuit_server", "dp_circuit_enter", "dp_circuit_leave",
    -- C backends with a server-side lock name its holder with a token.
    "dp_lock_token",
    -- For a C host at the end of its life, when no Lua state is open.
    "dp_shutdown" }) do
    SKIPPED[name] = true
end

local function exported_symbols(path)
    local p = assert(io.popen("nm -D --defined-only '" .. path .. "' 2>/dev/null"))
    local out = {}
    for line in p:lines() do
        local name = line:match("%s[TW]%s+(dp_[%w_]+)$")
        if name then
            out[#out + 1] = name
        end
    end
    p:close()
    table.sort(out)
    return out
end

local function declared_in_lib()
    local path = package.searchpath("dogpile.lib", package.path)
    local src = assert(io.open(path)):read("*a")
    local cdef = src:match("ffi%.cdef%s*%[%[(.-)%]%]")
    local out = {}
    for name in cdef:gmatch("([%w_]+)%s*%(") do
        out[name] = true
    end
    return out
end

describe("the FFI bindings", function()
    it("declare every exported dp_ function or skip it on purpose", function()
        local exported = exported_symbols(lib.library_path)
        assert.is_true(#exported > 0, "nm found no dp_ symbols in " .. lib.library_path)
        local declared = declared_in_lib()
        local missing = {}
        for _, name in ipairs(exported) do
            if not declared[name] and not SKIPPED[name] then
                missing[#missing + 1] = name
            end
        end
        assert.are.same({}, missing)
    end)

    it("export nothing without the dp_ prefix", function()
        local p = assert(io.popen("nm -D --defined-only '" .. lib.library_path .. "'"))
        local stray = {}
        for line in p:lines() do
            local name = line:match("%s[TWDBR]%s+([%w_]+)$")
            if name and not name:match("^dp_") and not name:match("^_") then
                stray[#stray + 1] = name
            end
        end
        p:close()
        assert.are.same({}, stray)
    end)

    it("resolve every declared function in the loaded library", function()
        for name in pairs(declared_in_lib()) do
            assert.is_truthy(pcall(function() return lib.C[name] end), name)
        end
    end)

    it("lib.clock_upper() bounds the precise clock from above, within the margin", function()
        local C = lib.C
        local margin = C.dp_clock_margin()
        assert.is_true(margin >= 0.05)
        -- The precise clock read before and after: a thread preempted
        -- between two reads (a loaded machine) must not make either check fail.
        for _ = 1, 100000 do
            local before = C.dp_clock_now()
            local upper = lib.clock_upper()
            local after = C.dp_clock_now()
            assert(upper >= before, "clock_upper below the precise clock")
            assert(upper - after <= margin + 0.05, "clock_upper far above the precise clock")
        end
    end)
end)
