/* feed.c -- the change feed (dogpile_feed.h): per shared store, a ring of
 * changed keys that readers drain behind a one-word stamp.
 *
 * One mutex per feed orders pushes and reads; the stamp is bumped under it,
 * so the stamp a read reports matches the head it read up to exactly. The
 * hit path of a reader never takes the mutex: it loads the stamp (an atomic
 * word the feed never moves) and compares.
 *
 * A host feed (a name starting with '/') keeps the same ring in a file that
 * every process maps: a header page (the robust mutex, head, epoch, stamp)
 * and fixed slots holding a whole key each. Its mutex is a pthread one,
 * process-shared and robust: the kernel hands it on when its holder dies,
 * where an in-file spin lock would stall every process on the host. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "dogpile_feed.h"

typedef struct entry {
    char *key;
    size_t klen, kcap;
    uint32_t origin;
    int32_t scope;
} entry;

/* -- The host feed's file ---------------------------------------------------
 * Written only under `mu`, except the stamp (atomic, read without it) and
 * `magic` (published last when the file is first set up). The layout is
 * this host's ABI (pthread_mutex_t): the file is never shared between hosts. */

#define FILE_MAGIC 0x3164656566706423ULL /* "#dpfeed1" */
#define FILE_HEAD 4096

typedef struct fhead {
    _Atomic uint64_t magic;
    uint32_t slots, keymax;
    pthread_mutex_t mu;
    uint64_t head;          /* seq of the next entry pushed */
    uint64_t epoch;
    double reset_at;
    char pad[64];
    _Atomic uint32_t stamp; /* a cache line of its own: the hit path's word */
} fhead;

typedef struct fslot {
    uint32_t klen, pid, origin;
    int32_t scope;
    char key[DP_FEED_FILE_KEY];
} fslot;

_Static_assert(sizeof(fhead) <= FILE_HEAD, "the header fits its page");
_Static_assert(sizeof(fslot) == 16 + DP_FEED_FILE_KEY, "DP_FEED_FILE_BYTES's slot size");

struct dp_feed {
    struct dp_feed *next;
    char *name;
    size_t nlen;
    int refs;               /* under registry_mu */
    fhead *file;            /* a host feed's mapping (DP_FEED_FILE_BYTES), else NULL */
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
    if (f->file)
        munmap(f->file, DP_FEED_FILE_BYTES);
    for (size_t i = 0; i < f->cap; i++)
        free(f->ring[i].key);
    free(f->ring);
    free(f->name);
    uv_mutex_destroy(&f->mu);
    free(f);
}

static fslot *file_slot(fhead *h, uint64_t seq)
{
    return (fslot *)((char *)h + FILE_HEAD) + seq % DP_FEED_FILE_SLOTS;
}

static void file_reset_locked(fhead *h)
{
    h->epoch++;
    h->reset_at = dp_clock_now();
    atomic_fetch_add_explicit(&h->stamp, 1, memory_order_release);
}

/* Take the file's mutex. A holder that died may have left a push half
 * written (its head not yet moved, so nothing of it is read), or have died
 * between its store's write and its push: a new epoch covers both. */
static void file_lock(fhead *h)
{
    if (pthread_mutex_lock(&h->mu) == EOWNERDEAD) {
        pthread_mutex_consistent(&h->mu);
        file_reset_locked(h);
    }
}

static void file_unlock(fhead *h)
{
    pthread_mutex_unlock(&h->mu);
}

/* Map `path` (see "Host feeds"): allocate its blocks, map it, and set it up
 * if no process has yet. Setting up is ordered by an OFD lock on the file's
 * first byte, taken on this open's own descriptor (so it also excludes
 * threads of this process, and ends with the descriptor). */
