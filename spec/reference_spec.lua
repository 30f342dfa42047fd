-- The generated reference (`bash .ci/docs`, issue 20 item 6) answers: every
-- public function's parameters have a type and a description (an optional
-- one its default too), every function docs/API.md and the README call by
-- its full name is listed, private names (`_`-prefixed) and internal modules
-- are not, no LDoc tag is left raw nor indented block run into a paragraph,
-- the pages render cleanly in headless chromium, and the Backend arguments
-- page (and each backend's module page) lists every argument each shipped
-- backend accepts with a type, a default and a meaning, the C backends'
-- taken from the tables they check with.
-- Needs ldoc and lua-discount (as spec/docs_spec.lua), chromium and a C compiler.
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
                                    "dogpile.cache.backends.c", "dogpile.cache.backends.redis_cosocket",
                                    "dogpile.cache.backends.redis_cluster_cosocket" } do
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
        end
        -- The topics too: the C header's page is made from Doxygen-style comments.
        local all = {}
        for f, html in pairs(pages) do
            all["modules/" .. f] = html
        end
        local ls = assert(io.popen("ls " .. DOC .. "topics"))
        for f in ls:lines() do
            all["topics/" .. f] = read(DOC .. "topics/" .. f)
        end
        ls:close()
        assert.is_string(all["topics/dogpile.h.md.html"])
        local raw = {}
        for f, html in pairs(all) do
            -- Code blocks may hold what they like.
            local t = text(html:gsub("<pre.-</pre>", ""))
            for _, tag in ipairs { "note", "param", "tparam", "return", "treturn", "raise", "brief", "see",
                                   "field", "usage", "warning", "local" } do
                if t:find("@" .. tag .. "%f[^%w_]") then
                    raw[#raw + 1] = f .. ": @" .. tag
                end
            end
        end
        table.sort(raw)
        assert.are.same({}, raw, "LDoc or Doxygen tags left raw")
    end)

    -- An indented block in a doc comment (a list of arguments, a table
    -- literal) needs a blank line before it and four spaces after the "--" to
    -- be a code block; otherwise Markdown runs its lines into the paragraph
    -- ("Arguments: cache_dict a table ... max_items bound ...").
    it("runs no indented block of a doc comment into a paragraph", function()
        local bad = {}
        for f, html in pairs(pages) do
            for para in html:gsub("<pre.-</pre>", ""):gmatch("<p>(.-)</p>") do
                if para:match("\n   +%S") or para:match("^%s*[{}]%s*$") then
                    bad[#bad + 1] = f .. ": " .. text(para):sub(1, 80)
                end
            end
        end
        table.sort(bad)
        assert.are.same({}, bad)
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

    it("states the default of every optional parameter", function()
        local gaps = {}
        for f, html in pairs(pages) do
            for name, body in html:gmatch('<dt>%s*<a name%s*=%s*"([^"]+)"></a>(.-)</dd>') do
                for li in body:gmatch("<li>(.-)</li>") do
                    local param = li:match('<span class="parameter">([^<]*)</span>')
                    if param and li:find("<em>optional</em>", 1, true) and not text(li):find("default", 1, true) then
                        gaps[#gaps + 1] = f .. ": " .. name .. "(" .. param .. ")"
                    end
                end
            end
        end
        table.sort(gaps)
        assert.are.same({}, gaps, "optional parameters whose description does not say their default")
    end)

    -- The functions the API contract (docs/API.md) and the README call by
    -- their full name: `dogpile.x`, `cache.x`, `region:x`, `lock:x`.
    it("lists every function docs/API.md and the README name", function()
        local anchors = {}
        for _, html in pairs(pages) do
            for n in html:gmatch('<a name%s*=%s*"([^"]+)"') do
                anchors[n] = true
            end
        end
        local missing, seen, count = {}, {}, 0
        for _, doc in ipairs { "docs/API.md", "README.md" } do
            for code in read(doc):gmatch("`([^`\n]+)`") do
                for name in code:gmatch("([%a_][%w_.:]*)%(") do
                    local anchor
                    if name:match("^dogpile%.") and not name:match("^dogpile%.cache") then
                        anchor = name:gsub("^dogpile%.", "")
                    elseif name:match("^cache%.") then
                        anchor = name:gsub("^cache%.", "")
                    elseif name:match("^region:") then
                        anchor = name:gsub("^region:", "Region:")
                    elseif name:match("^lock:") then
                        anchor = name:gsub("^lock:", "Lock:")
                    end
                    if anchor and not seen[name] then
                        seen[name] = true
                        count = count + 1
                        if not anchors[anchor] then
                            missing[#missing + 1] = doc .. ": " .. name
                        end
                    end
                end
            end
        end
        table.sort(missing)
        assert.are.same({}, missing, "functions of the API that the reference does not list")
        assert.is_true(count >= 25, "only " .. count .. " functions found in docs/API.md and the README")
    end)

    -- Each page is loaded, in one headless chromium, into frames 1280 and
    -- 1024 pixels wide; a script measures the laid-out page: nothing wider
    -- than the window (a summary table with nowrap names pushed the page into
    -- a horizontal scroll), no cell, list item or paragraph whose content is
    -- wider than its box, no table or paragraph past the content column's
    -- right edge, and every name that wraps (navigation, summary tables, code
    -- in tables) breaks after a separator ('.', '_', ':', ',', '(', ...), never
    -- mid-word as "dogpile.cache.backends.memcache|d".
    local PROBE = [==[
function probe(win) {
  var doc = win.document, bad = [];
  function label(el) {
    return el.tagName.toLowerCase() + (el.className ? "." + el.className : "") + ' "' +
      (el.textContent || "").replace(/\s+/g, " ").trim().slice(0, 60) + '"';
  }
  if (doc.documentElement.scrollWidth > win.innerWidth)
    bad.push("the page is " + doc.documentElement.scrollWidth + " px wide in a " + win.innerWidth + " px window");
  var content = doc.getElementById("content");
  if (!content) return ["no #content"];
  var right = content.getBoundingClientRect().right;
  var boxes = doc.querySelectorAll("#content td, #content th, #content li, #content p, #content dd, " +
                                   "#content dt, #content table, #navigation li");
  for (var i = 0; i < boxes.length; i++) {
    var el = boxes[i];
    if (el.scrollWidth > el.clientWidth + 1)
      bad.push(label(el) + " holds " + el.scrollWidth + " px in " + el.clientWidth);
    if (el.closest("#content") && el.getBoundingClientRect().right > right + 1)
      bad.push(label(el) + " ends past the content column");
  }
  var names = doc.querySelectorAll("#navigation a, td.name a, #content td code, #content th code");
  var after = " \t\n.,([-/_:?=";
  var range = doc.createRange();
  for (var j = 0; j < names.length; j++) {
    var walker = doc.createTreeWalker(names[j], win.NodeFilter.SHOW_TEXT), node, top = null, prev = null;
    while ((node = walker.nextNode())) {
      for (var k = 0; k < node.length; k++) {
        range.setStart(node, k);
        range.setEnd(node, k + 1);
        var rects = range.getClientRects();
        if (!rects.length) continue;
        var ch = node.data[k];
        if (top !== null && rects[0].top > top + 2 && after.indexOf(prev) < 0 && !/\s/.test(ch))
          bad.push(label(names[j]) + " breaks after '" + prev + "'");
        top = rects[0].top;
        prev = ch;
      }
    }
  }
  return bad;
}
var lines = [], left = PAGES.length * WIDTHS.length;
PAGES.forEach(function (page) {
  WIDTHS.forEach(function (w) {
    var f = document.createElement("iframe");
    f.style.width = w + "px";
    f.style.height = "1500px";
    f.onload = function () {
      var bad;
      try { bad = probe(f.contentWindow); } catch (e) { bad = ["the probe failed: " + e]; }
      lines.push("PAGE " + page + " " + w);
      bad.forEach(function (b) { lines.push("BAD " + page + " at " + w + " px: " + b); });
      if (--left === 0) document.getElementById("out").textContent = lines.join("\n") + "\nDONE";
    };
    f.src = page;
    document.body.appendChild(f);
  });
});
]==]

    it("renders cleanly in headless chromium (no overflow, names break between words)", function()
        local p = io.popen("command -v chromium || command -v chromium-browser")
        local chromium = p:read("*l")
        p:close()
        if not chromium then
            error("needs chromium to check the rendering (apt-get install --no-install-recommends chromium)", 0)
        end
        local list = { "index.html" }
        for f in pairs(pages) do
            list[#list + 1] = "modules/" .. f
        end
        local ls = assert(io.popen("ls " .. DOC .. "topics"))
        for f in ls:lines() do
            list[#list + 1] = "topics/" .. f
        end
        ls:close()
        table.sort(list)
        -- A copy, so that the harness page is not left among the reference's.
        local dir = os.tmpname()
        os.remove(dir)
        local copied = os.execute("cp -r " .. DOC .. " " .. dir)
        assert(copied == 0 or copied == true, "cannot copy " .. DOC .. " to " .. dir)
        local quoted = {}
        for i, f in ipairs(list) do
            quoted[i] = '"' .. f .. '"'
        end
        local fh = assert(io.open(dir .. "/render-check.html", "wb"))
        fh:write('<!DOCTYPE html><html><body><pre id="out"></pre><script>\nvar PAGES = [',
                 table.concat(quoted, ", "), "], WIDTHS = [1280, 1024];\n", PROBE, "</script></body></html>\n")
        fh:close()
        -- Without the sanitizer preload of the ASan run (chromium is not built for it).
        local q = assert(io.popen("env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS timeout 120 "
            .. chromium .. " --headless --no-sandbox --disable-gpu"
            .. " --hide-scrollbars --allow-file-access-from-files --virtual-time-budget=20000"
            .. " --window-size=1400,1000 --dump-dom file://" .. dir .. "/render-check.html 2>/dev/null"))
        local dom = q:read("*a")
        q:close()
        os.execute("rm -rf " .. dir)
        local out = dom:match('<pre id="out">(.-)</pre>')
        assert(out and out:match("DONE$"), "chromium did not report on every page:\n" .. dom:sub(1, 2000))
        out = out:gsub("&lt;", "<"):gsub("&gt;", ">"):gsub("&quot;", '"'):gsub("&amp;", "&")
        local seen, bad = 0, {}
        for line in out:gmatch("[^\n]+") do
            if line:match("^PAGE ") then
                seen = seen + 1
            elseif line:match("^BAD ") then
                bad[#bad + 1] = line:sub(5)
            end
        end
        assert.are.equal(#list * 2, seen)
        assert.are.same({}, bad)
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
            -- "(known: a, b, c)", possibly followed by " (region NAME)", or
            -- cut before its ")" when the message did not fit.
            local list, close = err:match("%(known: ([^)]*)(%)?)")
            assert(list, err)
            local names = {}
            for n in list:gmatch("[%w_]+") do
                names[#names + 1] = n
            end
            return names, close == ""
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

        it("is shown on each backend's module page too, under Arguments", function()
            for _, b in ipairs { "memory", "shared_memory", "lmdb", "redis", "redis_sentinel", "redis_cluster",
                                 "memcached", "tiered", "ngx_shared" } do
                local html = pages["dogpile.cache.backends." .. b .. ".html"]
                assert.is_string(html, b)
                local at = html:find('<h2><a name="Arguments"></a>Arguments</h2>', 1, true)
                assert.is_number(at, b .. ": no Arguments heading")
                local want = rows("dogpile.cache." .. b)
                local n = 0
                for tr in html:sub(at):gmatch("<tr>(.-)</tr>") do
                    local cells = {}
                    for td in tr:gmatch("<td[^>]*>(.-)</td>") do
                        cells[#cells + 1] = text(td):match("^%s*(.-)%s*$")
                    end
                    if #cells == 4 and want[cells[1]] then
                        assert.are.same(want[cells[1]], cells)
                        n = n + 1
                    end
                end
                local total = 0
                for _ in pairs(want) do
                    total = total + 1
                end
                assert.is_true(total >= 2 and n == total, b .. ": " .. n .. " of " .. total .. " arguments shown")
            end
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
