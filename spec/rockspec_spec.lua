-- The rockspec: `luarocks make` builds the checkout with meson into a
-- temporary tree, offline, and LuaJIT loads the result from that tree alone.
--
-- The subprocesses (luarocks, meson, ninja, gcc, and the luajit that loads the
-- rock) run under `env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS`: the
-- asan busted run in .ci/test preloads the sanitizer runtimes for the
-- instrumented stage, and every child would inherit them. Preloaded into
-- gcc, python (meson) and the uninstrumented rock they only add noise or
-- abort ("ASan runtime does not come first"); the rock is a plain release
-- build and is checked as such. LUA_PATH/LUA_CPATH are cleared too so that
-- nothing resolves to the staged build: the check uses the tree's paths only.

local ROCKSPEC = "rockspec/dogpile-0.1.0-1.rockspec"

local function sh_quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function run(cmd)
    local p = assert(io.popen(cmd .. " 2>&1"))
    local out = p:read("*a")
    local ok, how, code = p:close()
    -- LuaJIT without 5.2 compat returns only the status from close().
    if type(ok) == "number" then code = ok; ok = (ok == 0) end
    return ok == true or ok == 0, out, code
end

local CLEAN_ENV = "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS -u LUA_PATH -u LUA_CPATH"

describe("rockspec", function()
    local have = run("command -v luarocks >/dev/null")
    if not have then
        it("needs luarocks", function() error("luarocks is not installed (apt-get install luarocks; .ci/test installs it)", 0) end)
        return
    end

    local tmp
    setup(function()
        local ok, out = run("mktemp -d")
        assert(ok, out)
        tmp = out:gsub("%s+$", "")
    end)
    teardown(function()
        if tmp and tmp:match("^/tmp/") then os.execute("rm -rf " .. sh_quote(tmp)) end
    end)

    it("luarocks make installs a working rock into a fresh tree", function()
        local tree = tmp .. "/tree"
        local ok, out = run(("%s HOME=%s DOGPILE_BUILDDIR=%s DOGPILE_JOBS=2 "
            .. "luarocks --lua-version 5.1 --tree %s make --deps-mode=none %s")
            :format(CLEAN_ENV, sh_quote(tmp), sh_quote(tmp .. "/build"), sh_quote(tree),
                    sh_quote(ROCKSPEC)))
        assert(ok, "luarocks make failed:\n" .. out)
        assert.truthy(out:find("dogpile 0.1.0-1 is now installed", 1, true), out)

        local _, lpath = run(("%s luarocks --lua-version 5.1 --tree %s path --lr-path")
            :format(CLEAN_ENV, sh_quote(tree)))
        local _, cpath = run(("%s luarocks --lua-version 5.1 --tree %s path --lr-cpath")
            :format(CLEAN_ENV, sh_quote(tree)))
        lpath, cpath = lpath:gsub("%s+$", ""), cpath:gsub("%s+$", "")
        assert.truthy(lpath:find(tree, 1, true), lpath)

        local script = [[
            local cache = require "dogpile.cache"
            local tree = os.getenv("DP_ROCK_TREE")
            local function inside(file) assert(file and file:sub(1, #tree) == tree, tostring(file)) end
            inside(package.searchpath("dogpile.cache", package.path))
            inside(package.searchpath("dogpile.core", package.cpath))
            local r = cache.make_region():configure("dogpile.cache.memory")
            assert(r:get_or_create("a", function() return 42 end) == 42)
            assert(r:get("a") == 42)
            local s = cache.make_region():configure("dogpile.cache.shared_memory",
                { arguments = { name = "rockspec_spec", max_bytes = 1048576 } })
            assert(s:get_or_create("b", function() return "shared" end) == "shared")
            assert(s:get("b") == "shared")
            io.write("OK")
        ]]
        local ok2, out2 = run(("cd %s && %s DP_ROCK_TREE=%s LUA_PATH=%s LUA_CPATH=%s luajit -e %s")
            :format(sh_quote(tmp), CLEAN_ENV, sh_quote(tree), sh_quote(lpath), sh_quote(cpath),
                    sh_quote(script)))
        assert(ok2, out2)
        assert.are.equal("OK", out2)
    end)

    -- test = {type = "busted"}: `luarocks test` runs the specs, offline, with
    -- Debian's busted served to LuaRocks as a rock (.ci/luarocks-test says
    -- why). The inner busted reads .busted, which loads the main stage (the
    -- test command builds it first): plain luajit, so no sanitizer preload.
    it("luarocks test runs the specs offline", function()
        local ok, out = run(("%s DP_STAGE=main bash .ci/luarocks-test spec/cache_hit_spec.lua")
            :format(CLEAN_ENV))
        assert(ok, out)
        local passed = tonumber(out:match("(%d+) successes / 0 failures / 0 errors"))
        assert.truthy(passed and passed > 0, out)
    end)
end)
