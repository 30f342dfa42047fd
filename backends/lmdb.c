/* lmdb.c -- dogpile.cache.lmdb: a persistent cache in an LMDB environment,
 * shared by every process and thread on the machine, with a lock per key
 * between processes.
 *
 * Instances. One MDB_env per environment and process: the core shares the
 * instance between regions by identity, the realpath of `path` (identify),
 * so two regions on one path share the map and the reader table. LMDB forbids
 * using an env across fork(): a pthread_atfork child handler bumps a
 * generation counter, and the first operation in the child reopens the
 * environment. The parent's MDB_env and its reader transactions are abandoned
 * in the child (never closed: closing would clear reader slots that the
 * parent still uses).
 *
 * Records. One unnamed database. Values live under 'v'..key with a 16-byte
 * header (expiry time, last access time; doubles, stored unaligned) before
 * the region's bytes; bookkeeping lives under 'm'..name ("mformat", the
 * format tag; "msweep", when the next sweep is due). The prefix also lets the
 * empty key be stored (LMDB refuses zero-length keys).
 *
 * Reads. A get runs in a read-only transaction taken from a small lock-free
 * pool of reset transactions (MDB_NOTLS, mdb_txn_renew/mdb_txn_reset): no
 * allocation, no lock, no write. LRU order is kept lazily: when a hit finds
 * the entry's access time older than `lru_resolution`, the key is queued in
 * a per-process touch buffer, and the next write transaction of this process
 * (a set or delete, or a flush when the buffer is full) rewrites those access
 * times. Reads stay cheap; the order is exact to lru_resolution, as seen by
 * the processes that wrote since; a process that never sets flushes its
 * buffer itself when it is full (one write transaction per TOUCH_MAX touches).
 *
 * Space. `max_bytes` (default 60% of map_size) bounds the pages the tree
 * uses (mdb_stat: branch + leaf + overflow pages, O(1) inside the write
 * transaction); the rest of the map is room for copy-on-write and the free
 * list, so the tree can always be shrunk. A set that would pass max_bytes
 * first deletes expired entries, then the least recently used ones until the
 * tree is 10% under the bound (one scan per 10% of turnover); with on_full =
 * "error" it deletes only the expired ones and otherwise fails. Should LMDB
 * still report MDB_MAP_FULL, the transaction is aborted (LMDB leaves the file
 * as it was), stale readers are cleared and half the entries by age are
 * evicted in transactions of their own, then the set is retried. Entries not
 * chosen for eviction are never touched. With `expiration_time`, a sweep
 * deletes expired entries every `sweep_interval` seconds, run by whichever
 * process writes first after it is due.
 *
 * The lock. A lock per key between processes: an open-file-description lock
 * (F_OFD_SETLK) on one byte of the lock file next to the data, at an offset
 * given by a 62-bit hash of the key. The kernel releases it when its holder
 * dies, so a SIGKILLed creator never blocks the others. Each acquisition
 * opens its own descriptor (OFD locks conflict between descriptors, also in
 * one process), kept in a per-instance list until unlock closes it. A bounded
 * wait (F_OFD_SETLKW cannot time out without signals, which a library must
 * not install) sleeps on a shared futex in the lock file's first page that
 * every unlock bumps and wakes, retrying the lock at least every 8 ms (see
 * "Waking" below); an unbounded wait blocks in F_OFD_SETLKW. Waiting for a
 * release without taking the lock (wait_unlocked) sleeps on the same futex
 * and tests the byte with F_OFD_GETLK.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include <lauxlib.h>
#include <lmdb.h>
#include <lua.h>

#include "dogpile.h"
#include "dogpile_feed.h"

#define NAME "dogpile.cache.lmdb"
#define HDR 16               /* double expires (0: never), double atime */
#define NODE_OVERHEAD 16     /* LMDB's node header and index slot, roughly */
#define NPOOL 32             /* reset read transactions kept per instance */
#define TOUCH_MAX 1024       /* queued access-time updates per process */
#define FORMAT "dogpile-lmdb 1"
#define LOCK_SPAN ((uint64_t)1 << 62)
/* A byte of the lock file past every key's slot: each instance holds a
 * shared lock on it while open (see "Settings between processes"). */
#define OPEN_BYTE ((off_t)LOCK_SPAN)
#define OPEN_WAIT 10.0       /* seconds another opener may hold it exclusively */
/* The longest step of a polling wait (dp_backoff): a holder that died or a
 * release that woke nobody is noticed within it. */
#define POLL_MAX 0.008

enum { ON_FULL_EVICT, ON_FULL_ERROR };
enum { SYNC_FULL, SYNC_META, SYNC_NONE };

/* -- Arguments: the struct the core fills, and the table it fills it by --- */

typedef struct lm_settings {
    char *path;            /* as given; the identity is its realpath */
    int64_t map_size;
    int64_t max_bytes;     /* 0: 60% of map_size */
    int64_t max_readers;
    int sync, on_full;     /* SYNC_*, ON_FULL_* */
    double ttl, lru_resolution, sweep_interval;
    char *mode;            /* octal, checked by identify() */
    double lock_timeout;   /* the handle's: bounds the core's two-level lock */
} lm_settings;

static const char *const syncs[] = {"full", "meta", "none", NULL};
static const char *const on_fulls[] = {"evict", "error", NULL};

static const dp_arg_spec lm_args[] = {
    {.name = "path", .kind = DP_SPEC_STR, .flags = DP_SPEC_REQUIRED | DP_SPEC_KEY, .min = 1,
     .max = PATH_MAX - 1, .offset = offsetof(lm_settings, path)},
    {.name = "map_size", .kind = DP_SPEC_SIZE, .min = 65536, .max = 1e15,
     .def = 256.0 * 1024 * 1024, .offset = offsetof(lm_settings, map_size)},
    {.name = "max_bytes", .kind = DP_SPEC_SIZE, .flags = DP_SPEC_ABOVE_MIN,
     .offset = offsetof(lm_settings, max_bytes)},
    {.name = "max_readers", .kind = DP_SPEC_INT, .min = 1, .max = 1e6, .def = 126,
     .offset = offsetof(lm_settings, max_readers)},
    {.name = "sync", .kind = DP_SPEC_ENUM, .choices = syncs, .def = SYNC_META,
     .offset = offsetof(lm_settings, sync)},
    {.name = "expiration_time", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_ABOVE_MIN,
     .offset = offsetof(lm_settings, ttl)},
    {.name = "on_full", .kind = DP_SPEC_ENUM, .choices = on_fulls, .def = ON_FULL_EVICT,
     .offset = offsetof(lm_settings, on_full)},
    {.name = "lru_resolution", .kind = DP_SPEC_SECONDS, .def = 60,
     .offset = offsetof(lm_settings, lru_resolution)},
    {.name = "sweep_interval", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_ABOVE_MIN, .def = 60,
     .offset = offsetof(lm_settings, sweep_interval)},
    {.name = "mode", .kind = DP_SPEC_STR, .min = 1, .def_str = "0644",
     .what = "an octal string such as \"0640\"", .offset = offsetof(lm_settings, mode)},
    /* A dead holder's lock is released by the kernel at once: this bounds
     * how long a stuck one keeps the others waiting. */
    {.name = "lock_timeout", .kind = DP_SPEC_SECONDS,
     .flags = DP_SPEC_ABOVE_MIN | DP_SPEC_INFINITE | DP_SPEC_HANDLE | DP_SPEC_LOCK_TIMEOUT,
     .def = 30, .offset = offsetof(lm_settings, lock_timeout)},
    {0},
};

/* -- Instance ----------------------------------------------------------------- */

typedef struct held_lock {
    struct held_lock *next;
    uint64_t slot;
    int fd;
} held_lock;

