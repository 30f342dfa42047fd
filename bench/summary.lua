--- bench/run's table: the ROW lines of one run, or of N runs of the whole
-- sequence, turned into the terminal table, summary.csv and summary.md.
--
--   luajit bench/summary.lua --out DIR [--header FILE] ROWS_1 [ROWS_2 ...]
--
-- Each ROWS_k file holds the ROW lines (bench/lib.lua) that run k printed,
-- in the order printed. One file gives the single-run table: each row's
-- ours, anchor, ratio, target, met/MISSED and headroom. Several give one row
-- per id: the median over the runs of ours, of the anchor and of the ratio
-- (each run's own ratio: ours and its anchor are measured in the same run, so
-- a ratio of two runs' medians would mix runs), the spread (min-max over the
-- runs) of the judged value, in how many runs the row appeared, and
-- met/MISSED and headroom judged on the median. The judged value is ours for
-- abs<=V / abs>=V targets and for rows with no ratio, the ratio otherwise.
--
-- Headroom says how far inside its target the judged value is: R/v - 1 for
-- <=R, v/R - 1 for >=R (V likewise for abs targets); under 20% it is marked
-- "thin" (issue 21: every target at least 20% inside on a quiet run). It is
-- negative for a missed target, and empty when it has no meaning (no target,
-- no value, or a target of 0 met exactly).
--
-- FILE holds the header lines (machine, date, load...), written at the top
-- of summary.md as a list. The table goes to stdout, then the files written
-- and a count of targets met, missed and thin. Loaded as a module (the spec
-- does) it runs nothing.
local M = {}

-- bench/lib.lua, found next to this file (it runs as a script and is loaded
-- by dofile from the specs, neither with bench/ on the path).
local blib = dofile(((debug.getinfo(1, "S").source:sub(2)):match("^(.*)/[^/]*$") or ".")
                    .. "/lib.lua")

--- Below this headroom (a fraction) a row is "thin".
M.THIN = 0.20

local function num(s)
    if type(s) == "number" then
        return s == s and s > -math.huge and s < math.huge
    end
    if type(s) ~= "string" then
        return false
    end
    -- The numbers bench/lib.lua prints; not "nan", "inf", "0x10" or "-".
    local mant = s:match("^(.-)[eE][-+]?%d+$") or s
    return (mant:match("^[-+]?%d+%.?%d*$") or mant:match("^[-+]?%.%d+$")) ~= nil
end
M.num = num

