/* test_threads.c -- the cross-thread dogpile lock, through Lua: 16 threads,
 * each with its own LuaJIT state, all loading the same regions config file
 * (spec/fixtures/threads_regions.lua: a shared_memory region), ask for one
 * key whose creator sleeps 100 ms.
 *
 *  - round 1, a missing key: the creator runs once; the 15 others block in
 *    dp_lock_wait (no sleep function is set, so nothing polls) and wake
 *    within a few ms of the release, with the creator's value;
 *  - round 2, the same key once expired: the creator runs once; the 15 others
 *    get the stale value at once, without waiting for it.
 *
 * The same two rounds run then on a dogpile.cache.lmdb region (the fixture's
 * `lmdb`, in a fresh directory made here with mkdtemp and named to Lua by
 * DP_TEST_LMDB_PATH, removed at the end): there the per-key lock is the core's
 * lock in the environment's domain, which orders the threads of this process,
 * plus the backend's OFD lock on its lock file, taken by the one thread that
 * holds the core's. The 15 waiters block on the core's condition variable
 * and must be woken as promptly, and find the backend's lock free.
 *
 * Then the embedding API's shutdown: closing every state releases every lock
 * and the last handle on the shared instance, which is freed (a fresh state
 * may then open the name with other bounds, which a live instance refuses
 * with DP_EMISMATCH), and dp_shutdown() frees the registries, so that ASan
 * and Valgrind see no leak.
 *
 * The Lua and C modules come from the staged install: DP_TEST_LUA_DIR and
 * DP_TEST_CMOD_DIR when set (meson test and .ci/test set them), else the
 * configured DP_LUA_DIR and DP_CMOD_DIR of dogpile_lua.h.
 *
 * DP_TEST_TIME_SCALE (default 1) multiplies the timing bounds, for a run
 * under Valgrind (.ci/valgrind): there every code path runs many times slower
 * the first time (translation), so the first store takes tens of ms before
 * the lock is even released. Counts and contents are checked as always.
 */
#include <dirent.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "dogpile.h"
#include "dogpile_lua.h"
#include "tap.h"

#ifndef DP_TEST_FIXTURES
#error "DP_TEST_FIXTURES (the spec/fixtures directory) must be defined by the build"
#endif

#define NTHREADS 16
#define CREATE_SECONDS 0.1
/* A waiter woken by the release's broadcast returns within a few ms (1-5 ms
 * measured in the main, ASan and TSan builds, the 15 waking in turn as each
 * takes the lock to read). The bound alone does not tell polling apart: with
 * dogpile.set_sleep(harness_sleep) the waiters poll in steps of up to 20 ms
 * and returned 13-33 ms after the release. What does is the check that no
 * sleep function is set in any state, so that Mutex:acquire waits in
 * dp_lock_wait with no timeout, and the lock_waits count. */
#define WAKE_BOUND 0.05
/* A stale value is served without waiting for the 100 ms creator. */
#define STALE_BOUND 0.05
/* The fixture region's expiration_time. */
#define REGION_EXPIRATION 1.0
#define KEY "the-key"

/* The regions the rounds run on, in order: the fixture's names, and the
 * prefix of their checks (none for shared_memory, whose checks predate the
 * lmdb ones). */
enum { R_SHARED, R_LMDB, NREGIONS };
static const char *const region_names[NREGIONS] = {"shared", "lmdb"};
static const char *const region_labels[NREGIONS] = {"", "lmdb: "};

/* -- What the creators report, process-wide --------------------------------- */

static atomic_int created;          /* creator calls in the current round */
static atomic_int creator_thread;   /* id of the thread whose creator ran last */
static _Atomic double released_at;  /* monotonic time its creator returned */

/* harness_sleep(seconds): block this thread (the creator's slow work). */
static int l_sleep(lua_State *L)
{
    dp_clock_sleep(luaL_checknumber(L, 1));
    return 0;
}

/* harness_created() -> n: counts a creator call; n is its rank in the round. */
static int l_created(lua_State *L)
{
    lua_pushinteger(L, atomic_fetch_add(&created, 1) + 1);
    return 1;
}

