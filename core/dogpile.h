/*
 * dogpile.h -- the C core of dogpile for Lua.
 *
 * The core owns what must exist once per process however many Lua states load
 * the engine: the per-key lock registry and the clock. Lua reaches it through
 * the LuaJIT FFI (lua/dogpile/lib.lua declares every function below); a C host
 * may call it directly.
 *
 * Conventions (after LMDB): every function is named dp_<object>_<verb>, returns
 * an int status (DP_OK or a DP_E* code) unless it returns a plain value, and
 * writes results through out-parameters.
 *
 * @note Memory ownership. The core never keeps a pointer handed in by a caller:
 * keys are copied on entry, so the caller may free or reuse them as soon as the
 * call returns. Output buffers are owned by the caller, sized as each function
 * says. The core returns no memory that the caller must free. Strings returned
 * by dp_strerror() and dp_version() are static and live for the whole process.
 * Process-wide state is created on first use and lives until the process ends.
 */
#ifndef DOGPILE_H
#define DOGPILE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(DP_BUILDING) && defined(__GNUC__)
#define DP_API __attribute__((visibility("default")))
#else
#define DP_API
#endif

/* -- Status codes ------------------------------------------------------- */

#define DP_OK        0 /* done */
#define DP_EBUSY     1 /* the lock is held by someone else */
#define DP_ETIMEDOUT 2 /* the wait ended before the lock was free */
#define DP_EDEADLK   3 /* held by the same owner: a blocking wait never ends */
#define DP_ENOTHELD  4 /* released a lock that nobody holds */
#define DP_ENOMEM    5 /* out of memory */
#define DP_EINVAL    6 /* bad argument */

/** A static, human-readable text for a status code. */
DP_API const char *dp_strerror(int status);

/** The library version, "MAJOR.MINOR.PATCH". */
DP_API const char *dp_version(void);

/* -- Clock --------------------------------------------------------------- */

/** Wall-clock time in epoch seconds. Values are shared between processes and
 * machines, so created times are wall-clock, not monotonic. */
DP_API double dp_clock_now(void);

/** Wall-clock epoch seconds, strictly greater than any value this function
 * returned before in this process. Created times and invalidation times use
 * it so that "created before the invalidation" never ties. */
DP_API double dp_clock_stamp(void);

/** Monotonic seconds since an arbitrary point, for measuring durations. */
DP_API double dp_clock_monotonic(void);

/** Block the calling thread for `seconds` (no-op when <= 0). */
DP_API void dp_clock_sleep(double seconds);

/* -- The per-key lock registry ------------------------------------------
 *
 * A lock is a flag with waiters, named by (domain, key bytes); it is not owned
 * by a thread, so any thread may release it. A domain is a lock namespace:
 * regions over a state-local backend take an anonymous domain each, shared
 * backends take a named domain so that every Lua state of the process meets
 * the same locks. `owner` tags who took a lock (one tag per Lua state); it is
 * used to refuse a blocking wait that could never end and to release
 * everything a closing state still holds. Waiters sleep on a condition
 * variable and are woken by the release; nothing polls.
 */

/** A process-wide domain id for `name` (len bytes): the same name gives the
 * same id in every thread and Lua state. 0 on out of memory. */
DP_API uint32_t dp_lock_domain(const char *name, size_t len);

/** A fresh domain id, unique in the process. */
DP_API uint32_t dp_lock_domain_new(void);

/** A fresh owner tag, unique in the process and never 0. */
DP_API uint32_t dp_lock_owner_new(void);

/** Try once. DP_OK: acquired. DP_EBUSY: held. DP_ENOMEM. */
DP_API int dp_lock_try(uint32_t domain, const char *key, size_t len,
                       uint32_t owner);

/** Block until acquired, or for at most `timeout` seconds when timeout >= 0
 * (a negative timeout waits without limit). DP_OK: acquired. DP_ETIMEDOUT.
 * DP_EDEADLK: the lock is held under the same `owner` (another coroutine of
 * the same Lua state holds it, so blocking the thread would never end).
 * DP_ENOMEM. */
DP_API int dp_lock_wait(uint32_t domain, const char *key, size_t len,
                        uint32_t owner, double timeout);

/** Release; wakes the waiters. DP_OK, or DP_ENOTHELD. */
DP_API int dp_lock_release(uint32_t domain, const char *key, size_t len);

/** 1 if held, 0 if not. *owner (may be NULL) gets the holder's tag. */
DP_API int dp_lock_held(uint32_t domain, const char *key, size_t len,
                        uint32_t *owner);

/** Release every lock held under `owner`; returns how many. For a host that
 * closes a Lua state which may still hold locks. */
DP_API size_t dp_lock_release_owner(uint32_t owner);

/** How many locks are held or waited for right now, in all domains. */
DP_API size_t dp_lock_count(void);

/* -- SHA-1 --------------------------------------------------------------- */

/** SHA-1 of len bytes, as 40 lowercase hex digits plus a NUL in out[41]. */
DP_API void dp_sha1_hex(const void *data, size_t len, char out[41]);

/** SHA-1 of len bytes, 20 raw bytes in out. */
DP_API void dp_sha1(const void *data, size_t len, unsigned char out[20]);

#ifdef __cplusplus
}
#endif
#endif /* DOGPILE_H */
