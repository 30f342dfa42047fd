--- The C core, bound through the LuaJIT FFI: every declaration lives here.
-- Also the shared error helper that points an error at the user's line.
-- What belongs to a Lua state (lock owner, sleep, logger) is in dogpile.context.
local ffi = require "ffi"
local core = require "dogpile.core"

local debug_getinfo = debug.getinfo
local error, tonumber, pcall = error, tonumber, pcall

ffi.cdef [[
const char *dp_strerror(int status);
const char *dp_version(void);
double dp_clock_now(void);
double dp_clock_upper(void);
double dp_clock_margin(void);
double dp_clock_stamp(void);
double dp_clock_monotonic(void);
void dp_clock_sleep(double seconds);
uint32_t dp_lock_domain(const char *name, size_t len);
uint32_t dp_lock_domain_new(void);
uint32_t dp_lock_owner_new(void);
int dp_lock_try(uint32_t domain, const char *key, size_t len, uint32_t owner);
int dp_lock_wait(uint32_t domain, const char *key, size_t len, uint32_t owner, double timeout);
int dp_lock_wait_unlocked(uint32_t domain, const char *key, size_t len, uint32_t owner,
                          double timeout);
int dp_lock_release(uint32_t domain, const char *key, size_t len);
int dp_lock_held(uint32_t domain, const char *key, size_t len, uint32_t *owner);
size_t dp_lock_release_owner(uint32_t owner);
size_t dp_lock_count(void);
void dp_sha1_hex(const void *data, size_t len, char out[41]);
void dp_sha1(const void *data, size_t len, unsigned char out[20]);

typedef struct dp_err { int code; char msg[1024]; } dp_err;
typedef struct dp_bytes { char *data; size_t len; size_t cap; } dp_bytes;
typedef struct dp_arg {
    const char *name; int type; double number; const char *string; size_t len;
} dp_arg;
typedef struct dp_backend_stats {
    double items, bytes, max_items, max_bytes;
    double hits, misses, evictions, expirations;
} dp_backend_stats;
typedef struct dp_backend dp_backend;
typedef struct dp_backend_ops dp_backend_ops;
const dp_backend_ops *dp_backend_find(const char *name);
int dp_backend_open(const char *name, const dp_arg *args, size_t nargs, dp_backend **out,
                    dp_err *err);
int dp_backend_get(dp_backend *b, const char *key, size_t klen, dp_bytes *out, dp_err *err);
int dp_backend_set(dp_backend *b, const char *key, size_t klen, const char *value, size_t vlen,
                   dp_err *err);
int dp_backend_delete(dp_backend *b, const char *key, size_t klen, dp_err *err);
void dp_backend_stat(dp_backend *b, dp_backend_stats *out);
uint32_t dp_backend_lock_domain(dp_backend *b);
int dp_backend_infallible(dp_backend *b);
int dp_backend_has_lock(dp_backend *b);
int dp_backend_lock(dp_backend *b, const char *key, size_t klen, double timeout, dp_err *err);
int dp_backend_unlock(dp_backend *b, const char *key, size_t klen, dp_err *err);
int dp_backend_has_wait_unlocked(dp_backend *b);
int dp_backend_wait_unlocked(dp_backend *b, const char *key, size_t klen, double timeout,
                             dp_err *err);
int dp_backend_get_multi(dp_backend *b, size_t n, const char *const *keys, const size_t *klens,
                         dp_bytes *out, int64_t *vlens, dp_err *err);
int dp_backend_set_multi(dp_backend *b, size_t n, const char *const *keys, const size_t *klens,
                         const char *const *values, const size_t *vlens, dp_err *err);
int dp_backend_delete_multi(dp_backend *b, size_t n, const char *const *keys,
                            const size_t *klens, dp_err *err);
void dp_backend_close(dp_backend *b);
int dp_bytes_reserve(dp_bytes *b, size_t need);
void dp_bytes_free(dp_bytes *b);

typedef struct dp_circuit_stats {
    int enabled; int state;
    double failures, opened, reopened, probes, refused, since;
    double circuit_failures, circuit_cooldown, circuit_slow;
    char last_error[200];
} dp_circuit_stats;
void dp_backend_circuit(dp_backend *b, dp_circuit_stats *out);

typedef struct dp_backend_hold { int core; int proc; int overrun; double since; } dp_backend_hold;
double dp_backend_lock_timeout(dp_backend *b);
int dp_backend_acquire(dp_backend *b, const char *key, size_t klen, uint32_t owner,
                       double timeout, dp_backend_hold *h, dp_err *err);
int dp_backend_release(dp_backend *b, const char *key, size_t klen, dp_backend_hold *h,
                       dp_err *err);
int dp_backend_can_wait_released(dp_backend *b);
int dp_backend_wait_released(dp_backend *b, const char *key, size_t klen, uint32_t owner,
                             double timeout, dp_err *err);

typedef struct dp_backoff { double step; double max; double deadline; int unbounded; } dp_backoff;
void dp_backoff_init(dp_backoff *bo, double timeout, double max_step);
double dp_backoff_next(dp_backoff *bo);
int dp_backoff_sleep(dp_backoff *bo);

typedef struct dp_feed dp_feed;
typedef struct dp_feed_cursor {
    uint64_t seq; uint64_t epoch; uint32_t stamp; uint32_t origin;
    int reset; int more; double reset_at;
} dp_feed_cursor;
int dp_feed_open(const char *name, size_t len, size_t capacity, dp_feed **out);
void dp_feed_close(dp_feed *f);
const volatile uint32_t *dp_feed_stamp(dp_feed *f);
int dp_feed_push(dp_feed *f, const char *key, size_t klen, uint32_t origin, int scope);
void dp_feed_reset(dp_feed *f);
void dp_feed_cursor_init(dp_feed *f, dp_feed_cursor *c);
int dp_feed_read(dp_feed *f, dp_feed_cursor *c, dp_bytes *keys, size_t *lens,
                 int32_t *scopes, size_t max, size_t *n);
]]

