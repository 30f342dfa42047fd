/* The core's circuit breaker (dogpile.h, "Circuit breaker") from a C host,
 * through a fake networked backend whose calls fail on demand: the
 * circuit_* arguments taken out before the backend parses its own, open and
 * close transitions, the slow-failure rule, one probe per cool-down with 8
 * threads hammering one store, an unlock that does not wait, the two-level
 * lock, the stats. Run under TSan by the test command (h8tsan / tsan). */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "dogpile.h"
#include "tap.h"

#define K(s) s, strlen(s)
#define FAKE "test.fake_server"
#define TPL "dogpile.cache.template"

int dp_template_register(void);

static dp_arg num(const char *name, double v)
{
    dp_arg a = {name, DP_ARG_NUMBER, v, NULL, 0};
    return a;
}

static dp_arg str(const char *name, const char *s)
{
    dp_arg a = {name, DP_ARG_STRING, 0, s, strlen(s)};
    return a;
}

/* -- The fake server ---------------------------------------------------------
 * A backend that parses its own arguments (as redis.c and memcached.c do) and
 * refuses any it does not know, one instance per open (as memcached.c), a
 * lock domain per host. `mode` says how the "server" answers. */

enum { UP, DOWN, SLOW_DOWN, BAD_KEY };
static _Atomic int mode = UP;
static _Atomic int calls, inside, max_inside, unlocks;
static _Atomic int delay_ms; /* each call's time in the backend */

typedef struct fake {
    uint32_t domain;
} fake;

static int fake_open(void *ud, const dp_arg *args, size_t nargs, void **self, dp_err *err)
{
    (void)ud;
    const char *host = "h";
    size_t hl = 1;
    for (size_t i = 0; i < nargs; i++) {
        if (strcmp(args[i].name, "host") == 0 && args[i].type == DP_ARG_STRING) {
            host = args[i].string;
            hl = args[i].len;
        } else {
            return dp_err_set(err, DP_EINVAL, FAKE ": unknown argument '%s'", args[i].name);
        }
    }
    fake *f = malloc(sizeof *f);
    if (!f)
        return DP_ENOMEM;
    char dom[100];
    int n = snprintf(dom, sizeof dom, FAKE ":%.*s", (int)hl, host);
    f->domain = dp_lock_domain(dom, (size_t)n);
    *self = f;
    return DP_OK;
}

static void fake_close(void *self)
{
    free(self);
}

static uint32_t fake_domain(void *self)
{
    return ((fake *)self)->domain;
}

/* One round trip: counted, timed, answered as `mode` says. */
static int trip(const char *op, dp_err *err)
{
    atomic_fetch_add(&calls, 1);
    int in = atomic_fetch_add(&inside, 1) + 1;
    int m = atomic_load(&max_inside);
    while (in > m && !atomic_compare_exchange_weak(&max_inside, &m, in))
        ;
    int md = atomic_load(&mode), d = atomic_load(&delay_ms);
    if (md == SLOW_DOWN && d < 60)
        d = 60;
    if (d)
        dp_clock_sleep(d / 1000.0);
    atomic_fetch_sub(&inside, 1);
    if (md == DOWN || md == SLOW_DOWN)
        return dp_err_set(err, DP_EBACKEND, "%s: no answer from h:1 within socket_timeout", op);
    if (md == BAD_KEY)
        return dp_err_set(err, DP_EINVAL, "%s: bad key", op);
    return DP_OK;
}

static int fake_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    (void)self, (void)key, (void)klen, (void)out;
    int rc = trip("GET", err);
    return rc == DP_OK ? DP_ENOTFOUND : rc;
}

static int fake_set(void *self, const char *key, size_t klen, const char *v, size_t vlen,
                    dp_err *err)
{
    (void)self, (void)key, (void)klen, (void)v, (void)vlen;
    return trip("SET", err);
}

static int fake_del(void *self, const char *key, size_t klen, dp_err *err)
{
    (void)self, (void)key, (void)klen;
    return trip("DEL", err);
}

static int fake_lock(void *self, const char *key, size_t klen, double timeout, dp_err *err)
{
    (void)self, (void)key, (void)klen, (void)timeout;
    return trip("SET NX", err);
}