typedef struct inst {
    const lm_settings *cfg; /* the core's: valid until destroy */
    char *path;       /* realpath */
    char *lock_path;
    int subdir;       /* path is a directory (else MDB_NOSUBDIR) */
    int mode;         /* cfg->mode, parsed */
    /* in use: the file's when another process had it open (see "Settings
     * between processes"), else what cfg asked for */
    double map_size, max_bytes;
    int open_fd;      /* holds a shared OFD lock on OPEN_BYTE of the lock file */
    /* Made while opens were deferred (dp_lmdb_defer_until_fork): nothing
     * is created or opened until the first operation, in a forked child. */
    int deferred;
    unsigned defer_gen; /* the fork generation it was made in */
    /* the environment of this process */
    uv_mutex_t env_mu; /* reopening after fork */
    MDB_env *env;
    MDB_dbi dbi;
    unsigned gen;     /* fork generation the env was opened in */
    size_t maxkey;
    _Atomic(MDB_txn *) pool[NPOOL];
    uv_mutex_t mu;    /* touch buffer and held locks */
    char **touch;
    size_t *touch_len;
    size_t ntouch;
    held_lock *held;
    _Atomic uint64_t hits, misses, evictions, expirations;
} inst;

static uv_once_t fork_once = UV_ONCE_INIT;
static _Atomic unsigned fork_gen;

static void on_fork_child(void)
{
    atomic_fetch_add(&fork_gen, 1);
}

static void fork_init(void)
{
    pthread_atfork(NULL, NULL, on_fork_child);
}

/* -- Files made with the mode asked for ------------------------------------------
 * `mode` is applied as given, whatever the umask: a file's group or others
 * bits that the creator's umask would drop (nginx's master, root, umask
 * 022, with workers running as another user) are what let other users open
 * it. Only files and directories made here are changed, never existing ones. */

/* The mode of a directory for files of `mode`: search wherever read is. */
static int dir_mode(int mode)
{
    return mode | ((mode & 0444) >> 2) | 0700;
}

static int open_create(const char *path, int mode)
{
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd >= 0) {
        (void)fchmod(fd, (mode_t)mode);
        return fd;
    }
    if (errno != EEXIST)
        return -1;
    return open(path, O_RDWR | O_CLOEXEC);
}

/* -- Deferred opens ------------------------------------------------------------
 * nginx builds regions in init_by_lua, in the master, which runs as root;
 * its workers run as another user (`user nobody;`) and could not open files
 * the master made with mode 0644. While opens are deferred (the Lua module
 * asks for it in nginx's master as root), an instance made in this process
 * touches nothing on disk: the first operation in a forked child (a
 * worker) creates and opens everything, as the worker's user. */
static _Atomic unsigned defer_gen = UINT_MAX;

static int deferred_here(const inst *s)
{
    return s->deferred && s->defer_gen == atomic_load(&fork_gen);
}

static uint64_t hash_key(const char *key, size_t len)
{
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 31);
}

/* Whether a failed write to `file` means its file system is full: ENOSPC
 * and EDQUOT say so; EIO does too when the file system has no block left (a
 * full disk seen through writeback), and is then reported as a full disk, not
 * as an I/O error alone. */
static int disk_full(const char *file, int rc)
{
    if (rc == ENOSPC || rc == EDQUOT)
        return 1;
    struct statvfs v;
    return rc == EIO && statvfs(file, &v) == 0 && v.f_bavail == 0;
}

static int full_fail(dp_err *err, const char *op, const char *file, int rc)
{
    return dp_err_set(err, DP_EBACKEND, "%s on '%s': no space left on device%s (its file "
                      "system is full; nothing was changed)", op, file,
                      rc == EIO ? " (reported as an input/output error)" : "");
}

static int mdb_fail(dp_err *err, const inst *s, const char *op, int rc)
{
    if (disk_full(s->path, rc))
        return full_fail(err, op, s->path, rc);
    return dp_err_set(err, DP_EBACKEND, "%s on '%s': %s", op, s->path, mdb_strerror(rc));
}

static double rd_double(const char *p)
{
    double d;
    memcpy(&d, p, sizeof d);
    return d;
}

static void wr_double(char *p, double d)
{
    memcpy(p, &d, sizeof d);
}

/* -- Opening the environment ------------------------------------------------- */

static void pool_drop(inst *s, int abort_them)
{
    for (int i = 0; i < NPOOL; i++) {
        MDB_txn *t = atomic_exchange(&s->pool[i], NULL);
        if (t && abort_them)
            mdb_txn_abort(t);
    }
}

/* LMDB sizes its lock file (the reader table) with ftruncate and writes it
 * through a shared mapping: on a full file system the first write to a page
 * with no block behind it kills the process with SIGBUS. Allocating the
 * table's blocks first (beyond the end of the file, so LMDB still sees the
 * size it expects and sizes the file itself) turns that into ENOSPC here. The
 * bound is generous: LMDB's table is (max_readers - 1) * 64 + 192 bytes.
 * File systems without fallocate keep LMDB's own behaviour. */
static int lmdb_lock_alloc(inst *s, dp_err *err)
{
    char lp[PATH_MAX + 16];
    snprintf(lp, sizeof lp, s->subdir ? "%s/lock.mdb" : "%s-lock", s->path);
    int fd = open_create(lp, s->mode);
    if (fd < 0)
        return DP_OK; /* mdb_env_open says why, naming the path */
    off_t want = ((off_t)s->cfg->max_readers * 64 + 256 + 4095) / 4096 * 4096;
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size > want)
        want = st.st_size;
    int rc = fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, want) == 0 ? 0 : errno;
    close(fd);
    if (rc && disk_full(lp, rc))
        return full_fail(err, NAME ": opening the reader table", lp, rc);
    return DP_OK;
}

/* -- Settings between processes ----------------------------------------------
 * map_size and max_bytes must be the same in every process on a path: a
 * process with a smaller max_bytes evicts what the others keep, one with a
 * smaller map fails once the file has grown past it. The settings in use are
 * stored in the file ("msettings": two doubles) and held stable while any
 * process has the path open: each instance holds a shared OFD lock on
 * OPEN_BYTE of the lock file for its lifetime (the kernel drops it with the
 * process). An opener that gets the byte exclusively is alone: it writes its
 * own settings, then turns its lock shared. Any other opener waits for that
 * shared lock (so the settings it reads are written) and adopts the file's
 * settings when they differ from its own, with a note that the Lua module
 * logs. Settings change, then, when a process opens the path while no other
 * has it open. */

enum { SETTINGS_KEEP, SETTINGS_ADOPT, SETTINGS_WRITE };

static int ofd_set(int fd, off_t at, short type, int wait)
{
    struct flock fl = {0};
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = at;
    fl.l_len = 1;
    int rc;
    do
        rc = fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl);
    while (rc != 0 && errno == EINTR);
    return rc;
}

/* Takes the shared lock on OPEN_BYTE (exclusively first, when it can): 1 when
 * alone (held exclusively), 0 when shared, -1 with err set. */
static int open_byte_take(inst *s, dp_err *err)
{
    if (ofd_set(s->open_fd, OPEN_BYTE, F_WRLCK, 0) == 0)
        return 1;
    dp_backoff bo;
    dp_backoff_init(&bo, OPEN_WAIT, POLL_MAX);
    for (;;) {
        if (ofd_set(s->open_fd, OPEN_BYTE, F_RDLCK, 0) == 0)
            return 0;
        int e = errno;
        if (e != EAGAIN && e != EACCES) {
            dp_err_set(err, DP_EBACKEND, NAME ": cannot lock '%s': %s", s->lock_path,
                       strerror(e));
            return -1;
        }
        if (!dp_backoff_sleep(&bo)) {
            dp_err_set(err, DP_EBACKEND, NAME ": another process has been opening '%s' for %g "
                       "s without finishing (stopped?)", s->path, OPEN_WAIT);
            return -1;
        }
    }
}

/* In the open's first transaction: write our settings, or read the file's
 * and adopt them (*adopt set, mapsize applied after the commit). */
