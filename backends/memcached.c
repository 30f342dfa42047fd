/* memcached.c -- the dogpile.cache.memcached backend, on libmemcached.
 *
 * An instance is a master memcached_st holding the server list and the
 * behaviours, and a mutex-guarded pool of clones, so that no memcached_st is
 * ever used by two threads at once (libmemcached's handles are not
 * thread-safe). Every argument names the instance (DP_SPEC_KEY): regions
 * with the same arguments share one, in every Lua state and thread; regions
 * on the same servers with other settings (an expiry, the protocol) each have
 * their own. Keys are spread over the servers by
 * consistent hashing (ketama); a server that fails is retried after
 * `retry_timeout` seconds, so a restarted server is used again without
 * reconfiguring, and keys on a dead server fail fast instead of moving.
 *
 * The lock between processes (and machines) is memcached's `add` of a lock
 * key (`lock_prefix` + key; "_lock" is Python dogpile.cache's, which a
 * wire_format region sets) with a random token and a finite expiry; release is a compare-and-
 * delete: `gets` the lock key, and when it still holds our token, `cas` it
 * with its CAS unique to an expiry in the past (the item is gone at once),
 * so a lock that expired and was taken by another holder is never removed,
 * however long ours was held. Threads of one process are ordered before that
 * by the core's per-key lock in this instance's lock domain (see c.lua). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include <lauxlib.h>
#include <libmemcached/memcached.h>
#include <lua.h>

#include "dogpile.h"

#define NAME "dogpile.cache.memcached"
/* memcached's key limit (both protocols). */
#define MAX_KEY 250
/* The lock key's prefix: at most this long, so that prefix + SHA-1 hex fits. */
#define MAX_LOCK_PREFIX (MAX_KEY - 40)
/* An item's size on the server beyond key and value (header, CAS, suffix). */
#define ITEM_OVERHEAD 64

/* -- Arguments: the struct the core fills, and the table it fills it by --- */

typedef struct mc_settings {
    char *url;                 /* "host:port,host:port" (the Lua module joins a list) */
    int binary, distributed_lock;
    double expire;             /* memcached_expire_time: the TTL sent with each set */
    double lock_timeout;       /* the longest a lock is held: the lock key's expiry */
    double lock_backoff_max;
    double socket_timeout, connect_timeout, retry_timeout, dead_timeout;
    int64_t failure_limit;
    int remove_failed, nodelay, keepalive, noblock;
    int hash;                  /* index in hashes[] */
    int64_t item_size_max;     /* bytes, when the user set it (0: the server's, as it answers) */
    int64_t flags;             /* the item flags every set writes (Python's clients: 1 = pickle) */
    char *lock_prefix;         /* the lock key is lock_prefix .. key */
} mc_settings;

static const char *const hash_names[] = {"md5", "crc", "fnv1_64", "fnv1a_64", "fnv1_32",
                                         "fnv1a_32", "jenkins", "murmur", NULL};
static const memcached_hash_t hashes[] = {
    MEMCACHED_HASH_MD5, MEMCACHED_HASH_CRC, MEMCACHED_HASH_FNV1_64, MEMCACHED_HASH_FNV1A_64,
    MEMCACHED_HASH_FNV1_32, MEMCACHED_HASH_FNV1A_32, MEMCACHED_HASH_JENKINS,
    MEMCACHED_HASH_MURMUR,
};

