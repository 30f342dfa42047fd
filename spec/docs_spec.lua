-- `bash .ci/docs` builds the API reference (LDoc over lua/, a page for
-- core/dogpile.h) into _build/doc without a warning. It writes into the
-- checkout's _build/doc, as the command documented in the README does.
-- The sanitizer preloads of the asan run are cleared for ldoc's luajit.
describe("docs", function()
    local p = io.popen("command -v ldoc >/dev/null && luajit -e 'require \"discount\"' 2>/dev/null && echo yes")
    local have = p:read("*a"):match("yes")
    p:close()
    if not have then
        it("needs ldoc", function() error("ldoc or lua-discount is not installed (apt-get install lua-ldoc lua-discount; .ci/test installs them)", 0) end)
        return
    end

    it("bash .ci/docs builds the reference without warnings", function()
        local q = assert(io.popen("env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS "
            .. "-u LUA_PATH -u LUA_CPATH bash .ci/docs 2>&1; echo \"rc=$?\""))
        local out = q:read("*a")
        q:close()
        assert.truthy(out:match("rc=0%s*$"), out)
        assert.are.equal("API reference written to _build/doc/index.html\nrc=0\n", out)
        for _, f in ipairs { "index.html", "topics/dogpile.h.md.html",
                             "modules/dogpile.cache.html",
                             "modules/dogpile.cache.region.html" } do
            local fh = io.open("_build/doc/" .. f)
            assert(fh, "missing _build/doc/" .. f)
            fh:close()
        end
        local fh = assert(io.open("_build/doc/topics/dogpile.h.md.html"))
        local html = fh:read("*a")
        fh:close()
        assert.truthy(html:find("dp_lock_wait", 1, true))
    end)
end)
