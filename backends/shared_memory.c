/* shared_memory.c -- dogpile.cache.shared_memory: one bounded store per name,
 * shared by every Lua state and thread of the process.
 *
 * Layout. The index is a hash table split into shards, under one "big
 * reader" lock: each thread reads under a reader count of its own (a slot on
 * its own cache line, found by a thread-local index), and a writer raises a
 * flag and waits for every slot to drain. A hit thus writes only its own
 * slot: readers of any keys, the same key included, run in parallel, and
 * writers (rarer, already serialized on the queues) pay for it. The eviction
 * order lives apart, in queues under one mutex that only writers take:
 *
 *  - "s3fifo" (default): S3-FIFO (Yang et al., SOSP'23). New keys enter a
 *    small FIFO (10% of the bound); a hit only bumps a 2-bit counter with an
 *    atomic, so reads never touch the queues. Leaving the small queue, a key
 *    that was hit moves to the main FIFO, one that was not is forgotten but
 *    remembered in a ghost table, and comes back straight into main if it is
 *    set again soon. The main FIFO gives hit keys another round (counter - 1).
 *    Scan-resistant, and better than LRU on skewed traces (bench/eviction.lua).
 *  - "lru": exact least-recently-used. A hit moves the key to the front, which
 *    takes the queue mutex: reads serialize on it.
 *
 * The index lock and the queue mutex are never held together. An entry carries
 * two references, one for the index and one for the queues; whoever drops the
 * last frees it. An evicted entry is taken off the queues first (its bytes
 * leave the budget at once) and off the index right after.
 *
 * Expiry. With `expiration_time`, an entry older than that is a miss, and
 * expired entries at the old end of the queues are dropped before anything
 * fresh is evicted.
 */
#include <sched.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include <lauxlib.h>
#include <lua.h>

#include "dogpile.h"

#define NAME "dogpile.cache.shared_memory"
#define NSHARDS 16
#define NSLOTS 32 /* reader slots; threads beyond share them (still correct) */
#define GHOST_SLOTS_MIN 64

enum { Q_NONE, Q_SMALL, Q_MAIN };
enum { POLICY_S3FIFO, POLICY_LRU };

typedef struct entry {
    struct entry *hnext;            /* index chain (index lock) */
    struct entry *qprev, *qnext;    /* queue links (queue mutex) */
    uint64_t hash;
    double expires;                 /* wall-clock; 0: never */
    size_t klen, vlen, size;
    _Atomic int refs;               /* index + queue + transient readers */
    _Atomic uint8_t freq;           /* S3-FIFO hit counter, 0..3 */
    uint8_t queue;                  /* Q_* (queue mutex) */
    _Atomic uint8_t indexed;        /* still in the index */
    char data[];                    /* key, then value */
} entry;

typedef struct shard {
    entry **buckets;
    size_t nbuckets, count;
} shard;

typedef struct queue {
    entry *head, *tail; /* head: newest (or most recently used) */
    size_t items, bytes;
} queue;

/* One reader slot, alone on its cache line. */
typedef struct slot {
    _Alignas(64) _Atomic int readers;
    _Atomic uint64_t hits, misses;
} slot;

/* The arguments, read by the core from the table below. */
typedef struct shm_settings {
    dp_str name;                  /* any bytes */
    int64_t max_bytes, max_items; /* 0: unbounded */
    double ttl;                   /* 0: none */
    int policy;                   /* POLICY_* */
} shm_settings;

static const char *const policies[] = {"s3fifo", "lru", NULL};

static const dp_arg_spec shm_args[] = {
    {.name = "name", .kind = DP_SPEC_BYTES, .flags = DP_SPEC_KEY, .min = 1, .def_str = "default",
     .offset = offsetof(shm_settings, name)},
    {.name = "max_bytes", .kind = DP_SPEC_SIZE, .flags = DP_SPEC_ABOVE_MIN,
     .offset = offsetof(shm_settings, max_bytes)},
    {.name = "max_items", .kind = DP_SPEC_INT, .min = 1,
     .offset = offsetof(shm_settings, max_items)},
    {.name = "expiration_time", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_ABOVE_MIN,
     .offset = offsetof(shm_settings, ttl)},
    {.name = "eviction", .kind = DP_SPEC_ENUM, .choices = policies, .def = POLICY_S3FIFO,
     .offset = offsetof(shm_settings, policy)},
    {0},
};

