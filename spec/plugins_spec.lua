-- Plugins: a backend name that is not registered is required as a Lua module
-- (third-party backends installed as rocks), and the Cosmo template cache.
local cache = require "dogpile.cache"
local support = require "support"

local here = debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$") or "."
package.path = here .. "/fixtures/?.lua;" .. package.path

describe("third-party backends by module name", function()
    support.no_leaks()

    it("configures a backend module by its name, without register_backend", function()
        local mod = require "thirdparty.cache.backend"
        local before = mod.made
        local r = cache.make_region():configure("thirdparty.cache.backend",
                                                { arguments = { answer = 42 } })
        assert.are.equal(before + 1, mod.made)
        assert.are.equal(42, r.actual_backend.arguments.answer)
        assert.are.equal(cache.NO_VALUE, r:get("k"))
        local calls = 0
        assert.are.equal("v", r:get_or_create("k", function() calls = calls + 1; return "v" end))
        assert.are.equal("v", r:get_or_create("k", function() calls = calls + 1; return "w" end))
        assert.are.equal(1, calls)
        assert.are.equal("v", r.actual_backend.store.k.payload)
        r:delete("k")
        assert.are.equal(cache.NO_VALUE, r:get("k"))
    end)

    it("accepts a module that returns a bare factory", function()
        local r = cache.make_region():configure("thirdparty.cache.factory")
        r:set("a", 1)
        assert.are.equal(1, r:get("a"))
    end)

    it("works from a regions config", function()
        local regions = cache.load_regions({
            tp = { backend = "thirdparty.cache.backend", expiration_time = 10 },
        })
        regions.tp:set("x", { 1, 2 })
        assert.are.same({ 1, 2 }, regions.tp:get("x"))
    end)

    it("reports an unknown backend when no module of that name exists", function()
        local err = support.raises_here("dogpile.cache: unknown backend 'no.such.backend'", function() cache.make_region():configure("no.such.backend") end,
            "registered backends", "dogpile.cache.memory", "no Lua module 'no.such.backend'")
        assert.is_nil(err:find("not found:", 1, true), "the require search list is not shown")
    end)

    it("reports the module's own error when loading it fails", function()
        support.raises_here("dogpile.cache: backend 'thirdparty.cache.broken': loading module", function() cache.make_region():configure("thirdparty.cache.broken") end,
            "missing configuration")
        -- A module that exists but needs one that does not is not "unknown".
        support.raises_here("dogpile.cache: backend 'thirdparty.cache.needs_missing': loading module", function() cache.make_region():configure("thirdparty.cache.needs_missing") end,
            "thirdparty.not.installed")
    end)

    it("prefers a registered backend over a module of the same name", function()
        local made = 0
        cache.register_backend("thirdparty.cache.backend.alias", function()
            made = made + 1
            return require("thirdparty.cache.backend").new({})
        end)
        cache.make_region():configure("thirdparty.cache.backend.alias")
        assert.are.equal(1, made)
    end)
end)

local has_cosmo = pcall(require, "cosmo")

describe("dogpile.cache.plugins.cosmo", function()
    support.no_leaks()

    if not has_cosmo then
        it("needs lua-cosmo", function() error("lua-cosmo is not installed (Debian package lua-cosmo; .ci/test installs it)", 0) end)
        return
    end

    local cosmo_cache = require "dogpile.cache.plugins.cosmo"

    it("renders once per key and serves the cached output", function()
        local r = cache.make_region():configure("dogpile.cache.memory")
        local pages = cosmo_cache.new(r, { namespace = "page" })
        local renders = 0
        local env = { name = function() renders = renders + 1; return "Ada" end }
        assert.are.equal("<h1>Ada</h1>", pages:fill("user:1", "<h1>$name</h1>", env))
        assert.are.equal("<h1>Ada</h1>", pages:fill("user:1", "<h1>$name</h1>", env))
        assert.are.equal(1, renders)
        assert.are.equal("<h1>Ada</h1>", r:get("page:user:1"))
        assert.are.equal("<h1>Ada</h1>", pages:get("user:1"))
        pages:invalidate("user:1")
        assert.are.equal(cache.NO_VALUE, pages:get("user:1"))
        assert.are.equal("<h1>Ada</h1>", pages:fill("user:1", "<h1>$name</h1>", env))
        assert.are.equal(2, renders)
    end)

    it("renders lists with Cosmo's selectors and caches in a serializing backend", function()
        local r = cache.make_region():configure("dogpile.cache.shared_memory",
                                                { arguments = { name = "plugins-cosmo-spec" } })
        local pages = cosmo_cache.new(r, { expiration_time = 60 })
        local out = pages:fill("list", "$items[[<li>$it</li>]]",
                               { items = { { it = "a" }, { it = "b" } } })
        assert.are.equal("<li>a</li><li>b</li>", out)
        assert.are.equal(out, r:get("cosmo:list"))
    end)

    it("honours an expiration time", function()
        local r = cache.make_region():configure("dogpile.cache.memory")
        local pages = cosmo_cache.new(r)
        local n = 0
        local env = { n = function() n = n + 1; return n end }
        assert.are.equal("1", pages:fill("k", "$n", env, 0.05))
        assert.are.equal("1", pages:fill("k", "$n", env, 0.05))
        require("dogpile.lib").C.dp_clock_sleep(0.1)
        assert.are.equal("2", pages:fill("k", "$n", env, 0.05))
    end)

    it("rejects bad arguments at the caller's line", function()
        local r = cache.make_region():configure("dogpile.cache.memory")
        support.raises_here("dogpile.cache.plugins.cosmo: new expects a cache region", function() cosmo_cache.new("nope") end)
        support.raises_here("dogpile.cache.plugins.cosmo: fill: key must be a string", function() cosmo_cache.new(r):fill(1, "x") end)
    end)
end)
