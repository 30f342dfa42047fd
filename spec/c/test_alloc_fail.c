/* Allocation failure, SQLite style: along each path through the core (the
 * lock registry, the backend registry, the clock), the codec's default
 * allocator and the shared_memory backend (open, set, get, get_multi,
 * eviction, delete, close), fail the Nth allocation for N = 1, 2, ... until a
 * run of the path needs fewer than N. Every run must end in success or a
 * clean error (DP_ENOMEM with a message, or the documented "0 on out of
 * memory"), leave the state consistent (no wrong value, no lock left held),
 * and leak nothing: blocks allocated while armed and still live when the
 * path has closed everything are counted here, and the sanitizer build's
 * leak check sees the rest (dp_shutdown() frees the registries at the end).
 *
 * The core takes no allocator for these paths (only the codec's dp_buf does),
 * so this executable interposes malloc, calloc, realloc, free, aligned_alloc
 * and posix_memalign: the shared libraries' calls resolve to the
 * executable's definitions first, which pass to the next definition
 * (dlsym(RTLD_NEXT): libc's, or the sanitizer runtime's when it is linked
 * first, so ASan/LSan/TSan still see every block). Only allocations of the
 * thread that armed the countdown are counted. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "dogpile.h"
#include "tap.h"

int luaopen_dogpile_backends_shared_memory(lua_State *L);

/* -- The interposed allocator ------------------------------------------- */

/* The sanitizer runtimes call malloc while they start, before they can
 * record anything: the interposed functions and what they call are not
 * instrumented (ThreadSanitizer's function-entry hook would crash there). */
#define RAW __attribute__((no_sanitize("thread", "address", "undefined"), noinline))

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);
static void *(*real_aligned_alloc)(size_t, size_t);
static int (*real_posix_memalign)(void **, size_t, size_t);

/* dlsym() itself may allocate (calloc) before the real functions are known:
 * those few blocks come from here and are never freed. */
static _Alignas(16) char boot[8192];
static size_t boot_used;
static int resolving;

RAW static void *boot_alloc(size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (boot_used + n > sizeof boot)
        return NULL;
    void *p = boot + boot_used;
    boot_used += n;
    return p;
}

RAW static int in_boot(const void *p)
{
    return (const char *)p >= boot && (const char *)p < boot + sizeof boot;
}

RAW static void resolve(void)
{
    if (real_free || resolving)
        return;
    resolving = 1;
    real_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    real_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
    real_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    real_aligned_alloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "aligned_alloc");
    real_posix_memalign = (int (*)(void **, size_t, size_t))dlsym(RTLD_NEXT, "posix_memalign");
    real_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    resolving = 0;
}

/* The countdown: while this thread is armed, allocation number `fail_at`
 * fails (0: none). `calls` counts the allocations of the current run. */
static __thread int armed;
static long calls, fail_at, injected;

/* Blocks allocated while armed and not yet freed: a leak check that works
 * without a sanitizer (open addressing; a NULL slot is empty, DELETED a
 * hole). */
#define LIVE_SLOTS (1 << 16)
#define DELETED ((void *)1)
static void *live[LIVE_SLOTS];
static long live_count;

