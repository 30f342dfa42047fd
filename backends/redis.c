/* redis.c -- dogpile.cache.redis and dogpile.cache.redis_sentinel: a cache on
 * a Redis server, shared by every process and machine that reaches it, with a
 * distributed lock per key.
 *
 * Instances. The arguments are declared in one table per name (rd_args,
 * rs_args) that the core reads; every argument but the nginx-only pool
 * settings names the instance (DP_SPEC_KEY), so regions configured alike
 * share one instance per process, and every Lua state and thread draws on
 * its connection pool. The lock domain (and the circuit breaker) is named by
 * the store alone (DP_SPEC_DOMAIN: server, db, lock prefix): regions on one
 * server with other timeouts have instances of their own, and their threads
 * still meet at the core's per-key lock.
 *
 * Connections. A pool of idle hiredis contexts behind the instance's mutex:
 * an operation takes one (or connects a new one), uses it alone, and gives it
 * back, so a context is never used by two threads at once. A context that
 * saw an I/O or protocol error is freed, not returned, and the pool's
 * generation is bumped so that the idle contexts opened before the failure
 * are dropped too: after a server restart the next operation reconnects.
 * When an operation fails on a reused context because the server closed it
 * (EOF, reset), it is retried once on a fresh connection, since the old
 * connection may simply have outlived a restart. Every call is bounded by
 * socket_timeout (connecting by connect_timeout). A fork()ed child drops the
 * parent's contexts (their sockets belong to the parent's protocol state).
 *
 * Sentinel. With `sentinels`, a new connection first asks each sentinel in
 * turn for the master of `service_name`, connects there and checks with ROLE
 * that it is a master; a READONLY reply (a demoted master) counts as a
 * connection failure, so the next operation asks the sentinels again.
 *
 * The lock. SET <lock_prefix><key> <token> NX PX <lock_timeout>, the token 16
 * random bytes in hex. The token is kept in the instance by key, so any
 * thread of the process may release (the async creation runner does). The
 * release deletes the lock key only if it still holds our token, atomically
 * in a server-side script; when the lock expired meanwhile (creation outlived
 * lock_timeout) it returns DP_ENOTHELD and leaves whoever holds it now alone.
 * The holder's own SET of the key (the creator storing its value, on the
 * thread that took the lock) sends the release in the same pipeline: one
 * round trip, and the waiters are woken a round trip sooner; unlock() then
 * only reports how that release went.
 * A bounded wait subscribes a connection of its own to a channel named like
 * the lock key, whose release PUBLISHes on it, and retries SET NX at each
 * message, or at dp_backoff's steps up to lock_sleep without one (a holder
 * that died leaves its lock to expire, which publishes nothing). Waiting for a
 * release without taking the lock (wait_unlocked) subscribes the same way and
 * returns at the first message, or when a poll finds the key gone or holding
 * another token.
 *
 * Change notification (notify_channel, for dogpile.cache.tiered). Every
 * write (SET, DEL and their multi forms) is followed, in the same pipeline
 * on the same connection, by a PUBLISH of the keys it changed, so the
 * message can never overtake the write. A listener thread per instance (so
 * per process) keeps a connection of its own SUBSCRIBEd to the channel and
 * pushes the keys others published into the change feed `notify_feed`
 * (core/feed.c); its own instance's messages carry its sender tag and are
 * skipped (the writer pushed them itself). The channel is lost when its
 * connection fails: the listener reconnects with a backoff (10 ms doubling to
 * 100 ms: a server back is heard within about 100 ms, which bounds how long
 * a copy may outlive a change made right after it returned), and once
 * subscribed again resets the feed, since what changed in the gap was
 * announced to nobody; readers then drop their copies.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <uv.h>

#include <hiredis/hiredis.h>
#include <hiredis/sds.h>
#include <lauxlib.h>
#include <lua.h>

#include "dogpile.h"
#include "dogpile_feed.h"
#include "redis_io.h"

#define NAME "dogpile.cache.redis"
#define SENTINEL_NAME "dogpile.cache.redis_sentinel"
#define MAX_SENTINELS 16

/* Deletes the lock if it is ours, then wakes the waiters subscribed to the
 * channel named like the lock key (pcall: a server that refuses PUBLISH,
 * an ACL say, still gets the lock deleted, and the waiters poll). With a
 * second key, the value's, the message carries what that key holds now
 * ("=" then the bytes, when at most 64 KiB), so that the waiters it wakes
 * need not each GET it (the bound keeps a large value from being copied to
 * every subscriber); otherwise it is empty, a bare wake-up.
 * The cosocket transport (redis_cosocket.lua) sends the same text with the
 * lock key alone. */
static const char UNLOCK_SCRIPT[] =
    "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) "
    "local v = KEYS[2] and redis.pcall('get', KEYS[2]) "
    "if type(v) == 'string' and #v <= 65536 then v = '=' .. v else v = '' end "
    "redis.pcall('publish', KEYS[1], v) return 1 "
    "else return 0 end";

/* The script is sent by its SHA1 (EVALSHA: 40 bytes, and no hashing of the
 * body by the server at each release); a server that does not know it yet
 * (NOSCRIPT: restarted, flushed) gets the body once with EVAL, which
 * caches it. */
static char unlock_sha[41];
static pthread_once_t unlock_sha_once = PTHREAD_ONCE_INIT;

static void unlock_sha_init(void)
{
    dp_sha1_hex(UNLOCK_SCRIPT, sizeof UNLOCK_SCRIPT - 1, unlock_sha);
}

static int noscript(const redisReply *r)
{
    return r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0;
}

/* -- Arguments: the struct the core fills, and the tables it fills it by -- */

typedef struct rd_settings {
    char *host;              /* a path (starting with '/'): a unix socket */
    int64_t port, db;
    char *username, *password;
    double socket_timeout, connect_timeout;
    double ttl;              /* redis_expiration_time: PX of every SET; 0: none */
    int distributed_lock;
    double lock_timeout, lock_sleep;
    char *lock_prefix, *notify_channel, *notify_feed;
    char *sentinels;         /* redis_sentinel: "host:port,host:port" (the Lua module joins a list) */
    char *service;           /* redis_sentinel: service_name */
    int64_t pool_size;       /* inside nginx only: read there by the cosocket transport */
    double pool_idle_timeout;
} rd_settings;

static int parse_url(void *settings, const dp_arg *a, dp_err *err);

#define KEY DP_SPEC_KEY
#define STORE (DP_SPEC_KEY | DP_SPEC_DOMAIN)
#define F(field) offsetof(rd_settings, field)
/* What both names accept after how they find the server. */
#define COMMON_ARGS                                                                         \
    {.name = "db", .kind = DP_SPEC_INT, .flags = STORE, .offset = F(db)},                   \
    {.name = "username", .kind = DP_SPEC_STR, .flags = KEY, .offset = F(username)},         \
    {.name = "password", .kind = DP_SPEC_STR, .flags = KEY, .offset = F(password)},         \
    {.name = "socket_timeout", .kind = DP_SPEC_SECONDS, .flags = KEY | DP_SPEC_ABOVE_MIN,   \
     .def = 1, .offset = F(socket_timeout)},                                                \
    {.name = "connect_timeout", .kind = DP_SPEC_SECONDS, .flags = KEY | DP_SPEC_ABOVE_MIN,  \
     .def = 1, .offset = F(connect_timeout)},                                               \
    {.name = "redis_expiration_time", .kind = DP_SPEC_SECONDS,                              \
     .flags = KEY | DP_SPEC_ABOVE_MIN, .offset = F(ttl)},                                   \
    {.name = "distributed_lock", .kind = DP_SPEC_BOOL, .flags = KEY, .def = 1,              \
     .offset = F(distributed_lock)},                                                        \
    {.name = "lock_timeout", .kind = DP_SPEC_SECONDS,                                       \
     .flags = KEY | DP_SPEC_ABOVE_MIN | DP_SPEC_LOCK_TIMEOUT, .def = 30,                    \
     .what = "a positive, finite number of seconds (the lock's expiry in Redis)",           \
     .offset = F(lock_timeout)},                                                            \
    {.name = "lock_sleep", .kind = DP_SPEC_SECONDS, .flags = KEY | DP_SPEC_ABOVE_MIN,       \
     .def = 0.1, .offset = F(lock_sleep)},                                                  \
    {.name = "lock_prefix", .kind = DP_SPEC_STR, .flags = STORE, .def_str = "_lock",        \
     .offset = F(lock_prefix)},                                                             \
    {.name = "notify_channel", .kind = DP_SPEC_STR, .flags = KEY, .min = 1,                 \
     .offset = F(notify_channel)},                                                          \
    {.name = "notify_feed", .kind = DP_SPEC_STR, .flags = KEY, .min = 1,                    \
     .offset = F(notify_feed)},                                                             \
    /* Read inside nginx (redis_cosocket.lua), accepted and unused here, so   \
     * that one regions file serves both: checked, never compared. */         \
    {.name = "pool_size", .kind = DP_SPEC_INT, .flags = DP_SPEC_HANDLE, .min = 1, .def = 30,\
     .offset = F(pool_size)},                                                               \
    {.name = "pool_idle_timeout", .kind = DP_SPEC_SECONDS,                                  \
     .flags = DP_SPEC_HANDLE | DP_SPEC_ABOVE_MIN, .def = 60, .offset = F(pool_idle_timeout)}, \
    {0}

/* url first: host, port and db given as well override its parts. */
static const dp_arg_spec rd_args[] = {
    {.name = "url", .kind = DP_SPEC_CUSTOM, .parse = parse_url},
    {.name = "host", .kind = DP_SPEC_STR, .flags = STORE, .min = 1, .def_str = "127.0.0.1",
     .offset = F(host)},
    {.name = "port", .kind = DP_SPEC_INT, .flags = STORE, .min = 1, .max = 65535, .def = 6379,
     .offset = F(port)},
    COMMON_ARGS,
};