static int settings_sync(inst *s, MDB_txn *txn, MDB_dbi dbi, int mode, double file[2])
{
    MDB_val k = {9, "msettings"}, v;
    int g = mdb_get(txn, dbi, &k, &v);
    if (g && g != MDB_NOTFOUND)
        return g;
    if (g == 0 && v.mv_size == 16) {
        double m = rd_double(v.mv_data), b = rd_double((char *)v.mv_data + 8);
        if (m == s->map_size && b == s->max_bytes)
            return 0; /* no write: a full disk can still be opened and read */
        if (mode == SETTINGS_ADOPT && m >= 65536 && m <= 1e15 && b > 0 && b <= m * 0.9) {
            file[0] = m;
            file[1] = b;
            return 0;
        }
    }
    char buf[16];
    wr_double(buf, s->map_size);
    wr_double(buf + 8, s->max_bytes);
    v.mv_size = 16;
    v.mv_data = buf;
    return mdb_put(txn, dbi, &k, &v, 0);
}

/* Opens s->env for this process and checks (or writes) the format tag, and
 * the settings as `settings` says (SETTINGS_KEEP in a forked child: they are
 * the parent's). When it adopts the file's settings, a note for the log is
 * left in err->msg with err->code DP_OK. */
static int env_open(inst *s, int settings, dp_err *err)
{
    MDB_env *env;
    int rc = lmdb_lock_alloc(s, err);
    if (rc)
        return rc;
    rc = mdb_env_create(&env);
    if (rc)
        return mdb_fail(err, s, "mdb_env_create", rc);
    mdb_env_set_mapsize(env, (size_t)s->map_size);
    mdb_env_set_maxreaders(env, (unsigned)s->cfg->max_readers);
    unsigned flags = MDB_NOTLS | MDB_NORDAHEAD;
    if (!s->subdir)
        flags |= MDB_NOSUBDIR;
    if (s->cfg->sync == SYNC_META)
        flags |= MDB_NOMETASYNC;
    else if (s->cfg->sync == SYNC_NONE)
        flags |= MDB_NOSYNC | MDB_NOMETASYNC;
    char data_path[PATH_MAX + 16];
    snprintf(data_path, sizeof data_path, s->subdir ? "%s/data.mdb" : "%s", s->path);
    int made = access(data_path, F_OK) != 0;
    rc = mdb_env_open(env, s->path, flags, (mdb_mode_t)s->mode);
    if (!rc && made)
        (void)chmod(data_path, (mode_t)s->mode); /* LMDB's open is masked by the umask */
    if (rc) {
        mdb_env_close(env);
        if (rc == MDB_INVALID || rc == MDB_VERSION_MISMATCH)
            return dp_err_set(err, DP_EBACKEND, NAME ": '%s' is not an LMDB environment "
                              "this library can open (%s)", s->path, mdb_strerror(rc));
        if (disk_full(s->path, rc))
            return full_fail(err, NAME ": opening the LMDB environment", s->path, rc);
        if (rc == EACCES || rc == EPERM || rc == EROFS)
            return dp_err_set(err, DP_EBACKEND, NAME ": cannot open '%s' for reading and "
                              "writing: %s", s->path, mdb_strerror(rc));
        return dp_err_set(err, DP_EBACKEND, NAME ": cannot open the LMDB environment '%s': %s",
                          s->path, mdb_strerror(rc));
    }
    int dead = 0;
    mdb_reader_check(env, &dead); /* slots of readers that died */
    MDB_txn *txn;
    rc = mdb_txn_begin(env, NULL, 0, &txn);
    MDB_dbi dbi = 0;
    if (!rc)
        rc = mdb_dbi_open(txn, NULL, 0, &dbi);
    if (!rc) {
        MDB_val k = {7, "mformat"}, v;
        int g = mdb_get(txn, dbi, &k, &v);
        if (g == MDB_NOTFOUND) {
            MDB_stat st;
            mdb_stat(txn, dbi, &st);
            if (st.ms_entries > 0) {
                mdb_txn_abort(txn);
                mdb_env_close(env);
                return dp_err_set(err, DP_EBACKEND, NAME ": '%s' is an LMDB environment that "
                                  "dogpile did not make (%zu records, no format tag); "
                                  "refusing to use it", s->path, st.ms_entries);
            }
            v.mv_size = strlen(FORMAT);
            v.mv_data = FORMAT;
            rc = mdb_put(txn, dbi, &k, &v, 0);
        } else if (g == 0 && (v.mv_size != strlen(FORMAT) || memcmp(v.mv_data, FORMAT, v.mv_size))) {
            mdb_txn_abort(txn);
            mdb_env_close(env);
            return dp_err_set(err, DP_EBACKEND, NAME ": '%s' holds the format '%.*s', not '%s'",
                              s->path, (int)(v.mv_size > 40 ? 40 : v.mv_size),
                              (const char *)v.mv_data, FORMAT);
        } else {
            rc = g;
        }
    }
    double file[2] = {0, 0};
    if (!rc && settings != SETTINGS_KEEP)
        rc = settings_sync(s, txn, dbi, settings, file);
    if (!rc)
        rc = mdb_txn_commit(txn);
    else if (txn)
        mdb_txn_abort(txn);
    if (rc) {
        mdb_env_close(env);
        if (disk_full(s->path, rc))
            return full_fail(err, NAME ": initialising the LMDB environment", s->path, rc);
        return dp_err_set(err, DP_EBACKEND, NAME ": cannot initialise '%s': %s", s->path,
                          mdb_strerror(rc));
    }
    if (file[0] > 0 && (file[0] != s->map_size || file[1] != s->max_bytes)) {
        if (err)
            snprintf(err->msg, sizeof err->msg, NAME ": '%s' is open in another process with "
                     "map_size %.0f and max_bytes %.0f: using those, not the %.0f and %.0f asked "
                     "for (settings change when no other process has it open)", s->path,
                     file[0], file[1], s->map_size, s->max_bytes);
        mdb_env_set_mapsize(env, (size_t)file[0]);
        s->map_size = file[0];
        s->max_bytes = file[1];
    }
    s->env = env;
    s->dbi = dbi;
    s->maxkey = (size_t)mdb_env_get_maxkeysize(env);
    s->gen = atomic_load(&fork_gen);
    return DP_OK;
}

/* In a forked child, reopen: the parent's env must not be used or closed
 * here. Its pool, touches and lock descriptors are dropped (closing the
 * inherited lock descriptors releases nothing the parent holds). */
static int full_open(inst *s, dp_err *err);

static int ensure_env(inst *s, dp_err *err)
{
    if (s->gen == atomic_load_explicit(&fork_gen, memory_order_relaxed))
        return DP_OK;
    uv_mutex_lock(&s->env_mu);
    int rc = DP_OK;
    if (s->deferred) {
        /* The first operation of an instance made while opens were
         * deferred: everything is made here, as this process's user. */
        rc = full_open(s, err);
        if (rc == DP_OK)
            s->deferred = 0;
    } else if (s->gen != atomic_load(&fork_gen)) {
        pool_drop(s, 0);
        uv_mutex_lock(&s->mu);
        for (size_t i = 0; i < s->ntouch; i++)
            free(s->touch[i]);
        s->ntouch = 0;
        while (s->held) {
            held_lock *h = s->held;
            s->held = h->next;
            close(h->fd);
            free(h);
        }
        uv_mutex_unlock(&s->mu);
        rc = env_open(s, SETTINGS_KEEP, err); /* the old MDB_env is abandoned on purpose */
    }
    uv_mutex_unlock(&s->env_mu);
    return rc;
}

/* -- Reading ------------------------------------------------------------------ */

static int rtxn_get(inst *s, MDB_txn **out)
{
    for (int i = 0; i < NPOOL; i++) {
        MDB_txn *t = atomic_exchange_explicit(&s->pool[i], NULL, memory_order_acquire);
        if (t) {
            int rc = mdb_txn_renew(t);
            if (rc == 0) {
                *out = t;
                return 0;
            }
            mdb_txn_abort(t);
            break;
        }
    }
    return mdb_txn_begin(s->env, NULL, MDB_RDONLY, out);
}

