/* floor_hiredis.c -- the C floor for Redis reads: a plain loop of
 * redisCommand() on one hiredis connection, no pipelining, as issue 8's
 * anchor table measures it ("Redis GET, one connection: hiredis from C").
 *
 * Build and run (bench/floors.sh builds it; bench/redis.lua runs it):
 *
 *   bench/floors.sh [dir=_build/bench-floors]
 *   taskset -c 0 _build/bench-floors/floor_hiredis PORT [n=20000] [value_bytes=100]
 *                                                  [nkeys=1000] [reps=7] [batch=100]
 *                                                  [spread_ports=P2,P3,...]
 *
 * It stores `nkeys` keys "floor:hiredis:<i>" of `value_bytes` bytes, then
 * measures, each as the median of `reps` runs of `n` operations after one
 * warm-up run:
 *   get   GET <key>, the keys in turn (every one a hit)
 *   mget  MGET of `batch` consecutive keys (redisCommandArgv, one call)
 *   spread (with spread_ports) the same `batch` keys as GETs spread over
 *         PORT and the spread ports (key i on server i % servers), one
 *         pipeline per server, every pipeline written before any reply is
 *         read: what a cluster client must do for keys over all slots (a
 *         cluster refuses a command across slots), done by hand
 * and prints one line per figure, ns per call:
 *   get_ns <ns>        wall time
 *   mget_ns <ns>
 *   get_cpu_ns <ns>    CPU time of client and server together (this
 *   mget_cpu_ns <ns>   process's CLOCK_PROCESS_CPUTIME_ID plus the server's
 *   spread_ns <ns>     used_cpu_user + used_cpu_sys from INFO cpu), over the
 *   spread_cpu_ns <ns>
 *                      warm-up and every run: what the call costs the
 *                      machine, which other processes' load barely changes
 * A reply of the wrong type or length aborts: the floor must read what the
 * bench reads. Pin it to the server's CPU to measure "client and server on
 * one CPU" (bench/redis.lua pins itself, and the floor inherits it).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>

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

static double median(double *xs, int n)
{
    qsort(xs, (size_t)n, sizeof *xs, cmp);
    return n % 2 ? xs[n / 2] : (xs[n / 2 - 1] + xs[n / 2]) / 2;
}

static void die(const char *what, redisContext *c)
{
    fprintf(stderr, "floor_hiredis: %s: %s\n", what, c && c->err ? c->errstr : "bad reply");
    exit(1);
}

static redisContext *c;
/* The spread floor's servers: spread[0] is c; key i lives on i % nspread. */
static redisContext *spread[16];
static int nspread = 1;
static char **keys;
static size_t *klens;
static int nkeys, batch;
static size_t vbytes;

static void run_get(long n)
{
    for (long i = 0; i < n; i++) {
        redisReply *r = redisCommand(c, "GET %s", keys[i % nkeys]);
        if (!r)
            die("GET", c);
        if (r->type != REDIS_REPLY_STRING || r->len != vbytes)
            die("GET (not a hit)", NULL);
        freeReplyObject(r);
    }
}

static void run_mget(long n)
{
    const char *argv[1 + 1024];
    size_t argl[1 + 1024];
    argv[0] = "MGET";
    argl[0] = 4;
    for (long i = 0; i < n; i++) {
        int first = (int)((i * batch) % nkeys);
        for (int j = 0; j < batch; j++) {
            argv[1 + j] = keys[(first + j) % nkeys];
            argl[1 + j] = klens[(first + j) % nkeys];
        }
        redisReply *r = redisCommandArgv(c, 1 + batch, argv, argl);
        if (!r)
            die("MGET", c);
        if (r->type != REDIS_REPLY_ARRAY || r->elements != (size_t)batch ||
            r->element[batch - 1]->type != REDIS_REPLY_STRING)
            die("MGET (not all hits)", NULL);
        freeReplyObject(r);
    }
}

static void run_spread(long n)
{
    int sent[16];
    for (long i = 0; i < n; i++) {
        int first = (int)((i * batch) % nkeys);
        memset(sent, 0, sizeof sent);
        for (int j = 0; j < batch; j++) {
            int k = (first + j) % nkeys, s = k % nspread;
            const char *argv[2] = {"GET", keys[k]};
            size_t argl[2] = {3, klens[k]};
            redisAppendCommandArgv(spread[s], 2, argv, argl);
            sent[s]++;
        }
        for (int s = 0; s < nspread; s++) {
            int done = 0;
            while (!done)
                if (redisBufferWrite(spread[s], &done) != REDIS_OK)
                    die("write", spread[s]);
        }
        for (int s = 0; s < nspread; s++)
            for (int j = 0; j < sent[s]; j++) {
                redisReply *r;
                if (redisGetReply(spread[s], (void **)&r) != REDIS_OK)
                    die("GET (spread)", spread[s]);
                if (r->type != REDIS_REPLY_STRING || r->len != vbytes)
                    die("GET (spread, not a hit)", NULL);
                freeReplyObject(r);
            }
    }
}

