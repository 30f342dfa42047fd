/* shared_memory.c -- dogpile.cache.shared_memory: one bounded store per name,
 * shared by every Lua state and thread of the process.
 *
 * Layout. The index is a hash table split into shards. Each shard is an
 * open-addressing table of one-word slots (entry address and a 16-bit hash
 * tag; linear probing, eight slots to a cache line), so that a hit touches
 * one line of the index and then its entry, whose key follows its few hot
 * fields.
 *
 * Readers take no lock and write no shared line. A hit announces itself in a
 * reader slot of its own thread (its own cache line: an enter and an exit
 * count), probes the table with atomic loads and copies the value out.
 * Writers lock only their key's shard, and publish with atomic stores: a new
 * entry is written whole before its pointer is stored; a removed entry or a
 * replaced table is not freed but retired, and freed once every reader slot
 * has been seen past the moment of its removal (epoch-style reclamation
 * through the slots' counts). Reads thus never wait for writes, and writes to
 * different shards never wait for each other.
 *
 * The eviction order lives apart, in queues under one mutex that only writers
 * take (and lru hits):
 *
 *  - "s3fifo" (default): S3-FIFO (Yang et al., SOSP'23). New keys enter a
 *    small FIFO (10% of the bound); a hit only bumps a 2-bit counter, so reads
 *    never touch the queues. Leaving the small queue, a key that was hit moves
 *    to the main FIFO, one that was not is forgotten but remembered in a ghost
 *    table, and comes back straight into main if it is set again soon. The
 *    main FIFO gives hit keys another round (counter - 1). Scan-resistant,
 *    and better than LRU on skewed traces (bench/eviction.lua).
 *  - "lru": exact least-recently-used. A hit moves the key to the front, which
 *    takes the queue mutex: reads serialize on it.
 *
 * A shard lock and the queue mutex are never held together. An entry carries
 * two references, one for the index and one for the queues; whoever drops the
 * last retires it. An evicted entry is taken off the queues first (its bytes
 * leave the budget at once) and off the index right after.
 *
 * Expiry. With `expiration_time`, an entry older than that is a miss, and
 * expired entries at the old end of the queues are dropped before anything
 * fresh is evicted.
 */
#include <sched.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include <lauxlib.h>
#include <lua.h>

#include "dogpile.h"

#define NAME "dogpile.cache.shared_memory"
#define SHARD_BITS 6
#define NSHARDS (1 << SHARD_BITS)
#define NSLOTS 64 /* reader slots; threads beyond share them (still correct) */
#define GHOST_SLOTS_MIN 64
#define TABLE_MIN 16                  /* slots of a shard's first table */
#define RETIRE_BATCH 64               /* retired pointers per grace-period check */
#define RETIRE_PENDING_MAX 64         /* sealed batches before a writer waits */

enum { Q_NONE, Q_SMALL, Q_MAIN };
enum { POLICY_S3FIFO, POLICY_LRU };

/* The fields a hit reads come first, the key right after them: a hit on a
 * short key reads one or two cache lines of its entry. The queue links and
 * the bookkeeping follow the value (see cold_of), where only writers go. */
typedef struct entry {
    uint64_t hash;
    double expires; /* wall-clock; 0: never */
    size_t vlen;
    uint32_t klen;
    _Atomic uint8_t freq; /* S3-FIFO hit counter, 0..3 */
    char data[];          /* key, then value, then (aligned) the entry_cold */
} entry;

typedef struct entry_cold {
    struct entry *qprev, *qnext; /* queue links (queue mutex) */
    size_t size;                 /* the bytes the budget counts */
    _Atomic int refs;            /* index + queue + an lru hit in progress */
    uint8_t queue;               /* Q_* (queue mutex) */
    _Atomic uint8_t indexed;     /* still in the index */
} entry_cold;