/* harness_released(thread_id): the creator is about to return its value. */
static int l_released(lua_State *L)
{
    atomic_store(&creator_thread, (int)luaL_checkinteger(L, 1));
    atomic_store(&released_at, dp_clock_monotonic());
    return 0;
}

/* -- One thread's Lua state ------------------------------------------------- */

/* Run once per state, with (fixture path, thread id): loads the regions and
 * defines harness_round(region name, round) -> description of the value got,
 * and the region's creations, lock_waits and stale_served counters after the
 * call. */
static const char SETUP[] =
    "local fixture, id = ...\n"
    "local cache = require 'dogpile.cache'\n"
    "local dogpile = require 'dogpile'\n"
    "local ffi = require 'ffi'\n"
    "local lib = require 'dogpile.lib'\n"
    "local regions = cache.load_regions(fixture)\n"
    "assert(regions.shared, 'the fixture has no shared region')\n"
    "local DATA = string.rep('dogpile ', 64)\n"
    "function harness_round(which, round)\n"
    "    local region = regions[which]\n"
    "    local v = region:get_or_create('" KEY "', function()\n"
    "        local n = harness_created()\n"
    "        harness_sleep(" "%g" ")\n"
    "        harness_released(id)\n"
    "        return { round = round, by = id, n = n, data = DATA }\n"
    "    end)\n"
    "    local st = region:stats()\n"
    "    local ok = type(v) == 'table' and v.data == DATA\n"
    "    local got = ok and string.format('round %%d by thread %%d (creator call %%d)',\n"
    "                                     v.round, v.by, v.n) or ('bad value: ' .. tostring(v))\n"
    "    return got, st.creations, st.lock_waits, st.stale_served\n"
    "end\n"
    /* Facts the test checks once per state: waiters block (no sleep function),
     * the backend module came from the given directory, and the core bound
     * through the FFI is the very library the harness links (one copy of the
     * process-wide registries). */
    "return regions.lmdb ~= nil, dogpile.current_sleep() == nil,\n"
    "       package.searchpath('dogpile.backends.shared_memory', package.cpath),\n"
    "       tonumber(ffi.cast('uintptr_t', lib.C.dp_lock_count))\n";

typedef struct round_result {
    int ok;              /* harness_round returned */
    char got[96];        /* its description of the value */
    double started, returned; /* monotonic, around the call */
    int creations, lock_waits, stale_served; /* region counters after it */
} round_result;

typedef struct worker {
    int id;
    uv_thread_t thread;
    int ready;               /* the state opened dogpile and loaded the regions */
    int blocking;            /* no sleep function: waiters block in dp_lock_wait */
    int has_lmdb;            /* the fixture gave an lmdb region (the backend is built) */
    char cmod_path[512];     /* where shared_memory.so was found */
    uintptr_t core_fn;       /* dp_lock_count as the FFI sees it */
    char err[512];
    round_result r[NREGIONS][3]; /* per region, rounds 1 and 2 */
} worker;

static const char *lua_dir, *cmod_dir;
static double time_scale = 1;
static worker workers[NTHREADS];
/* NTHREADS workers and the main thread meet at each step. */
static uv_barrier_t b_ready, b_start, b_done, b_close;

static void keep_error(worker *w, lua_State *L, const char *what)
{
    const char *msg = lua_tostring(L, -1);
    snprintf(w->err, sizeof w->err, "%s: %s", what, msg ? msg : "(no message)");
    lua_pop(L, 1);
}

static lua_State *new_state(void)
{
    lua_State *L = luaL_newstate();
    if (!L)
        return NULL;
    luaL_openlibs(L);
    lua_register(L, "harness_sleep", l_sleep);
    lua_register(L, "harness_created", l_created);
    lua_register(L, "harness_released", l_released);
    return L;
}

