/* template.c -- dogpile.cache.template: the smallest complete C backend, to
 * copy when writing a new one (docs/BACKENDS.md walks through it).
 *
 * Storage: a process-wide hash table per `name` under one mutex. Its "lock
 * between processes" is a table of held keys polled with dp_backoff, as a
 * server's lock would be (SET NX, add): the core's two-level lock puts the
 * threads of this process in front of it. The core reads the arguments,
 * shares the instances and frees them; this file keeps only its storage.
 * Sections marked "optional" can go.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include <lauxlib.h>
#include <lua.h>

#include "dogpile.h"

#define NAME "dogpile.cache.template"
#define NBUCKETS 256

/* -- Arguments: the struct the core fills, and the table it fills it by --- */

typedef struct tpl_settings {
    dp_str name;              /* which store: regions on one name share it */
    int64_t max_value_bytes;  /* larger values are refused (DP_ETOOBIG) */
    double lock_timeout;      /* per handle: bounds the two-level lock's waits */
} tpl_settings;

static const dp_arg_spec tpl_args[] = {
    {.name = "name", .kind = DP_SPEC_BYTES, .flags = DP_SPEC_KEY, .min = 1, .def_str = "default",
     .offset = offsetof(tpl_settings, name)},
    {.name = "max_value_bytes", .kind = DP_SPEC_SIZE, .flags = DP_SPEC_ABOVE_MIN,
     .def = 1024 * 1024, .offset = offsetof(tpl_settings, max_value_bytes)},
    {.name = "lock_timeout", .kind = DP_SPEC_SECONDS,
     .flags = DP_SPEC_ABOVE_MIN | DP_SPEC_INFINITE | DP_SPEC_HANDLE | DP_SPEC_LOCK_TIMEOUT,
     .def = 30, .offset = offsetof(tpl_settings, lock_timeout)},
    {0},
};

/* -- Storage --------------------------------------------------------------- */

typedef struct item {
    struct item *next;
    size_t klen, vlen;
    char data[]; /* key, then value */
} item;

typedef struct held { /* optional: the lock */
    struct held *next;
    size_t klen;
    char key[];
} held;

typedef struct tpl {
    const tpl_settings *cfg; /* the core's: valid until destroy */
    uv_mutex_t mu;
    item *buckets[NBUCKETS];
    held *locks; /* optional: the lock */
    double items, hits, misses;
} tpl;

static item **find(tpl *t, const char *key, size_t klen)
{
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < klen; i++)
        h = (h ^ (unsigned char)key[i]) * 1099511628211ULL;
    item **pp = &t->buckets[h % NBUCKETS];
    while (*pp && ((*pp)->klen != klen || memcmp((*pp)->data, key, klen) != 0))
        pp = &(*pp)->next;
    return pp;
}

static int tpl_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    tpl *t = self;
    uv_mutex_lock(&t->mu);
    item *it = *find(t, key, klen);
    int rc = DP_ENOTFOUND;
    if (it && dp_bytes_reserve(out, it->vlen) != DP_OK) {
        rc = dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    } else if (it) {
        if (it->vlen) /* an empty value into a buffer never grown: data is NULL */
            memcpy(out->data, it->data + klen, it->vlen);
        out->len = it->vlen;
        rc = DP_OK;
    }
    t->hits += rc == DP_OK;
    t->misses += rc == DP_ENOTFOUND;
    uv_mutex_unlock(&t->mu);
    return rc;
}

static int tpl_set(void *self, const char *key, size_t klen, const char *value, size_t vlen,
                   dp_err *err)
{
    tpl *t = self;
    if ((int64_t)vlen > t->cfg->max_value_bytes)
        return dp_err_set(err, DP_ETOOBIG, NAME ": a value of %zu bytes is larger than "
                          "max_value_bytes", vlen);
    item *it = malloc(sizeof *it + klen + vlen);
    if (!it)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    it->klen = klen;
    it->vlen = vlen;
    memcpy(it->data, key, klen);
    memcpy(it->data + klen, value, vlen);
    uv_mutex_lock(&t->mu);
    item **pp = find(t, key, klen), *old = *pp;
    it->next = old ? old->next : NULL;
    *pp = it;
    t->items += !old;
    uv_mutex_unlock(&t->mu);
    free(old);
    return DP_OK;
}

static int tpl_del(void *self, const char *key, size_t klen, dp_err *err)
{
    (void)err;
    tpl *t = self;
    uv_mutex_lock(&t->mu);
    item **pp = find(t, key, klen), *old = *pp;
    if (old) {
        *pp = old->next;
        t->items--;
    }
    uv_mutex_unlock(&t->mu);
    free(old);
    return DP_OK;
}