static int file_map(const char *path, fhead **out)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return DP_EBACKEND;
    int rc = posix_fallocate(fd, 0, (off_t)DP_FEED_FILE_BYTES);
    if (rc != 0) {
        close(fd);
        errno = rc;
        return DP_EBACKEND;
    }
    void *p = mmap(NULL, DP_FEED_FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        close(fd);
        errno = e;
        return DP_EBACKEND;
    }
    fhead *h = p;
    int status = DP_OK;
    if (atomic_load_explicit(&h->magic, memory_order_acquire) != FILE_MAGIC) {
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
        int r;
        do
            r = fcntl(fd, F_OFD_SETLKW, &fl);
        while (r != 0 && errno == EINTR);
        if (r != 0) {
            status = DP_EBACKEND;
        } else if (atomic_load_explicit(&h->magic, memory_order_acquire) != FILE_MAGIC) {
            /* Nobody set it up, or a process died doing so: no live ring
             * is here (a ring is used only once the magic is published). */
            memset(p, 0, FILE_HEAD);
            pthread_mutexattr_t a;
            pthread_mutexattr_init(&a);
            pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
            pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
            r = pthread_mutex_init(&h->mu, &a);
            pthread_mutexattr_destroy(&a);
            if (r != 0) {
                errno = r;
                status = DP_EBACKEND;
            } else {
                h->slots = DP_FEED_FILE_SLOTS;
                h->keymax = DP_FEED_FILE_KEY;
                h->epoch = 1; /* as the in-process feed: a zeroed cursor resets */
                h->reset_at = dp_clock_now();
                atomic_store_explicit(&h->magic, FILE_MAGIC, memory_order_release);
            }
        }
        /* closing the descriptor below drops the OFD lock */
    }
    if (status == DP_OK && (h->slots != DP_FEED_FILE_SLOTS || h->keymax != DP_FEED_FILE_KEY)) {
        errno = EPROTO;
        status = DP_EBACKEND;
    }
    int e = errno;
    close(fd);
    if (status != DP_OK) {
        munmap(p, DP_FEED_FILE_BYTES);
        errno = e;
        return status;
    }
    *out = h;
    return DP_OK;
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
    int is_file = name[0] == '/';
    fhead *file = NULL;
    if (is_file) {
        char path[PATH_MAX];
        if (len >= sizeof path || memchr(name, 0, len)) {
            uv_mutex_unlock(&registry_mu);
            return DP_EINVAL;
        }
        memcpy(path, name, len);
        path[len] = 0;
        int rc = file_map(path, &file);
        if (rc != DP_OK) {
            uv_mutex_unlock(&registry_mu);
            return rc;
        }
    }
    f = calloc(1, sizeof *f);
    size_t cap = is_file ? 0 : capacity ? capacity : DP_FEED_CAPACITY;
    if (f) {
        f->name = malloc(len);
        f->ring = is_file ? NULL : calloc(cap, sizeof *f->ring);
    }
    if (!f || !f->name || (!is_file && !f->ring)) {
        uv_mutex_unlock(&registry_mu);
        if (file)
            munmap(file, DP_FEED_FILE_BYTES);
        if (f) {
            free(f->name);
            free(f->ring);
            free(f);
        }
        return DP_ENOMEM;
    }
    f->file = file;
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
    return (const volatile uint32_t *)(f->file ? &f->file->stamp : &f->stamp);
}

/* -- Producers ------------------------------------------------------------ */

static void reset_locked(dp_feed *f)
{
    f->epoch++;
    f->reset_at = dp_clock_now();
    atomic_fetch_add_explicit(&f->stamp, 1, memory_order_release);
}

static void file_push(fhead *h, const char *key, size_t klen, uint32_t origin, int scope)
{
    file_lock(h);
    if (klen > DP_FEED_FILE_KEY) {
        file_reset_locked(h);
    } else {
        fslot *e = file_slot(h, h->head);
        memcpy(e->key, key, klen);
        e->klen = (uint32_t)klen;
        e->pid = (uint32_t)getpid();
        e->origin = origin;
        e->scope = scope;
        h->head++;
        atomic_fetch_add_explicit(&h->stamp, 1, memory_order_release);
    }
    file_unlock(h);
}

