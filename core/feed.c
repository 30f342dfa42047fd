/* feed.c -- the change feed (dogpile_feed.h): per shared store, a ring of
 * changed keys that readers drain behind a one-word stamp.
 *
 * One mutex per feed orders pushes and reads; the stamp is bumped under it,
 * so the stamp a read reports matches the head it read up to exactly. The
 * hit path of a reader never takes the mutex: it loads the stamp (an atomic
 * word the feed never moves) and compares. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "dogpile_feed.h"

typedef struct entry {
    char *key;
    size_t klen, kcap;
    uint32_t origin;
    int32_t scope;
} entry;

struct dp_feed {
    struct dp_feed *next;
    char *name;
    size_t nlen;
    int refs;               /* under registry_mu */
    uv_mutex_t mu;          /* everything below */
    size_t cap;
    entry *ring;
    uint64_t head;          /* seq of the next entry pushed */
    uint64_t epoch;
    double reset_at;
    _Atomic uint32_t stamp;
};

/* -- Registry ------------------------------------------------------------ */

static dp_feed *feeds;
static uv_mutex_t registry_mu;
static uv_once_t registry_once = UV_ONCE_INIT;

static void registry_init(void)
{
    uv_mutex_init(&registry_mu);
}

static void feed_free(dp_feed *f)
{
    for (size_t i = 0; i < f->cap; i++)
        free(f->ring[i].key);
    free(f->ring);
    free(f->name);
    uv_mutex_destroy(&f->mu);
    free(f);
}

DP_API int dp_feed_open(const char *name, size_t len, size_t capacity, dp_feed **out)
{
    *out = NULL;
    if (!name || len == 0)
        return DP_EINVAL;
    uv_once(&registry_once, registry_init);
    uv_mutex_lock(&registry_mu);
    dp_feed *f;
    for (f = feeds; f; f = f->next)
        if (f->nlen == len && memcmp(f->name, name, len) == 0)
            break;
    if (f) {
        f->refs++;
        uv_mutex_unlock(&registry_mu);
        *out = f;
        return DP_OK;
    }
    f = calloc(1, sizeof *f);
    size_t cap = capacity ? capacity : DP_FEED_CAPACITY;
    if (f) {
        f->name = malloc(len);
        f->ring = calloc(cap, sizeof *f->ring);
    }
    if (!f || !f->name || !f->ring) {
        uv_mutex_unlock(&registry_mu);
        if (f) {
            free(f->name);
            free(f->ring);
            free(f);
        }
        return DP_ENOMEM;
    }
    memcpy(f->name, name, len);
    f->nlen = len;
    f->cap = cap;
    f->refs = 1;
    /* Epoch 1, not 0: a cursor zeroed by its owner and never initialised
     * resets at its first read rather than trusting nothing. */
    f->epoch = 1;
    f->reset_at = dp_clock_now();
    uv_mutex_init(&f->mu);
    f->next = feeds;
    feeds = f;
    uv_mutex_unlock(&registry_mu);
    *out = f;
    return DP_OK;
}

DP_API void dp_feed_close(dp_feed *f)
{
    if (!f)
        return;
    uv_mutex_lock(&registry_mu);
    int last = --f->refs == 0;
    if (last) {
        dp_feed **pp = &feeds;
        while (*pp != f)
            pp = &(*pp)->next;
        *pp = f->next;
    }
    uv_mutex_unlock(&registry_mu);
    if (last)
        feed_free(f);
}

DP_API const volatile uint32_t *dp_feed_stamp(dp_feed *f)
{
    return (const volatile uint32_t *)&f->stamp;
}

/* -- Producers ------------------------------------------------------------ */

static void reset_locked(dp_feed *f)
{
    f->epoch++;
    f->reset_at = dp_clock_now();
    atomic_fetch_add_explicit(&f->stamp, 1, memory_order_release);
}

DP_API int dp_feed_push(dp_feed *f, const char *key, size_t klen, uint32_t origin, int scope)
{
    uv_mutex_lock(&f->mu);
    entry *e = &f->ring[f->head % f->cap];
    int rc = DP_OK;
    if (e->kcap < klen || !e->key) {
        size_t want = klen < 32 ? 32 : klen;
        char *p = realloc(e->key, want);
        if (!p) {
            rc = DP_ENOMEM;
        } else {
            e->key = p;
            e->kcap = want;
        }
    }
    if (rc == DP_OK) {
        memcpy(e->key, key, klen);
        e->klen = klen;
        e->origin = origin;
        e->scope = scope;
        f->head++;
        atomic_fetch_add_explicit(&f->stamp, 1, memory_order_release);
    } else {
        /* The change must not go unseen: every reader drops everything. */
        reset_locked(f);
    }
    uv_mutex_unlock(&f->mu);
    return rc;
}

DP_API void dp_feed_reset(dp_feed *f)
{
    uv_mutex_lock(&f->mu);
    reset_locked(f);
    uv_mutex_unlock(&f->mu);
}

/* -- Readers -------------------------------------------------------------- */

static void catch_up_locked(dp_feed *f, dp_feed_cursor *c)
{
    c->seq = f->head;
    c->epoch = f->epoch;
    c->stamp = atomic_load_explicit(&f->stamp, memory_order_relaxed);
    c->reset_at = f->reset_at;
    c->more = 0;
}

DP_API void dp_feed_cursor_init(dp_feed *f, dp_feed_cursor *c)
{
    uv_mutex_lock(&f->mu);
    catch_up_locked(f, c);
    c->reset = 0;
    uv_mutex_unlock(&f->mu);
}

DP_API int dp_feed_read(dp_feed *f, dp_feed_cursor *c, dp_bytes *keys, size_t *lens,
                        int32_t *scopes, size_t max, size_t *n)
{
    *n = 0;
    keys->len = 0;
    c->reset = 0;
    c->more = 0;
    int rc = DP_OK;
    uv_mutex_lock(&f->mu);
    if (c->epoch != f->epoch || f->head - c->seq > f->cap || c->seq > f->head) {
        catch_up_locked(f, c);
        c->reset = 1;
        uv_mutex_unlock(&f->mu);
        return DP_OK;
    }
    size_t got = 0;
    uint64_t seq = c->seq;
    for (; seq < f->head && got < max; seq++) {
        const entry *e = &f->ring[seq % f->cap];
        if (c->origin && e->origin == c->origin)
            continue;
        if (dp_bytes_reserve(keys, keys->len + e->klen) != DP_OK) {
            rc = DP_ENOMEM;
            break;
        }
        memcpy(keys->data + keys->len, e->key, e->klen);
        keys->len += e->klen;
        lens[got] = e->klen;
        scopes[got] = e->scope;
        got++;
    }
    if (rc != DP_OK) {
        catch_up_locked(f, c);
        c->reset = 1;
        got = 0;
        keys->len = 0;
    } else if (seq < f->head) {
        c->seq = seq;
        c->more = 1;
    } else {
        catch_up_locked(f, c);
    }
    uv_mutex_unlock(&f->mu);
    *n = got;
    return rc;
}
