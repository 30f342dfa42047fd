/* The per-key lock registry: exclusion, waking, timeouts, owners, cleanup. */
#include <stdatomic.h>
#include <string.h>
#include <uv.h>

#include "dogpile.h"
#include "tap.h"

#define K(s) s, strlen(s)

/* -- Exclusion under contention --------------------------------------- */

#define NTHREADS 16
#define ROUNDS 2000

static uint32_t race_domain;
static long counter;        /* guarded only by the dogpile lock */
static int inside, max_inside;
static uv_mutex_t stat_mu;

static void contender(void *arg)
{
    uint32_t owner = dp_lock_owner_new();
    (void)arg;
    for (int i = 0; i < ROUNDS; i++) {
        if (dp_lock_wait(race_domain, K("hot"), owner, -1) != DP_OK)
            return;
        uv_mutex_lock(&stat_mu);
        if (++inside > max_inside)
            max_inside = inside;
        uv_mutex_unlock(&stat_mu);
        counter++;
        uv_mutex_lock(&stat_mu);
        inside--;
        uv_mutex_unlock(&stat_mu);
        dp_lock_release(race_domain, K("hot"));
    }
}

/* -- Wake latency: the waiter is woken by the release, not by polling -- */

static uint32_t wake_domain;
static double acquired_at;

static void waiter(void *arg)
{
    (void)arg;
    if (dp_lock_wait(wake_domain, K("k"), dp_lock_owner_new(), -1) == DP_OK)
        acquired_at = dp_clock_monotonic();
}

/* -- Release from another thread ---------------------------------------- */

static uint32_t cross_domain;
static int cross_rc = -1;

static void releaser(void *arg)
{
    (void)arg;
    cross_rc = dp_lock_release(cross_domain, K("handed-over"));
}

/* -- Waiting for the release without taking the lock ----------------------- */

#define NREADERS 6

static uint32_t unl_domain;
static int unl_value;          /* written by the holder before it releases */
static int unl_seen[NREADERS];
static int unl_rc[NREADERS];
static double unl_woke[NREADERS];
static _Atomic int unl_ready;

static void unl_reader(void *arg)
{
    int i = (int)(long)arg;
    atomic_fetch_add(&unl_ready, 1);
    unl_rc[i] = dp_lock_wait_unlocked(unl_domain, K("v"), dp_lock_owner_new(), -1);
    unl_woke[i] = dp_clock_monotonic();
    unl_seen[i] = unl_value; /* ordered after the holder's write by the release */
}

/* The lock is taken again at once after the release: the waiter still
 * returns, since the holder it waited for let go. */
static int retake_rc = -1;

static void retake_waiter(void *arg)
{
    (void)arg;
    retake_rc = dp_lock_wait_unlocked(unl_domain, K("again"), dp_lock_owner_new(), 5);
}