static void tpl_stats(void *self, dp_backend_stats *out) /* optional */
{
    tpl *t = self;
    uv_mutex_lock(&t->mu);
    out->items = t->items;
    out->hits = t->hits;
    out->misses = t->misses;
    uv_mutex_unlock(&t->mu);
}

/* -- Optional: a lock of its own (between processes, for a shared store) --- */

static held **held_slot(tpl *t, const char *key, size_t klen)
{
    held **pp = &t->locks;
    while (*pp && ((*pp)->klen != klen || memcmp((*pp)->key, key, klen) != 0))
        pp = &(*pp)->next;
    return pp;
}

/* Free right now? With `take`, takes it when it is. */
static int lock_once(tpl *t, const char *key, size_t klen, int take, int *nomem)
{
    uv_mutex_lock(&t->mu);
    held **pp = held_slot(t, key, klen);
    int free_now = *pp == NULL;
    if (free_now && take) {
        held *h = malloc(sizeof *h + klen);
        if (h) {
            h->next = NULL;
            h->klen = klen;
            memcpy(h->key, key, klen);
            *pp = h;
        } else {
            *nomem = 1;
        }
    }
    uv_mutex_unlock(&t->mu);
    return free_now;
}

/* Polls as a server lock must: dp_backoff's steps, up to the timeout. */
static int poll_lock(tpl *t, const char *key, size_t klen, double timeout, int take,
                     dp_err *err)
{
    dp_backoff bo;
    dp_backoff_init(&bo, timeout, 0);
    int nomem = 0;
    while (!lock_once(t, key, klen, take, &nomem)) {
        if (timeout == 0)
            return DP_EBUSY;
        if (!dp_backoff_sleep(&bo))
            return DP_ETIMEDOUT;
    }
    return nomem ? dp_err_set(err, DP_ENOMEM, NAME ": out of memory") : DP_OK;
}

static int tpl_lock(void *self, const char *key, size_t klen, double timeout, dp_err *err)
{
    return poll_lock(self, key, klen, timeout, 1, err);
}

static int tpl_unlock(void *self, const char *key, size_t klen, dp_err *err)
{
    (void)err;
    tpl *t = self;
    uv_mutex_lock(&t->mu);
    held **pp = held_slot(t, key, klen), *h = *pp;
    if (h)
        *pp = h->next;
    uv_mutex_unlock(&t->mu);
    free(h);
    return h ? DP_OK : DP_ENOTHELD;
}

/* Polling sees a release only if no one took the lock again in between: a
 * real backend follows the holder (a futex word, a pub/sub message). */
static int tpl_wait_unlocked(void *self, const char *key, size_t klen, double timeout,
                             dp_err *err)
{
    return poll_lock(self, key, klen, timeout, 0, err);
}

/* -- Instances: made and freed by the core, one per name ---------------------- */

static int tpl_create(void *ud, const void *settings, void **self, dp_err *err)
{
    (void)ud;
    tpl *t = calloc(1, sizeof *t);
    if (!t)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    t->cfg = settings;
    uv_mutex_init(&t->mu);
    *self = t;
    return DP_OK;
}

static void tpl_destroy(void *self)
{
    tpl *t = self;
    for (int i = 0; i < NBUCKETS; i++)
        for (item *it = t->buckets[i], *next; it; it = next) {
            next = it->next;
            free(it);
        }
    for (held *h = t->locks, *next; h; h = next) {
        next = h->next;
        free(h);
    }
    uv_mutex_destroy(&t->mu);
    free(t);
}

static const dp_backend_ops tpl_ops = {
    .name = NAME,
    .args = tpl_args,
    .settings_size = sizeof(tpl_settings),
    .create = tpl_create,
    .destroy = tpl_destroy,
    .get = tpl_get,
    .set = tpl_set,
    .del = tpl_del,
    .stats = tpl_stats,
    .infallible = 1, /* get/set/del fail only on out-of-memory or a too-big value */
    .lock = tpl_lock,
    .unlock = tpl_unlock,
    .wait_unlocked = tpl_wait_unlocked,
};

/* -- Registration ------------------------------------------------------------
 * A host registers the backend itself (dp_template_register), or Lua does:
 * `require "dogpile.backends.template"`; then a region configured with
 * "dogpile.cache.template" opens it (no Lua file needed). */

int dp_template_register(void);
int luaopen_dogpile_backends_template(lua_State *L);

int dp_template_register(void)
{
    return dp_backend_register(&tpl_ops, NULL);
}

__attribute__((visibility("default"))) int luaopen_dogpile_backends_template(lua_State *L)
{
    int rc = dp_template_register();
    if (rc != DP_OK)
        return luaL_error(L, NAME ": cannot register the backend: %s", dp_strerror(rc));
    lua_pushstring(L, NAME);
    return 1;
}