static const dp_arg_spec rs_args[] = {
    {.name = "sentinels", .kind = DP_SPEC_STR, .flags = STORE | DP_SPEC_REQUIRED, .min = 1,
     .what = "a non-empty list of {host, port}", .offset = F(sentinels)},
    {.name = "service_name", .kind = DP_SPEC_STR, .flags = STORE | DP_SPEC_REQUIRED, .min = 1,
     .offset = F(service)},
    COMMON_ARGS,
};
#undef COMMON_ARGS
#undef F
#undef STORE
#undef KEY

/* -- Instance ------------------------------------------------------------------- */

typedef struct conn {
    struct conn *next;
    redisContext *c;
    unsigned gen;
    int unsub_due;     /* in inst.unsubbing: still subscribed, UNSUBSCRIBE not sent */
} conn;

/* Frees a list of connections (linked by next), closing their sockets. */
static void conns_free(conn *list)
{
    while (list) {
        conn *c = list;
        list = c->next;
        redisFree(c->c);
        free(c);
    }
}

typedef struct held {
    struct held *next;
    char *key;
    size_t klen;
    char token[33];
    uv_thread_t thread; /* the thread that took it: its set of the key releases it */
    int released;       /* by that set (set_release): 1 as ours, 2 found no longer ours */
} held;

typedef struct inst {
    const rd_settings *cfg; /* the core's: valid until destroy */
    const char *name;  /* NAME or SENTINEL_NAME, for messages */
    int unix_socket;   /* cfg->host is a socket's path */
    int nsentinels;
    char *sentinel_host[MAX_SENTINELS];
    int sentinel_port[MAX_SENTINELS];
    size_t prefix_len;
    /* state */
    uv_mutex_t mu;     /* pool, gen, pid, held, master */
    conn *idle;
    unsigned gen;
    pid_t pid;
    held *held;
    conn *unsubbing;   /* waiters' connections whose UNSUBSCRIBE is not read yet */
    int nunsubbing;
    _Atomic int unsub_due; /* how many of them have not even sent it (unsub_flush) */
    char master[300];  /* sentinel mode: "host:port" last connected to */
    _Atomic uint64_t hits, misses;
    /* change notification (NULL channel: none) */
    char sender[17];   /* this instance's tag on its messages */
    dp_feed *feed;
    uv_thread_t listener;
    int listening;
    _Atomic int stop, subscribed;
} inst;

/* -- Connections -------------------------------------------------------------- */

/* Where an instance connects, for messages. */
static void where(inst *s, char *buf, size_t n)
{
    if (s->nsentinels) {
        uv_mutex_lock(&s->mu);
        snprintf(buf, n, "master '%s' at %s", s->cfg->service,
                 s->master[0] ? s->master : "(unknown)");
        uv_mutex_unlock(&s->mu);
    } else if (s->unix_socket) {
        snprintf(buf, n, "unix:%s", s->cfg->host);
    } else {
        snprintf(buf, n, "%s:%d", s->cfg->host, (int)s->cfg->port);
    }
}

/* Describe a context error: a timeout says so with the limit. */
static int io_fail(inst *s, redisContext *c, const char *op, dp_err *err)
{
    char w[320];
    where(s, w, sizeof w);
    if (c->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ETIMEDOUT ||
                                   strstr(c->errstr, "temporarily unavailable")))
        return dp_err_set(err, DP_EBACKEND, "%s: no answer from %s within socket_timeout (%g s)",
                          op, w, s->cfg->socket_timeout);
    return dp_err_set(err, DP_EBACKEND, "%s: %s: %s", op, w,
                      c->errstr[0] ? c->errstr : "connection lost");
}

static redisReply *command(redisContext *c, int argc, const char **argv, const size_t *lens)
{
    return redisCommandArgv(c, argc, argv, lens);
}

/* Open a connection to host:port (or the unix socket) with the timeouts set;
 * DP_EBACKEND with err on failure. */
static int raw_connect(inst *s, const char *host, int port, const char *unix_path,
                       redisContext **out, dp_err *err)
{
    struct timeval ct = tv_of(s->cfg->connect_timeout);
    redisContext *c = unix_path ? redisConnectUnixWithTimeout(unix_path, ct)
                                : redisConnectWithTimeout(host, port, ct);
    if (!c)
        return dp_err_set(err, DP_ENOMEM, "out of memory connecting");
    if (c->err) {
        int timed_out = c->err == REDIS_ERR_IO && (errno == EINPROGRESS || errno == ETIMEDOUT ||
                                                   strstr(c->errstr, "timed out"));
        if (unix_path)
            dp_err_set(err, DP_EBACKEND, "cannot connect to unix:%s: %s", unix_path, c->errstr);
        else if (timed_out)
            dp_err_set(err, DP_EBACKEND, "cannot connect to %s:%d within connect_timeout (%g s)",
                       host, port, s->cfg->connect_timeout);
        else
            dp_err_set(err, DP_EBACKEND, "cannot connect to %s:%d: %s", host, port, c->errstr);
        redisFree(c);
        return DP_EBACKEND;
    }
    redisSetTimeout(c, tv_of(s->cfg->socket_timeout));
    if (!unix_path)
        redisEnableKeepAlive(c);
    *out = c;
    return DP_OK;
}

/* Ask the sentinels for the master's address. */
static int sentinel_master(inst *s, char *host, size_t hostn, int *port, dp_err *err)
{
    char last[256] = "no sentinel answered";
    for (int i = 0; i < s->nsentinels; i++) {
        redisContext *c;
        dp_err e;
        if (raw_connect(s, s->sentinel_host[i], s->sentinel_port[i], NULL, &c, &e) != DP_OK) {
            snprintf(last, sizeof last, "%.255s", e.msg);
            continue;
        }
        redisReply *r = redisCommand(c, "SENTINEL get-master-addr-by-name %s", s->cfg->service);
        if (!r) {
            snprintf(last, sizeof last, "sentinel %s:%d: %s", s->sentinel_host[i],
                     s->sentinel_port[i], c->errstr);
        } else if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
                   r->element[0]->type == REDIS_REPLY_STRING &&
                   r->element[1]->type == REDIS_REPLY_STRING) {
            snprintf(host, hostn, "%s", r->element[0]->str);
            *port = atoi(r->element[1]->str);
            freeReplyObject(r);
            redisFree(c);
            return DP_OK;
        } else if (r->type == REDIS_REPLY_ERROR) {
            snprintf(last, sizeof last, "sentinel %s:%d: %s", s->sentinel_host[i],
                     s->sentinel_port[i], r->str);
        } else {
            snprintf(last, sizeof last, "sentinel %s:%d knows no master named '%s'",
                     s->sentinel_host[i], s->sentinel_port[i], s->cfg->service);
        }
        if (r)
            freeReplyObject(r);
        redisFree(c);
    }
    return dp_err_set(err, DP_EBACKEND, "cannot find the master of '%s' through %d sentinel(s): %s",
                      s->cfg->service, s->nsentinels, last);
}

/* Run one setup command on a fresh connection. DP_EINVAL for a refusal
 * (wrong password, unknown db): a configuration error, not an outage. */
static int setup_cmd(inst *s, redisContext *c, int argc, const char **argv, const char *what,
                     dp_err *err)
{
    redisReply *r = command(c, argc, argv, NULL);
    if (!r)
        return io_fail(s, c, what, err);
    int rc = DP_OK;
    if (r->type == REDIS_REPLY_ERROR)
        rc = dp_err_set(err, DP_EINVAL, "%s refused: %s", what, r->str);
    freeReplyObject(r);
    return rc;
}

/* A new connection, authenticated, on the right db (and to the master). */
static int conn_open(inst *s, redisContext **out, dp_err *err)
{
    const rd_settings *cfg = s->cfg;
    char host[256];
    int port = (int)cfg->port, rc;
    const char *h = cfg->host;
    if (s->nsentinels) {
        if ((rc = sentinel_master(s, host, sizeof host, &port, err)) != DP_OK)
            return rc;
        h = host;
        uv_mutex_lock(&s->mu);
        snprintf(s->master, sizeof s->master, "%s:%d", host, port);
        uv_mutex_unlock(&s->mu);
    }
    redisContext *c;
    if ((rc = raw_connect(s, h, port, s->unix_socket ? cfg->host : NULL, &c, err)) != DP_OK)
        return rc;
    if (cfg->password) {
        const char *argv[3] = {"AUTH", cfg->username ? cfg->username : cfg->password,
                               cfg->password};
        char what[300];
        if (cfg->username)
            snprintf(what, sizeof what, "AUTH as user '%s'", cfg->username);
        else
            snprintf(what, sizeof what, "AUTH with the password");
        rc = setup_cmd(s, c, cfg->username ? 3 : 2, argv, what, err);
    }
    if (rc == DP_OK && cfg->db != 0) {
        char db[32], what[64];
        snprintf(db, sizeof db, "%lld", (long long)cfg->db);
        snprintf(what, sizeof what, "SELECT of db %lld", (long long)cfg->db);
        const char *argv[2] = {"SELECT", db};
        rc = setup_cmd(s, c, 2, argv, what, err);
    }
    if (rc == DP_OK && s->nsentinels) {
        redisReply *r = redisCommand(c, "ROLE");
        if (!r) {
            rc = io_fail(s, c, "ROLE", err);
        } else {
            if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
                r->element[0]->type != REDIS_REPLY_STRING ||
                strcmp(r->element[0]->str, "master") != 0)
                rc = dp_err_set(err, DP_EBACKEND, "%s:%d, given by the sentinels as the master "
                                "of '%s', is not a master (yet)", h, port, cfg->service);
            freeReplyObject(r);
        }
    }
    if (rc != DP_OK) {
        redisFree(c);
        return rc;
    }
    *out = c;
    return DP_OK;
}

