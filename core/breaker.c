/* breaker.c -- circuit breakers of networked backends (see dogpile.h,
 * "Circuit breaker", and breaker.h).
 *
 * A stopped server costs every call socket_timeout per round trip: a
 * get_or_create (get, lock, get, set) about four of them. The breaker turns
 * the calls after the first failure into an error at once, and lets one
 * call at a time find out whether the server is back. Written once in the
 * core, around the dispatchers, so every backend gets it without code of
 * its own.
 *
 * Why a slow failure opens it at once: a failure that took a timeout costs
 * the next call a timeout too, so waiting for more of them only spends the
 * caller's time (100 fail_open calls against a SIGSTOPped server must take
 * under two timeouts in all). A fast failure (a refused connection, a
 * server of a memcached list marked dead, an error reply about one key)
 * costs microseconds to repeat, while opening refuses calls on keys that
 * would work (the live servers of the list): 20 in a row (Hystrix's
 * request volume threshold) before refusing, any success in between
 * starting the count again.
 */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "breaker.h"

/* -- Arguments ------------------------------------------------------------- */

#define PREFIX "circuit_"

static const dp_arg_spec circuit_spec[] = {
    {.name = "circuit_failures", .kind = DP_SPEC_INT, .min = 0, .def = 20,
     .what = "a non-negative integer (consecutive failures that open the circuit; 0: none)",
     .offset = offsetof(dp__circuit_cfg, failures)},
    {.name = "circuit_cooldown", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_ABOVE_MIN, .def = 1,
     .offset = offsetof(dp__circuit_cfg, cooldown)},
    {.name = "circuit_slow", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_INFINITE, .min = 0,
     .def = 0.1, .offset = offsetof(dp__circuit_cfg, slow)},
    {0},
};

/* The in-tree backends that talk to a server, then those declared. lmdb is
 * not one: its failures are local (a full disk, a full map), cost no time,
 * and a refused read would only hide data that is there. */
static const char *const builtin[] = {
    "dogpile.cache.redis", "dogpile.cache.redis_sentinel", "dogpile.cache.redis_cluster",
    "dogpile.cache.memcached", NULL,
};

typedef struct declared {
    struct declared *next;
    char name[];
} declared;

static declared *names;
static dp__breaker *breakers;
static uv_mutex_t reg_mu;
static uv_once_t once = UV_ONCE_INIT;

static void init(void)
{
    uv_mutex_init(&reg_mu);
}

DP_API int dp_circuit_declare(const char *name)
{
    if (!name || !*name)
        return DP_EINVAL;
    if (dp__circuit_networked(name))
        return DP_OK;
    size_t n = strlen(name);
    declared *d = malloc(sizeof *d + n + 1);
    if (!d)
        return DP_ENOMEM;
    memcpy(d->name, name, n + 1);
    uv_once(&once, init);
    uv_mutex_lock(&reg_mu);
    d->next = names;
    names = d;
    uv_mutex_unlock(&reg_mu);
    return DP_OK;
}

void dp__circuit_shutdown(void)
{
    uv_once(&once, init);
    uv_mutex_lock(&reg_mu);
    while (names) {
        declared *d = names;
        names = d->next;
        free(d);
    }
    uv_mutex_unlock(&reg_mu);
}

int dp__circuit_networked(const char *name)
{
    for (size_t i = 0; builtin[i]; i++)
        if (strcmp(builtin[i], name) == 0)
            return 1;
    uv_once(&once, init);
    uv_mutex_lock(&reg_mu);
    declared *d = names;
    while (d && strcmp(d->name, name) != 0)
        d = d->next;
    uv_mutex_unlock(&reg_mu);
    return d != NULL;
}

static int is_circuit(const dp_arg *a)
{
    return a->name && strncmp(a->name, PREFIX, sizeof PREFIX - 1) == 0;
}