static size_t cold_offset(size_t klen, size_t vlen)
{
    return (offsetof(entry, data) + klen + vlen + _Alignof(entry_cold) - 1) &
           ~(_Alignof(entry_cold) - 1);
}

static entry_cold *cold_of(entry *e)
{
    return (entry_cold *)((char *)e + cold_offset(e->klen, e->vlen));
}

/* One slot of a shard's table, one word read and written whole: the entry's
 * address in the low 48 bits (user addresses on x86-64 and arm64 Linux fit
 * there; shm_set checks), the top 16 bits of its key's hash above, so that a
 * probe passes other keys without reading their entries. Empty: 0. A removed
 * entry leaves a tombstone: the address becomes TOMB. Eight bytes a slot:
 * at 1e7 keys the index is a few hundred MB less to miss in. */
typedef _Atomic uint64_t islot;

#define ADDR_BITS 48
#define ADDR_MASK (((uint64_t)1 << ADDR_BITS) - 1)

static char tomb_mark;
#define TOMB ((entry *)&tomb_mark)

static uint64_t slot_word(entry *e, uint64_t h)
{
    return (h & ~ADDR_MASK) | (uint64_t)(uintptr_t)e;
}

static entry *word_entry(uint64_t w)
{
    return (entry *)(uintptr_t)(w & ADDR_MASK);
}

static int word_tag_is(uint64_t w, uint64_t h)
{
    return ((w ^ h) & ~ADDR_MASK) == 0;
}

typedef struct table {
    size_t mask;       /* slots - 1 */
    size_t used, live; /* non-empty slots (live + tombstones), live entries */
    islot slots[];
} table;

typedef struct shard {
    _Alignas(64) uv_mutex_t mu; /* writers of this shard */
    _Atomic(table *) tab;
} shard;

typedef struct queue {
    entry *head, *tail; /* head: newest (or most recently used) */
    size_t items, bytes;
} queue;

/* One reader slot, alone on its cache line: sections entered and left. */
typedef struct slot {
    _Alignas(64) _Atomic uint64_t enters;
    _Atomic uint64_t exits;
    _Atomic uint64_t hits, misses;
} slot;

/* Retired pointers (entries; tables with the low bit set), freed once every
 * reader slot has passed `snap`. */
typedef struct batch {
    struct batch *next;
    size_t n;
    uint64_t snap[NSLOTS];
    void *items[RETIRE_BATCH];
} batch;

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
    _Alignas(64) uv_mutex_t qmu;
    queue small, main;
    uint64_t *ghost; /* S3-FIFO: hashes of keys recently dropped from small */
    size_t ghost_slots;
    _Atomic uint64_t evictions, expirations;
    _Alignas(64) uv_mutex_t rmu; /* the retired lists */
    batch *cur;                  /* filling */
    batch *pending, *pending_tail; /* sealed, oldest first */
    size_t npending;
} shm;

/* -- Hashing ----------------------------------------------------------------- */

static uint64_t hash_key(const char *key, size_t len)
{
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 1099511628211ULL;
    }
    /* FNV's low bits mix poorly; the shard and the slot are taken from them. */
    h ^= h >> 32;
    h *= 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    return h ? h : 1; /* 0 marks an empty slot */
}

/* -- Reader slots -------------------------------------------------------------
 * A reader counts itself in (a sequentially consistent read-modify-write on
 * its own line), reads, and counts itself out. A writer that took pointers
 * out of the index, then fenced, then read every slot's `enters` knows that
 * any reader not counted there sees the index without them; it frees them
 * once each slot's `exits` reached that count. A slot shared by several
 * threads (past NSLOTS of them) must be seen idle instead: a later section of
 * one thread can leave before an earlier one of another. */

static _Atomic unsigned next_slot;
static _Thread_local unsigned my_slot_plus_one;

static slot *slot_of_thread(shm *s)
{
    if (!my_slot_plus_one)
        my_slot_plus_one = atomic_fetch_add(&next_slot, 1) % NSLOTS + 1;
    return &s->slots[my_slot_plus_one - 1];
}