/* Take a connection: an idle one of the current generation, or a new one.
 * *reused says which. */
static int conn_take(inst *s, conn **out, int *reused, dp_err *err)
{
    conn *stale = NULL, *got = NULL;
    uv_mutex_lock(&s->mu);
    pid_t pid = self_pid();
    if (s->pid != pid) {
        /* A fork()ed child: the idle sockets are the parent's. */
        stale = s->idle;
        s->idle = NULL;
        s->pid = pid;
        s->gen++;
    }
    while (s->idle && !got) {
        conn *c = s->idle;
        s->idle = c->next;
        if (c->gen == s->gen) {
            got = c;
        } else {
            c->next = stale;
            stale = c;
        }
    }
    unsigned gen = s->gen;
    uv_mutex_unlock(&s->mu);
    conns_free(stale);
    if (got) {
        *reused = 1;
        *out = got;
        return DP_OK;
    }
    *reused = 0;
    conn *c = malloc(sizeof *c);
    if (!c)
        return dp_err_set(err, DP_ENOMEM, "out of memory");
    /* Connecting sends AUTH/SELECT through hiredis's own write(): mask
     * SIGPIPE there (a new connection only). */
    nopipe np;
    nopipe_begin(&np);
    int rc = conn_open(s, &c->c, err);
    nopipe_end(&np);
    if (rc != DP_OK) {
        free(c);
        return rc;
    }
    c->gen = gen;
    c->next = NULL;
    c->unsub_due = 0;
    *out = c;
    return DP_OK;
}

/* Give a connection back; `broken` frees it and drops the older idle ones. */
static void conn_give(inst *s, conn *c, int broken)
{
    uv_mutex_lock(&s->mu);
    if (broken) {
        if (c->gen == s->gen)
            s->gen++;
    } else if (c->gen == s->gen && s->pid == self_pid()) {
        c->next = s->idle;
        s->idle = c;
        c = NULL;
    }
    uv_mutex_unlock(&s->mu);
    if (c) {
        redisFree(c->c);
        free(c);
    }
}

/* The server closed the connection: worth one retry on a fresh one. */
/* A reply that means this connection must not be used again. */
static int reply_breaks(const redisReply *r)
{
    return r->type == REDIS_REPLY_ERROR &&
           (strncmp(r->str, "READONLY", 8) == 0 || strncmp(r->str, "LOADING", 7) == 0 ||
            strncmp(r->str, "MASTERDOWN", 10) == 0);
}

/* Send `argc` commands' worth of pipeline (ncmd commands built by `build`)
 * and collect their replies into replies[0..ncmd-1]. Retries once on a fresh
 * connection when a reused one was closed by the server. The caller frees
 * the replies. */
typedef void (*build_fn)(redisContext *c, void *ud);

static int run_io(inst *s, const char *op, build_fn build, void *ud, size_t ncmd,
                  redisReply **replies, dp_err *err);

static int run(inst *s, const char *op, build_fn build, void *ud, size_t ncmd,
               redisReply **replies, dp_err *err)
{
    int saved = errno, rc = run_io(s, op, build, ud, ncmd, replies, err);
    errno = saved;
    return rc;
}

static void unsub_flush(inst *s);

static int run_io(inst *s, const char *op, build_fn build, void *ud, size_t ncmd,
                  redisReply **replies, dp_err *err)
{
    if (atomic_load_explicit(&s->unsub_due, memory_order_relaxed))
        unsub_flush(s);
    for (int attempt = 0;; attempt++) {
        conn *cn;
        int reused, rc = conn_take(s, &cn, &reused, err);
        if (rc != DP_OK)
            return rc;
        redisContext *c = cn->c;
        build(c, ud);
        size_t got = 0;
        int failed = send_nosignal(c) != REDIS_OK;
        for (; !failed && got < ncmd; got++) {
            void *r = NULL;
            if (redisGetReply(c, &r) != REDIS_OK || !r) {
                failed = 1;
                break;
            }
            replies[got] = r;
        }
        if (!failed) {
            int broken = 0;
            for (size_t i = 0; i < ncmd; i++)
                if (reply_breaks(replies[i]))
                    broken = 1;
            if (broken) {
                char w[320];
                where(s, w, sizeof w);
                dp_err_set(err, DP_EBACKEND, "%s: %s: %s", op, w, replies[0]->type ==
                           REDIS_REPLY_ERROR ? replies[0]->str : "the server refused a command");
                for (size_t i = 0; i < ncmd; i++)
                    freeReplyObject(replies[i]);
                conn_give(s, cn, 1);
                return DP_EBACKEND;
            }
            conn_give(s, cn, 0);
            return DP_OK;
        }
        for (size_t i = 0; i < got; i++)
            freeReplyObject(replies[i]);
        int retry = reused && attempt == 0 && closed_by_peer(c);
        if (!retry)
            io_fail(s, c, op, err);
        conn_give(s, cn, 1);
        if (!retry)
            return DP_EBACKEND;
    }
}

typedef struct argv_cmd {
    int argc;
    const char **argv;
    const size_t *lens;
} argv_cmd;

static void build_argv(redisContext *c, void *ud)
{
    argv_cmd *a = ud;
    redisAppendCommandArgv(c, a->argc, a->argv, a->lens);
}

/* One command; the reply in *out (not an error reply: those become err). */
static int run1(inst *s, const char *op, int argc, const char **argv, const size_t *lens,
                redisReply **out, dp_err *err)
{
    argv_cmd a = {argc, argv, lens};
    int rc = run(s, op, build_argv, &a, 1, out, err);
    if (rc != DP_OK)
        return rc;
    if ((*out)->type == REDIS_REPLY_ERROR) {
        char w[320];
        where(s, w, sizeof w);
        dp_err_set(err, DP_EBACKEND, "%s: %s: %s", op, w, (*out)->str);
        freeReplyObject(*out);
        return DP_EBACKEND;
    }
    return DP_OK;
}

/* -- Values ------------------------------------------------------------------- */

/* A release's value, taken from its message by a waiter (rd_wait_unlocked)
 * for the GET that follows it on the same thread (rd_get): that waiter then
 * reads the value the holder stored without a round trip of its own. Kept
 * per thread, for one use, for at most STASH_SECONDS, and dropped by any
 * other operation of the thread on the instance. */
#define STASH_SECONDS 0.05
static __thread struct {
    const void *owner; /* the instance */
    char *key, *msg;   /* msg: the whole message, "=" then the value */
    size_t klen, vlen;
    double at;
} stash;

static void stash_drop(void)
{
    free(stash.key);
    free(stash.msg);
    stash.key = stash.msg = NULL;
    stash.owner = NULL;
}

/* Keep the value of a release message ("=" and the bytes) for `key`. The
 * message (malloc'd) is handed over, not copied: the stash frees it. */
static void stash_keep(const void *owner, const char *key, size_t klen, char *msg, size_t mlen)
{
    stash_drop();
    if (mlen < 1 || msg[0] != '=') {
        free(msg); /* a bare wake-up (or a value too large to carry) */
        return;
    }
    char *k = malloc(klen + 1);
    if (!k) {
        free(msg);
        return;
    }
    memcpy(k, key, klen);
    stash.owner = owner;
    stash.key = k;
    stash.klen = klen;
    stash.msg = msg;
    stash.vlen = mlen - 1;
    stash.at = dp_clock_monotonic();
}

/* Whether `key`'s value is stashed: then it is copied to `out` (the one copy
 * between the message and the caller) and dropped. Anything else stashed is
 * dropped too: it was for the read right after a wait, and this is not that
 * read. */
static int stash_take(const void *owner, const char *key, size_t klen, dp_bytes *out)
{
    if (!stash.owner)
        return 0;
    int mine = stash.owner == owner && stash.klen == klen && memcmp(stash.key, key, klen) == 0 &&
               dp_clock_monotonic() - stash.at <= STASH_SECONDS &&
               dp_bytes_reserve(out, stash.vlen) == DP_OK;
    if (mine) {
        if (stash.vlen)
            memcpy(out->data, stash.msg + 1, stash.vlen);
        out->len = stash.vlen;
    }
    stash_drop();
    return mine;
}


static int rd_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    inst *s = self;
    if (stash.owner && stash_take(s, key, klen, out)) {
        atomic_fetch_add_explicit(&s->hits, 1, memory_order_relaxed);
        return DP_OK;
    }
    const char *argv[2] = {"GET", key};
    size_t lens[2] = {3, klen};
    redisReply *r;
    int rc = run1(s, "GET", 2, argv, lens, &r, err);
    if (rc != DP_OK)
        return rc;
    if (r->type == REDIS_REPLY_NIL) {
        freeReplyObject(r);
        atomic_fetch_add_explicit(&s->misses, 1, memory_order_relaxed);
        return DP_ENOTFOUND;
    }
    if (r->type != REDIS_REPLY_STRING) {
        freeReplyObject(r);
        return dp_err_set(err, DP_EBACKEND, "GET: the key holds a value of another type");
    }
    if (dp_bytes_reserve(out, r->len) != DP_OK) {
        freeReplyObject(r);
        return dp_err_set(err, DP_ENOMEM, "out of memory copying a %zu-byte value", r->len);
    }
    if (r->len) /* an empty value into a buffer never grown: data is NULL */
        memcpy(out->data, r->str, r->len);
    out->len = r->len;
    freeReplyObject(r);
    atomic_fetch_add_explicit(&s->hits, 1, memory_order_relaxed);
    return DP_OK;
}

/* The PX argument of a SET with redis_expiration_time; 0 without. */
static long long ttl_ms(const inst *s)
{
    return s->cfg->ttl > 0 ? (long long)ceil(s->cfg->ttl * 1000) : 0;
}