int dp__circuit_args(const char *backend, const dp_arg *args, size_t nargs,
                     dp__circuit_cfg *cfg, dp_arg **rest, size_t *nrest, dp_err *err)
{
    size_t ncirc = 0;
    for (size_t i = 0; i < nargs; i++)
        ncirc += is_circuit(&args[i]);
    *rest = NULL;
    *nrest = nargs;
    if (ncirc == 0)
        return dp_args_fill(backend, circuit_spec, NULL, 0, cfg, err);
    dp_arg *all = malloc(nargs * sizeof *all);
    if (!all)
        return dp_err_set(err, DP_ENOMEM, "%s: out of memory", backend);
    /* The circuit_* ones first, then the backend's, each in order. */
    size_t c = 0, r = ncirc;
    for (size_t i = 0; i < nargs; i++)
        all[is_circuit(&args[i]) ? c++ : r++] = args[i];
    int rc = dp_args_fill(backend, circuit_spec, all, ncirc, cfg, err);
    if (rc != DP_OK) {
        free(all);
        return rc;
    }
    memmove(all, all + ncirc, (nargs - ncirc) * sizeof *all);
    *rest = all;
    *nrest = nargs - ncirc;
    return DP_OK;
}

/* -- The registry ------------------------------------------------------------ */

int dp__breaker_join(const char *backend, uint32_t domain, void *self,
                     const dp__circuit_cfg *cfg, dp__breaker **out, dp_err *err)
{
    uv_once(&once, init);
    uv_mutex_lock(&reg_mu);
    dp__breaker *br = breakers;
    while (br && !(domain ? br->domain == domain : !br->domain && br->self == self))
        br = br->next;
    if (br) {
        char diff[300];
        if (dp_args_diff(circuit_spec, &br->cfg, cfg, diff, sizeof diff)) {
            uv_mutex_unlock(&reg_mu);
            return dp_err_set(err, DP_EMISMATCH, "%s: the circuit breaker of this server (one "
                              "per server in a process) is already in use with %s; every "
                              "region sharing it must agree", backend, diff);
        }
        br->refs++;
        uv_mutex_unlock(&reg_mu);
        *out = br;
        return DP_OK;
    }
    br = calloc(1, sizeof *br);
    if (!br) {
        uv_mutex_unlock(&reg_mu);
        return dp_err_set(err, DP_ENOMEM, "%s: out of memory", backend);
    }
    uv_mutex_init(&br->mu);
    atomic_init(&br->state, DP__CLOSED);
    atomic_init(&br->fails, 0);
    br->cfg = *cfg;
    /* With one failure enough, or no slow rule, a call need not time itself. */
    br->timed = cfg->failures > 1 && isfinite(cfg->slow);
    br->domain = domain;
    br->self = self;
    br->refs = 1;
    br->next = breakers;
    breakers = br;
    uv_mutex_unlock(&reg_mu);
    *out = br;
    return DP_OK;
}

void dp__breaker_drop(dp__breaker *br)
{
    if (!br)
        return;
    uv_mutex_lock(&reg_mu);
    int last = --br->refs == 0;
    if (last) {
        dp__breaker **pp = &breakers;
        while (*pp != br)
            pp = &(*pp)->next;
        *pp = br->next;
    }
    uv_mutex_unlock(&reg_mu);
    if (last) {
        while (br->kids) {
            dp__breaker *k = br->kids;
            br->kids = k->sib;
            uv_mutex_destroy(&k->mu);
            free(k->server);
            free(k);
        }
        uv_mutex_destroy(&br->mu);
        free(br);
    }
}

/* -- Per-server breakers ----------------------------------------------------- */

