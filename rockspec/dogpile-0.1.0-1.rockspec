-- LuaRocks drives meson (build.type = "command"). From a checkout, offline:
--   luarocks --lua-version 5.1 make rockspec/dogpile-0.1.0-1.rockspec
-- (add --tree DIR for a private tree; `luarocks test` runs the busted specs).
-- The meson build dir is _build/rock, or $DOGPILE_BUILDDIR when set; the
-- optional backends (lmdb, redis, memcached) are meson `auto` features, built
-- when pkg-config finds their libraries.
--
-- Where the files go: Lua modules in $(LUADIR), C modules in $(LIBDIR) (both
-- deployed by LuaRocks into the tree's share/lua/5.1 and lib/lua/5.1).
-- libdogpile.so, the core every C module links, goes in the rock's own
-- directory ($(PREFIX)/clib): LuaRocks leaves that directory in place, so the
-- modules' RUNPATH (prefix/libdir) keeps finding it; the header and dogpile.pc
-- stay in the rock directory too ($(PREFIX)/include, $(PREFIX)/clib/pkgconfig).
rockspec_format = "3.0"
package = "dogpile"
version = "0.1.0-1"
source = {
   -- `luarocks make` builds the checkout it runs in and fetches nothing.
   url = "git+https://example.invalid/dogpile-lua.git",
   tag = "v0.1.0",
}
description = {
   summary = "Caching with dogpile locking for LuaJIT (a port of Python's dogpile.cache)",
   detailed = [[
Regions with a per-key dogpile lock around value creation, a C core
(libdogpile: lock registry, clock, value codec) and backends: memory,
shared_memory (cross-state, in C), lmdb, redis, memcached, ngx.shared.
]],
   license = "MIT",
   labels = { "cache", "luajit", "dogpile" },
}
dependencies = {
   "lua ~> 5.1",  -- LuaJIT; nothing to fetch
}
external_dependencies = {
   LUAJIT = { header = "luajit-2.1/luajit.h" },
   LIBUV = { header = "uv.h", library = "uv" },
}
build = {
   type = "command",
   build_command = [[
set -e
B="${DOGPILE_BUILDDIR:-_build/rock}"
set -- --prefix="$(PREFIX)" --libdir=clib -Dlmod_dir="$(LUADIR)" -Dcmod_dir="$(LIBDIR)" \
   -Dtests=false -Dbuildtype=release
if [ -f "$B/build.ninja" ]; then meson configure "$B" "$@"; else meson setup "$B" "$@"; fi
ninja -C "$B" ${DOGPILE_JOBS:+-j"$DOGPILE_JOBS"}
]],
   install_command = [[meson install -C "${DOGPILE_BUILDDIR:-_build/rock}" --no-rebuild]],
}
-- `luarocks test` runs busted with the repository's .busted (the specs
-- against _build/main-stage: run `bash .ci/quickstart` first). LuaRocks wants
-- busted installed as a rock for it; offline, run `busted` from the root.
test = {
   type = "busted",
}