/* -- Change notification: the publishing side ------------------------------------ */

/* The message for n changed keys: the sender tag (16 bytes), then each key
 * as "<length>:<bytes>". */
static int notify_payload(inst *s, size_t n, const char *const *keys, const size_t *klens,
                          char **out, size_t *outlen, dp_err *err)
{
    size_t cap = 16;
    for (size_t i = 0; i < n; i++)
        cap += klens[i] + 24;
    char *p = malloc(cap);
    if (!p)
        return dp_err_set(err, DP_ENOMEM, "out of memory");
    memcpy(p, s->sender, 16);
    size_t len = 16;
    for (size_t i = 0; i < n; i++) {
        len += (size_t)snprintf(p + len, cap - len, "%zu:", klens[i]);
        memcpy(p + len, keys[i], klens[i]);
        len += klens[i];
    }
    *out = p;
    *outlen = len;
    return DP_OK;
}

typedef struct notified {
    build_fn build;
    void *ud;
    inst *s;
    const char *payload;
    size_t plen;
} notified;

static void build_notified(redisContext *c, void *ud)
{
    notified *w = ud;
    w->build(c, w->ud);
    const char *argv[3] = {"PUBLISH", w->s->cfg->notify_channel, w->payload};
    size_t lens[3] = {7, strlen(w->s->cfg->notify_channel), w->plen};
    redisAppendCommandArgv(c, 3, argv, lens);
}

/* run() a write of n keys; with notify_channel, its PUBLISH follows in the
 * same pipeline (replies must then hold ncmd + 1; the PUBLISH reply is
 * consumed here). A refused PUBLISH fails the write: a change nobody hears
 * of would leave other processes' copies stale. */
static int run_write(inst *s, const char *op, build_fn build, void *ud, size_t ncmd,
                     redisReply **replies, size_t n, const char *const *keys,
                     const size_t *klens, dp_err *err)
{
    if (!s->cfg->notify_channel)
        return run(s, op, build, ud, ncmd, replies, err);
    char *payload = NULL;
    size_t plen = 0;
    int rc = notify_payload(s, n, keys, klens, &payload, &plen, err);
    if (rc != DP_OK)
        return rc;
    notified w = {build, ud, s, payload, plen};
    rc = run(s, op, build_notified, &w, ncmd + 1, replies, err);
    free(payload);
    if (rc != DP_OK)
        return rc;
    redisReply *pub = replies[ncmd];
    if (pub->type == REDIS_REPLY_ERROR) {
        rc = dp_err_set(err, DP_EBACKEND, "%s: PUBLISH on '%s' refused: %s", op,
                        s->cfg->notify_channel, pub->str);
        for (size_t i = 0; i < ncmd; i++)
            freeReplyObject(replies[i]);
    }
    freeReplyObject(pub);
    return rc;
}

/* One write command changing n keys, with its notification. */
static int write1(inst *s, const char *op, int argc, const char **argv, const size_t *lens,
                  size_t n, const char *const *keys, const size_t *klens, dp_err *err)
{
    argv_cmd a = {argc, argv, lens};
    redisReply *r[2];
    int rc = run_write(s, op, build_argv, &a, 1, r, n, keys, klens, err);
    if (rc != DP_OK)
        return rc;
    if (r[0]->type == REDIS_REPLY_ERROR) {
        char w[320];
        where(s, w, sizeof w);
        rc = dp_err_set(err, DP_EBACKEND, "%s: %s: %s", op, w, r[0]->str);
    }
    freeReplyObject(r[0]);
    return rc;
}

static held *held_take(inst *s, const char *key, size_t klen, int mine);
static void held_put(inst *s, held *h);
static int set_release(inst *s, held *h, argv_cmd *set, const char *key, size_t klen,
                       dp_err *err);

static int rd_set(void *self, const char *key, size_t klen, const char *value, size_t vlen,
                  dp_err *err)
{
    if (stash.owner)
        stash_drop();
    inst *s = self;
    char px[32];
    long long ms = ttl_ms(s);
    int n = snprintf(px, sizeof px, "%lld", ms);
    const char *argv[5] = {"SET", key, value, "PX", px};
    size_t lens[5] = {3, klen, vlen, 2, (size_t)n};
    if (s->cfg->distributed_lock) {
        held *h = held_take(s, key, klen, 1);
        if (h) {
            argv_cmd set = {ms ? 5 : 3, argv, lens};
            return set_release(s, h, &set, key, klen, err);
        }
    }
    return write1(s, "SET", ms ? 5 : 3, argv, lens, 1, &key, &klen, err);
}

static int rd_del(void *self, const char *key, size_t klen, dp_err *err)
{
    if (stash.owner)
        stash_drop();
    inst *s = self;
    const char *argv[2] = {"DEL", key};
    size_t lens[2] = {3, klen};
    return write1(s, "DEL", 2, argv, lens, 1, &key, &klen, err);
}

/* -- Multi forms: MGET, a pipeline of SETs, one DEL ---------------------------------- */

/* argv of 1 + n items: `cmd` then the keys. */
static int keys_argv(const char *cmd, size_t n, const char *const *keys, const size_t *klens,
                     const char ***argv, size_t **lens, dp_err *err)
{
    *argv = malloc((n + 1) * sizeof **argv);
    *lens = malloc((n + 1) * sizeof **lens);
    if (!*argv || !*lens) {
        free(*argv);
        free(*lens);
        return dp_err_set(err, DP_ENOMEM, "out of memory");
    }
    (*argv)[0] = cmd;
    (*lens)[0] = strlen(cmd);
    for (size_t i = 0; i < n; i++) {
        (*argv)[i + 1] = keys[i];
        (*lens)[i + 1] = klens[i];
    }
    return DP_OK;
}

static int rd_get_multi(void *self, size_t n, const char *const *keys, const size_t *klens,
                        dp_bytes *out, int64_t *vlens, dp_err *err)
{
    if (stash.owner)
        stash_drop();
    inst *s = self;
    out->len = 0;
    if (n == 0)
        return DP_OK;
    const char **argv;
    size_t *lens;
    int rc = keys_argv("MGET", n, keys, klens, &argv, &lens, err);
    if (rc != DP_OK)
        return rc;
    redisReply *r;
    rc = run1(s, "MGET", (int)(n + 1), argv, lens, &r, err);
    free(argv);
    free(lens);
    if (rc != DP_OK)
        return rc;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != n) {
        freeReplyObject(r);
        return dp_err_set(err, DP_EBACKEND, "MGET: unexpected reply");
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        if (r->element[i]->type == REDIS_REPLY_STRING)
            total += r->element[i]->len;
    if (dp_bytes_reserve(out, total ? total : 1) != DP_OK) {
        freeReplyObject(r);
        return dp_err_set(err, DP_ENOMEM, "out of memory copying %zu bytes", total);
    }
    uint64_t hits = 0;
    for (size_t i = 0; i < n; i++) {
        redisReply *e = r->element[i];
        if (e->type == REDIS_REPLY_STRING) {
            memcpy(out->data + out->len, e->str, e->len);
            out->len += e->len;
            vlens[i] = (int64_t)e->len;
            hits++;
        } else {
            vlens[i] = -1;
        }
    }
    freeReplyObject(r);
    atomic_fetch_add_explicit(&s->hits, hits, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->misses, n - hits, memory_order_relaxed);
    return DP_OK;
}

typedef struct set_pipe {
    inst *s;
    size_t n;
    const char *const *keys, *const *values;
    const size_t *klens, *vlens;
    char px[32];
    size_t pxlen;
} set_pipe;

static void build_sets(redisContext *c, void *ud)
{
    set_pipe *p = ud;
    for (size_t i = 0; i < p->n; i++) {
        const char *argv[5] = {"SET", p->keys[i], p->values[i], "PX", p->px};
        size_t lens[5] = {3, p->klens[i], p->vlens[i], 2, p->pxlen};
        redisAppendCommandArgv(c, p->pxlen ? 5 : 3, argv, lens);
    }
}

static int rd_set_multi(void *self, size_t n, const char *const *keys, const size_t *klens,
                        const char *const *values, const size_t *vlens, dp_err *err)
{
    if (stash.owner)
        stash_drop();
    inst *s = self;
    if (n == 0)
        return DP_OK;
    set_pipe p = {s, n, keys, values, klens, vlens, "", 0};
    long long ms = ttl_ms(s);
    if (ms)
        p.pxlen = (size_t)snprintf(p.px, sizeof p.px, "%lld", ms);
    redisReply **replies = malloc((n + 1) * sizeof *replies);
    if (!replies)
        return dp_err_set(err, DP_ENOMEM, "out of memory");
    int rc = run_write(s, "SET (pipeline)", build_sets, &p, n, replies, n, keys, klens, err);
    if (rc == DP_OK) {
        for (size_t i = 0; i < n; i++) {
            if (replies[i]->type == REDIS_REPLY_ERROR && rc == DP_OK)
                rc = dp_err_set(err, DP_EBACKEND, "SET (pipeline): %s", replies[i]->str);
            freeReplyObject(replies[i]);
        }
    }
    free(replies);
    return rc;
}

static int rd_del_multi(void *self, size_t n, const char *const *keys, const size_t *klens,
                        dp_err *err)
{
    if (stash.owner)
        stash_drop();
    inst *s = self;
    if (n == 0)
        return DP_OK;
    const char **argv;
    size_t *lens;
    int rc = keys_argv("DEL", n, keys, klens, &argv, &lens, err);
    if (rc != DP_OK)
        return rc;
    rc = write1(s, "DEL", (int)(n + 1), argv, lens, n, keys, klens, err);
    free(argv);
    free(lens);
    return rc;
}