static double cpu_self(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* The servers' CPU time so far, ns (INFO cpu): c's, or with the spread
 * floor every spread server's. */
static double cpu_of(redisContext *sc)
{
    redisReply *r = redisCommand(sc, "INFO cpu");
    if (!r)
        die("INFO", sc);
    double sum = 0;
    if (r->type == REDIS_REPLY_STRING) {
        const char *p = strstr(r->str, "used_cpu_sys:");
        if (p)
            sum += atof(p + 13);
        p = strstr(r->str, "used_cpu_user:");
        if (p)
            sum += atof(p + 14);
    }
    freeReplyObject(r);
    return sum * 1e9;
}

static int counting_spread;

static double cpu_server(void)
{
    double sum = cpu_of(c);
    for (int s = 1; counting_spread && s < nspread; s++)
        sum += cpu_of(spread[s]);
    return sum;
}

static double measure(void (*fn)(long), long n, int reps, double *cpu_ns)
{
    double t[99];
    double c0 = cpu_self(), s0 = cpu_server();
    fn(n); /* warm-up */
    for (int k = 0; k < reps; k++) {
        double t0 = now();
        fn(n);
        t[k] = (now() - t0) / (double)n;
    }
    double c1 = cpu_self(), s1 = cpu_server();
    *cpu_ns = (c1 - c0 + s1 - s0) / ((double)n * (reps + 1));
    return median(t, reps);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: floor_hiredis PORT [n] [value_bytes] [nkeys] [reps] [batch] "
                        "[spread_ports]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    long n = argc > 2 ? atol(argv[2]) : 20000;
    vbytes = argc > 3 ? (size_t)atol(argv[3]) : 100;
    nkeys = argc > 4 ? atoi(argv[4]) : 1000;
    int reps = argc > 5 ? atoi(argv[5]) : 7;
    batch = argc > 6 ? atoi(argv[6]) : 100;
    if (n < 1 || nkeys < 1 || reps < 1 || reps > 99 || batch < 1 || batch > 1024 || batch > nkeys) {
        fprintf(stderr, "floor_hiredis: bad arguments\n");
        return 2;
    }
    c = redisConnect("127.0.0.1", port);
    if (!c || c->err)
        die("connect", c);
    spread[0] = c;
    for (char *p = argc > 7 ? argv[7] : NULL; p && *p && nspread < 16;) {
        redisContext *sc = redisConnect("127.0.0.1", atoi(p));
        if (!sc || sc->err)
            die("connect (spread)", sc);
        spread[nspread++] = sc;
        p = strchr(p, ',');
        p = p ? p + 1 : NULL;
    }

    char *value = malloc(vbytes ? vbytes : 1);
    memset(value, 'x', vbytes);
    keys = malloc(sizeof *keys * (size_t)nkeys);
    klens = malloc(sizeof *klens * (size_t)nkeys);
    for (int i = 0; i < nkeys; i++) {
        char buf[64];
        int len = snprintf(buf, sizeof buf, "floor:hiredis:%d", i + 1);
        keys[i] = strdup(buf);
        klens[i] = (size_t)len;
        /* Every key on c (get, mget), and on its spread server too. */
        int home = i % nspread;
        for (int s = 0; s < 2; s++) {
            redisContext *sc = s == 0 ? c : spread[home];
            if (s == 1 && home == 0)
                break;
            redisReply *r = redisCommand(sc, "SET %b %b", buf, (size_t)len, value, vbytes);
            if (!r)
                die("SET", sc);
            freeReplyObject(r);
        }
    }

    double cpu;
    printf("get_ns %.1f\n", measure(run_get, n, reps, &cpu));
    printf("get_cpu_ns %.1f\n", cpu);
    fflush(stdout);
    long nm = n / 10 > 0 ? n / 10 : 1;
    printf("mget_ns %.1f\n", measure(run_mget, nm, reps, &cpu));
    printf("mget_cpu_ns %.1f\n", cpu);
    if (nspread > 1) {
        fflush(stdout);
        counting_spread = 1;
        printf("spread_ns %.1f\n", measure(run_spread, nm, reps, &cpu));
        printf("spread_cpu_ns %.1f\n", cpu);
        counting_spread = 0;
    }

    for (int i = 0; i < nkeys; i++) {
        for (int s = 0; s < nspread; s++) {
            redisReply *r = redisCommand(spread[s], "DEL %s", keys[i]);
            if (r)
                freeReplyObject(r);
        }
        free(keys[i]);
    }
    for (int s = 0; s < nspread; s++)
        redisFree(spread[s]);
    return 0;
}
