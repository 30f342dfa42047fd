-- The README's "Embedding in a C host", followed as a new user would: build
-- and `meson install` into a temporary prefix, compile examples/embed_host.c
-- with pkg-config as the README says, and run it from there, with nothing
-- of the source tree or the test stage in its environment. Also what the
-- README warns about: without an rpath (or ldconfig) libdogpile is not found,
-- and a host that links LuaJIT statically needs -Wl,-E.
local support = require "support"

local sh = support.sh
local ROOT = debug.getinfo(1, "S").source:sub(2):gsub("spec/embed_spec%.lua$", "")
if ROOT == "" then
    ROOT = "./"
end

local function q(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs `cmd` in a clean environment (none of the stage's paths, no
-- sanitizer preload): output, exit status.
local function run(cmd)
    local out = sh("env -u LUA_PATH -u LUA_CPATH -u LD_PRELOAD -u LD_LIBRARY_PATH -u DP_LUA_DIR "
                   .. "-u DP_CMOD_DIR sh -c " .. q(cmd) .. " 2>&1; echo \"rc=$?\"")
    local body, rc = out:match("^(.-)rc=(%d+)\n$")
    return body, tonumber(rc)
end

describe("a C host embedding dogpile, built against a meson install", function()
    local tmp, pc, libdir, cflags

    setup(function()
        tmp = sh("mktemp -d /tmp/dogpile-embed-XXXXXX"):gsub("%s+$", "")
        local out, rc = run(("meson setup %s/build %s --prefix=%s/prefix -Dbuildtype=release "
                             .. ">%s/setup.log 2>&1 && ninja -C %s/build >%s/ninja.log 2>&1 && "
                             .. "meson install -C %s/build --quiet >%s/install.log 2>&1")
                            :format(q(tmp), q(ROOT), q(tmp), q(tmp), q(tmp), q(tmp), q(tmp), q(tmp)))
        assert(rc == 0, "build and install failed: " .. out .. (support.read(tmp .. "/setup.log") or "")
               .. (support.read(tmp .. "/ninja.log") or ""))
        pc = sh("find " .. q(tmp .. "/prefix") .. " -name dogpile.pc"):match("^(%S+)/dogpile%.pc")
        assert(pc, "no dogpile.pc installed")
        libdir = run("PKG_CONFIG_PATH=" .. q(pc) .. " pkg-config --variable=libdir dogpile")
            :gsub("%s+$", "")
        cflags = "export PKG_CONFIG_PATH=" .. q(pc) .. ";"
    end)

    teardown(function()
        if tmp and tmp:match("^/tmp/dogpile%-embed%-") then
            sh("rm -rf " .. q(tmp))
        end
    end)

    local function compile(out, extra)
        return run(("%s cc -o %s %s %s 2>&1"):format(cflags, q(tmp .. "/" .. out),
                                                     q(ROOT .. "examples/embed_host.c"), extra))
    end

    it("builds with pkg-config and an rpath, and runs from the install alone", function()
        local out, rc = compile("host", "$(pkg-config --cflags --libs dogpile luajit) -Wl,-rpath," .. q(libdir))
        assert.are.equal(0, rc, out)
        out, rc = run(q(tmp .. "/host"))
        assert.are.equal(0, rc, out)
        assert.are.equal("A: made by A (creator calls 1), B: made by A (creator calls 0)\n", out)
    end)

    it("needs the library path without an rpath (ldconfig, or LD_LIBRARY_PATH)", function()
        local out, rc = compile("host_norpath", "$(pkg-config --cflags --libs dogpile luajit)")
        assert.are.equal(0, rc, out)
        out, rc = run(q(tmp .. "/host_norpath"))
        assert.are_not.equal(0, rc)
        assert.is_truthy(out:find("libdogpile.so", 1, true), out)
        out, rc = run("LD_LIBRARY_PATH=" .. q(libdir) .. " " .. q(tmp .. "/host_norpath"))
        assert.are.equal(0, rc, out)
    end)

    it("links LuaJIT statically with -Wl,-E, and fails to load the modules without it", function()
        local static = "/usr/lib/x86_64-linux-gnu/libluajit-5.1.a"
        assert(io.open(static), static .. " is needed (libluajit2-5.1-dev)")
        local flags = "$(pkg-config --cflags dogpile luajit) $(pkg-config --libs dogpile) " .. static
            .. " -lm -ldl -Wl,-rpath," .. q(libdir)
        local out, rc = compile("host_static", flags .. " -Wl,-E")
        assert.are.equal(0, rc, out)
        out, rc = run(q(tmp .. "/host_static"))
        assert.are.equal(0, rc, out)
        assert.are.equal("A: made by A (creator calls 1), B: made by A (creator calls 0)\n", out)
        out, rc = compile("host_static_noE", flags)
        assert.are.equal(0, rc, out)
        out, rc = run(q(tmp .. "/host_static_noE"))
        assert.are_not.equal(0, rc)
        assert.is_truthy(out:find("undefined symbol: lua", 1, true), out)
    end)
end)