static void rd_stats(void *self, dp_backend_stats *out)
{
    inst *s = self;
    out->hits = (double)atomic_load(&s->hits);
    out->misses = (double)atomic_load(&s->misses);
}

/* -- The distributed lock -------------------------------------------------------- */

static int lock_key(inst *s, const char *key, size_t klen, char **out, size_t *outlen,
                    dp_err *err)
{
    char *lk = malloc(s->prefix_len + klen + 1);
    if (!lk)
        return dp_err_set(err, DP_ENOMEM, "out of memory");
    memcpy(lk, s->cfg->lock_prefix, s->prefix_len);
    memcpy(lk + s->prefix_len, key, klen);
    *out = lk;
    *outlen = s->prefix_len + klen;
    return DP_OK;
}

/* Waking. A waiter's own connection, taken from the pool, SUBSCRIBEd to the
 * lock key's channel before each SET NX retry can fail, so a release after
 * that retry is never missed; given back after UNSUBSCRIBE (in RESP2 the
 * connection is then an ordinary one again), or, after wait_unlocked, kept
 * for the next wait (sub_close_how). Any failure here only drops the
 * subscription: the wait then polls as it would without it. */
static void sub_free(conn *cn)
{
    redisFree(cn->c);
    free(cn);
}

/* Read, on a connection whose UNSUBSCRIBE was sent, up to its confirmation
 * (messages published meanwhile come first). 1: it is an ordinary
 * connection again; 0: it failed (free it). */
static int sub_finish(conn *cn)
{
    for (int i = 0; i < 1000; i++) {
        redisReply *r = NULL;
        if (redisGetReply(cn->c, (void **)&r) != REDIS_OK || !r)
            return 0;
        int done = r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
                   r->element[0]->type == REDIS_REPLY_STRING &&
                   strcmp(r->element[0]->str, "unsubscribe") == 0 &&
                   r->element[2]->type == REDIS_REPLY_INTEGER && r->element[2]->integer == 0;
        freeReplyObject(r);
        if (done)
            return 1;
    }
    return 0;
}

/* How many woken waiters' connections an instance keeps subscribed, or with
 * their UNSUBSCRIBE unread, for the next wait (sub_close_how). */
#define MAX_UNSUBBING 16

/* UNSUBSCRIBE from every channel (a waiter's connection has one). */
static int unsub_send(conn *cn)
{
    if (redisAppendCommand(cn->c, "UNSUBSCRIBE") != REDIS_OK)
        return REDIS_ERR;
    return send_nosignal(cn->c);
}

/* Send the UNSUBSCRIBE of the connections that woken waiters left
 * subscribed (sub_close_how), at the instance's next operation (run_io):
 * not at the wake-up, when it would cost the waiter a system call and the
 * server a command while the other waiters are still being woken. The
 * confirmation is read when the connection is taken again (sub_reuse). */
static void unsub_flush(inst *s)
{
    conn *due = NULL, *stale = NULL;
    uv_mutex_lock(&s->mu);
    int mine = s->pid == self_pid();
    for (conn **pp = &s->unsubbing; *pp;) {
        conn *cn = *pp;
        if (!cn->unsub_due) {
            pp = &cn->next;
            continue;
        }
        cn->unsub_due = 0;
        atomic_fetch_sub(&s->unsub_due, 1);
        *pp = cn->next;
        s->nunsubbing--;
        /* A fork()ed child's copy of the parent's socket, or one of a
         * generation since failed: dropped, never written. */
        conn **to = mine && cn->gen == s->gen ? &due : &stale;
        cn->next = *to;
        *to = cn;
    }
    uv_mutex_unlock(&s->mu);
    /* Sent outside the instance's mutex: a send may block (socket_timeout). */
    for (conn *cn = due; cn; cn = cn->next)
        unsub_send(cn); /* a failure is in cn->c->err: sub_reuse frees it */
    if (due) {
        uv_mutex_lock(&s->mu);
        while (due) {
            conn *cn = due;
            due = cn->next;
            if (cn->gen == s->gen && s->nunsubbing < MAX_UNSUBBING) {
                cn->next = s->unsubbing;
                s->unsubbing = cn;
                s->nunsubbing++;
            } else {
                cn->next = stale;
                stale = cn;
            }
        }
        uv_mutex_unlock(&s->mu);
    }
    conns_free(stale);
}

/* A connection left by an earlier wait with its UNSUBSCRIBE unread (or not
 * yet sent: sent now), now finished, or NULL. */
static conn *sub_reuse(inst *s)
{
    conn *cn = NULL, *stale = NULL;
    uv_mutex_lock(&s->mu);
    if (s->pid != self_pid()) {
        stale = s->unsubbing; /* a fork()ed child: the parent's sockets */
        s->unsubbing = NULL;
        s->nunsubbing = 0;
        atomic_store(&s->unsub_due, 0);
    } else if (s->unsubbing) {
        cn = s->unsubbing;
        s->unsubbing = cn->next;
        s->nunsubbing--;
        if (cn->unsub_due)
            atomic_fetch_sub(&s->unsub_due, 1);
        if (cn->gen != s->gen) {
            cn->next = NULL;
            stale = cn;
            cn = NULL;
        }
    }
    uv_mutex_unlock(&s->mu);
    conns_free(stale);
    if (cn && cn->unsub_due) {
        cn->unsub_due = 0;
        if (unsub_send(cn) != REDIS_OK) {
            sub_free(cn);
            cn = NULL;
        }
    }
    if (cn) {
        /* The confirmation of an UNSUBSCRIBE sent at an earlier operation is
         * due already. Waiting a whole socket_timeout for it would stack on
         * the wait's own bounded I/O (a stopped server: two timeouts in one
         * lock call, past the caller's bound), so the wait is short and a
         * connection that has not confirmed by then is dropped. */
        redisSetTimeout(cn->c, tv_of(s->cfg->socket_timeout < 0.05 ? s->cfg->socket_timeout
                                                                     : 0.05));
        int ok = sub_finish(cn);
        redisSetTimeout(cn->c, tv_of(s->cfg->socket_timeout));
        if (!ok) {
            sub_free(cn);
            cn = NULL;
        }
    }
    return cn;
}

/* The subscription's I/O needs no SIGPIPE mask (nopipe_*, four system calls
 * each time): its commands go out by send_nosignal, and reads cannot raise
 * it; a new connection masks it itself (conn_take). NULL when the server
 * refuses (an ACL): the wait then polls; NULL and *failed, with err, when it
 * cannot be reached or does not answer. */
static conn *sub_open(inst *s, const char *lk, size_t lklen, int *failed, dp_err *err)
{
    conn *out = NULL;
    int saved = errno;
    *failed = 0;
    for (int attempt = 0; attempt < 2 && !out; attempt++) {
        conn *cn;
        int reused = 1;
        if (attempt == 0 && (cn = sub_reuse(s)) != NULL)
            ; /* ready for another SUBSCRIBE */
        else if (conn_take(s, &cn, &reused, err) != DP_OK) {
            *failed = 1;
            break;
        }
        const char *argv[2] = {"SUBSCRIBE", lk};
        size_t lens[2] = {9, lklen};
        redisReply *r = NULL;
        int io = redisAppendCommandArgv(cn->c, 2, argv, lens) != REDIS_OK ||
                 send_nosignal(cn->c) != REDIS_OK ||
                 redisGetReply(cn->c, (void **)&r) != REDIS_OK;
        /* Only a reused connection the server had closed is worth another
         * try: after a timeout (a stopped server) a second one would stack
         * another socket_timeout on the caller's. A refusal (an ACL without
         * SUBSCRIBE) is no failure: the caller polls. */
        int again = io && reused && closed_by_peer(cn->c);
        if (io && !again) {
            io_fail(s, cn->c, "SUBSCRIBE (lock wait)", err);
            *failed = 1;
        }
        if (!io && r && r->type == REDIS_REPLY_ARRAY && r->elements == 3)
            out = cn;
        else
            sub_free(cn);
        if (r)
            freeReplyObject(r);
        if (!again)
            break;
    }
    errno = saved;
    return out;
}

/* Keep the payload of a "message" reply in *msg (malloc'd), replacing one
 * kept before. */
static void sub_message(redisReply *r, char **msg, size_t *mlen)
{
    if (!msg || r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        r->element[0]->type != REDIS_REPLY_STRING || strcmp(r->element[0]->str, "message") != 0 ||
        r->element[2]->type != REDIS_REPLY_STRING)
        return;
    /* Taken from the reply rather than copied: hiredis allocates a string
     * reply's bytes with malloc (hi_malloc by default), and frees a NULL one
     * as nothing. */
    free(*msg);
    *msg = r->element[2]->str;
    *mlen = r->element[2]->len;
    r->element[2]->str = NULL;
}

/* 1: something arrived (a release, probably), 0: `seconds` passed, -1: the
 * connection failed. With `msg`, the payload of the last message that
 * arrived is kept there (malloc'd; the caller frees it). */
static int sub_wait(conn *cn, double seconds, char **msg, size_t *mlen)
{
    redisContext *c = cn->c;
    void *r = NULL;
    int got = 0;
    while (redisGetReplyFromReader(c, &r) == REDIS_OK && r) {
        sub_message(r, msg, mlen);
        freeReplyObject(r);
        r = NULL;
        got = 1;
    }
    if (c->err)
        return -1;
    if (got)
        return 1;
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    int n = ppoll(&p, 1, &ts, NULL);
    if (n < 0)
        return errno == EINTR ? 1 : -1;
    if (n == 0)
        return 0;
    int rc = redisBufferRead(c) == REDIS_OK ? 1 : -1;
    while (rc == 1 && redisGetReplyFromReader(c, &r) == REDIS_OK && r) {
        sub_message(r, msg, mlen);
        freeReplyObject(r);
        r = NULL;
    }
    return rc;
}