/* A release against a stopped server would wait its socket_timeout. */
static int fake_unlock(void *self, const char *key, size_t klen, dp_err *err)
{
    (void)self, (void)key, (void)klen;
    atomic_fetch_add(&unlocks, 1);
    if (atomic_load(&mode) != UP) {
        dp_clock_sleep(0.2);
        return dp_err_set(err, DP_EBACKEND, "EVAL (unlock): no answer");
    }
    return DP_OK;
}

static const dp_backend_ops fake_ops = {
    .name = FAKE, .open = fake_open, .close = fake_close, .lock_domain = fake_domain,
    .get = fake_get, .set = fake_set, .del = fake_del, .lock = fake_lock, .unlock = fake_unlock,
};

/* Open FAKE with a host and the circuit arguments (NAN: not given). */
static int open_fake(const char *host, double failures, double cooldown, double slow,
                     dp_backend **b, dp_err *err)
{
    dp_arg args[4];
    size_t n = 0;
    if (!isnan(failures))
        args[n++] = num("circuit_failures", failures);
    args[n++] = str("host", host);
    if (!isnan(cooldown))
        args[n++] = num("circuit_cooldown", cooldown);
    if (!isnan(slow))
        args[n++] = num("circuit_slow", slow);
    return dp_backend_open(FAKE, args, n, b, err);
}

static int get(dp_backend *b, dp_err *err)
{
    dp_bytes out = {0};
    int rc = dp_backend_get(b, K("k"), &out, err);
    dp_bytes_free(&out);
    return rc;
}

static dp_circuit_stats stats_of(dp_backend *b)
{
    dp_circuit_stats st;
    dp_backend_circuit(b, &st);
    return st;
}

/* -- Arguments ------------------------------------------------------------------ */

static void test_args(void)
{
    dp_backend *b = NULL;
    dp_err err;
    int rc = open_fake("args", 2, 0.5, INFINITY, &b, &err);
    CHECK(rc == DP_OK, "the circuit_* arguments are taken out before a backend that parses "
          "its own arguments sees them: %s", err.msg);
    dp_circuit_stats st = stats_of(b);
    CHECK(st.enabled == 1 && st.state == DP_CIRCUIT_CLOSED && st.circuit_failures == 2 &&
          st.circuit_cooldown == 0.5 && isinf(st.circuit_slow), "stats: the settings, closed");
    dp_backend *b2 = NULL;
    rc = open_fake("args", 3, 0.5, INFINITY, &b2, &err);
    CHECK(rc == DP_EMISMATCH && strstr(err.msg, "circuit_failures 2, not 3") && b2 == NULL,
          "another handle on the same store with other circuit settings is refused: %s",
          err.msg);
    rc = open_fake("args", 2, 0.5, INFINITY, &b2, &err);
    CHECK(rc == DP_OK, "the same settings join the store's breaker");
    dp_backend_close(b2);
    dp_backend_close(b);

    rc = open_fake("defaults", NAN, NAN, NAN, &b, &err);
    st = stats_of(b);
    CHECK(rc == DP_OK && st.circuit_failures == 20 && st.circuit_cooldown == 1 &&
          st.circuit_slow == 0.1, "defaults: 20 failures, 1 s cool-down, 0.1 s slow");
    dp_backend_close(b);

    rc = open_fake("bad", -1, NAN, NAN, &b, &err);
    CHECK(rc == DP_EINVAL && strstr(err.msg, FAKE ": circuit_failures must be a non-negative "
          "integer") && strstr(err.msg, "got -1"), "a bad circuit_failures: %s", err.msg);
    rc = open_fake("bad", NAN, 0, NAN, &b, &err);
    CHECK(rc == DP_EINVAL && strstr(err.msg, "circuit_cooldown must be a positive number of "
          "seconds, got 0"), "a bad circuit_cooldown: %s", err.msg);
    dp_arg typo[] = {num("circuit_failure", 2)};
    rc = dp_backend_open(FAKE, typo, 1, &b, &err);
    CHECK(rc == DP_EINVAL && strstr(err.msg, "unknown argument 'circuit_failure' (known: "
          "circuit_failures, circuit_cooldown, circuit_slow)"), "a misspelt one: %s", err.msg);

    /* A backend that does not talk to a server has no breaker: its own
     * argument check refuses the name. */
    CHECK(dp_template_register() == DP_OK, "template registered");
    dp_arg tpl[] = {str("name", "breaker"), num("circuit_failures", 2)};
    rc = dp_backend_open(TPL, tpl, 2, &b, &err);
    CHECK(rc == DP_EINVAL && strstr(err.msg, "unknown argument 'circuit_failures'"),
          "not networked: circuit_failures is unknown to it: %s", err.msg);
    rc = dp_backend_open(TPL, tpl, 1, &b, &err);
    st = stats_of(b);
    CHECK(rc == DP_OK && st.enabled == 0, "not networked: no breaker in its stats");
    dp_backend_close(b);
}

