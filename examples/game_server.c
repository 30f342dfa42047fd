/* game_server.c -- embedding dogpile for Lua in a C host: a game server.
 *
 * N worker threads, each with its own LuaJIT state, load one regions config
 * file (examples/game_regions.lua) and serve simulated requests through it
 * (examples/game_worker.lua): look up a player's profile, then the player's
 * guild. Profiles live in a `dogpile.cache.shared_memory` region: one store
 * for the whole process, shared by every state, with one per-key lock, so
 * that a player is loaded from the slow "database" once however many threads
 * ask for it at the same time. Guilds live on a backend written here, in the
 * host, and registered with dp_backend_register().
 *
 * Each thread runs a few sessions as coroutines under a small scheduler; a
 * database query yields to it (host.db_query), and so do waiters for a lock,
 * through the sleep hook the host installs with dp_lua_set_sleep(). Then a
 * session that waits never blocks its thread's other sessions, and two
 * sessions of one thread asking for the same missing key do not deadlock.
 *
 * It runs two rounds (cold cache, then warm) and prints, for each: requests
 * per second, the profile region's hit ratio, creator calls (counted here, in
 * the host) and how many distinct players were touched for the first time:
 * the two must be equal. At the end it closes every Lua state, then calls
 * dp_shutdown(), so that a leak checker sees nothing left.
 *
 *   game_server [threads [requests [players [sessions [db_ms]]]]]
 *
 * The Lua and C modules are found in DP_LUA_DIR and DP_CMOD_DIR (the
 * environment variables, else the install directories compiled into
 * dogpile_lua.h); the two Lua files in GAME_EXAMPLES_DIR (likewise).
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "dogpile.h"
#include "dogpile_lua.h"

#ifndef GAME_EXAMPLES_DIR
#define GAME_EXAMPLES_DIR "examples"
#endif

#define ROUNDS 2

/* -- The host's own C backend: a fixed array of slots ----------------------
 *
 * "game.fixed_array" keeps at most ARRAY_SLOTS values in one array under one
 * mutex and, once full, overwrites slots in turn. There is one store per
 * process (the `ud` given to dp_backend_register), shared by every Lua state
 * that opens it, and one lock domain, so that regions in every state meet the
 * same per-key lock. Linear search on purpose: it shows the dp_backend_ops
 * contract, not a data structure to copy.
 */

#define ARRAY_NAME "game.fixed_array"
#define ARRAY_SLOTS 64

typedef struct array_slot {
    char *data;  /* the key, then the value, in one block; NULL: empty */
    size_t klen, vlen;
} array_slot;

typedef struct array_store {
    uv_mutex_t mu;     /* guards everything below */
    int handles;       /* open instances; the last close empties the store */
    size_t max_items;  /* slots in use, set by the first open */
    size_t hand;       /* the next slot to overwrite when full */
    uint32_t domain;
    double hits, misses, evictions;
    array_slot slots[ARRAY_SLOTS];
} array_store;

/* Registered as `ud`: the core keeps the pointer, so it must be static. */
static array_store guild_store;

static array_slot *array_find(array_store *s, const char *key, size_t klen)
{
    for (size_t i = 0; i < s->max_items; i++) {
        array_slot *sl = &s->slots[i];
        if (sl->data && sl->klen == klen && memcmp(sl->data, key, klen) == 0)
            return sl;
    }
    return NULL;
}

/* One argument, max_items (1..ARRAY_SLOTS); every region sharing the store
 * must agree on it, as with shared_memory. */
static int array_open(void *ud, const dp_arg *args, size_t nargs, void **self, dp_err *err)
{
    array_store *s = ud;
    size_t max_items = ARRAY_SLOTS;
    for (size_t i = 0; i < nargs; i++) {
        const dp_arg *a = &args[i];
        if (strcmp(a->name, "max_items") != 0)
            return dp_err_set(err, DP_EINVAL, ARRAY_NAME ": unknown argument '%s' (known: "
                              "max_items)", a->name);
        if (a->type != DP_ARG_NUMBER || !(a->number >= 1 && a->number <= ARRAY_SLOTS)
            || a->number != (double)(size_t)a->number)
            return dp_err_set(err, DP_EINVAL, ARRAY_NAME ": max_items must be an integer "
                              "from 1 to %d", ARRAY_SLOTS);
        max_items = (size_t)a->number;
    }
    uv_mutex_lock(&s->mu);
    if (s->handles == 0) {
        s->max_items = max_items;
        s->domain = dp_lock_domain(ARRAY_NAME, strlen(ARRAY_NAME));
    }
    size_t had = s->max_items;
    int rc = had != max_items ? DP_EMISMATCH : s->domain == 0 ? DP_ENOMEM : DP_OK;
    if (rc == DP_OK)
        s->handles++;
    uv_mutex_unlock(&s->mu);
    if (rc == DP_EMISMATCH)
        return dp_err_set(err, rc, ARRAY_NAME ": already open with max_items %zu, not %zu",
                          had, max_items);
    if (rc != DP_OK)
        return dp_err_set(err, rc, ARRAY_NAME ": out of memory");
    *self = s;
    return DP_OK;
}