#define KEY DP_SPEC_KEY
#define F(field) offsetof(mc_settings, field)
static const dp_arg_spec mc_args[] = {
    {.name = "url", .kind = DP_SPEC_STR, .flags = KEY | DP_SPEC_DOMAIN, .min = 1,
     .def_str = "127.0.0.1:11211",
     .what = "\"host:port\" or a list of them", .offset = F(url)},
    {.name = "binary", .kind = DP_SPEC_BOOL, .flags = KEY, .offset = F(binary)},
    {.name = "memcached_expire_time", .kind = DP_SPEC_SECONDS, .flags = KEY, .offset = F(expire)},
    {.name = "distributed_lock", .kind = DP_SPEC_BOOL, .flags = KEY, .def = 1,
     .offset = F(distributed_lock)},
    {.name = "lock_timeout", .kind = DP_SPEC_SECONDS,
     .flags = KEY | DP_SPEC_ABOVE_MIN | DP_SPEC_LOCK_TIMEOUT, .def = 30,
     .what = "a finite positive number of seconds (the lock key's expiry on the server)",
     .offset = F(lock_timeout)},
    {.name = "lock_backoff_max", .kind = DP_SPEC_SECONDS, .flags = KEY, .min = 0.001, .def = 0.05,
     .offset = F(lock_backoff_max)},
    {.name = "socket_timeout", .kind = DP_SPEC_SECONDS, .flags = KEY, .min = 0.001, .def = 1,
     .offset = F(socket_timeout)},
    {.name = "connect_timeout", .kind = DP_SPEC_SECONDS, .flags = KEY, .min = 0.001, .def = 1,
     .offset = F(connect_timeout)},
    {.name = "retry_timeout", .kind = DP_SPEC_SECONDS, .flags = KEY, .min = 1, .def = 1,
     .offset = F(retry_timeout)},
    {.name = "dead_timeout", .kind = DP_SPEC_SECONDS, .flags = KEY, .min = 1, .def = 1,
     .offset = F(dead_timeout)},
    {.name = "server_failure_limit", .kind = DP_SPEC_INT, .flags = KEY, .min = 1, .def = 2,
     .offset = F(failure_limit)},
    {.name = "remove_failed_servers", .kind = DP_SPEC_BOOL, .flags = KEY,
     .offset = F(remove_failed)},
    {.name = "tcp_nodelay", .kind = DP_SPEC_BOOL, .flags = KEY, .def = 1, .offset = F(nodelay)},
    {.name = "tcp_keepalive", .kind = DP_SPEC_BOOL, .flags = KEY, .offset = F(keepalive)},
    {.name = "no_block", .kind = DP_SPEC_BOOL, .flags = KEY, .def = 1, .offset = F(noblock)},
    {.name = "hash", .kind = DP_SPEC_ENUM, .flags = KEY, .choices = hash_names,
     .offset = F(hash)}, /* md5: ketama's usual point hash */
    {.name = "item_size_max", .kind = DP_SPEC_SIZE, .flags = KEY, .min = 1024,
     .offset = F(item_size_max)},
    {.name = "flags", .kind = DP_SPEC_INT, .flags = KEY, .min = 0, .max = 4294967295.0,
     .what = "an integer from 0 to 2^32 - 1 (the item flags every set writes)",
     .offset = F(flags)},
    {.name = "lock_prefix", .kind = DP_SPEC_STR, .flags = KEY, .min = 1, .max = MAX_LOCK_PREFIX,
     .def_str = "dogpile-lock:", .offset = F(lock_prefix)},
    {0},
};
#undef F
#undef KEY

/* -- Instance ----------------------------------------------------------------- */

/* A lock this instance holds: the token it wrote, so that any thread can
 * release it and release can tell our lock from another process's. */
typedef struct held {
    struct held *next;
    double taken;      /* monotonic seconds when add() succeeded */
    char token[48];
    size_t tlen;
    size_t klen;
    char key[];
} held;

typedef struct mc {
    const mc_settings *cfg; /* the core's: valid until destroy */
    memcached_st *master;   /* configured once; only cloned, under mu */
    uv_mutex_t mu;          /* guards pool and locks */
    memcached_st **pool;
    size_t npool, cappool;
    held *locks;
    time_t expire;          /* cfg->expire in whole seconds */
    time_t lock_expire;     /* the lock key's expiry: ceil(lock_timeout) + 1 */
    uint64_t token_seq;
    _Atomic uint64_t hits, misses;
} mc;

static memcached_st *conn_get(mc *s, dp_err *err)
{
    memcached_st *m = NULL;
    uv_mutex_lock(&s->mu);
    if (s->npool > 0)
        m = s->pool[--s->npool];
    else
        m = memcached_clone(NULL, s->master);
    uv_mutex_unlock(&s->mu);
    if (!m)
        dp_err_set(err, DP_ENOMEM, NAME ": out of memory for a connection");
    return m;
}

static void conn_put(mc *s, memcached_st *m)
{
    uv_mutex_lock(&s->mu);
    if (s->npool == s->cappool) {
        size_t cap = s->cappool ? s->cappool * 2 : 8;
        memcached_st **p = realloc(s->pool, cap * sizeof *p);
        if (!p) {
            uv_mutex_unlock(&s->mu);
            memcached_free(m);
            return;
        }
        s->pool = p;
        s->cappool = cap;
    }
    s->pool[s->npool++] = m;
    uv_mutex_unlock(&s->mu);
}

/* libmemcached's last error message, as a user reads it: it starts with the
 * address of its own structure, "(0x55d1c0ffee00) ", repeats the server
 * (",  host: h:p") and ends with its source position (" -> file.cc:145");
 * the message keeps the words in between. */