/* UNSUBSCRIBE and give the connection back. `defer`: keep the connection
 * aside (at most MAX_UNSUBBING per instance), still subscribed; the
 * instance's next operation sends the UNSUBSCRIBE (unsub_flush) and the next
 * wait reads its confirmation (sub_reuse): the waiter that was just woken
 * returns the value without a system call or a round trip more, and the
 * server is not sent a command per waiter while it still wakes the others. */
static void sub_close_how(inst *s, conn *cn, const char *lk, size_t lklen, int defer)
{
    int saved = errno, ok = 0;
    if (defer && !cn->c->err) {
        uv_mutex_lock(&s->mu);
        if (cn->gen == s->gen && s->pid == self_pid() && s->nunsubbing < MAX_UNSUBBING) {
            cn->unsub_due = 1;
            cn->next = s->unsubbing;
            s->unsubbing = cn;
            s->nunsubbing++;
            atomic_fetch_add(&s->unsub_due, 1);
            cn = NULL;
        }
        uv_mutex_unlock(&s->mu);
        if (!cn)
            return;
    }
    const char *argv[2] = {"UNSUBSCRIBE", lk};
    size_t lens[2] = {11, lklen};
    /* Messages published meanwhile come first; then the confirmation. */
    if (redisAppendCommandArgv(cn->c, 2, argv, lens) == REDIS_OK &&
        send_nosignal(cn->c) == REDIS_OK)
        ok = sub_finish(cn);
    errno = saved;
    if (ok)
        conn_give(s, cn, 0);
    else
        sub_free(cn);
}

static void sub_close(inst *s, conn *cn, const char *lk, size_t lklen)
{
    sub_close_how(s, cn, lk, lklen, 0);
}

/* With distributed_lock = false the lock is the core's alone (this process's
 * threads and Lua states), as dogpile.cache's distributed_lock=False: lock,
 * unlock and wait_unlocked take, release and wait for nothing in Redis. */

static int rd_lock(void *self, const char *key, size_t klen, double timeout, dp_err *err)
{
    inst *s = self;
    if (!s->cfg->distributed_lock)
        return DP_OK;
    held *h = calloc(1, sizeof *h);
    if (!h)
        return dp_err_set(err, DP_ENOMEM, "out of memory");
    char *lk = NULL;
    size_t lklen = 0;
    int rc = lock_key(s, key, klen, &lk, &lklen, err);
    if (rc != DP_OK) {
        free(h);
        return rc;
    }
    dp_lock_token(h->token);
    char px[32];
    int pxn = snprintf(px, sizeof px, "%lld", (long long)ceil(s->cfg->lock_timeout * 1000));
    const char *argv[6] = {"SET", lk, h->token, "NX", "PX", px};
    size_t lens[6] = {3, lklen, 32, 2, 2, (size_t)pxn};
    dp_backoff bo;
    dp_backoff_init(&bo, timeout, s->cfg->lock_sleep);
    conn *sub = NULL;
    int tried_sub = 0;
    for (;;) {
        redisReply *r;
        rc = run1(s, "SET NX (lock)", 6, argv, lens, &r, err);
        if (rc != DP_OK)
            break;
        int got = r->type == REDIS_REPLY_STATUS;
        freeReplyObject(r);
        if (got) {
            if (sub) {
                sub_close(s, sub, lk, lklen);
                sub = NULL;
            }
            h->key = lk;
            h->klen = lklen;
            h->thread = uv_thread_self();
            lk = NULL;
            uv_mutex_lock(&s->mu);
            h->next = s->held;
            s->held = h;
            h = NULL;
            uv_mutex_unlock(&s->mu);
            rc = DP_OK;
            break;
        }
        if (timeout == 0) {
            rc = DP_EBUSY;
            break;
        }
        if (!tried_sub) {
            /* Subscribe, then try again before waiting for a message. */
            tried_sub = 1;
            int failed;
            sub = sub_open(s, lk, lklen, &failed, err);
            if (sub)
                continue;
            if (failed) {
                rc = DP_EBACKEND;
                break;
            }
        }
        double wait = dp_backoff_next(&bo);
        if (wait <= 0) {
            rc = dp_err_set(err, DP_ETIMEDOUT, "the lock was still held after %g s", timeout);
            break;
        }
        if (sub) {
            if (sub_wait(sub, wait, NULL, NULL) < 0) {
                sub_free(sub);
                sub = NULL;
            }
        } else {
            dp_clock_sleep(wait);
        }
    }
    if (sub)
        sub_close(s, sub, lk, lklen);
    free(lk);
    free(h);
    return rc;
}

/* The lock key's token: DP_OK with *tok (malloc'd, NUL-terminated) or NULL
 * when the lock is free, or a failure in err. */
static int lock_token(inst *s, const char *lk, size_t lklen, char **tok, dp_err *err)
{
    const char *argv[2] = {"GET", lk};
    size_t lens[2] = {3, lklen};
    redisReply *r;
    int rc = run1(s, "GET (lock)", 2, argv, lens, &r, err);
    if (rc != DP_OK)
        return rc;
    *tok = NULL;
    if (r->type == REDIS_REPLY_STRING) {
        *tok = strndup(r->str, r->len);
        if (!*tok)
            rc = dp_err_set(err, DP_ENOMEM, "out of memory");
    } else if (r->type != REDIS_REPLY_NIL) {
        rc = dp_err_set(err, DP_EBACKEND, "GET (lock): the lock key holds a value of "
                        "another type");
    }
    freeReplyObject(r);
    return rc;
}

/* Wait, without taking it, until the lock's holder (the token seen after
 * subscribing) releases: a message on the lock key's channel (the unlock
 * script publishes one), or a poll that finds the key gone or holding
 * another token (a holder that died lets the key expire, which publishes
 * nothing). Polls at dp_backoff's steps up to lock_sleep; timeout 0 polls
 * once. */
static int rd_wait_unlocked(void *self, const char *key, size_t klen, double timeout,
                            dp_err *err)
{
    inst *s = self;
    if (!s->cfg->distributed_lock)
        return DP_OK;
    char *lk = NULL, *first = NULL, *now = NULL;
    size_t lklen = 0;
    int rc = lock_key(s, key, klen, &lk, &lklen, err);
    if (rc != DP_OK)
        return rc;
    int failed = 0;
    conn *sub = timeout != 0 ? sub_open(s, lk, lklen, &failed, err) : NULL;
    rc = failed ? DP_EBACKEND : lock_token(s, lk, lklen, &first, err);
    dp_backoff bo;
    dp_backoff_init(&bo, timeout, s->cfg->lock_sleep);
    while (rc == DP_OK && first) {
        if (timeout == 0) {
            rc = DP_EBUSY;
            break;
        }
        double wait = dp_backoff_next(&bo);
        if (wait <= 0) {
            rc = dp_err_set(err, DP_ETIMEDOUT, "the lock was still held after %g s", timeout);
            break;
        }
        if (sub) {
            char *msg = NULL;
            size_t mlen = 0;
            int got = sub_wait(sub, wait, &msg, &mlen);
            if (got > 0 && msg)
                stash_keep(s, key, klen, msg, mlen); /* takes msg */
            else
                free(msg);
            if (got > 0)
                break; /* released */
            if (got < 0) {
                sub_free(sub);
                sub = NULL;
            }
        } else {
            dp_clock_sleep(wait);
        }
        rc = lock_token(s, lk, lklen, &now, err);
        if (rc == DP_OK && (!now || strcmp(now, first) != 0)) {
            free(now);
            /* Released while this poll was under way: the release's message,
             * published with the DEL, is due on the subscription; take the
             * value it carries rather than GET it. (A holder that died
             * publishes nothing: then this costs 1 ms, once.) */
            char *msg = NULL;
            size_t mlen = 0;
            if (sub && sub_wait(sub, 0.001, &msg, &mlen) > 0 && msg)
                stash_keep(s, key, klen, msg, mlen); /* takes msg */
            else
                free(msg);
            break;
        }
        free(now);
        now = NULL;
    }
    if (sub)
        sub_close_how(s, sub, lk, lklen, 1);
    free(first);
    free(lk);
    return rc;
}

/* The held entry for `key`, taken out of the list (NULL: none). `mine`:
 * only one taken by this thread and not yet released by a set. */
static held *held_take(inst *s, const char *key, size_t klen, int mine)
{
    const char *prefix = s->cfg->lock_prefix;
    size_t lklen = s->prefix_len + klen;
    uv_thread_t self = mine ? uv_thread_self() : 0;
    uv_mutex_lock(&s->mu);
    held **pp = &s->held, *h = NULL;
    for (; *pp; pp = &(*pp)->next)
        if ((*pp)->klen == lklen && memcmp((*pp)->key, prefix, s->prefix_len) == 0 &&
            memcmp((*pp)->key + s->prefix_len, key, klen) == 0) {
            if (mine && ((*pp)->released || !uv_thread_equal(&(*pp)->thread, &self)))
                break;
            h = *pp;
            *pp = h->next;
            break;
        }
    uv_mutex_unlock(&s->mu);
    return h;
}

static void held_put(inst *s, held *h)
{
    uv_mutex_lock(&s->mu);
    h->next = s->held;
    s->held = h;
    uv_mutex_unlock(&s->mu);
}

static void build_unlock(redisContext *c, held *h, const char *key, size_t klen, int by_sha)
{
    pthread_once(&unlock_sha_once, unlock_sha_init);
    const char *argv[6] = {by_sha ? "EVALSHA" : "EVAL", by_sha ? unlock_sha : UNLOCK_SCRIPT,
                           "2", h->key, key, h->token};
    size_t lens[6] = {by_sha ? 7 : 4, by_sha ? 40 : sizeof UNLOCK_SCRIPT - 1, 1, h->klen, klen,
                      32};
    redisAppendCommandArgv(c, 6, argv, lens);
}

