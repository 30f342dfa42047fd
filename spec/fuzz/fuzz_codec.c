/* fuzz_codec.c -- libFuzzer target for the value codec's decoder.
 *
 * Every input is decoded by the Lua binding (codec.decode) inside one LuaJIT
 * state. Bad bytes must give nil, err; bytes that decode must give a value
 * that encodes without error, whose encoding decodes again to an equal value
 * and re-encodes to the same length (encoding lengths do not depend on table
 * order). Any other outcome aborts, which libFuzzer reports as a crash.
 *
 * The state allocates with malloc, so AddressSanitizer sees every block:
 * Lua's and the codec's buffer alike. Run it with -detect_leaks=0: LuaJIT
 * (GC64) keeps NaN-tagged pointers that LeakSanitizer cannot follow, so live
 * tables would be reported as leaks. The codec's memory is leak-checked by
 * spec/c/test_codec.c instead, through a counting allocator.
 *
 * Build and run: bash .ci/fuzz [seconds]; or by hand:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Icore \
 *     $(pkg-config --cflags luajit) spec/fuzz/fuzz_codec.c core/codec.c \
 *     core/lua_codec.c core/clock.c $(pkg-config --libs luajit) -lm -o fuzz_codec
 *   ./fuzz_codec -detect_leaks=0 -max_total_time=30 corpus/ spec/fuzz/corpus/
 * Reproduce a crash: ./fuzz_codec crash-<sha1>
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "dogpile.h"

int luaopen_dogpile_codec(lua_State *L);

static const char check_src[] =
    "local codec = ...\n"
    "local function same(a, b)\n"
    "  if type(a) ~= type(b) then return false end\n"
    "  if type(a) == 'number' then\n"
    "    if a ~= a then return b ~= b end\n"
    "    return a == b and (a ~= 0 or 1 / a == 1 / b)\n"
    "  end\n"
    "  if type(a) ~= 'table' then return a == b end\n"
    /* Plain keys compare their values deeply; table keys (fresh tables on
     * each decode, so not findable by identity) are only counted. */
    "  local n, tk = 0, 0\n"
    "  for k, v in pairs(a) do\n"
    "    if type(k) == 'table' then tk = tk + 1\n"
    "    else n = n + 1; if not same(v, rawget(b, k)) then return false end end\n"
    "  end\n"
    "  for k in pairs(b) do\n"
    "    if type(k) == 'table' then tk = tk - 1 else n = n - 1 end\n"
    "  end\n"
    "  return n == 0 and tk == 0\n"
    "end\n"
    "return function(bytes)\n"
    "  local v, err = codec.decode(bytes)\n"
    "  if err ~= nil then\n"
    "    assert(v == nil and type(err) == 'string' and err:sub(1, 15) == 'dogpile.codec: ',\n"
    "           'a refusal is nil, err')\n"
    "    return\n"
    "  end\n"
    "  local s = codec.encode(v)\n"
    "  local w, err2 = codec.decode(s)\n"
    "  assert(err2 == nil, 'the re-encoding does not decode: ' .. tostring(err2))\n"
    "  assert(same(v, w), 'the re-encoding decodes to another value')\n"
    "  assert(#codec.encode(w) == #s, 'a second re-encoding has another length')\n"
    "end\n";

static lua_State *L;
static unsigned long runs;

static void *fuzz_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    (void)ud;
    (void)osize;
    if (nsize == 0) {
        free(ptr);
        return NULL;
    }
    return realloc(ptr, nsize);
}

static void setup(void)
{
    L = lua_newstate(fuzz_alloc, NULL);
    if (!L) {
        fprintf(stderr, "fuzz_codec: lua_newstate failed (a GC64 LuaJIT is needed)\n");
        abort();
    }
    luaL_openlibs(L);
    if (luaL_loadbuffer(L, check_src, sizeof check_src - 1, "=fuzz_check") != 0) {
        fprintf(stderr, "fuzz_codec: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_pushcfunction(L, luaopen_dogpile_codec);
    lua_call(L, 0, 1);
    lua_call(L, 1, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "fuzz_check");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!L)
        setup();
    lua_getfield(L, LUA_REGISTRYINDEX, "fuzz_check");
    lua_pushlstring(L, (const char *)data, size);
    if (lua_pcall(L, 1, 0, 0) != 0) {
        fprintf(stderr, "fuzz_codec: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_settop(L, 0);
    if (++runs % 4096 == 0)
        lua_gc(L, LUA_GCCOLLECT, 0);
    return 0;
}
