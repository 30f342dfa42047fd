/* backend_lock.c -- the two-level lock of a shared backend.
 *
 * The core's per-key lock in the instance's domain orders the threads and Lua
 * states of this process (they sleep on a condition variable and wake at the
 * release); only the one that holds it asks the backend's own lock, which
 * orders the processes. A backend then sees at most one caller per key and
 * process, and a C host gets the same behaviour as a Lua state. Built only on
 * the public calls of lock.c and backend.c.
 *
 * Bounds: a blocking acquire waits `timeout` in all, both levels together;
 * past it the caller hears DP_ETIMEDOUT and decides (dogpile goes ahead:
 * a stuck holder must not block everyone forever).
 */
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "dogpile.h"
#include "private.h"

#define KEY(klen) (int)((klen) > 200 ? 200 : (klen))

static void err_clear(dp_err *err)
{
    if (err) {
        err->code = DP_OK;
        err->msg[0] = '\0';
    }
}

/* The seconds left of a wait that began with `timeout` at `start`: -1 for
 * no limit, else at least a hair above 0, so that the backend waits rather
 * than tries (0 means "try once" to it). 0 when the time is up. */
static double left_of(double timeout, double start)
{
    if (timeout < 0)
        return -1;
    double left = timeout - (dp_clock_monotonic() - start);
    return left > 0 ? left : 0;
}

/* Every message names the backend and the key, as the region's do. */
static int fail(dp_backend *b, int rc, const char *what, const char *key, size_t klen,
                dp_err *err)
{
    return dp_err_set(err, rc, "%s: %s the lock for key '%.*s'", dp__backend_name(b), what,
                      KEY(klen), key);
}

/* Both levels once; on DP_EBUSY nothing is held. */
static int try_both(dp_backend *b, uint32_t dom, const char *key, size_t klen, uint32_t owner,
                    dp_backend_hold *h, dp_err *err)
{
    int rc = dp_lock_try(dom, key, klen, owner);
    if (rc != DP_OK)
        return rc == DP_EBUSY ? rc : fail(b, rc, "out of memory taking", key, klen, err);
    h->core = 1;
    if (!dp_backend_has_lock(b))
        return DP_OK;
    rc = dp_backend_lock(b, key, klen, 0, err);
    if (rc == DP_OK) {
        h->proc = 1;
        h->since = dp_clock_monotonic();
        return DP_OK;
    }
    dp_lock_release(dom, key, klen);
    h->core = 0;
    return rc;
}

DP_API int dp_backend_acquire(dp_backend *b, const char *key, size_t klen, uint32_t owner,
                              double timeout, dp_backend_hold *h, dp_err *err)
{
    err_clear(err);
    uint32_t dom = dp_backend_lock_domain(b);
    if (!dom)
        return dp_err_set(err, DP_EINVAL, "%s has no lock domain (its instances are not "
                          "shared: the region's own lock applies)", dp__backend_name(b));
    if (h->core || h->proc)
        return fail(b, DP_EINVAL, "already holding through this hold", key, klen, err);
    h->overrun = 0;
    if (timeout == 0)
        return try_both(b, dom, key, klen, owner, h, err);
    double start = dp_clock_monotonic();
    int rc = dp_lock_wait(dom, key, klen, owner, timeout);
    if (rc == DP_EDEADLK)
        return fail(b, rc, "a blocking wait would never end: the same owner holds", key, klen,
                    err);
    if (rc == DP_ETIMEDOUT)
        return fail(b, rc, "timed out: this process still holds", key, klen, err);
    if (rc != DP_OK)
        return fail(b, rc, "out of memory taking", key, klen, err);
    h->core = 1;
    if (!dp_backend_has_lock(b))
        return DP_OK;
    double left = left_of(timeout, start);
    if (left == 0)
        return fail(b, DP_ETIMEDOUT, "timed out before the backend's level of", key, klen, err);
    rc = dp_backend_lock(b, key, klen, left, err);
    if (rc == DP_OK) {
        h->proc = 1;
        h->since = dp_clock_monotonic();
        return DP_OK;
    }
    if (rc == DP_ETIMEDOUT || rc == DP_EBUSY) /* the core level stays held: see the header */
        return fail(b, DP_ETIMEDOUT, "timed out: another process still holds", key, klen, err);
    dp_lock_release(dom, key, klen);
    h->core = 0;
    return rc;
}