typedef struct unlock_cmd {
    held *h;
    const char *key;
    size_t klen;
    int by_sha;
} unlock_cmd;

static void build_unlock_cmd(redisContext *c, void *ud)
{
    unlock_cmd *u = ud;
    build_unlock(c, u->h, u->key, u->klen, u->by_sha);
}

/* The release script's reply: DP_OK (deleted), DP_ENOTHELD (not ours any
 * more) or a failure; frees r. */
static int unlock_reply(inst *s, redisReply *r, dp_err *err)
{
    int rc = DP_OK;
    if (r->type == REDIS_REPLY_ERROR) {
        char w[320];
        where(s, w, sizeof w);
        rc = dp_err_set(err, DP_EBACKEND, "EVAL (unlock): %s: %s", w, r->str);
    } else if (r->type != REDIS_REPLY_INTEGER || r->integer != 1) {
        rc = dp_err_set(err, DP_ENOTHELD, "the lock had expired (lock_timeout %g s) and was no "
                        "longer ours", s->cfg->lock_timeout);
    }
    freeReplyObject(r);
    return rc;
}

/* The release alone: EVALSHA, or EVAL once when the server lacks the script. */
static int unlock_alone(inst *s, held *h, const char *key, size_t klen, dp_err *err)
{
    unlock_cmd u = {h, key, klen, 1};
    redisReply *r;
    int rc = run(s, "EVALSHA (unlock)", build_unlock_cmd, &u, 1, &r, err);
    if (rc == DP_OK && noscript(r)) {
        freeReplyObject(r);
        u.by_sha = 0;
        rc = run(s, "EVAL (unlock)", build_unlock_cmd, &u, 1, &r, err);
    }
    return rc == DP_OK ? unlock_reply(s, r, err) : rc;
}

/* A set of the key whose lock this thread holds: the creator storing its
 * value. The SET (with its notification), then the release, go in one
 * pipeline, one round trip instead of two, so the waiters are woken
 * (carrying the value just stored) a round trip sooner. The set reports the
 * SET's outcome as ever; the release's is kept in `h` for unlock(), which
 * then only returns it. An I/O failure leaves `h` unreleased: unlock()
 * tries again (and finds the lock not ours if this release did run). */
typedef struct set_release_cmd {
    argv_cmd *set;
    unlock_cmd unlock;
    inst *s;
    const char *payload;
    size_t plen;
} set_release_cmd;

static void build_set_release(redisContext *c, void *ud)
{
    set_release_cmd *w = ud;
    redisAppendCommandArgv(c, w->set->argc, w->set->argv, w->set->lens);
    if (w->payload) {
        const char *argv[3] = {"PUBLISH", w->s->cfg->notify_channel, w->payload};
        size_t lens[3] = {7, strlen(w->s->cfg->notify_channel), w->plen};
        redisAppendCommandArgv(c, 3, argv, lens);
    }
    build_unlock_cmd(c, &w->unlock);
}

static int set_release(inst *s, held *h, argv_cmd *set, const char *key, size_t klen,
                       dp_err *err)
{
    set_release_cmd w = {set, {h, key, klen, 1}, s, NULL, 0};
    char *payload = NULL;
    int rc = DP_OK;
    if (s->cfg->notify_channel &&
        (rc = notify_payload(s, 1, &key, &klen, &payload, &w.plen, err)) != DP_OK) {
        held_put(s, h);
        return rc;
    }
    w.payload = payload;
    size_t ncmd = payload ? 3 : 2;
    redisReply *r[3];
    rc = run(s, "SET", build_set_release, &w, ncmd, r, err);
    free(payload);
    if (rc != DP_OK) {
        held_put(s, h);
        return rc;
    }
    redisReply *rel = r[ncmd - 1];
    dp_err uerr;
    int urc;
    if (noscript(rel)) {
        freeReplyObject(rel);
        urc = unlock_alone(s, h, key, klen, &uerr);
    } else {
        urc = unlock_reply(s, rel, &uerr);
    }
    if (urc == DP_OK || urc == DP_ENOTHELD)
        h->released = urc == DP_OK ? 1 : 2; /* else unlock() tries again */
    held_put(s, h);
    if (r[0]->type == REDIS_REPLY_ERROR) {
        char w2[320];
        where(s, w2, sizeof w2);
        rc = dp_err_set(err, DP_EBACKEND, "SET: %s: %s", w2, r[0]->str);
    } else if (ncmd == 3 && r[1]->type == REDIS_REPLY_ERROR) {
        rc = dp_err_set(err, DP_EBACKEND, "SET: PUBLISH on '%s' refused: %s",
                        s->cfg->notify_channel, r[1]->str);
    }
    for (size_t i = 0; i + 1 < ncmd; i++)
        freeReplyObject(r[i]);
    return rc;
}

static int rd_unlock(void *self, const char *key, size_t klen, dp_err *err)
{
    inst *s = self;
    if (!s->cfg->distributed_lock)
        return DP_OK;
    held *h = held_take(s, key, klen, 0);
    if (!h)
        return DP_ENOTHELD;
    int rc;
    if (h->released == 1)
        rc = DP_OK; /* by the set of its value (set_release) */
    else if (h->released == 2)
        rc = dp_err_set(err, DP_ENOTHELD, "the lock had expired (lock_timeout %g s) and was "
                        "no longer ours", s->cfg->lock_timeout);
    else
        rc = unlock_alone(s, h, key, klen, err);
    free(h->key);
    free(h);
    return rc;
}

/* -- Change notification: the listener ------------------------------------------- */

/* Push the keys of one message into the feed, unless this instance sent it.
 * A malformed message cannot be trusted to name what changed: reset. */
static void listener_message(inst *s, const char *p, size_t len)
{
    if (len >= 16 && memcmp(p, s->sender, 16) == 0)
        return;
    if (len < 16) {
        dp_feed_reset(s->feed);
        return;
    }
    size_t pos = 16;
    while (pos < len) {
        size_t klen = 0, digits = 0;
        while (pos < len && p[pos] >= '0' && p[pos] <= '9' && digits < 19) {
            klen = klen * 10 + (size_t)(p[pos] - '0');
            pos++;
            digits++;
        }
        if (digits == 0 || pos >= len || p[pos] != ':' || klen > len - pos - 1) {
            dp_feed_reset(s->feed);
            return;
        }
        pos++;
        dp_feed_push(s->feed, p + pos, klen, 0, DP_FEED_FLEET);
        pos += klen;
    }
}

/* A pushed message on our channel: its keys go into the feed; anything else
 * (the subscribe confirmation) is ignored. */
static void listener_reply(inst *s, redisReply *r)
{
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
        r->element[0]->type == REDIS_REPLY_STRING &&
        strcmp(r->element[0]->str, "message") == 0 &&
        r->element[2]->type == REDIS_REPLY_STRING)
        listener_message(s, r->element[2]->str, r->element[2]->len);
}

/* Sleep `seconds` in slices, returning early when asked to stop. */
static void listener_pause(inst *s, double seconds)
{
    double end = dp_clock_monotonic() + seconds;
    while (!atomic_load(&s->stop)) {
        double left = end - dp_clock_monotonic();
        if (left <= 0)
            break;
        dp_clock_sleep(left < 0.05 ? left : 0.05);
    }
}

/* Read messages until the connection fails or the instance closes. */
static void listener_read(inst *s, redisContext *c)
{
    while (!atomic_load(&s->stop)) {
        void *r = NULL;
        while (redisGetReplyFromReader(c, &r) == REDIS_OK && r) {
            listener_reply(s, r);
            freeReplyObject(r);
            r = NULL;
        }
        if (c->err)
            return;
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        int n = poll(&p, 1, 100);
        if (n < 0 && errno != EINTR)
            return;
        if (n > 0 && redisBufferRead(c) != REDIS_OK)
            return;
    }
}

static void listener_main(void *arg)
{
    inst *s = arg;
    /* This thread only reads and writes its own socket: a peer that closed
     * it must give an error here, not kill the process. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    double backoff = 0.01;
    while (!atomic_load(&s->stop)) {
        redisContext *c = NULL;
        dp_err e;
        if (conn_open(s, &c, &e) == DP_OK) {
            const char *argv[2] = {"SUBSCRIBE", s->cfg->notify_channel};
            size_t lens[2] = {9, strlen(s->cfg->notify_channel)};
            redisReply *r = redisCommandArgv(c, 2, argv, lens);
            int ok = r && r->type == REDIS_REPLY_ARRAY && r->elements == 3;
            if (r)
                freeReplyObject(r);
            if (ok) {
                /* Subscribed: from here on every change is heard. Whatever
                 * changed before was not, so readers start over. */
                dp_feed_reset(s->feed);
                atomic_store(&s->subscribed, 1);
                backoff = 0.01;
                listener_read(s, c);
                atomic_store(&s->subscribed, 0);
            }
        }
        if (c)
            redisFree(c);
        listener_pause(s, backoff);
        backoff = backoff * 2 < 0.1 ? backoff * 2 : 0.1;
    }
}

/* Start the listener of a new instance and wait (at most the time to connect
 * and subscribe once) until it is subscribed, so that a region configured
 * now hears every change made after configure returns while the server is
 * up. A server down now is not an error: the listener keeps trying. */