static void clean_detail(const char *in, char *out, size_t cap)
{
    if (in[0] == '(' && in[1] == '0' && in[2] == 'x') {
        const char *close = strchr(in, ')');
        if (close)
            in = close + 1;
    }
    while (*in == ' ')
        in++;
    size_t n = strlen(in);
    const char *cut;
    if ((cut = strstr(in, " -> ")) != NULL && (size_t)(cut - in) < n)
        n = (size_t)(cut - in);
    if ((cut = strstr(in, "host: ")) != NULL && (size_t)(cut - in) < n)
        n = (size_t)(cut - in);
    while (n > 0 && (in[n - 1] == ' ' || in[n - 1] == ','))
        n--;
    if (n >= cap)
        n = cap - 1;
    memcpy(out, in, n);
    out[n] = '\0';
}

/* Describe a libmemcached failure for `key`, naming the server it maps to. */
static int mc_fail(memcached_st *m, const char *op, const char *key, size_t klen,
                   memcached_return_t rc, dp_err *err)
{
    memcached_return_t r2;
    const memcached_instance_st *srv = memcached_server_by_key(m, key, klen, &r2);
    char detail[200];
    const char *raw = memcached_last_error_message(m);
    clean_detail(raw ? raw : "", detail, sizeof detail);
    if (!detail[0])
        snprintf(detail, sizeof detail, "%s", memcached_strerror(m, rc));
    if (srv)
        return dp_err_set(err, DP_EBACKEND, "%s on server %s:%u: %s", op,
                          memcached_server_name(srv), (unsigned)memcached_server_port(srv),
                          detail);
    return dp_err_set(err, DP_EBACKEND, "%s: %s", op, detail);
}

/* memcached refuses keys longer than 250 bytes, empty, or holding spaces or
 * control characters; the Lua module's default key_mangler makes every key
 * valid, so this only catches a region's own mangler. */
static int check_key(const char *key, size_t klen, dp_err *err)
{
    int bad = klen == 0 || klen > MAX_KEY;
    for (size_t i = 0; !bad && i < klen; i++) {
        unsigned char c = (unsigned char)key[i];
        bad = c <= ' ' || c == 127;
    }
    if (bad)
        return dp_err_set(err, DP_EINVAL,
                          "a key of %zu bytes is not a valid memcached key (1 to %d bytes, no "
                          "spaces or control characters); the backend's default key_mangler "
                          "hashes such keys, a region's own key_mangler must too",
                          klen, MAX_KEY);
    return DP_OK;
}

/* -- get / set / delete --------------------------------------------------------- */

static int mc_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    mc *s = self;
    if (check_key(key, klen, err) != DP_OK)
        return err->code;
    memcached_st *m = conn_get(s, err);
    if (!m)
        return DP_ENOMEM;
    size_t vlen = 0;
    uint32_t flags = 0;
    memcached_return_t rc;
    char *v = memcached_get(m, key, klen, &vlen, &flags, &rc);
    int status = DP_OK;
    if (v) {
        if (dp_bytes_reserve(out, vlen ? vlen : 1) != DP_OK) {
            status = dp_err_set(err, DP_ENOMEM, "out of memory for a value of %zu bytes", vlen);
        } else {
            memcpy(out->data, v, vlen);
            out->len = vlen;
            atomic_fetch_add_explicit(&s->hits, 1, memory_order_relaxed);
        }
        free(v);
    } else if (rc == MEMCACHED_SUCCESS) {
        /* an empty value: libmemcached hands back no buffer for it */
        out->len = 0;
        atomic_fetch_add_explicit(&s->hits, 1, memory_order_relaxed);
    } else if (rc == MEMCACHED_NOTFOUND) {
        atomic_fetch_add_explicit(&s->misses, 1, memory_order_relaxed);
        status = DP_ENOTFOUND;
    } else {
        status = mc_fail(m, "get", key, klen, rc, err);
    }
    conn_put(s, m);
    return status;
}

static memcached_return_t stat_item_size_max(const memcached_instance_st *srv, const char *key,
                                             size_t klen, const char *value, size_t vlen,
                                             void *ctx)
{
    (void)srv;
    if (klen == 13 && memcmp(key, "item_size_max", 13) == 0 && vlen > 0 && vlen < 32) {
        char buf[32];
        memcpy(buf, value, vlen);
        buf[vlen] = '\0';
        *(double *)ctx = strtod(buf, NULL);
    }
    return MEMCACHED_SUCCESS;
}

/* The item size limit of `srv`, as it says in `stats settings` (memcached
 * -I); 0 when it does not answer. Asked through a handle of its own that
 * names only that server, with the instance's timeouts. */
static double server_item_size_max(mc *s, const memcached_instance_st *srv)
{
    double limit = 0;
    uv_mutex_lock(&s->mu);
    memcached_st *one = memcached_clone(NULL, s->master);
    uv_mutex_unlock(&s->mu);
    if (!one)
        return 0;
    memcached_servers_reset(one);
    if (memcached_success(memcached_server_add(one, memcached_server_name(srv),
                                               memcached_server_port(srv))))
        memcached_stat_execute(one, "settings", stat_item_size_max, &limit);
    memcached_free(one);
    return limit;
}