/* -- Transitions, one thread ------------------------------------------------------ */

static void test_transitions(void)
{
    dp_backend *b;
    dp_err err;
    open_fake("one", 3, 0.15, INFINITY, &b, &err);
    atomic_store(&mode, DOWN);
    int c0 = atomic_load(&calls);
    get(b, &err);
    get(b, &err);
    atomic_store(&mode, UP);
    CHECK(get(b, &err) == DP_ENOTFOUND && stats_of(b).failures == 0,
          "a success (a miss) resets the consecutive count");
    atomic_store(&mode, DOWN);
    get(b, &err);
    get(b, &err);
    CHECK(stats_of(b).state == DP_CIRCUIT_CLOSED && stats_of(b).failures == 2,
          "2 failures of 3: still closed");
    double t0 = dp_clock_monotonic();
    int rc = dp_backend_set(b, K("k"), K("v"), &err);
    CHECK(rc == DP_EBACKEND && strstr(err.msg, "SET: no answer"), "the 3rd failure is the "
          "backend's own error: %s", err.msg);
    dp_circuit_stats st = stats_of(b);
    CHECK(st.state == DP_CIRCUIT_OPEN && st.opened == 1 && st.since > 0 &&
          fabs(st.since - dp_clock_now()) < 5 && strstr(st.last_error, "SET: no answer"),
          "open after 3 consecutive failures; since and the last failure reported");
    CHECK(atomic_load(&calls) - c0 == 6, "every call so far reached the backend");

    int c1 = atomic_load(&calls), refused = 0;
    double worst = 0, all = dp_clock_monotonic();
    for (int i = 0; i < 1000; i++) {
        double s = dp_clock_monotonic();
        int r = i % 3 == 0 ? get(b, &err) : i % 3 == 1 ? dp_backend_set(b, K("k"), K("v"), &err)
                                                       : dp_backend_delete(b, K("k"), &err);
        worst = fmax(worst, dp_clock_monotonic() - s);
        refused += r == DP_EBACKEND;
    }
    all = (dp_clock_monotonic() - all) / 1000;
    CHECK(refused == 1000 && atomic_load(&calls) == c1, "open: 1000 calls refused without "
          "reaching the backend");
    /* A bound loose enough for a sanitizer build on a loaded machine. */
    CHECK(all < 50e-6, "refused in microseconds: %.2f us on average, the slowest %.1f us",
          all * 1e6, worst * 1e6);
    CHECK(strstr(err.msg, "circuit open since ") && strstr(err.msg, " UTC (after 3 failures; "
          "the next call probes in 0.") && strstr(err.msg, "last failure: SET: no answer"),
          "the refusal says the circuit is open, since when, why, and the last failure: %s",
          err.msg);
    CHECK(stats_of(b).refused == 1000, "stats: 1000 refused");

    /* A lock release after it opened must not wait socket_timeout again. */
    int u0 = atomic_load(&unlocks);
    double s = dp_clock_monotonic();
    rc = dp_backend_unlock(b, K("k"), &err);
    CHECK(rc == DP_EBACKEND && atomic_load(&unlocks) == u0 && dp_clock_monotonic() - s < 0.01,
          "open: unlock refused at once, the backend's (0.2 s) release not called");
    /* The two-level lock: refused at the backend's level, the core's freed. */
    dp_backend_hold h = {0};
    rc = dp_backend_acquire(b, K("lk"), 7, 1, &h, &err);
    CHECK(rc == DP_EBACKEND && !h.core && !h.proc &&
          !dp_lock_held(dp_backend_lock_domain(b), K("lk"), NULL),
          "open: dp_backend_acquire fails at once, holding nothing: %s", err.msg);

    /* The cool-down, then one probe: it fails, and the circuit reopens. */
    while (dp_clock_monotonic() - t0 < 0.16)
        dp_clock_sleep(0.01);
    c1 = atomic_load(&calls);
    rc = get(b, &err);
    CHECK(rc == DP_EBACKEND && atomic_load(&calls) == c1 + 1 && strstr(err.msg, "GET: no "
          "answer"), "after the cool-down one call goes through (the probe): %s", err.msg);
    st = stats_of(b);
    CHECK(st.state == DP_CIRCUIT_OPEN && st.probes == 1 && st.reopened == 1 && st.opened == 1,
          "the failed probe reopens it");
    rc = get(b, &err);
    CHECK(rc == DP_EBACKEND && atomic_load(&calls) == c1 + 1 &&
          strstr(err.msg, "probes in 0.1"), "refused again for a whole cool-down: %s",
          err.msg);

    /* A probe refused before any I/O (a bad key) proves nothing. */
    dp_clock_sleep(0.16);
    atomic_store(&mode, BAD_KEY);
    rc = get(b, &err);
    CHECK(rc == DP_EINVAL && stats_of(b).state == DP_CIRCUIT_OPEN,
          "a probe that fails on its argument leaves the circuit open");
    atomic_store(&mode, UP);
    c1 = atomic_load(&calls);
    rc = get(b, &err);
    st = stats_of(b);
    CHECK(rc == DP_ENOTFOUND && atomic_load(&calls) == c1 + 1 && st.state == DP_CIRCUIT_CLOSED
          && st.probes == 3 && st.since == 0, "the next call probes at once; a server that "
          "answers (a miss) closes the circuit");
    CHECK(get(b, &err) == DP_ENOTFOUND && dp_backend_unlock(b, K("k"), &err) == DP_OK &&
          atomic_load(&calls) == c1 + 2, "closed: calls reach the backend again");
    dp_backend_close(b);

    /* circuit_failures = 0: no breaker at all. */
    open_fake("none", 0, NAN, NAN, &b, &err);
    atomic_store(&mode, DOWN);
    c1 = atomic_load(&calls);
    for (int i = 0; i < 20; i++)
        get(b, &err);
    CHECK(atomic_load(&calls) == c1 + 20 && stats_of(b).enabled == 0,
          "circuit_failures = 0: every call reaches the backend");
    atomic_store(&mode, UP);
    dp_backend_close(b);
}