static int array_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    array_store *s = self;
    int rc = DP_ENOTFOUND;
    uv_mutex_lock(&s->mu);
    array_slot *sl = array_find(s, key, klen);
    if (!sl) {
        s->misses++;
    } else if (dp_bytes_reserve(out, sl->vlen) != DP_OK) {
        rc = dp_err_set(err, DP_ENOMEM, ARRAY_NAME ": out of memory copying a %zu-byte value",
                        sl->vlen);
    } else {
        memcpy(out->data, sl->data + sl->klen, sl->vlen);
        out->len = sl->vlen;
        s->hits++;
        rc = DP_OK;
    }
    uv_mutex_unlock(&s->mu);
    return rc;
}

/* The copy is made before taking the mutex and the old block freed after. */
static int array_set(void *self, const char *key, size_t klen, const char *value, size_t vlen,
                     dp_err *err)
{
    array_store *s = self;
    char *data = malloc(klen + vlen + 1);
    if (!data)
        return dp_err_set(err, DP_ENOMEM, ARRAY_NAME ": out of memory storing a %zu-byte value",
                          vlen);
    memcpy(data, key, klen);
    memcpy(data + klen, value, vlen);
    uv_mutex_lock(&s->mu);
    array_slot *sl = array_find(s, key, klen);
    for (size_t i = 0; !sl && i < s->max_items; i++)
        if (!s->slots[i].data)
            sl = &s->slots[i];
    if (!sl) {
        sl = &s->slots[s->hand];
        s->hand = (s->hand + 1) % s->max_items;
        s->evictions++;
    }
    char *old = sl->data;
    sl->data = data;
    sl->klen = klen;
    sl->vlen = vlen;
    uv_mutex_unlock(&s->mu);
    free(old);
    return DP_OK;
}

static int array_del(void *self, const char *key, size_t klen, dp_err *err)
{
    (void)err;
    array_store *s = self;
    char *old = NULL;
    uv_mutex_lock(&s->mu);
    array_slot *sl = array_find(s, key, klen);
    if (sl) {
        old = sl->data;
        sl->data = NULL;
    }
    uv_mutex_unlock(&s->mu);
    free(old);
    return DP_OK;
}

static void array_stats(void *self, dp_backend_stats *out)
{
    array_store *s = self;
    uv_mutex_lock(&s->mu);
    for (size_t i = 0; i < s->max_items; i++)
        out->items += s->slots[i].data != NULL;
    out->max_items = (double)s->max_items;
    out->hits = s->hits;
    out->misses = s->misses;
    out->evictions = s->evictions;
    uv_mutex_unlock(&s->mu);
}

static uint32_t array_lock_domain(void *self)
{
    return ((array_store *)self)->domain; /* set before the first handle exists */
}

static void array_close(void *self)
{
    array_store *s = self;
    uv_mutex_lock(&s->mu);
    if (--s->handles == 0) {
        for (size_t i = 0; i < ARRAY_SLOTS; i++) {
            free(s->slots[i].data);
            s->slots[i].data = NULL;
        }
        s->hand = 0;
    }
    uv_mutex_unlock(&s->mu);
}

/* Kept by the core for the life of the process (or until dp_shutdown). */
static const dp_backend_ops array_ops = {
    .name = ARRAY_NAME,
    .open = array_open,
    .get = array_get,
    .set = array_set,
    .del = array_del,
    .stats = array_stats,
    .lock_domain = array_lock_domain,
    .close = array_close,
    .infallible = 1, /* fails only on out of memory */
};

/* -- What the host lends to Lua ---------------------------------------------- */

/* Process-wide counters, bumped by every thread. */
static atomic_long db_players, db_guilds;

