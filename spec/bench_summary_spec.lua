-- bench/summary.lua: bench/run's table from the ROW lines of one run or of
-- several (medians, spread, met/MISSED and headroom judged on the median).
-- Hand-written ROW lines; no benchmark runs.
local S = dofile("bench/summary.lua")

local function row(id, ours, unit, anchor, av, target, path)
    return table.concat({ "ROW", id, path or (id .. " path"), ours, unit, anchor, av, target or "" },
                        "\t")
end

local function by_id(rows)
    local t = {}
    for _, r in ipairs(rows) do
        t[r.id] = r
    end
    return t
end

local function near(expected, got, tol)
    assert.is_number(got)
    assert(math.abs(expected - got) <= (tol or 1e-9),
           string.format("expected %.10g, got %.10g", expected, got))
end

-- Three runs of the whole sequence. `le` ratios 1.0, 1.2, 0.8 against <=1.5;
-- `ge` 2.0, 1.9, 2.2 against >=1.8; `abs` ours 800, 950, 700 against
-- abs<=1000 (its anchor's ratio is beside the point); `ref` has no target;
-- `gone` is missing from run 2 (its benchmark failed there); `tight` is met
-- with little room; `missed` is over its target in every run.
local RUNS = {
    table.concat({
        "== hit: some other output",
        row("le", "10", "ns/op", "lru", "10", "<=1.5"),
        row("ge", "40", "M/s", "1 thread", "20", ">=1.8"),
        row("abs", "800", "us", "python", "8000", "abs<=1000", "waiters (p90 900 us)"),
        row("ref", "5", "ns/op", "table", "2.5"),
        row("gone", "30", "ns/op", "lru", "10", "<=4"),
        row("tight", "11", "ns/op", "lru", "10", "<=1.2"),
        row("missed", "30", "ns/op", "lru", "10", "<=2"),
    }, "\n"),
    table.concat({
        row("le", "12", "ns/op", "lru", "10", "<=1.5"),
        row("ge", "38", "M/s", "1 thread", "20", ">=1.8"),
        row("abs", "950", "us", "python", "8000", "abs<=1000", "waiters (p90 1200 us)"),
        row("ref", "6", "ns/op", "table", "2"),
        row("tight", "10.5", "ns/op", "lru", "10", "<=1.2"),
        row("missed", "25", "ns/op", "lru", "10", "<=2"),
    }, "\n"),
    table.concat({
        row("le", "8", "ns/op", "lru", "10", "<=1.5"),
        row("ge", "44", "M/s", "1 thread", "20", ">=1.8"),
        row("abs", "700", "us", "python", "8000", "abs<=1000", "waiters (p90 800 us)"),
        row("ref", "4", "ns/op", "table", "4"),
        row("gone", "20", "ns/op", "lru", "10", "<=4"),
        row("tight", "10.2", "ns/op", "lru", "10", "<=1.2"),
        row("missed", "26", "ns/op", "lru", "10", "<=2"),
    }, "\n"),
}

local function runs()
    local out = {}
    for k, text in ipairs(RUNS) do
        out[k] = S.parse_rows(text)
    end
    return out
end

describe("bench summary", function()
    describe("one run", function()
        it("judges each row as bench/run always did, with the headroom beside", function()
            local rows = by_id(S.judge(S.parse_rows(RUNS[1])))
            near(1.0, rows.le.ratio)
            assert.equal("met", rows.le.status)
            near(0.5, rows.le.headroom)          -- 1.5 / 1.0 - 1
            assert.is_false(rows.le.thin)
            near(2.0, rows.ge.ratio)
            near(2.0 / 1.8 - 1, rows.ge.headroom)
            assert.is_true(rows.ge.thin)         -- 11%
            assert.equal("met", rows.abs.status)
            near(1000 / 800 - 1, rows.abs.headroom) -- on ours, not on the ratio 0.1
            assert.equal("", rows.ref.status)
            assert.is_nil(rows.ref.headroom)
            assert.equal("MISSED", rows.missed.status)
            near(2 / 3 - 1, rows.missed.headroom)  -- ratio 3
            assert.is_true(rows.missed.thin)
        end)

        it("keeps the single-run columns, with headroom added last", function()
            local rows = S.judge(S.parse_rows(RUNS[1]))
            local csv = S.render_csv(rows, false)
            assert.equal("id,path,ours,unit,anchor,anchor_value,ratio,target,status,headroom_pct",
                         csv:match("^[^\n]+"))
            assert.truthy(csv:find("\nle,le path,10,ns/op,lru,10,1,<=1.5,met,50.0\n", 1, true))
            assert.truthy(csv:find("\nref,ref path,5,ns/op,table,2.5,2,,,\n", 1, true))
            local md = S.render_md(rows, false, { "machine: test" })
            assert.truthy(md:find("^%- machine: test\n\n| id | path | ours | anchor | anchor value | ratio | target | | headroom |\n"))
            assert.truthy(md:find("| missed | missed path | 30.00 ns/op | lru | 10.00 ns/op | 3.000 | `<=2` | **MISSED** | -33.3% thin |",
                                  1, true))
            local tab = S.render_table(rows, false)
            assert.truthy(tab:find("+11.1%% thin"))
            assert.falsy(tab:find("runs"))
        end)
    end)

    describe("three runs", function()
        local agg
        before_each(function()
            agg = S.aggregate(runs())
        end)

        it("keeps the order the rows were printed in", function()
            local ids = {}
            for i, r in ipairs(agg) do
                ids[i] = r.id
            end
            assert.same({ "le", "ge", "abs", "ref", "gone", "tight", "missed" }, ids)
        end)

        it("places a row first printed in a later run after the row before it there", function()
            local later = S.aggregate({
                S.parse_rows(row("a", "1", "n", "-", "-") .. "\n" .. row("c", "1", "n", "-", "-")),
                S.parse_rows(row("a", "2", "n", "-", "-") .. "\n" .. row("b", "2", "n", "-", "-")
                             .. "\n" .. row("c", "2", "n", "-", "-")),
            })
            assert.same({ "a", "b", "c" }, { later[1].id, later[2].id, later[3].id })
            assert.equal(1, later[2].runs)
            near(1.5, later[1].ours)             -- no ratio: the value is ours
            assert.equal("1.000-2.000 n", S.spread(later[1]))
        end)

        it("reports the median of each run's own ratio and its spread, judged on the median", function()
            local le = by_id(agg).le
            near(1.0, le.ratio)
            near(0.8, le.min)
            near(1.2, le.max)
            assert.equal("met", le.status)
            near(0.5, le.headroom)
            assert.is_false(le.thin)
            assert.equal(3, le.runs)
            assert.equal("0.800-1.200", S.spread(le))
        end)

        it("judges a >= target on the median ratio: headroom ratio/R - 1", function()
            local ge = by_id(agg).ge
            near(2.0, ge.ratio)
            near(1.9, ge.min)
            near(2.2, ge.max)
            assert.equal("met", ge.status)
            near(2.0 / 1.8 - 1, ge.headroom)
            assert.is_true(ge.thin)
        end)

        it("judges an abs target on the median of ours, with its path from the median run", function()
            local abs = by_id(agg).abs
            near(800, abs.value)
            near(800, abs.ours)
            near(700, abs.min)
            near(950, abs.max)
            assert.equal("met", abs.status)
            near(0.25, abs.headroom)
            assert.is_false(abs.thin)
            assert.equal("waiters (p90 900 us)", abs.path)
            assert.equal("700.0-950.0 us", S.spread(abs))
        end)

        it("shows a row with no target with its spread and no judgement", function()
            local ref = by_id(agg).ref
            near(2.0, ref.ratio)                 -- ratios 2, 3, 1
            near(1.0, ref.min)
            near(3.0, ref.max)
            near(5, ref.ours)
            near(2.5, ref.anchor_value)
            assert.equal("", ref.status)
            assert.is_nil(ref.headroom)
            assert.is_false(ref.thin)
        end)

        it("counts a row missing from one run over the runs that have it", function()
            local gone = by_id(agg).gone
            assert.equal(2, gone.runs)
            assert.equal(3, gone.of)
            near(2.5, gone.ratio)                -- 3 and 2
            near(2.0, gone.min)
            near(3.0, gone.max)
            assert.equal("met", gone.status)
            near(4 / 2.5 - 1, gone.headroom)
            local csv = S.render_csv(agg, true)
            assert.truthy(csv:find("\ngone,gone path,25,ns/op,lru,10,2.5,2,3,2/3,<=4,met,60.0\n", 1, true))
        end)

        it("marks a met target with under 20% room thin, and a missed one MISSED", function()
            local t = by_id(agg)
            near(1.05, t.tight.ratio)
            assert.equal("met", t.tight.status)
            assert.is_true(t.tight.thin)
            assert.equal("MISSED", t.missed.status)
            near(2.6, t.missed.ratio)
            near(2 / 2.6 - 1, t.missed.headroom)
            local met, missed, thin = S.counts(agg)
            assert.equal(5, met)
            assert.equal(1, missed)
            assert.same({ "ge", "tight", "missed" }, thin)
        end)

        it("writes the medians, spread and runs columns", function()
            local md = S.render_md(agg, true, { "run 1: date", "run 2: date" })
            assert.truthy(md:find("| id | path | ours (median) | anchor | anchor value (median) | ratio (median) | spread (min-max) | runs | target | | headroom |",
                                  1, true))
            assert.truthy(md:find("| ge | ge path | 40.00 M/s | 1 thread | 20.00 M/s | 2.000 | 1.900-2.200 | 3/3 | `>=1.8` | met | +11.1% thin |",
                                  1, true))
            assert.truthy(md:find("| missed | missed path | 26.00 ns/op | lru | 10.00 ns/op | 2.600 | 2.500-3.000 | 3/3 | `<=2` | **MISSED** | -23.1% thin |",
                                  1, true))
            local tab = S.render_table(agg, true)
            assert.truthy(tab:find("spread (min-max)", 1, true))
            assert.truthy(tab:find("\ngone .- 2/3 ", 1))
        end)
    end)

    describe("headroom", function()
        it("is R/v - 1 under <=, v/R - 1 over >=, on ours for abs targets", function()
            near(0.25, S.headroom("<=1.5", 1.2))
            near(0.1, S.headroom(">=2", 2.2))
            near(1, S.headroom("abs<=2000", 1000))
            near(-0.5, S.headroom("abs>=10", 5))
        end)

        it("has no meaning for no target, no value, or a bound of 0 met exactly", function()
            assert.is_nil(S.headroom("", 1))
            assert.is_nil(S.headroom("<=2", nil))
            assert.is_nil(S.headroom("abs<=0", 0))
            assert.equal(math.huge, S.headroom("abs<=100", 0))
            near(-1, S.headroom("abs<=0", 3))      -- missed: all the room gone
            assert.is_nil(S.headroom("<2", 1))
            assert.equal("n/a", S.status("<2", 1))
            assert.equal("n/a", S.status("<=2", nil))
        end)

        it("is thin under 20%, not at 20%", function()
            assert.is_false(S.is_thin(S.headroom("<=1.44", 1.2)))
            assert.is_true(S.is_thin(S.headroom("<=1.43", 1.2)))
            assert.equal("+20.0%", S.pct(S.headroom("<=1.44", 1.2)))
        end)

        it("leaves a ratio target with no anchor value unjudged rather than judging ours", function()
            local r = S.judge(S.parse_rows(row("x", "10", "ns/op", "lru", "-", "<=2")))[1]
            assert.equal("n/a", r.status)
            assert.is_nil(r.headroom)
        end)
    end)

    it("writes both files and prints the table from the command", function()
        local dir = os.tmpname()
        os.remove(dir)
        local made = os.execute("mkdir -p " .. dir)
        assert(made == 0 or made == true, "mkdir " .. dir)
        local files = {}
        for k, text in ipairs(RUNS) do
            files[k] = dir .. "/rows" .. k
            local f = assert(io.open(files[k], "w"))
            f:write(text, "\n")
            f:close()
        end
        local hf = assert(io.open(dir .. "/header", "w"))
        hf:write("machine: test\nrun 1: date x; load average at the start: 0.1\n")
        hf:close()
        local p = assert(io.popen("luajit bench/summary.lua --out " .. dir .. " --header " .. dir
                                  .. "/header " .. table.concat(files, " ") .. " 2>&1; echo rc=$?"))
        local out = p:read("*a")
        p:close()
        assert.truthy(out:find("targets: 5 met, 1 missed; 3 under 20% headroom (thin): ge, tight, missed",
                               1, true), out)
        assert.truthy(out:find("rc=0", 1, true), out)
        local md = assert(io.open(dir .. "/summary.md")):read("*a")
        assert.truthy(md:find("^%- machine: test\n%- run 1: date x"))
        assert.truthy(io.open(dir .. "/summary.csv"))
        os.execute("rm -rf " .. dir)
    end)
end)