/* A timed-out failure opens it at once; fast ones count. */
static void test_slow(void)
{
    dp_backend *b;
    dp_err err;
    open_fake("slow", 3, 0.2, 0.05, &b, &err);
    atomic_store(&mode, DOWN);
    get(b, &err);
    CHECK(stats_of(b).state == DP_CIRCUIT_CLOSED, "a fast failure counts (1 of 3)");
    atomic_store(&mode, SLOW_DOWN);
    double t0 = dp_clock_monotonic();
    get(b, &err);
    int c1 = atomic_load(&calls);
    int rc = dp_backend_set(b, K("k"), K("v"), &err);
    double took = dp_clock_monotonic() - t0;
    CHECK(rc == DP_EBACKEND && atomic_load(&calls) == c1 && stats_of(b).state ==
          DP_CIRCUIT_OPEN, "a failure that took 0.06 s >= circuit_slow opens it at once");
    CHECK(took < 0.1, "get then set: one slow failure in all (%.3f s)", took);
    CHECK(strstr(err.msg, "after a failure that took 0.0"), "the refusal says why: %s",
          err.msg);
    atomic_store(&mode, UP);
    dp_backend_close(b);
}

/* -- Threads ---------------------------------------------------------------------- */

#define NTHREADS 8
static _Atomic int stop_threads;
static _Atomic long t_ok, t_refused, t_failed;

