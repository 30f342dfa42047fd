/* lua_core.c -- the `dogpile.core` Lua C module.
 *
 * Its one job is cold: tell the Lua side where the core library was loaded
 * from, so that lua/dogpile/lib.lua can ffi.load() that very file and bind the
 * hot functions through the FFI. Lua loads C modules with RTLD_LOCAL, so the
 * core's symbols are not in ffi.C; loading the same path again returns the
 * handle the dynamic linker already has, hence one copy of the process-wide
 * state.
 */
#define _GNU_SOURCE
#include <dlfcn.h>

#include <lauxlib.h>
#include <lua.h>

#include "dogpile.h"

int luaopen_dogpile_core(lua_State *L);

__attribute__((visibility("default"))) int luaopen_dogpile_core(lua_State *L)
{
    Dl_info info;
    if (!dladdr((void *)dp_version, &info) || !info.dli_fname)
        return luaL_error(L, "dogpile: cannot locate the core library (dladdr failed)");
    lua_createtable(L, 0, 2);
    lua_pushstring(L, info.dli_fname);
    lua_setfield(L, -2, "library_path");
    lua_pushstring(L, dp_version());
    lua_setfield(L, -2, "version");
    return 1;
}
