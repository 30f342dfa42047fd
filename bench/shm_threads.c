/* shm_threads.c -- hit throughput of dogpile.cache.shared_memory with 1, 2
 * and 4 threads sharing one instance, through the core's C API.
 *
 * The backend registers its operations when its Lua module loads, so the
 * program makes one Lua state and `require`s "dogpile.backends.shared_memory"
 * (found through LUA_CPATH, as a Lua host would), then calls
 * dp_backend_open/get/set directly from plain pthreads: no Lua on the
 * measured path. bench/shm_threads.sh builds and runs it.
 *
 * Workloads, each for `seconds` per thread count:
 *  - read:    every thread reads the same preloaded keys, in its own random
 *             order (every read a hit);
 *  - mixed 90/10, 50/50: the same keys, that share of reads and writes (a
 *             write replaces a key's value with one of the same size);
 *  - private: every thread reads its own instance (its own name), a ceiling
 *             for what the machine gives a second thread when nothing is
 *             shared.
 *
 * Each figure is the median of `reps` runs, the thread counts interleaved so
 * that a burst of load elsewhere on the machine does not land on one column.
 *
 *   shm_threads [seconds=1] [keys=10000] [value_bytes=100] [threads=1,2,4] [reps=3]
 *               [max_items=2*keys]
 *
 * Run it through bench/shm_threads.sh, which builds it against a staged
 * install (bench/run runs that). When the thread counts include 1 and 2 it
 * ends with ROW lines (bench/lib.lua's format): "shared_memory hit
 * throughput, 2 threads vs 1" (s3fifo read: 2-thread wall M/s against the
 * 1-thread figure, target >=1.9), the 90/10 mix (target >=1.5: it must not collapse) and
 * the private ceiling (reference).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "dogpile.h"

#define BACKEND "dogpile.cache.shared_memory"
#define MAX_THREADS 64

enum { W_READ, W_MIX90, W_MIXED, W_PRIVATE, W_COUNT };
static const char *workload_names[] = { "read", "mixed 90/10", "mixed 50/50", "private" };
/* Writes per 1024 operations of each workload. */
static const unsigned write_share[] = { 0, 102, 512, 0 };

static int nkeys = 10000;
static size_t value_bytes = 100;
static double seconds = 1.0;
static int reps = 3;
/* The instances' bound; by default above the key count: the policy's
 * bookkeeping runs, nothing is evicted, every read is a hit. Below it (a
 * ThreadSanitizer run, see shm_threads.sh) writes evict and reads miss. */
static double max_items;
static char **keys;
static size_t *key_lens;
static char *value;

static atomic_int stop;
static pthread_barrier_t start_line;

typedef struct worker {
    pthread_t tid;
    dp_backend *b;
    int workload;
    uint64_t rng;
    uint64_t ops, misses;
    double cpu; /* seconds of CPU this thread used in the loop */
    int failed;
    char err[256];
} worker;

/* -- Helpers ------------------------------------------------------------- */

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double now_thread_cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void die(const char *what, const dp_err *err)
{
    fprintf(stderr, "shm_threads: %s: %s\n", what, err ? err->msg : "");
    exit(1);
}

static dp_backend *open_instance(const char *name, const char *eviction)
{
    dp_arg args[3] = {
        { .name = "name", .type = DP_ARG_STRING, .string = name, .len = strlen(name) },
        { .name = "eviction", .type = DP_ARG_STRING, .string = eviction, .len = strlen(eviction) },
        { .name = "max_items", .type = DP_ARG_NUMBER, .number = max_items },
    };
    dp_backend *b;
    dp_err err;
    if (dp_backend_open(BACKEND, args, 3, &b, &err) != DP_OK)
        die("open", &err);
    dp_err e2;
    for (int i = 0; i < nkeys; i++)
        if (dp_backend_set(b, keys[i], key_lens[i], value, value_bytes, &e2) != DP_OK)
            die("preload", &e2);
    return b;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *xs, int n)
{
    qsort(xs, (size_t)n, sizeof *xs, cmp_double);
    return n % 2 ? xs[n / 2] : (xs[n / 2 - 1] + xs[n / 2]) / 2;
}

