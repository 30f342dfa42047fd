/* breaker.h -- the circuit breaker of a networked backend, private to the
 * core (backend.c's dispatchers and breaker.c). Not installed.
 *
 * One breaker per store a process talks to (the instance's lock domain: one
 * server, db and lock prefix), shared by every handle, Lua state and thread
 * of the process. Closed, a call costs one atomic load before the backend's
 * op and one after it; a failure counts under a mutex; open, a call is
 * refused under the mutex without touching the server. */
#ifndef DP_BREAKER_H
#define DP_BREAKER_H

#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <uv.h>

#include "dogpile.h"

enum { DP__CLOSED = DP_CIRCUIT_CLOSED, DP__OPEN = DP_CIRCUIT_OPEN,
       DP__PROBING = DP_CIRCUIT_PROBING };

/* The circuit_* arguments (a dp_arg_spec table in breaker.c). */
typedef struct dp__circuit_cfg {
    int64_t failures;  /* consecutive failures that open it; 0: no breaker */
    double cooldown;   /* seconds open before one probe */
    double slow;       /* a failure that took this long opens it at once */
} dp__circuit_cfg;

/* dp_circuit (dogpile.h) is this struct: a store's breaker, or one server's
 * (a child of the store's, for server_circuits backends). */
typedef struct dp_circuit {
    /* Hot: read by every call. */
    _Atomic int state;     /* DP__CLOSED, DP__OPEN, DP__PROBING */
    _Atomic int fails;     /* consecutive failures while closed */
    int timed;             /* 1 when a call must time itself (circuit_slow matters) */
    dp__circuit_cfg cfg;
    /* Cold: under mu. */
    uv_mutex_t mu;
    double opened_mono;    /* when it last (re)opened: the cool-down's start */
    double opened_wall;    /* when this outage began (epoch seconds) */
    double probe_mono;     /* when the probe in flight was let through */
    int opened_after;      /* failures counted when it opened (0: one slow failure) */
    double opened_slow;    /* that slow failure's seconds */
    uint64_t opened, reopened, probes, refused;
    char last[200];        /* the last failure's message */
    double last_mono;      /* when it was written */
    /* The registry's (breaker.c). */
    struct dp_circuit *next;
    uint32_t domain;
    void *self;
    int refs;
    /* Per-server breakers: a store's children (under the registry's
     * mutex), each with its server's name. */
    struct dp_circuit *kids, *sib;
    char *server;
} dp__breaker;

/* What a call that went through noted on the way in: t0,
 * dp__breaker_clock() at the start when br->timed; probe, 1 when this call
 * is the one probe of an open circuit. */
typedef dp_circuit_guard dp__guard;

/* 1 when `name` talks to a server, so that dp_backend_open accepts the
 * circuit_* arguments for it. */
int dp__circuit_networked(const char *name);

/* Split `args`: the circuit_* ones filled into *cfg (defaults for the
 * absent, checked, one message format), the others copied into *rest
 * (malloc'ed, free it; NULL and *nrest = nargs when there were none: use
 * `args` itself). DP_OK or an error in err. */
int dp__circuit_args(const char *backend, const dp_arg *args, size_t nargs,
                     dp__circuit_cfg *cfg, dp_arg **rest, size_t *nrest, dp_err *err);

/* Join the breaker of the store named by `domain` (or `self` when the
 * backend gives no domain), creating it with *cfg; refused (DP_EMISMATCH)
 * when it exists with other settings. *out holds one reference. */
int dp__breaker_join(const char *backend, uint32_t domain, void *self,
                     const dp__circuit_cfg *cfg, dp__breaker **out, dp_err *err);

/* Drop one reference (NULL is fine); the last frees it. */
void dp__breaker_drop(dp__breaker *br);

/* Forget the names given to dp_circuit_declare (dp_shutdown). */
void dp__circuit_shutdown(void);

/* Slow paths of the inline functions below. */
int dp__breaker_admit(dp__breaker *br, dp__guard *g, dp_err *err);
int dp__breaker_report(dp__breaker *br, const dp__guard *g, int rc, dp_err *err);

/* The stats of dp_backend_circuit. */
void dp__breaker_stats(dp__breaker *br, dp_circuit_stats *out);

/* Seconds on the coarse monotonic clock: a few ns (a vDSO read of a
 * word), ticking every few ms, enough to tell a timeout (circuit_slow,
 * 0.1 s) from an answer. */
static inline double dp__breaker_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Before the backend's op: DP_OK to go ahead, or DP_EBACKEND (the circuit
 * is open: err says since when and the last failure). */
static inline int dp__breaker_enter(dp__breaker *br, dp__guard *g, dp_err *err)
{
    g->probe = 0;
    g->t0 = br->timed ? dp__breaker_clock() : 0;
    if (atomic_load_explicit(&br->state, memory_order_acquire) == DP__CLOSED)
        return DP_OK;
    return dp__breaker_admit(br, g, err);
}

/* After it: counts `rc` and returns it. A success resets the consecutive
 * count with one relaxed load (and a store only when there was a count). */
static inline int dp__breaker_leave(dp__breaker *br, const dp__guard *g, int rc, dp_err *err)
{
    if (rc == DP_EBACKEND || rc == DP_EPARTIAL || g->probe)
        return dp__breaker_report(br, g, rc, err);
    if (atomic_load_explicit(&br->fails, memory_order_relaxed))
        atomic_store_explicit(&br->fails, 0, memory_order_relaxed);
    return rc;
}

#endif