typedef struct shm {
    const char *name;               /* the core's settings: live until destroy */
    double max_bytes, max_items, ttl;
    int policy;
    shard shards[NSHARDS];
    slot slots[NSLOTS];
    _Alignas(64) _Atomic int writer; /* a writer holds or wants the index */
    uv_mutex_t wmu;                  /* orders writers */
    uv_mutex_t qmu;
    queue small, main;
    uint64_t *ghost; /* S3-FIFO: hashes of keys recently dropped from small */
    size_t ghost_slots;
    _Atomic uint64_t evictions, expirations;
} shm;

/* -- Hashing and entries ------------------------------------------------- */

static uint64_t hash_key(const char *key, size_t len)
{
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 31);
}

static void entry_unref(entry *e)
{
    if (atomic_fetch_sub(&e->refs, 1) == 1)
        free(e);
}

/* -- The index lock ---------------------------------------------------------
 * Dekker-style: a reader counts itself in, then looks for a writer; a writer
 * raises its flag, then waits for the counts. With sequentially consistent
 * operations at least one of them sees the other. Both critical sections are
 * a few hash probes and a memcpy, so waiting spins, then yields; it never
 * sleeps on a futex. */

static _Atomic unsigned next_slot;
static _Thread_local unsigned my_slot_plus_one;

static slot *slot_of_thread(shm *s)
{
    if (!my_slot_plus_one)
        my_slot_plus_one = atomic_fetch_add(&next_slot, 1) % NSLOTS + 1;
    return &s->slots[my_slot_plus_one - 1];
}

/* The other side's section is a few probes and a memcpy: spin briefly (a
 * syscall would cost more than the wait), then yield. */
static void backoff(unsigned *n)
{
    if (++*n < 256) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    } else {
        sched_yield();
    }
}

static slot *rd_lock(shm *s)
{
    slot *sl = slot_of_thread(s);
    for (;;) {
        atomic_fetch_add(&sl->readers, 1);
        if (!atomic_load(&s->writer))
            return sl;
        atomic_fetch_sub_explicit(&sl->readers, 1, memory_order_release);
        unsigned n = 0;
        while (atomic_load_explicit(&s->writer, memory_order_acquire))
            backoff(&n);
    }
}

/* A slot's counters are written by its own thread (by several only past
 * NSLOTS threads, where a lost count is harmless): a plain load and store,
 * not a locked read-modify-write on every hit. */
static void slot_count(_Atomic uint64_t *c)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static void rd_unlock(slot *sl)
{
    atomic_fetch_sub_explicit(&sl->readers, 1, memory_order_release);
}

static void wr_lock(shm *s)
{
    uv_mutex_lock(&s->wmu);
    atomic_store(&s->writer, 1);
    /* Only slots handed out so far can hold readers; a thread that takes a
     * new slot after this load still sees the flag (the order is total). */
    unsigned used = atomic_load(&next_slot);
    for (unsigned i = 0; i < (used < NSLOTS ? used : NSLOTS); i++) {
        unsigned n = 0;
        while (atomic_load(&s->slots[i].readers) != 0)
            backoff(&n);
    }
}

static void wr_unlock(shm *s)
{
    atomic_store_explicit(&s->writer, 0, memory_order_release);
    uv_mutex_unlock(&s->wmu);
}

static shard *shard_for(shm *s, uint64_t h)
{
    return &s->shards[h & (NSHARDS - 1)];
}