/* -- The measured loop ------------------------------------------------------ */

static void *work(void *arg)
{
    worker *w = arg;
    dp_bytes out = { 0 };
    dp_err err;
    uint64_t ops = 0, misses = 0;
    pthread_barrier_wait(&start_line);
    double cpu0 = now_thread_cpu();
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        for (int i = 0; i < 1024; i++) {
            uint64_t r = xorshift(&w->rng);
            int k = (int)(r % (uint64_t)nkeys);
            int rc;
            if (((r >> 40) & 1023) < write_share[w->workload])
                rc = dp_backend_set(w->b, keys[k], key_lens[k], value, value_bytes, &err);
            else
                rc = dp_backend_get(w->b, keys[k], key_lens[k], &out, &err);
            if (rc == DP_ENOTFOUND) {
                misses++;
            } else if (rc != DP_OK) {
                w->failed = 1;
                snprintf(w->err, sizeof w->err, "%s", err.msg);
                goto done;
            }
        }
        ops += 1024;
    }
done:
    w->cpu = now_thread_cpu() - cpu0;
    w->ops = ops;
    w->misses = misses;
    dp_bytes_free(&out);
    return NULL;
}

typedef struct result {
    double ops_s;     /* ops per wall-clock second, all threads */
    double ops_cpu_s; /* ops per second of CPU the workers used */
} result;

/* Runs `nthreads` workers for `seconds`. */
static result run(const char *eviction, int workload, int nthreads, int round)
{
    worker ws[MAX_THREADS];
    dp_backend *shared = NULL;
    char name[128];
    memset(ws, 0, sizeof ws);
    if (workload != W_PRIVATE) {
        snprintf(name, sizeof name, "bench.threads.%s.%d.%d", eviction, workload, round);
        shared = open_instance(name, eviction);
    }
    for (int t = 0; t < nthreads; t++) {
        ws[t].workload = workload;
        ws[t].rng = 0x9E3779B97F4A7C15ULL * (uint64_t)(t + 1) + (uint64_t)round;
        if (workload == W_PRIVATE) {
            snprintf(name, sizeof name, "bench.threads.%s.private.%d.%d", eviction, round, t);
            ws[t].b = open_instance(name, eviction);
        } else {
            ws[t].b = shared;
        }
    }
    atomic_store(&stop, 0);
    pthread_barrier_init(&start_line, NULL, (unsigned)nthreads + 1);
    for (int t = 0; t < nthreads; t++)
        pthread_create(&ws[t].tid, NULL, work, &ws[t]);
    pthread_barrier_wait(&start_line);
    double t0 = now_mono();
    usleep((useconds_t)(seconds * 1e6));
    atomic_store(&stop, 1);
    uint64_t ops = 0, misses = 0;
    double cpu = 0;
    for (int t = 0; t < nthreads; t++) {
        pthread_join(ws[t].tid, NULL);
        if (ws[t].failed) {
            fprintf(stderr, "shm_threads: worker %d failed: %s\n", t, ws[t].err);
            exit(1);
        }
        ops += ws[t].ops;
        misses += ws[t].misses;
        cpu += ws[t].cpu;
    }
    double elapsed = now_mono() - t0;
    pthread_barrier_destroy(&start_line);
    if (misses && max_items >= nkeys) {
        fprintf(stderr, "shm_threads: %llu misses in a hit benchmark\n", (unsigned long long)misses);
        exit(1);
    }
    if (workload == W_PRIVATE)
        for (int t = 0; t < nthreads; t++)
            dp_backend_close(ws[t].b);
    else
        dp_backend_close(shared);
    return (result){ (double)ops / elapsed, cpu > 0 ? (double)ops / cpu : 0 };
}

