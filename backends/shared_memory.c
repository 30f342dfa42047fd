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
 * The eviction order lives apart, in queues that only writers touch (and lru
 * hits). A large bound is split into up to NSTRIPES stripes, each a set of
 * shards with its own queues, mutex, retired lists and share of max_items
 * and max_bytes (the shares sum to the bound): writers of different stripes
 * never meet. Each stripe evicts its own oldest or least used, so the order
 * is approximate across stripes, as memcached's per-slab LRUs and
 * Caffeine's striped buffers are; a bound too small for shares of
 * STRIPE_MIN_ITEMS items or STRIPE_MIN_BYTES keeps one stripe and the exact
 * order (stripes_for). A value larger than its stripe's share still goes in,
 * evicting the rest of that stripe: the bytes held may then pass max_bytes
 * by less than that one value, until the stripe's next write.
 *
 *  - "s3fifo" (default): S3-FIFO (Yang et al., SOSP'23). New keys enter a
 *    small FIFO (10% of the bound); a hit only bumps a 2-bit counter, so reads
 *    never touch the queues. Leaving the small queue, a key that was hit moves
 *    to the main FIFO, one that was not is forgotten but remembered in a ghost
 *    table, and comes back straight into main if it is set again soon. The
 *    main FIFO gives hit keys another round (counter - 1). Scan-resistant,
 *    and better than LRU on skewed traces (bench/eviction.lua).
 *  - "lru": least-recently-used (exact within a stripe). A hit moves the key
 *    to the front, which takes its stripe's mutex: reads of a stripe
 *    serialize on it.
 *
 * A shard lock and a queue mutex are never held together. An entry carries
 * two references, one for the index and one for the queues; whoever drops the
 * last retires it. An evicted entry is taken off the queues first (its bytes
 * leave the budget at once) and off the index right after.
 *
 * Expiry. With `expiration_time`, an entry older than that is a miss, and
 * expired entries at the old end of the queues are dropped before anything
 * fresh is evicted.
 */
#define _GNU_SOURCE /* madvise's MADV_HUGEPAGE */
#include <sched.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <uv.h>

#ifdef __linux__
#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <lauxlib.h>
#include <lua.h>

#include "dogpile.h"

#define NAME "dogpile.cache.shared_memory"
#define SHARD_BITS 6
#define NSHARDS (1 << SHARD_BITS)
#define NSLOTS 64 /* reader slots; threads beyond share one (still correct) */
#define NSTRIPES 16 /* eviction stripes at most (they divide NSHARDS) */
#define STRIPE_MIN_ITEMS 1024      /* a stripe's share of max_items, at least */
#define STRIPE_MIN_BYTES (4 << 20) /* and of max_bytes */
#define GHOST_SLOTS_MIN 64
#define TABLE_MIN 16                  /* slots of a shard's first table */
#define HUGE_TABLE ((size_t)2 << 20)  /* tables this big are mapped, huge pages asked */
#ifndef HUGE_PAGES
#define HUGE_PAGES 1
#endif
#define RETIRE_BATCH 128              /* retired pointers per grace period (one membarrier) */
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
    size_t map_bytes;  /* > 0: mmap'd, this long (from map_base) */
    void *map_base;
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

/* Retired pointers of one stripe, under their own mutex. */
typedef struct retired {
    _Alignas(64) uv_mutex_t mu;
    batch *cur;                    /* filling */
    batch *pending, *pending_tail; /* sealed, oldest first */
    size_t npending;
} retired;

/* One stripe of the eviction order: the queues of the shards whose index is
 * congruent to it, bounded by its share of max_items and max_bytes. */
typedef struct stripe {
    _Alignas(64) uv_mutex_t qmu;
    queue small, main;
    double max_bytes, max_items; /* this stripe's share; 0: unbounded */
    retired ret;
} stripe;

typedef struct shm {
    const char *name;               /* the core's settings: live until destroy */
    double max_bytes, max_items, ttl;
    int policy;
    unsigned nstripes;              /* a power of two, at most NSTRIPES */
    shard shards[NSHARDS];
    slot slots[NSLOTS];
    stripe stripes[NSTRIPES];
    /* S3-FIFO: hashes of keys recently dropped from small. A slot is
     * indexed by the hash's low bits, which hold its stripe: each slot is
     * only ever touched under one stripe's mutex. */
    uint64_t *ghost;
    size_t ghost_slots;
    _Atomic uint64_t evictions, expirations;
} shm;

/* -- Hashing ----------------------------------------------------------------- */

static uint64_t load64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static uint32_t load32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* A word at a time, then a full avalanche (murmur3's finalizer): the shard
 * and the slot come from the low bits, the tag from the top ones. FNV-1a's
 * byte loop cost a tenth of a hit on short keys. */
static inline __attribute__((always_inline)) uint64_t hash_key(const char *key, size_t len)
{
    const uint64_t m = 0x9E3779B97F4A7C15ULL;
    uint64_t h = 0x243F6A8885A308D3ULL ^ (len * m);
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        h = (h ^ load64(key + i)) * m;
        h ^= h >> 29;
    }
    uint64_t tail = 0;
    size_t rest = len - i;
    if (rest >= 4) {
        tail = (uint64_t)load32(key + i) | ((uint64_t)load32(key + len - 4) << 32);
    } else if (rest) {
        tail = (uint64_t)(unsigned char)key[i] |
               ((uint64_t)(unsigned char)key[i + rest / 2] << 8) |
               ((uint64_t)(unsigned char)key[len - 1] << 16);
    }
    h = (h ^ tail ^ rest) * m;
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ULL;
    h ^= h >> 33;
    return h ? h : 1; /* 0 marks an empty slot */
}

/* Keys are mostly short: two word compares instead of a call to memcmp.
 * Inlined, as hash_key is: called, they made the hit save and restore its
 * registers around each call (callgrind: 30 instructions on one line). */
static inline __attribute__((always_inline)) int key_equal(const char *a, const char *b, size_t n)
{
    if (n <= 16) {
        if (n >= 8)
            return load64(a) == load64(b) && load64(a + n - 8) == load64(b + n - 8);
        if (n >= 4)
            return load32(a) == load32(b) && load32(a + n - 4) == load32(b + n - 4);
        for (size_t i = 0; i < n; i++)
            if (a[i] != b[i])
                return 0;
        return 1;
    }
    return memcmp(a, b, n) == 0;
}

/* A hit's copy: values of 8 to 64 bytes (a 16-byte string is 36 in its
 * envelope) as two overlapping fixed-size moves, inline; memcpy's call and
 * size dispatch were 20 of a hit's 200 instructions (callgrind). */
static inline __attribute__((always_inline)) void copy_value(char *d, const char *s, size_t n)
{
    if (n > 32 && n <= 64) {
        memcpy(d, s, 32);
        memcpy(d + n - 32, s + n - 32, 32);
    } else if (n >= 16 && n <= 32) {
        memcpy(d, s, 16);
        memcpy(d + n - 16, s + n - 16, 16);
    } else if (n >= 8 && n < 16) {
        memcpy(d, s, 8);
        memcpy(d + n - 8, s + n - 8, 8);
    } else if (n) { /* an empty value into a buffer never grown: d is NULL */
        memcpy(d, s, n);
    }
}

/* -- Reader slots -------------------------------------------------------------
 * A reader counts itself in on its own line, reads, and counts itself out. A
 * writer that took pointers out of the index, then fenced, then read every
 * slot's `enters` knows that any reader not counted there sees the index
 * without them; it frees them once each slot's `exits` reached that count.
 *
 * The reader's count must be visible before its first probe: a full fence
 * between its store and its loads. A locked read-modify-write gives one on
 * every hit, and two of them (in and out) were a fifth of a short hit. Where
 * Linux's membarrier is there, the fence is asymmetric instead (userspace
 * RCU's "memb" flavour): the reader stores its count plainly, and the writer,
 * before reading the counts, has the kernel run a full barrier on every CPU
 * running a thread of this process -- a few hundred ns once per grace period
 * (a batch of RETIRE_BATCH retirements), not per hit.
 *
 * A plain store needs a slot of one thread: the first NSLOTS - 1 threads have
 * one each; the threads after them share the last slot with locked
 * increments, and a shared slot must be seen idle instead (a later section of
 * one thread can leave before an earlier one of another). Without membarrier,
 * and under ThreadSanitizer (which does not model it), every slot takes the
 * locked path. */

#if defined(__SANITIZE_THREAD__)
#define SHM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SHM_TSAN 1
#endif
#endif

#define SLOT_OWN 0x80000000u /* in my_slot: the thread's own slot, plain stores */
#define SHARED_SLOT (NSLOTS - 1)

static _Atomic unsigned next_slot;
static _Thread_local unsigned my_slot; /* slot + 1, | SLOT_OWN; 0: none yet */
static _Atomic int asym_fences;        /* 0: not asked yet, 1: membarrier, -1: none */

/* Registers the process for expedited membarriers, once, before any
 * instance exists (shm_create): a thread that takes plain stores took its
 * slot after this, and every writer then sees the flag set. */
static void asym_fences_init(void)
{
    if (atomic_load(&asym_fences))
        return;
    int on = -1;
#if defined(__linux__) && !defined(SHM_TSAN) && defined(MEMBARRIER_CMD_PRIVATE_EXPEDITED)
    if (syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0)
        on = 1;
#endif
    int unset = 0;
    atomic_compare_exchange_strong(&asym_fences, &unset, on);
}

/* The writer's half of the asymmetric fence. */
static void asym_fence(void)
{
#if defined(__linux__) && !defined(SHM_TSAN) && defined(MEMBARRIER_CMD_PRIVATE_EXPEDITED)
    /* The registration outlives fork (Linux 6.x); were it lost (EPERM),
     * register again. Past that it cannot fail, and freeing without the
     * fence would free what a reader may still read. */
    if (atomic_load(&asym_fences) > 0 &&
        syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) != 0 &&
        (syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) != 0 ||
         syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) != 0)) {
        fputs(NAME ": membarrier failed after it was registered\n", stderr);
        abort();
    }