static entry **index_slot(shard *sh, uint64_t h, const char *key, size_t klen)
{
    if (!sh->nbuckets)
        return NULL;
    entry **pp = &sh->buckets[(h >> 4) & (sh->nbuckets - 1)];
    for (; *pp; pp = &(*pp)->hnext) {
        entry *e = *pp;
        if (e->hash == h && e->klen == klen && memcmp(e->data, key, klen) == 0)
            return pp;
    }
    return pp;
}

static void index_grow(shard *sh)
{
    size_t n = sh->nbuckets ? sh->nbuckets * 2 : 64;
    entry **b = calloc(n, sizeof *b);
    if (!b)
        return; /* chains get longer; correctness does not depend on it */
    for (size_t i = 0; i < sh->nbuckets; i++) {
        entry *e = sh->buckets[i];
        while (e) {
            entry *next = e->hnext;
            size_t j = (e->hash >> 4) & (n - 1);
            e->hnext = b[j];
            b[j] = e;
            e = next;
        }
    }
    free(sh->buckets);
    sh->buckets = b;
    sh->nbuckets = n;
}

/* Unlinks `e` from its shard's index if it is still there (index locked for
 * writing). Returns 1 if it was. */
static int index_remove_locked(shard *sh, entry *e)
{
    entry **pp = index_slot(sh, e->hash, e->data, e->klen);
    if (!pp || *pp != e)
        return 0;
    *pp = e->hnext;
    sh->count--;
    atomic_store(&e->indexed, 0);
    return 1;
}

/* -- Queues (queue mutex held) --------------------------------------------- */

static void q_push(queue *q, entry *e)
{
    e->qprev = NULL;
    e->qnext = q->head;
    if (q->head)
        q->head->qprev = e;
    q->head = e;
    if (!q->tail)
        q->tail = e;
    q->items++;
    q->bytes += e->size;
}

static void q_unlink(queue *q, entry *e)
{
    if (e->qprev)
        e->qprev->qnext = e->qnext;
    else
        q->head = e->qnext;
    if (e->qnext)
        e->qnext->qprev = e->qprev;
    else
        q->tail = e->qprev;
    e->qprev = e->qnext = NULL;
    q->items--;
    q->bytes -= e->size;
}

static queue *queue_of(shm *s, entry *e)
{
    return e->queue == Q_SMALL ? &s->small : e->queue == Q_MAIN ? &s->main : NULL;
}

static size_t used_items(shm *s)
{
    return s->small.items + s->main.items;
}

static size_t used_bytes(shm *s)
{
    return s->small.bytes + s->main.bytes;
}

static int over_budget(shm *s, size_t extra_items, size_t extra_bytes)
{
    return (s->max_items > 0 && (double)(used_items(s) + extra_items) > s->max_items) ||
           (s->max_bytes > 0 && (double)(used_bytes(s) + extra_bytes) > s->max_bytes);
}

static int ghost_has(shm *s, uint64_t h)
{
    return s->ghost && s->ghost[h & (s->ghost_slots - 1)] == h;
}

static void ghost_put(shm *s, uint64_t h)
{
    if (s->ghost)
        s->ghost[h & (s->ghost_slots - 1)] = h;
}

/* Victims are collected under the queue mutex and taken off the index after
 * it is released. */
typedef struct victims {
    entry **v;
    size_t n, cap;
} victims;

static int victims_add(victims *vs, entry *e)
{
    if (vs->n == vs->cap) {
        size_t cap = vs->cap ? vs->cap * 2 : 8;
        entry **p = realloc(vs->v, cap * sizeof *p);
        if (!p)
            return -1;
        vs->v = p;
        vs->cap = cap;
    }
    vs->v[vs->n++] = e;
    return 0;
}

/* Takes `e` off its queue as a victim; its queue reference passes to `vs`. */
static void drop(shm *s, entry *e, victims *vs, int expired)
{
    q_unlink(queue_of(s, e), e);
    e->queue = Q_NONE;
    if (expired)
        atomic_fetch_add(&s->expirations, 1);
    else
        atomic_fetch_add(&s->evictions, 1);
    if (victims_add(vs, e) != 0) {
        /* No room to remember it: leave it in the index, unqueued; a later
         * set or delete of its key frees it. */
        entry_unref(e);
    }
}

