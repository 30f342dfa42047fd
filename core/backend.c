/* backend.c -- the registry of C backends and the calls Lua binds for them.
 *
 * The registry is process-wide: a backend module registers its ops once, and
 * every Lua state of the process opens instances through it. Opening and
 * closing are cold (a mutex); get, set and delete go straight to the ops,
 * through the circuit breaker (breaker.h) for a backend that talks to a
 * server: one pointer test for the others. */
#define _GNU_SOURCE /* dladdr, RTLD_NODELETE */
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "breaker.h"
#include "dogpile.h"
#include "private.h"

struct dp_backend {
    const dp_backend_ops *ops;
    void *self;
    dp__instance *inst;   /* declared backends: the registry's entry */
    uint32_t domain;      /* declared backends: the instance's lock domain */
    double lock_timeout;  /* this handle's, -1: unbounded or none */
    dp__breaker *br;      /* the store's circuit breaker when enabled, else NULL */
    dp__breaker *brref;   /* the reference this handle holds (enabled or not) */
};

typedef struct registered {
    struct registered *next;
    const dp_backend_ops *ops;
    void *ud;
} registered;

static registered *backends;
static uv_mutex_t reg_mu;
static uv_once_t reg_once = UV_ONCE_INIT;

static void reg_init(void)
{
    uv_mutex_init(&reg_mu);
}