static void test_wait_unlocked(void)
{
    unl_domain = dp_lock_domain_new();
    uint32_t holder = dp_lock_owner_new(), other = dp_lock_owner_new();
    CHECK(dp_lock_wait_unlocked(unl_domain, K("free"), other, -1) == DP_OK,
          "wait_unlocked on a free key returns at once");
    CHECK(!dp_lock_held(unl_domain, K("free"), NULL) && dp_lock_count() == 0,
          "and neither takes the lock nor leaves an entry");
    CHECK(dp_lock_try(unl_domain, K("v"), holder) == DP_OK, "the holder takes the lock");
    CHECK(dp_lock_wait_unlocked(unl_domain, K("v"), holder, -1) == DP_EDEADLK,
          "wait_unlocked on a lock the same owner holds is refused");
    CHECK(dp_lock_wait_unlocked(unl_domain, K("v"), other, 0) == DP_ETIMEDOUT,
          "timeout 0 checks once: held");
    double t0 = dp_clock_monotonic();
    int rc = dp_lock_wait_unlocked(unl_domain, K("v"), other, 0.03);
    double waited = dp_clock_monotonic() - t0;
    CHECK(rc == DP_ETIMEDOUT && waited >= 0.029, "a timed wait gives up (rc=%d, %.3f s)", rc,
          waited);
    uint32_t who = 0;
    CHECK(dp_lock_held(unl_domain, K("v"), &who) && who == holder,
          "a wait that gave up leaves the holder alone");

    uv_thread_t t[NREADERS];
    for (int i = 0; i < NREADERS; i++)
        uv_thread_create(&t[i], unl_reader, (void *)(long)i);
    while (atomic_load(&unl_ready) < NREADERS)
        dp_clock_sleep(0.001);
    dp_clock_sleep(0.05);
    unl_value = 42;
    double released_at = dp_clock_monotonic();
    dp_lock_release(unl_domain, K("v"));
    for (int i = 0; i < NREADERS; i++)
        uv_thread_join(&t[i]);
    int all = 1;
    double worst = 0;
    for (int i = 0; i < NREADERS; i++) {
        all &= unl_rc[i] == DP_OK && unl_seen[i] == 42;
        if (unl_woke[i] - released_at > worst)
            worst = unl_woke[i] - released_at;
    }
    printf("# wait_unlocked: %d readers, the last woke %.3f ms after the release\n", NREADERS,
           worst * 1e3);
    CHECK(all, "%d readers all return after the release and see what the holder wrote",
          NREADERS);
    CHECK(worst < 0.05, "they are woken by the release together, not in turn (%.3f ms)",
          worst * 1e3);
    CHECK(!dp_lock_held(unl_domain, K("v"), NULL), "none of them took the lock");

    dp_lock_try(unl_domain, K("again"), holder);
    uv_thread_t w;
    uv_thread_create(&w, retake_waiter, NULL);
    dp_clock_sleep(0.05);
    dp_lock_release(unl_domain, K("again"));
    dp_lock_try(unl_domain, K("again"), holder); /* at once, before it wakes up */
    uv_thread_join(&w);
    CHECK(retake_rc == DP_OK, "a waiter returns once its holder released, even if the lock "
          "was taken again meanwhile (rc=%d)", retake_rc);
    dp_lock_release(unl_domain, K("again"));
    CHECK(dp_lock_count() == 0, "wait_unlocked leaves no entry (%zu)", dp_lock_count());
}