static int expired_at(const entry *e, double now)
{
    return e->expires > 0 && now >= e->expires;
}

/* Evicts until an entry of `need_bytes` fits (queue mutex held). */
static void make_room(shm *s, size_t need_bytes, victims *vs)
{
    double now = s->ttl > 0 ? dp_clock_now() : 0;
    /* Expired entries at the old ends go first, whatever the bound. */
    if (s->ttl > 0) {
        queue *qs[2] = {&s->small, &s->main};
        for (int i = 0; i < 2; i++)
            for (int k = 0; k < 8 && qs[i]->tail && expired_at(qs[i]->tail, now); k++)
                drop(s, qs[i]->tail, vs, 1);
    }
    while (over_budget(s, 1, need_bytes) && used_items(s) > 0) {
        if (s->policy == POLICY_LRU) {
            drop(s, s->main.tail, vs, 0);
            continue;
        }
        int small_full = (s->max_items > 0 && (double)s->small.items >= 0.1 * s->max_items) ||
                         (s->max_bytes > 0 && (double)s->small.bytes >= 0.1 * s->max_bytes);
        if (s->small.tail && (small_full || !s->main.tail)) {
            entry *t = s->small.tail;
            if (atomic_load(&t->freq) > 0 && !expired_at(t, now)) {
                q_unlink(&s->small, t);
                atomic_store(&t->freq, 0);
                t->queue = Q_MAIN;
                q_push(&s->main, t);
            } else {
                ghost_put(s, t->hash);
                drop(s, t, vs, expired_at(t, now));
            }
        } else {
            entry *t = s->main.tail;
            uint8_t f = atomic_load(&t->freq);
            if (f > 0 && !expired_at(t, now)) {
                atomic_store(&t->freq, f - 1);
                q_unlink(&s->main, t);
                q_push(&s->main, t);
            } else {
                drop(s, t, vs, expired_at(t, now));
            }
        }
    }
}

/* Takes each victim off the index (no queue mutex held) and frees it. */
static void reap(shm *s, victims *vs)
{
    if (vs->n) {
        int *removed = calloc(vs->n, sizeof *removed);
        wr_lock(s);
        for (size_t i = 0; i < vs->n; i++) {
            int r = index_remove_locked(shard_for(s, vs->v[i]->hash), vs->v[i]);
            if (removed)
                removed[i] = r;
            else if (r)
                entry_unref(vs->v[i]); /* no room to defer: still referenced by the queue */
        }
        wr_unlock(s);
        for (size_t i = 0; i < vs->n; i++) {
            if (removed && removed[i])
                entry_unref(vs->v[i]);
            entry_unref(vs->v[i]); /* the queue reference */
        }
        free(removed);
    }
    free(vs->v);
}

/* -- Operations ------------------------------------------------------------ */

static int shm_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    shm *s = self;
    uint64_t h = hash_key(key, klen);
    shard *sh = shard_for(s, h);
    slot *sl = rd_lock(s);
    entry **pp = index_slot(sh, h, key, klen);
    entry *e = pp ? *pp : NULL;
    /* The coarse clock's upper bound first: the precise clock costs more
     * than the rest of a hit, and is needed only near the expiry. */
    if (!e || (e->expires > 0 && dp_clock_upper() >= e->expires && dp_clock_now() >= e->expires)) {
        rd_unlock(sl);
        slot_count(&sl->misses);
        return DP_ENOTFOUND;
    }
    if (dp_bytes_reserve(out, e->vlen) != DP_OK) {
        rd_unlock(sl);
        return dp_err_set(err, DP_ENOMEM, "out of memory copying a %zu-byte value", e->vlen);
    }
    if (e->vlen) /* an empty value into a buffer never grown: data is NULL */
        memcpy(out->data, e->data + e->klen, e->vlen);
    out->len = e->vlen;
    if (s->policy == POLICY_S3FIFO) {
        /* Written only until it saturates: a hot key's line stays shared. */
        uint8_t f = atomic_load_explicit(&e->freq, memory_order_relaxed);
        if (f < 3)
            atomic_store_explicit(&e->freq, f + 1, memory_order_relaxed);
        rd_unlock(sl);
    } else {
        atomic_fetch_add(&e->refs, 1);
        rd_unlock(sl);
        uv_mutex_lock(&s->qmu);
        if (e->queue == Q_MAIN && s->main.head != e) {
            q_unlink(&s->main, e);
            q_push(&s->main, e);
        }
        uv_mutex_unlock(&s->qmu);
        entry_unref(e);
    }
    slot_count(&sl->hits);
    return DP_OK;
}