static void setup_state(worker *w, lua_State *L)
{
    char chunk[sizeof SETUP + 32];
    snprintf(chunk, sizeof chunk, SETUP, CREATE_SECONDS);
    if (dp_lua_open(L, lua_dir, cmod_dir) != 0) {
        keep_error(w, L, "dp_lua_open");
        return;
    }
    if (luaL_loadstring(L, chunk) != 0) {
        keep_error(w, L, "setup chunk");
        return;
    }
    lua_pushstring(L, DP_TEST_FIXTURES "/threads_regions.lua");
    lua_pushinteger(L, w->id);
    if (lua_pcall(L, 2, 4, 0) != 0) {
        keep_error(w, L, "setup");
        return;
    }
    w->has_lmdb = lua_toboolean(L, -4);
    w->blocking = lua_toboolean(L, -3);
    const char *p = lua_tostring(L, -2);
    snprintf(w->cmod_path, sizeof w->cmod_path, "%s", p ? p : "(not found)");
    w->core_fn = (uintptr_t)lua_tonumber(L, -1);
    lua_pop(L, 4);
    w->ready = 1;
}

static void run_round(worker *w, lua_State *L, int reg, int round)
{
    round_result *r = &w->r[reg][round];
    lua_getglobal(L, "harness_round");
    lua_pushstring(L, region_names[reg]);
    lua_pushinteger(L, round);
    r->started = dp_clock_monotonic();
    int rc = lua_pcall(L, 2, 4, 0);
    r->returned = dp_clock_monotonic();
    if (rc != 0) {
        keep_error(w, L, "harness_round");
        return;
    }
    snprintf(r->got, sizeof r->got, "%s", lua_tostring(L, -4));
    r->creations = (int)lua_tointeger(L, -3);
    r->lock_waits = (int)lua_tointeger(L, -2);
    r->stale_served = (int)lua_tointeger(L, -1);
    lua_pop(L, 4);
    r->ok = 1;
}

/* Keeps step with the main thread whatever fails, so that a failure is
 * reported by the checks instead of hanging a barrier. */
static void worker_main(void *arg)
{
    worker *w = arg;
    lua_State *L = new_state();
    if (L)
        setup_state(w, L);
    else
        snprintf(w->err, sizeof w->err, "luaL_newstate failed");
    uv_barrier_wait(&b_ready);
    for (int reg = 0; reg < NREGIONS; reg++)
        for (int round = 1; round <= 2; round++) {
            uv_barrier_wait(&b_start);
            if (w->ready && (reg != R_LMDB || w->has_lmdb))
                run_round(w, L, reg, round);
            uv_barrier_wait(&b_done);
        }
    uv_barrier_wait(&b_close);
    if (L)
        lua_close(L);
}

/* -- Checks ------------------------------------------------------------------ */

static void print_errors(void)
{
    for (int i = 0; i < NTHREADS; i++)
        if (workers[i].err[0])
            printf("# thread %d: %s\n", i, workers[i].err);
}

static int all_ran(int reg, int round)
{
    int n = 0;
    for (int i = 0; i < NTHREADS; i++)
        n += workers[i].r[reg][round].ok;
    return n;
}

static const char OTHER_SHARED[] =
    "local cache = require 'dogpile.cache'\n"
    "local r = cache.make_region():configure('dogpile.cache.shared_memory',\n"
    "    { arguments = { name = 'threads-test', max_items = 7 } })\n"
    "return r.actual_backend:stats().items";
/* The fixture's LMDB path with another map_size (larger than the file). */
static const char OTHER_LMDB[] =
    "local cache = require 'dogpile.cache'\n"
    "local r = cache.make_region():configure('dogpile.cache.lmdb',\n"
    "    { arguments = { path = os.getenv('DP_TEST_LMDB_PATH'), map_size = '32m',\n"
    "                    sync = 'none' } })\n"
    "local items = r.actual_backend:stats().items\n"
    "r.actual_backend:close()\n"
    "return items";

/* Opens the fixture's instance (`chunk`: OTHER_SHARED or OTHER_LMDB) with
 * other bounds in a fresh state. Returns 1 when it opened (then *items gets
 * its item count), 0 when it was refused (msg gets why). */
static int open_other_bounds(const char *chunk, char *msg, size_t msglen, double *items)
{
    lua_State *L = new_state();
    if (!L) {
        snprintf(msg, msglen, "luaL_newstate failed");
        return 0;
    }
    int opened = 0;
    if (dp_lua_open(L, lua_dir, cmod_dir) != 0 || luaL_dostring(L, chunk) != 0) {
        const char *m = lua_tostring(L, -1);
        snprintf(msg, msglen, "%s", m ? m : "(no message)");
    } else {
        *items = lua_tonumber(L, -1);
        opened = 1;
    }
    lua_close(L);
    return opened;
}

