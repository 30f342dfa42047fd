-- Turns core/dogpile.h into a Markdown reference page for LDoc's topics:
-- the opening comment is the introduction, "/* -- Name --" comments are
-- sections, "/** ... */" comments are the text above the declarations that
-- follow them, and all code is shown verbatim in C blocks.
-- Usage: luajit header.lua core/dogpile.h > out.md
local path = assert(arg[1], "usage: header.lua HEADER")
local src = assert(io.open(path)):read("*a")
local out, code = {}, {}

local function emit(s) out[#out + 1] = s end
local function flush_code()
    while #code > 0 and code[#code]:match("^%s*$") do code[#code] = nil end
    while #code > 0 and code[1]:match("^%s*$") do table.remove(code, 1) end
    if #code > 0 then
        emit("```c\n" .. table.concat(code, "\n") .. "\n```\n")
    end
    code = {}
end
-- The text of a comment: without the delimiters and the leading " * ".
local function text_of(lines)
    local t = {}
    for _, l in ipairs(lines) do
        l = l:gsub("^%s*/%*+%s?", ""):gsub("%s*%*/%s*$", ""):gsub("^%s*%*%s?", "")
        t[#t + 1] = l
    end
    -- "<" and ">" in prose would read as HTML tags (dp_<object>_<verb>).
    return (table.concat(t, "\n"):gsub("^%s+", ""):gsub("%s+$", "")
        :gsub("<", "&lt;"):gsub(">", "&gt;"))
end

emit("# The C header: dogpile.h\n")
emit("Installed as `PREFIX/include/dogpile/dogpile.h` (pkg-config: `dogpile`). "
    .. "Generated from `core/dogpile.h` by `bash .ci/docs`.\n")

local lines = {}
for l in (src .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
local i, first = 1, true
while i <= #lines do
    local l = lines[i]
    if l:match("^%s*/%*") and not l:match("%S.-/%*") then
        local block = {}
        while true do
            block[#block + 1] = lines[i]
            if lines[i]:find("*/", 1, true) or i >= #lines then break end
            i = i + 1
        end
        flush_code()
        local text = text_of(block)
        if first then
            emit("## Overview\n\n" .. text .. "\n")
        elseif block[1]:match("^%s*/%*%s*%-%-") then
            local title, rest = text:match("^%-%-%s*(.-)%s*%-*%s*\n(.*)$")
            if not title then title, rest = text:match("^%-%-%s*(.-)%s*%-*%s*$"), "" end
            emit("## " .. title .. "\n")
            if rest:match("%S") then emit(rest:gsub("^%s+", "") .. "\n") end
        else
            emit(text .. "\n")
        end
        first = false
    else
        code[#code + 1] = l
    end
    i = i + 1
end
flush_code()
io.write(table.concat(out, "\n"))