static int shm_set(void *self, const char *key, size_t klen, const char *value, size_t vlen,
                   dp_err *err)
{
    shm *s = self;
    size_t size = sizeof(entry) + klen + vlen;
    if ((s->max_bytes > 0 && (double)size > s->max_bytes))
        return dp_err_set(err, DP_ETOOBIG,
                          "value of %zu bytes (%zu with its key and entry) is larger than "
                          "max_bytes %.0f of '%s'", vlen, size, s->max_bytes, s->name);
    entry *e = malloc(size);
    if (!e)
        return dp_err_set(err, DP_ENOMEM, "out of memory storing %zu bytes", size);
    e->hash = hash_key(key, klen);
    e->klen = klen;
    e->vlen = vlen;
    e->size = size;
    e->expires = s->ttl > 0 ? dp_clock_now() + s->ttl : 0;
    e->qprev = e->qnext = e->hnext = NULL;
    e->queue = Q_NONE;
    atomic_init(&e->refs, 2);
    atomic_init(&e->freq, 0);
    atomic_init(&e->indexed, 1);
    memcpy(e->data, key, klen);
    memcpy(e->data + klen, value, vlen);

    shard *sh = shard_for(s, e->hash);
    wr_lock(s);
    if (sh->count >= sh->nbuckets)
        index_grow(sh);
    entry **pp = index_slot(sh, e->hash, key, klen);
    if (!pp) {
        wr_unlock(s);
        free(e);
        return dp_err_set(err, DP_ENOMEM, "out of memory growing the index");
    }
    entry *old = *pp;
    if (old) {
        e->hnext = old->hnext;
        atomic_store(&old->indexed, 0);
    } else {
        sh->count++;
    }
    *pp = e;
    wr_unlock(s);

    victims vs = {0};
    uv_mutex_lock(&s->qmu);
    if (old && old->queue != Q_NONE) {
        q_unlink(queue_of(s, old), old);
        old->queue = Q_NONE;
        entry_unref(old); /* its queue reference */
    }
    if (atomic_load(&e->indexed)) {
        make_room(s, size, &vs);
        int to_main = s->policy == POLICY_LRU || ghost_has(s, e->hash);
        e->queue = to_main ? Q_MAIN : Q_SMALL;
        q_push(to_main ? &s->main : &s->small, e);
        uv_mutex_unlock(&s->qmu);
    } else {
        /* Deleted or replaced before it was queued. */
        uv_mutex_unlock(&s->qmu);
        entry_unref(e);
    }
    if (old)
        entry_unref(old); /* its index reference */
    reap(s, &vs);
    return DP_OK;
}

static int shm_del(void *self, const char *key, size_t klen, dp_err *err)
{
    (void)err;
    shm *s = self;
    uint64_t h = hash_key(key, klen);
    shard *sh = shard_for(s, h);
    wr_lock(s);
    entry **pp = index_slot(sh, h, key, klen);
    entry *e = pp ? *pp : NULL;
    if (e) {
        *pp = e->hnext;
        sh->count--;
        atomic_store(&e->indexed, 0);
    }
    wr_unlock(s);
    if (!e)
        return DP_OK;
    uv_mutex_lock(&s->qmu);
    int queued = e->queue != Q_NONE;
    if (queued) {
        q_unlink(queue_of(s, e), e);
        e->queue = Q_NONE;
    }
    uv_mutex_unlock(&s->qmu);
    if (queued)
        entry_unref(e);
    entry_unref(e);
    return DP_OK;
}