/* The size limit is the server's: a value it refuses as too large is an
 * error naming the value's size and the limit the server gives (nothing is
 * assumed on this side, so a server started with -I 4m takes 2 MiB values).
 * A limit the user sets (item_size_max) is checked before sending. */
static int mc_set(void *self, const char *key, size_t klen, const char *value, size_t vlen,
                  dp_err *err)
{
    mc *s = self;
    if (check_key(key, klen, err) != DP_OK)
        return err->code;
    double limit_set = (double)s->cfg->item_size_max;
    if (limit_set > 0 && (double)vlen + klen + ITEM_OVERHEAD > limit_set)
        return dp_err_set(err, DP_ETOOBIG,
                          "a value of %zu bytes is larger than the item size limit set "
                          "(item_size_max = %.0f bytes, less %d bytes for the key and header)",
                          vlen, limit_set, (int)(klen + ITEM_OVERHEAD));
    memcached_st *m = conn_get(s, err);
    if (!m)
        return DP_ENOMEM;
    memcached_return_t rc = memcached_set(m, key, klen, value, vlen, s->expire,
                                          (uint32_t)s->cfg->flags);
    int status = DP_OK;
    if (rc == MEMCACHED_E2BIG) {
        memcached_return_t r2;
        const memcached_instance_st *srv = memcached_server_by_key(m, key, klen, &r2);
        double limit = srv ? server_item_size_max(s, srv) : 0;
        if (srv && limit > 0)
            status = dp_err_set(err, DP_ETOOBIG, "a value of %zu bytes is larger than the item "
                                "size limit of server %s:%u (item_size_max = %.0f bytes, with "
                                "the key and header; memcached -I sets it)", vlen,
                                memcached_server_name(srv), (unsigned)memcached_server_port(srv),
                                limit);
        else
            status = dp_err_set(err, DP_ETOOBIG, "the server refused a value of %zu bytes as "
                                "larger than its item size limit (memcached -I)", vlen);
    } else if (!memcached_success(rc)) {
        status = mc_fail(m, "set", key, klen, rc, err);
    }
    conn_put(s, m);
    return status;
}

static int mc_del(void *self, const char *key, size_t klen, dp_err *err)
{
    mc *s = self;
    if (check_key(key, klen, err) != DP_OK)
        return err->code;
    memcached_st *m = conn_get(s, err);
    if (!m)
        return DP_ENOMEM;
    memcached_return_t rc = memcached_delete(m, key, klen, 0);
    int status = DP_OK;
    if (!memcached_success(rc) && rc != MEMCACHED_NOTFOUND)
        status = mc_fail(m, "delete", key, klen, rc, err);
    conn_put(s, m);
    return status;
}

/* One multi-get for n keys (dp_backend_ops.get_multi): values go into `out`
 * in key order, vlens[i] is key i's value length or -1 for a miss. memcached
 * answers in any order and only for hits, so answers are collected first and
 * matched back to the keys (every duplicate of a key gets the value). */