/* Removes `dir` and the files in it (LMDB's data.mdb and lock.mdb, the
 * backend's dogpile-locks). Returns 1 when it is gone. */
static int remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    struct dirent *e;
    char path[1024];
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (unlink(path) != 0)
            printf("# cannot remove %s\n", path);
    }
    closedir(d);
    return rmdir(dir) == 0;
}

/* -- The two rounds on one region ------------------------------------------ */

/* CHECK, its message prefixed with the region's label. */
#define CHECK_R(cond, fmt, ...) CHECK(cond, "%s" fmt, label, __VA_ARGS__)

static void run_rounds(int reg, double wake_bound, double stale_bound)
{
    const char *label = region_labels[reg];
    /* -- Round 1: a missing key ---------------------------------------------- */
    atomic_store(&created, 0);
    atomic_store(&creator_thread, -1);
    uv_barrier_wait(&b_start);
    uv_barrier_wait(&b_done);
    print_errors();
    int c1 = atomic_load(&creator_thread);
    double rel1 = atomic_load(&released_at);
    CHECK_R(all_ran(reg, 1) == NTHREADS, "round 1: all %d threads returned (%d)", NTHREADS, all_ran(reg, 1));
    CHECK_R(atomic_load(&created) == 1, "round 1: a missing key: the creator ran exactly once (%d)",
            atomic_load(&created));
    char want1[96];
    snprintf(want1, sizeof want1, "round 1 by thread %d (creator call 1)", c1);
    int same = 0, waited = 0, creations = 0;
    double max_wake = -1, min_wake = 1e9;
    for (int i = 0; i < NTHREADS; i++) {
        round_result *r = &workers[i].r[reg][1];
        if (!r->ok)
            continue;
        same += strcmp(r->got, want1) == 0;
        creations += r->creations;
        if (i == c1)
            continue;
        waited += r->lock_waits == 1;
        double wake = r->returned - rel1;
        if (wake > max_wake)
            max_wake = wake;
        if (wake < min_wake)
            min_wake = wake;
        if (!(wake >= 0 && wake < wake_bound))
            printf("# %sthread %d returned %.3f ms after the release\n", label, i, wake * 1e3);
    }
    CHECK_R(same == NTHREADS, "round 1: every thread got the creator's value \"%s\" (%d)", want1, same);
    CHECK_R(creations == 1, "round 1: the regions of all states count one creation (%d)", creations);
    CHECK_R(waited == NTHREADS - 1, "round 1: the %d others waited for the lock (%d)", NTHREADS - 1,
            waited);
    printf("# %sround 1: waiters returned %.3f to %.3f ms after the creator's release "
           "(its thread stored the value and released the lock in %.3f ms)\n", label,
           min_wake * 1e3, max_wake * 1e3,
           c1 >= 0 && c1 < NTHREADS ? (workers[c1].r[reg][1].returned - rel1) * 1e3 : -1.0);
    CHECK_R(c1 >= 0 && c1 < NTHREADS && workers[c1].r[reg][1].returned - workers[c1].r[reg][1].started >= CREATE_SECONDS,
            "round 1: the creator took its %.0f ms", CREATE_SECONDS * 1e3);
    CHECK_R(min_wake >= 0 && max_wake < wake_bound,
            "round 1: every waiter returned within %.0f ms of the release: woken, not polling "
            "(max %.3f ms)", wake_bound * 1e3, max_wake * 1e3);
    CHECK_R(dp_lock_count() == 0, "round 1: no lock is left held or waited for (%zu)",
            dp_lock_count());

    /* -- Round 2: the same key, expired --------------------------------------- */
    /* The value was stored right after rel1; wait until it is older than the
     * region's expiration_time, with a margin. */
    double until = rel1 + REGION_EXPIRATION + 0.15;
    dp_clock_sleep(until - dp_clock_monotonic());
    atomic_store(&created, 0);
    atomic_store(&creator_thread, -1);
    uv_barrier_wait(&b_start);
    uv_barrier_wait(&b_done);
    print_errors();
    int c2 = atomic_load(&creator_thread);
    CHECK_R(all_ran(reg, 2) == NTHREADS, "round 2: all %d threads returned (%d)", NTHREADS, all_ran(reg, 2));
    CHECK_R(atomic_load(&created) == 1, "round 2: an expired key: the creator ran exactly once (%d)",
            atomic_load(&created));
    char want2[96];
    snprintf(want2, sizeof want2, "round 2 by thread %d (creator call 1)", c2);
    CHECK_R(c2 >= 0 && c2 < NTHREADS && strcmp(workers[c2].r[reg][2].got, want2) == 0,
            "round 2: the creator's thread got the new value (\"%s\")",
            c2 >= 0 && c2 < NTHREADS ? workers[c2].r[reg][2].got : "no creator");
    int stale = 0, served = 0, fast = 0;
    double max_stale = -1;
    for (int i = 0; i < NTHREADS; i++) {
        round_result *r = &workers[i].r[reg][2];
        if (!r->ok || i == c2)
            continue;
        stale += strcmp(r->got, want1) == 0;
        served += r->stale_served - workers[i].r[reg][1].stale_served == 1;
        double took = r->returned - r->started;
        fast += took < stale_bound;
        if (took > max_stale)
            max_stale = took;
        if (!(took < stale_bound))
            printf("# %sthread %d took %.3f ms to return in round 2\n", label, i, took * 1e3);
    }
    CHECK_R(stale == NTHREADS - 1, "round 2: the %d others got the stale value \"%s\" (%d)",
            NTHREADS - 1, want1, stale);
    CHECK_R(served == NTHREADS - 1, "round 2: their regions count it as stale_served (%d)", served);
    printf("# %sround 2: the others returned the stale value in at most %.3f ms\n", label,
           max_stale * 1e3);
    CHECK_R(fast == NTHREADS - 1,
            "round 2: each of them returned in under %.0f ms, not waiting for the %.0f ms creator "
            "(max %.3f ms)", stale_bound * 1e3, CREATE_SECONDS * 1e3, max_stale * 1e3);
}