DP_API int dp_feed_push(dp_feed *f, const char *key, size_t klen, uint32_t origin, int scope)
{
    if (f->file) {
        file_push(f->file, key, klen, origin, scope);
        return DP_OK;
    }
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
    if (f->file) {
        file_lock(f->file);
        file_reset_locked(f->file);
        file_unlock(f->file);
        return;
    }
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

static void file_catch_up_locked(fhead *h, dp_feed_cursor *c)
{
    c->seq = h->head;
    c->epoch = h->epoch;
    c->stamp = atomic_load_explicit(&h->stamp, memory_order_relaxed);
    c->reset_at = h->reset_at;
    c->more = 0;
}

DP_API void dp_feed_cursor_init(dp_feed *f, dp_feed_cursor *c)
{
    if (f->file) {
        file_lock(f->file);
        file_catch_up_locked(f->file, c);
        c->reset = 0;
        file_unlock(f->file);
        return;
    }
    uv_mutex_lock(&f->mu);
    catch_up_locked(f, c);
    c->reset = 0;
    uv_mutex_unlock(&f->mu);
}

/* A cursor off the ring, or in an older epoch, starts over at the head. A
 * new epoch's time is the floor for shared copies; one that merely fell
 * behind gets now (what changed meanwhile is unknown). */
static int fell_behind(uint64_t seq, uint64_t head, size_t cap)
{
    return head - seq > cap || seq > head;
}

static int file_read(fhead *h, dp_feed_cursor *c, dp_bytes *keys, size_t *lens,
                     int32_t *scopes, size_t max, size_t *n)
{
    uint32_t me = (uint32_t)getpid();
    int rc = DP_OK;
    file_lock(h);
    if (c->epoch != h->epoch || fell_behind(c->seq, h->head, DP_FEED_FILE_SLOTS)) {
        int same_epoch = c->epoch == h->epoch;
        file_catch_up_locked(h, c);
        if (same_epoch)
            c->reset_at = dp_clock_now();
        c->reset = 1;
        file_unlock(h);
        return DP_OK;
    }
    size_t got = 0;
    uint64_t seq = c->seq;
    for (; seq < h->head && got < max; seq++) {
        const fslot *e = file_slot(h, seq);
        if (c->origin && e->origin == c->origin && e->pid == me)
            continue;
        size_t klen = e->klen <= DP_FEED_FILE_KEY ? e->klen : DP_FEED_FILE_KEY;
        if (dp_bytes_reserve(keys, keys->len + klen) != DP_OK) {
            rc = DP_ENOMEM;
            break;
        }
        memcpy(keys->data + keys->len, e->key, klen);
        keys->len += klen;
        lens[got] = klen;
        scopes[got] = e->scope;
        got++;
    }
    if (rc != DP_OK) {
        file_catch_up_locked(h, c);
        c->reset_at = dp_clock_now();
        c->reset = 1;
        got = 0;
        keys->len = 0;
    } else if (seq < h->head) {
        c->seq = seq;
        c->more = 1;
    } else {
        file_catch_up_locked(h, c);
    }
    file_unlock(h);
    *n = got;
    return rc;
}

DP_API int dp_feed_read(dp_feed *f, dp_feed_cursor *c, dp_bytes *keys, size_t *lens,
                        int32_t *scopes, size_t max, size_t *n)
{
    *n = 0;
    keys->len = 0;
    c->reset = 0;
    c->more = 0;
    if (f->file)
        return file_read(f->file, c, keys, lens, scopes, max, n);
    int rc = DP_OK;
    uv_mutex_lock(&f->mu);
    if (c->epoch != f->epoch || fell_behind(c->seq, f->head, f->cap)) {
        int same_epoch = c->epoch == f->epoch;
        catch_up_locked(f, c);
        if (same_epoch)
            c->reset_at = dp_clock_now();
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
        c->reset_at = dp_clock_now();
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
