/* waiters_threads.c -- a minimal threaded Lua host for bench/waiters.lua.
 *
 *   waiters_threads <script> <nthreads> <reps> [extra args...]
 *
 * Starts `nthreads` threads, each with its own Lua state (luaL_openlibs). In
 * each, `script` runs once with the global `arg` = {thread index (0-based),
 * nthreads, extra args...} and must return a function. Then, `reps` times,
 * every thread meets the others at a barrier and calls that function with
 * the repetition number (1-based); the string it returns is printed after
 * all threads are done, as "<rep> <thread> <string>" lines. The Lua states
 * load dogpile through LUA_PATH/LUA_CPATH, as a game server's states would,
 * and share the process-wide core (the per-key lock, shared_memory).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#define MAX_THREADS 64

static const char *script;
static int nthreads, reps, nextra;
static char **extra;
static pthread_barrier_t barrier;
static char *results[MAX_THREADS][256];

static void *run(void *p)
{
    int idx = (int)(long)p;
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_newtable(L);
    lua_pushinteger(L, idx);
    lua_rawseti(L, -2, 1);
    lua_pushinteger(L, nthreads);
    lua_rawseti(L, -2, 2);
    for (int i = 0; i < nextra; i++) {
        lua_pushstring(L, extra[i]);
        lua_rawseti(L, -2, 3 + i);
    }
    lua_setglobal(L, "arg");
    int ok = luaL_loadfile(L, script) == 0 && lua_pcall(L, 0, 1, 0) == 0 && lua_isfunction(L, -1);
    if (!ok)
        fprintf(stderr, "waiters_threads: thread %d: %s\n", idx,
                lua_isstring(L, -1) ? lua_tostring(L, -1) : "the script must return a function");
    for (int r = 1; r <= reps; r++) {
        pthread_barrier_wait(&barrier);
        if (!ok)
            continue;
        lua_pushvalue(L, -1);
        lua_pushinteger(L, r);
        if (lua_pcall(L, 1, 1, 0) != 0) {
            fprintf(stderr, "waiters_threads: thread %d: %s\n", idx, lua_tostring(L, -1));
            results[idx][r - 1] = strdup("error");
        } else {
            const char *s = lua_tostring(L, -1);
            results[idx][r - 1] = strdup(s ? s : "nil");
        }
        lua_pop(L, 1);
    }
    lua_close(L);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: waiters_threads <script> <nthreads> <reps> [args...]\n");
        return 2;
    }
    script = argv[1];
    nthreads = atoi(argv[2]);
    reps = atoi(argv[3]);
    nextra = argc - 4;
    extra = argv + 4;
    if (nthreads < 1 || nthreads > MAX_THREADS || reps < 1 || reps > 256) {
        fprintf(stderr, "waiters_threads: 1..%d threads, 1..256 reps\n", MAX_THREADS);
        return 2;
    }
    pthread_barrier_init(&barrier, NULL, (unsigned)nthreads);
    pthread_t t[MAX_THREADS];
    for (int i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, run, (void *)(long)i);
    for (int i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);
    for (int r = 0; r < reps; r++)
        for (int i = 0; i < nthreads; i++) {
            printf("%d %d %s\n", r + 1, i, results[i][r] ? results[i][r] : "missing");
            free(results[i][r]);
        }
    pthread_barrier_destroy(&barrier);
    return 0;
}