#undef CHECK_R

/* -- A lock whose holder is gone, in an idle state --------------------------- */

/* State A takes the key's lock in a coroutine that yields inside the creator
 * and is dropped, then stays idle with its collector stopped: the sweep that
 * would release the lock (dogpile.holders) never runs. State B, on another
 * thread, must not wait for it forever: past dogpile.set_lock_timeout it goes
 * ahead with its own creator. */
#define ABANDON_BOUND 0.3
static const char ABANDON_A[] =
    "local fixture = ...\n"
    "collectgarbage('stop')\n"
    "local regions = require('dogpile.cache').load_regions(fixture)\n"
    "local co = coroutine.create(function()\n"
    "    regions.shared:get_or_create('abandoned', function()\n"
    "        coroutine.yield()\n"
    "        return 'never'\n"
    "    end)\n"
    "end)\n"
    "assert(coroutine.resume(co))\n"
    "assert(coroutine.status(co) == 'suspended')\n";
static const char ABANDON_B[] =
    "local fixture, bound = ...\n"
    "require('dogpile').set_lock_timeout(bound)\n"
    "local regions = require('dogpile.cache').load_regions(fixture)\n"
    "local clock = require('dogpile.lib').C.dp_clock_monotonic\n"
    "local calls, t0 = 0, clock()\n"
    "local v = regions.shared:get_or_create('abandoned', function()\n"
    "    calls = calls + 1\n"
    "    return 'made by B'\n"
    "end)\n"
    "return tostring(v), calls, clock() - t0\n";

typedef struct abandon_b {
    int ok, calls;
    char got[64], err[512];
    double waited;
} abandon_b;