RAW static size_t live_slot(const void *p)
{
    return ((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ULL >> 48;
}

RAW static void live_add(void *p)
{
    if (!p || !armed)
        return;
    for (size_t i = live_slot(p), k = 0; k < LIVE_SLOTS; i = (i + 1) & (LIVE_SLOTS - 1), k++)
        if (live[i] == NULL || live[i] == DELETED) {
            live[i] = p;
            live_count++;
            return;
        }
}

RAW static void live_remove(void *p)
{
    if (!p || live_count == 0)
        return;
    for (size_t i = live_slot(p), k = 0; k < LIVE_SLOTS && live[i]; i = (i + 1) & (LIVE_SLOTS - 1), k++)
        if (live[i] == p) {
            live[i] = DELETED;
            live_count--;
            return;
        }
}

static void live_reset(void)
{
    memset(live, 0, sizeof live);
    live_count = 0;
}

RAW static int fail_now(void)
{
    if (!armed)
        return 0;
    if (++calls == fail_at) {
        injected++;
        errno = ENOMEM;
        return 1;
    }
    return 0;
}

RAW void *malloc(size_t n)
{
    resolve();
    if (!real_malloc)
        return boot_alloc(n);
    if (fail_now())
        return NULL;
    void *p = real_malloc(n);
    live_add(p);
    return p;
}

RAW void *calloc(size_t n, size_t size)
{
    resolve();
    if (!real_calloc) {
        if (size && n > SIZE_MAX / size)
            return NULL;
        return boot_alloc(n * size); /* static: already zero */
    }
    if (fail_now())
        return NULL;
    void *p = real_calloc(n, size);
    live_add(p);
    return p;
}

RAW void *realloc(void *ptr, size_t n)
{
    resolve();
    if (in_boot(ptr)) {
        void *p = malloc(n);
        if (p)
            memcpy(p, ptr, n < 64 ? n : 64); /* boot blocks are dlsym's small ones */
        return p;
    }
    if (!real_realloc)
        return boot_alloc(n);
    /* A shrink to 0 frees (glibc): not an allocation that can fail. */
    if (!(ptr && n == 0) && fail_now())
        return NULL;
    void *p = real_realloc(ptr, n);
    if (p || n == 0) {
        live_remove(ptr);
        live_add(p);
    }
    return p;
}

RAW void free(void *ptr)
{
    if (!ptr || in_boot(ptr))
        return;
    resolve();
    live_remove(ptr);
    real_free(ptr);
}

RAW void *aligned_alloc(size_t align, size_t n)
{
    resolve();
    if (fail_now())
        return NULL;
    void *p = real_aligned_alloc(align, n);
    live_add(p);
    return p;
}

RAW int posix_memalign(void **out, size_t align, size_t n)
{
    resolve();
    if (fail_now())
        return ENOMEM;
    int rc = real_posix_memalign(out, align, n);
    if (rc == 0)
        live_add(*out);
    return rc;
}

static void arm(long nth)
{
    calls = 0;
    fail_at = nth;
    live_reset();
    armed = 1;
}

static void disarm(void)
{
    armed = 0;
    fail_at = 0;
}

/* -- The driver ----------------------------------------------------------- */

/* A path: runs once with the countdown armed; returns 1 when it completed,
 * 0 when it stopped at a clean error, -1 on a defect (described in `why`).
 * `leakfree` says whether every block it allocates must be freed by its end. */
typedef int (*path_fn)(long nth, char *why, size_t cap);

typedef struct outcome {
    long runs, clean_errors, completed_at, allocations, leaks;
    int defect;
    char why[512];
} outcome;

static outcome drive(path_fn path, int leakfree, long max_runs)
{
    outcome o = {0};
    for (long nth = 1; nth <= max_runs; nth++) {
        char why[512] = "";
        long before = injected;
        arm(nth);
        int r = path(nth, why, sizeof why);
        long used = calls;
        long left = live_count;
        disarm();
        o.runs++;
        if (r < 0) {
            o.defect = 1;
            snprintf(o.why, sizeof o.why, "N = %ld: %s", nth, why);
            break;
        }
        if (leakfree && left > 0) {
            o.leaks += left;
            if (!o.defect) {
                o.defect = 1;
                snprintf(o.why, sizeof o.why, "N = %ld: %ld blocks allocated by the path are "
                         "still live after it closed everything", nth, left);
            }
            break;
        }
        if (injected == before) {
            /* No allocation failed: the path must have completed. */
            if (r != 1) {
                o.defect = 1;
                snprintf(o.why, sizeof o.why, "N = %ld: the path stopped with no allocation "
                         "failed (%s)", nth, why);
            }
            o.completed_at = nth;
            o.allocations = used;
            break;
        }
        if (r == 0)
            o.clean_errors++;
    }
    return o;
}

static void report(const char *name, outcome o)
{
    CHECK(!o.defect && o.completed_at > 0,
          "%s: allocation %s failed in turn over %ld runs (%ld allocations on the whole path), "
          "%ld ended in a clean error, the rest completed, nothing leaked%s%s",
          name, o.completed_at == 1 ? "(none made)" : "1..N", o.runs, o.allocations,
          o.clean_errors, o.defect ? ": " : "", o.defect ? o.why : "");
}

#define FAIL(...) do { snprintf(why, cap, __VA_ARGS__); return -1; } while (0)

static int is_enomem(const dp_err *err, int rc)
{
    return rc == DP_ENOMEM && err->code == DP_ENOMEM && err->msg[0] != '\0';
}

/* -- The interposition itself -------------------------------------------- */

static void test_interposition(void)
{
    /* Through a volatile pointer: the compiler may drop a malloc/free pair. */
    void *(*volatile m)(size_t) = malloc;
    arm(1);
    void *p = m(16);
    disarm();
    int direct = p == NULL;
    free(p);
    /* A named domain is the core's allocation, in libdogpile.so. */
    arm(1);
    uint32_t d = dp_lock_domain("interposed?", 11);
    long seen = calls;
    disarm();
    CHECK(direct && d == 0 && seen == 1,
          "the interposed allocator fails the Nth allocation of the executable and of "
          "libdogpile.so (domain %u, %ld allocation)", d, seen);
}

/* -- The lock registry ------------------------------------------------------ */

#define NLOCKS 300

static int lock_path(long nth, char *why, size_t cap)
{
    char name[64];
    /* A name of its own per run: a named domain lives until dp_shutdown. */
    int nlen = snprintf(name, sizeof name, "alloc-fail-%ld", nth);
    uint32_t named = dp_lock_domain(name, (size_t)nlen);
    if (named == 0)
        return 0; /* documented: 0 on out of memory */
    if (dp_lock_domain(name, (size_t)nlen) != named)
        FAIL("the same name gave another domain");
    uint32_t owner = dp_lock_owner_new(), other = dp_lock_owner_new();
    uint32_t doms[2] = {named, dp_lock_domain_new()};
    int held[2][NLOCKS] = {{0}};
    int stopped = 0;
    for (int k = 0; k < 2 * NLOCKS; k++) {
        char key[32];
        int klen = snprintf(key, sizeof key, "key-%d", k / 2);
        int rc = dp_lock_try(doms[k % 2], key, (size_t)klen, owner);
        if (rc == DP_OK)
            held[k % 2][k / 2] = 1;
        else if (rc == DP_ENOMEM)
            stopped = 1;
        else
            FAIL("dp_lock_try returned %d", rc);
    }
    for (int k = 0; k < NLOCKS; k++) {
        char key[32];
        int klen = snprintf(key, sizeof key, "key-%d", k);
        if (held[0][k]) {
            int rc = dp_lock_try(named, key, (size_t)klen, other);
            if (rc != DP_EBUSY)
                FAIL("a held lock tried again gave %d, not DP_EBUSY", rc);
            rc = dp_lock_wait(named, key, (size_t)klen, other, 0.0);
            if (rc != DP_ETIMEDOUT)
                FAIL("a held lock waited for 0 s gave %d, not DP_ETIMEDOUT", rc);
            rc = dp_lock_wait_unlocked(named, key, (size_t)klen, other, 0.0);
            if (rc != DP_ETIMEDOUT && rc != DP_EBUSY)
                FAIL("dp_lock_wait_unlocked on a held lock gave %d", rc);
            uint32_t who = 0;
            if (dp_lock_held(named, key, (size_t)klen, &who) != 1 || who != owner)
                FAIL("dp_lock_held lost the holder");
        }
    }
    /* Waits on free locks create entries too. */
    for (int k = 0; k < 40; k++) {
        char key[32];
        int klen = snprintf(key, sizeof key, "free-%d", k);
        int rc = dp_lock_wait(doms[1], key, (size_t)klen, owner, 0.5);
        if (rc == DP_OK) {
            if (dp_lock_release(doms[1], key, (size_t)klen) != DP_OK)
                FAIL("release after dp_lock_wait failed");
        } else if (rc == DP_ENOMEM) {
            stopped = 1;
        } else {
            FAIL("dp_lock_wait on a free lock gave %d", rc);
        }
        rc = dp_lock_wait_unlocked(doms[1], key, (size_t)klen, owner, 0.5);
        if (rc == DP_ENOMEM)
            stopped = 1;
        else if (rc != DP_OK)
            FAIL("dp_lock_wait_unlocked on a free lock gave %d", rc);
    }
    size_t released = 0;
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < NLOCKS; k++)
            if (held[d][k]) {
                char key[32];
                int klen = snprintf(key, sizeof key, "key-%d", k);
                if (dp_lock_release(doms[d], key, (size_t)klen) != DP_OK)
                    FAIL("release of a held lock failed");
                released++;
            }
    if (dp_lock_release_owner(owner) != 0)
        FAIL("locks still held under the owner after releasing each");
    if (dp_lock_count() != 0)
        FAIL("%zu lock entries left in the registry", dp_lock_count());
    (void)released;
    return stopped ? 0 : 1;
}

/* -- The clock ------------------------------------------------------------- */

static int clock_path(long nth, char *why, size_t cap)
{
    (void)nth;
    double now = dp_clock_now(), upper = dp_clock_upper(), stamp = dp_clock_stamp();
    double mono = dp_clock_monotonic();
    if (!(now > 1.6e9 && upper >= now - 1 && stamp > 1.6e9 && mono > 0))
        FAIL("the clock read %f %f %f %f", now, upper, stamp, mono);
    dp_clock_sleep(0.001);
    if (!(dp_clock_monotonic() > mono))
        FAIL("the monotonic clock did not advance over a sleep");
    dp_backoff bo;
    dp_backoff_init(&bo, 0.005, 0.002);
    int steps = 0;
    while (dp_backoff_sleep(&bo) && steps < 100)
        steps++;
    if (steps == 0 || steps >= 100)
        FAIL("a 5 ms backoff took %d steps", steps);
    char hex[41];
    dp_sha1_hex("abc", 3, hex);
    if (strcmp(hex, "a9993e364706816aba3e25717850c26c9cd0d89d") != 0)
        FAIL("sha1 of abc: %s", hex);
    return 1;
}

/* -- The codec through its default allocator ----------------------------- */

static int codec_path(long nth, char *why, size_t cap)
{
    (void)nth;
    static char big[200000];
    memset(big, 'z', sizeof big);
    dp_buf b;
    dp_buf_init(&b, NULL, NULL); /* NULL: realloc() and free() */
    int rc = dp_buf_put_table(&b, 64, 1);
    for (int i = 0; i < 64 && rc == DP_OK; i++) {
        char s[64];
        int n = snprintf(s, sizeof s, "item %d of the value", i);
        rc = i % 2 ? dp_buf_put_string(&b, s, (size_t)n) : dp_buf_put_number(&b, i + 0.5);
    }
    if (rc == DP_OK)
        rc = dp_buf_put_string(&b, "big", 3);
    if (rc == DP_OK)
        rc = dp_buf_put_string(&b, big, sizeof big);
    if (rc == DP_OK)
        rc = dp_buf_finish(&b);
    if (rc != DP_OK) {
        int clean = rc == DP_ENOMEM && b.err == DP_ENOMEM && b.errstr[0] != '\0' &&
                    dp_buf_put_nil(&b) == DP_ENOMEM;
        dp_buf_free(&b);
        if (!clean)
            FAIL("the writer failed with %d (%s), not a sticky DP_ENOMEM", rc, b.errstr);
        return 0;
    }
    /* The reader decodes in place: it must not need memory at all. */
    dp_reader r;
    long before = calls;
    rc = dp_reader_init(&r, b.data, b.len);
    dp_item it;
    size_t items = 0, strings = 0;
    while (rc == DP_OK && !r.done && (rc = dp_reader_next(&r, &it)) == DP_OK) {
        items++;
        strings += it.type == DP_TSTRING;
    }
    int fin = dp_reader_finish(&r);
    long reader_allocs = calls - before;
    dp_buf_free(&b);
    if (items != 1 + 64 + 2 || strings != 32 + 2 || fin != DP_OK)
        FAIL("decoded %zu items, %zu strings, finish %d", items, strings, fin);
    if (reader_allocs)
        FAIL("the reader allocated %ld times", reader_allocs);
    return 1;
}

/* -- The backend registry and shared_memory --------------------------------- */

#define SHM "dogpile.cache.shared_memory"
#define NKEYS 120

static void value_of(int k, char *out, size_t cap, size_t *len)
{
    /* Values of several sizes, each one derived from its key. */
    size_t n = (size_t)(20 + (k * 37) % 300);
    if (n > cap)
        n = cap;
    for (size_t i = 0; i < n; i++)
        out[i] = (char)('a' + (k + i) % 26);
    *len = n;
}

static int check_value(int k, const char *got, size_t len, char *why, size_t cap)
{
    char want[400];
    size_t wlen;
    value_of(k, want, sizeof want, &wlen);
    if (len != wlen || memcmp(got, want, len) != 0)
        FAIL("key %d read a wrong value (%zu bytes, %zu expected)", k, len, wlen);
    return 1;
}

static const char *policy_names[] = {"s3fifo", "lru", "s3fifo"};
static int shm_policy; /* 2: s3fifo with an expiration time */

static int shm_path(long nth, char *why, size_t cap)
{
    char name[64];
    int nlen = snprintf(name, sizeof name, "alloc-fail-%d-%ld", shm_policy, nth);
    dp_arg args[] = {
        {.name = "name", .type = DP_ARG_STRING, .string = name, .len = (size_t)nlen},
        {.name = "max_items", .type = DP_ARG_NUMBER, .number = 40},
        {.name = "max_bytes", .type = DP_ARG_STRING, .string = "8k", .len = 2},
        {.name = "eviction", .type = DP_ARG_STRING, .string = policy_names[shm_policy],
         .len = strlen(policy_names[shm_policy])},
        /* Entries expire while the path runs: expired ones are dropped first. */
        {.name = "expiration_time", .type = DP_ARG_NUMBER, .number = 0.0005},
    };
    size_t nargs = shm_policy == 2 ? 5 : 4;
    /* The instance's lock domain ("<backend>:<name>") lives until
     * dp_shutdown, by design: made beforehand, it is not counted as a leak. */
    char dom[128];
    int dlen = snprintf(dom, sizeof dom, SHM ":%s", name);
    armed = 0;
    dp_lock_domain(dom, (size_t)dlen);
    armed = 1;
    dp_err err = {0};
    dp_backend *b = NULL;
    int rc = dp_backend_open(SHM, args, nargs, &b, &err);
    if (rc != DP_OK) {
        if (!is_enomem(&err, rc))
            FAIL("open failed with %d (%s), not DP_ENOMEM with a message", rc, err.msg);
        if (b)
            FAIL("a failed open handed out an instance");
        return 0;
    }
    /* A second handle joins the instance (the registry's lookup). */
    dp_backend *b2 = NULL;
    rc = dp_backend_open(SHM, args, nargs, &b2, &err);
    if (rc != DP_OK && !is_enomem(&err, rc)) {
        dp_backend_close(b);
        FAIL("joining failed with %d (%s)", rc, err.msg);
    }
    int stopped = rc != DP_OK;
    /* Joining with other settings is refused, with the difference named. */
    args[1].number = 41;
    dp_backend *b3 = NULL;
    rc = dp_backend_open(SHM, args, nargs, &b3, &err);
    args[1].number = 40;
    if (rc == DP_ENOMEM && is_enomem(&err, rc)) {
        stopped = 1;
    } else if (rc != DP_EMISMATCH || b3 || !strstr(err.msg, "max_items")) {
        dp_backend_close(b3);
        dp_backend_close(b2);
        dp_backend_close(b);
        FAIL("a mismatched open gave %d (%s)", rc, err.msg);
    }
    int ok = 1;
    char key[32], val[400];
    size_t vlen;
    dp_bytes out = {0};
    /* More keys than max_items and max_bytes allow: evictions, with gets in
     * between so that S3-FIFO promotes some. */
    for (int k = 0; k < NKEYS && ok; k++) {
        int klen = snprintf(key, sizeof key, "k%d", k);
        value_of(k, val, sizeof val, &vlen);
        rc = dp_backend_set(b, key, (size_t)klen, val, vlen, &err);
        if (rc == DP_ENOMEM && is_enomem(&err, rc))
            stopped = 1;
        else if (rc != DP_OK)
            ok = 0, snprintf(why, cap, "set k%d failed with %d (%s)", k, rc, err.msg);
        if (ok && k % 3 == 0) {
            int j = k / 2;
            klen = snprintf(key, sizeof key, "k%d", j);
            rc = dp_backend_get(b, key, (size_t)klen, &out, &err);
            if (rc == DP_OK)
                ok = check_value(j, out.data, out.len, why, cap) > 0;
            else if (rc == DP_ENOMEM && is_enomem(&err, rc))
                stopped = 1;
            else if (rc != DP_ENOTFOUND)
                ok = 0, snprintf(why, cap, "get k%d failed with %d (%s)", j, rc, err.msg);
        }
    }
    /* get_multi over every key: hits are right, the rest are misses. */
    const char *keys[NKEYS];
    size_t klens[NKEYS];
    int64_t vlens[NKEYS];
    static char kbuf[NKEYS][16];
    for (int k = 0; k < NKEYS; k++) {
        klens[k] = (size_t)snprintf(kbuf[k], sizeof kbuf[k], "k%d", k);
        keys[k] = kbuf[k];
    }
    if (ok) {
        rc = dp_backend_get_multi(b, NKEYS, keys, klens, &out, vlens, &err);
        if (rc == DP_OK) {
            size_t off = 0, hits = 0;
            for (int k = 0; k < NKEYS && ok; k++)
                if (vlens[k] >= 0) {
                    ok = check_value(k, out.data + off, (size_t)vlens[k], why, cap) > 0;
                    off += (size_t)vlens[k];
                    hits++;
                }
            if (ok && (off != out.len || (hits == 0 && shm_policy != 2) || hits > 40))
                ok = 0, snprintf(why, cap, "get_multi: %zu hits, %zu of %zu bytes", hits, off,
                                 out.len);
        } else if (rc == DP_ENOMEM && is_enomem(&err, rc)) {
            stopped = 1;
        } else {
            ok = 0, snprintf(why, cap, "get_multi failed with %d (%s)", rc, err.msg);
        }
    }
    dp_backend_stats st;
    dp_backend_stat(b, &st);
    if (ok && (st.items > 40 || st.bytes > 8192))
        ok = 0, snprintf(why, cap, "over its bounds: %.0f items, %.0f bytes", st.items, st.bytes);
    if (ok) {
        rc = dp_backend_set_multi(b, 10, keys, klens, (const char *const *)keys, klens, &err);
        if (rc == DP_ENOMEM && is_enomem(&err, rc))
            stopped = 1;
        else if (rc != DP_OK)
            ok = 0, snprintf(why, cap, "set_multi failed with %d (%s)", rc, err.msg);
        rc = dp_backend_delete_multi(b, 20, keys + 5, klens + 5, &err);
        if (ok && rc != DP_OK)
            ok = 0, snprintf(why, cap, "delete_multi failed with %d (%s)", rc, err.msg);
        rc = dp_backend_delete(b, "k119", 4, &err);
        if (ok && rc != DP_OK)
            ok = 0, snprintf(why, cap, "delete failed with %d (%s)", rc, err.msg);
    }
    dp_bytes_free(&out);
    dp_backend_close(b2);
    dp_backend_close(b);
    if (!ok)
        return -1;
    return stopped ? 0 : 1;
}

static int shm_path_s3fifo(long nth, char *why, size_t cap)
{
    shm_policy = 0;
    return shm_path(nth, why, cap);
}

static int shm_path_lru(long nth, char *why, size_t cap)
{
    shm_policy = 1;
    return shm_path(nth, why, cap);
}

static int shm_path_ttl(long nth, char *why, size_t cap)
{
    shm_policy = 2;
    return shm_path(nth, why, cap);
}

/* Registering a backend: the registry's entry. Each run registers a table
 * of its own (the registry keeps them until dp_shutdown). */
static dp_backend_ops reg_ops[64];
static char reg_names[64][48];

static int get_stub(void *s, const char *k, size_t kl, dp_bytes *o, dp_err *e)
{
    (void)s, (void)k, (void)kl, (void)o, (void)e;
    return DP_ENOTFOUND;
}
static int set_stub(void *s, const char *k, size_t kl, const char *v, size_t vl, dp_err *e)
{
    (void)s, (void)k, (void)kl, (void)v, (void)vl, (void)e;
    return DP_OK;
}
static int del_stub(void *s, const char *k, size_t kl, dp_err *e)
{
    (void)s, (void)k, (void)kl, (void)e;
    return DP_OK;
}
static int open_stub(void *ud, const dp_arg *a, size_t n, void **self, dp_err *e)
{
    (void)ud, (void)a, (void)n, (void)e;
    *self = NULL;
    return DP_OK;
}
static void close_stub(void *self)
{
    (void)self;
}

static int register_path(long nth, char *why, size_t cap)
{
    if (nth > 63)
        FAIL("more runs than tables");
    snprintf(reg_names[nth], sizeof reg_names[nth], "test.alloc_fail.%ld", nth);
    dp_backend_ops *ops = &reg_ops[nth];
    *ops = (dp_backend_ops){.name = reg_names[nth], .open = open_stub, .close = close_stub,
                            .get = get_stub, .set = set_stub, .del = del_stub};
    int rc = dp_backend_register(ops, NULL);
    if (rc == DP_ENOMEM)
        return dp_backend_find(reg_names[nth]) == NULL ? 0 : -1;
    if (rc != DP_OK)
        FAIL("register gave %d", rc);
    if (dp_backend_find(reg_names[nth]) != ops)
        FAIL("registered but not found");
    dp_err err = {0};
    dp_backend *b = NULL;
    rc = dp_backend_open(reg_names[nth], NULL, 0, &b, &err);
    if (rc == DP_OK) {
        dp_bytes out = {0};
        if (dp_backend_get(b, "x", 1, &out, &err) != DP_ENOTFOUND)
            FAIL("the stub's get");
        dp_backend_close(b);
        return 1;
    }
    if (!is_enomem(&err, rc) || b)
        FAIL("open of a registered backend gave %d (%s)", rc, err.msg);
    return 0;
}

int main(void)
{
    resolve();
    /* The shared_memory module registers its table with the core, as
     * `require` does (a state of its own: LuaJIT's allocator is not malloc). */
    lua_State *L = luaL_newstate();
    CHECK(L && luaopen_dogpile_backends_shared_memory(L) == 1, "shared_memory registered");

    test_interposition();
    report("the lock registry (named and anonymous domains, 600 keys, waits, releases)",
           drive(lock_path, 0, 5000));
    report("the clock, backoff and sha1", drive(clock_path, 1, 100));
    report("the codec's writer on its default allocator, and the in-place reader",
           drive(codec_path, 1, 1000));
    /* The registry keeps each registration until dp_shutdown (the
     * sanitizer's leak check covers it). */
    report("registering and opening a C backend", drive(register_path, 0, 60));
    report("shared_memory (s3fifo): open, join, set with eviction, get, get_multi, set_multi, "
           "delete_multi, close", drive(shm_path_s3fifo, 1, 20000));
    report("shared_memory (lru): the same", drive(shm_path_lru, 1, 20000));
    report("shared_memory (s3fifo, expiring entries): the same", drive(shm_path_ttl, 1, 20000));

    lua_close(L);
    dp_shutdown();
    return tap_done();
}