static void rtxn_put(inst *s, MDB_txn *t)
{
    mdb_txn_reset(t);
    for (int i = 0; i < NPOOL; i++) {
        MDB_txn *expect = NULL;
        if (atomic_compare_exchange_strong_explicit(&s->pool[i], &expect, t,
                                                    memory_order_release, memory_order_relaxed))
            return;
    }
    mdb_txn_abort(t);
}

static int make_key(inst *s, const char *key, size_t klen, char *buf, MDB_val *k, dp_err *err)
{
    if (klen + 1 > s->maxkey)
        return dp_err_set(err, DP_EINVAL, NAME ": a key of %zu bytes is longer than LMDB's "
                          "limit of %zu (the Lua backend mangles longer keys with SHA-1)",
                          klen, s->maxkey - 1);
    buf[0] = 'v';
    memcpy(buf + 1, key, klen);
    k->mv_size = klen + 1;
    k->mv_data = buf;
    return DP_OK;
}

static void touch_add(inst *s, const char *key, size_t klen);
static int flush_touches_own_txn(inst *s);

static int lm_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    inst *s = self;
    char kb[512];
    MDB_val k, v;
    int rc = ensure_env(s, err);
    if (rc || (rc = make_key(s, key, klen, kb, &k, err)))
        return rc;
    MDB_txn *txn;
    if ((rc = rtxn_get(s, &txn)))
        return rc == MDB_READERS_FULL
            ? dp_err_set(err, DP_EBACKEND, "get on '%s': all %d reader slots are in use "
                         "(raise max_readers)", s->path, (int)s->cfg->max_readers)
            : mdb_fail(err, s, "get (mdb_txn_begin)", rc);
    rc = mdb_get(txn, s->dbi, &k, &v);
    if (rc == MDB_NOTFOUND || (rc == 0 && v.mv_size < HDR)) {
        rtxn_put(s, txn);
        atomic_fetch_add_explicit(&s->misses, 1, memory_order_relaxed);
        return DP_ENOTFOUND;
    }
    if (rc) {
        rtxn_put(s, txn);
        return mdb_fail(err, s, "get", rc);
    }
    const char *p = v.mv_data;
    double expires = rd_double(p), atime = rd_double(p + 8);
    double now = dp_clock_upper();
    if (expires > 0 && now >= expires && dp_clock_now() >= expires) {
        rtxn_put(s, txn);
        atomic_fetch_add_explicit(&s->misses, 1, memory_order_relaxed);
        return DP_ENOTFOUND;
    }
    size_t vlen = v.mv_size - HDR;
    if (dp_bytes_reserve(out, vlen) != DP_OK) {
        rtxn_put(s, txn);
        return dp_err_set(err, DP_ENOMEM, "out of memory copying a %zu-byte value", vlen);
    }
    if (vlen) /* an empty value into a buffer never grown: data is NULL */
        memcpy(out->data, p + HDR, vlen);
    out->len = vlen;
    rtxn_put(s, txn);
    atomic_fetch_add_explicit(&s->hits, 1, memory_order_relaxed);
    if (now - atime > s->cfg->lru_resolution)
        touch_add(s, key, klen);
    return DP_OK;
}

/* -- Access times ---------------------------------------------------------------- */

static void touch_add(inst *s, const char *key, size_t klen)
{
    char *copy = malloc(klen ? klen : 1);
    if (!copy)
        return; /* the order gets less exact; nothing else depends on it */
    memcpy(copy, key, klen);
    uv_mutex_lock(&s->mu);
    int full = 0;
    if (!s->touch) {
        s->touch = malloc(TOUCH_MAX * sizeof *s->touch);
        s->touch_len = malloc(TOUCH_MAX * sizeof *s->touch_len);
        if (!s->touch || !s->touch_len) {
            free(s->touch);
            free(s->touch_len);
            s->touch = NULL;
            s->touch_len = NULL;
        }
    }
    if (s->touch && s->ntouch < TOUCH_MAX) {
        s->touch[s->ntouch] = copy;
        s->touch_len[s->ntouch++] = klen;
        copy = NULL;
        full = s->ntouch == TOUCH_MAX;
    }
    uv_mutex_unlock(&s->mu);
    free(copy);
    if (full)
        flush_touches_own_txn(s);
}

/* Rewrites the access time of the queued keys inside `txn`. */
static int flush_touches(inst *s, MDB_txn *txn)
{
    uv_mutex_lock(&s->mu);
    size_t n = s->ntouch;
    char **keys = s->touch;
    size_t *lens = s->touch_len;
    s->ntouch = 0;
    s->touch = NULL;
    s->touch_len = NULL;
    uv_mutex_unlock(&s->mu);
    int rc = 0;
    double now = dp_clock_now();
    char kb[512];
    char *tmp = NULL;
    size_t tmpcap = 0;
    for (size_t i = 0; i < n; i++) {
        MDB_val k, v;
        if (rc == 0 && make_key(s, keys[i], lens[i], kb, &k, NULL) == DP_OK &&
            mdb_get(txn, s->dbi, &k, &v) == 0 && v.mv_size >= HDR &&
            now > rd_double((char *)v.mv_data + 8)) {
            /* The reader already decided that the access time was stale
             * (with its own clock reading): write it, do not decide again. */
            if (v.mv_size > tmpcap) {
                char *t2 = realloc(tmp, v.mv_size);
                if (!t2)
                    continue;
                tmp = t2;
                tmpcap = v.mv_size;
            }
            memcpy(tmp, v.mv_data, v.mv_size);
            wr_double(tmp + 8, now);
            MDB_val nv = {v.mv_size, tmp};
            rc = mdb_put(txn, s->dbi, &k, &nv, 0);
        }
        free(keys[i]);
    }
    free(tmp);
    free(keys);
    free(lens);
    return rc;
}

static int flush_touches_own_txn(inst *s)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin(s->env, NULL, 0, &txn);
    if (rc)
        return rc;
    rc = flush_touches(s, txn);
    if (rc) {
        mdb_txn_abort(txn);
        return rc;
    }
    return mdb_txn_commit(txn);
}

/* -- Space ------------------------------------------------------------------------ */

static double tree_bytes(inst *s, MDB_txn *txn)
{
    MDB_stat st;
    if (mdb_stat(txn, s->dbi, &st))
        return 0;
    return (double)(st.ms_branch_pages + st.ms_leaf_pages + st.ms_overflow_pages) * st.ms_psize;
}

typedef struct aged {
    double atime, size;
} aged;

static int cmp_aged(const void *a, const void *b)
{
    double x = ((const aged *)a)->atime, y = ((const aged *)b)->atime;
    return x < y ? -1 : x > y;
}

/* Deletes expired entries; then, when `lru` and the tree is still larger than
 * `target` bytes, the least recently used entries (oldest access time first)
 * until it is not. At most `max_deletes` deletions (0: no limit), so that a
 * transaction in a full map stays small. *deleted counts them. Returns an
 * LMDB code. */
