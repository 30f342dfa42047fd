-- The generated reference (`bash .ci/docs`, issue 20 item 6) answers: every
-- public function's parameters have a type and a description, private names
-- (`_`-prefixed) and internal modules are not listed, no LDoc tag is left
-- raw, the summary tables keep to the page, and the Backend arguments page
-- lists every argument each shipped backend accepts with a type, a default
-- and a meaning, the C backends' taken from the tables they check with.
-- Needs ldoc and lua-discount (as spec/docs_spec.lua) and a C compiler.
local DOC = "_build/doc/"

local function read(path)
    local fh = assert(io.open(path, "rb"), "missing " .. path)
    local s = fh:read("*a")
    fh:close()
    return s
end

local function text(html)
    return (html:gsub("<[^>]*>", ""):gsub("&[lr]dquo;", '"'):gsub("&quot;", '"'):gsub("&lt;", "<"):gsub("&gt;", ">")
        :gsub("&amp;", "&"):gsub("%s+", " "))
end

describe("the reference", function()
    local p = io.popen("command -v ldoc >/dev/null && luajit -e 'require \"discount\"' 2>/dev/null && echo yes")
    local have = p:read("*a"):match("yes")
    p:close()
    if not have then
        it("needs ldoc", function() error("ldoc or lua-discount is not installed (apt-get install lua-ldoc lua-discount)", 0) end)
        return
    end

    local pages
    setup(function()
        local q = assert(io.popen("env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS "
            .. "-u LUA_PATH -u LUA_CPATH bash .ci/docs 2>&1; echo \"rc=$?\""))
        local out = q:read("*a")
        q:close()
        assert(out:match("rc=0%s*$"), out)
        pages = {}
        local ls = assert(io.popen("ls " .. DOC .. "modules"))
        for f in ls:lines() do
            pages[f] = read(DOC .. "modules/" .. f)
        end
        ls:close()
    end)

    it("lists the public modules only", function()
        for _, internal in ipairs { "dogpile.lib", "dogpile.context", "dogpile.holders",
                                    "dogpile.cache.options", "dogpile.cache.read", "dogpile.cache.write",
                                    "dogpile.cache.create", "dogpile.cache.registry", "dogpile.cache.values",
                                    "dogpile.cache.cli", "dogpile.cache.cli_store", "dogpile.cache.resp",
                                    "dogpile.cache.backends.c", "dogpile.cache.backends.redis_cosocket" } do
            assert.is_nil(pages[internal .. ".html"], internal .. " is listed")
        end
        for _, public in ipairs { "dogpile", "dogpile.cache", "dogpile.cache.region", "dogpile.cache.util",
                                  "dogpile.cache.proxy", "dogpile.cache.api", "dogpile.cache.ngx",
                                  "dogpile.cache.backends.memory", "dogpile.cache.backends.redis" } do
            assert.is_string(pages[public .. ".html"], public .. " is missing")
        end
    end)

    it("lists no private name and leaves no tag raw", function()
        for f, html in pairs(pages) do
            for name in html:gmatch('<a name%s*=%s*"([^"]+)"') do
                assert.is_nil(name:match("[:.]_") or name:match("^_"), f .. " lists " .. name)
            end
            local t = text(html)
            assert.is_nil(t:match("@note"), f .. " has a raw @note")
            assert.is_nil(t:match("@t?param"), f .. " has a raw @param")
        end
    end)

    it("gives every parameter of every listed function a type and a description", function()
        local gaps = {}
        for f, html in pairs(pages) do
            for name, body in html:gmatch('<dt>%s*<a name%s*=%s*"([^"]+)"></a>(.-)</dd>') do
                for li in body:gmatch("<li>(.-)</li>") do
                    local param = li:match('<span class="parameter">([^<]*)</span>')
                    if param then
                        local typed = li:find('<span class="types">', 1, true) ~= nil
                        local rest = text(li:gsub('<span class="parameter">[^<]*</span>', "")
                            :gsub('<span class="types">.-</span>%s*</span>', ""))
                        if not typed or not rest:match("%w") then
                            gaps[f] = gaps[f] or {}
                            gaps[f][name] = true
                        end
                    end
                end
            end
        end
        local list = {}
        for f, names in pairs(gaps) do
            for n in pairs(names) do
                list[#list + 1] = f .. ": " .. n
            end
        end
        table.sort(list)
        assert.are.same({}, list, "functions with a parameter lacking a type or a description")
    end)

    it("keeps the summary tables to the page (fixed layout, wrapping names)", function()
        local css = read(DOC .. "ldoc.css")
        assert.truthy(css:find("table.module_list, table.function_list { table-layout: fixed; width: 100%; }", 1, true))
        assert.truthy(css:find("white-space: normal;", 1, true))
        -- The template's nowrap cells are what the sheet must undo.
        assert.truthy(pages["dogpile.cache.region.html"]:find('<td class="name" nowrap>', 1, true))
    end)

    describe("Backend arguments page", function()
        local page, sections
        setup(function()
            page = read(DOC .. "topics/backend-arguments.md.html")
            sections = {}
            local starts = {}
            for at, name in page:gmatch("()<h2>(dogpile%.cache%.[%w_]+)</h2>") do
                starts[#starts + 1] = { at = at, name = name }
            end
            for i, st in ipairs(starts) do
                local stop = starts[i + 1] and starts[i + 1].at - 1 or #page
                sections[st.name] = page:sub(st.at, stop)
            end
        end)

        -- The rows of a section: {name = {type, default, meaning}}.
        local function rows(section)
            local out = {}
            for tr in (sections[section] or ""):gmatch("<tr>(.-)</tr>") do
                local cells = {}
                for td in tr:gmatch("<td[^>]*>(.-)</td>") do
                    cells[#cells + 1] = text(td):match("^%s*(.-)%s*$")
                end
                if #cells == 4 then
                    out[cells[1]] = cells
                end
            end
            return out
        end

        -- What a backend accepts, as it says when given an unknown name.
        local function known_of(backend, args)
            local cache = require "dogpile.cache"
            local ok, err = pcall(function()
                cache.make_region():configure(backend, { arguments = args })
            end)
            assert.is_false(ok)
            local list = assert(err:match("%(known: (.-)%)?$"), err)
            local names = {}
            for n in list:gmatch("[%w_]+") do
                names[#names + 1] = n
            end
            return names, err:sub(-1) ~= ")"
        end

        it("has a section for every shipped backend", function()
            for _, b in ipairs { "memory", "null", "shared_memory", "lmdb", "redis", "redis_sentinel",
                                 "redis_cluster", "memcached", "tiered", "ngx_shared" } do
                assert.is_string(sections["dogpile.cache." .. b], b)
            end
        end)

        it("lists every argument a backend accepts, each with a type, a default and a meaning", function()
            for _, case in ipairs {
                { "dogpile.cache.memory", { zz_unknown = 1 } },
                { "dogpile.cache.shared_memory", { zz_unknown = 1 } },
                { "dogpile.cache.lmdb", { path = "/nonexistent-reference-spec", zz_unknown = 1 } },
                { "dogpile.cache.redis", { zz_unknown = 1 } },
                { "dogpile.cache.memcached", { zz_unknown = 1 } },
                { "dogpile.cache.tiered", { zz_unknown = 1 } },
            } do
                local names, cut = known_of(case[1], case[2])
                if cut then
                    -- The message's list was cut (a C error holds 256 bytes):
                    -- its last name may be partial.
                    names[#names] = nil
                end
                assert.is_true(#names >= 2, case[1])
                local r = rows(case[1])
                for _, n in ipairs(names) do
                    local row = r[n]
                    assert.is_table(row, case[1] .. ": " .. n .. " is not listed")
                    assert.is_truthy(row[2]:match("%w"), case[1] .. ": " .. n .. " has no type")
                    assert.is_truthy(row[3]:match("%w"), case[1] .. ": " .. n .. " has no default")
                    assert.is_truthy(row[4]:match("%w"), case[1] .. ": " .. n .. " has no meaning")
                end
            end
            assert.is_truthy(sections["dogpile.cache.null"]:find("It takes no argument", 1, true))
        end)

        it("takes the C backends' types and defaults from their tables", function()
            local r = rows("dogpile.cache.redis")
            assert.are.same({ "port", "an integer from 1 to 65535", "6379" }, { r.port[1], r.port[2], r.port[3] })
            assert.are.equal("a boolean", r.distributed_lock[2])
            assert.are.equal("true", r.distributed_lock[3])
            local l = rows("dogpile.cache.lmdb")
            assert.are.equal('one of "full", "meta", "none"', l.sync[2])
            assert.are.equal('"meta"', l.sync[3])
            assert.are.equal("required", l.path[3])
            local s = rows("dogpile.cache.shared_memory")
            assert.are.equal('"s3fifo" or "lru"', s.eviction[2])
        end)
    end)
end)