local C = ffi.load(core.library_path)
-- Resolve the hot symbols now: the JIT compiles a C.sym lookup only once it
-- is in the namespace's cache, so a first hit recorded cold would abort.
local _ = C.dp_clock_now, C.dp_clock_upper, C.dp_clock_stamp, C.dp_backend_get, C.dp_lock_try

-- An upper bound of the wall clock, as C.dp_clock_upper() gives, with one
-- FFI call instead of two: libc's clock_gettime(CLOCK_REALTIME_COARSE) jumps
-- straight into the vDSO. Every cache hit with an expiration time reads it,
-- and the saved call is a tenth of a memory hit. Linux only; elsewhere the C
-- function.
local clock_upper = function() return C.dp_clock_upper() end
if ffi.os == "Linux" and (pcall(ffi.typeof, "dp_lua_timespec") or pcall(ffi.cdef, [[
    typedef struct { long tv_sec; long tv_nsec; } dp_lua_timespec;
    int dp_lua_clock_gettime(int clk_id, dp_lua_timespec *tp) __asm__("clock_gettime");
]])) then
    local CLOCK_REALTIME_COARSE = 5
    local ts = ffi.new("dp_lua_timespec")
    local margin = C.dp_clock_margin()
    -- A name of our own (asm-renamed): a host or script may have declared
    -- clock_gettime with a timespec type of its own.
    local clock_gettime = ffi.C.dp_lua_clock_gettime
    if clock_gettime(CLOCK_REALTIME_COARSE, ts) == 0 then
        clock_upper = function()
            clock_gettime(CLOCK_REALTIME_COARSE, ts)
            return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 + margin
        end
    end
end

local _M = {
    C = C,
    clock_upper = clock_upper,
    library_path = core.library_path,
    version = core.version,
    DP_OK = 0, DP_EBUSY = 1, DP_ETIMEDOUT = 2, DP_EDEADLK = 3,
    DP_ENOTHELD = 4, DP_ENOMEM = 5, DP_EINVAL = 6, DP_EDECODE = 7, DP_EDEPTH = 8,
    DP_EVERSION = 9, DP_ENOTFOUND = 10, DP_ETOOBIG = 11, DP_EMISMATCH = 12, DP_EBACKEND = 13,
}

-- The sources of this package's own modules: errors skip their frames so
-- that the position prefix names the caller's line, however deep inside the
-- package the check happened.
local own = {}

function _M.own_source()
    own[debug_getinfo(2, "S").source] = true
end
_M.own_source()

--- Raise `msg` at the first stack frame outside this package.
-- @raise always
function _M.raise(msg)
    local level = 2
    while true do
        local info = debug_getinfo(level, "S")
        if not info then
            -- Called from C with no Lua caller above: no position to name.
            level = 0
            break
        end
        if info.what ~= "C" and not own[info.source] then
            break
        end
        level = level + 1
    end
    error(msg, level)
end

function _M.strerror(rc)
    return ffi.string(C.dp_strerror(rc))
end

return _M