static int listener_start(inst *s, dp_err *err)
{
    const char *fname = s->cfg->notify_feed ? s->cfg->notify_feed : s->cfg->notify_channel;
    int rc = dp_feed_open(fname, strlen(fname), 0, &s->feed);
    if (rc != DP_OK)
        return dp_err_set(err, rc, "%s: cannot open the change feed: %s", s->name,
                          dp_strerror(rc));
    char token[33];
    dp_lock_token(token);
    memcpy(s->sender, token, 16);
    s->sender[16] = '\0';
    if (uv_thread_create(&s->listener, listener_main, s) != 0)
        return dp_err_set(err, DP_ENOMEM, "%s: cannot start the listener thread", s->name);
    s->listening = 1;
    double end = dp_clock_monotonic() + s->cfg->connect_timeout + s->cfg->socket_timeout;
    while (!atomic_load(&s->subscribed) && dp_clock_monotonic() < end)
        dp_clock_sleep(0.001);
    return DP_OK;
}

static void listener_stop(inst *s)
{
    if (s->listening) {
        atomic_store(&s->stop, 1);
        uv_thread_join(&s->listener);
        s->listening = 0;
    }
    dp_feed_close(s->feed);
    s->feed = NULL;
}

/* -- Instances --------------------------------------------------------------------- */

static void rd_destroy(void *self)
{
    if (stash.owner == self)
        stash_drop();
    inst *s = self;
    listener_stop(s);
    while (s->idle) {
        conn *c = s->idle;
        s->idle = c->next;
        redisFree(c->c);
        free(c);
    }
    while (s->unsubbing) {
        conn *c = s->unsubbing;
        s->unsubbing = c->next;
        redisFree(c->c);
        free(c);
    }
    while (s->held) {
        held *h = s->held;
        s->held = h->next;
        free(h->key);
        free(h);
    }
    for (int i = 0; i < s->nsentinels; i++)
        free(s->sentinel_host[i]);
    uv_mutex_destroy(&s->mu);
    free(s);
}

/* Write `value` (len bytes) as a new string into *slot, freeing the old. */
static int set_str(char **slot, const char *value, size_t len, dp_err *err)
{
    char *p = malloc(len + 1);
    if (!p)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    memcpy(p, value, len);
    p[len] = '\0';
    free(*slot);
    *slot = p;
    return DP_OK;
}

/* "redis://[user:password@]host[:port][/db]" or "unix:///path[?db=N]": the
 * url's parts go into the fields of host (a socket's path for unix://),
 * port, db, username and password, which those arguments, read after it,
 * override. */
static int parse_url(void *settings, const dp_arg *a, dp_err *err)
{
    rd_settings *cfg = settings;
    char buf[1024];
    if (a->type != DP_ARG_STRING || a->len >= sizeof buf || memchr(a->string, 0, a->len))
        return dp_err_set(err, DP_EINVAL, NAME ": url must be a string such as "
                          "\"redis://host:port/db\" or \"unix:///path\" (at most %zu bytes)",
                          sizeof buf - 1);
    memcpy(buf, a->string, a->len);
    buf[a->len] = '\0';
    if (strncmp(buf, "unix://", 7) == 0) {
        char *path = buf + 7, *q = strchr(path, '?');
        if (q) {
            *q++ = '\0';
            char *end;
            long db = strncmp(q, "db=", 3) == 0 ? strtol(q + 3, &end, 10) : -1;
            if (db < 0 || q[3] == '\0' || *end)
                return dp_err_set(err, DP_EINVAL, NAME ": url '%s': the only query is ?db=N",
                                  a->string);
            cfg->db = db;
        }
        if (path[0] != '/')
            return dp_err_set(err, DP_EINVAL, NAME ": url '%s' needs an absolute socket path "
                              "(unix:///path/to/socket)", a->string);
        return set_str(&cfg->host, path, strlen(path), err);
    }
    if (strncmp(buf, "redis://", 8) != 0)
        return dp_err_set(err, DP_EINVAL, NAME ": url '%s' must start with redis:// or unix://",
                          buf);
    char *p = buf + 8, *at = strrchr(p, '@');
    int rc = DP_OK;
    if (at) {
        *at = '\0';
        char *colon = strchr(p, ':');
        if (colon) {
            *colon = '\0';
            rc = set_str(&cfg->password, colon + 1, strlen(colon + 1), err);
        }
        if (rc == DP_OK && *p) /* redis://password@host, as redis-py reads it */
            rc = set_str(colon ? &cfg->username : &cfg->password, p, strlen(p), err);
        if (rc != DP_OK)
            return rc;
        p = at + 1;
    }
    char *slash = strchr(p, '/');
    if (slash) {
        *slash = '\0';
        char *end;
        if (slash[1]) {
            long db = strtol(slash + 1, &end, 10);
            if (*end || db < 0)
                return dp_err_set(err, DP_EINVAL, NAME ": url: db '%s' is not a number",
                                  slash + 1);
            cfg->db = db;
        }
    }
    char *colon = strrchr(p, ':');
    if (colon && !strchr(colon, ']')) {
        *colon = '\0';
        char *end;
        long port = strtol(colon + 1, &end, 10);
        if (*end || colon[1] == '\0' || port < 1 || port > 65535)
            return dp_err_set(err, DP_EINVAL, NAME ": url: port '%s' is out of range "
                              "(1 to 65535)", colon + 1);
        cfg->port = port;
    }
    if (*p == '[') { /* [::1] */
        p++;
        char *e = strchr(p, ']');
        if (e)
            *e = '\0';
    }
    return *p ? set_str(&cfg->host, p, strlen(p), err) : DP_OK;
}

/* "host:port,host:port" into the instance's list. */
static int parse_sentinels(inst *s, const char *list, dp_err *err)
{
    char *copy = strdup(list), *save = NULL;
    if (!copy)
        return dp_err_set(err, DP_ENOMEM, SENTINEL_NAME ": out of memory");
    int rc = DP_OK;
    for (char *tok = strtok_r(copy, ",", &save); tok && rc == DP_OK;
         tok = strtok_r(NULL, ",", &save)) {
        char *colon = strrchr(tok, ':'), *end = NULL;
        long port = colon ? strtol(colon + 1, &end, 10) : 0;
        if (!colon || colon == tok || *end || port < 1 || port > 65535 ||
            s->nsentinels == MAX_SENTINELS) {
            rc = dp_err_set(err, DP_EINVAL, SENTINEL_NAME ": sentinels: '%s' is not host:port "
                            "with a port from 1 to 65535 (at most %d sentinels)", tok,
                            MAX_SENTINELS);
            break;
        }
        *colon = '\0';
        if (!(s->sentinel_host[s->nsentinels] = strdup(tok)))
            rc = dp_err_set(err, DP_ENOMEM, SENTINEL_NAME ": out of memory");
        else
            s->sentinel_port[s->nsentinels++] = (int)port;
    }
    free(copy);
    return rc;
}

/* A new instance (the core's registry shares it, by every argument but the
 * pool's). One connection now: a refused password or db is a configuration
 * error to report here; a server that is down is not (it may come up
 * later). With notify_channel, the listener starts before any handle gets
 * the instance (other opens of this identity wait for create). */
static int rd_create(void *ud, const void *settings, void **self, dp_err *err)
{
    const rd_settings *cfg = settings;
    if (cfg->notify_feed && !cfg->notify_channel)
        return dp_err_set(err, DP_EINVAL, "%s: notify_feed needs notify_channel",
                          ud ? SENTINEL_NAME : NAME);
    inst *s = calloc(1, sizeof *s);
    if (!s)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    uv_mutex_init(&s->mu);
    s->cfg = cfg;
    s->name = ud ? SENTINEL_NAME : NAME;
    s->unix_socket = !ud && cfg->host[0] == '/';
    s->prefix_len = strlen(cfg->lock_prefix);
    s->pid = self_pid();
    int rc = ud ? parse_sentinels(s, cfg->sentinels, err) : DP_OK;
    conn *c;
    int reused;
    dp_err e;
    if (rc == DP_OK) {
        nopipe np;
        nopipe_begin(&np);
        rc = conn_take(s, &c, &reused, &e);
        nopipe_end(&np);
        if (rc == DP_OK)
            conn_give(s, c, 0);
        else if (rc == DP_EBACKEND)
            rc = DP_OK;
        else
            dp_err_set(err, rc, "%s", e.msg);
    }
    if (rc == DP_OK && cfg->notify_channel)
        rc = listener_start(s, err);
    if (rc != DP_OK) {
        rd_destroy(s);
        return rc;
    }
    *self = s;
    return DP_OK;
}

/* Redis and Redis-through-sentinels differ only in how they find the
 * server: their argument tables, and the ud given at registration. */
#define REDIS_OPS(registered_name, table)                                     \
    {                                                                         \
        .name = registered_name, .args = table,                               \
        .settings_size = sizeof(rd_settings), .create = rd_create,            \
        .destroy = rd_destroy, .get = rd_get, .set = rd_set, .del = rd_del,   \
        .stats = rd_stats, .infallible = 0, .lock = rd_lock,                  \
        .unlock = rd_unlock, .get_multi = rd_get_multi,                       \
        .set_multi = rd_set_multi, .del_multi = rd_del_multi,                 \
        .wait_unlocked = rd_wait_unlocked,                                    \
    }

static const dp_backend_ops rd_ops = REDIS_OPS(NAME, rd_args);
static const dp_backend_ops rs_ops = REDIS_OPS(SENTINEL_NAME, rs_args);

/* -- Lua module ----------------------------------------------------------------------
 * `require "dogpile.backends.redis"` registers both names with the core
 * (which pins this module); lua/dogpile/cache/backends/redis.lua opens
 * instances. */

int luaopen_dogpile_backends_redis(lua_State *L);

__attribute__((visibility("default"))) int luaopen_dogpile_backends_redis(lua_State *L)
{
    int rc = dp_backend_register(&rd_ops, NULL);
    if (rc == DP_OK)
        rc = dp_backend_register(&rs_ops, (void *)&rs_ops);
    if (rc != DP_OK)
        return luaL_error(L, NAME ": cannot register the backend: %s", dp_strerror(rc));
    lua_pushstring(L, NAME);
    return 1;
}