static int evict(inst *s, MDB_txn *txn, double target, int lru, size_t max_deletes,
                 size_t *deleted)
{
    double now = dp_clock_now();
    MDB_cursor *c;
    int rc = mdb_cursor_open(txn, s->dbi, &c);
    if (rc)
        return rc;
    aged *ages = NULL;
    size_t n = 0, cap = 0;
    double total = 0;
    MDB_val k = {1, "v"}, v;
    rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && ((char *)k.mv_data)[0] == 'v') {
        const char *p = v.mv_data;
        double size = (double)(k.mv_size + v.mv_size + NODE_OVERHEAD);
        if (v.mv_size < HDR || (rd_double(p) > 0 && now >= rd_double(p))) {
            if (max_deletes && *deleted >= max_deletes)
                break;
            if ((rc = mdb_cursor_del(c, 0)))
                break;
            (*deleted)++;
            atomic_fetch_add(&s->expirations, 1);
        } else if (lru) {
            if (n == cap) {
                cap = cap ? cap * 2 : 1024;
                aged *a2 = realloc(ages, cap * sizeof *a2);
                if (!a2) {
                    rc = ENOMEM;
                    break;
                }
                ages = a2;
            }
            ages[n].atime = rd_double(p + 8);
            ages[n++].size = size;
            total += size;
        }
        rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
    }
    if (rc == MDB_NOTFOUND || rc == 0)
        rc = 0;
    double used = rc ? 0 : tree_bytes(s, txn);
    if (rc == 0 && lru && n > 0 && used > target) {
        /* Pages shrink roughly in proportion to the bytes deleted: free the
         * same fraction of the entries' bytes, oldest first. */
        double want = total * (used - target) / used, got = 0;
        qsort(ages, n, sizeof *ages, cmp_aged);
        size_t k_evict = 0;
        double threshold = ages[0].atime;
        while (k_evict < n && got < want) {
            got += ages[k_evict].size;
            threshold = ages[k_evict++].atime;
        }
        k = (MDB_val){1, "v"};
        rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        size_t done = 0;
        while (rc == 0 && done < k_evict && ((char *)k.mv_data)[0] == 'v') {
            if (max_deletes && *deleted >= max_deletes)
                break;
            if (v.mv_size >= HDR && rd_double((char *)v.mv_data + 8) <= threshold) {
                if ((rc = mdb_cursor_del(c, 0)))
                    break;
                done++;
                (*deleted)++;
                atomic_fetch_add(&s->evictions, 1);
            }
            rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
        }
        if (rc == MDB_NOTFOUND)
            rc = 0;
    }
    free(ages);
    mdb_cursor_close(c);
    return rc;
}

/* MDB_MAP_FULL came back: the free list is exhausted. Clear readers that
 * died, then evict half of the tree by age in small transactions first (a
 * delete needs new pages too; each commit frees pages for the next). */
static int emergency_evict(inst *s, dp_err *err)
{
    int dead = 0;
    mdb_reader_check(s->env, &dead);
    size_t batches[] = {8, 64, 512, 0};
    int rc = 0;
    int progressed = 0;
    for (size_t b = 0; b < sizeof batches / sizeof *batches; b++) {
        MDB_txn *txn;
        if ((rc = mdb_txn_begin(s->env, NULL, 0, &txn)))
            break;
        size_t deleted = 0;
        double used = tree_bytes(s, txn);
        rc = evict(s, txn, s->cfg->on_full == ON_FULL_EVICT ? used / 2 : used * 2,
                   s->cfg->on_full == ON_FULL_EVICT, batches[b], &deleted);
        if (rc == 0)
            rc = mdb_txn_commit(txn);
        else
            mdb_txn_abort(txn);
        if (rc == 0 && deleted > 0)
            progressed = 1;
        if (rc)
            break;
    }
    if (rc == 0 && progressed)
        return DP_OK;
    if (s->cfg->on_full == ON_FULL_ERROR)
        return dp_err_set(err, DP_EBACKEND, "'%s' is full: LMDB's map of %.0f bytes has no room "
                          "(on_full = \"error\"; raise map_size)", s->path, s->map_size);
    return dp_err_set(err, DP_EBACKEND, "'%s' is full: LMDB's map of %.0f bytes has no room and "
                      "eviction freed none (%s); raise map_size", s->path, s->map_size,
                      rc ? mdb_strerror(rc) : "nothing to evict");
}

/* Runs the expiry sweep in `txn` when it is due. */
static int maybe_sweep(inst *s, MDB_txn *txn)
{
    if (!(s->cfg->ttl > 0))
        return 0;
    double now = dp_clock_now(), due = 0;
    MDB_val k = {6, "msweep"}, v;
    if (mdb_get(txn, s->dbi, &k, &v) == 0 && v.mv_size == 8)
        due = rd_double(v.mv_data);
    if (now < due)
        return 0;
    size_t deleted = 0;
    int rc = evict(s, txn, 0, 0, 0, &deleted);
    if (rc)
        return rc;
    char buf[8];
    wr_double(buf, now + s->cfg->sweep_interval);
    v.mv_size = 8;
    v.mv_data = buf;
    return mdb_put(txn, s->dbi, &k, &v, 0);
}

/* -- Writing ----------------------------------------------------------------------- */

static size_t entry_need(inst *s, size_t klen, size_t vlen)
{
    size_t n = klen + 1 + HDR + vlen + NODE_OVERHEAD;
    unsigned psize = 4096;
    MDB_stat st;
    if (mdb_env_stat(s->env, &st) == 0)
        psize = st.ms_psize;
    if (n > psize / 2)
        n = (n + psize - 1) / psize * psize; /* an overflow run */
    return n;
}

static int lm_set(void *self, const char *key, size_t klen, const char *value, size_t vlen,
                  dp_err *err)
{
    inst *s = self;
    char kb[512];
    MDB_val k;
    int rc = ensure_env(s, err);
    if (rc || (rc = make_key(s, key, klen, kb, &k, err)))
        return rc;
    double need = (double)entry_need(s, klen, vlen);
    if (need > s->max_bytes)
        return dp_err_set(err, DP_ETOOBIG, "a value of %zu bytes (%.0f with its key and pages) "
                          "is larger than max_bytes %.0f of '%s'", vlen, need, s->max_bytes,
                          s->path);
    for (int attempt = 0; attempt < 3; attempt++) {
        MDB_txn *txn;
        if ((rc = mdb_txn_begin(s->env, NULL, 0, &txn)))
            return mdb_fail(err, s, "set (mdb_txn_begin)", rc);
        rc = flush_touches(s, txn);
        if (!rc)
            rc = maybe_sweep(s, txn);
        /* An overwrite frees the old value: only the difference counts. */
        MDB_val old;
        double old_need = !rc && mdb_get(txn, s->dbi, &k, &old) == 0 && old.mv_size >= HDR
            ? (double)entry_need(s, klen, old.mv_size - HDR) : 0;
        if (!rc && s->cfg->on_full == ON_FULL_EVICT &&
            tree_bytes(s, txn) + need - old_need > s->max_bytes) {
            size_t deleted = 0;
            rc = evict(s, txn, s->max_bytes * 0.9 - need, 1, 0, &deleted);
        }
        MDB_val v = {vlen + HDR, NULL};
        if (!rc)
            rc = mdb_put(txn, s->dbi, &k, &v, MDB_RESERVE);
        if (!rc) {
            char *p = v.mv_data;
            double now = dp_clock_now();
            wr_double(p, s->cfg->ttl > 0 ? now + s->cfg->ttl : 0);
            wr_double(p + 8, now);
            memcpy(p + HDR, value, vlen);
        }
        /* on_full = "error": judged on the tree as it is with the new value
         * in place (pages exactly, the old value freed); past the bound,
         * expired entries may go, nothing else. */
        if (!rc && s->cfg->on_full == ON_FULL_ERROR && tree_bytes(s, txn) > s->max_bytes) {
            size_t deleted = 0;
            rc = evict(s, txn, 0, 0, 0, &deleted);
            double used = rc ? 0 : tree_bytes(s, txn);
            if (!rc && used > s->max_bytes) {
                mdb_txn_abort(txn);
                return dp_err_set(err, DP_EBACKEND, "'%s' is full: storing %zu bytes would use "
                                  "%.0f bytes of max_bytes %.0f and nothing expired (on_full = "
                                  "\"error\")", s->path, vlen, used, s->max_bytes);
            }
        }
        if (!rc)
            rc = mdb_txn_commit(txn);
        else
            mdb_txn_abort(txn);
        if (rc == 0)
            return DP_OK;
        if (rc != MDB_MAP_FULL)
            return mdb_fail(err, s, "set", rc);
        if ((rc = emergency_evict(s, err)) != DP_OK)
            return rc;
    }
    return dp_err_set(err, DP_EBACKEND, "'%s' is full: no room after evicting three times "
                      "(map_size %.0f); raise map_size", s->path, s->map_size);
}

