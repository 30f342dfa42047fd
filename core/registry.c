/* registry.c -- the process-wide registry of shared backend instances.
 *
 * Every Lua state and thread that opens a declared backend (ops->create)
 * with the same identity gets the same instance: found or created here,
 * counted, and destroyed by the last close. Written once for every backend,
 * as luv keeps one handle lifecycle for every handle type.
 *
 * An entry is OPENING while create() runs and CLOSING while destroy() runs,
 * both outside the registry's mutex (a server backend may connect for a
 * second); an open of the same identity meanwhile waits on the condition
 * variable, so two instances of one identity never exist at once and other
 * identities never wait. Cold code: a list and one mutex.
 */
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "dogpile.h"
#include "private.h"

enum { OPENING, READY, CLOSING };

struct dp__instance {
    struct dp__instance *next;
    const dp_backend_ops *ops;
    void *self;
    void *settings;   /* the first opener's, kept until destroy() returned */
    uint32_t domain;
    int refs;
    int state;
    size_t idlen;
    char id[];        /* "<backend name>:<identity>" */
};

static dp__instance *instances;
static uv_mutex_t mu;
static uv_cond_t changed;
static uv_once_t once = UV_ONCE_INIT;

static void init(void)
{
    uv_mutex_init(&mu);
    uv_cond_init(&changed);
}

static dp__instance *find(const char *id, size_t idlen)
{
    for (dp__instance *e = instances; e; e = e->next)
        if (e->idlen == idlen && memcmp(e->id, id, idlen) == 0)
            return e;
    return NULL;
}

static void unlink_entry(dp__instance *inst)
{
    dp__instance **pp = &instances;
    while (*pp != inst)
        pp = &(*pp)->next;
    *pp = inst->next;
}

static void settings_free(const dp_backend_ops *ops, void *settings)
{
    if (settings) {
        dp_args_free(ops->args, settings);
        free(settings);
    }
}

/* The identity as a user reads it in a message: identify()'s bytes as
 * text, or the DP_SPEC_KEY values. */
static void identity_text(const dp__instance *e, char *out, size_t cap)
{
    if (!e->ops->identify) {
        dp__args_key_text(e->ops->args, e->settings, out, cap);
        return;
    }
    size_t skip = strlen(e->ops->name) + 1, n = 0;
    for (size_t i = skip; i < e->idlen && n + 2 < cap; i++)
        out[n++] = e->id[i] >= 32 && e->id[i] < 127 ? e->id[i] : '?';
    out[n] = '\0';
}

/* The identity bytes: the backend's name, ':', then identify()'s or the
 * DP_SPEC_KEY values'. */
static int identity(const dp_backend_ops *ops, void *ud, const void *settings, dp_bytes *id,
                    dp_err *err)
{
    dp_bytes tail = {0};
    int rc = ops->identify ? ops->identify(ud, settings, &tail, err)
                           : dp__args_identity(ops->args, settings, &tail);
    if (rc != DP_OK) {
        dp_bytes_free(&tail);
        if (!err || err->code == DP_OK)
            dp_err_set(err, rc, "%s: %s", ops->name, dp_strerror(rc));
        return rc;
    }
    size_t nlen = strlen(ops->name);
    if (dp_bytes_reserve(id, nlen + 1 + tail.len) != DP_OK) {
        dp_bytes_free(&tail);
        return dp_err_set(err, DP_ENOMEM, "%s: out of memory", ops->name);
    }
    memcpy(id->data, ops->name, nlen);
    id->data[nlen] = ':';
    if (tail.len)
        memcpy(id->data + nlen + 1, tail.data, tail.len);
    id->len = nlen + 1 + tail.len;
    dp_bytes_free(&tail);
    return DP_OK;
}

/* The lock domain of a new instance: named by its identity, or with
 * DP_SPEC_DOMAIN entries, "<backend name>:" and their values alone (written
 * as an identity of those entries), so that instances of one store with
 * other settings share it. 0 on out of memory. */