DP_API int dp_err_set(dp_err *err, int code, const char *fmt, ...)
{
    if (err) {
        err->code = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

static void err_clear(dp_err *err)
{
    if (err) {
        err->code = DP_OK;
        err->msg[0] = '\0';
    }
}

DP_API int dp_backend_register(const dp_backend_ops *ops, void *ud)
{
    if (!ops || !ops->name || !ops->get || !ops->set || !ops->del)
        return DP_EINVAL;
    /* Either the backend opens and shares its instances itself, or it
     * declares its arguments and the core does (not half of each). */
    int own = ops->open && ops->close;
    int declared = ops->args && ops->create && ops->destroy;
    if (own == declared || (declared && (ops->open || ops->close || ops->lock_domain)) ||
        (own && (ops->create || ops->destroy)))
        return DP_EINVAL;
    if ((ops->lock == NULL) != (ops->unlock == NULL))
        return DP_EINVAL;
    /* A store named by arguments that do not name the instance would give
     * one instance two domains. */
    for (const dp_arg_spec *s = declared ? ops->args : NULL; s && s->name; s++)
        if ((s->flags & DP_SPEC_DOMAIN) && !(s->flags & DP_SPEC_KEY))
            return DP_EINVAL;
    if (ops->wait_unlocked && !ops->lock)
        return DP_EINVAL;
    /* The registry keeps `ops` for the life of the process, but a Lua C
     * module that registered it is unloaded when the last state that required
     * it closes: pin whatever shared object holds `ops`, so it stays mapped. */
    Dl_info info;
    if (dladdr((const void *)ops, &info) && info.dli_fname)
        (void)dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
    uv_once(&reg_once, reg_init);
    uv_mutex_lock(&reg_mu);
    registered *r;
    for (r = backends; r; r = r->next)
        if (strcmp(r->ops->name, ops->name) == 0)
            break;
    int rc = DP_OK;
    if (r) {
        /* The same table again (each Lua state requires the module) writes
         * nothing: an open in another thread may be reading the entry. */
        if (r->ops != ops || r->ud != ud) {
            r->ops = ops;
            r->ud = ud;
        }
    } else if ((r = malloc(sizeof *r))) {
        r->ops = ops;
        r->ud = ud;
        r->next = backends;
        backends = r;
    } else {
        rc = DP_ENOMEM;
    }
    uv_mutex_unlock(&reg_mu);
    return rc;
}

/* Copies the entry for `name` under the mutex, since a registration of the
 * same name may rewrite it concurrently. Returns 0 when there is none. */
static int find(const char *name, const dp_backend_ops **ops, void **ud)
{
    uv_once(&reg_once, reg_init);
    uv_mutex_lock(&reg_mu);
    registered *r;
    for (r = backends; r; r = r->next)
        if (strcmp(r->ops->name, name) == 0)
            break;
    if (r) {
        *ops = r->ops;
        *ud = r->ud;
    }
    uv_mutex_unlock(&reg_mu);
    return r != NULL;
}

DP_API const dp_backend_ops *dp_backend_find(const char *name)
{
    const dp_backend_ops *ops = NULL;
    void *ud;
    return name && find(name, &ops, &ud) ? ops : NULL;
}

DP_API int dp_backend_open(const char *name, const dp_arg *args, size_t nargs,
                           dp_backend **out, dp_err *err)
{
    err_clear(err);
    *out = NULL;
    const dp_backend_ops *ops;
    void *ud;
    if (!name || !find(name, &ops, &ud))
        return dp_err_set(err, DP_EINVAL, "no C backend is registered as '%s'", name ? name : "(null)");
    /* The circuit_* arguments are the core's: taken out here, so that a
     * backend parsing its own arguments never sees them. */
    int net = dp__circuit_networked(ops->name);
    dp__circuit_cfg cfg;
    dp_arg *rest = NULL;
    if (net) {
        int rc = dp__circuit_args(ops->name, args, nargs, &cfg, &rest, &nargs, err);
        if (rc != DP_OK)
            return rc;
        if (rest)
            args = rest;
    }
    dp_backend *b = malloc(sizeof *b);
    if (!b) {
        free(rest);
        return dp_err_set(err, DP_ENOMEM, "out of memory");
    }
    b->ops = ops;
    b->self = NULL;
    b->inst = NULL;
    b->domain = 0;
    b->lock_timeout = -1;
    b->br = b->brref = NULL;
    int rc = ops->create ? dp__instance_open(ops, ud, args, nargs, &b->inst, &b->self,
                                             &b->domain, &b->lock_timeout, err)
                         : ops->open(ud, args, nargs, &b->self, err);
    free(rest);
    if (rc != DP_OK) {
        free(b);
        if (err && err->code == DP_OK)
            dp_err_set(err, rc, "%s", dp_strerror(rc));
        return rc;
    }
    if (net) {
        /* One breaker per store: the lock domain names it (server, db, lock
         * prefix), whichever instance or handle the backend gave. */
        rc = dp__breaker_join(ops->name, dp_backend_lock_domain(b), b->self, &cfg, &b->brref,
                              err);
        if (rc != DP_OK) {
            dp_backend_close(b);
            return rc;
        }
        /* A backend with a breaker per server guards its servers' I/O
         * itself (dp_circuit_server), under the store's, which keeps the
         * settings and the stats and outlives the instance. */
        if (ops->server_circuits)
            ops->server_circuits(b->self, b->brref);
        else if (cfg.failures > 0)
            b->br = b->brref;
    }
    *out = b;
    return DP_OK;
}

/* Every dispatcher: straight to the op (a tail jump) without a breaker;
 * with one, through a function of its own, the op between
 * dp__breaker_enter and dp__breaker_leave. Kept apart so that the plain
 * path saves no registers: written inline, the guarded path made every
 * get of an in-process backend 21 instructions longer (callgrind). */
#define GUARDED_FN(fn, params, call)                                            \
    static __attribute__((noinline)) int fn params                              \
    {                                                                           \
        dp__breaker *br = b->br;                                                \
        dp__guard g;                                                            \
        if (dp__breaker_enter(br, &g, err) != DP_OK)                            \
            return DP_EBACKEND;                                                 \
        return dp__breaker_leave(br, &g, (call), err);                          \
    }

GUARDED_FN(guarded_get, (dp_backend *b, const char *key, size_t klen, dp_bytes *out,
                         dp_err *err), b->ops->get(b->self, key, klen, out, err))
GUARDED_FN(guarded_set, (dp_backend *b, const char *key, size_t klen, const char *value,
                         size_t vlen, dp_err *err),
           b->ops->set(b->self, key, klen, value, vlen, err))
GUARDED_FN(guarded_del, (dp_backend *b, const char *key, size_t klen, dp_err *err),
           b->ops->del(b->self, key, klen, err))
GUARDED_FN(guarded_lock, (dp_backend *b, const char *key, size_t klen, double timeout,
                          dp_err *err), b->ops->lock(b->self, key, klen, timeout, err))
GUARDED_FN(guarded_unlock, (dp_backend *b, const char *key, size_t klen, dp_err *err),
           b->ops->unlock(b->self, key, klen, err))
GUARDED_FN(guarded_wait_unlocked, (dp_backend *b, const char *key, size_t klen,
                                   double timeout, dp_err *err),
           b->ops->wait_unlocked(b->self, key, klen, timeout, err))

DP_API int dp_backend_get(dp_backend *b, const char *key, size_t klen, dp_bytes *out,
                          dp_err *err)
{
    if (!b->br)
        return b->ops->get(b->self, key, klen, out, err);
    return guarded_get(b, key, klen, out, err);
}

DP_API int dp_backend_set(dp_backend *b, const char *key, size_t klen, const char *value,
                          size_t vlen, dp_err *err)
{
    if (!b->br)
        return b->ops->set(b->self, key, klen, value, vlen, err);
    return guarded_set(b, key, klen, value, vlen, err);
}

DP_API int dp_backend_delete(dp_backend *b, const char *key, size_t klen, dp_err *err)
{
    if (!b->br)
        return b->ops->del(b->self, key, klen, err);
    return guarded_del(b, key, klen, err);
}

DP_API void dp_backend_stat(dp_backend *b, dp_backend_stats *out)
{
    memset(out, 0, sizeof *out);
    if (b->ops->stats)
        b->ops->stats(b->self, out);
}

DP_API uint32_t dp_backend_lock_domain(dp_backend *b)
{
    if (b->inst)
        return b->domain;
    return b->ops->lock_domain ? b->ops->lock_domain(b->self) : 0;
}

DP_API int dp_backend_infallible(dp_backend *b)
{
    return b->ops->infallible;
}

DP_API int dp_backend_has_lock(dp_backend *b)
{
    return b->ops->lock != NULL;
}

DP_API int dp_backend_lock(dp_backend *b, const char *key, size_t klen, double timeout,
                           dp_err *err)
{
    if (!b->ops->lock)
        return dp_err_set(err, DP_EINVAL, "%s has no lock of its own", b->ops->name);
    if (!b->br)
        return b->ops->lock(b->self, key, klen, timeout, err);
    return guarded_lock(b, key, klen, timeout, err);
}

DP_API int dp_backend_unlock(dp_backend *b, const char *key, size_t klen, dp_err *err)
{
    if (!b->ops->unlock)
        return dp_err_set(err, DP_EINVAL, "%s has no lock of its own", b->ops->name);
    /* Refused too when open: the lock expires by itself, and a release
     * that waited socket_timeout would cost the caller what the breaker
     * saved it. */
    if (!b->br)
        return b->ops->unlock(b->self, key, klen, err);
    return guarded_unlock(b, key, klen, err);
}

DP_API int dp_backend_has_wait_unlocked(dp_backend *b)
{
    return b->ops->wait_unlocked != NULL;
}

DP_API int dp_backend_wait_unlocked(dp_backend *b, const char *key, size_t klen,
                                    double timeout, dp_err *err)
{
    if (!b->ops->wait_unlocked)
        return dp_err_set(err, DP_EINVAL, "%s cannot wait for its lock's release",
                          b->ops->name);
    if (!b->br)
        return b->ops->wait_unlocked(b->self, key, klen, timeout, err);
    return guarded_wait_unlocked(b, key, klen, timeout, err);
}

static int get_multi(dp_backend *b, size_t n, const char *const *keys, const size_t *klens,
                     dp_bytes *out, int64_t *vlens, dp_err *err)
{
    out->len = 0;
    if (b->ops->get_multi)
        return b->ops->get_multi(b->self, n, keys, klens, out, vlens, err);
    /* The loop stops at the first failure: DP_EBACKEND, nothing reported
     * (a single server that failed once would fail the rest too). */
    dp_bytes one = {0};
    int rc = DP_OK;
    for (size_t i = 0; i < n && rc == DP_OK; i++) {
        rc = b->ops->get(b->self, keys[i], klens[i], &one, err);
        if (rc == DP_ENOTFOUND) {
            vlens[i] = -1;
            rc = DP_OK;
        } else if (rc == DP_OK) {
            if (dp_bytes_reserve(out, out->len + one.len) != DP_OK) {
                rc = dp_err_set(err, DP_ENOMEM, "out of memory");
                break;
            }
            if (one.len)
                memcpy(out->data + out->len, one.data, one.len);
            out->len += one.len;
            vlens[i] = (int64_t)one.len;
        }
    }
    dp_bytes_free(&one);
    return rc;
}

static int set_multi(dp_backend *b, size_t n, const char *const *keys, const size_t *klens,
                     const char *const *values, const size_t *vlens, dp_err *err)
{
    if (b->ops->set_multi)
        return b->ops->set_multi(b->self, n, keys, klens, values, vlens, err);
    for (size_t i = 0; i < n; i++) {
        int rc = b->ops->set(b->self, keys[i], klens[i], values[i], vlens[i], err);
        if (rc != DP_OK)
            return rc;
    }
    return DP_OK;
}

static int delete_multi(dp_backend *b, size_t n, const char *const *keys, const size_t *klens,
                        dp_err *err)
{
    if (b->ops->del_multi)
        return b->ops->del_multi(b->self, n, keys, klens, err);
    for (size_t i = 0; i < n; i++) {
        int rc = b->ops->del(b->self, keys[i], klens[i], err);
        if (rc != DP_OK)
            return rc;
    }
    return DP_OK;
}

/* The multi forms count as one call: the core's loop stops at the first
 * failure anyway. */
GUARDED_FN(guarded_get_multi, (dp_backend *b, size_t n, const char *const *keys,
                               const size_t *klens, dp_bytes *out, int64_t *vlens,
                               dp_err *err), get_multi(b, n, keys, klens, out, vlens, err))
GUARDED_FN(guarded_set_multi, (dp_backend *b, size_t n, const char *const *keys,
                               const size_t *klens, const char *const *values,
                               const size_t *vlens, dp_err *err),
           set_multi(b, n, keys, klens, values, vlens, err))
GUARDED_FN(guarded_delete_multi, (dp_backend *b, size_t n, const char *const *keys,
                                  const size_t *klens, dp_err *err),
           delete_multi(b, n, keys, klens, err))

DP_API int dp_backend_get_multi(dp_backend *b, size_t n, const char *const *keys,
                                const size_t *klens, dp_bytes *out, int64_t *vlens,
                                dp_err *err)
{
    if (!b->br)
        return get_multi(b, n, keys, klens, out, vlens, err);
    return guarded_get_multi(b, n, keys, klens, out, vlens, err);
}

DP_API int dp_backend_set_multi(dp_backend *b, size_t n, const char *const *keys,
                                const size_t *klens, const char *const *values,
                                const size_t *vlens, dp_err *err)
{
    if (!b->br)
        return set_multi(b, n, keys, klens, values, vlens, err);
    return guarded_set_multi(b, n, keys, klens, values, vlens, err);
}

DP_API int dp_backend_delete_multi(dp_backend *b, size_t n, const char *const *keys,
                                   const size_t *klens, dp_err *err)
{
    if (!b->br)
        return delete_multi(b, n, keys, klens, err);
    return guarded_delete_multi(b, n, keys, klens, err);
}

DP_API void dp_backend_circuit(dp_backend *b, dp_circuit_stats *out)
{
    memset(out, 0, sizeof *out);
    if (b->brref)
        dp__breaker_stats(b->brref, out);
}

DP_API void dp_backend_close(dp_backend *b)
{
    if (!b)
        return;
    if (b->inst)
        dp__instance_close(b->inst);
    else
        b->ops->close(b->self);
    dp__breaker_drop(b->brref);
    free(b);
}

DP_API int dp_arg_size(const dp_arg *a, double *out)
{
    if (a->type == DP_ARG_NUMBER) {
        *out = a->number;
        return 1;
    }
    if (a->type != DP_ARG_STRING || a->len == 0 || a->len > 30)
        return 0;
    char buf[32], *end;
    memcpy(buf, a->string, a->len);
    buf[a->len] = '\0';
    double v = strtod(buf, &end);
    double mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1024; end++; break;
    case 'm': case 'M': mul = 1024.0 * 1024; end++; break;
    case 'g': case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
    }
    if (*end != '\0' || end == buf)
        return 0;
    *out = v * mul;
    return 1;
}

DP_API int dp_bytes_reserve(dp_bytes *b, size_t need)
{
    if (need <= b->cap)
        return DP_OK;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *p = realloc(b->data, cap);
    if (!p)
        return DP_ENOMEM;
    b->data = p;
    b->cap = cap;
    return DP_OK;
}

DP_API void dp_bytes_free(dp_bytes *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

DP_API void dp_shutdown(void)
{
    uv_once(&reg_once, reg_init);
    uv_mutex_lock(&reg_mu);
    while (backends) {
        registered *r = backends;
        backends = r->next;
        free(r);
    }
    uv_mutex_unlock(&reg_mu);
    dp__circuit_shutdown();
    dp__lock_shutdown();
}

DP_API double dp_backend_lock_timeout(dp_backend *b)
{
    return b->lock_timeout;
}

const char *dp__backend_name(dp_backend *b)
{
    return b->ops->name;
}