static slot *rd_enter(shm *s)
{
    slot *sl = slot_of_thread(s);
    atomic_fetch_add(&sl->enters, 1);
    return sl;
}

static void rd_exit(slot *sl)
{
    atomic_fetch_add_explicit(&sl->exits, 1, memory_order_release);
}

/* A slot's counters are written by its own thread (by several only past
 * NSLOTS threads, where a lost count is harmless): a plain load and store,
 * not a locked read-modify-write on every hit. */
static void slot_count(_Atomic uint64_t *c)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static unsigned slots_in_use(void)
{
    unsigned used = atomic_load(&next_slot);
    return used < NSLOTS ? used : NSLOTS;
}

/* Records, after the pointers in question left the index, what each reader
 * slot has entered so far. */
static void grace_start(shm *s, uint64_t *snap)
{
    atomic_thread_fence(memory_order_seq_cst);
    unsigned n = slots_in_use();
    for (unsigned i = 0; i < NSLOTS; i++)
        snap[i] = i < n ? atomic_load(&s->slots[i].enters) : 0;
}

/* Have all the readers counted in `snap` left? */
static int grace_over(shm *s, const uint64_t *snap)
{
    int shared = atomic_load(&next_slot) > NSLOTS;
    for (unsigned i = 0; i < NSLOTS; i++) {
        if (!snap[i])
            continue;
        uint64_t out = atomic_load_explicit(&s->slots[i].exits, memory_order_acquire);
        if (out < snap[i])
            return 0;
        /* exits read before enters: equal means idle at that read */
        if (shared && out != atomic_load(&s->slots[i].enters))
            return 0;
    }
    return 1;
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

static void grace_wait(shm *s, const uint64_t *snap)
{
    unsigned n = 0;
    while (!grace_over(s, snap))
        backoff(&n);
}

/* -- Tables ------------------------------------------------------------------ */

/* calloc: glibc maps big tables afresh (zeroed pages). Asking huge pages
 * for them (an aligned mmap, MADV_HUGEPAGE) made hits at 1e7 keys slower on
 * the development VM (2.5 us against 0.9), so the tables take plain pages. */
static table *table_new(size_t nslots)
{
    table *t = calloc(1, sizeof(table) + nslots * sizeof(islot));
    if (t)
        t->mask = nslots - 1;
    return t;
}

static void table_free(table *t)
{
    free(t);
}

/* The live entry of `key` in `t`, or NULL (reader section or shard lock). */
static entry *table_find(table *t, uint64_t h, const char *key, size_t klen)
{
    for (size_t i = (h >> SHARD_BITS) & t->mask;; i = (i + 1) & t->mask) {
        uint64_t w = atomic_load_explicit(&t->slots[i], memory_order_acquire);
        if (w == 0)
            return NULL; /* slots never become empty again: the key is not further on */
        if (word_tag_is(w, h)) {
            entry *e = word_entry(w);
            if (e != TOMB && e->hash == h && e->klen == klen && memcmp(e->data, key, klen) == 0)
                return e;
        }
    }
}

/* The slot holding `key` (*found = 1), or the one a new key goes to (the
 * first tombstone on the way, or the empty slot that ends it). Shard lock. */
static islot *table_slot(table *t, uint64_t h, const char *key, size_t klen, int *found)
{
    islot *reuse = NULL;
    for (size_t i = (h >> SHARD_BITS) & t->mask;; i = (i + 1) & t->mask) {
        islot *sl = &t->slots[i];
        uint64_t w = atomic_load_explicit(sl, memory_order_relaxed);
        if (w == 0) {
            *found = 0;
            return reuse ? reuse : sl;
        }
        entry *e = word_entry(w);
        if (e == TOMB) {
            if (!reuse)
                reuse = sl;
        } else if (word_tag_is(w, h) && e->hash == h && e->klen == klen &&
                   memcmp(e->data, key, klen) == 0) {
            *found = 1;
            return sl;
        }
    }
}

/* The slot holding `e` itself, or NULL. Shard lock. */
static islot *table_slot_of(table *t, entry *e)
{
    if (!t)
        return NULL;
    for (size_t i = (e->hash >> SHARD_BITS) & t->mask;; i = (i + 1) & t->mask) {
        islot *sl = &t->slots[i];
        uint64_t w = atomic_load_explicit(sl, memory_order_relaxed);
        if (w == 0)
            return NULL;
        if (word_entry(w) == e)
            return sl;
    }
}

/* A copy of `t`'s live entries in a table sized for `live + 1` of them at
 * most half full (tombstones dropped). Shard lock. */
static table *table_rebuilt(table *t)
{
    size_t live = t ? t->live : 0, n = TABLE_MIN;
    while (n < 2 * (live + 1))
        n *= 2;
    table *nt = table_new(n);
    if (!nt)
        return NULL;
    for (size_t i = 0; t && i <= t->mask; i++) {
        uint64_t w = atomic_load_explicit(&t->slots[i], memory_order_relaxed);
        entry *e = word_entry(w);
        if (!w || e == TOMB)
            continue;
        size_t j = (e->hash >> SHARD_BITS) & nt->mask;
        while (atomic_load_explicit(&nt->slots[j], memory_order_relaxed))
            j = (j + 1) & nt->mask;
        atomic_store_explicit(&nt->slots[j], w, memory_order_relaxed);
    }
    nt->used = nt->live = live;
    return nt;
}

/* -- Retiring ------------------------------------------------------------------ */

static void free_retired(void *p)
{
    if ((uintptr_t)p & 1)
        table_free((table *)((uintptr_t)p & ~(uintptr_t)1));
    else
        free(p);
}

static void batch_free(batch *b)
{
    for (size_t i = 0; i < b->n; i++)
        free_retired(b->items[i]);
    free(b);
}

/* Frees the sealed batches whose readers have left (rmu held); with `wait`,
 * waits for the oldest one first. */
static void reclaim_locked(shm *s, int wait)
{
    if (wait && s->pending)
        grace_wait(s, s->pending->snap);
    while (s->pending && grace_over(s, s->pending->snap)) {
        batch *b = s->pending;
        s->pending = b->next;
        if (!s->pending)
            s->pending_tail = NULL;
        s->npending--;
        batch_free(b);
    }
}

/* `p` (an entry, or a table with the low bit set) has left the index: frees
 * it once no reader can still hold it. No reader waits on any lock, so
 * waiting here (rarely: past RETIRE_PENDING_MAX batches, or with no memory
 * for a batch) cannot deadlock, whatever the caller holds. */
static void retire(shm *s, void *p)
{
    uv_mutex_lock(&s->rmu);
    if (!s->cur) {
        s->cur = malloc(sizeof *s->cur);
        if (!s->cur) {
            /* No memory to defer it: wait for the readers now. */
            uint64_t snap[NSLOTS];
            grace_start(s, snap);
            grace_wait(s, snap);
            uv_mutex_unlock(&s->rmu);
            free_retired(p);
            return;
        }
        s->cur->n = 0;
        s->cur->next = NULL;
    }
    s->cur->items[s->cur->n++] = p;
    if (s->cur->n == RETIRE_BATCH) {
        batch *b = s->cur;
        s->cur = NULL;
        grace_start(s, b->snap);
        if (s->pending_tail)
            s->pending_tail->next = b;
        else
            s->pending = b;
        s->pending_tail = b;
        s->npending++;
        reclaim_locked(s, s->npending > RETIRE_PENDING_MAX);
    }
    uv_mutex_unlock(&s->rmu);
}

static void entry_unref(shm *s, entry *e)
{
    if (atomic_fetch_sub(&cold_of(e)->refs, 1) == 1)
        retire(s, e);
}

/* A reference for an lru hit, unless the entry is already on its way out. */
static int entry_ref_if_live(entry *e)
{
    _Atomic int *r = &cold_of(e)->refs;
    int n = atomic_load_explicit(r, memory_order_relaxed);
    while (n > 0)
        if (atomic_compare_exchange_weak(r, &n, n + 1))
            return 1;
    return 0;
}

static shard *shard_for(shm *s, uint64_t h)
{
    return &s->shards[h & (NSHARDS - 1)];
}

/* Takes `e` off its shard's index if it is still there. Returns 1 if it was
 * (the index's reference is then the caller's to drop). */
static int index_remove(shm *s, entry *e)
{
    shard *sh = shard_for(s, e->hash);
    uv_mutex_lock(&sh->mu);
    table *t = atomic_load_explicit(&sh->tab, memory_order_relaxed);
    islot *sl = table_slot_of(t, e);
    if (sl) {
        atomic_store_explicit(sl, slot_word(TOMB, e->hash), memory_order_release);
        t->live--;
        atomic_store(&cold_of(e)->indexed, 0);
    }
    uv_mutex_unlock(&sh->mu);
    return sl != NULL;
}

/* -- Queues (queue mutex held) --------------------------------------------- */

static void q_push(queue *q, entry *e)
{
    entry_cold *c = cold_of(e);
    c->qprev = NULL;
    c->qnext = q->head;
    if (q->head)
        cold_of(q->head)->qprev = e;
    q->head = e;
    if (!q->tail)
        q->tail = e;
    q->items++;
    q->bytes += c->size;
}

static void q_unlink(queue *q, entry *e)
{
    entry_cold *c = cold_of(e);
    if (c->qprev)
        cold_of(c->qprev)->qnext = c->qnext;
    else
        q->head = c->qnext;
    if (c->qnext)
        cold_of(c->qnext)->qprev = c->qprev;
    else
        q->tail = c->qprev;
    c->qprev = c->qnext = NULL;
    q->items--;
    q->bytes -= c->size;
}

static queue *queue_of(shm *s, entry *e)
{
    uint8_t q = cold_of(e)->queue;
    return q == Q_SMALL ? &s->small : q == Q_MAIN ? &s->main : NULL;
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
    cold_of(e)->queue = Q_NONE;
    if (expired)
        atomic_fetch_add(&s->expirations, 1);
    else
        atomic_fetch_add(&s->evictions, 1);
    if (victims_add(vs, e) != 0) {
        /* No room to remember it: leave it in the index, unqueued; a later
         * set or delete of its key frees it. */
        entry_unref(s, e);
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
                cold_of(t)->queue = Q_MAIN;
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

/* Takes each victim off the index (no queue mutex held) and drops its
 * references. */
static void reap(shm *s, victims *vs)
{
    for (size_t i = 0; i < vs->n; i++) {
        entry *e = vs->v[i];
        if (index_remove(s, e))
            entry_unref(s, e); /* the index reference */
        entry_unref(s, e);     /* the queue reference */
    }
    free(vs->v);
}

/* -- Operations ------------------------------------------------------------ */

static int shm_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    shm *s = self;
    uint64_t h = hash_key(key, klen);
    shard *sh = shard_for(s, h);
    slot *sl = rd_enter(s);
    table *t = atomic_load_explicit(&sh->tab, memory_order_acquire);
    entry *e = t ? table_find(t, h, key, klen) : NULL;
    /* The coarse clock's upper bound first: the precise clock costs more
     * than the rest of a hit, and is needed only near the expiry. */
    if (!e || (e->expires > 0 && dp_clock_upper() >= e->expires && dp_clock_now() >= e->expires)) {
        rd_exit(sl);
        slot_count(&sl->misses);
        return DP_ENOTFOUND;
    }
    if (dp_bytes_reserve(out, e->vlen) != DP_OK) {
        size_t vlen = e->vlen;
        rd_exit(sl);
        return dp_err_set(err, DP_ENOMEM, "out of memory copying a %zu-byte value", vlen);
    }
    if (e->vlen) /* an empty value into a buffer never grown: data is NULL */
        memcpy(out->data, e->data + e->klen, e->vlen);
    out->len = e->vlen;
    if (s->policy == POLICY_S3FIFO) {
        /* Written only until it saturates: a hot key's line stays shared. */
        uint8_t f = atomic_load_explicit(&e->freq, memory_order_relaxed);
        if (f < 3)
            atomic_store_explicit(&e->freq, f + 1, memory_order_relaxed);
        rd_exit(sl);
    } else {
        int held = entry_ref_if_live(e);
        rd_exit(sl);
        if (held) {
            entry_cold *c = cold_of(e);
            uv_mutex_lock(&s->qmu);
            if (c->queue == Q_MAIN && s->main.head != e) {
                q_unlink(&s->main, e);
                q_push(&s->main, e);
            }
            uv_mutex_unlock(&s->qmu);
            entry_unref(s, e);
        }
    }
    slot_count(&sl->hits);
    return DP_OK;
}

static int shm_set(void *self, const char *key, size_t klen, const char *value, size_t vlen,
                   dp_err *err)
{
    shm *s = self;
    if (klen > UINT32_MAX)
        return dp_err_set(err, DP_ETOOBIG, "key of %zu bytes is longer than %u", klen,
                          (unsigned)UINT32_MAX);
    size_t cold = cold_offset(klen, vlen);
    size_t size = cold + sizeof(entry_cold);
    if ((s->max_bytes > 0 && (double)size > s->max_bytes))
        return dp_err_set(err, DP_ETOOBIG,
                          "value of %zu bytes (%zu with its key and entry) is larger than "
                          "max_bytes %.0f of '%s'", vlen, size, s->max_bytes, s->name);
    entry *e = malloc(size);
    if (!e)
        return dp_err_set(err, DP_ENOMEM, "out of memory storing %zu bytes", size);
    if ((uintptr_t)e > ADDR_MASK || (uintptr_t)TOMB > ADDR_MASK) {
        free(e);
        return dp_err_set(err, DP_ENOMEM, "malloc gave an address above 2^%d, which the index "
                          "cannot hold", ADDR_BITS);
    }
    e->hash = hash_key(key, klen);
    e->klen = (uint32_t)klen;
    e->vlen = vlen;
    e->expires = s->ttl > 0 ? dp_clock_now() + s->ttl : 0;
    atomic_init(&e->freq, 0);
    memcpy(e->data, key, klen);
    memcpy(e->data + klen, value, vlen);
    entry_cold *c = cold_of(e);
    c->size = size;
    c->qprev = c->qnext = NULL;
    c->queue = Q_NONE;
    atomic_init(&c->refs, 2);
    atomic_init(&c->indexed, 1);

    shard *sh = shard_for(s, e->hash);
    table *old_table = NULL;
    uv_mutex_lock(&sh->mu);
    table *t = atomic_load_explicit(&sh->tab, memory_order_relaxed);
    /* At most three quarters of the slots used (tombstones included): probes
     * stay short, and always end at an empty slot. */
    if (!t || 4 * (t->used + 1) > 3 * (t->mask + 1)) {
        table *nt = table_rebuilt(t);
        if (nt) {
            atomic_store_explicit(&sh->tab, nt, memory_order_release);
            old_table = t;
            t = nt;
        } else if (!t || t->used + 1 >= t->mask) {
            uv_mutex_unlock(&sh->mu);
            free(e);
            return dp_err_set(err, DP_ENOMEM, "out of memory growing the index");
        }
    }
    int found;
    islot *isl = table_slot(t, e->hash, key, klen, &found);
    entry *old = NULL;
    if (found) {
        old = word_entry(atomic_load_explicit(isl, memory_order_relaxed));
        atomic_store(&cold_of(old)->indexed, 0);
    } else {
        if (atomic_load_explicit(isl, memory_order_relaxed) == 0)
            t->used++;
        t->live++;
    }
    /* Release: a reader that sees the word sees the entry written. */
    atomic_store_explicit(isl, slot_word(e, e->hash), memory_order_release);
    uv_mutex_unlock(&sh->mu);
    if (old_table)
        retire(s, (void *)((uintptr_t)old_table | 1));

    victims vs = {0};
    uv_mutex_lock(&s->qmu);
    int old_queued = 0;
    if (old && cold_of(old)->queue != Q_NONE) {
        q_unlink(queue_of(s, old), old);
        cold_of(old)->queue = Q_NONE;
        old_queued = 1;
    }
    int queued = 0;
    if (atomic_load(&c->indexed)) {
        make_room(s, size, &vs);
        int to_main = s->policy == POLICY_LRU || ghost_has(s, e->hash);
        c->queue = to_main ? Q_MAIN : Q_SMALL;
        q_push(to_main ? &s->main : &s->small, e);
        queued = 1;
    }
    uv_mutex_unlock(&s->qmu);
    if (!queued)
        entry_unref(s, e); /* deleted or replaced before it was queued */
    if (old_queued)
        entry_unref(s, old); /* its queue reference */
    if (old)
        entry_unref(s, old); /* its index reference */
    reap(s, &vs);
    return DP_OK;
}

static int shm_del(void *self, const char *key, size_t klen, dp_err *err)
{
    (void)err;
    shm *s = self;
    uint64_t h = hash_key(key, klen);
    shard *sh = shard_for(s, h);
    uv_mutex_lock(&sh->mu);
    table *t = atomic_load_explicit(&sh->tab, memory_order_relaxed);
    entry *e = NULL;
    if (t) {
        int found;
        islot *isl = table_slot(t, h, key, klen, &found);
        if (found) {
            e = word_entry(atomic_load_explicit(isl, memory_order_relaxed));
            atomic_store_explicit(isl, slot_word(TOMB, h), memory_order_release);
            t->live--;
            atomic_store(&cold_of(e)->indexed, 0);
        }
    }
    uv_mutex_unlock(&sh->mu);
    if (!e)
        return DP_OK;
    uv_mutex_lock(&s->qmu);
    int queued = cold_of(e)->queue != Q_NONE;
    if (queued) {
        q_unlink(queue_of(s, e), e);
        cold_of(e)->queue = Q_NONE;
    }
    uv_mutex_unlock(&s->qmu);
    if (queued)
        entry_unref(s, e);
    entry_unref(s, e);
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
    /* No reader is left: what was retired can go at once. */
    for (batch *b = s->pending; b;) {
        batch *next = b->next;
        batch_free(b);
        b = next;
    }
    if (s->cur)
        batch_free(s->cur);
    for (int i = 0; i < NSHARDS; i++) {
        table *t = atomic_load(&s->shards[i].tab);
        for (size_t j = 0; t && j <= t->mask; j++) {
            entry *e = word_entry(atomic_load_explicit(&t->slots[j], memory_order_relaxed));
            if (e && e != TOMB)
                free(e);
        }
        table_free(t);
        uv_mutex_destroy(&s->shards[i].mu);
    }
    uv_mutex_destroy(&s->qmu);
    uv_mutex_destroy(&s->rmu);
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
    /* The reader slots and shards are cache-line aligned: calloc promises
     * only 16. */
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
    for (int i = 0; i < NSHARDS; i++)
        uv_mutex_init(&s->shards[i].mu);
    uv_mutex_init(&s->qmu);
    uv_mutex_init(&s->rmu);
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
