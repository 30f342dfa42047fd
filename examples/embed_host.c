/* embed_host.c -- the smallest C host of the README's "Embedding in a C host":
 * two Lua states in one process open dogpile from where `meson install` put
 * it, share a `shared_memory` region, and meet one lock per key: the value
 * state A creates is the one state B gets, and B's creator never runs.
 * spec/embed_spec.lua builds it against an install into a temporary prefix,
 * linked as the README says, and runs it. Exit status 0 when all holds. */
#include <stdio.h>
#include <string.h>

#include "dogpile.h"
#include "dogpile_lua.h"

static const char *const CHUNK =
    "local made = ...\n"
    "local cache = require 'dogpile.cache'\n"
    "local region = cache.make_region({ name = 'players' }):configure(\n"
    "    'dogpile.cache.shared_memory', { arguments = { name = 'embed_host', max_items = 100 } })\n"
    "local calls = 0\n"
    "local v = region:get_or_create('player:1', function() calls = calls + 1 return made end)\n"
    "return v, calls\n";

/* Runs CHUNK in `L` with the creator's value `made`: the value got and how
 * many times this state's creator ran, or -1 with the error printed. */
static int run(lua_State *L, const char *made, char *got, size_t cap)
{
    if (luaL_loadstring(L, CHUNK) != 0 || (lua_pushstring(L, made), lua_pcall(L, 1, 2, 0)) != 0) {
        fprintf(stderr, "embed_host: %s\n", lua_tostring(L, -1));
        return -1;
    }
    snprintf(got, cap, "%s", lua_tostring(L, -2));
    int calls = (int)lua_tointeger(L, -1);
    lua_pop(L, 2);
    return calls;
}

int main(void)
{
    lua_State *states[2];
    for (int i = 0; i < 2; i++) {
        lua_State *L = luaL_newstate();
        luaL_openlibs(L);
        if (dp_lua_open(L, DP_LUA_DIR, DP_CMOD_DIR) != 0) { /* requires dogpile, dogpile.cache */
            fprintf(stderr, "embed_host: %s\n", lua_tostring(L, -1));
            return 1;
        }
        states[i] = L;
    }
    char a[64], b[64];
    int ca = run(states[0], "made by A", a, sizeof a);
    int cb = run(states[1], "made by B", b, sizeof b);
    for (int i = 0; i < 2; i++)
        lua_close(states[i]);
    dp_shutdown();
    printf("A: %s (creator calls %d), B: %s (creator calls %d)\n", a, ca, b, cb);
    return ca == 1 && cb == 0 && strcmp(a, "made by A") == 0 && strcmp(b, a) == 0 ? 0 : 1;
}