/* The sleep hook (dp_lua_set_sleep) and host.sleep(seconds): yield to the
 * worker's scheduler with the monotonic time to be resumed at. Only ever
 * called inside a session's coroutine. */
static int game_sleep(lua_State *L)
{
    double seconds = luaL_checknumber(L, 1);
    lua_pushnumber(L, dp_clock_monotonic() + (seconds > 0 ? seconds : 0));
    return lua_yield(L, 1);
}

/* host.db_query(table, ms): one query to the slow database. It counts the
 * call (every query comes from a creator), then yields for `ms` like
 * game_sleep: the thread serves other sessions meanwhile. */
static int game_db_query(lua_State *L)
{
    const char *table = luaL_checkstring(L, 1);
    double ms = luaL_checknumber(L, 2);
    atomic_fetch_add(strcmp(table, "guilds") == 0 ? &db_guilds : &db_players, 1);
    lua_pushnumber(L, dp_clock_monotonic() + ms / 1e3);
    return lua_yield(L, 1);
}

/* host.now(): monotonic seconds. host.block(seconds): block the thread (the
 * scheduler, when every session sleeps). */
static int game_now(lua_State *L)
{
    lua_pushnumber(L, dp_clock_monotonic());
    return 1;
}

static int game_block(lua_State *L)
{
    dp_clock_sleep(luaL_checknumber(L, 1));
    return 0;
}

static const luaL_Reg host_funcs[] = {
    {"sleep", game_sleep},
    {"db_query", game_db_query},
    {"now", game_now},
    {"block", game_block},
    {NULL, NULL},
};

/* -- Threads ---------------------------------------------------------------- */

typedef struct totals {
    double hits, misses, creations, lock_waits, evictions;
    double guild_hits, guild_misses, guild_creations;
} totals;

typedef struct game {
    int threads, requests, players, sessions;
    double db_ms;
    const char *lua_dir, *cmod_dir, *examples;
    uv_barrier_t barrier; /* threads + main: ready, then start and end of each round */
    atomic_int failed;    /* a thread failed; read by all after the ready barrier */
    uv_mutex_t mu;        /* guards round */
    totals round;
    atomic_uchar *seen;   /* seen[id]: player id was touched in some round */
    atomic_long new_players;
} game;

typedef struct worker {
    game *g;
    int index;
    uv_thread_t thread;
} worker;

static void fail(game *g, int index, const char *what, lua_State *L)
{
    const char *msg = L ? lua_tostring(L, -1) : NULL;
    fprintf(stderr, "game_server: thread %d: %s: %s\n", index, what, msg ? msg : "failed");
    atomic_store(&g->failed, 1);
}

/* A Lua state ready to serve: dogpile opened, the sleep hook set, the host's
 * backend exposed, the regions loaded from the config file and the worker
 * script's serve function in the registry. NULL on failure (reported). */
static lua_State *open_state(game *g, int index)
{
    char path[1024];
    lua_State *L = luaL_newstate();
    if (!L) {
        fail(g, index, "luaL_newstate", NULL);
        return NULL;
    }
    luaL_openlibs(L);
    if (dp_lua_open(L, g->lua_dir, g->cmod_dir) != 0) {
        fail(g, index, "dp_lua_open", L);
        goto error;
    }
    if (dp_lua_set_sleep(L, game_sleep) != 0) {
        fail(g, index, "dp_lua_set_sleep", L);
        goto error;
    }
    /* regions = require("dogpile.cache").load_regions(".../game_regions.lua") */
    snprintf(path, sizeof path, "%s/game_regions.lua", g->examples);
    lua_getglobal(L, "require");
    lua_pushstring(L, "dogpile.cache");
    lua_call(L, 1, 1); /* loaded by dp_lua_open already: cannot fail */
    lua_getfield(L, -1, "load_regions");
    lua_remove(L, -2);
    lua_pushstring(L, path);
    if (lua_pcall(L, 1, 1, 0) != 0) {
        fail(g, index, "load_regions", L);
        goto error;
    }

    /* serve = dofile(".../game_worker.lua")(host, regions, thread, players, ...) */
    snprintf(path, sizeof path, "%s/game_worker.lua", g->examples);
    if (luaL_loadfile(L, path) != 0) {
        fail(g, index, "loading the worker", L);
        goto error;
    }
    lua_insert(L, -2);
    lua_newtable(L);
    luaL_register(L, NULL, host_funcs);
    lua_insert(L, -2);
    lua_pushinteger(L, index);
    lua_pushinteger(L, g->players);
    lua_pushinteger(L, g->sessions);
    lua_pushnumber(L, g->db_ms);
    if (lua_pcall(L, 6, 1, 0) != 0) {
        fail(g, index, "starting the worker", L);
        goto error;
    }
    if (!lua_isfunction(L, -1)) {
        lua_pushstring(L, "game_worker.lua must return a function serve(requests)");
        fail(g, index, "starting the worker", L);
        goto error;
    }
    lua_setfield(L, LUA_REGISTRYINDEX, "game.serve");
    return L;
error:
    lua_close(L);
    return NULL;
}