#endif
    atomic_thread_fence(memory_order_seq_cst);
}

static unsigned slot_of_thread(void)
{
    unsigned m = my_slot;
    if (!m) {
        unsigned n = atomic_fetch_add(&next_slot, 1);
        if (n < SHARED_SLOT)
            m = (n + 1) | (atomic_load(&asym_fences) > 0 ? SLOT_OWN : 0);
        else
            m = SHARED_SLOT + 1;
        my_slot = m;
    }
    return m;
}

/* Counts the thread in; returns its slot word (for rd_exit). */
static unsigned rd_enter(shm *s, slot **out)
{
    unsigned m = slot_of_thread();
    slot *sl = &s->slots[(m & ~SLOT_OWN) - 1];
    if (m & SLOT_OWN) {
        atomic_store_explicit(&sl->enters,
                              atomic_load_explicit(&sl->enters, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        /* the compiler's half; the CPU's is the writer's membarrier */
        atomic_signal_fence(memory_order_seq_cst);
    } else {
        atomic_fetch_add(&sl->enters, 1);
    }
    *out = sl;
    return m;
}

static void rd_exit(slot *sl, unsigned m)
{
    if (m & SLOT_OWN)
        atomic_store_explicit(&sl->exits,
                              atomic_load_explicit(&sl->exits, memory_order_relaxed) + 1,
                              memory_order_release);
    else
        atomic_fetch_add_explicit(&sl->exits, 1, memory_order_release);
}

/* A slot's counters are written by its own thread (by several only in the
 * shared slot, where a lost count is harmless): a plain load and store,
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
    asym_fence();
    unsigned n = slots_in_use();
    for (unsigned i = 0; i < NSLOTS; i++)
        snap[i] = i < n ? atomic_load(&s->slots[i].enters) : 0;
}

/* Have all the readers counted in `snap` left? */
static int grace_over(shm *s, const uint64_t *snap)
{
    int shared = atomic_load(&next_slot) > NSLOTS; /* two threads or more in SHARED_SLOT */
    for (unsigned i = 0; i < NSLOTS; i++) {
        if (!snap[i])
            continue;
        uint64_t out = atomic_load_explicit(&s->slots[i].exits, memory_order_acquire);
        if (out < snap[i])
            return 0;
        /* exits read before enters: equal means idle at that read */
        if (shared && i == SHARED_SLOT && out != atomic_load(&s->slots[i].enters))
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

/* Tables of HUGE_TABLE bytes and more are mapped on a 2 MiB boundary with
 * transparent huge pages asked for: at millions of keys a hit's probe is a
 * TLB miss as well as a cache miss, and on a KVM guest a 4 KiB page walk is
 * nested in the host's (bench/curves.lua --only keys). Smaller ones come
 * from calloc. */
static table *table_new(size_t nslots)
{
    size_t bytes = sizeof(table) + nslots * sizeof(islot);
    table *t;
    if (!HUGE_PAGES || bytes < HUGE_TABLE) {
        t = calloc(1, bytes);
        if (!t)
            return NULL;
    } else {
        /* Room to start on the boundary; mmap's pages come zeroed. */
        size_t map = bytes + HUGE_TABLE;
        void *base = mmap(NULL, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED)
            return NULL;
        uintptr_t start = ((uintptr_t)base + HUGE_TABLE - 1) & ~(uintptr_t)(HUGE_TABLE - 1);
#ifdef MADV_HUGEPAGE
        (void)madvise((void *)start, (bytes + HUGE_TABLE - 1) & ~(HUGE_TABLE - 1),
                      MADV_HUGEPAGE); /* a hint: without it, 4 KiB pages */
#endif
        t = (table *)start;
        t->map_bytes = map;
        t->map_base = base;
    }
    t->mask = nslots - 1;
    return t;
}

static void table_free(table *t)
{
    if (!t)
        return;
    if (t->map_bytes)
        munmap(t->map_base, t->map_bytes);
    else
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
            if (e != TOMB && e->hash == h && e->klen == klen && key_equal(e->data, key, klen))
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
                   key_equal(e->data, key, klen)) {
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

/* Frees the sealed batches whose readers have left (r->mu held); with
 * `wait`, waits for the oldest one first. */
static void reclaim_locked(shm *s, retired *r, int wait)
{
    if (wait && r->pending)
        grace_wait(s, r->pending->snap);
    while (r->pending && grace_over(s, r->pending->snap)) {
        batch *b = r->pending;
        r->pending = b->next;
        if (!r->pending)
            r->pending_tail = NULL;
        r->npending--;
        batch_free(b);
    }
}

static stripe *stripe_of(shm *s, uint64_t h)
{
    return &s->stripes[h & (s->nstripes - 1)];
}

/* `p` (an entry, or a table with the low bit set) has left the index: frees
 * it once no reader can still hold it. The lists are per stripe (`h`: the
 * hash that picks it), so writers of different stripes do not meet here. No
 * reader waits on any lock, so waiting here (rarely: past
 * RETIRE_PENDING_MAX batches, or with no memory for a batch) cannot
 * deadlock, whatever the caller holds. */
static void retire(shm *s, uint64_t h, void *p)
{
    retired *r = &stripe_of(s, h)->ret;
    uv_mutex_lock(&r->mu);
    if (!r->cur) {
        r->cur = malloc(sizeof *r->cur);
        if (!r->cur) {
            /* No memory to defer it: wait for the readers now. */
            uint64_t snap[NSLOTS];
            grace_start(s, snap);
            grace_wait(s, snap);
            uv_mutex_unlock(&r->mu);
            free_retired(p);
            return;
        }
        r->cur->n = 0;
        r->cur->next = NULL;
    }
    r->cur->items[r->cur->n++] = p;
    if (r->cur->n == RETIRE_BATCH) {
        batch *b = r->cur;
        r->cur = NULL;
        grace_start(s, b->snap);
        if (r->pending_tail)
            r->pending_tail->next = b;
        else
            r->pending = b;
        r->pending_tail = b;
        r->npending++;
        reclaim_locked(s, r, r->npending > RETIRE_PENDING_MAX);
    }
    uv_mutex_unlock(&r->mu);
}

static void entry_unref(shm *s, entry *e)
{
    if (atomic_fetch_sub(&cold_of(e)->refs, 1) == 1)
        retire(s, e->hash, e);
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

static queue *queue_of(stripe *st, entry *e)
{
    uint8_t q = cold_of(e)->queue;
    return q == Q_SMALL ? &st->small : q == Q_MAIN ? &st->main : NULL;
}

static size_t used_items(stripe *st)
{
    return st->small.items + st->main.items;
}

static size_t used_bytes(stripe *st)
{
    return st->small.bytes + st->main.bytes;
}

static int over_budget(stripe *st, size_t extra_items, size_t extra_bytes)
{
    return (st->max_items > 0 && (double)(used_items(st) + extra_items) > st->max_items) ||
           (st->max_bytes > 0 && (double)(used_bytes(st) + extra_bytes) > st->max_bytes);
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
static void drop(shm *s, stripe *st, entry *e, victims *vs, int expired)
{
    q_unlink(queue_of(st, e), e);
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

/* Evicts from stripe `st` until an entry of `need_bytes` fits (its queue
 * mutex held). */
static void make_room(shm *s, stripe *st, size_t need_bytes, victims *vs)
{
    double now = s->ttl > 0 ? dp_clock_now() : 0;
    /* Expired entries at the old ends go first, whatever the bound. */
    if (s->ttl > 0) {
        queue *qs[2] = {&st->small, &st->main};
        for (int i = 0; i < 2; i++)
            for (int k = 0; k < 8 && qs[i]->tail && expired_at(qs[i]->tail, now); k++)
                drop(s, st, qs[i]->tail, vs, 1);
    }
    while (over_budget(st, 1, need_bytes) && used_items(st) > 0) {
        if (s->policy == POLICY_LRU) {
            drop(s, st, st->main.tail, vs, 0);
            continue;
        }
        int small_full =
            (st->max_items > 0 && (double)st->small.items >= 0.1 * st->max_items) ||
            (st->max_bytes > 0 && (double)st->small.bytes >= 0.1 * st->max_bytes);
        if (st->small.tail && (small_full || !st->main.tail)) {
            entry *t = st->small.tail;
            if (atomic_load(&t->freq) > 0 && !expired_at(t, now)) {
                q_unlink(&st->small, t);
                atomic_store(&t->freq, 0);
                cold_of(t)->queue = Q_MAIN;
                q_push(&st->main, t);
            } else {
                ghost_put(s, t->hash);
                drop(s, st, t, vs, expired_at(t, now));
            }
        } else {
            entry *t = st->main.tail;
            uint8_t f = atomic_load(&t->freq);
            if (f > 0 && !expired_at(t, now)) {
                atomic_store(&t->freq, f - 1);
                q_unlink(&st->main, t);
                q_push(&st->main, t);
            } else {
                drop(s, st, t, vs, expired_at(t, now));
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
    slot *sl;
    unsigned m = rd_enter(s, &sl);
    table *t = atomic_load_explicit(&sh->tab, memory_order_acquire);
    entry *e = t ? table_find(t, h, key, klen) : NULL;
    /* The coarse clock's upper bound first: the precise clock costs more
     * than the rest of a hit, and is needed only near the expiry. */
    if (!e || (e->expires > 0 && dp_clock_upper() >= e->expires && dp_clock_now() >= e->expires)) {
        rd_exit(sl, m);
        slot_count(&sl->misses);
        return DP_ENOTFOUND;
    }
    /* the buffer is reused hit after hit: grow it only when short */
    if (e->vlen > out->cap && dp_bytes_reserve(out, e->vlen) != DP_OK) {
        size_t vlen = e->vlen;
        rd_exit(sl, m);
        return dp_err_set(err, DP_ENOMEM, "out of memory copying a %zu-byte value", vlen);
    }
    copy_value(out->data, e->data + e->klen, e->vlen);
    out->len = e->vlen;
    if (s->policy == POLICY_S3FIFO) {
        /* Written only until it saturates: a hot key's line stays shared. */
        uint8_t f = atomic_load_explicit(&e->freq, memory_order_relaxed);
        if (f < 3)
            atomic_store_explicit(&e->freq, f + 1, memory_order_relaxed);
        rd_exit(sl, m);
    } else {
        int held = entry_ref_if_live(e);
        rd_exit(sl, m);
        if (held) {
            entry_cold *c = cold_of(e);
            stripe *st = stripe_of(s, h);
            uv_mutex_lock(&st->qmu);
            if (c->queue == Q_MAIN && st->main.head != e) {
                q_unlink(&st->main, e);
                q_push(&st->main, e);
            }
            uv_mutex_unlock(&st->qmu);
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
        retire(s, e->hash, (void *)((uintptr_t)old_table | 1));

    victims vs = {0};
    stripe *st = stripe_of(s, e->hash);
    uv_mutex_lock(&st->qmu);
    int old_queued = 0;
    if (old && cold_of(old)->queue != Q_NONE) {
        q_unlink(queue_of(st, old), old);
        cold_of(old)->queue = Q_NONE;
        old_queued = 1;
    }
    int queued = 0;
    if (atomic_load(&c->indexed)) {
        make_room(s, st, size, &vs);
        int to_main = s->policy == POLICY_LRU || ghost_has(s, e->hash);
        c->queue = to_main ? Q_MAIN : Q_SMALL;
        q_push(to_main ? &st->main : &st->small, e);
        queued = 1;
    }
    uv_mutex_unlock(&st->qmu);
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
    stripe *st = stripe_of(s, h);
    uv_mutex_lock(&st->qmu);
    int queued = cold_of(e)->queue != Q_NONE;
    if (queued) {
        q_unlink(queue_of(st, e), e);
        cold_of(e)->queue = Q_NONE;
    }
    uv_mutex_unlock(&st->qmu);
    if (queued)
        entry_unref(s, e);
    entry_unref(s, e);
    return DP_OK;
}

static void shm_stats(void *self, dp_backend_stats *out)
{
    shm *s = self;
    for (unsigned i = 0; i < s->nstripes; i++) {
        stripe *st = &s->stripes[i];
        uv_mutex_lock(&st->qmu);
        out->items += (double)used_items(st);
        out->bytes += (double)used_bytes(st);
        uv_mutex_unlock(&st->qmu);
    }
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
    for (unsigned i = 0; i < NSTRIPES; i++) {
        retired *r = &s->stripes[i].ret;
        for (batch *b = r->pending; b;) {
            batch *next = b->next;
            batch_free(b);
            b = next;
        }
        if (r->cur)
            batch_free(r->cur);
        uv_mutex_destroy(&s->stripes[i].qmu);
        uv_mutex_destroy(&r->mu);
    }
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
    free(s->ghost);
    free(s);
}

/* How many stripes the eviction order takes. Writers of different stripes
 * take different mutexes; the price is an approximate order (each stripe
 * evicts its own oldest or least used, as memcached's per-slab LRUs do), so
 * a bound too small to share keeps one stripe, and exact order: each stripe
 * holds STRIPE_MIN_ITEMS items or STRIPE_MIN_BYTES bytes at least. An
 * unbounded store with an expiration_time keeps one too: a write drops the
 * expired entries at the old end of its own stripe only, and with one every
 * write sweeps them all. */
static unsigned stripes_for(const shm_settings *cfg)
{
    if (cfg->max_items <= 0 && cfg->max_bytes <= 0)
        return cfg->ttl > 0 ? 1 : NSTRIPES;
    unsigned n = NSTRIPES;
    while (n > 1 && ((cfg->max_items > 0 && cfg->max_items / n < STRIPE_MIN_ITEMS) ||
                     (cfg->max_bytes > 0 && cfg->max_bytes / n < STRIPE_MIN_BYTES)))
        n /= 2;
    return n;
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
    asym_fences_init();
    s->name = cfg->name.data;
    s->max_bytes = (double)cfg->max_bytes;
    s->max_items = (double)cfg->max_items;
    s->ttl = cfg->ttl;
    s->policy = cfg->policy;
    s->ghost = ghost;
    s->ghost_slots = slots;
    for (int i = 0; i < NSHARDS; i++)
        uv_mutex_init(&s->shards[i].mu);
    /* Stripes: the bound split evenly (the remainder to the first ones),
     * so that their sum is the bound. */
    s->nstripes = stripes_for(cfg);
    for (unsigned i = 0; i < NSTRIPES; i++) {
        stripe *st = &s->stripes[i];
        uv_mutex_init(&st->qmu);
        uv_mutex_init(&st->ret.mu);
        if (i >= s->nstripes)
            continue;
        unsigned n = s->nstripes;
        if (cfg->max_items > 0)
            st->max_items = (double)(cfg->max_items / n + ((uint64_t)cfg->max_items % n > i));
        if (cfg->max_bytes > 0)
            st->max_bytes = (double)(cfg->max_bytes / n + ((uint64_t)cfg->max_bytes % n > i));
    }
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