static int lm_del(void *self, const char *key, size_t klen, dp_err *err)
{
    inst *s = self;
    char kb[512];
    MDB_val k;
    int rc = ensure_env(s, err);
    if (rc || (rc = make_key(s, key, klen, kb, &k, err)))
        return rc;
    MDB_txn *txn;
    if ((rc = mdb_txn_begin(s->env, NULL, 0, &txn)))
        return mdb_fail(err, s, "delete (mdb_txn_begin)", rc);
    rc = flush_touches(s, txn);
    if (!rc) {
        rc = mdb_del(txn, s->dbi, &k, NULL);
        if (rc == MDB_NOTFOUND)
            rc = 0;
    }
    if (!rc)
        rc = mdb_txn_commit(txn);
    else
        mdb_txn_abort(txn);
    if (rc == MDB_MAP_FULL) {
        /* Deleting needs a few pages too: make room, then try once more. */
        if ((rc = emergency_evict(s, err)) != DP_OK)
            return rc;
        if ((rc = mdb_txn_begin(s->env, NULL, 0, &txn)))
            return mdb_fail(err, s, "delete (mdb_txn_begin)", rc);
        rc = mdb_del(txn, s->dbi, &k, NULL);
        if (rc == MDB_NOTFOUND)
            rc = 0;
        if (!rc)
            rc = mdb_txn_commit(txn);
        else
            mdb_txn_abort(txn);
    }
    return rc ? mdb_fail(err, s, "delete", rc) : DP_OK;
}

static void lm_stats(void *self, dp_backend_stats *out)
{
    inst *s = self;
    /* An instance deferred in this process (nginx's master) stays unopened. */
    if (!deferred_here(s) && ensure_env(s, NULL) == DP_OK) {
        MDB_txn *txn;
        if (rtxn_get(s, &txn) == 0) {
            MDB_stat st;
            if (mdb_stat(txn, s->dbi, &st) == 0) {
                MDB_val k = {6, "msweep"}, k2 = {9, "msettings"}, v;
                size_t meta = 1 + (mdb_get(txn, s->dbi, &k, &v) == 0) +
                              (mdb_get(txn, s->dbi, &k2, &v) == 0);
                out->items = (double)(st.ms_entries > meta ? st.ms_entries - meta : 0);
                out->bytes = tree_bytes(s, txn);
            }
            rtxn_put(s, txn);
        }
    }
    out->max_bytes = s->max_bytes;
    out->hits = (double)atomic_load(&s->hits);
    out->misses = (double)atomic_load(&s->misses);
    out->evictions = (double)atomic_load(&s->evictions);
    out->expirations = (double)atomic_load(&s->expirations);
}

/* -- The lock between processes ------------------------------------------------------ */
/* Waking. The first page of the lock file (mapped shared; the OFD locks are
 * advisory and ignore its contents) holds WAKE_SLOTS pairs of 32-bit words,
 * {generation, waiters}, for the lock slots equal modulo WAKE_SLOTS. An
 * unlock closes the descriptor (releasing the lock), bumps the generation and,
 * when someone waits, FUTEX_WAKEs them all (a shared futex: it works between
 * processes). A bounded waiter reads the generation before trying the lock,
 * and on failure FUTEX_WAITs for a change of it, for dp_backoff's steps (1 ms,
 * a quarter longer each time, POLL_MAX at most): a holder that dies (the kernel drops its lock but bumps nothing) or
 * a process that releases without bumping is still noticed by polling. Two
 * keys on one pair only wake each other spuriously. Where the page cannot be
 * mapped, the wait falls back to plain sleeps. */
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#define WAKE_SLOTS 512 /* pairs of words: one 4 KiB page */
#define WAKE_BYTES (WAKE_SLOTS * 2 * sizeof(uint32_t))

typedef struct wake_map {
    struct wake_map *next;
    char *path;
    _Atomic uint32_t *words; /* NULL: could not map, poll */
    double retry_at;         /* monotonic: when to try mapping again */
} wake_map;

/* Per lock file and process, kept for the life of the process (one page per
 * path ever opened); a forked child inherits the shared mappings as they are.
 *
 * The page's blocks are allocated (posix_fallocate), not just promised by
 * ftruncate: a write through a shared mapping to a page that the file system
 * cannot back kills the process with SIGBUS, so on a full disk the waits
 * poll instead (words stays NULL), and the allocation is tried again at
 * most once a second. */
static wake_map *wake_maps;
static pthread_mutex_t wake_mu = PTHREAD_MUTEX_INITIALIZER;

static void wake_map_open(wake_map *m, int mode)
{
    int fd = open_create(m->path, mode);
    if (fd < 0)
        return;
    if (posix_fallocate(fd, 0, (off_t)WAKE_BYTES) == 0) {
        void *p = mmap(NULL, WAKE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED)
            m->words = p;
    }
    close(fd);
}

static _Atomic uint32_t *wake_words(inst *s)
{
    pthread_mutex_lock(&wake_mu);
    wake_map *m;
    for (m = wake_maps; m; m = m->next)
        if (strcmp(m->path, s->lock_path) == 0)
            break;
    if (!m && (m = calloc(1, sizeof *m)) != NULL) {
        if ((m->path = strdup(s->lock_path)) != NULL) {
            m->retry_at = -1;
            m->next = wake_maps;
            wake_maps = m;
        } else {
            free(m);
            m = NULL;
        }
    }
    if (m && !m->words) {
        double now = dp_clock_monotonic();
        if (now >= m->retry_at) {
            wake_map_open(m, s->mode);
            m->retry_at = now + 1;
        }
    }
    _Atomic uint32_t *w = m ? m->words : NULL;
    pthread_mutex_unlock(&wake_mu);
    return w;
}

static _Atomic uint32_t *wake_pair(_Atomic uint32_t *w, uint64_t slot)
{
    return w ? w + 2 * (slot % WAKE_SLOTS) : NULL;
}

/* Wait at most `seconds` for *gen to differ from `seen`. */
static void wake_wait(_Atomic uint32_t *gen, uint32_t seen, double seconds)
{
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    atomic_fetch_add(gen + 1, 1);
    syscall(SYS_futex, (uint32_t *)gen, FUTEX_WAIT, seen, &ts, NULL, 0);
    atomic_fetch_sub(gen + 1, 1);
}