--- The fields of one ROW line (tab-separated), or nil if it is not one.
function M.parse_row(line)
    line = line:gsub("\r?\n$", "")
    if line:sub(1, 4) ~= "ROW\t" then
        return nil
    end
    local f = {}
    for field in (line .. "\t"):gmatch("([^\t]*)\t") do
        f[#f + 1] = field
    end
    return {
        id = f[2] or "", path = f[3] or "", ours = f[4] or "", unit = f[5] or "",
        anchor = f[6] or "", anchor_value = f[7] or "", target = f[8] or "",
    }
end

--- The rows of one run from its text (other lines are skipped).
function M.parse_rows(text)
    local rows = {}
    for line in (text .. "\n"):gmatch("([^\n]*)\n") do
        local r = M.parse_row(line)
        if r then
            rows[#rows + 1] = r
        end
    end
    return rows
end

--- ours / anchor_value as numbers, or nil when either is missing or the
-- anchor is 0.
function M.ratio(row)
    if num(row.ours) and num(row.anchor_value) and tonumber(row.anchor_value) ~= 0 then
        return tonumber(row.ours) / tonumber(row.anchor_value)
    end
    return nil
end

local function parse_target(target)
    local abs, op, bound = target:match("^(a?b?s?)([<>]=)(.+)$")
    if not op or (abs ~= "" and abs ~= "abs") or not num(bound) then
        return nil
    end
    return abs == "abs", op, tonumber(bound)
end

--- Whether the target judges ours (abs<=V, abs>=V) rather than the ratio.
function M.is_abs(target)
    return (target or ""):match("^abs[<>]=") ~= nil
end

--- "met", "MISSED", "n/a" (a target but no value, or a target not
-- understood) or "" (no target). `value` is what the target judges: ours
-- for an abs target, the ratio otherwise.
function M.status(target, value)
    if target == nil or target == "" then
        return ""
    end
    local _, op, bound = parse_target(target)
    if not op or value == nil then
        return "n/a"
    end
    if op == "<=" then
        return value <= bound and "met" or "MISSED"
    end
    return value >= bound and "met" or "MISSED"
end

--- How far inside the target `value` is, as a fraction (0.25 = 25% of
-- room; negative when missed; math.huge when any value would do better
-- than a bound of 0), or nil when that has no meaning.
function M.headroom(target, value)
    if target == nil or target == "" or value == nil then
        return nil
    end
    local _, op, bound = parse_target(target)
    if not op or bound < 0 or value < 0 then
        return nil
    end
    local over, under
    if op == "<=" then
        over, under = bound, value
    else
        over, under = value, bound
    end
    if under == 0 then
        return over > 0 and math.huge or nil
    end
    return over / under - 1
end

function M.is_thin(h)
    -- The epsilon keeps a ratio of exactly 1.2 under <=1.44 from turning thin
    -- by rounding.
    return h ~= nil and h < M.THIN - 1e-9
end

-- bench/lib.lua's median, but nil (not NaN) for no values: a row missing
-- from every run has no figure.
function M.median(xs)
    if #xs == 0 then
        return nil
    end
    return blib.median(xs)
end

--- One run's rows judged: each row gets ratio, value (what the target
-- judges), status and headroom.
function M.judge(rows)
    local out = {}
    for i, r in ipairs(rows) do
        local ratio = M.ratio(r)
        local ours = num(r.ours) and tonumber(r.ours) or nil
        local abs = M.is_abs(r.target)
        local on_ratio = not abs and ratio ~= nil
        local value = on_ratio and ratio or ours
        -- A ratio target with no ratio judges nothing (n/a), not ours.
        local judged = (abs or on_ratio) and value or nil
        local h = M.headroom(r.target, judged)
        out[i] = {
            id = r.id, path = r.path, unit = r.unit, anchor = r.anchor, target = r.target,
            ours = ours, anchor_value = num(r.anchor_value) and tonumber(r.anchor_value) or nil,
            ratio = ratio, value = value, value_is_ratio = on_ratio,
            status = M.status(r.target, judged),
            headroom = h, thin = M.is_thin(h), runs = 1,
        }
    end
    return out
end

--- The rows of several runs (a list of lists of parsed rows) as one row per
-- id, in the order the rows were printed; a row missing from some runs is
-- placed after the row that preceded it where it appeared. An id printed
-- twice in one run is two rows (matched by occurrence).
function M.aggregate(runs)
    local order, by_key = {}, {}
    for k, rows in ipairs(runs) do
        local seen, prev = {}, 0
        for _, row in ipairs(M.judge(rows)) do
            seen[row.id] = (seen[row.id] or 0) + 1
            local key = row.id .. "\0" .. seen[row.id]
            local slot = by_key[key]
            if not slot then
                slot = { key = key, per_run = {} }
                by_key[key] = slot
                table.insert(order, prev + 1, slot)
            end
            slot.per_run[#slot.per_run + 1] = { run = k, row = row }
            for i = 1, #order do
                if order[i] == slot then
                    prev = i
                    break
                end
            end
        end
    end

    local out = {}
    for i, slot in ipairs(order) do
        local per = slot.per_run
        local first = per[1].row
        local target = first.target
        local abs = M.is_abs(target)
        local ours, avs, ratios = {}, {}, {}
        for _, p in ipairs(per) do
            ours[#ours + 1] = p.row.ours
            avs[#avs + 1] = p.row.anchor_value
            ratios[#ratios + 1] = p.row.ratio
        end
        local judged_is_ratio = not abs and #ratios > 0
        -- The judged value of each run, paired with its row, to find the
        -- median run (its path, with the figures it may carry, is shown).
        local vals = {}
        for _, p in ipairs(per) do
            local v
            if judged_is_ratio then
                v = p.row.ratio
            else
                v = p.row.ours
            end
            if v ~= nil then
                vals[#vals + 1] = { v = v, row = p.row }
            end
        end
        table.sort(vals, function(a, b) return a.v < b.v end)
        local plain = {}
        for j, e in ipairs(vals) do
            plain[j] = e.v
        end
        local value = M.median(plain)
        local mid = vals[math.floor((#vals + 1) / 2)]
        local shown = mid and mid.row or first
        local judged = (abs or judged_is_ratio) and value or nil
        local h = M.headroom(target, judged)
        out[i] = {
            id = first.id, path = shown.path, unit = first.unit, anchor = shown.anchor,
            target = target,
            ours = M.median(ours), anchor_value = M.median(avs), ratio = M.median(ratios),
            value = value, value_is_ratio = judged_is_ratio,
            min = plain[1], max = plain[#plain],
            status = M.status(target, judged),
            headroom = h, thin = M.is_thin(h),
            runs = #per, of = #runs,
        }
    end
    return out
end

-- -- Formatting ------------------------------------------------------------------

local function absf(v)
    return v < 0 and -v or v
end

--- 4 significant digits, never an exponent for the sizes benchmarks print.
function M.short(v)
    if v == nil then
        return "-"
    end
    local a = absf(v)
    if a >= 1000 then
        return string.format("%.0f", v)
    elseif a >= 100 then
        return string.format("%.1f", v)
    elseif a >= 10 then
        return string.format("%.2f", v)
    elseif a >= 0.01 or v == 0 then
        return string.format("%.3f", v)
    end
    return string.format("%.3g", v)
end

function M.fratio(r)
    if r == nil then
        return "-"
    elseif r >= 10 then
        return string.format("%.1f", r)
    elseif r >= 0.01 then
        return string.format("%.3f", r)
    end
    return string.format("%.2g", r)
end

--- The headroom as a percentage: "+23.5%", "-4.0%", "inf" or "".
function M.pct(h)
    if h == nil then
        return ""
    elseif h == math.huge then
        return "inf"
    end
    local p = h * 100
    return string.format(absf(p) < 1000 and "%+.1f%%" or "%+.0f%%", p)
end

local function csvq(s)
    s = tostring(s)
    if s:find('[",\n]') then
        return '"' .. s:gsub('"', '""') .. '"'
    end
    return s
end

local function mdq(s)
    return (tostring(s):gsub("|", "\\|"))
end

local function csvnum(v, fmt)
    if v == nil then
        return ""
    elseif v == math.huge then
        return "inf"
    end
    return string.format(fmt or "%.6g", v)
end

--- The spread of an aggregated row: "min-max" of its judged value.
function M.spread(row)
    if row.min == nil then
        return "-"
    end
    if row.value_is_ratio then
        return M.fratio(row.min) .. "-" .. M.fratio(row.max)
    end
    return M.short(row.min) .. "-" .. M.short(row.max) .. " " .. row.unit
end

local function with_unit(v, unit)
    return v == nil and "-" or (M.short(v) .. " " .. unit)
end

--- The cells of each row, for the terminal and markdown tables: a list of
-- columns {name, right-aligned, md alignment, cell(row)}.
local function columns(multi)
    local cols = {
        { "id", false, "---", function(r) return r.id end },
        { "path", false, "---", function(r) return r.path end },
        { multi and "ours (median)" or "ours", true, "--:",
          function(r) return with_unit(r.ours, r.unit) end },
        { "anchor", false, "---", function(r) return r.anchor end },
        { multi and "anchor value (median)" or "anchor value", true, "--:",
          function(r) return with_unit(r.anchor_value, r.unit) end },
        { multi and "ratio (median)" or "ratio", true, "--:", function(r) return M.fratio(r.ratio) end },
    }
    if multi then
        cols[#cols + 1] = { "spread (min-max)", true, "--:", M.spread }
        cols[#cols + 1] = { "runs", true, "--:",
                            function(r) return r.runs .. "/" .. r.of end }
    end
    cols[#cols + 1] = { "target", false, "---", function(r) return r.target end }
    cols[#cols + 1] = { "", false, "---", function(r) return r.status end }
    cols[#cols + 1] = { "headroom", false, "--:", function(r)
        return M.pct(r.headroom) .. (r.thin and " thin" or "")
    end }
    return cols
end

local function ulen(s)
    -- Characters, not bytes: paths may hold UTF-8 (µs).
    local _, cont = s:gsub("[\128-\191]", "")
    return #s - cont
end

local function pad(s, w, right)
    local fill = string.rep(" ", w - ulen(s))
    return right and (fill .. s) or (s .. fill)
end

--- The terminal table (a string, lines ending in "\n").
function M.render_table(rows, multi)
    local cols = columns(multi)
    local cells, widths = {}, {}
    for c, col in ipairs(cols) do
        widths[c] = ulen(col[1])
    end
    for i, r in ipairs(rows) do
        cells[i] = {}
        for c, col in ipairs(cols) do
            local s = col[4](r)
            cells[i][c] = s
            if ulen(s) > widths[c] then
                widths[c] = ulen(s)
            end
        end
    end
    -- The headroom figures right-aligned, "thin" after them.
    local hc = #cols
    local pw = 0
    for i in ipairs(rows) do
        local p = M.pct(rows[i].headroom)
        pw = math.max(pw, #p)
    end
    for i, r in ipairs(rows) do
        cells[i][hc] = pad(M.pct(r.headroom), pw, true) .. (r.thin and " thin" or "")
        widths[hc] = math.max(widths[hc], ulen(cells[i][hc]))
    end
    local lines = {}
    local function emit(vals, header)
        local parts = {}
        for c, col in ipairs(cols) do
            parts[c] = pad(vals[c], widths[c], col[2] and not header)
        end
        lines[#lines + 1] = (table.concat(parts, "  "):gsub(" +$", ""))
    end
    local names = {}
    for c, col in ipairs(cols) do
        names[c] = col[1]
    end
    emit(names, true)
    local total = 0
    for c = 1, #cols do
        total = total + widths[c] + 2
    end
    lines[#lines + 1] = string.rep("-", total - 2)
    for i in ipairs(rows) do
        emit(cells[i])
    end
    return table.concat(lines, "\n") .. "\n"
end

--- summary.md: the header lines as a list, then the table.
function M.render_md(rows, multi, header)
    local out = {}
    for _, h in ipairs(header or {}) do
        out[#out + 1] = "- " .. h
    end
    if #out > 0 then
        out[#out + 1] = ""
    end
    local cols = columns(multi)
    local head, aligns = { "|" }, {}
    for c, col in ipairs(cols) do
        head[#head + 1] = col[1] == "" and " |" or (" " .. col[1] .. " |")
        aligns[c] = col[3]
    end
    out[#out + 1] = table.concat(head)
    out[#out + 1] = "|" .. table.concat(aligns, "|") .. "|"
    for _, r in ipairs(rows) do
        local cells = {}
        for c, col in ipairs(cols) do
            local s = col[4](r)
            if col[1] == "target" then
                s = s == "" and "" or ("`" .. s .. "`")
            elseif col[1] == "" then
                s = s == "MISSED" and "**MISSED**" or s
            else
                s = mdq(s)
            end
            cells[c] = s
        end
        out[#out + 1] = "| " .. table.concat(cells, " | ") .. " |"
    end
    return table.concat(out, "\n") .. "\n"
end

--- summary.csv.
function M.render_csv(rows, multi)
    local out = {}
    if multi then
        out[1] = "id,path,ours,unit,anchor,anchor_value,ratio,min,max,runs,target,status,headroom_pct"
    else
        out[1] = "id,path,ours,unit,anchor,anchor_value,ratio,target,status,headroom_pct"
    end
    for _, r in ipairs(rows) do
        local f = { csvq(r.id), csvq(r.path), csvnum(r.ours), csvq(r.unit), csvq(r.anchor),
                    csvnum(r.anchor_value), csvnum(r.ratio, "%.4g") }
        if multi then
            f[#f + 1] = csvnum(r.min, "%.4g")
            f[#f + 1] = csvnum(r.max, "%.4g")
            f[#f + 1] = r.runs .. "/" .. r.of
        end
        f[#f + 1] = csvq(r.target)
        f[#f + 1] = r.status
        f[#f + 1] = r.headroom and csvnum(r.headroom * 100, "%.1f") or ""
        out[#out + 1] = table.concat(f, ",")
    end
    return table.concat(out, "\n") .. "\n"
end

--- met, missed, and the ids of the thin rows (met or not).
function M.counts(rows)
    local met, missed, thin = 0, 0, {}
    for _, r in ipairs(rows) do
        if r.status == "met" then
            met = met + 1
        elseif r.status == "MISSED" then
            missed = missed + 1
        end
        if r.thin then
            thin[#thin + 1] = r.id
        end
    end
    return met, missed, thin
end

-- -- The command -------------------------------------------------------------------

local function slurp(path)
    local f, err = io.open(path, "rb")
    if not f then
        error("bench/summary.lua: cannot read " .. tostring(err), 0)
    end
    local s = f:read("*a")
    f:close()
    return s
end

local function spit(path, s)
    local f, err = io.open(path, "wb")
    if not f then
        error("bench/summary.lua: cannot write " .. tostring(err), 0)
    end
    f:write(s)
    f:close()
end

--- Reads the rows files, writes DIR/summary.csv and summary.md, prints the
-- table. Returns the exit status.
function M.main(args)
    local out_dir, header_file, files = nil, nil, {}
    local i = 1
    while i <= #args do
        local a = args[i]
        if a == "--out" then
            i = i + 1
            out_dir = args[i]
        elseif a == "--header" then
            i = i + 1
            header_file = args[i]
        elseif a:sub(1, 2) == "--" then
            io.stderr:write("bench/summary.lua: unknown option '", a, "'\n")
            return 2
        else
            files[#files + 1] = a
        end
        i = i + 1
    end
    if not out_dir or #files == 0 then
        io.stderr:write("usage: luajit bench/summary.lua --out DIR [--header FILE] ROWS_1 [ROWS_2 ...]\n")
        return 2
    end
    local header = {}
    if header_file then
        for line in slurp(header_file):gmatch("[^\n]+") do
            header[#header + 1] = line
        end
    end
    local runs = {}
    for k, f in ipairs(files) do
        runs[k] = M.parse_rows(slurp(f))
    end
    local multi = #runs > 1
    local rows = multi and M.aggregate(runs) or M.judge(runs[1])
    local csv, md = out_dir .. "/summary.csv", out_dir .. "/summary.md"
    spit(csv, M.render_csv(rows, multi))
    spit(md, M.render_md(rows, multi, header))
    io.write(M.render_table(rows, multi), "\n")
    io.write("written: ", csv, ", ", md, "\n")
    local met, missed, thin = M.counts(rows)
    io.write(string.format("targets: %d met, %d missed; %d under %d%% headroom (thin)%s\n",
                           met, missed, #thin, M.THIN * 100,
                           #thin > 0 and (": " .. table.concat(thin, ", ")) or ""))
    return 0
end

-- Run as a script, not required ("summary") nor loaded by dofile from busted.
if type(arg) == "table" and type(arg[0]) == "string" and arg[0]:match("summary%.lua$")
        and ... ~= "summary" then
    local ok, rc = pcall(M.main, arg)
    if not ok then
        io.stderr:write(tostring(rc), "\n")
        os.exit(1)
    end
    os.exit(rc)
end

return M
