-- Touches up the pages LDoc wrote into DOCDIR (run by .ci/docs).
--
-- Long names get places to break: a <wbr> after each '.', '_', ':', ',',
-- '(', '?' and '=' of a link's text (a module or function name, a signature)
-- or of a code span's when it is one word (an argument name, an address). Without them a name wider than its column
-- (the navigation's dogpile.cache.backends.redis_sentinel, a table's
-- redis_expiration_time) either overflows it or is cut mid-word by the
-- sheet's last-resort overflow-wrap. Code blocks (<pre>) are left alone.
--
-- The index lists each topic by its file name with an empty summary (LDoc's
-- template has no summary for a Markdown topic): it gets the topic's first
-- heading and the first sentence of its first paragraph instead.
--
-- Each backend's module page gets its table of arguments (see below).
--
-- Usage: luajit postprocess.lua DOCDIR TOPIC.md ...
local docdir = assert(arg[1], "usage: postprocess.lua DOCDIR TOPIC.md ...")

local function read(path)
    local fh = assert(io.open(path, "rb"))
    local s = fh:read("*a")
    fh:close()
    return s
end

local function write(path, s)
    local fh = assert(io.open(path, "wb"))
    fh:write(s)
    fh:close()
end

local function breakable(s)
    return (s:gsub("([%._:,%(%?=])", "%1<wbr>"):gsub("<wbr>$", ""))
end

local function add_breaks(html)
    local function fix(part)
        return (part:gsub("(<a [^>]*>)([^<]+)(</a>)", function(open, t, close)
            return open .. breakable(t) .. close
        end):gsub("(<code>)([^<%s]+)(</code>)", function(open, t, close)
            return open .. breakable(t) .. close
        end))
    end
    local out, pos = {}, 1
    while true do
        local s, e = html:find("<pre.-</pre>", pos)
        out[#out + 1] = fix(html:sub(pos, (s or #html + 1) - 1))
        if not s then
            break
        end
        out[#out + 1] = html:sub(s, e)
        pos = e + 1
    end
    return table.concat(out)
end

local function escape(s)
    return (s:gsub("&", "&amp;"):gsub("<", "&lt;"):gsub(">", "&gt;"))
end

-- Markdown inline code and emphasis are kept as text: the summary is plain.
local function plain(s)
    return (s:gsub("`", ""):gsub("%*", ""))
end

-- Each backend's module page gets its section of the Backend arguments page
-- (its table of arguments with types, defaults and meanings) under an
-- "Arguments" heading, above its functions: the module's own comment may
-- only name the arguments or point elsewhere.
local ARGS = "topics/backend-arguments.md.html"
local args_page = read(docdir .. "/" .. ARGS)
local inserted = 0
local ls = assert(io.popen("ls '" .. docdir .. "/modules'"))
for file in ls:lines() do
    local short = file:match("^dogpile%.cache%.backends%.([%w_]+)%.html$")
    local anchor = short and "dogpile_cache_" .. short
    local from = anchor and args_page:find('<p><a name="' .. anchor .. '"></a></p>', 1, true)
    if from then
        local stop = args_page:find('<p><a name="', from + 1, true)
            or assert(args_page:find('</div> <!-- id="content" -->', from, true), ARGS .. ": no end of content")
        local section = args_page:sub(from, stop - 1)
            :gsub('<p><a name="[^"]+"></a></p>%s*', "", 1)
            -- The backend's one-line description: the module page opens with its own.
            :gsub("(<h2>[^<]*</h2>)%s*<p>.-</p>", "%1", 1)
            :gsub("<h2>[^<]*</h2>", '<h2><a name="Arguments"></a>Arguments</h2>\n<p>As on the <a href="../'
                  .. ARGS .. '#' .. anchor .. '">Backend arguments</a> page:</p>', 1)
        local path = docdir .. "/modules/" .. file
        local html = read(path)
        local at = html:find('<h2><a href="#Functions">', 1, true)
            or assert(html:find('</div> <!-- id="content" -->', 1, true), file .. ": no end of content")
        write(path, html:sub(1, at - 1) .. section .. "\n" .. html:sub(at))
        inserted = inserted + 1
    end
end
ls:close()
assert(inserted >= 8, "only " .. inserted .. " backend pages found a section of " .. ARGS)

local index = read(docdir .. "/index.html")
for i = 2, #arg do
    local md = read(arg[i])
    local file = arg[i]:match("([^/]+)$")
    local title = assert(md:match("^#%s+([^\n]+)"), arg[i] .. ": no first heading")
    local para = assert(md:match("\n\n([^#\n][^\n]*)"), arg[i] .. ": no first paragraph")
    local sentence = para:match("^(.-%.)%s") or para
    local href = 'href="topics/' .. file .. '.html"'
    local row = "(<a " .. href:gsub("%p", "%%%0") .. ">)[^<]*(</a></td>%s*<td class=\"summary\">)(</td>)"
    local n
    index, n = index:gsub(row, function(open, mid, close)
        return open .. escape(plain(title)) .. mid .. escape(plain(sentence)) .. close
    end)
    assert(n == 1, "index.html: no row for the topic " .. file)
end
write(docdir .. "/index.html", index)

ls = assert(io.popen("find '" .. docdir .. "' -name '*.html'"))
for path in ls:lines() do
    write(path, add_breaks(read(path)))
end
ls:close()