static void wake_all(_Atomic uint32_t *gen)
{
    atomic_fetch_add(gen, 1);
    if (atomic_load(gen + 1))
        syscall(SYS_futex, (uint32_t *)gen, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static int ofd_lock(int fd, uint64_t slot, int wait)
{
    return ofd_set(fd, (off_t)slot, F_WRLCK, wait);
}

static int lm_lock(void *self, const char *key, size_t klen, double timeout, dp_err *err)
{
    inst *s = self;
    int rc = ensure_env(s, err);
    if (rc)
        return rc;
    uint64_t slot = hash_key(key, klen) % LOCK_SPAN;
    held_lock *h = malloc(sizeof *h);
    if (!h)
        return dp_err_set(err, DP_ENOMEM, "out of memory");
    int fd = open_create(s->lock_path, s->mode);
    if (fd < 0) {
        free(h);
        return dp_err_set(err, DP_EBACKEND, "cannot open the lock file '%s': %s", s->lock_path,
                          strerror(errno));
    }
    dp_backoff bo;
    dp_backoff_init(&bo, timeout, POLL_MAX);
    _Atomic uint32_t *gen = timeout > 0 ? wake_pair(wake_words(s), slot) : NULL;
    for (;;) {
        /* Read before trying: an unlock after the failed try changes it. */
        uint32_t seen = gen ? atomic_load(gen) : 0;
        if (ofd_lock(fd, slot, timeout < 0) == 0)
            break;
        int e = errno;
        if (e != EAGAIN && e != EACCES) {
            close(fd);
            free(h);
            return dp_err_set(err, DP_EBACKEND, "cannot lock '%s': %s", s->lock_path,
                              strerror(e));
        }
        double step = timeout == 0 ? 0 : dp_backoff_next(&bo);
        if (step <= 0) {
            close(fd);
            free(h);
            return timeout == 0 ? DP_EBUSY
                                : dp_err_set(err, DP_ETIMEDOUT, "the lock for the key in '%s' "
                                             "was still held after %g s", s->lock_path, timeout);
        }
        if (gen)
            wake_wait(gen, seen, step);
        else
            dp_clock_sleep(step);
    }
    h->slot = slot;
    h->fd = fd;
    uv_mutex_lock(&s->mu);
    h->next = s->held;
    s->held = h;
    uv_mutex_unlock(&s->mu);
    return DP_OK;
}

static int lm_unlock(void *self, const char *key, size_t klen, dp_err *err)
{
    (void)err;
    inst *s = self;
    uint64_t slot = hash_key(key, klen) % LOCK_SPAN;
    uv_mutex_lock(&s->mu);
    held_lock **pp = &s->held, *h = NULL;
    for (; *pp; pp = &(*pp)->next)
        if ((*pp)->slot == slot) {
            h = *pp;
            *pp = h->next;
            break;
        }
    uv_mutex_unlock(&s->mu);
    if (!h)
        return DP_ENOTHELD;
    close(h->fd); /* releases the lock */
    free(h);
    _Atomic uint32_t *gen = wake_pair(wake_words(s), slot);
    if (gen)
        wake_all(gen);
    return DP_OK;
}

/* Wait, without locking, until the slot's holder lets go: F_OFD_GETLK on a
 * descriptor of our own says whether any other descriptor holds the byte; in
 * between, sleep on the slot's wake word (see "Waking") for dp_backoff's
 * steps, so an unlock wakes us at once and a holder that died (nothing bumped)
 * is noticed by the next check. The generation is read before each check, so
 * an unlock right after a check is never slept through. */
static int ofd_held(int fd, uint64_t slot, int *held)
{
    struct flock fl = {0};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)slot;
    fl.l_len = 1;
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0)
        return -1;
    *held = fl.l_type != F_UNLCK;
    return 0;
}

static int lm_wait_unlocked(void *self, const char *key, size_t klen, double timeout,
                            dp_err *err)
{
    inst *s = self;
    int rc = ensure_env(s, err);
    if (rc)
        return rc;
    uint64_t slot = hash_key(key, klen) % LOCK_SPAN;
    int fd = open_create(s->lock_path, s->mode);
    if (fd < 0)
        return dp_err_set(err, DP_EBACKEND, "cannot open the lock file '%s': %s", s->lock_path,
                          strerror(errno));
    _Atomic uint32_t *gen = timeout != 0 ? wake_pair(wake_words(s), slot) : NULL;
    dp_backoff bo;
    dp_backoff_init(&bo, timeout, POLL_MAX);
    for (;;) {
        uint32_t seen = gen ? atomic_load(gen) : 0;
        int held;
        if (ofd_held(fd, slot, &held) != 0) {
            int e = errno;
            close(fd);
            return dp_err_set(err, DP_EBACKEND, "cannot test the lock in '%s': %s",
                              s->lock_path, strerror(e));
        }
        if (!held) {
            rc = DP_OK;
            break;
        }
        double step = timeout == 0 ? 0 : dp_backoff_next(&bo);
        if (step <= 0) {
            rc = timeout == 0 ? DP_EBUSY
                              : dp_err_set(err, DP_ETIMEDOUT, "the lock for the key in '%s' was "
                                           "still held after %g s", s->lock_path, timeout);
            break;
        }
        if (gen)
            wake_wait(gen, seen, step);
        else
            dp_clock_sleep(step);
    }
    close(fd);
    return rc;
}

/* -- Instances (the core shares them: one per realpath) -------------------------------- */

static void inst_free(inst *s)
{
    if (s->env) {
        if (s->gen == atomic_load(&fork_gen)) {
            pool_drop(s, 1);
            mdb_env_close(s->env);
        }
    }
    for (size_t i = 0; i < s->ntouch; i++)
        free(s->touch[i]);
    free(s->touch);
    free(s->touch_len);
    while (s->held) {
        held_lock *h = s->held;
        s->held = h->next;
        close(h->fd);
        free(h);
    }
    if (s->open_fd >= 0)
        close(s->open_fd); /* drops this process's share of OPEN_BYTE */
    uv_mutex_destroy(&s->mu);
    uv_mutex_destroy(&s->env_mu);
    free(s->path);
    free(s->lock_path);
    free(s);
}

static void lm_destroy(void *self)
{
    inst *s = self;
    if (s->env && s->gen == atomic_load(&fork_gen) && s->ntouch)
        flush_touches_own_txn(s);
    inst_free(s);
}

static int parse_mode(const char *text)
{
    char *end = NULL;
    long v = strtol(text, &end, 8);
    return text[0] && !*end && v > 0 && v <= 0777 ? (int)v : -1;
}

static double max_bytes_of(const lm_settings *cfg)
{
    return cfg->max_bytes > 0 ? (double)cfg->max_bytes : floor((double)cfg->map_size * 0.6);
}

/* The identity is the realpath of `path`, which needs the path to exist: a
 * missing one becomes a directory here (an existing one is used as it is).
 * The checks that read two arguments, or an argument's digits, run here too,
 * before any instance is looked up or made. */
static int lm_identify(void *ud, const void *settings, dp_bytes *id, dp_err *err)
{
    (void)ud;
    const lm_settings *cfg = settings;
    if (parse_mode(cfg->mode) < 0)
        return dp_err_set(err, DP_EINVAL, NAME ": mode must be an octal string such as \"0640\", "
                          "got string \"%.40s\"", cfg->mode);
    if (max_bytes_of(cfg) > (double)cfg->map_size * 0.9)
        return dp_err_set(err, DP_EINVAL, NAME ": max_bytes %.0f leaves too little of map_size "
                          "%.0f for LMDB's copy-on-write pages (at most 90%%)", max_bytes_of(cfg),
                          (double)cfg->map_size);
    struct stat st;
    if (stat(cfg->path, &st) != 0) {
        if (errno == ENOENT && atomic_load(&defer_gen) == atomic_load(&fork_gen)) {
            /* Deferred: the worker makes it. The identity is what realpath
             * will give once it exists: the parent's realpath and the name. */
            char parent[PATH_MAX], real[PATH_MAX];
            snprintf(parent, sizeof parent, "%s", cfg->path);
            char *slash = strrchr(parent, '/');
            const char *base = slash ? cfg->path + (slash - parent) + 1 : cfg->path;
            if (!slash)
                snprintf(parent, sizeof parent, ".");
            else if (slash == parent)
                parent[1] = 0; /* "/name" */
            else
                *slash = 0;
            if (!*base || !realpath(parent, real))
                return dp_err_set(err, DP_EBACKEND, NAME ": cannot resolve the directory of "
                                  "'%s': %s", cfg->path, *base ? strerror(errno) : "no name");
            size_t n = strlen(real), b = strlen(base);
            int root = n == 1 && real[0] == '/';
            if (dp_bytes_reserve(id, id->len + n + 1 + b) != DP_OK)
                return dp_err_set(err, DP_ENOMEM, NAME ": out of memory opening '%s'", cfg->path);
            memcpy(id->data + id->len, real, n);
            id->len += n;
            if (!root)
                id->data[id->len++] = '/';
            memcpy(id->data + id->len, base, b);
            id->len += b;
            return DP_OK;
        }
        /* Processes starting together race to make it: one made by another
         * meanwhile is used (and left as it is). */
        mode_t dm = (mode_t)dir_mode(parse_mode(cfg->mode));
        int made = errno == ENOENT && mkdir(cfg->path, dm) == 0;
        int e = errno;
        if (made ? chmod(cfg->path, dm) != 0
                 : (e != EEXIST || stat(cfg->path, &st) != 0 || !S_ISDIR(st.st_mode)))
            return dp_err_set(err, DP_EBACKEND, NAME ": cannot create the directory '%s': %s",
                              cfg->path, strerror(made || e != EEXIST ? errno : ENOTDIR));
    } else if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
        return dp_err_set(err, DP_EBACKEND, NAME ": '%s' is neither a directory nor an LMDB "
                          "data file", cfg->path);
    }
    char real[PATH_MAX];
    if (!realpath(cfg->path, real))
        return dp_err_set(err, DP_EBACKEND, NAME ": cannot resolve '%s': %s", cfg->path,
                          strerror(errno));
    if (access(real, R_OK | W_OK) != 0)
        return dp_err_set(err, DP_EBACKEND, NAME ": cannot open '%s' for reading and writing: %s",
                          real, strerror(errno));
    size_t n = strlen(real);
    if (dp_bytes_reserve(id, id->len + n) != DP_OK)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory opening '%s'", real);
    memcpy(id->data + id->len, real, n);
    id->len += n;
    return DP_OK;
}

