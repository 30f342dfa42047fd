/* floor_lmdb.c -- the C floor for LMDB reads: "LMDB get from C, one read
 * txn per op" (issue 8's anchor table), against the same kind of
 * environment dogpile.cache.lmdb uses.
 *
 * Build and run (bench/floors.sh builds it; bench/lmdb.lua runs it):
 *
 *   bench/floors.sh [dir=_build/bench-floors]
 *   _build/bench-floors/floor_lmdb [n=1000000] [value_bytes=100] [nkeys=1000] [reps=7] [dir]
 *
 * The environment is the one backends/lmdb.c opens: a directory environment,
 * MDB_NOTLS | MDB_NORDAHEAD (plus MDB_NOSYNC | MDB_NOMETASYNC, as the bench's
 * sync = "none"), map_size 64 MiB, one unnamed database. Records are laid
 * out as the backend lays them out: key 'v' .. "bench:key:<i>", value a
 * 16-byte header (expiry, access time) before `value_bytes` bytes (pass the
 * region's envelope length to read records of the bench's size). It is
 * created in `dir` (default: a fresh temporary directory, removed at exit).
 *
 * One operation: mdb_txn_renew + mdb_get + mdb_txn_reset on one reusable
 * read transaction, the keys in turn, every one a hit (a miss aborts). The
 * value's bytes are read (length and first byte summed) so nothing is
 * optimised away; they are not copied. Prints the median of `reps` runs of
 * `n` gets, after a warm-up run:
 *   get_ns <ns>
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lmdb.h>

#define HDR 16

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void check(int rc, const char *what)
{
    if (rc) {
        fprintf(stderr, "floor_lmdb: %s: %s\n", what, mdb_strerror(rc));
        exit(1);
    }
}

static MDB_env *env;
static MDB_dbi dbi;
static MDB_txn *rtxn;
static MDB_val *keys;
static int nkeys;
static volatile size_t sink;

static void run(long n)
{
    size_t sum = 0;
    for (long i = 0; i < n; i++) {
        MDB_val v;
        check(mdb_txn_renew(rtxn), "mdb_txn_renew");
        int rc = mdb_get(rtxn, dbi, &keys[i % nkeys], &v);
        if (rc)
            check(rc, "mdb_get (not a hit)");
        sum += v.mv_size + ((const unsigned char *)v.mv_data)[HDR];
        mdb_txn_reset(rtxn);
    }
    sink += sum;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    size_t vbytes = argc > 2 ? (size_t)atol(argv[2]) : 100;
    nkeys = argc > 3 ? atoi(argv[3]) : 1000;
    int reps = argc > 4 ? atoi(argv[4]) : 7;
    char tmpl[] = "/tmp/dogpile-floor-lmdb-XXXXXX";
    const char *dir = argc > 5 ? argv[5] : NULL;
    if (n < 1 || nkeys < 1 || reps < 1 || reps > 99 || vbytes < 1) {
        fprintf(stderr, "usage: floor_lmdb [n] [value_bytes] [nkeys] [reps] [dir]\n");
        return 2;
    }
    int own = !dir;
    if (own && !(dir = mkdtemp(tmpl))) {
        perror("floor_lmdb: mkdtemp");
        return 1;
    }

    check(mdb_env_create(&env), "mdb_env_create");
    mdb_env_set_mapsize(env, (size_t)64 << 20);
    mdb_env_set_maxreaders(env, 126);
    check(mdb_env_open(env, dir, MDB_NOTLS | MDB_NORDAHEAD | MDB_NOSYNC | MDB_NOMETASYNC, 0644),
          "mdb_env_open");

    /* Fill, as the backend stores: 'v' .. key -> header .. bytes. */
    MDB_txn *w;
    check(mdb_txn_begin(env, NULL, 0, &w), "mdb_txn_begin");
    check(mdb_dbi_open(w, NULL, 0, &dbi), "mdb_dbi_open");
    char *value = calloc(1, HDR + vbytes);
    memset(value + HDR, 'x', vbytes);
    keys = malloc(sizeof *keys * (size_t)nkeys);
    for (int i = 0; i < nkeys; i++) {
        char buf[64];
        int len = snprintf(buf, sizeof buf, "vbench:key:%d", i + 1);
        keys[i].mv_data = strdup(buf);
        keys[i].mv_size = (size_t)len;
        MDB_val v = { HDR + vbytes, value };
        check(mdb_put(w, dbi, &keys[i], &v, 0), "mdb_put");
    }
    check(mdb_txn_commit(w), "mdb_txn_commit");

    /* One read transaction, reset between gets and renewed for each. */
    check(mdb_txn_begin(env, NULL, MDB_RDONLY, &rtxn), "mdb_txn_begin (read)");
    mdb_txn_reset(rtxn);

    double t[99];
    run(n);
    for (int k = 0; k < reps; k++) {
        double t0 = now();
        run(n);
        t[k] = (now() - t0) / (double)n;
    }
    qsort(t, (size_t)reps, sizeof *t, cmp);
    printf("get_ns %.2f\n", reps % 2 ? t[reps / 2] : (t[reps / 2 - 1] + t[reps / 2]) / 2);

    mdb_txn_abort(rtxn);
    mdb_env_close(env);
    if (own) {
        char path[4096];
        snprintf(path, sizeof path, "%s/data.mdb", dir);
        unlink(path);
        snprintf(path, sizeof path, "%s/lock.mdb", dir);
        unlink(path);
        rmdir(dir);
    }
    return 0;
}