static void hammer(void *arg)
{
    (void)arg;
    /* A handle of its own, as each Lua state opens one: the store's breaker
     * is shared all the same. */
    dp_backend *b;
    dp_err err;
    if (open_fake("threads", 2, 0.2, INFINITY, &b, &err) != DP_OK) {
        atomic_fetch_add(&t_failed, 1000000);
        return;
    }
    while (!atomic_load(&stop_threads)) {
        int rc = get(b, &err);
        if (rc == DP_ENOTFOUND)
            atomic_fetch_add(&t_ok, 1);
        else if (strstr(err.msg, "circuit open"))
            atomic_fetch_add(&t_refused, 1);
        else
            atomic_fetch_add(&t_failed, 1);
    }
    dp_backend_close(b);
}

static void run_threads(double seconds)
{
    uv_thread_t t[NTHREADS];
    atomic_store(&stop_threads, 0);
    for (int i = 0; i < NTHREADS; i++)
        uv_thread_create(&t[i], hammer, NULL);
    dp_clock_sleep(seconds);
    atomic_store(&stop_threads, 1);
    for (int i = 0; i < NTHREADS; i++)
        uv_thread_join(&t[i]);
}

static void test_threads(void)
{
    dp_backend *b;
    dp_err err;
    open_fake("threads", 2, 0.2, INFINITY, &b, &err);
    /* Down, each call 30 ms in the backend: open it, then 8 threads hammer
     * the open circuit for 0.75 s. Only probes reach the backend, one at a
     * time, about one per cool-down (0.2 s, plus the probe's 30 ms). */
    atomic_store(&mode, DOWN);
    atomic_store(&delay_ms, 30);
    get(b, &err);
    get(b, &err);
    CHECK(stats_of(b).state == DP_CIRCUIT_OPEN, "threads: open after 2 failures");
    atomic_store(&max_inside, 0);
    int c0 = atomic_load(&calls);
    run_threads(0.75);
    int probes = atomic_load(&calls) - c0;
    dp_circuit_stats st = stats_of(b);
    CHECK(atomic_load(&max_inside) == 1, "threads: one probe at a time in the backend (at "
          "most %d at once)", atomic_load(&max_inside));
    CHECK(probes >= 2 && probes <= 4 && st.probes == probes && st.reopened == probes,
          "threads: %d probes in 0.75 s with a 0.2 s cool-down, each failed and reopened it",
          probes);
    CHECK(atomic_load(&t_refused) > 1000 && atomic_load(&t_failed) == probes &&
          atomic_load(&t_ok) == 0 && st.refused == atomic_load(&t_refused),
          "threads: %ld calls refused, %ld failed (the probes)", atomic_load(&t_refused),
          atomic_load(&t_failed));

    /* The server comes back: the next probe closes it, and every thread's
     * calls go through again. */
    atomic_store(&mode, UP);
    atomic_store(&t_ok, 0);
    atomic_store(&t_refused, 0);
    atomic_store(&t_failed, 0);
    atomic_store(&max_inside, 0);
    run_threads(0.5);
    st = stats_of(b);
    CHECK(st.state == DP_CIRCUIT_CLOSED && atomic_load(&t_ok) > 20 &&
          atomic_load(&t_failed) == 0 && atomic_load(&max_inside) > 1,
          "threads: closed by a probe within a cool-down; %ld calls then succeeded, from "
          "several threads at once (%d)", atomic_load(&t_ok), atomic_load(&max_inside));
    int c1 = atomic_load(&calls);
    CHECK(get(b, &err) == DP_ENOTFOUND && atomic_load(&calls) == c1 + 1,
          "threads: the main thread's handle goes through too");
    atomic_store(&delay_ms, 0);
    dp_backend_close(b);
}

int main(void)
{
    CHECK(dp_backend_register(&fake_ops, NULL) == DP_OK && dp_circuit_declare(FAKE) == DP_OK,
          "a networked backend registered and declared");
    test_args();
    test_transitions();
    test_slow();
    test_threads();
    dp_shutdown();
    return tap_done();
}
