/* clock.c -- wall-clock, strictly increasing stamps, monotonic time. */
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "dogpile.h"

DP_API double dp_clock_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The coarse clock's tick, read once: a benign race, every thread reads the
 * same value. */
static _Atomic double coarse_tick = -1;

DP_API double dp_clock_margin(void)
{
    double tick = atomic_load_explicit(&coarse_tick, memory_order_relaxed);
    if (tick < 0) {
        struct timespec res;
        tick = clock_getres(CLOCK_REALTIME_COARSE, &res) == 0
                   ? (double)res.tv_sec + (double)res.tv_nsec * 1e-9
                   : 1.0;
        /* The coarse time is updated by the timer interrupt, which can run
         * late: a tick plus 0.2 ms on a quiet VM, but more than 10 ms on a
         * 2-vCPU VM at load 5 (spec/ffi_bindings_spec.lua caught it). So the
         * margin is two ticks and at least 50 ms: only values within it of
         * their expiry pay for the precise clock, which costs a hit nothing
         * elsewhere. */
        tick = 2 * tick > 0.05 ? 2 * tick : 0.05;
        atomic_store_explicit(&coarse_tick, tick, memory_order_relaxed);
    }
    return tick;
}

DP_API double dp_clock_upper(void)
{
    double tick = dp_clock_margin();
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + tick;
}

/* The last stamp handed out, as the bits of a double so that one CAS orders
 * every thread. A double near 1.7e9 has a resolution of about 240 ns, so two
 * calls close together would tie without the nextafter() step. */
static _Atomic uint64_t last_stamp;

DP_API double dp_clock_stamp(void)
{
    double now = dp_clock_now();
    uint64_t old = atomic_load_explicit(&last_stamp, memory_order_relaxed);
    for (;;) {
        double prev;
        memcpy(&prev, &old, sizeof prev);
        double next = now > prev ? now : nextafter(prev, INFINITY);
        uint64_t bits;
        memcpy(&bits, &next, sizeof bits);
        if (atomic_compare_exchange_weak_explicit(&last_stamp, &old, bits,
                                                  memory_order_relaxed,
                                                  memory_order_relaxed))
            return next;
    }
}

DP_API double dp_clock_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

DP_API void dp_clock_sleep(double seconds)
{
    if (!(seconds > 0))
        return;
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

DP_API const char *dp_strerror(int status)
{
    switch (status) {
    case DP_OK: return "ok";
    case DP_EBUSY: return "lock is held";
    case DP_ETIMEDOUT: return "timed out";
    case DP_EDEADLK: return "lock is held by the same owner; waiting would never end";
    case DP_ENOTHELD: return "lock is not held";
    case DP_ENOMEM: return "out of memory";
    case DP_EINVAL: return "invalid argument";
    case DP_EDECODE: return "not a valid encoding (truncated, corrupted or foreign bytes)";
    case DP_EDEPTH: return "tables nested too deeply";
    case DP_EVERSION: return "encoded by a newer codec format version";
    case DP_ENOTFOUND: return "not found";
    case DP_ETOOBIG: return "value larger than the backend's bound";
    case DP_EMISMATCH: return "a named instance exists with other settings";
    case DP_EBACKEND: return "backend failure";
    case DP_EPARTIAL: return "failed for some keys only";
    default: return "unknown status";
    }
}

DP_API const char *dp_version(void)
{
    return DP_VERSION;
}

/* -- Backoff ------------------------------------------------------------------ */

DP_API void dp_backoff_init(dp_backoff *bo, double timeout, double max_step)
{
    bo->step = DP_BACKOFF_FIRST;
    bo->max = max_step > 0 ? max_step : DP_BACKOFF_MAX;
    bo->unbounded = timeout < 0;
    bo->deadline = bo->unbounded ? 0 : dp_clock_monotonic() + timeout;
}

DP_API double dp_backoff_next(dp_backoff *bo)
{
    double step = bo->step < bo->max ? bo->step : bo->max;
    bo->step = step * DP_BACKOFF_GROWTH;
    if (bo->unbounded)
        return step;
    double left = bo->deadline - dp_clock_monotonic();
    if (left <= 0)
        return 0;
    return step < left ? step : left;
}

DP_API int dp_backoff_sleep(dp_backoff *bo)
{
    double step = dp_backoff_next(bo);
    if (step <= 0)
        return 0;
    dp_clock_sleep(step);
    return 1;
}