static int mc_get_multi(void *self, size_t n, const char *const *keys, const size_t *klens,
                        dp_bytes *out, int64_t *vlens, dp_err *err)
{
    mc *s = self;
    out->len = 0;
    for (size_t i = 0; i < n; i++) {
        vlens[i] = -1;
        if (check_key(keys[i], klens[i], err) != DP_OK)
            return err->code;
    }
    if (n == 0)
        return DP_OK;
    memcached_st *m = conn_get(s, err);
    if (!m)
        return DP_ENOMEM;
    memcached_return_t rc = memcached_mget(m, keys, klens, n);
    if (!memcached_success(rc)) {
        int st = mc_fail(m, "get_multi", keys[0], klens[0], rc, err);
        conn_put(s, m);
        return st;
    }
    int status = DP_OK;
    dp_bytes tmp = {0};
    size_t *offs = malloc(n * sizeof *offs);
    if (!offs)
        status = dp_err_set(err, DP_ENOMEM, "out of memory");
    memcached_result_st res_s;
    memcached_result_st *res = memcached_result_create(m, &res_s);
    size_t found = 0, cursor = 0;
    /* Every answer is read, even after a failure, so that none is left on
     * the connection for its next user. */
    while (res && (res = memcached_fetch_result(m, &res_s, &rc)) != NULL) {
        if (status != DP_OK)
            continue;
        const char *k = memcached_result_key_value(res);
        size_t kl = memcached_result_key_length(res);
        const char *v = memcached_result_value(res);
        size_t vl = memcached_result_length(res);
        size_t at = tmp.len;
        if (dp_bytes_reserve(&tmp, at + vl + 1) != DP_OK) {
            status = dp_err_set(err, DP_ENOMEM, "out of memory");
            continue;
        }
        memcpy(tmp.data + at, v, vl);
        tmp.len = at + vl;
        /* Answers come in request order (per server): look from just after
         * the last match, and stop at the first key it answers. */
        for (size_t j = 0; j < n; j++) {
            size_t i = cursor + j < n ? cursor + j : cursor + j - n;
            if (vlens[i] < 0 && klens[i] == kl && memcmp(keys[i], k, kl) == 0) {
                offs[i] = at;
                vlens[i] = (int64_t)vl;
                found++;
                cursor = i + 1 < n ? i + 1 : 0;
                break;
            }
        }
    }
    /* A key asked twice may have been answered once: share the answer. */
    if (status == DP_OK && found > 0 && found < n)
        for (size_t i = 0; i < n; i++) {
            if (vlens[i] >= 0)
                continue;
            for (size_t j = 0; j < n; j++)
                if (vlens[j] >= 0 && klens[j] == klens[i] && memcmp(keys[j], keys[i], klens[i]) == 0) {
                    offs[i] = offs[j];
                    vlens[i] = vlens[j];
                    found++;
                    break;
                }
        }
    memcached_result_free(&res_s);
    if (status == DP_OK && rc != MEMCACHED_END && rc != MEMCACHED_SUCCESS &&
        rc != MEMCACHED_NOTFOUND)
        status = mc_fail(m, "get_multi", keys[0], klens[0], rc, err);
    if (status == DP_OK) {
        size_t total = 0;
        for (size_t i = 0; i < n; i++)
            if (vlens[i] > 0)
                total += (size_t)vlens[i];
        if (dp_bytes_reserve(out, total + 1) != DP_OK) {
            status = dp_err_set(err, DP_ENOMEM, "out of memory");
        } else {
            for (size_t i = 0; i < n; i++)
                if (vlens[i] > 0) {
                    memcpy(out->data + out->len, tmp.data + offs[i], (size_t)vlens[i]);
                    out->len += (size_t)vlens[i];
                }
            atomic_fetch_add_explicit(&s->hits, found, memory_order_relaxed);
            atomic_fetch_add_explicit(&s->misses, n - found, memory_order_relaxed);
        }
    }
    if (status != DP_OK) {
        out->len = 0;
        for (size_t i = 0; i < n; i++)
            vlens[i] = -1;
    }
    dp_bytes_free(&tmp);
    free(offs);
    conn_put(s, m);
    return status;
}

static void mc_stats(void *self, dp_backend_stats *out)
{
    mc *s = self;
    out->hits = (double)atomic_load(&s->hits);
    out->misses = (double)atomic_load(&s->misses);
    out->max_bytes = 0;
}

/* -- The distributed lock --------------------------------------------------------- */

/* `<lock_prefix><key>`, or `<lock_prefix><sha1 hex of key>` when that would
 * pass memcached's key limit (Python's clients refuse such a key: no lock
 * to agree with). buf holds MAX_KEY + 1 bytes. */
static size_t lock_key(const mc *s, const char *key, size_t klen, char *buf)
{
    size_t plen = strlen(s->cfg->lock_prefix);
    memcpy(buf, s->cfg->lock_prefix, plen);
    if (plen + klen <= MAX_KEY) {
        memcpy(buf + plen, key, klen);
        return plen + klen;
    }
    char hex[41];
    dp_sha1_hex(key, klen, hex);
    memcpy(buf + plen, hex, 40);
    return plen + 40;
}

/* A token no other holder uses: host-unique enough through the pid, the
 * instance, a counter and the clock, and random bits against pid reuse on
 * other machines. */
static size_t make_token(mc *s, char *buf, size_t cap)
{
    uv_mutex_lock(&s->mu);
    uint64_t seq = ++s->token_seq;
    uv_mutex_unlock(&s->mu);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t r = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)(uintptr_t)s ^ ((uint64_t)rand() << 32);
    int n = snprintf(buf, cap, "%ld.%" PRIx64 ".%" PRIx64 ".%" PRIx64, (long)getpid(), seq,
                     (uint64_t)ts.tv_sec, r);
    return n > 0 && (size_t)n < cap ? (size_t)n : cap - 1;
}

/* With distributed_lock = false the lock is the core's alone (this process's
 * threads and Lua states), as dogpile.cache's distributed_lock=False: the
 * operations below take, release and wait for nothing on the servers. */

