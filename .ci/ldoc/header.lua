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
-- A name pattern with placeholders (dp_<object>_<verb>) becomes code: as
-- prose its "<...>" would read as HTML tags, and its underscores as
-- emphasis. Any other "<" or ">" is escaped. Doxygen's @note, which LDoc
-- would show raw, becomes a bold "Note." opening its paragraph, and a
-- reference to one ("see @note") plain words.
local function text_of(lines)
    local t = {}
    for _, l in ipairs(lines) do
        l = l:gsub("^%s*/%*+%s?", ""):gsub("%s*%*/%s*$", ""):gsub("^%s*%*%s?", "")
        t[#t + 1] = l
    end
    local text = table.concat(t, "\n"):gsub("^%s+", ""):gsub("%s+$", "")
    local spans = {}
    text = text:gsub("`[^`]*`", function(c)
        spans[#spans + 1] = c
        return "\0" .. #spans .. "\0"
    end)
    text = text:gsub("[%w_]*<%w+>[%w_<>]*", function(c)
        spans[#spans + 1] = "`" .. c .. "`"
        return "\0" .. #spans .. "\0"
    end)
    text = text:gsub("<", "&lt;"):gsub(">", "&gt;")
    text = ("\n" .. text):gsub("\n@note%s+", "\n**Note.** "):sub(2)
    text = text:gsub("see @note", "see the note"):gsub("@note", "note")
    return (text:gsub("%z(%d+)%z", function(n) return spans[tonumber(n)] end))
end

-- The header's scaffolding (include guard, includes, extern "C", the
-- DP_API export macro): not part of the interface a reader looks up.
local function scaffolding(lines)
    local skip, depth = {}, 0
    for n, l in ipairs(lines) do
        if depth > 0 then
            skip[n] = true
            if l:match("^#if") then
                depth = depth + 1
            elseif l:match("^#endif") then
                depth = depth - 1
            end
        elseif l:match("^#ifdef __cplusplus") or l:match("^#if defined%(DP_BUILDING%)") then
            skip[n], depth = true, 1
        elseif l:match("^#ifndef DOGPILE_H") or l:match("^#define DOGPILE_H") or l:match("^#include")
            or l:match("^#endif /%* DOGPILE_H") then
            skip[n] = true
        end
    end
    return skip
end

emit("# The C header: dogpile.h\n")
emit("Installed as `PREFIX/include/dogpile/dogpile.h` (pkg-config: `dogpile`). "
    .. "Generated from `core/dogpile.h` by `bash .ci/docs`.\n")

local lines = {}
for l in (src .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
local skip = scaffolding(lines)
local i, first = 1, true
while i <= #lines do
    local l = lines[i]
    if skip[i] then
        -- left out (see scaffolding)
    elseif l:match("^%s*/%*") and not l:match("%S.-/%*") then
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