DP_API int dp_circuit_server(dp_circuit *br, const char *server, dp_circuit **out)
{
    *out = NULL;
    if (!br || br->cfg.failures <= 0)
        return DP_OK;
    uv_once(&once, init);
    uv_mutex_lock(&reg_mu);
    dp__breaker *k = br->kids;
    while (k && strcmp(k->server, server) != 0)
        k = k->sib;
    if (!k && (k = calloc(1, sizeof *k))) {
        if ((k->server = strdup(server))) {
            uv_mutex_init(&k->mu);
            atomic_init(&k->state, DP__CLOSED);
            atomic_init(&k->fails, 0);
            k->cfg = br->cfg;
            k->timed = br->timed;
            k->sib = br->kids;
            br->kids = k;
        } else {
            free(k);
            k = NULL;
        }
    }
    uv_mutex_unlock(&reg_mu);
    *out = k;
    return k ? DP_OK : DP_ENOMEM;
}

DP_API int dp_circuit_enter(dp_circuit *c, dp_circuit_guard *g, dp_err *err)
{
    return dp__breaker_enter(c, g, err);
}

DP_API int dp_circuit_leave(dp_circuit *c, const dp_circuit_guard *g, int rc, dp_err *err)
{
    return dp__breaker_leave(c, g, rc, err);
}

/* -- Calls ------------------------------------------------------------------ */

/* "06:24:04.123 UTC" of epoch seconds. */
static void clock_text(double t, char *out, size_t cap)
{
    time_t s = (time_t)t;
    struct tm tm;
    gmtime_r(&s, &tm);
    snprintf(out, cap, "%02d:%02d:%02d.%03d UTC", tm.tm_hour, tm.tm_min, tm.tm_sec,
             (int)((t - (double)s) * 1000));
}

/* The message of a refused call; under br->mu. */
static int refuse(dp__breaker *br, double now, dp_err *err)
{
    if (!err)
        return DP_EBACKEND;
    char since[40], why[64], next[64];
    clock_text(br->opened_wall, since, sizeof since);
    if (br->opened_after > 0)
        snprintf(why, sizeof why, "after %d failure%s", br->opened_after,
                 br->opened_after == 1 ? "" : "s");
    else
        snprintf(why, sizeof why, "after a failure that took %.2f s", br->opened_slow);
    if (atomic_load_explicit(&br->state, memory_order_relaxed) == DP__PROBING)
        snprintf(next, sizeof next, "a probe is in flight");
    else
        snprintf(next, sizeof next, "the next call probes in %.2f s",
                 br->opened_mono + br->cfg.cooldown - now);
    if (br->server)
        return dp_err_set(err, DP_EBACKEND, "circuit of %s open since %s (%s; %s): last "
                          "failure: %s", br->server, since, why, next, br->last);
    return dp_err_set(err, DP_EBACKEND, "circuit open since %s (%s; %s): last failure: %s",
                      since, why, next, br->last);
}

int dp__breaker_admit(dp__breaker *br, dp__guard *g, dp_err *err)
{
    uv_mutex_lock(&br->mu);
    int st = atomic_load_explicit(&br->state, memory_order_relaxed);
    double now = dp_clock_monotonic();
    if (st == DP__CLOSED) { /* closed since the caller looked */
        uv_mutex_unlock(&br->mu);
        return DP_OK;
    }
    /* One probe per cool-down: after the cool-down, or when the probe in
     * flight has been out that long (a lock wait, a lost thread). */
    if ((st == DP__OPEN && now - br->opened_mono >= br->cfg.cooldown) ||
        (st == DP__PROBING && now - br->probe_mono >= br->cfg.cooldown)) {
        atomic_store_explicit(&br->state, DP__PROBING, memory_order_release);
        br->probe_mono = now;
        br->probes++;
        uv_mutex_unlock(&br->mu);
        g->probe = 1;
        return DP_OK;
    }
    br->refused++;
    int rc = refuse(br, now, err);
    uv_mutex_unlock(&br->mu);
    return rc;
}