static void abandon_b_main(void *arg)
{
    abandon_b *b = arg;
    lua_State *L = new_state();
    if (!L || dp_lua_open(L, lua_dir, cmod_dir) != 0 || luaL_loadstring(L, ABANDON_B) != 0) {
        snprintf(b->err, sizeof b->err, "state B: %s", L ? lua_tostring(L, -1) : "no state");
    } else {
        lua_pushstring(L, DP_TEST_FIXTURES "/threads_regions.lua");
        lua_pushnumber(L, ABANDON_BOUND);
        if (lua_pcall(L, 2, 3, 0) != 0) {
            snprintf(b->err, sizeof b->err, "state B: %s", lua_tostring(L, -1));
        } else {
            snprintf(b->got, sizeof b->got, "%s", lua_tostring(L, -3));
            b->calls = (int)lua_tointeger(L, -2);
            b->waited = lua_tonumber(L, -1);
            b->ok = 1;
        }
    }
    if (L)
        lua_close(L);
}

static void run_abandoned(void)
{
    lua_State *A = new_state();
    int held = A && dp_lua_open(A, lua_dir, cmod_dir) == 0 && luaL_loadstring(A, ABANDON_A) == 0;
    if (held) {
        lua_pushstring(A, DP_TEST_FIXTURES "/threads_regions.lua");
        held = lua_pcall(A, 1, 0, 0) == 0;
    }
    CHECK(held && dp_lock_count() == 1,
          "abandoned: state A holds the key's lock from a suspended, dropped coroutine (%s, %zu locks)",
          held ? "ok" : (A ? lua_tostring(A, -1) : "no state"), dp_lock_count());
    abandon_b b = {0};
    uv_thread_t t;
    if (held && uv_thread_create(&t, abandon_b_main, &b) == 0) {
        uv_thread_join(&t);
        if (!b.ok)
            printf("# %s\n", b.err);
        CHECK(b.ok && strcmp(b.got, "made by B") == 0 && b.calls == 1,
              "abandoned: state B, on another thread, runs its creator once and gets its value "
              "(%s, %d calls)", b.got, b.calls);
        CHECK(b.ok && b.waited >= ABANDON_BOUND * 0.9 && b.waited < 2 * ABANDON_BOUND * time_scale,
              "abandoned: B waited about its lock timeout (%.0f ms), not forever: %.0f ms",
              ABANDON_BOUND * 1e3, b.waited * 1e3);
        CHECK(dp_lock_count() == 1, "abandoned: B did not release A's lock (%zu locks)",
              dp_lock_count());
    } else {
        CHECK(0, "abandoned: thread B started");
    }
    if (A)
        lua_close(A);
    CHECK(dp_lock_count() == 0, "abandoned: closing state A releases its lock (%zu locks)",
          dp_lock_count());
}