/* Create what is missing and open it all: the directory (when `path` was
 * missing at a deferred create), the lock file, the environment; then hold
 * OPEN_BYTE shared (see "Settings between processes"). */
static int full_open(inst *s, dp_err *err)
{
    if (s->deferred && mkdir(s->path, (mode_t)dir_mode(s->mode)) == 0)
        (void)chmod(s->path, (mode_t)dir_mode(s->mode));
    if (s->open_fd < 0)
        s->open_fd = open_create(s->lock_path, s->mode);
    if (s->open_fd < 0)
        return dp_err_set(err, DP_EBACKEND, NAME ": cannot open the lock file '%s': %s",
                          s->lock_path, strerror(errno));
    int alone = open_byte_take(s, err);
    int rc = alone < 0 ? DP_EBACKEND
                       : env_open(s, alone ? SETTINGS_WRITE : SETTINGS_ADOPT, err);
    if (rc == DP_OK && alone && ofd_set(s->open_fd, OPEN_BYTE, F_RDLCK, 0) != 0)
        rc = dp_err_set(err, DP_EBACKEND, NAME ": cannot lock '%s': %s", s->lock_path,
                        strerror(errno));
    if (rc != DP_OK && s->deferred) {
        close(s->open_fd); /* the next operation tries again */
        s->open_fd = -1;
    }
    return rc;
}

static int lm_create(void *ud, const void *settings, void **self, dp_err *err)
{
    (void)ud;
    const lm_settings *cfg = settings;
    uv_once(&fork_once, fork_init);
    unsigned gen = atomic_load(&fork_gen);
    int deferred = atomic_load(&defer_gen) == gen;
    char real[PATH_MAX];
    struct stat st;
    int missing = 0;
    if (!realpath(cfg->path, real) || stat(real, &st) != 0) {
        dp_bytes id = {0};
        missing = deferred && errno == ENOENT && lm_identify(NULL, cfg, &id, err) == DP_OK;
        if (missing)
            snprintf(real, sizeof real, "%.*s", (int)id.len, id.data);
        dp_bytes_free(&id);
        if (!missing)
            return dp_err_set(err, DP_EBACKEND, NAME ": cannot resolve '%s': %s", cfg->path,
                              strerror(errno));
    }
    size_t rl = strlen(real);
    inst *s = calloc(1, sizeof *s);
    char *p = s ? malloc(rl + 1) : NULL;
    char *lp = p ? malloc(rl + 32) : NULL;
    if (!lp) {
        free(s);
        free(p);
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory opening '%s'", real);
    }
    memcpy(p, real, rl + 1);
    s->cfg = cfg;
    s->path = p;
    s->lock_path = lp;
    s->subdir = missing || !S_ISREG(st.st_mode);
    snprintf(lp, rl + 32, s->subdir ? "%s/dogpile-locks" : "%s-dogpile-locks", real);
    s->mode = parse_mode(cfg->mode);
    s->map_size = (double)cfg->map_size;
    s->max_bytes = max_bytes_of(cfg);
    s->open_fd = -1;
    uv_mutex_init(&s->mu);
    uv_mutex_init(&s->env_mu);
    if (deferred) {
        s->deferred = 1;
        s->defer_gen = gen;
        s->gen = gen - 1; /* never this generation: the first operation opens */
        *self = s;
        return DP_OK;
    }
    int rc = full_open(s, err);
    if (rc != DP_OK) {
        inst_free(s);
        return rc;
    }
    *self = s; /* err->msg may hold env_open's note (settings adopted), with DP_OK */
    return DP_OK;
}

static const dp_backend_ops lm_ops = {
    .name = NAME,
    .args = lm_args,
    .settings_size = sizeof(lm_settings),
    .identify = lm_identify,
    .create = lm_create,
    .destroy = lm_destroy,
    .get = lm_get,
    .set = lm_set,
    .del = lm_del,
    .stats = lm_stats,
    .infallible = 0,
    .lock = lm_lock,
    .unlock = lm_unlock,
    .wait_unlocked = lm_wait_unlocked,
};

/* -- Lua module ----------------------------------------------------------------------------
 * `require "dogpile.backends.lmdb"` registers the ops with the core (which
 * pins this module); lua/dogpile/cache/backends/lmdb.lua opens instances. */

int luaopen_dogpile_backends_lmdb(lua_State *L);

/* defer_until_fork(): instances made by this process from now until it
 * forks create and open nothing; each child opens at its first operation
 * (see "Deferred opens"). */
static int lm_defer_until_fork(lua_State *L)
{
    atomic_store(&defer_gen, atomic_load(&fork_gen));
    (void)L;
    return 0;
}

/* feed_file(path, mode) -> the path of the environment's host change feed
 * (dogpile_feed.h), made with `mode` when missing and allocated; or nil and
 * why. A tiered region over lmdb pushes the keys it changes there and every
 * process's upper tiers drain it. Beside the lock file: one per environment. */
static int lm_feed_file(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int mode = parse_mode(luaL_optstring(L, 2, "0644"));
    if (mode < 0)
        return luaL_error(L, NAME ": mode must be an octal string such as \"0640\"");
    char real[PATH_MAX], feed[PATH_MAX + 32];
    struct stat st;
    if (!realpath(path, real) || stat(real, &st) != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, NAME ": cannot resolve '%s': %s", path, strerror(errno));
        return 2;
    }
    snprintf(feed, sizeof feed, S_ISDIR(st.st_mode) ? "%s/dogpile-feed" : "%s-dogpile-feed", real);
    int fd = open_create(feed, mode);
    int rc = fd < 0 ? errno : posix_fallocate(fd, 0, (off_t)DP_FEED_FILE_BYTES);
    if (fd >= 0)
        close(fd);
    if (rc) {
        lua_pushnil(L);
        if (disk_full(feed, rc))
            lua_pushfstring(L, NAME ": the change feed '%s': no space left on device", feed);
        else
            lua_pushfstring(L, NAME ": cannot open the change feed '%s': %s", feed, strerror(rc));
        return 2;
    }
    lua_pushstring(L, feed);
    return 1;
}

__attribute__((visibility("default"))) int luaopen_dogpile_backends_lmdb(lua_State *L)
{
    uv_once(&fork_once, fork_init);
    int rc = dp_backend_register(&lm_ops, NULL);
    if (rc != DP_OK)
        return luaL_error(L, NAME ": cannot register the backend: %s", dp_strerror(rc));
    lua_createtable(L, 0, 3);
    lua_pushstring(L, NAME);
    lua_setfield(L, -2, "name");
    lua_pushcfunction(L, lm_defer_until_fork);
    lua_setfield(L, -2, "defer_until_fork");
    lua_pushcfunction(L, lm_feed_file);
    lua_setfield(L, -2, "feed_file");
    return 1;
}