/* -- Main ------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    if (argc > 1)
        seconds = atof(argv[1]);
    if (argc > 2)
        nkeys = atoi(argv[2]);
    if (argc > 3)
        value_bytes = (size_t)atol(argv[3]);
    int counts[8] = { 1, 2, 4 }, ncounts = 3;
    if (argc > 4) {
        ncounts = 0;
        for (char *p = strtok(argv[4], ","); p && ncounts < 8; p = strtok(NULL, ","))
            counts[ncounts++] = atoi(p);
    }
    if (argc > 5)
        reps = atoi(argv[5]);
    if (argc > 6)
        max_items = atof(argv[6]);
    if (max_items <= 0)
        max_items = 2.0 * nkeys;
    for (int i = 0; i < ncounts; i++)
        if (counts[i] < 1 || counts[i] > MAX_THREADS) {
            fprintf(stderr, "shm_threads: thread counts must be 1..%d\n", MAX_THREADS);
            return 2;
        }
    if (seconds <= 0 || nkeys < 1 || reps < 1 || reps > 99) {
        fprintf(stderr, "usage: shm_threads [seconds] [keys] [value_bytes] [threads,...] [reps]\n");
        return 2;
    }

    /* Register the backend the way a Lua host does: require its module. */
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_getglobal(L, "require");
    lua_pushstring(L, "dogpile.backends.shared_memory");
    if (lua_pcall(L, 1, 0, 0) != 0) {
        fprintf(stderr, "shm_threads: require: %s\n", lua_tostring(L, -1));
        return 1;
    }

    keys = malloc(sizeof *keys * (size_t)nkeys);
    key_lens = malloc(sizeof *key_lens * (size_t)nkeys);
    value = malloc(value_bytes ? value_bytes : 1);
    if (!keys || !key_lens || !value)
        die("out of memory", NULL);
    memset(value, 'v', value_bytes);
    for (int i = 0; i < nkeys; i++) {
        char buf[32];
        int n = snprintf(buf, sizeof buf, "key:%d", i);
        keys[i] = strdup(buf);
        key_lens[i] = (size_t)n;
    }

    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    printf("dogpile %s; %d keys, %zu-byte values, %.1f s per run, median of %d; %ld CPUs online\n",
           dp_version(), nkeys, value_bytes, seconds, reps, cpus);
    printf("wall: ops per second, all threads (millions). xN: the N-thread median over the\n"
           "%d-thread median (in brackets: the lowest and highest ratio within one repetition).\n"
           "cpu: ops per second of CPU the workers used (millions): contention that\n"
           "burns CPU (cache lines bouncing) lowers it, CPU taken by other processes\n"
           "does not; waits that sleep (a contended mutex) do not lower it either.\n\n",
           counts[0]);
    printf("%-8s %-12s", "eviction", "workload");
    for (int i = 0; i < ncounts; i++)
        printf("  wall t=%-3d", counts[i]);
    for (int i = 1; i < ncounts; i++)
        printf("    x%-2d%-10s", counts[i], "(min-max)");
    for (int i = 0; i < ncounts; i++)
        printf("  cpu t=%-3d", counts[i]);
    printf("\n");
    for (int i = 0; i < 21 + ncounts * 22 + (ncounts - 1) * 17; i++)
        putchar('-');
    printf("\n");

    /* [workload][threads - 1], millions of ops per second of wall / of CPU */
    double row_wall[W_COUNT][2], row_cpu[W_COUNT][2];
    for (int w = 0; w < W_COUNT; w++)
        row_wall[w][0] = row_wall[w][1] = row_cpu[w][0] = row_cpu[w][1] = -1;
    const char *policies[] = { "s3fifo", "lru" };
    int round = 0;
    for (int p = 0; p < 2; p++) {
        for (int w = 0; w < W_COUNT; w++) {
            double wall[8], cpu[8], runs[8][99], cruns[8][99];
            for (int k = 0; k < reps; k++)
                for (int i = 0; i < ncounts; i++) {
                    result r = run(policies[p], w, counts[i], round++);
                    runs[i][k] = r.ops_s;
                    cruns[i][k] = r.ops_cpu_s;
                }
            /* The ratio of each repetition's runs (taken back to back), so
             * that the range shows how steady the machine was. */
            double lo[8], hi[8];
            for (int i = 1; i < ncounts; i++) {
                lo[i] = 1e300, hi[i] = 0;
                for (int k = 0; k < reps; k++) {
                    double x = runs[i][k] / runs[0][k];
                    lo[i] = x < lo[i] ? x : lo[i];
                    hi[i] = x > hi[i] ? x : hi[i];
                }
            }
            for (int i = 0; i < ncounts; i++) {
                wall[i] = median(runs[i], reps);
                cpu[i] = median(cruns[i], reps);
            }
            printf("%-8s %-12s", policies[p], workload_names[w]);
            for (int i = 0; i < ncounts; i++)
                printf(" %10.2fM", wall[i] / 1e6);
            for (int i = 1; i < ncounts; i++)
                printf(" %5.2f (%4.2f-%4.2f)", wall[i] / wall[0], lo[i], hi[i]);
            for (int i = 0; i < ncounts; i++)
                printf(" %9.2fM", cpu[i] / 1e6);
            printf("\n");
            fflush(stdout);
            if (p == 0) {
                for (int i = 0; i < ncounts; i++)
                    if (counts[i] == 1 || counts[i] == 2) {
                        row_wall[w][counts[i] - 1] = wall[i] / 1e6;
                        row_cpu[w][counts[i] - 1] = cpu[i] / 1e6;
                    }
            }
        }
    }

    /* ROW lines for bench/run (bench/lib.lua describes them): the s3fifo
     * (default) read row is issue 8's target, the private row the machine's
     * own ceiling for a second thread. */
    if (row_wall[W_READ][0] > 0 && row_wall[W_READ][1] > 0) {
        printf("ROW\tshm_threads_x2\tshared_memory hit throughput, 2 threads vs 1 (s3fifo, "
               "%zu-byte values)\t%.4g\tM/s\t1 thread\t%.4g\t>=1.9\n",
               value_bytes, row_wall[W_READ][1], row_wall[W_READ][0]);
        if (row_wall[W_MIX90][0] > 0 && row_wall[W_MIX90][1] > 0)
            printf("ROW\tshm_threads_mix90_x2\tshared_memory 90/10 reads/writes, 2 threads vs 1 "
                   "(s3fifo, %zu-byte values)\t%.4g\tM/s\t1 thread\t%.4g\t>=1.5\n",
                   value_bytes, row_wall[W_MIX90][1], row_wall[W_MIX90][0]);
        if (row_wall[W_MIXED][0] > 0 && row_wall[W_MIXED][1] > 0)
            printf("ROW\tshm_threads_mix50_x2\tshared_memory 50/50 reads/writes, 2 threads vs 1 "
                   "(s3fifo, %zu-byte values)\t%.4g\tM/s\t1 thread\t%.4g\t\n",
                   value_bytes, row_wall[W_MIXED][1], row_wall[W_MIXED][0]);
        printf("ROW\tshm_threads_private_x2\tprivate ceiling: 2 threads on 2 instances vs 1 "
               "(s3fifo, nothing shared)\t%.4g\tM/s\t1 thread\t%.4g\t\n",
               row_wall[W_PRIVATE][1], row_wall[W_PRIVATE][0]);
        /* What two threads would give with two CPUs of their own: twice the
         * ops per CPU-second of the 2-thread run. When other processes take
         * CPU, the wall rows fall but this one does not; cache lines
         * bouncing between the cores lower it. */
        if (row_cpu[W_MIX90][0] > 0 && row_cpu[W_MIX90][1] > 0)
            printf("ROW\tshm_threads_mix90_cpu_x2\tshared_memory 90/10 reads/writes, 2 threads vs 1 "
                   "by CPU time (2 x ops per CPU-second)\t%.4g\tM/s\t1 thread\t%.4g\t\n",
                   2 * row_cpu[W_MIX90][1], row_cpu[W_MIX90][0]);
        printf("ROW\tshm_threads_cpu_x2\tshared_memory hits, 2 threads vs 1 by CPU time "
               "(2 x ops per CPU-second; unaffected by other load)\t%.4g\tM/s\t1 thread\t%.4g\t\n",
               2 * row_cpu[W_READ][1], row_cpu[W_READ][0]);
    }

    for (int i = 0; i < nkeys; i++)
        free(keys[i]);
    free(keys);
    free(key_lens);
    free(value);
    lua_close(L);
    return 0;
}