static uint32_t domain_of(const dp__instance *e)
{
    size_t k = 0;
    for (const dp_arg_spec *s = e->ops->args; s->name; s++)
        k += (s->flags & DP_SPEC_DOMAIN) != 0;
    if (k == 0)
        return dp_lock_domain(e->id, e->idlen);
    dp_arg_spec *only = calloc(k + 1, sizeof *only);
    if (!only)
        return 0;
    k = 0;
    for (const dp_arg_spec *s = e->ops->args; s->name; s++)
        if (s->flags & DP_SPEC_DOMAIN) {
            only[k] = *s;
            only[k++].flags = DP_SPEC_KEY;
        }
    dp_bytes name = {0}, tail = {0};
    size_t nlen = strlen(e->ops->name);
    uint32_t dom = 0;
    if (dp__args_identity(only, e->settings, &tail) == DP_OK &&
        dp_bytes_reserve(&name, nlen + 1 + tail.len) == DP_OK) {
        memcpy(name.data, e->ops->name, nlen);
        name.data[nlen] = ':';
        if (tail.len)
            memcpy(name.data + nlen + 1, tail.data, tail.len);
        dom = dp_lock_domain(name.data, nlen + 1 + tail.len);
    }
    dp_bytes_free(&name);
    dp_bytes_free(&tail);
    free(only);
    return dom;
}

int dp__instance_open(const dp_backend_ops *ops, void *ud, const dp_arg *args, size_t nargs,
                      dp__instance **out, void **self, uint32_t *domain, double *lock_timeout,
                      dp_err *err)
{
    void *settings = calloc(1, ops->settings_size ? ops->settings_size : 1);
    if (!settings)
        return dp_err_set(err, DP_ENOMEM, "%s: out of memory", ops->name);
    int rc = dp_args_fill(ops->name, ops->args, args, nargs, settings, err);
    if (rc != DP_OK) {
        free(settings);
        return rc;
    }
    *lock_timeout = dp__args_lock_timeout(ops->args, settings);
    dp_bytes id = {0};
    rc = identity(ops, ud, settings, &id, err);
    if (rc != DP_OK) {
        settings_free(ops, settings);
        return rc;
    }

    uv_once(&once, init);
    uv_mutex_lock(&mu);
    dp__instance *e;
    while ((e = find(id.data, id.len)) && e->state != READY)
        uv_cond_wait(&changed, &mu);
    if (e) {
        char diff[600];
        if (dp_args_diff(ops->args, e->settings, settings, diff, sizeof diff)) {
            char who[300];
            identity_text(e, who, sizeof who);
            uv_mutex_unlock(&mu);
            rc = dp_err_set(err, DP_EMISMATCH, "%s: %s is already open with %s; every region "
                            "sharing it must agree", ops->name, who, diff);
        } else {
            e->refs++;
            uv_mutex_unlock(&mu);
            *out = e;
            *self = e->self;
            *domain = e->domain;
        }
        settings_free(ops, settings);
        dp_bytes_free(&id);
        return rc;
    }
    e = malloc(sizeof *e + id.len);
    if (!e) {
        uv_mutex_unlock(&mu);
        settings_free(ops, settings);
        dp_bytes_free(&id);
        return dp_err_set(err, DP_ENOMEM, "%s: out of memory", ops->name);
    }
    e->ops = ops;
    e->self = NULL;
    e->settings = settings;
    e->refs = 1;
    e->state = OPENING;
    e->idlen = id.len;
    memcpy(e->id, id.data, id.len);
    e->next = instances;
    instances = e;
    uv_mutex_unlock(&mu);
    dp_bytes_free(&id);

    /* Named by the identity (or the store): every handle on the instance
     * meets one lock per key, in every Lua state, and again after the
     * instance is reopened. */
    e->domain = domain_of(e);
    rc = e->domain ? ops->create(ud, settings, &e->self, err)
                   : dp_err_set(err, DP_ENOMEM, "%s: out of memory", ops->name);
    if (rc != DP_OK && (!err || err->code == DP_OK))
        dp_err_set(err, rc, "%s: %s", ops->name, dp_strerror(rc));
    uv_mutex_lock(&mu);
    if (rc == DP_OK)
        e->state = READY;
    else
        unlink_entry(e);
    uv_cond_broadcast(&changed);
    uv_mutex_unlock(&mu);
    if (rc != DP_OK) {
        settings_free(ops, settings);
        free(e);
        return rc;
    }
    *out = e;
    *self = e->self;
    *domain = e->domain;
    return DP_OK;
}

void dp__instance_close(dp__instance *e)
{
    uv_once(&once, init);
    uv_mutex_lock(&mu);
    int last = --e->refs == 0;
    if (last)
        e->state = CLOSING;
    uv_mutex_unlock(&mu);
    if (!last)
        return;
    e->ops->destroy(e->self);
    uv_mutex_lock(&mu);
    unlink_entry(e);
    uv_cond_broadcast(&changed);
    uv_mutex_unlock(&mu);
    settings_free(e->ops, e->settings);
    free(e);
}