static int mc_lock(void *self, const char *key, size_t klen, double timeout, dp_err *err)
{
    mc *s = self;
    if (!s->cfg->distributed_lock)
        return DP_OK;
    char lk[MAX_KEY + 1];
    size_t lklen = lock_key(s, key, klen, lk);
    held *h = malloc(sizeof *h + klen);
    if (!h)
        return dp_err_set(err, DP_ENOMEM, "out of memory");
    h->tlen = make_token(s, h->token, sizeof h->token);
    h->klen = klen;
    memcpy(h->key, key, klen);
    dp_backoff bo;
    dp_backoff_init(&bo, timeout, s->cfg->lock_backoff_max);
    for (;;) {
        memcached_st *m = conn_get(s, err);
        if (!m) {
            free(h);
            return DP_ENOMEM;
        }
        memcached_return_t rc = memcached_add(m, lk, lklen, h->token, h->tlen, s->lock_expire, 0);
        if (memcached_success(rc)) {
            conn_put(s, m);
            h->taken = dp_clock_monotonic();
            uv_mutex_lock(&s->mu);
            h->next = s->locks;
            s->locks = h;
            uv_mutex_unlock(&s->mu);
            return DP_OK;
        }
        if (rc != MEMCACHED_NOTSTORED && rc != MEMCACHED_DATA_EXISTS) {
            int st = mc_fail(m, "add of the lock key", lk, lklen, rc, err);
            conn_put(s, m);
            free(h);
            return st;
        }
        conn_put(s, m);
        if (timeout == 0 || !dp_backoff_sleep(&bo)) {
            free(h);
            return timeout == 0 ? DP_EBUSY : DP_ETIMEDOUT;
        }
    }
}

/* memcached reads an expiry above 30 days as a Unix time: this one, in 1970,
 * makes an item expire at once. */
#define EXPIRED ((time_t)(30 * 24 * 3600 + 1))

/* Release: a compare-and-delete. `gets` returns the lock key's token and its
 * CAS unique; only when the token is ours is the key stored again with that
 * CAS and an expiry in the past, which memcached refuses if anyone changed
 * the key since the `gets` (it expired and another holder added it). So the
 * release is prompt whenever the lock is still ours, and never removes
 * another holder's. DP_ENOTHELD (with a message) when it was no longer ours. */
static int mc_unlock(void *self, const char *key, size_t klen, dp_err *err)
{
    mc *s = self;
    if (!s->cfg->distributed_lock)
        return DP_OK;
    uv_mutex_lock(&s->mu);
    held **pp = &s->locks, *h = NULL;
    for (; *pp; pp = &(*pp)->next)
        if ((*pp)->klen == klen && memcmp((*pp)->key, key, klen) == 0) {
            h = *pp;
            *pp = h->next;
            break;
        }
    uv_mutex_unlock(&s->mu);
    if (!h)
        return DP_ENOTHELD;
    double held_for = dp_clock_monotonic() - h->taken;
    char lk[MAX_KEY + 1];
    size_t lklen = lock_key(s, key, klen, lk);
    memcached_st *m = conn_get(s, err);
    if (!m) {
        free(h);
        return DP_ENOMEM;
    }
    memcached_behavior_set(m, MEMCACHED_BEHAVIOR_SUPPORT_CAS, 1);
    const char *keys[1] = {lk};
    size_t lens[1] = {lklen};
    int status = DP_OK, ours = 0;
    uint64_t cas = 0;
    memcached_return_t rc = memcached_mget(m, keys, lens, 1);
    if (!memcached_success(rc)) {
        status = mc_fail(m, "gets of the lock key", lk, lklen, rc, err);
    } else {
        memcached_result_st res_s;
        memcached_result_st *res = memcached_result_create(m, &res_s);
        while (res && memcached_fetch_result(m, &res_s, &rc) != NULL) {
            if (memcached_result_length(&res_s) == h->tlen &&
                memcmp(memcached_result_value(&res_s), h->token, h->tlen) == 0) {
                ours = 1;
                cas = memcached_result_cas(&res_s);
            }
        }
        memcached_result_free(&res_s);
        if (rc != MEMCACHED_END && rc != MEMCACHED_SUCCESS && rc != MEMCACHED_NOTFOUND)
            status = mc_fail(m, "gets of the lock key", lk, lklen, rc, err);
    }
    if (status == DP_OK && ours) {
        rc = memcached_cas(m, lk, lklen, "", 0, EXPIRED, 0, cas);
        if (rc == MEMCACHED_DATA_EXISTS || rc == MEMCACHED_NOTFOUND)
            ours = 0; /* expired and taken since the gets: theirs now */
        else if (!memcached_success(rc))
            status = mc_fail(m, "release (cas) of the lock key", lk, lklen, rc, err);
    }
    memcached_behavior_set(m, MEMCACHED_BEHAVIOR_SUPPORT_CAS, 0);
    conn_put(s, m);
    free(h);
    if (status == DP_OK && !ours)
        status = dp_err_set(err, DP_ENOTHELD, "the lock had expired after %.3f s (lock_timeout "
                            "%g s) and was left to whoever holds it now", held_for,
                            s->cfg->lock_timeout);
    return status;
}