static void shm_stats(void *self, dp_backend_stats *out)
{
    shm *s = self;
    uv_mutex_lock(&s->qmu);
    out->items = (double)used_items(s);
    out->bytes = (double)used_bytes(s);
    uv_mutex_unlock(&s->qmu);
    out->max_items = s->max_items;
    out->max_bytes = s->max_bytes;
    for (int i = 0; i < NSLOTS; i++) {
        out->hits += (double)atomic_load(&s->slots[i].hits);
        out->misses += (double)atomic_load(&s->slots[i].misses);
    }
    out->evictions = (double)atomic_load(&s->evictions);
    out->expirations = (double)atomic_load(&s->expirations);
}

/* -- Instances (the core shares them: one per name) ------------------------------ */

static void shm_destroy(void *self)
{
    shm *s = self;
    for (int i = 0; i < NSHARDS; i++) {
        shard *sh = &s->shards[i];
        for (size_t b = 0; b < sh->nbuckets; b++) {
            entry *e = sh->buckets[b];
            while (e) {
                entry *next = e->hnext;
                free(e);
                e = next;
            }
        }
        free(sh->buckets);
    }
    uv_mutex_destroy(&s->wmu);
    uv_mutex_destroy(&s->qmu);
    free(s->ghost);
    free(s);
}

static int shm_create(void *ud, const void *settings, void **self, dp_err *err)
{
    (void)ud;
    const shm_settings *cfg = settings;
    /* A power of two: a ghost slot is then a mask, not a division per set. */
    size_t want = cfg->max_items > 0 ? (size_t)cfg->max_items : (size_t)(cfg->max_bytes / 256);
    size_t slots = GHOST_SLOTS_MIN;
    while (slots < want && slots < ((size_t)1 << 40))
        slots *= 2;
    /* The reader slots are cache-line aligned: calloc promises only 16. */
    size_t ssize = (sizeof(shm) + 63) / 64 * 64;
    shm *s = aligned_alloc(64, ssize);
    uint64_t *ghost = cfg->policy == POLICY_S3FIFO ? calloc(slots, sizeof *ghost) : NULL;
    if (!s || (cfg->policy == POLICY_S3FIFO && !ghost)) {
        free(s);
        free(ghost);
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory opening '%s'", cfg->name.data);
    }
    memset(s, 0, ssize);
    s->name = cfg->name.data;
    s->max_bytes = (double)cfg->max_bytes;
    s->max_items = (double)cfg->max_items;
    s->ttl = cfg->ttl;
    s->policy = cfg->policy;
    s->ghost = ghost;
    s->ghost_slots = slots;
    uv_mutex_init(&s->wmu);
    uv_mutex_init(&s->qmu);
    *self = s;
    return DP_OK;
}

static const dp_backend_ops shm_ops = {
    .name = NAME,
    .args = shm_args,
    .settings_size = sizeof(shm_settings),
    .create = shm_create,
    .destroy = shm_destroy,
    .get = shm_get,
    .set = shm_set,
    .del = shm_del,
    .stats = shm_stats,
    .infallible = 1,
};

/* -- Lua module ------------------------------------------------------------------
 * `require "dogpile.backends.shared_memory"` registers the ops with the core
 * (which pins this module: the registry keeps &shm_ops for the process's
 * life); lua/dogpile/cache/backends/shared_memory.lua opens instances. */

int luaopen_dogpile_backends_shared_memory(lua_State *L);

__attribute__((visibility("default"))) int luaopen_dogpile_backends_shared_memory(lua_State *L)
{
    int rc = dp_backend_register(&shm_ops, NULL);
    if (rc != DP_OK)
        return luaL_error(L, NAME ": cannot register the backend: %s", dp_strerror(rc));
    lua_pushstring(L, NAME);
    return 1;
}