int dp__breaker_report(dp__breaker *br, const dp__guard *g, int rc, dp_err *err)
{
    uv_mutex_lock(&br->mu);
    double now = dp_clock_monotonic();
    int st = atomic_load_explicit(&br->state, memory_order_relaxed);
    if (rc != DP_EBACKEND && rc != DP_EPARTIAL) {
        /* The probe came back. A server that answered closes the circuit;
         * a call refused before any I/O (a bad key, a value too big, out
         * of memory) proves nothing: the next call probes. */
        if (g->probe && st == DP__PROBING) {
            int reached = rc != DP_EINVAL && rc != DP_ETOOBIG && rc != DP_ENOMEM;
            atomic_store_explicit(&br->fails, 0, memory_order_relaxed);
            if (reached) {
                br->opened_wall = 0;
                atomic_store_explicit(&br->state, DP__CLOSED, memory_order_release);
            } else {
                br->opened_mono = now - br->cfg.cooldown;
                atomic_store_explicit(&br->state, DP__OPEN, memory_order_release);
            }
        }
        uv_mutex_unlock(&br->mu);
        return rc;
    }
    snprintf(br->last, sizeof br->last, "%.199s", err && err->msg[0] ? err->msg : "backend failure");
    br->last_mono = now;
    if (g->probe && st == DP__PROBING) {
        br->reopened++;
        br->opened_mono = now;
        atomic_store_explicit(&br->state, DP__OPEN, memory_order_release);
    } else if (st == DP__CLOSED) {
        int n = atomic_fetch_add_explicit(&br->fails, 1, memory_order_relaxed) + 1;
        double took = br->timed ? dp__breaker_clock() - g->t0 : 0;
        int slow = br->timed && took >= br->cfg.slow;
        if (n >= br->cfg.failures || slow) {
            br->opened++;
            br->opened_after = slow && n < br->cfg.failures ? 0 : n;
            br->opened_slow = took;
            br->opened_mono = now;
            br->opened_wall = dp_clock_now();
            atomic_store_explicit(&br->fails, 0, memory_order_relaxed);
            atomic_store_explicit(&br->state, DP__OPEN, memory_order_release);
        }
    }
    /* Open already: a call that was in flight when it opened; its message
     * is the freshest, nothing else changes. */
    uv_mutex_unlock(&br->mu);
    return rc;
}

static void stats_one(dp__breaker *br, dp_circuit_stats *out)
{
    uv_mutex_lock(&br->mu);
    out->enabled = br->cfg.failures > 0;
    out->state = atomic_load_explicit(&br->state, memory_order_relaxed);
    out->failures = atomic_load_explicit(&br->fails, memory_order_relaxed);
    out->opened = (double)br->opened;
    out->reopened = (double)br->reopened;
    out->probes = (double)br->probes;
    out->refused = (double)br->refused;
    out->since = out->state == DP__CLOSED ? 0 : br->opened_wall;
    out->circuit_failures = (double)br->cfg.failures;
    out->circuit_cooldown = br->cfg.cooldown;
    out->circuit_slow = br->cfg.slow;
    snprintf(out->last_error, sizeof out->last_error, "%s", br->last);
    uv_mutex_unlock(&br->mu);
}

/* A store's breaker; with per-server ones, theirs summed up: open while any
 * is, since the earliest, the latest failure's message. */
void dp__breaker_stats(dp__breaker *br, dp_circuit_stats *out)
{
    stats_one(br, out);
    uv_mutex_lock(&reg_mu);
    double last_at = br->last[0] ? br->last_mono : -1;
    for (dp__breaker *k = br->kids; k; k = k->sib) {
        dp_circuit_stats one;
        stats_one(k, &one);
        if (one.state != DP__CLOSED && (out->state == DP__CLOSED || one.since < out->since))
            out->since = one.since;
        if (one.state > out->state)
            out->state = one.state;
        if (one.failures > out->failures)
            out->failures = one.failures;
        out->opened += one.opened;
        out->reopened += one.reopened;
        out->probes += one.probes;
        out->refused += one.refused;
        uv_mutex_lock(&k->mu);
        if (k->last[0] && k->last_mono > last_at) {
            last_at = k->last_mono;
            snprintf(out->last_error, sizeof out->last_error, "%s", k->last);
        }
        uv_mutex_unlock(&k->mu);
    }
    uv_mutex_unlock(&reg_mu);
}