/* Wait, without taking it, until the holder seen at the call lets go of the
 * lock: the lock key read with `get` at dp_backoff's steps (up to
 * lock_backoff_max) until it is gone or holds another token (a later holder is not waited
 * for). Polling, not a notification: a holder that dies is noticed when its
 * key expires, and waiters never depend on the release reaching them. */
static int mc_wait_unlocked(void *self, const char *key, size_t klen, double timeout,
                            dp_err *err)
{
    mc *s = self;
    if (!s->cfg->distributed_lock)
        return DP_OK;
    char lk[MAX_KEY + 1];
    size_t lklen = lock_key(s, key, klen, lk);
    char first[64];
    size_t flen = 0;
    int seen = 0;
    dp_backoff bo;
    dp_backoff_init(&bo, timeout, s->cfg->lock_backoff_max);
    for (;;) {
        memcached_st *m = conn_get(s, err);
        if (!m)
            return DP_ENOMEM;
        size_t vlen = 0;
        uint32_t flags;
        memcached_return_t rc;
        char *v = memcached_get(m, lk, lklen, &vlen, &flags, &rc);
        if (!v && rc != MEMCACHED_NOTFOUND && rc != MEMCACHED_SUCCESS) {
            int st = mc_fail(m, "get of the lock key", lk, lklen, rc, err);
            conn_put(s, m);
            return st;
        }
        conn_put(s, m);
        size_t cmp = vlen < sizeof first ? vlen : sizeof first;
        int held = v && (!seen || (vlen == flen && memcmp(v, first, cmp) == 0));
        if (v && !seen) {
            memcpy(first, v, cmp);
            flen = vlen;
            seen = 1;
        }
        free(v);
        if (!held)
            return DP_OK;
        if (timeout == 0 || !dp_backoff_sleep(&bo))
            return timeout == 0 ? DP_EBUSY : DP_ETIMEDOUT;
    }
}

/* -- Instances (the core shares them: one per set of arguments) ----------------------- */

static void mc_destroy(void *self)
{
    mc *s = self;
    for (size_t i = 0; i < s->npool; i++)
        memcached_free(s->pool[i]);
    free(s->pool);
    while (s->locks) {
        held *h = s->locks;
        s->locks = h->next;
        free(h);
    }
    if (s->master)
        memcached_free(s->master);
    uv_mutex_destroy(&s->mu);
    free(s);
}

static int behavior(mc *s, memcached_behavior_t b, uint64_t v, const char *what, dp_err *err)
{
    memcached_return_t rc = memcached_behavior_set(s->master, b, v);
    if (!memcached_success(rc))
        return dp_err_set(err, DP_EINVAL, NAME ": cannot set %s: %s", what,
                          memcached_strerror(s->master, rc));
    return DP_OK;
}

/* One server of the list: "host:port" or "host" (port 11211); host a name
 * or an IPv4 address (letters, digits, '.', '-', '_'), port 1 to 65535.
 * Checked here: libmemcached's parser turns what it cannot read into
 * 127.0.0.1:11211 or a port modulo 65536 without a word. */
static int check_server(const char *srv, size_t n, dp_err *err)
{
    const char *colon = memchr(srv, ':', n);
    size_t hlen = colon ? (size_t)(colon - srv) : n;
    int ok = hlen > 0;
    for (size_t i = 0; ok && i < hlen; i++) {
        unsigned char c = (unsigned char)srv[i];
        ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
             c == '.' || c == '-' || c == '_';
    }
    if (!ok)
        return dp_err_set(err, DP_EINVAL, NAME ": url '%.*s' does not parse: the host must be a "
                          "name or an address (\"host:port\")", (int)(n > 200 ? 200 : n), srv);
    if (!colon)
        return DP_OK;
    const char *port = colon + 1;
    size_t plen = n - hlen - 1;
    unsigned long v = 0;
    ok = plen > 0 && plen <= 5;
    for (size_t i = 0; ok && i < plen; i++) {
        ok = port[i] >= '0' && port[i] <= '9';
        v = v * 10 + (unsigned long)(port[i] - '0');
    }
    if (!ok || v < 1 || v > 65535)
        return dp_err_set(err, DP_EINVAL, NAME ": url '%.*s' does not parse: the port '%.*s' is "
                          "not a number from 1 to 65535", (int)(n > 200 ? 200 : n), srv,
                          (int)(plen > 40 ? 40 : plen), port);
    return DP_OK;
}

