-- Specs for require "dogpile": the lock, NameRegistry, ReadWriteMutex,
-- set_sleep and the core's per-key mutex, with real coroutines.
local dogpile = require "dogpile"
local lib = require "dogpile.lib"
local support = require "support"

local C = lib.C
local NeedRegen = dogpile.NeedRegenerationException

-- -- Helpers -------------------------------------------------------------------

--- The line of the caller: `line = here(); f()` on one line names f's call.
local function here()
    return debug.getinfo(2, "l").currentline
end

--- Run fn, which must raise; return what it raised.
local function catch(fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok, "expected an error, got none")
    return err
end

--- A programmer error: "<this spec file>:<line>: dogpile:..." (the position
-- points at the spec's line, not inside the library), containing `needle`.
local function assert_user_error(err, line, needle)
    assert.is_string(err, "error should be a message, got " .. type(err))
    local file, l, msg = err:match("^(.-):(%d+): (.*)$")
    assert.is_truthy(file, "error has no position prefix: " .. err)
    assert.is_truthy(file:match("dogpile_spec%.lua$"),
                     "position should name the caller's file (this spec): " .. err)
    if line then
        assert.are.equal(line, tonumber(l), "position should name the caller's line: " .. err)
    end
    assert.are.equal("dogpile:", msg:sub(1, 8), "message should start with 'dogpile:': " .. err)
    if needle then
        assert.is_truthy(msg:find(needle, 1, true),
                         "message should mention '" .. needle .. "': " .. err)
    end
end

--- A function that counts its calls (in .calls) and forwards to fn.
local function counted(fn)
    local c = { calls = 0 }
    setmetatable(c, { __call = function(self, ...)
        self.calls = self.calls + 1
        return fn(...)
    end })
    return c
end

--- A mock mutex that records every call. `busy`: held by someone else, so
-- acquire(false) fails; a blocking acquire runs `on_wait` (what the holder
-- did meanwhile), then the holder is gone and the caller gets the mutex.
local function mock_mutex(busy, on_wait)
    local m = { tries = 0, waits = 0, releases = 0, held = false, busy = busy or false }
    function m:acquire(wait)
        if wait == false then
            self.tries = self.tries + 1
            if self.busy or self.held then
                return false
            end
        else
            self.waits = self.waits + 1
            assert(not self.held, "mock mutex: blocking acquire by its own holder")
            if on_wait then
                on_wait()
            end
            self.busy = false
        end
        self.held = true
        return true
    end
    function m:release()
        assert(self.held, "mock mutex: release of a mutex that is not held")
        self.held = false
        self.releases = self.releases + 1
    end
    return m
end

--- A value slot: `value_fn` (counted) raises NeedRegenerationException while
-- empty, otherwise returns value, created_time.
local function slot(value, age)
    local s = {}
    if value ~= nil then
        s.value, s.ct = value, C.dp_clock_now() - age
    end
    function s.put(v, ct)
        s.value, s.ct = v, ct or C.dp_clock_now()
    end
    s.value_fn = counted(function()
        if s.ct == nil then
            error(NeedRegen)
        end
        return s.value, s.ct
    end)
    return s
end

local FRESH, STALE, EXPIRE = 1, 100, 10 -- ages in seconds, expiretime

-- -- Specs -------------------------------------------------------------------------

describe("dogpile", function()
    support.no_leaks()

    after_each(function()
        dogpile.set_sleep(nil)
    end)

    -- -- The lock, with a mock mutex (Python dogpile's test_lock.py) ------------

    describe("Lock", function()
        it("returns a fresh value without touching the mutex or the creator", function()
            local s = slot("v", FRESH)
            local m = mock_mutex()
            local creator = counted(function() return "new", C.dp_clock_now() end)
            local lock = dogpile.Lock.new(m, creator, s.value_fn, EXPIRE)
            assert.are.equal(1, select("#", lock:enter()), "enter() returns the value alone")
            assert.are.equal("v", lock:enter())
            assert.are.equal(0, creator.calls)
            assert.are.same({ 0, 0, 0 }, { m.tries, m.waits, m.releases })
        end)

        it("creates a missing value once under the mutex and returns it alone", function()
            local s = slot()
            local m = mock_mutex()
            local creator = counted(function()
                assert.is_true(m.held, "the creator runs under the mutex")
                s.put("new")
                return "new", s.ct
            end)
            local lock = dogpile.Lock.new(m, creator, s.value_fn, EXPIRE)
            assert.are.equal(1, select("#", lock:enter()))
            assert.are.equal(1, creator.calls)
            assert.are.equal("new", s.value)
            assert.are.equal(0, m.waits)
            assert.are.equal(m.tries + m.waits, m.releases, "every acquisition is released")
            assert.is_false(m.held)
        end)

        it("accepts error(NeedRegenerationException()) as well", function()
            local m = mock_mutex()
            local creator = counted(function() return "new", C.dp_clock_now() end)
            local value_fn = function() error(NeedRegen()) end
            assert.are.equal("new", dogpile.Lock.new(m, creator, value_fn, EXPIRE):enter())
            assert.are.equal(1, creator.calls)
            assert.is_false(m.held)
        end)

        it("missing value, mutex busy: waits, re-reads, and does not create what another made",
           function()
            local s = slot()
            local m = mock_mutex(true, function() s.put("theirs") end)
            local creator = counted(function() return "mine", C.dp_clock_now() end)
            local v = dogpile.Lock.new(m, creator, s.value_fn, EXPIRE):enter()
            assert.are.equal("theirs", v)
            assert.are.equal(0, creator.calls)
            assert.are.equal(1, m.waits, "a caller with no value waits for the mutex")
            assert.are.equal(1, m.releases)
            assert.is_false(m.held)
            assert.are.equal(2, s.value_fn.calls, "value_fn is read again after the wait")
        end)

        it("missing value, mutex busy, still missing after the wait: creates once", function()
            local s = slot()
            local m = mock_mutex(true, function() end)
            local creator = counted(function()
                s.put("mine")
                return "mine", s.ct
            end)
            assert.are.equal("mine", dogpile.Lock.new(m, creator, s.value_fn, EXPIRE):enter())
            assert.are.equal(1, creator.calls)
            assert.are.equal(1, m.waits)
            assert.are.equal(1, m.releases)
            assert.is_false(m.held)
        end)

        describe("a mutex with wait_unlocked", function()
            -- mock_mutex plus wait_unlocked: the holder (busy) does `on_wait`
            -- and lets go; the caller is not given the mutex.
            local function waiting_mutex(on_wait)
                local m = mock_mutex(true)
                m.unlocked_waits = 0
                function m:wait_unlocked()
                    self.unlocked_waits = self.unlocked_waits + 1
                    assert(not self.held, "mock mutex: wait_unlocked by its own holder")
                    if on_wait then
                        on_wait()
                    end
                    self.busy = false
                    return true
                end
                return m
            end

            it("missing value, mutex busy: waits for the release and reads, never taking the mutex",
               function()
                local s = slot()
                local m = waiting_mutex(function() s.put("theirs") end)
                local creator = counted(function() return "mine", C.dp_clock_now() end)
                assert.are.equal("theirs", dogpile.Lock.new(m, creator, s.value_fn, EXPIRE):enter())
                assert.are.equal(0, creator.calls)
                assert.are.equal(1, m.unlocked_waits)
                assert.are.equal(1, m.tries)
                assert.are.equal(0, m.waits, "the mutex is not taken to read the new value")
                assert.are.equal(0, m.releases)
                assert.are.equal(2, s.value_fn.calls)
            end)

            it("still missing after the release (the holder failed): takes the mutex, reads "
               .. "again under it and creates once", function()
                local s = slot()
                local m = waiting_mutex()
                local creator = counted(function()
                    s.put("mine")
                    return "mine", s.ct
                end)
                assert.are.equal("mine", dogpile.Lock.new(m, creator, s.value_fn, EXPIRE):enter())
                assert.are.equal(1, creator.calls)
                assert.are.equal(1, m.unlocked_waits)
                assert.are.equal(1, m.waits)
                assert.are.equal(1, m.releases)
                assert.is_false(m.held)
                assert.are.equal(3, s.value_fn.calls, "read after the release, then under the mutex")
            end)

            it("an expired value after the release is not served: the mutex decides", function()
                local s = slot()
                local m = waiting_mutex(function() s.put("old", C.dp_clock_now() - STALE) end)
                local creator = counted(function()
                    s.put("mine")
                    return "mine", s.ct
                end)
                assert.are.equal("mine", dogpile.Lock.new(m, creator, s.value_fn, EXPIRE):enter())
                assert.are.equal(1, creator.calls)
                assert.are.equal(1, m.waits)
                assert.is_false(m.held)
            end)

            it("a read error after the release propagates unchanged; nothing is released",
               function()
                local boom = { "backend down" }
                local calls = 0
                local value_fn = function()
                    calls = calls + 1
                    if calls == 1 then
                        error(NeedRegen)
                    end
                    error(boom)
                end
                local m = waiting_mutex()
                local creator = counted(function() return "new", C.dp_clock_now() end)
                local err = catch(function()
                    dogpile.Lock.new(m, creator, value_fn, EXPIRE):enter()
                end)
                assert.are.equal(boom, err)
                assert.are.equal(0, creator.calls)
                assert.are.equal(0, m.waits)
                assert.are.equal(0, m.releases)
                assert.is_false(m.held)
            end)

            it("is not used when there is a stale value to serve", function()
                local s = slot("old", STALE)
                local m = waiting_mutex()
                assert.are.equal("old", dogpile.Lock.new(m, function() end, s.value_fn,
                                                         EXPIRE):enter())
                assert.are.equal(0, m.unlocked_waits)
            end)
        end)

        it("expired value, mutex busy: returns the stale value at once", function()
            local s = slot("old", STALE)
            local m = mock_mutex(true, function() error("must not wait") end)
            local creator = counted(function() return "new", C.dp_clock_now() end)
            assert.are.equal("old", dogpile.Lock.new(m, creator, s.value_fn, EXPIRE):enter())
            assert.are.equal(0, creator.calls)
            assert.are.same({ 1, 0, 0 }, { m.tries, m.waits, m.releases })
        end)

        it("expired value, mutex free: creates once and returns the new value", function()
            local s = slot("old", STALE)
            local m = mock_mutex(false, function() error("must not wait") end)
            local creator = counted(function()
                assert.is_true(m.held)
                s.put("new")
                return "new", s.ct
            end)
            assert.are.equal("new", dogpile.Lock.new(m, creator, s.value_fn, EXPIRE):enter())
            assert.are.equal(1, creator.calls)
            assert.are.same({ 1, 0, 1 }, { m.tries, m.waits, m.releases })
        end)

        for _, case in ipairs({
            { "nil", nil }, { "-1", -1 }, { "-0.5", -0.5 },
        }) do
            it("expiretime " .. case[1] .. " never expires", function()
                local s = { value_fn = counted(function() return "ancient", 1 end) }
                local m = mock_mutex()
                local creator = counted(function() return "new", C.dp_clock_now() end)
                local v = dogpile.Lock.new(m, creator, s.value_fn, case[2]):enter()
                assert.are.equal("ancient", v)
                assert.are.equal(0, creator.calls)
                assert.are.same({ 0, 0, 0 }, { m.tries, m.waits, m.releases })
            end)
        end

        it("a positive expiretime does expire an old value", function()
            local m = mock_mutex()
            local creator = counted(function() return "new", C.dp_clock_now() end)
            local v = dogpile.Lock.new(m, creator, function() return "ancient", 1 end, 1e6):enter()
            assert.are.equal("new", v)
            assert.are.equal(1, creator.calls)
        end)

        describe("async_creator", function()
            it("gets the mutex, the caller gets the stale value, the lock does not release",
               function()
                local s = slot("old", STALE)
                local m = mock_mutex()
                local creator = counted(function() return "new", C.dp_clock_now() end)
                local got
                local async = counted(function(mutex)
                    got = mutex
                    assert.is_true(m.held, "the runner is handed a held mutex")
                end)
                local v = dogpile.Lock.new(m, creator, s.value_fn, EXPIRE, async):enter()
                assert.are.equal("old", v)
                assert.are.equal(1, async.calls)
                assert.are.equal(m, got)
                assert.are.equal(0, creator.calls, "the runner, not the lock, calls the creator")
                assert.are.equal(0, m.releases, "the lock leaves the release to the runner")
                assert.is_true(m.held)
                got:release() -- as the runner would, when done
                assert.is_false(m.held)
            end)

            it("is not used when the mutex is busy", function()
                local s = slot("old", STALE)
                local m = mock_mutex(true)
                local async = counted(function(mutex) mutex:release() end)
                local creator = counted(function() return "new", C.dp_clock_now() end)
                assert.are.equal("old",
                    dogpile.Lock.new(m, creator, s.value_fn, EXPIRE, async):enter())
                assert.are.equal(0, async.calls)
                assert.are.equal(0, creator.calls)
            end)

            it("is not used when there is no value: the creator runs in the caller", function()
                local s = slot()
                local m = mock_mutex()
                local async = counted(function(mutex) mutex:release() end)
                local creator = counted(function()
                    s.put("new")
                    return "new", s.ct
                end)
                assert.are.equal("new",
                    dogpile.Lock.new(m, creator, s.value_fn, EXPIRE, async):enter())
                assert.are.equal(0, async.calls)
                assert.are.equal(1, creator.calls)
                assert.are.equal(1, m.releases)
                assert.is_false(m.held)
            end)

            it("that raises: the error propagates unchanged and the mutex is released",
               function()
                local s = slot("old", STALE)
                local m = mock_mutex()
                local boom = { "async failed" }
                local async = counted(function() error(boom) end)
                local creator = counted(function() return "new", C.dp_clock_now() end)
                local err = catch(function()
                    dogpile.Lock.new(m, creator, s.value_fn, EXPIRE, async):enter()
                end)
                assert.are.equal(boom, err)
                assert.are.equal(1, async.calls)
                assert.are.equal(0, creator.calls)
                assert.is_false(m.held)
            end)
        end)

        describe("errors", function()
            local table_err = { "creator failed" }
            for _, case in ipairs({
                { "a table error, no value", function() error(table_err) end, nil, table_err },
                { "a table error, stale value", function() error(table_err) end, "old", table_err },
                { "a string error, no value", function() error("plain", 0) end, nil, "plain" },
                { "a string error, stale value", function() error("plain", 0) end, "old", "plain" },
            }) do
                it("a creator raising " .. case[1] .. " propagates unchanged, mutex released",
                   function()
                    local s = slot(case[3], STALE)
                    local m = mock_mutex()
                    local creator = counted(case[2])
                    local err = catch(function()
                        dogpile.Lock.new(m, creator, s.value_fn, EXPIRE):enter()
                    end)
                    assert.is_true(rawequal(case[4], err), "error changed: " .. tostring(err))
                    assert.are.equal(1, creator.calls)
                    assert.are.equal(1, m.releases)
                    assert.is_false(m.held)
                end)
            end

            it("a value_fn error other than NeedRegenerationException propagates", function()
                local boom = { "backend down" }
                local m = mock_mutex()
                local creator = counted(function() return "new", C.dp_clock_now() end)
                local err = catch(function()
                    dogpile.Lock.new(m, creator, function() error(boom) end, EXPIRE):enter()
                end)
                assert.are.equal(boom, err)
                assert.are.equal(0, creator.calls)
                assert.is_false(m.held)
            end)

            it("a value_fn error on the read under the mutex propagates, mutex released",
               function()
                local boom = { "backend down" }
                local calls = 0
                local value_fn = function()
                    calls = calls + 1
                    if calls == 1 then
                        error(NeedRegen)
                    end
                    error(boom)
                end
                local m = mock_mutex()
                local creator = counted(function() return "new", C.dp_clock_now() end)
                local err = catch(function()
                    dogpile.Lock.new(m, creator, value_fn, EXPIRE):enter()
                end)
                assert.are.equal(boom, err)
                assert.are.equal(2, calls)
                assert.are.equal(0, creator.calls)
                assert.are.equal(1, m.releases)
                assert.is_false(m.held)
            end)
        end)

        describe("argument errors", function()
            local ok_mutex = { acquire = function() return true end, release = function() end }
            local fn = function() end
            for _, case in ipairs({
                { "no mutex", nil, fn, fn, nil, nil, "mutex" },
                { "a number mutex", 42, fn, fn, nil, nil, "mutex" },
                { "a string mutex", "m", fn, fn, nil, nil, "mutex" },
                { "a mutex without methods", {}, fn, fn, nil, nil, "mutex" },
                { "a mutex without release", { acquire = fn }, fn, fn, nil, nil, "mutex" },
                { "a mutex without acquire", { release = fn }, fn, fn, nil, nil, "mutex" },
                { "a mutex whose acquire is no function", { acquire = 1, release = fn }, fn, fn,
                  nil, nil, "mutex" },
                { "a userdata mutex without methods", newproxy(false), fn, fn, nil, nil, "mutex" },
                { "no creator", ok_mutex, nil, fn, nil, nil, "creator" },
                { "a string creator", ok_mutex, "f", fn, nil, nil, "creator" },
                { "a table creator", ok_mutex, {}, fn, nil, nil, "creator" },
                { "no value_and_created_fn", ok_mutex, fn, nil, nil, nil, "value_and_created_fn" },
                { "a number value_and_created_fn", ok_mutex, fn, 3, nil, nil,
                  "value_and_created_fn" },
                { "a string expiretime", ok_mutex, fn, fn, "10", nil, "expiretime" },
                { "a boolean expiretime", ok_mutex, fn, fn, true, nil, "expiretime" },
                { "a table expiretime", ok_mutex, fn, fn, {}, nil, "expiretime" },
                { "a number async_creator", ok_mutex, fn, fn, 1, 5, "async_creator" },
            }) do
                it("Lock.new with " .. case[1] .. " raises 'dogpile:' at the caller's line",
                   function()
                    local line
                    local err = catch(function()
                        line = here(); dogpile.Lock.new(case[2], case[3], case[4], case[5], case[6])
                    end)
                    assert_user_error(err, line, case[7])
                end)
            end

            it("a value_and_created_fn without a created time raises 'dogpile:' at enter()",
               function()
                local m = mock_mutex()
                local lock = dogpile.Lock.new(m, function() end, function() return "v" end, EXPIRE)
                local line
                local err = catch(function()
                    line = here(); lock:enter()
                end)
                assert_user_error(err, line, "created_time")
                assert.is_false(m.held)
            end)

            it("a callable table is accepted as creator and value_and_created_fn", function()
                local creator = counted(function() return "new", C.dp_clock_now() end)
                local value_fn = counted(function() error(NeedRegen) end)
                local m = mock_mutex()
                assert.are.equal("new", dogpile.Lock.new(m, creator, value_fn, nil):enter())
                assert.are.equal(1, creator.calls)
            end)
        end)
    end)

    -- -- NameRegistry ---------------------------------------------------------------

    describe("NameRegistry", function()
        it("returns the one live object per id, passing extra arguments to the creator",
           function()
            local seen = {}
            local creator = counted(function(id, a, b)
                seen[#seen + 1] = { id, a, b }
                return { id = id }
            end)
            local reg = dogpile.NameRegistry.new(creator)
            local x1 = reg:get("x", 1, "two")
            local x2 = reg:get("x", 3, "four")
            local y = reg:get("y")
            assert.are.equal(x1, x2)
            assert.are_not.equal(x1, y)
            assert.are.equal(2, creator.calls)
            assert.are.same({ { "x", 1, "two" }, { "y" } }, seen)
        end)

        it("holds objects weakly: an unreferenced one is collected and made again", function()
            local creator = counted(function(id) return { id = id } end)
            local reg = dogpile.NameRegistry.new(creator)
            local probe = setmetatable({}, { __mode = "v" })
            probe[1] = reg:get("x")
            collectgarbage()
            collectgarbage()
            assert.is_nil(probe[1], "the registry kept an unreferenced object alive")
            local again = reg:get("x")
            assert.are.equal(2, creator.calls)
            assert.are.equal("x", again.id)
        end)

        it("keeps a referenced object across garbage collection", function()
            local creator = counted(function(id) return { id = id } end)
            local reg = dogpile.NameRegistry.new(creator)
            local keep = reg:get("x")
            collectgarbage()
            collectgarbage()
            assert.are.equal(keep, reg:get("x"))
            assert.are.equal(1, creator.calls)
        end)

        it("raises 'dogpile:' at the caller's line on a bad creator or a nil id", function()
            local line
            local err = catch(function()
                line = here(); dogpile.NameRegistry.new("nope")
            end)
            assert_user_error(err, line, "creator")
            local reg = dogpile.NameRegistry.new(function() return {} end)
            err = catch(function()
                line = here(); reg:get(nil)
            end)
            assert_user_error(err, line, "id")
        end)
    end)

    -- -- ReadWriteMutex ---------------------------------------------------------

    describe("ReadWriteMutex", function()
        local RW = dogpile.ReadWriteMutex

        it("lets readers share", function()
            local rw = RW.new()
            assert.is_true(rw:acquire_read_lock(false))
            assert.is_true(rw:acquire_read_lock(false))
            assert.is_true(rw:acquire_read_lock())
            rw:release_read_lock()
            rw:release_read_lock()
            rw:release_read_lock()
            assert.is_true(rw:acquire_write_lock(false), "all readers gone: a writer gets in")
            rw:release_write_lock()
        end)

        it("a writer excludes readers and other writers", function()
            local rw = RW.new()
            assert.is_true(rw:acquire_write_lock(false))
            assert.is_false(rw:acquire_read_lock(false))
            assert.is_false(rw:acquire_write_lock(false))
            rw:release_write_lock()
            assert.is_true(rw:acquire_read_lock(false))
            rw:release_read_lock()
        end)

        it("a reader excludes a writer, and a failed try leaves no claim behind", function()
            local rw = RW.new()
            assert.is_true(rw:acquire_read_lock(false))
            assert.is_false(rw:acquire_write_lock(false))
            assert.is_true(rw:acquire_read_lock(false), "readers are not blocked by a failed try")
            rw:release_read_lock()
            rw:release_read_lock()
            assert.is_true(rw:acquire_write_lock(false))
            rw:release_write_lock()
        end)

        it("release_write_lock by a coroutine that does not hold it raises 'dogpile:'",
           function()
            local rw = RW.new()
            local holder = coroutine.create(function()
                assert.is_true(rw:acquire_write_lock(false))
                coroutine.yield()
                rw:release_write_lock()
            end)
            assert(coroutine.resume(holder))
            local line
            local err = catch(function()
                line = here(); rw:release_write_lock()
            end)
            assert_user_error(err, line, "write lock")
            local other = coroutine.create(function()
                return pcall(rw.release_write_lock, rw)
            end)
            local _, ok = coroutine.resume(other)
            assert.is_false(ok, "another coroutine released the write lock")
            assert.is_false(rw:acquire_read_lock(false), "the write lock is still held")
            assert(coroutine.resume(holder))
            assert.are.equal("dead", coroutine.status(holder))
            assert.is_true(rw:acquire_read_lock(false))
            rw:release_read_lock()
        end)

        it("release_write_lock when nobody holds it raises 'dogpile:'", function()
            local rw = RW.new()
            local line
            local err = catch(function()
                line = here(); rw:release_write_lock()
            end)
            assert_user_error(err, line)
        end)

        it("one release_read_lock too many raises 'dogpile:'", function()
            local rw = RW.new()
            rw:acquire_read_lock()
            rw:release_read_lock()
            local line
            local err = catch(function()
                line = here(); rw:release_read_lock()
            end)
            assert_user_error(err, line, "release_read_lock")
            assert.is_true(rw:acquire_write_lock(false), "the count did not go negative")
            rw:release_write_lock()
        end)

        it("without a sleep function, a wait that would block forever raises", function()
            local rw = RW.new()
            assert.is_nil(dogpile.current_sleep())
            local writer = coroutine.create(function()
                rw:acquire_write_lock()
                coroutine.yield()
                rw:release_write_lock()
            end)
            assert(coroutine.resume(writer))
            local line
            local err = catch(function()
                line = here(); rw:acquire_read_lock()
            end)
            assert_user_error(err, line, "set_sleep")
            err = catch(function()
                line = here(); rw:acquire_write_lock()
            end)
            assert_user_error(err, line, "set_sleep")
            assert(coroutine.resume(writer))

            -- A writer waiting for a reader: raises, and gives its claim back.
            assert.is_true(rw:acquire_read_lock(false))
            local co = coroutine.create(function() return pcall(rw.acquire_write_lock, rw) end)
            local _, ok, werr = coroutine.resume(co)
            assert.is_false(ok)
            assert.is_truthy(tostring(werr):find("set_sleep", 1, true), tostring(werr))
            assert.is_true(rw:acquire_read_lock(false), "the failed writer left its claim")
            rw:release_read_lock()
            rw:release_read_lock()
            assert.is_true(rw:acquire_write_lock(false))
            rw:release_write_lock()
        end)

        it("with set_sleep, readers wait for a writer and share; a writer waits for readers",
           function()
            local sched = support.scheduler()
            dogpile.set_sleep(sched.sleep)
            local rw = RW.new()
            local log = {}
            local readers, max_readers, writing = 0, 0, 0
            local function note(what)
                log[#log + 1] = what
            end
            local function writer(name, hold)
                rw:acquire_write_lock()
                assert.are.equal(0, readers, name .. " writes while readers read")
                writing = writing + 1
                assert.are.equal(1, writing, "two writers at once")
                note(name .. "+")
                sched.sleep(hold)
                note(name .. "-")
                writing = writing - 1
                rw:release_write_lock()
            end
            local function reader(name, delay, hold)
                sched.sleep(delay)
                rw:acquire_read_lock()
                assert.are.equal(0, writing, name .. " reads while a writer writes")
                readers = readers + 1
                max_readers = math.max(max_readers, readers)
                note(name .. "+")
                sched.sleep(hold)
                note(name .. "-")
                readers = readers - 1
                rw:release_read_lock()
            end
            sched.spawn(writer, "W1", 0.05)
            sched.spawn(reader, "R1", 0.01, 0.2)
            sched.spawn(reader, "R2", 0.01, 0.2)
            -- W2 comes once the readers are in: it claims the writer slot and
            -- waits for them to leave.
            sched.spawn(function()
                sched.sleep(0.15)
                writer("W2", 0.01)
            end)
            sched.run()
            assert.are.equal(2, max_readers, "readers did not share")
            for i, e in ipairs(log) do
                log[i] = e:gsub("^R%d", "R")
            end
            assert.are.same({ "W1+", "W1-", "R+", "R+", "R-", "R-", "W2+", "W2-" }, log)
        end)

        it("with set_sleep, a writer waiting for readers keeps new readers out", function()
            local sched = support.scheduler()
            dogpile.set_sleep(sched.sleep)
            local rw = RW.new()
            local log = {}
            sched.spawn(function()
                rw:acquire_read_lock()
                log[#log + 1] = "R1+"
                sched.sleep(0.05)
                log[#log + 1] = "R1-"
                rw:release_read_lock()
            end)
            sched.spawn(function()
                sched.sleep(0.01)
                rw:acquire_write_lock()
                log[#log + 1] = "W+"
                sched.sleep(0.05)
                log[#log + 1] = "W-"
                rw:release_write_lock()
            end)
            sched.spawn(function()
                sched.sleep(0.02)
                assert.is_false(rw:acquire_read_lock(false), "a reader overtook a waiting writer")
                rw:acquire_read_lock()
                log[#log + 1] = "R2+"
                rw:release_read_lock()
            end)
            sched.run()
            assert.are.same({ "R1+", "R1-", "W+", "W-", "R2+" }, log)
        end)
    end)

    -- -- set_sleep -------------------------------------------------------------

    describe("set_sleep", function()
        for _, bad in ipairs({ "x", 42, true, {} }) do
            it("set_sleep(" .. type(bad) .. ") raises 'dogpile:' at the caller's line", function()
                local line
                local err = catch(function()
                    line = here(); dogpile.set_sleep(bad)
                end)
                assert_user_error(err, line, "set_sleep")
                assert.is_nil(dogpile.current_sleep(), "a refused function was kept")
            end)
        end

        it("sets the waiter's sleep and set_sleep(nil) restores the default", function()
            assert.is_nil(rawget(_G, "ngx"))
            assert.is_nil(dogpile.current_sleep(), "default outside nginx: no yielding sleep")
            local f = function() end
            dogpile.set_sleep(f)
            assert.are.equal(f, dogpile.current_sleep())
            dogpile.set_sleep(nil)
            assert.is_nil(dogpile.current_sleep())

            -- The default really is back: a wait that cannot end raises again.
            local m = dogpile.core_mutex(C.dp_lock_domain_new(), "k")
            assert.is_true(m:acquire(false))
            local err = catch(function() m:acquire() end)
            assert.is_truthy(err:find("set_sleep", 1, true), err)
            m:release()
        end)

        it("is what a waiting core mutex calls", function()
            local sched = support.scheduler()
            local sleeps = 0
            dogpile.set_sleep(function(s)
                sleeps = sleeps + 1
                sched.sleep(s)
            end)
            local domain = C.dp_lock_domain_new()
            local holder = dogpile.core_mutex(domain, "k")
            assert.is_true(holder:acquire(false))
            local got
            sched.spawn(function()
                got = dogpile.core_mutex(domain, "k"):acquire()
            end)
            sched.spawn(function()
                sched.sleep(0.05)
                holder:release()
            end)
            sched.run()
            assert.is_true(got)
            assert.is_true(sleeps > 0)
            dogpile.core_mutex(domain, "k"):release()
        end)
    end)

    -- -- The core's per-key mutex -------------------------------------------------

    describe("core_mutex", function()
        local function new_domain()
            return C.dp_lock_domain_new()
        end

        it("excludes a second mutex object of the same domain and key until released",
           function()
            local d = new_domain()
            local a, b = dogpile.core_mutex(d, "key"), dogpile.core_mutex(d, "key")
            assert.is_true(a:acquire(false))
            assert.is_false(b:acquire(false))
            assert.is_false(a:acquire(false), "not reentrant")
            local other_key, other_domain = dogpile.core_mutex(d, "key2"),
                                            dogpile.core_mutex(new_domain(), "key")
            assert.is_true(other_key:acquire(false), "another key is another lock")
            assert.is_true(other_domain:acquire(false), "another domain is another lock")
            other_key:release()
            other_domain:release()
            a:release()
            assert.is_true(b:acquire(false))
            b:release()
            assert.are.equal(0, tonumber(C.dp_lock_count()))
        end)

        it("a blocking acquire of a free lock returns true without a sleep function", function()
            local m = dogpile.core_mutex(new_domain(), "key")
            assert.is_true(m:acquire())
            m:release()
            assert.is_true(m:acquire(true))
            m:release()
        end)

        it("may be released by another coroutine than the one that acquired it", function()
            local d = new_domain()
            local co = coroutine.create(function()
                return dogpile.core_mutex(d, "key"):acquire(false)
            end)
            local _, got = coroutine.resume(co)
            assert.is_true(got)
            assert.is_false(dogpile.core_mutex(d, "key"):acquire(false))
            local rel = coroutine.create(function()
                dogpile.core_mutex(d, "key"):release()
            end)
            assert.is_true((coroutine.resume(rel)))
            assert.is_true(dogpile.core_mutex(d, "key"):acquire(false))
            dogpile.core_mutex(d, "key"):release()
        end)

        it("releasing a lock that is not held raises 'dogpile:' at the caller's line", function()
            local m = dogpile.core_mutex(new_domain(), "key")
            local line
            local err = catch(function()
                line = here(); m:release()
            end)
            assert_user_error(err, line, "not held")
            assert.is_true(m:acquire(false))
            m:release()
            err = catch(function()
                line = here(); m:release()
            end)
            assert_user_error(err, line, "not held")
        end)

        it("a blocking acquire of a lock this Lua state holds raises instead of deadlocking",
           function()
            local d = new_domain()
            local holder = dogpile.core_mutex(d, "key")
            assert.is_true(holder:acquire(false))
            local m = dogpile.core_mutex(d, "key")
            local line
            local err = catch(function()
                line = here(); m:acquire()
            end)
            assert_user_error(err, line, "set_sleep")
            -- From another coroutine, as a light thread would.
            local co = coroutine.create(function() return pcall(m.acquire, m, true) end)
            local _, ok, cerr = coroutine.resume(co)
            assert.is_false(ok)
            assert.is_truthy(tostring(cerr):find("set_sleep", 1, true), tostring(cerr))
            assert.is_false(m:acquire(false), "the holder still holds it")
            holder:release()
            assert.is_true(m:acquire(false))
            m:release()
        end)

        it("with set_sleep, a blocking acquire yields until another coroutine releases",
           function()
            local sched = support.scheduler()
            dogpile.set_sleep(sched.sleep)
            local d = new_domain()
            local log = {}
            sched.spawn(function()
                assert.is_true(dogpile.core_mutex(d, "key"):acquire())
                log[#log + 1] = "A+"
                sched.sleep(0.05)
                log[#log + 1] = "A-"
                dogpile.core_mutex(d, "key"):release()
            end)
            sched.spawn(function()
                assert.is_true(dogpile.core_mutex(d, "key"):acquire())
                log[#log + 1] = "B+"
                dogpile.core_mutex(d, "key"):release()
            end)
            sched.run()
            assert.are.same({ "A+", "A-", "B+" }, log)
        end)
    end)

    -- -- Many coroutines, one key (the issue's test) -----------------------------

    describe("200 coroutines and one key", function()
        local N = 200
        local CREATOR_SLEEPS = 3

        -- Runs `get()` in N coroutines under one scheduler, with set_sleep
        -- pointing at it. Returns each coroutine's result and how many times it
        -- slept, and the creator's coroutine. `make(sleep)` returns `get` and is
        -- handed the sleep the creator must use.
        local function stampede(make)
            local sched = support.scheduler()
            local slept = {}
            local function sleep(s)
                local co = coroutine.running()
                slept[co] = (slept[co] or 0) + 1
                return sched.sleep(s)
            end
            dogpile.set_sleep(sleep)
            local get = make(sleep)
            local results, sleeps, cos, done_at = {}, {}, {}, {}
            for i = 1, N do
                cos[i] = sched.spawn(function()
                    results[i] = get()
                    done_at[i] = sched.now
                end)
            end
            sched.run()
            for i = 1, N do
                sleeps[i] = slept[cos[i]] or 0
            end
            return results, sleeps, cos, done_at
        end

        local function yielding_creator(sleep, value, store)
            return counted(function()
                for _ = 1, CREATOR_SLEEPS do
                    sleep(0.01)
                end
                if store then
                    store(value)
                end
                return value, C.dp_clock_now()
            end)
        end

        local function assert_created_once(creator, results, value)
            assert.are.equal(1, creator.calls, "the creator must run exactly once")
            for i = 1, N do
                assert.are.equal(value, results[i], "coroutine " .. i .. " got another value")
            end
        end

        local function assert_stale_at_once(results, sleeps, done_at, old, new)
            -- The first coroutine takes the lock and creates; the others must
            -- have got the stale value without sleeping at all.
            assert.are.equal(new, results[1])
            assert.are.equal(CREATOR_SLEEPS, sleeps[1])
            local slow = {}
            for i = 2, N do
                assert.are.equal(old, results[i], "coroutine " .. i .. " did not get the stale value")
                if sleeps[i] ~= 0 or done_at[i] ~= 0 then
                    slow[#slow + 1] = i
                end
            end
            assert.are.same({}, slow, "coroutines that waited instead of taking the stale value")
        end

        describe("through Lock and core_mutex", function()
            local function make_lock_get(store, creator)
                local domain = C.dp_lock_domain_new()
                local function value_fn()
                    local e = store.k
                    if not e then
                        error(NeedRegen)
                    end
                    return e.v, e.ct
                end
                return function()
                    return dogpile.Lock.new(dogpile.core_mutex(domain, "k"), creator, value_fn,
                                            EXPIRE):enter()
                end
            end

            it("missing: the creator runs once, every coroutine gets its value", function()
                local store, creator = {}, nil
                local new = { "new" }
                local results, sleeps = stampede(function(sleep)
                    creator = yielding_creator(sleep, new, function(v)
                        store.k = { v = v, ct = C.dp_clock_now() }
                    end)
                    return make_lock_get(store, creator)
                end)
                assert_created_once(creator, results, new)
                assert.are.equal(CREATOR_SLEEPS, sleeps[1])
                assert.is_true(sleeps[2] > 0, "a coroutine with no value must wait")
            end)

            it("missing: the waiters read after the release, none takes the lock in turn",
               function()
                local mt = getmetatable(dogpile.core_mutex(C.dp_lock_domain_new(), "k"))
                local acquire, blocking = mt.acquire, 0
                mt.acquire = function(self, wait)
                    if wait ~= false then
                        blocking = blocking + 1
                    end
                    return acquire(self, wait)
                end
                local store, creator = {}, nil
                local new = { "new" }
                local ok, err = pcall(function()
                    local results = stampede(function(sleep)
                        creator = yielding_creator(sleep, new, function(v)
                            store.k = { v = v, ct = C.dp_clock_now() }
                        end)
                        return make_lock_get(store, creator)
                    end)
                    assert_created_once(creator, results, new)
                end)
                mt.acquire = acquire
                assert(ok, err)
                assert.are.equal(0, blocking, "blocking acquires")
                assert.are.equal(0, C.dp_lock_count())
            end)

            it("expired: the creator runs once, the 199 others get the stale value at once",
               function()
                local old, new = { "old" }, { "new" }
                local store = { k = { v = old, ct = C.dp_clock_now() - STALE } }
                local creator
                local results, sleeps, _, done_at = stampede(function(sleep)
                    creator = yielding_creator(sleep, new, function(v)
                        store.k = { v = v, ct = C.dp_clock_now() }
                    end)
                    return make_lock_get(store, creator)
                end)
                assert.are.equal(1, creator.calls)
                assert_stale_at_once(results, sleeps, done_at, old, new)
                assert.are.equal(new, store.k.v)
            end)

            it("a creator that fails after yielding: one waiter takes over, then all share",
               function()
                local store, new = {}, { "new" }
                local boom = { "first creation failed" }
                local sched = support.scheduler()
                dogpile.set_sleep(sched.sleep)
                local creator = counted(function()
                    sched.sleep(0.01)
                    if store.failed == nil then
                        store.failed = true
                        error(boom)
                    end
                    store.k = { v = new, ct = C.dp_clock_now() }
                    return new, store.k.ct
                end)
                local get = make_lock_get(store, creator)
                local results = {}
                for i = 1, 5 do
                    sched.spawn(function()
                        local ok, v = pcall(get)
                        results[i] = ok and v or { err = v }
                    end)
                end
                sched.run()
                assert.are.equal(2, creator.calls)
                assert.are.same({ err = boom }, results[1])
                assert.are.equal(boom, results[1].err)
                for i = 2, 5 do
                    assert.are.equal(new, results[i])
                end
            end)
        end)

        describe("through a dogpile.cache region", function()
            local cache = require "dogpile.cache"

            local function memory_region()
                return cache.make_region():configure("dogpile.cache.memory",
                                                     { expiration_time = 1 })
            end

            it("missing: the creator runs once, every coroutine gets its value", function()
                local r = memory_region()
                local new = { "new" }
                local creator
                local results, sleeps = stampede(function(sleep)
                    creator = yielding_creator(sleep, new)
                    return function() return r:get_or_create("k", creator) end
                end)
                assert_created_once(creator, results, new)
                assert.are.equal(CREATOR_SLEEPS, sleeps[1])
                assert.are.equal(new, r:get("k"))
                assert.are.equal(1, r:stats().creations)
            end)

            it("expired: the creator runs once, the 199 others get the stale value at once",
               function()
                local r = memory_region()
                local old, new = { "old" }, { "new" }
                assert.are.equal(old, r:get_or_create("k", function() return old end, 0.05))
                C.dp_clock_sleep(0.1)
                local creator
                local results, sleeps, _, done_at = stampede(function(sleep)
                    creator = yielding_creator(sleep, new)
                    return function() return r:get_or_create("k", creator, 0.05) end
                end)
                assert.are.equal(1, creator.calls)
                assert_stale_at_once(results, sleeps, done_at, old, new)
                assert.are.equal(new, r:get("k"))
                local st = r:stats()
                assert.are.equal(2, st.creations)
                assert.are.equal(N - 1, st.stale_served)
            end)
        end)
    end)
end)

-- -- The per-state context ----------------------------------------------------------

describe("dogpile.context (what belongs to this Lua state)", function()
    support.no_leaks()
    local context = require "dogpile.context"
    local cache = require "dogpile.cache"

    it("holds the sleep that dogpile.set_sleep sets, as every module sees it", function()
        local function my_sleep() end
        dogpile.set_sleep(my_sleep)
        finally(function() dogpile.set_sleep(nil) end)
        assert.are.equal(my_sleep, context.sleep())
        assert.are.equal(my_sleep, dogpile.current_sleep())
        dogpile.set_sleep(nil)
        assert.is_nil(context.sleep())
        assert.is_nil(dogpile.current_sleep())
    end)

    it("holds the logger that cache.set_logger sets; the region module's log names it too", function()
        local region_mod = require "dogpile.cache.region"
        local saved = context.logger()
        finally(function() context.set_logger(saved) end)
        local lines = {}
        local function logger(msg) lines[#lines + 1] = msg end
        cache.set_logger(logger)
        assert.are.equal(logger, context.logger())
        assert.are.equal(logger, region_mod.log)
        -- A region's fail_open line goes there.
        cache.register_backend("test.ctx_down", function()
            return { get = function() error("down", 0) end, set = function() end,
                     delete = function() end }
        end)
        local r = cache.make_region():configure("test.ctx_down", { fail_open = true })
        assert.are.equal(cache.NO_VALUE, r:get("k"))
        assert.are.equal(1, #lines)
        assert.truthy(lines[1]:find("down", 1, true))
        -- Code that assigns the region module's log (written when the logger
        -- lived there) still sets the state's logger.
        local other = function() end
        region_mod.log = other
        assert.are.equal(other, context.logger())
        context.set_logger(nil)
        assert.is_function(context.logger())
        assert.are_not.equal(other, context.logger())
    end)

    it("owns this state's locks: a lock taken through a region carries its owner tag", function()
        assert.is_number(context.OWNER)
        assert.is_nil(lib.OWNER, "the owner tag lives in dogpile.context only")
        local r = cache.make_region():configure("dogpile.cache.memory")
        local m = r:_mutex("k")
        assert.is_true(m:acquire(false))
        local owner = require("ffi").new("uint32_t[1]")
        assert.are.equal(1, C.dp_lock_held(m.domain, "k", 1, owner))
        assert.are.equal(context.OWNER, owner[0])
        m:release()
    end)
end)