int main(void)
{
    lua_dir = getenv("DP_TEST_LUA_DIR");
    cmod_dir = getenv("DP_TEST_CMOD_DIR");
    if (!lua_dir || !*lua_dir)
        lua_dir = DP_LUA_DIR;
    if (!cmod_dir || !*cmod_dir)
        cmod_dir = DP_CMOD_DIR;
    printf("# Lua modules from %s, C modules from %s\n", lua_dir, cmod_dir);
    const char *scale = getenv("DP_TEST_TIME_SCALE");
    if (scale && *scale) {
        time_scale = strtod(scale, NULL);
        if (!(time_scale >= 1))
            time_scale = 1;
        printf("# timing bounds scaled by %g\n", time_scale);
    }
    const double wake_bound = WAKE_BOUND * time_scale, stale_bound = STALE_BOUND * time_scale;

    /* The lmdb region's environment: a fresh directory, named to the fixture
     * before any thread starts. */
    char lmdb_dir[] = "/tmp/dp-test-threads-XXXXXX";
    if (!mkdtemp(lmdb_dir) || setenv("DP_TEST_LMDB_PATH", lmdb_dir, 1) != 0) {
        CHECK(0, "a temporary directory for the lmdb region");
        return tap_done();
    }
    printf("# lmdb region in %s\n", lmdb_dir);

    uv_barrier_init(&b_ready, NTHREADS + 1);
    uv_barrier_init(&b_start, NTHREADS + 1);
    uv_barrier_init(&b_done, NTHREADS + 1);
    uv_barrier_init(&b_close, NTHREADS + 1);
    int spawned = 1;
    for (int i = 0; i < NTHREADS; i++) {
        workers[i].id = i;
        spawned &= uv_thread_create(&workers[i].thread, worker_main, &workers[i]) == 0;
    }
    if (!spawned) {
        CHECK(0, "%d threads started", NTHREADS);
        return tap_done(); /* the barriers would never fill */
    }
    uv_barrier_wait(&b_ready);

    int ready = 0, blocking = 0, same_core = 0, from_stage = 0;
    size_t cmod_len = strlen(cmod_dir);
    for (int i = 0; i < NTHREADS; i++) {
        worker *w = &workers[i];
        ready += w->ready;
        blocking += w->ready && w->blocking;
        same_core += w->ready && w->core_fn == (uintptr_t)dp_lock_count;
        from_stage += w->ready && strncmp(w->cmod_path, cmod_dir, cmod_len) == 0;
    }
    print_errors();
    CHECK(ready == NTHREADS, "%d threads opened dogpile and loaded the regions file (%d)",
          NTHREADS, ready);
    CHECK(from_stage == NTHREADS, "every state loads the C modules from the given directory (%s)",
          workers[0].cmod_path);
    CHECK(same_core == NTHREADS,
          "every state binds the one core library the harness links (%d of %d)", same_core,
          NTHREADS);
    CHECK(blocking == NTHREADS, "no sleep function is set: waiters block in dp_lock_wait (%d)",
          blocking);

    int has_lmdb = 0;
    for (int i = 0; i < NTHREADS; i++)
        has_lmdb += workers[i].ready && workers[i].has_lmdb;
    for (int reg = 0; reg < NREGIONS; reg++) {
        if (reg == R_LMDB && has_lmdb == 0) {
            /* A build without the lmdb backend: the workers skip its rounds. */
            for (int round = 1; round <= 2; round++) {
                uv_barrier_wait(&b_start);
                uv_barrier_wait(&b_done);
            }
            printf("ok %d - # SKIP lmdb: the lmdb backend is not built (no "
                   "dogpile.backends.lmdb in %s)\n", ++tap_n, cmod_dir);
            continue;
        }
        run_rounds(reg, wake_bound, stale_bound);
    }

    run_abandoned();

    /* -- Shutdown ------------------------------------------------------------ */
    char msg[512] = "";
    double items = -1;
    int opened = open_other_bounds(OTHER_SHARED, msg, sizeof msg, &items);
    CHECK(!opened && strstr(msg, "already open"),
          "while the threads' states are open, 'threads-test' with other bounds is refused (%s)",
          opened ? "it opened" : msg);
    if (has_lmdb) {
        msg[0] = '\0';
        opened = open_other_bounds(OTHER_LMDB, msg, sizeof msg, &items);
        CHECK(!opened && strstr(msg, "already open"),
              "lmdb: while the threads' states are open, the path with another map_size is "
              "refused (%s)", opened ? "it opened" : msg);
    }
    uv_barrier_wait(&b_close);
    for (int i = 0; i < NTHREADS; i++)
        uv_thread_join(&workers[i].thread);
    CHECK(dp_lock_count() == 0, "every state closed: no lock is left (%zu)", dp_lock_count());
    msg[0] = '\0';
    opened = open_other_bounds(OTHER_SHARED, msg, sizeof msg, &items);
    CHECK(opened && items == 0,
          "every state closed: the instance was freed, so it opens anew with other bounds, "
          "empty (%s)", opened ? "opened" : msg);
    CHECK(dp_lock_count() == 0, "and no lock is left after that state closed (%zu)",
          dp_lock_count());
    if (has_lmdb) {
        msg[0] = '\0';
        items = -1;
        opened = open_other_bounds(OTHER_LMDB, msg, sizeof msg, &items);
        CHECK(opened && items == 1,
              "lmdb: every state closed: the environment was closed, so it opens anew with "
              "another map_size, and holds the one key (%s, %g items)",
              opened ? "opened" : msg, items);
        CHECK(dp_lock_count() == 0, "lmdb: and no lock is left after that state closed (%zu)",
              dp_lock_count());
    }
    int removed = remove_dir(lmdb_dir);
    CHECK(removed, "the lmdb directory %s and its files are removed", lmdb_dir);

    uv_barrier_destroy(&b_ready);
    uv_barrier_destroy(&b_start);
    uv_barrier_destroy(&b_done);
    uv_barrier_destroy(&b_close);
    dp_shutdown();
    return tap_done();
}