int main(void)
{
    uv_mutex_init(&stat_mu);
    uint32_t d = dp_lock_domain_new(), o1 = dp_lock_owner_new(), o2 = dp_lock_owner_new();

    CHECK(dp_lock_try(d, K("a"), o1) == DP_OK, "try on a free key acquires");
    CHECK(dp_lock_try(d, K("a"), o2) == DP_EBUSY, "try on a held key is busy");
    uint32_t who = 0;
    CHECK(dp_lock_held(d, K("a"), &who) == 1 && who == o1, "held reports the holder's owner tag");
    CHECK(dp_lock_try(d, K("b"), o2) == DP_OK, "another key is independent");
    uint32_t d2 = dp_lock_domain_new();
    CHECK(dp_lock_try(d2, K("a"), o2) == DP_OK, "the same key in another domain is independent");
    CHECK(dp_lock_try(d, "a\0x", 3, o2) == DP_OK, "keys with embedded zeros are distinct keys");
    CHECK(dp_lock_release(d, "a\0x", 3) == DP_OK, "release a key with embedded zeros");
    CHECK(dp_lock_wait(d, K("a"), o1, -1) == DP_EDEADLK, "blocking wait on a lock the same owner holds is refused");
    double t0 = dp_clock_monotonic();
    int rc = dp_lock_wait(d, K("a"), o2, 0.05);
    double waited = dp_clock_monotonic() - t0;
    CHECK(rc == DP_ETIMEDOUT, "wait with a timeout gives up (rc=%d)", rc);
    CHECK(waited >= 0.049, "the timed wait lasted its timeout (%.3f s)", waited);
    CHECK(dp_lock_release(d, K("a")) == DP_OK, "release a held lock");
    CHECK(dp_lock_release(d, K("a")) == DP_ENOTHELD, "release twice is refused");
    CHECK(dp_lock_release(d, K("never")) == DP_ENOTHELD, "release of an unknown key is refused");
    CHECK(dp_lock_wait(d, K("a"), o2, 0) == DP_OK, "wait on a free lock acquires at once");
    dp_lock_release(d, K("a"));
    dp_lock_release(d, K("b"));
    dp_lock_release(d2, K("a"));
    CHECK(dp_lock_count() == 0, "no entry is left once every lock is released (%zu)", dp_lock_count());

    uint32_t n1 = dp_lock_domain(K("shared_memory:players"));
    uint32_t n2 = dp_lock_domain(K("shared_memory:players"));
    uint32_t n3 = dp_lock_domain(K("shared_memory:other"));
    CHECK(n1 && n1 == n2 && n1 != n3, "named domains: one id per name");

    /* Many keys, to grow the stripes' tables, then release by owner. */
    char key[32];
    int all = 1;
    for (int i = 0; i < 5000; i++) {
        int n = snprintf(key, sizeof key, "key-%d", i);
        all &= dp_lock_try(d, key, (size_t)n, o1) == DP_OK;
    }
    CHECK(all && dp_lock_count() == 5000, "5000 locks held at once (%zu)", dp_lock_count());
    CHECK(dp_lock_release_owner(o1) == 5000, "release_owner frees everything its owner held");
    CHECK(dp_lock_count() == 0, "and leaves no entry");

    race_domain = dp_lock_domain_new();
    uv_thread_t t[NTHREADS];
    for (int i = 0; i < NTHREADS; i++)
        uv_thread_create(&t[i], contender, NULL);
    for (int i = 0; i < NTHREADS; i++)
        uv_thread_join(&t[i]);
    CHECK(counter == (long)NTHREADS * ROUNDS, "%d threads x %d rounds: every increment kept (%ld)",
          NTHREADS, ROUNDS, counter);
    CHECK(max_inside == 1, "never two holders at once (max %d)", max_inside);

    wake_domain = dp_lock_domain_new();
    uint32_t holder = dp_lock_owner_new();
    dp_lock_try(wake_domain, K("k"), holder);
    uv_thread_t w;
    uv_thread_create(&w, waiter, NULL);
    dp_clock_sleep(0.1);
    uint32_t holder_seen = 0;
    CHECK(dp_lock_held(wake_domain, K("k"), &holder_seen) && holder_seen == holder,
          "the waiter is still waiting while the lock is held");
    double released_at = dp_clock_monotonic();
    dp_lock_release(wake_domain, K("k"));
    uv_thread_join(&w);
    double latency = acquired_at - released_at;
    printf("# wake latency %.3f ms\n", latency * 1e3);
    CHECK(latency >= 0 && latency < 0.05, "the waiter wakes on release, not on a poll (%.3f ms)", latency * 1e3);
    dp_lock_release(wake_domain, K("k"));

    cross_domain = dp_lock_domain_new();
    dp_lock_try(cross_domain, K("handed-over"), holder);
    uv_thread_t r;
    uv_thread_create(&r, releaser, NULL);
    uv_thread_join(&r);
    CHECK(cross_rc == DP_OK && !dp_lock_held(cross_domain, K("handed-over"), NULL),
          "a lock taken in one thread is released by another");
    test_wait_unlocked();
    CHECK(dp_lock_count() == 0, "no entry left at the end (%zu)", dp_lock_count());
    CHECK(strcmp(dp_strerror(DP_EDEADLK), "lock is held by the same owner; waiting would never end") == 0,
          "dp_strerror names the status");
    return tap_done();
}