static double field(lua_State *L, int t, const char *k)
{
    lua_getfield(L, t, k);
    double v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

/* One round: serve(requests) returns the region counters of this round and
 * the set of player ids touched ({[id] = true}), which are added up here. */
static void serve_round(game *g, lua_State *L, int index)
{
    lua_getfield(L, LUA_REGISTRYINDEX, "game.serve");
    lua_pushinteger(L, g->requests);
    if (lua_pcall(L, 1, 2, 0) != 0) {
        fail(g, index, "serve", L);
        lua_pop(L, 1);
        return;
    }
    long fresh = 0;
    for (int id = 1; id <= g->players; id++) {
        lua_rawgeti(L, -1, id);
        if (lua_toboolean(L, -1) && atomic_exchange(&g->seen[id], 1) == 0)
            fresh++;
        lua_pop(L, 1);
    }
    atomic_fetch_add(&g->new_players, fresh);
    uv_mutex_lock(&g->mu);
    totals *t = &g->round;
    t->hits += field(L, -2, "hits");
    t->misses += field(L, -2, "misses");
    t->creations += field(L, -2, "creations");
    t->lock_waits += field(L, -2, "lock_waits");
    double ev = field(L, -2, "evictions"); /* the shared store's: the same in every state */
    if (ev > t->evictions)
        t->evictions = ev;
    t->guild_hits += field(L, -2, "guild_hits");
    t->guild_misses += field(L, -2, "guild_misses");
    t->guild_creations += field(L, -2, "guild_creations");
    uv_mutex_unlock(&g->mu);
    lua_pop(L, 2);
}

static void worker_main(void *arg)
{
    worker *w = arg;
    game *g = w->g;
    lua_State *L = open_state(g, w->index);
    uv_barrier_wait(&g->barrier); /* every state is ready (or failed) */
    int rounds = atomic_load(&g->failed) ? 0 : ROUNDS; /* main decides alike */
    for (int r = 0; r < rounds; r++) {
        uv_barrier_wait(&g->barrier);
        serve_round(g, L, w->index); /* a failure sets g->failed */
        uv_barrier_wait(&g->barrier);
        if (atomic_load(&g->failed)) /* main stops alike */
            break;
    }
    if (L)
        lua_close(L); /* releases its locks and its handles on shared stores */
}

/* -- Main --------------------------------------------------------------------- */

static int arg_int(int argc, char **argv, int i, int dflt, int min)
{
    if (argc <= i)
        return dflt;
    char *end;
    long v = strtol(argv[i], &end, 10);
    if (*end || v < min || v > 100000000) {
        fprintf(stderr, "game_server: argument %d must be an integer >= %d, got '%s'\n", i,
                min, argv[i]);
        exit(2);
    }
    return (int)v;
}

static const char *env_or(const char *name, const char *dflt)
{
    const char *v = getenv(name);
    return v && *v ? v : dflt;
}

int main(int argc, char **argv)
{
    if (argc > 1 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
        printf("usage: game_server [threads [requests [players [sessions [db_ms]]]]]\n"
               "  defaults: 4 threads, 25000 requests per thread and round, 5000 players,\n"
               "  16 sessions per thread, 5 ms per database query\n");
        return 0;
    }
    static game g;
    g.threads = arg_int(argc, argv, 1, 4, 1);
    g.requests = arg_int(argc, argv, 2, 25000, 1);
    g.players = arg_int(argc, argv, 3, 5000, 1);
    g.sessions = arg_int(argc, argv, 4, 16, 1);
    g.db_ms = arg_int(argc, argv, 5, 5, 0);
    g.lua_dir = env_or("DP_LUA_DIR", DP_LUA_DIR);
    g.cmod_dir = env_or("DP_CMOD_DIR", DP_CMOD_DIR);
    g.examples = env_or("GAME_EXAMPLES_DIR", GAME_EXAMPLES_DIR);
    g.seen = calloc((size_t)g.players + 1, sizeof *g.seen);
    worker *workers = calloc((size_t)g.threads, sizeof *workers);
    if (!g.seen || !workers) {
        fprintf(stderr, "game_server: out of memory\n");
        return 1;
    }

    /* Before any state may open it: the backend and its store, once. */
    uv_mutex_init(&guild_store.mu);
    int rc = dp_backend_register(&array_ops, &guild_store);
    if (rc != DP_OK) {
        fprintf(stderr, "game_server: dp_backend_register: %s\n", dp_strerror(rc));
        return 1;
    }
    uv_mutex_init(&g.mu);
    uv_barrier_init(&g.barrier, (unsigned)g.threads + 1);

    printf("game_server: %d threads x %d sessions, %d requests per thread and round, "
           "%d players (Zipf-like), db %g ms, dogpile %s\n", g.threads, g.sessions,
           g.requests, g.players, g.db_ms, dp_version());
    int started = 0;
    for (; started < g.threads; started++) {
        workers[started] = (worker){.g = &g, .index = started + 1};
        if (uv_thread_create(&workers[started].thread, worker_main, &workers[started]) != 0)
            break;
    }
    if (started < g.threads) {
        /* The barrier counts every thread: without them all it never opens. */
        fprintf(stderr, "game_server: cannot start thread %d\n", started + 1);
        exit(1);
    }
    uv_barrier_wait(&g.barrier);
    int rounds = atomic_load(&g.failed) ? 0 : ROUNDS; /* as every worker decides */

    long total_players = 0, total_creations = 0;
    double evictions = 0;
    if (rounds)
        printf("%-5s %9s %8s %11s %10s %14s %12s %11s %12s\n", "round", "requests", "seconds",
               "requests/s", "hit ratio", "creator calls", "new players", "lock waits",
               "guild calls");
    for (int r = 0; r < rounds; r++) {
        memset(&g.round, 0, sizeof g.round);
        atomic_store(&g.new_players, 0);
        long players0 = atomic_load(&db_players), guilds0 = atomic_load(&db_guilds);
        double t0 = dp_clock_monotonic();
        uv_barrier_wait(&g.barrier); /* start */
        uv_barrier_wait(&g.barrier); /* every thread is done */
        double secs = dp_clock_monotonic() - t0;
        if (atomic_load(&g.failed)) /* as every worker decides */
            break;
        totals *t = &g.round;
        long requests = (long)g.threads * g.requests;
        long calls = atomic_load(&db_players) - players0;
        long fresh = atomic_load(&g.new_players);
        printf("%-5s %9ld %8.3f %11.0f %9.2f%% %14ld %12ld %11.0f %12ld\n",
               r == 0 ? "cold" : "warm", requests, secs, requests / secs,
               100 * t->hits / (t->hits + t->misses), calls, fresh, t->lock_waits,
               atomic_load(&db_guilds) - guilds0);
        if ((double)calls != t->creations || t->guild_creations
            != (double)(atomic_load(&db_guilds) - guilds0))
            fprintf(stderr, "game_server: the regions counted %.0f + %.0f creations, the "
                    "host %ld + %ld\n", t->creations, t->guild_creations, calls,
                    atomic_load(&db_guilds) - guilds0);
        total_players += fresh;
        total_creations += calls;
        evictions = t->evictions;
    }

    for (int i = 0; i < g.threads; i++)
        uv_thread_join(&workers[i].thread);
    /* Every state is closed: whatever they held is released. Now the
     * process-wide registries can go. */
    size_t locks = dp_lock_count();
    dp_shutdown();
    uv_barrier_destroy(&g.barrier);
    uv_mutex_destroy(&g.mu);
    uv_mutex_destroy(&guild_store.mu);
    free(workers);
    free(g.seen);

    int failed = atomic_load(&g.failed);
    if (!failed) {
        printf("%ld creator calls for %ld distinct players: %s; %zu locks left after closing "
               "%d Lua states\n", total_creations, total_players,
               total_creations == total_players ? "one per player across all threads"
               : evictions > 0 ? "players evicted (players > max_items) were loaded again"
               : "MISMATCH", locks, g.threads);
        if (total_creations != total_players && evictions == 0)
            failed = 1;
    }
    return failed || locks != 0;
}