static int check_url(const char *list, dp_err *err)
{
    const char *p = list;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        int rc = check_server(p, n, err);
        if (rc != DP_OK)
            return rc;
        if (!end)
            return DP_OK;
        p = end + 1;
    }
}

static int mc_create(void *ud, const void *settings, void **self, dp_err *err)
{
    (void)ud;
    const mc_settings *cfg = settings;
    int rc = check_url(cfg->url, err);
    if (rc != DP_OK)
        return rc;
    memcached_server_st *servers = memcached_servers_parse(cfg->url);
    if (!servers || memcached_server_list_count(servers) == 0) {
        if (servers)
            memcached_server_list_free(servers);
        return dp_err_set(err, DP_EINVAL, NAME ": cannot parse url '%s' (expected \"host:port\" "
                          "or a list of them)", cfg->url);
    }
    mc *s = calloc(1, sizeof *s);
    if (!s) {
        memcached_server_list_free(servers);
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    }
    uv_mutex_init(&s->mu);
    s->cfg = cfg;
    s->expire = (time_t)ceil(cfg->expire);
    /* memcached counts relative expiry in whole seconds on a clock that
     * ticks once a second, so an expiry of N lives between N - 1 and N
     * seconds: N = ceil(lock_timeout) + 1 keeps the lock at least
     * lock_timeout and at most a second more. At most 30 days (beyond that
     * memcached reads an absolute time). */
    s->lock_expire = cfg->lock_timeout < 30 * 24 * 3600 - 1
        ? (time_t)ceil(cfg->lock_timeout) + 1 : 30 * 24 * 3600;
    s->master = memcached_create(NULL);
    if (!s->master || !memcached_success(memcached_server_push(s->master, servers))) {
        memcached_server_list_free(servers);
        mc_destroy(s);
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    }
    memcached_server_list_free(servers);
    uint64_t sock_ms = (uint64_t)ceil(cfg->socket_timeout * 1000);
    if ((rc = behavior(s, MEMCACHED_BEHAVIOR_DISTRIBUTION,
                       MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA, "distribution", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_KETAMA_HASH, hashes[cfg->hash], "hash", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_BINARY_PROTOCOL, cfg->binary, "binary", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_NO_BLOCK, cfg->noblock, "no_block", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_TCP_NODELAY, cfg->nodelay, "tcp_nodelay", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_TCP_KEEPALIVE, cfg->keepalive, "tcp_keepalive",
                       err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_POLL_TIMEOUT, sock_ms, "socket_timeout", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_SND_TIMEOUT, sock_ms * 1000, "socket_timeout", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_RCV_TIMEOUT, sock_ms * 1000, "socket_timeout", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT,
                       (uint64_t)ceil(cfg->connect_timeout * 1000), "connect_timeout", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_RETRY_TIMEOUT, (uint64_t)ceil(cfg->retry_timeout),
                       "retry_timeout", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_DEAD_TIMEOUT, (uint64_t)ceil(cfg->dead_timeout),
                       "dead_timeout", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_SERVER_FAILURE_LIMIT, (uint64_t)cfg->failure_limit,
                       "server_failure_limit", err)) ||
        (rc = behavior(s, MEMCACHED_BEHAVIOR_REMOVE_FAILED_SERVERS, cfg->remove_failed,
                       "remove_failed_servers", err))) {
        mc_destroy(s);
        return rc;
    }
    *self = s;
    return DP_OK;
}

static const dp_backend_ops mc_ops = {
    .name = NAME,
    .args = mc_args,
    .settings_size = sizeof(mc_settings),
    .create = mc_create,
    .destroy = mc_destroy,
    .get = mc_get,
    .set = mc_set,
    .del = mc_del,
    .stats = mc_stats,
    .infallible = 0,
    .lock = mc_lock,
    .unlock = mc_unlock,
    .wait_unlocked = mc_wait_unlocked,
    .get_multi = mc_get_multi,
};

/* -- Lua module -------------------------------------------------------------------------
 * `require "dogpile.backends.memcached"` registers the ops with the core
 * (which pins this module); lua/dogpile/cache/backends/memcached.lua opens
 * instances. */

int luaopen_dogpile_backends_memcached(lua_State *L);

__attribute__((visibility("default"))) int luaopen_dogpile_backends_memcached(lua_State *L)
{
    int rc = dp_backend_register(&mc_ops, NULL);
    if (rc != DP_OK)
        return luaL_error(L, NAME ": cannot register the backend: %s", dp_strerror(rc));
    lua_pushstring(L, NAME);
    return 1;
}
