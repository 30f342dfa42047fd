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
 * says. The only memory a caller must free is a dp_buf's, with dp_buf_free()
 * (see the value codec's @note). Strings returned
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
#define DP_EDECODE   7 /* bytes are not a valid encoding: truncated, corrupted or foreign */
#define DP_EDEPTH    8 /* tables nested deeper than DP_CODEC_MAX_DEPTH */
#define DP_EVERSION  9 /* encoded by a newer codec format version */
#define DP_ENOTFOUND 10 /* no value for the key (a miss, not a failure) */
#define DP_ETOOBIG  11 /* the value is larger than the backend's bound */
#define DP_EMISMATCH 12 /* a named instance exists with other settings */
#define DP_EBACKEND 13 /* the backend failed; dp_err.msg says how */

/** A static, human-readable text for a status code. */
DP_API const char *dp_strerror(int status);

/** The library version, "MAJOR.MINOR.PATCH". */
DP_API const char *dp_version(void);

/** The revision of this header's C interface, for a backend or host built
 * outside the tree. 2 added, all at the end of what existed: dp_backend_ops'
 * args, settings_size, identify, create and destroy (a table built against
 * revision 1 is shorter, so such a module must be recompiled, its source
 * unchanged); the declared arguments (dp_arg_spec, dp_args_*); the two-level
 * lock (dp_backend_acquire, dp_backend_release, dp_backend_wait_released,
 * dp_backend_lock_timeout); dp_backoff. Nothing was removed or changed in
 * meaning. 3 added DP_SPEC_DOMAIN (a lock domain named by some arguments)
 * and dp_backend_hold.overrun's value 2 (a lock lost before lock_timeout,
 * the backend's reason in err). 4 added DP_EPARTIAL (a multi form that
 * failed for some keys only), dp_backend_ops.server_circuits at the end
 * of the table and the per-server breakers (dp_circuit_server,
 * dp_circuit_enter, dp_circuit_leave). */
#define DP_HEADER_REVISION 4

/* -- Clock --------------------------------------------------------------- */

/** Wall-clock time in epoch seconds. Values are shared between processes and
 * machines, so created times are wall-clock, not monotonic. */
DP_API double dp_clock_now(void);

/** An upper bound of dp_clock_now(), from the coarse clock plus a margin:
 * several times cheaper. A hit that is fresh by this bound is fresh; only one
 * near its expiry needs dp_clock_now(). */
DP_API double dp_clock_upper(void);
/** What dp_clock_upper() adds to CLOCK_REALTIME_COARSE (seconds), for a
 * caller that reads the coarse clock itself. */
DP_API double dp_clock_margin(void);

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

/** Wait, without taking it, until the lock is released by whoever holds it
 * at the call: for a caller that only wants to read what the holder made.
 * DP_OK at once when the lock is free; DP_OK once the holder released it,
 * even if another caller took it again before this one woke up (the wait
 * does not follow later holders). DP_ETIMEDOUT: still held after `timeout`
 * seconds (timeout 0: check once; a negative timeout waits without limit).
 * DP_EDEADLK: the lock is held under the same `owner` (as dp_lock_wait).
 * The caller owns nothing afterwards, whatever the result: there is nothing
 * to release. */
DP_API int dp_lock_wait_unlocked(uint32_t domain, const char *key, size_t len,
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

/** Free the process-wide registries (named lock domains, registered C
 * backends, lock tables), for a leak checker at the end of a host's life.
 * Call it only once every Lua state is closed and no thread uses the core. */
DP_API void dp_shutdown(void);

/* -- SHA-1 --------------------------------------------------------------- */

/** SHA-1 of len bytes, as 40 lowercase hex digits plus a NUL in out[41]. */
DP_API void dp_sha1_hex(const void *data, size_t len, char out[41]);

/** SHA-1 of len bytes, 20 raw bytes in out. */
DP_API void dp_sha1(const void *data, size_t len, unsigned char out[20]);

/* -- Value codec ---------------------------------------------------------
 *
 * The default serializer for backends that store bytes. It encodes nil,
 * booleans, numbers (every double exactly: -0.0, infinities, NaN with its
 * payload), strings of any bytes, and tables: an array part of narr items,
 * then nhash key/value pairs whose keys are any of these except nil and NaN.
 * The byte format is described at the top of core/codec.c.
 *
 * Writing: a dp_buf collects one encoded value, put item by item in reading
 * order: the root item; after a table item, its narr array items, then its
 * nhash keys and values alternately, recursively. The buffer checks the shape
 * as it goes (no nil or NaN key, at most DP_CODEC_MAX_DEPTH nested tables,
 * nothing after the root value) and dp_buf_finish() says whether the value is
 * complete.
 *
 * Reading: a dp_reader returns the items of an encoding in the same order and
 * trusts nothing. Every length is checked against what remains; nesting is
 * limited to DP_CODEC_MAX_DEPTH; a table may declare only as many items as
 * the remaining input could hold, together with those still owed to the
 * enclosing tables, so a caller that preallocates narr and nhash slots for
 * every table never allocates more slots in all than the input has bytes.
 *
 * Errors (after hiredis): the dp_buf or dp_reader keeps the first error in
 * `err` (a DP_E* status; 0 while none) and a text naming what was wrong and
 * where in `errstr`. Errors are sticky: once set, every call returns `err`
 * and does nothing, until dp_buf_reset() or dp_reader_init().
 *
 * Status codes: DP_OK; DP_ENOMEM (the allocator failed); DP_EINVAL (a put or
 * next that does not fit the value's shape, or a nil or NaN key put);
 * DP_EDEPTH (a table nested deeper than DP_CODEC_MAX_DEPTH); DP_EDECODE
 * (truncated, corrupted or foreign bytes); DP_EVERSION (bytes written by a
 * newer format version).
 *
 * @note Memory ownership. A dp_buf owns `data`: it is allocated through the
 * buffer's allocator and stays valid until the next put, dp_buf_reset() or
 * dp_buf_free(); dp_buf_free() releases it and may be called again, or on a
 * buffer that never allocated. Strings given to dp_buf_put_string() are
 * copied. A dp_reader owns nothing: it borrows the input, which must stay
 * unchanged while the reader and the items it returned are in use; a string
 * item points into that input and is not NUL-terminated. Neither object holds
 * process-wide state; each must be used by one thread at a time.
 */

/** Nested tables allowed in a value: the root table is level 1. */
#define DP_CODEC_MAX_DEPTH 200

/** The format version written by this library (the second byte of every
 * encoding); readers refuse a higher one with DP_EVERSION. */
#define DP_CODEC_VERSION 1

/** An allocator with lua_Alloc's contract, so that a Lua state's own
 * allocator (lua_getallocf) can be passed as is: resize `ptr` of `osize`
 * bytes (NULL and 0 for a new block) to `nsize` bytes and return it, or NULL
 * on failure leaving `ptr` untouched; with nsize 0, free `ptr` and return
 * NULL. */
typedef void *(*dp_alloc_fn)(void *ud, void *ptr, size_t osize, size_t nsize);

/** An output buffer that collects one encoded value. */
typedef struct dp_buf {
    unsigned char *data;  /* out: the encoding so far (NULL until the first put) */
    size_t len;           /* out: bytes in data */
    int done;             /* out: 1 once the root value is complete */
    int err;              /* out: DP_OK, or the first error (sticky) */
    char errstr[128];     /* out: what went wrong, "" while err is DP_OK */
    /* private */
    size_t cap;
    dp_alloc_fn alloc;
    void *ud;
    int depth;
    uint64_t left[DP_CODEC_MAX_DEPTH];  /* items still owed to each open table */
    uint64_t keyed[DP_CODEC_MAX_DEPTH]; /* 2 * nhash of each open table */
} dp_buf;

/** Types of dp_item. */
#define DP_TNIL     0
#define DP_TBOOLEAN 1
#define DP_TNUMBER  2
#define DP_TSTRING  3
#define DP_TTABLE   4

/** One item read by dp_reader_next(). */
typedef struct dp_item {
    int type;        /* DP_T* */
    int boolean;     /* DP_TBOOLEAN: 0 or 1 */
    double number;   /* DP_TNUMBER */
    const char *str; /* DP_TSTRING: len bytes inside the reader's input */
    size_t len;      /* DP_TSTRING */
    size_t narr;     /* DP_TTABLE: array items that follow (keys 1..narr) */
    size_t nhash;    /* DP_TTABLE: key/value pairs that follow them */
    int key;         /* 1 when the item is a key of the enclosing table */
} dp_item;

/** A reader of one encoded value. */
typedef struct dp_reader {
    size_t pos;           /* out: offset of the next byte to read */
    int done;             /* out: 1 once the root value has been read */
    int err;              /* out: DP_OK, or the first error (sticky) */
    char errstr[128];     /* out: what was wrong and at which offset */
    /* private */
    const unsigned char *data;
    size_t len;
    int depth;
    uint64_t pending;     /* items owed to all open tables */
    uint64_t left[DP_CODEC_MAX_DEPTH];
    uint64_t keyed[DP_CODEC_MAX_DEPTH];
} dp_reader;

/** Prepare `b` (out) as an empty buffer that allocates through
 * alloc(ud, ...); alloc NULL means realloc() and free(). Allocates nothing:
 * the buffer's memory is one block, grown as items are put. */
DP_API void dp_buf_init(dp_buf *b, dp_alloc_fn alloc, void *ud);

/** Empty `b` (in/out) to encode another value, keeping its memory, and
 * clear its error. */
DP_API void dp_buf_reset(dp_buf *b);

/** Release the memory of `b` (in/out) and leave it empty, as after
 * dp_buf_init() with the same allocator. */
DP_API void dp_buf_free(dp_buf *b);

/** Append one item to `b` (in/out). The first put also writes the format
 * header. DP_OK, DP_ENOMEM, DP_EINVAL (the value is already complete; a nil
 * or NaN key), DP_EDEPTH (dp_buf_put_table only, at DP_CODEC_MAX_DEPTH). */
DP_API int dp_buf_put_nil(dp_buf *b);
DP_API int dp_buf_put_boolean(dp_buf *b, int value);
DP_API int dp_buf_put_number(dp_buf *b, double value);
DP_API int dp_buf_put_string(dp_buf *b, const void *s, size_t len);
DP_API int dp_buf_put_table(dp_buf *b, size_t narr, size_t nhash);

/** DP_OK when `b` (in) holds one complete value; DP_EINVAL (with errstr)
 * when items are missing; `err` when an earlier call failed. */
DP_API int dp_buf_finish(dp_buf *b);

/** Start reading the `len` bytes at `data` (in, borrowed) with `r` (out):
 * checks the format header. DP_OK, DP_EDECODE, DP_EVERSION. */
DP_API int dp_reader_init(dp_reader *r, const void *data, size_t len);

/** Read the next item of `r` (in/out) into `item` (out). DP_OK, DP_EDECODE,
 * DP_EDEPTH, DP_EINVAL (the value was read completely already). */
DP_API int dp_reader_next(dp_reader *r, dp_item *item);

/** DP_OK when `r` (in/out) has read one complete value and no bytes are left
 * after it; DP_EDECODE otherwise (missing items or trailing bytes). */
DP_API int dp_reader_finish(dp_reader *r);


/** A circuit breaker (see "Circuit breaker" below). */
typedef struct dp_circuit dp_circuit;

/* -- Backends --------------------------------------------------------------
 *
 * A C backend stores bytes (the region's serialized envelope) under byte
 * keys. It fills one `const dp_backend_ops` table and registers it by name;
 * Lua opens it with arguments from the region's configuration and calls it
 * through dp_backend_get/set/delete, which the FFI binds for the hot path.
 *
 * @note Memory ownership. dp_backend_register() keeps the `ops` pointer and
 * `ud` for the life of the process: both must outlive every instance (a
 * static table is the usual choice; the shared object that holds `ops` is
 * pinned, so a Lua C module that registers it is never unloaded). Arguments (dp_arg names and strings) are
 * borrowed for the duration of open() only. A backend that declares its
 * arguments (ops->args) never sees them: the core fills a settings struct
 * that it owns, hands it to create() and keeps it, unchanged, until after
 * destroy() returns, so an instance may point into it. Keys and values handed to get,
 * set and delete are borrowed for the call. A dp_bytes is owned by the caller:
 * get() writes the value into it, growing `data` with realloc(), and the
 * caller releases it with dp_bytes_free(). An instance from dp_backend_open()
 * is owned by the caller until dp_backend_close(), which must be called once.
 */

/** Errors come back in a caller-owned dp_err, so threads sharing an instance
 * never share an error buffer. */
typedef struct dp_err {
    int code;       /* out: the status, as returned */
    char msg[1024]; /* out: what failed, "" on success; room for a backend's list of known arguments */
} dp_err;

/** A growable byte buffer, owned by the caller (see @note). */
typedef struct dp_bytes {
    char *data;
    size_t len;
    size_t cap;
} dp_bytes;

#define DP_ARG_BOOLEAN 1
#define DP_ARG_NUMBER  2
#define DP_ARG_STRING  3

/** One configuration argument, `arguments.<name>` of the region. */
typedef struct dp_arg {
    const char *name;
    int type;            /* DP_ARG_* */
    double number;       /* DP_ARG_NUMBER; DP_ARG_BOOLEAN: 0 or 1 */
    const char *string;  /* DP_ARG_STRING */
    size_t len;          /* DP_ARG_STRING */
} dp_arg;

/* -- Declared arguments -----------------------------------------------------
 *
 * A backend lists what it accepts in one table of dp_arg_spec, ended by an
 * entry whose name is NULL; dp_args_fill() reads a region's arguments into
 * the backend's settings struct by that table: defaults first, then each
 * argument checked against its kind and bounds, with one message format for
 * every backend ("dogpile.cache.X: max_items must be a positive integer, got
 * string \"10\""). Unknown names are refused with the list of known ones.
 * Arguments are applied in table order, whatever order they came in, so a
 * DP_SPEC_CUSTOM entry listed first (a url) may set fields that later
 * entries (host, port) override.
 *
 * Each kind writes one C type at `offset` in the settings struct:
 *   DP_SPEC_INT      int64_t   a number without fraction, min <= v (<= max)
 *   DP_SPEC_SECONDS  double    a number of seconds, fractions allowed
 *   DP_SPEC_SIZE     int64_t   bytes: a number, or a string "64k", "10m", "1g"
 *                              (powers of 1024; rounded down to whole bytes)
 *   DP_SPEC_BOOL     int       a boolean: 0 or 1
 *   DP_SPEC_STR      char *    a string of min..max bytes (no NUL byte),
 *                              copied with malloc(); NULL when absent and
 *                              without default
 *   DP_SPEC_BYTES    dp_str    the same, any bytes (a NUL too); data is
 *                              NUL-terminated after its len bytes
 *   DP_SPEC_ENUM     int       one of `choices` (a NULL-ended list of
 *                              names): its index
 *   DP_SPEC_CUSTOM   -         parse(settings, arg, err) does it all (a url
 *                              that sets several fields); clear(settings)
 *                              undoes it for dp_args_free()
 * Bounds: min (exclusive with DP_SPEC_ABOVE_MIN) and max; max 0 means no
 * upper bound. NaN is always refused; infinity (math.huge) only with
 * DP_SPEC_INFINITE, for DP_SPEC_SECONDS. Defaults (`def`, or `def_str` for
 * strings) are the backend's choice and are not checked against the bounds.
 */

#define DP_SPEC_INT     1
#define DP_SPEC_SECONDS 2
#define DP_SPEC_SIZE    3
#define DP_SPEC_BOOL    4
#define DP_SPEC_STR     5
#define DP_SPEC_ENUM    6
#define DP_SPEC_CUSTOM  7
#define DP_SPEC_BYTES   8

/** A DP_SPEC_BYTES value: len bytes at data, then a NUL. */
typedef struct dp_str {
    char *data;
    size_t len;
} dp_str;

/* Flags of a dp_arg_spec. */
#define DP_SPEC_REQUIRED     0x01 /* refused when absent */
#define DP_SPEC_ABOVE_MIN    0x02 /* v > min rather than v >= min */
#define DP_SPEC_INFINITE     0x04 /* DP_SPEC_SECONDS: math.huge accepted (no limit) */
#define DP_SPEC_KEY          0x08 /* names the shared instance: opens with other
                                   * values get instances of their own */
#define DP_SPEC_HANDLE       0x10 /* belongs to the handle, not the instance:
                                   * handles of one instance may differ */
#define DP_SPEC_LOCK_TIMEOUT 0x20 /* DP_SPEC_SECONDS: the handle's lock_timeout,
                                   * which bounds dp_backend_acquire's waits */
#define DP_SPEC_DOMAIN       0x40 /* with DP_SPEC_KEY: names the lock domain (and
                                   * the circuit breaker). With any such entry,
                                   * instances whose DOMAIN values agree share
                                   * one domain, whatever their other KEY
                                   * values (a server's address, not its
                                   * timeouts): their threads meet at the
                                   * core's lock. Without, the identity does */

typedef struct dp_arg_spec {
    const char *name;             /* the argument's name; NULL ends the table */
    int kind;                     /* DP_SPEC_* */
    unsigned flags;               /* DP_SPEC_REQUIRED | ... */
    double min, max;              /* bounds (strings: of the length) */
    double def;                   /* default of the kinds that are not strings */
    const char *def_str;          /* DP_SPEC_STR, DP_SPEC_BYTES: default (NULL: none) */
    const char *const *choices;   /* DP_SPEC_ENUM: names, then NULL */
    const char *what;             /* what it "must be", when the text the
                                   * core writes from the kind and bounds
                                   * does not say it well (NULL: generated) */
    size_t offset;                /* offsetof(settings struct, field) */
    /* DP_SPEC_CUSTOM: DP_OK, or an error in err (the core prefixes nothing:
     * write "<backend>: <name> ..." yourself). */
    int (*parse)(void *settings, const dp_arg *arg, dp_err *err);
    /* DP_SPEC_CUSTOM, optional: free what parse() allocated. */
    void (*clear)(void *settings);
} dp_arg_spec;

/** Fill `settings` (out; the struct the table describes) from `args` (in,
 * borrowed), as the table `spec` (in) says; `backend` (the registered name)
 * prefixes every message. DP_OK, or DP_EINVAL with the message in err, or
 * DP_ENOMEM. On failure nothing is left to free; on success free it with
 * dp_args_free(). */
DP_API int dp_args_fill(const char *backend, const dp_arg_spec *spec, const dp_arg *args,
                        size_t nargs, void *settings, dp_err *err);

/** Free what dp_args_fill() allocated in `settings` (its strings, and what
 * DP_SPEC_CUSTOM entries' clear() frees), and set those fields to NULL. */
DP_API void dp_args_free(const dp_arg_spec *spec, void *settings);

/** The first entry of `spec` whose field differs between the settings `a`
 * and `b`, among entries that are neither DP_SPEC_KEY, DP_SPEC_HANDLE nor
 * DP_SPEC_CUSTOM, or NULL when they agree. With `out` (may be NULL), writes
 * "max_items 3, not 5" (a's value, then b's) in at most `cap` bytes. */
DP_API const dp_arg_spec *dp_args_diff(const dp_arg_spec *spec, const void *a, const void *b,
                                       char *out, size_t cap);

/** What a backend reports; fields it does not track stay 0. */
typedef struct dp_backend_stats {
    double items, bytes, max_items, max_bytes;
    double hits, misses, evictions, expirations;
} dp_backend_stats;

typedef struct dp_backend_ops {
    const char *name;  /* the registered name, e.g. "dogpile.cache.shared_memory" */
    /* Make or join an instance. DP_OK with *self set, or an error in err. */
    int (*open)(void *ud, const dp_arg *args, size_t nargs, void **self, dp_err *err);
    /* DP_OK with the value in out, DP_ENOTFOUND on a miss, or an error. */
    int (*get)(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err);
    int (*set)(void *self, const char *key, size_t klen, const char *value, size_t vlen,
               dp_err *err);
    /* DP_OK whether or not the key was there. */
    int (*del)(void *self, const char *key, size_t klen, dp_err *err);
    /* Optional (NULL): fill *out. */
    void (*stats)(void *self, dp_backend_stats *out);
    /* Optional (NULL): a process-wide lock domain shared by every handle on
     * the same instance, so regions in any Lua state or thread meet one lock
     * per key. 0: use the region's own lock. */
    uint32_t (*lock_domain)(void *self);
    /* Leave the instance; the backend frees it when the last handle leaves. */
    void (*close)(void *self);
    /* 1 when get/set/del can only fail on out-of-memory or a too-big value
     * (in-process backends): the region then calls them without pcall. */
    int infallible;
    /* Optional (NULL: the backend has no lock of its own): a lock per key
     * between processes, for backends shared beyond one process (a file, a
     * server). The core's registry orders the threads of one process first
     * (dp_lock_* in lock_domain()), so a backend sees at most one caller per
     * key and process at a time. timeout 0: try once; > 0: wait at most that
     * many seconds; < 0: wait without limit. DP_OK: acquired. DP_EBUSY:
     * held elsewhere (timeout 0). DP_ETIMEDOUT: still held when the timeout
     * ended. Any other code is a failure described in err. */
    int (*lock)(void *self, const char *key, size_t klen, double timeout, dp_err *err);
    /* Release what lock() took for `key`, from any thread of the process.
     * DP_OK, DP_ENOTHELD, or a failure in err. Both or neither of lock and
     * unlock are set. */
    int (*unlock)(void *self, const char *key, size_t klen, dp_err *err);
    /* Optional (NULL: the core loops over get, set and del): the multi forms,
     * each one round trip for a server backend. n keys, keys[i] of klens[i]
     * bytes. get_multi appends every value found to `out` (emptied first) and
     * sets vlens[i] to its length, or to -1 for a miss; values lie in `out`
     * in key order. DP_OK, or a failure in err (then nothing is reported),
     * or DP_EPARTIAL (see there): some keys failed (their server did), the
     * others were done; get_multi then marks each failed key DP_VLEN_FAILED
     * in vlens and reports the others as on success. */
    int (*get_multi)(void *self, size_t n, const char *const *keys, const size_t *klens,
                     dp_bytes *out, int64_t *vlens, dp_err *err);
    int (*set_multi)(void *self, size_t n, const char *const *keys, const size_t *klens,
                     const char *const *values, const size_t *vlens, dp_err *err);
    int (*del_multi)(void *self, size_t n, const char *const *keys, const size_t *klens,
                     dp_err *err);
    /* Optional (NULL: waiters take the lock in turn to read the new value):
     * wait, without taking it, until the lock() of `key` is released by the
     * process that holds it at the call, so that every waiter can read the
     * new value at once. Set only with lock and unlock (registration refuses
     * it otherwise). DP_OK: free at
     * the call, or released since (a later holder is not waited for).
     * timeout 0: check once, DP_EBUSY when held; > 0: DP_ETIMEDOUT when still
     * held after that many seconds; < 0: wait without limit. Any other code
     * is a failure described in err. Nothing is held afterwards. The core's
     * registry orders the threads of one process first, as for lock. */
    int (*wait_unlocked)(void *self, const char *key, size_t klen, double timeout,
                         dp_err *err);

    /* -- Header revision 2: instances the core makes, shares and frees ---
     * Set args, settings_size, create and destroy instead of open, close
     * and lock_domain. dp_backend_open() then fills a settings struct of
     * settings_size bytes from the region's arguments by the table `args`
     * (see dp_args_fill), and looks the instance up by its identity: the
     * backend's name and identify()'s bytes, or by default the values of
     * the DP_SPEC_KEY entries. Found: the handle joins it (refused with
     * DP_EMISMATCH when another argument differs, except DP_SPEC_HANDLE
     * ones: "'x' is already open with max_items 3, not 5"). Not found:
     * create() makes it, without any lock held, while other opens of the
     * same identity wait. The last close calls destroy(); meanwhile an open
     * of the same identity waits until it is gone, so that two instances of
     * one identity never exist at once (LMDB forbids it). Each instance gets
     * the process-wide lock domain named "<ops->name>:<identity>", where
     * the identity is identify()'s bytes, or the one DP_SPEC_KEY value's
     * bytes as given (a C host can name it with dp_lock_domain), or with
     * several, each as "<decimal length>:<bytes>", one after another; with
     * DP_SPEC_DOMAIN entries, their values instead, written the same way. */
    const dp_arg_spec *args;
    size_t settings_size;
    /* Optional (NULL: the DP_SPEC_KEY values): the identity's bytes in
     * `id` (appended; the core empties it first), for an identity computed
     * from the settings (a resolved path). DP_OK or an error in err. */
    int (*identify)(void *ud, const void *settings, dp_bytes *id, dp_err *err);
    /* Make the instance from `settings` (borrowed until destroy() returns).
     * DP_OK with *self set, or an error in err. */
    int (*create)(void *ud, const void *settings, void **self, dp_err *err);
    /* Free the instance: no handle is left and no call is running. */
    void (*destroy)(void *self);

    /* -- Header revision 4 ----------------------------------------------
     * Optional (NULL: the store's one breaker guards every call), for an
     * instance that talks to several servers each serving part of the keys
     * (a cluster's masters), where one breaker for all would let one dead
     * server refuse the keys of the live ones. The core then guards none of
     * its calls; it hands the store's breaker to the instance instead, after
     * create() and at every open that joins it (the same pointer each time;
     * it outlives the instance), and the backend guards each server's I/O
     * with that server's own (dp_circuit_server, dp_circuit_enter,
     * dp_circuit_leave). dp_backend_circuit() sums them up. */
    void (*server_circuits)(void *self, dp_circuit *store);
} dp_backend_ops;

/** What a multi form returns when it failed for some keys only (the keys of
 * a server that is down) and did the others: get_multi marks the failed
 * keys' vlens DP_VLEN_FAILED; err names the server and counts the keys.
 * Returned only by backends whose multi forms say so (DP_EBACKEND means the
 * whole call failed and nothing is reported). */
#define DP_EPARTIAL 14
#define DP_VLEN_FAILED (-2)

typedef struct dp_backend dp_backend;

/** Register `ops` (in, kept) with `ud` (in, kept) under ops->name; a second
 * registration of the same name replaces the first for later opens (the same
 * ops and ud again: nothing changes). Required: name, get, set, del, and
 * either open and close, or args, create and destroy (not both pairs).
 * DP_OK, DP_EINVAL (no name or a missing required operation), DP_ENOMEM. */
DP_API int dp_backend_register(const dp_backend_ops *ops, void *ud);

/** The ops registered as `name`, or NULL. */
DP_API const dp_backend_ops *dp_backend_find(const char *name);

/** Open an instance of the backend registered as `name`. */
DP_API int dp_backend_open(const char *name, const dp_arg *args, size_t nargs,
                           dp_backend **out, dp_err *err);
DP_API int dp_backend_get(dp_backend *b, const char *key, size_t klen, dp_bytes *out,
                          dp_err *err);
DP_API int dp_backend_set(dp_backend *b, const char *key, size_t klen, const char *value,
                          size_t vlen, dp_err *err);
DP_API int dp_backend_delete(dp_backend *b, const char *key, size_t klen, dp_err *err);
DP_API void dp_backend_stat(dp_backend *b, dp_backend_stats *out);
DP_API uint32_t dp_backend_lock_domain(dp_backend *b);
DP_API int dp_backend_infallible(dp_backend *b);
/** 1 when the backend has a lock of its own (ops->lock), else 0. */
DP_API int dp_backend_has_lock(dp_backend *b);
/** The backend's lock for `key` (see dp_backend_ops.lock for `timeout` and
 * the codes). DP_EINVAL (with err) when the backend has no lock. */
DP_API int dp_backend_lock(dp_backend *b, const char *key, size_t klen, double timeout,
                           dp_err *err);
/** Release the backend's lock for `key`. DP_OK, DP_ENOTHELD, DP_EINVAL (no
 * lock), or a failure in err. */
DP_API int dp_backend_unlock(dp_backend *b, const char *key, size_t klen, dp_err *err);
/** 1 when the backend can wait for its lock's release (ops->wait_unlocked). */
DP_API int dp_backend_has_wait_unlocked(dp_backend *b);
/** Wait until the backend's lock for `key` is released by its holder, without
 * taking it (see dp_backend_ops.wait_unlocked for `timeout` and the codes).
 * DP_EINVAL (with err) when the backend has no wait_unlocked. */
DP_API int dp_backend_wait_unlocked(dp_backend *b, const char *key, size_t klen,
                                    double timeout, dp_err *err);
/** The multi forms (see dp_backend_ops.get_multi): one call of the backend's
 * own when it has them, otherwise a loop over the single operations that
 * stops at the first failure. */
DP_API int dp_backend_get_multi(dp_backend *b, size_t n, const char *const *keys,
                                const size_t *klens, dp_bytes *out, int64_t *vlens,
                                dp_err *err);
DP_API int dp_backend_set_multi(dp_backend *b, size_t n, const char *const *keys,
                                const size_t *klens, const char *const *values,
                                const size_t *vlens, dp_err *err);
DP_API int dp_backend_delete_multi(dp_backend *b, size_t n, const char *const *keys,
                                   const size_t *klens, dp_err *err);
/** Close the handle (NULL is fine); the pointer is invalid afterwards. */
DP_API void dp_backend_close(dp_backend *b);

/* -- Circuit breaker ---------------------------------------------------------
 *
 * A backend that talks to a server (dogpile.cache.redis, redis_sentinel,
 * redis_cluster, memcached, and any name given to dp_circuit_declare) gets a circuit
 * breaker per store in the process: one per lock domain (server, db, lock
 * prefix), shared by every handle, Lua state and thread. dp_backend_open
 * takes its arguments out before the backend sees them:
 *   circuit_failures  integer >= 0, default 20: consecutive failures that
 *                     open it; 0: no breaker
 *   circuit_cooldown  seconds > 0, default 1: how long it stays open
 *   circuit_slow      seconds >= 0 (math.huge: never), default 0.1: a
 *                     failure that took at least this long (a timeout)
 *                     opens it at once
 * A failure is DP_EBACKEND (or DP_EPARTIAL) from any dispatcher below (get,
 * set, delete, the multi forms, lock, unlock, wait_unlocked, and so the
 * two-level lock);
 * a miss, DP_EBUSY, DP_ETIMEDOUT of a lock wait, DP_ETOOBIG and DP_EINVAL
 * are not. Open, every call returns DP_EBACKEND at once, without touching
 * the server, err saying since when and the last failure. After the
 * cool-down one call (one thread) goes through as the probe: a call that
 * reaches the server and does not fail closes it, a failure reopens it for
 * another cool-down, anything else (a bad key) leaves the next call to
 * probe; a probe not back within a cool-down lets one more through. Every
 * handle on a store must agree on the three arguments (DP_EMISMATCH). A
 * backend with server_circuits has one breaker per server instead (see
 * dp_circuit_server): dp_backend_circuit then reports them together, open
 * while any server's is (`since` the earliest, counts summed, `failures` the
 * highest, last_error the latest). */

#define DP_CIRCUIT_CLOSED  0
#define DP_CIRCUIT_OPEN    1
#define DP_CIRCUIT_PROBING 2 /* open, its probe in flight */

/** What dp_backend_circuit reports (counts as doubles, for Lua). */
typedef struct dp_circuit_stats {
    int enabled;         /* 0: no breaker (not networked, or circuit_failures 0) */
    int state;           /* DP_CIRCUIT_* */
    double failures;     /* consecutive failures counted, while closed */
    double opened;       /* times it opened from closed */
    double reopened;     /* probes that failed */
    double probes;       /* calls let through as probes */
    double refused;      /* calls refused while open */
    double since;        /* epoch seconds this outage began; 0 when closed */
    double circuit_failures, circuit_cooldown, circuit_slow; /* the settings */
    char last_error[200]; /* the last failure's message ("" before any) */
} dp_circuit_stats;

/** Fill `out` with the breaker of `b`'s store (zeroed when it has none). */
DP_API void dp_backend_circuit(dp_backend *b, dp_circuit_stats *out);

/** Say that the backend registered (or to be registered) as `name` talks
 * to a server: its opens accept the circuit_* arguments and get a breaker.
 * DP_OK, DP_EINVAL (no name), DP_ENOMEM. */
DP_API int dp_circuit_declare(const char *name);

/* Per-server breakers (dp_backend_ops.server_circuits): each server of a
 * store gets a breaker of its own with the store's circuit_* settings, kept
 * with the store's breaker (freed with it, after the instance), so the same
 * server keeps its state across the handles and instances of the store.
 * The backend calls dp_circuit_enter() before a server's I/O and
 * dp_circuit_leave() after it with DP_EBACKEND when that server failed
 * (else DP_OK): the same rules as the store's breaker, per server. */

/** What dp_circuit_enter() noted, for dp_circuit_leave(); the caller's. */
typedef struct dp_circuit_guard {
    double t0;
    int probe;
} dp_circuit_guard;

/** The breaker of `server` (a name for messages, such as "host:port") in
 * `store` (what server_circuits() was given), made on first use. DP_OK with
 * *out set (NULL when the store's circuit_failures is 0: no breaker),
 * DP_ENOMEM. Valid as long as the instance that was given `store`. */
DP_API int dp_circuit_server(dp_circuit *store, const char *server, dp_circuit **out);

/** Before a server's I/O: DP_OK to go ahead, or DP_EBACKEND (open: err
 * names the server, says since when and the last failure). */
DP_API int dp_circuit_enter(dp_circuit *c, dp_circuit_guard *g, dp_err *err);

/** After it: `rc` DP_EBACKEND when the server failed (err says how), any
 * other code when it answered. Returns rc. */
DP_API int dp_circuit_leave(dp_circuit *c, const dp_circuit_guard *g, int rc, dp_err *err);

/* -- The two-level lock ------------------------------------------------------
 *
 * What a cache asks for when a value must be created: the core's per-key
 * lock in the instance's domain (dp_lock_*: orders the threads and Lua states
 * of this process, waiters sleep on a condition variable), then the
 * backend's own lock (ops->lock: orders the processes), so that a backend
 * sees at most one caller per key and process. A backend without a lock of
 * its own gets the first level alone. Both levels are released together.
 * dp_backend_lock/unlock/wait_unlocked stay the backend's level alone.
 *
 * Waits are bounded by `timeout` (a caller passes dp_backend_lock_timeout()
 * to bound them by the handle's lock_timeout): past it the holder is taken to
 * be stuck and DP_ETIMEDOUT says so; the caller may then go ahead without the
 * lock (as an expired Redis lock is taken over), so that nothing waits
 * forever, at the price of a value made twice. `owner` is the caller's tag
 * (dp_lock_owner_new), as for dp_lock_wait: a blocking wait on a lock held
 * under the same owner is refused with DP_EDEADLK.
 *
 * @note The caller owns the dp_backend_hold, zeroed before its first
 * acquire; it records which levels are held, so one hold serves one key at a
 * time. The core keeps no pointer to it, nor to the key.
 */

/** What dp_backend_acquire() took for one key. */
typedef struct dp_backend_hold {
    int core;       /* out: 1 while the core's per-key lock is held */
    int proc;       /* out: 1 while the backend's own lock is held */
    int overrun;    /* out (dp_backend_release): 1: the backend's lock was held
                     * past lock_timeout; 2: it was lost before (expired, or
                     * taken by someone else: the backend's unlock said
                     * DP_ENOTHELD, and its reason is left in err->msg with
                     * err->code DP_OK). Either way another caller may have
                     * made the value too (not an error: say so in a log) */
    double since;   /* out: dp_clock_monotonic() when `proc` was taken */
} dp_backend_hold;

/** The handle's lock_timeout in seconds (its DP_SPEC_LOCK_TIMEOUT argument),
 * or -1 when unbounded: math.huge, or none declared. */
DP_API double dp_backend_lock_timeout(dp_backend *b);

/** Take both levels for `key` into `h` (in/out, nothing held in it).
 * timeout 0: try once: DP_OK (both held) or DP_EBUSY (nothing held).
 * timeout > 0: block at most that long, < 0: without limit: DP_OK (both
 * held); DP_ETIMEDOUT: a level is still held by someone else (h says what
 * this call holds: the core level may be; release it with
 * dp_backend_release whether or not the caller goes ahead); DP_EDEADLK:
 * held under `owner` (nothing held). DP_EINVAL: the instance has no lock
 * domain. Any other code is the backend's failure in err (nothing held). */
DP_API int dp_backend_acquire(dp_backend *b, const char *key, size_t klen, uint32_t owner,
                              double timeout, dp_backend_hold *h, dp_err *err);

/** Release what `h` (in/out) holds for `key`: the backend's level, then the
 * core's. DP_OK (h->overrun set when the lock had outlived lock_timeout or
 * been lost before: see dp_backend_hold); DP_ENOTHELD: `h` holds nothing; or the backend's failure
 * in err (the core level is released all the same). From any thread. */
DP_API int dp_backend_release(dp_backend *b, const char *key, size_t klen, dp_backend_hold *h,
                              dp_err *err);

/** 1 when dp_backend_wait_released() can wait on this handle: the backend
 * has no lock of its own, or it has wait_unlocked. */
DP_API int dp_backend_can_wait_released(dp_backend *b);

/** Wait, taking nothing, until whoever holds `key`'s lock at the call (in
 * this process, then in the others) releases it, so that every waiter reads
 * the holder's value at once instead of taking the lock in turn. timeout 0:
 * check once: DP_OK (free) or DP_EBUSY. Otherwise DP_OK (released, or was
 * free), DP_ETIMEDOUT (still held after `timeout` seconds; < 0: no limit),
 * DP_EDEADLK (held under `owner`), DP_EINVAL (the backend cannot wait: see
 * dp_backend_can_wait_released), or the backend's failure in err. Nothing
 * is held afterwards. */
DP_API int dp_backend_wait_released(dp_backend *b, const char *key, size_t klen,
                                    uint32_t owner, double timeout, dp_err *err);

/** A token naming one holder of a backend's lock (the value a server-side
 * lock holds, so that a release deletes only its own): 32 lowercase hex
 * characters of 128 random bits, and a NUL, into `out` (the caller's). */
DP_API void dp_lock_token(char out[33]);

/* -- Backoff -----------------------------------------------------------------
 *
 * The one policy of every polling wait (a lock that cannot wake its waiters:
 * a server's, or a yielding waiter's): sleep DP_BACKOFF_FIRST, then each
 * step a quarter longer, up to a ceiling, never past the deadline. A quarter
 * (not doubling) keeps a waiter at most about a quarter of its wait late.
 * A dp_backoff is the caller's (a plain struct: on the stack, or ffi.new in
 * Lua, whose yielding waiters sleep dp_backoff_next()'s steps themselves).
 */

#define DP_BACKOFF_FIRST  0.001
#define DP_BACKOFF_GROWTH 1.25
#define DP_BACKOFF_MAX    0.02

typedef struct dp_backoff {
    double step;      /* the next step before clipping */
    double max;       /* the ceiling of a step */
    double deadline;  /* dp_clock_monotonic() bound; ignored when unbounded */
    int unbounded;
} dp_backoff;

/** Start `bo` (out) for a wait of `timeout` seconds (< 0: no limit) whose
 * steps grow up to `max_step` seconds (<= 0: DP_BACKOFF_MAX). */
DP_API void dp_backoff_init(dp_backoff *bo, double timeout, double max_step);

/** The next step to wait, in seconds, clipped to what is left before the
 * deadline; 0 once the deadline has passed. Grows the step. */
DP_API double dp_backoff_next(dp_backoff *bo);

/** Sleep the next step (blocking the thread). 1 after a sleep, 0 when the
 * deadline had passed (no sleep). */
DP_API int dp_backoff_sleep(dp_backoff *bo);

/** Read a size argument: a number of bytes, or a string such as "64k",
 * "10m", "1g" (powers of 1024). 1 with *out set, or 0 if `a` is neither. */
DP_API int dp_arg_size(const dp_arg *a, double *out);

/** Make room for `need` bytes in `b`. DP_OK or DP_ENOMEM. */
DP_API int dp_bytes_reserve(dp_bytes *b, size_t need);
/** Release `b`'s memory; `b` may be reused (empty) afterwards. */
DP_API void dp_bytes_free(dp_bytes *b);

/** Fill err: code and a printf-style message. Returns code. */
DP_API int dp_err_set(dp_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#ifdef __cplusplus
}
#endif
#endif /* DOGPILE_H */