DP_API int dp_backend_release(dp_backend *b, const char *key, size_t klen, dp_backend_hold *h,
                              dp_err *err)
{
    err_clear(err);
    if (!h->core && !h->proc)
        return fail(b, DP_ENOTHELD, "release: this hold holds nothing of", key, klen, err);
    int rc = DP_OK;
    if (h->proc) {
        h->proc = 0;
        rc = dp_backend_unlock(b, key, klen, err);
        double limit = dp_backend_lock_timeout(b);
        /* Held past lock_timeout, others may have gone ahead; a lock that
         * expires by itself may have been taken by someone else, which the
         * backend's unlock left alone. The value was made: not an error,
         * but the backend's reason stays in msg for the caller's log. */
        if (limit >= 0 && dp_clock_monotonic() - h->since > limit)
            h->overrun = 1;
        else if (rc == DP_ENOTHELD)
            h->overrun = 2;
        if (rc == DP_ENOTHELD) {
            rc = DP_OK;
            if (err)
                err->code = DP_OK;
        }
    }
    if (h->core) {
        h->core = 0;
        dp_lock_release(dp_backend_lock_domain(b), key, klen);
    }
    return rc;
}

DP_API int dp_backend_can_wait_released(dp_backend *b)
{
    return !dp_backend_has_lock(b) || dp_backend_has_wait_unlocked(b);
}

DP_API int dp_backend_wait_released(dp_backend *b, const char *key, size_t klen,
                                    uint32_t owner, double timeout, dp_err *err)
{
    err_clear(err);
    uint32_t dom = dp_backend_lock_domain(b);
    if (!dom)
        return dp_err_set(err, DP_EINVAL, "%s has no lock domain", dp__backend_name(b));
    if (!dp_backend_can_wait_released(b))
        return dp_err_set(err, DP_EINVAL, "%s cannot wait for its lock's release",
                          dp__backend_name(b));
    int own = dp_backend_has_lock(b);
    if (timeout == 0) {
        if (dp_lock_held(dom, key, klen, NULL))
            return DP_EBUSY;
        if (!own)
            return DP_OK;
        int rc = dp_backend_wait_unlocked(b, key, klen, 0, err);
        return rc == DP_ETIMEDOUT ? DP_EBUSY : rc;
    }
    double start = dp_clock_monotonic();
    int rc = dp_lock_wait_unlocked(dom, key, klen, owner, timeout);
    if (rc == DP_EDEADLK)
        return fail(b, rc, "a blocking wait would never end: the same owner holds", key, klen,
                    err);
    if (rc == DP_ETIMEDOUT)
        return fail(b, rc, "timed out: this process still holds", key, klen, err);
    if (rc != DP_OK)
        return fail(b, rc, "out of memory waiting for the release of", key, klen, err);
    if (!own)
        return DP_OK;
    /* Out of time: one last look, as a waiter that woke at the deadline. */
    rc = dp_backend_wait_unlocked(b, key, klen, left_of(timeout, start), err);
    if (rc == DP_EBUSY || rc == DP_ETIMEDOUT)
        return fail(b, DP_ETIMEDOUT, "timed out: another process still holds", key, klen, err);
    return rc;
}

DP_API void dp_lock_token(char out[33])
{
    unsigned char b[16];
    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) {
        /* Not expected; still unique enough per process and moment. */
        double t = dp_clock_now();
        pid_t pid = getpid();
        memset(b, 0, sizeof b);
        memcpy(b, &t, sizeof t);
        memcpy(b + 8, &pid, sizeof pid);
        b[15] = (unsigned char)rand();
    }
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hex[b[i] >> 4];
        out[2 * i + 1] = hex[b[i] & 15];
    }
    out[32] = '\0';
}
