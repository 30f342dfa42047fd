/* redis_cluster.c -- dogpile.cache.redis_cluster: a cache on a Redis Cluster,
 * as a real cluster client (no proxy): keys go straight to the master that
 * serves their slot.
 *
 * Routing. The slot map (16384 slots -> master) comes from CLUSTER SLOTS,
 * asked of the startup nodes and then of any node known. A key's slot is
 * CRC16 of the key, or of its {hash tag}, mod 16384. MOVED rewrites the
 * slot's entry (and every 16th one reloads the whole map from the node that
 * sent it: a reshard moves slots in runs); ASK sends ASKING and the command
 * to the named node for that one command; TRYAGAIN and CLUSTERDOWN are
 * retried with dp_backoff until socket_timeout has passed. A node that
 * cannot be reached makes the map reload from another node: after a
 * failover the next operation finds the promoted replica by itself.
 *
 * Instances and connections. The core shares one instance per identity
 * (the startup nodes and the lock prefix) among the Lua states and threads
 * of the process; the instance keeps one pool of idle connections per node
 * (lock-free slots, then a list under the node's mutex; a connection is
 * used by one thread at a time; one that failed is freed and the node's
 * older idle ones dropped; a reused one closed by the server is retried
 * once on a fresh one; a fork()ed child drops the parent's). hiredis
 * connects and runs the cold commands; get and the multi forms write and
 * parse RESP themselves on the connection's buffers: no reply object, no
 * allocation on a hit. The slot map is read without a lock (one relaxed
 * load); nodes are only ever added, so a node pointer stays valid until
 * destroy.
 *
 * Multi forms. The keys are grouped by node, and by slot within a node:
 * the keys of one slot share an MGET (or DEL); keys of different slots
 * cannot share a command in a cluster, so they get a GET each (SET is
 * always one key). Every node's pipeline leaves in one send() before any
 * reply is read, so the nodes work at the same time, and replies are read
 * as they arrive (poll). Redirected keys go round again; keys whose node
 * cannot be reached fail alone: the multi forms then do the others and
 * return DP_EPARTIAL, get_multi marking the failed keys DP_VLEN_FAILED in
 * vlens (the region makes them misses under fail_open, an error naming the
 * node otherwise).
 *
 * Circuit breakers. One per node (server_circuits), not one for the
 * cluster: a dead master refuses its own keys at once, the others' go on.
 * A refused node's slots are looked up again at most every 100 ms, so the
 * promoted replica (a node of its own, its breaker closed) is found.
 *
 * The lock. The same as dogpile.cache.redis's, so both read one another's
 * locks: SET <lock_prefix><key> <token> NX PX <lock_timeout> on the node of
 * the lock key's slot, the token 16 random bytes in hex, released by a
 * script that deletes the key only while it holds our token. The release
 * SPUBLISHes on a shard channel named like the lock key (Redis 7 sharded
 * pub/sub: the message stays in that shard instead of crossing the whole
 * cluster), to which waiters SSUBSCRIBE on the same node; without a message
 * they poll with dp_backoff up to lock_sleep. A failover of that node cannot
 * keep a lock past lock_timeout: Redis 7 replicates SET PX as an absolute
 * PXAT, so the promoted replica expires it at the same moment (and a lock
 * the replica never got is simply free there).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
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
#include "redis_io.h"

#define NAME "dogpile.cache.redis_cluster"
#define NSLOTS 16384
#define MAX_NODES 1024
#define MAX_HOPS 16        /* redirections and reconnections of one command */
#define MAX_ROUNDS 8       /* rounds of a multi operation */
#define MOVED_RELOAD 16    /* every this many MOVED replies reload the map */

/* dogpile.cache.redis's release, publishing on the shard channel instead. */
static const char UNLOCK_SCRIPT[] =
    "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) "
    "redis.pcall('spublish', KEYS[1], '') return 1 "
    "else return 0 end";

/* -- Arguments --------------------------------------------------------------- */

typedef struct rc_settings {
    char *nodes;       /* "host:port,host:port" */
    char *username, *password, *lock_prefix;
    double socket_timeout, connect_timeout, ttl, lock_timeout, lock_sleep;
} rc_settings;

static void set_str(char **slot, char *v)
{
    free(*slot);
    *slot = v;
}

/* "redis+cluster://[user:password@]h1:p1,h2:p2[/0]", as redis-py's
 * RedisCluster.from_url reads "redis://" (also accepted). */
static int parse_url(void *settings, const dp_arg *a, dp_err *err)
{
    rc_settings *st = settings;
    if (a->type != DP_ARG_STRING)
        return dp_err_set(err, DP_EINVAL, NAME ": url must be a string");
    char buf[2048];
    if (a->len >= sizeof buf)
        return dp_err_set(err, DP_EINVAL, NAME ": url is too long");
    memcpy(buf, a->string, a->len);
    buf[a->len] = '\0';
    char *p;
    if (strncmp(buf, "redis+cluster://", 16) == 0)
        p = buf + 16;
    else if (strncmp(buf, "redis://", 8) == 0)
        p = buf + 8;
    else
        return dp_err_set(err, DP_EINVAL, NAME ": url '%s' must start with redis+cluster:// "
                          "(or redis://); a cluster has no unix sockets", buf);
    char *at = strrchr(p, '@');
    if (at) {
        *at = '\0';
        char *colon = strchr(p, ':');
        if (colon) {
            *colon = '\0';
            set_str(&st->password, strdup(colon + 1));
            if (*p)
                set_str(&st->username, strdup(p));
        } else if (*p) {
            set_str(&st->password, strdup(p)); /* redis://password@host, as redis-py */
        }
        p = at + 1;
    }
    char *slash = strchr(p, '/');
    if (slash) {
        if (slash[1] && strcmp(slash + 1, "0") != 0)
            return dp_err_set(err, DP_EINVAL, NAME ": url '%s': a cluster has database 0 only, "
                              "not '%s'", a->string, slash + 1);
        *slash = '\0';
    }
    if (!*p)
        return dp_err_set(err, DP_EINVAL, NAME ": url '%s' names no node", buf);
    set_str(&st->nodes, strdup(p));
    if (!st->nodes)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    return DP_OK;
}

/* Arguments of dogpile.cache.redis that mean nothing in a cluster. */
static int refuse_arg(void *settings, const dp_arg *a, dp_err *err)
{
    (void)settings;
    const char *why = "it has no meaning in a cluster";
    if (strcmp(a->name, "db") == 0)
        why = "a cluster has database 0 only";
    else if (strcmp(a->name, "host") == 0 || strcmp(a->name, "port") == 0)
        why = "name the nodes with startup_nodes = {\"host:port\", ...} or url = "
              "\"redis+cluster://host:port,...\"";
    else if (strncmp(a->name, "notify_", 7) == 0)
        why = "change notification is dogpile.cache.redis's only";
    return dp_err_set(err, DP_EINVAL, NAME ": '%s' is not an argument of a cluster: %s",
                      a->name, why);
}

#define REFUSED(n) {.name = n, .kind = DP_SPEC_CUSTOM, .parse = refuse_arg}

static const dp_arg_spec rc_args[] = {
    {.name = "url", .kind = DP_SPEC_CUSTOM, .parse = parse_url},
    {.name = "startup_nodes", .kind = DP_SPEC_STR, .flags = DP_SPEC_KEY, .min = 1,
     .what = "a list of \"host:port\"", .offset = offsetof(rc_settings, nodes)},
    {.name = "username", .kind = DP_SPEC_STR, .offset = offsetof(rc_settings, username)},
    {.name = "password", .kind = DP_SPEC_STR, .offset = offsetof(rc_settings, password)},
    {.name = "socket_timeout", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_ABOVE_MIN, .def = 1,
     .offset = offsetof(rc_settings, socket_timeout)},
    {.name = "connect_timeout", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_ABOVE_MIN, .def = 1,
     .offset = offsetof(rc_settings, connect_timeout)},
    {.name = "redis_expiration_time", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_ABOVE_MIN,
     .offset = offsetof(rc_settings, ttl)},
    {.name = "lock_timeout", .kind = DP_SPEC_SECONDS,
     .flags = DP_SPEC_ABOVE_MIN | DP_SPEC_LOCK_TIMEOUT, .def = 30,
     .what = "a positive, finite number of seconds (the lock's expiry in Redis)",
     .offset = offsetof(rc_settings, lock_timeout)},
    {.name = "lock_sleep", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_ABOVE_MIN, .def = 0.1,
     .offset = offsetof(rc_settings, lock_sleep)},
    {.name = "lock_prefix", .kind = DP_SPEC_STR, .flags = DP_SPEC_KEY, .def_str = "_lock",
     .offset = offsetof(rc_settings, lock_prefix)},
    REFUSED("db"), REFUSED("host"), REFUSED("port"), REFUSED("notify_channel"),
    REFUSED("notify_feed"),
    {0},
};

/* -- Instances ------------------------------------------------------------------ */

/* A connection: hiredis connects it (and AUTHs, and runs the cold commands:
 * CLUSTER SLOTS, the lock's); the hot paths write and parse RESP on its fd
 * themselves, in buffers that live as long as the connection, so that a
 * get or a pipeline allocates nothing and every pipeline leaves in one
 * send(). Between calls both buffers and hiredis's reader are empty. */
typedef struct conn {
    struct conn *next;
    redisContext *c;
    unsigned gen;
    int eno;            /* the failed send/recv's errno; 0: closed by the server */
    char *w, *r;        /* the commands to send; the replies received */
    size_t wlen, wcap;
    size_t rpos, rlen, rcap; /* r[rpos..rlen) not yet parsed */
} conn;

/* Idle connections sit in POOL_SLOTS slots taken and given with one atomic
 * exchange (each thread starts at its own slot, so that threads do not
 * meet on one cache line), and beyond those in a list under the node's
 * mutex. */
#define POOL_SLOTS 8

typedef struct pool_slot {
    _Atomic(conn *) c;
    char pad[64 - sizeof(conn *)];
} pool_slot;

typedef struct node {
    pool_slot slot[POOL_SLOTS];
    _Atomic unsigned gen;  /* bumped when a connection fails: older ones are dropped */
    _Atomic pid_t pid;     /* the process the idle connections belong to */
    int idx;               /* in rc.nodes */
    char host[256];
    int port;
    char addr[272];   /* "host:port", for messages */
    uv_mutex_t mu;    /* idle; the fork check */
    conn *idle;
    /* Its circuit breaker (the core's, one per node of the store), looked
     * up once the store has one; NULL: circuit_failures 0. */
    _Atomic(dp_circuit *) br;
    _Atomic int br_known;
} node;

typedef struct held {
    struct held *next;
    char *key;
    size_t klen;
    char token[33];
} held;

typedef struct rc {
    const rc_settings *cfg; /* the core's, valid until destroy */
    size_t prefix_len;
    uv_mutex_t mu;          /* adding nodes; held */
    node *nodes[MAX_NODES];
    _Atomic int nnodes;
    _Atomic uint16_t slots[NSLOTS]; /* index + 1 into nodes; 0: unknown */
    uv_mutex_t refresh_mu;  /* one map reload at a time */
    _Atomic unsigned version; /* bumped by each reload */
    _Atomic unsigned moved, rr;
    _Atomic int64_t refused_refresh; /* ms (monotonic) of the last reload after a refusal */
    _Atomic(dp_circuit *) store_br;  /* the store's breaker (server_circuits): the nodes' hold theirs */
    held *held;
    _Atomic uint64_t hits, misses;
} rc;

static int io_fail(rc *s, node *n, redisContext *c, const char *op, dp_err *err)
{
    if (c->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ETIMEDOUT ||
                                   strstr(c->errstr, "temporarily unavailable")))
        return dp_err_set(err, DP_EBACKEND, NAME ": %s: no answer from node %s within "
                          "socket_timeout (%g s)", op, n->addr, s->cfg->socket_timeout);
    return dp_err_set(err, DP_EBACKEND, NAME ": %s: node %s: %s", op, n->addr,
                      c->errstr[0] ? c->errstr : "connection lost");
}

/* -- Slots ---------------------------------------------------------------------- */

/* CRC16-CCITT (XModem), the cluster's key hash. */
static const uint16_t crc16tab[256] = {
    0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7, 0x8108, 0x9129, 0xa14a,
    0xb16b, 0xc18c, 0xd1ad, 0xe1ce, 0xf1ef, 0x1231, 0x0210, 0x3273, 0x2252, 0x52b5, 0x4294,
    0x72f7, 0x62d6, 0x9339, 0x8318, 0xb37b, 0xa35a, 0xd3bd, 0xc39c, 0xf3ff, 0xe3de, 0x2462,
    0x3443, 0x0420, 0x1401, 0x64e6, 0x74c7, 0x44a4, 0x5485, 0xa56a, 0xb54b, 0x8528, 0x9509,
    0xe5ee, 0xf5cf, 0xc5ac, 0xd58d, 0x3653, 0x2672, 0x1611, 0x0630, 0x76d7, 0x66f6, 0x5695,
    0x46b4, 0xb75b, 0xa77a, 0x9719, 0x8738, 0xf7df, 0xe7fe, 0xd79d, 0xc7bc, 0x48c4, 0x58e5,
    0x6886, 0x78a7, 0x0840, 0x1861, 0x2802, 0x3823, 0xc9cc, 0xd9ed, 0xe98e, 0xf9af, 0x8948,
    0x9969, 0xa90a, 0xb92b, 0x5af5, 0x4ad4, 0x7ab7, 0x6a96, 0x1a71, 0x0a50, 0x3a33, 0x2a12,
    0xdbfd, 0xcbdc, 0xfbbf, 0xeb9e, 0x9b79, 0x8b58, 0xbb3b, 0xab1a, 0x6ca6, 0x7c87, 0x4ce4,
    0x5cc5, 0x2c22, 0x3c03, 0x0c60, 0x1c41, 0xedae, 0xfd8f, 0xcdec, 0xddcd, 0xad2a, 0xbd0b,
    0x8d68, 0x9d49, 0x7e97, 0x6eb6, 0x5ed5, 0x4ef4, 0x3e13, 0x2e32, 0x1e51, 0x0e70, 0xff9f,
    0xefbe, 0xdfdd, 0xcffc, 0xbf1b, 0xaf3a, 0x9f59, 0x8f78, 0x9188, 0x81a9, 0xb1ca, 0xa1eb,
    0xd10c, 0xc12d, 0xf14e, 0xe16f, 0x1080, 0x00a1, 0x30c2, 0x20e3, 0x5004, 0x4025, 0x7046,
    0x6067, 0x83b9, 0x9398, 0xa3fb, 0xb3da, 0xc33d, 0xd31c, 0xe37f, 0xf35e, 0x02b1, 0x1290,
    0x22f3, 0x32d2, 0x4235, 0x5214, 0x6277, 0x7256, 0xb5ea, 0xa5cb, 0x95a8, 0x8589, 0xf56e,
    0xe54f, 0xd52c, 0xc50d, 0x34e2, 0x24c3, 0x14a0, 0x0481, 0x7466, 0x6447, 0x5424, 0x4405,
    0xa7db, 0xb7fa, 0x8799, 0x97b8, 0xe75f, 0xf77e, 0xc71d, 0xd73c, 0x26d3, 0x36f2, 0x0691,
    0x16b0, 0x6657, 0x7676, 0x4615, 0x5634, 0xd94c, 0xc96d, 0xf90e, 0xe92f, 0x99c8, 0x89e9,
    0xb98a, 0xa9ab, 0x5844, 0x4865, 0x7806, 0x6827, 0x18c0, 0x08e1, 0x3882, 0x28a3, 0xcb7d,
    0xdb5c, 0xeb3f, 0xfb1e, 0x8bf9, 0x9bd8, 0xabbb, 0xbb9a, 0x4a75, 0x5a54, 0x6a37, 0x7a16,
    0x0af1, 0x1ad0, 0x2ab3, 0x3a92, 0xfd2e, 0xed0f, 0xdd6c, 0xcd4d, 0xbdaa, 0xad8b, 0x9de8,
    0x8dc9, 0x7c26, 0x6c07, 0x5c64, 0x4c45, 0x3ca2, 0x2c83, 0x1ce0, 0x0cc1, 0xef1f, 0xff3e,
    0xcf5d, 0xdf7c, 0xaf9b, 0xbfba, 0x8fd9, 0x9ff8, 0x6e17, 0x7e36, 0x4e55, 0x5e74, 0x2e93,
    0x3eb2, 0x0ed1, 0x1ef0,
};

/* Two bytes a step: the CRC is linear, so two table steps fold into
 * crc2tab[(crc >> 8) ^ b0] ^ crc16tab[(crc & 0xff) ^ b1], where
 * crc2tab[x] is crc16tab[x] pushed through one more zero byte. */
static uint16_t crc2tab[256];
static pthread_once_t crc2_once = PTHREAD_ONCE_INIT;

static void crc2_init(void)
{
    for (int x = 0; x < 256; x++)
        crc2tab[x] = (uint16_t)((crc16tab[x] << 8) ^ crc16tab[crc16tab[x] >> 8]);
}

static uint16_t crc16(const char *buf, size_t len)
{
    const unsigned char *p = (const unsigned char *)buf;
    unsigned crc = 0;
    size_t i = 0;
    for (; i + 2 <= len; i += 2)
        crc = crc2tab[(crc >> 8) ^ p[i]] ^ crc16tab[(crc & 0xff) ^ p[i + 1]];
    if (i < len)
        crc = ((crc << 8) & 0xffff) ^ crc16tab[(crc >> 8) ^ p[i]];
    return (uint16_t)crc;
}

/* The slot of a key: only the part between the first '{' and the next '}'
 * is hashed when it is not empty, so "{user1}.a" and "{user1}.b" share one. */
static int key_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len);
    if (open) {
        size_t rest = len - (size_t)(open - key) - 1;
        const char *close = memchr(open + 1, '}', rest);
        if (close && close > open + 1)
            return crc16(open + 1, (size_t)(close - open - 1)) & (NSLOTS - 1);
    }
    return crc16(key, len) & (NSLOTS - 1);
}

/* The node with this address, added when new; NULL when out of memory or
 * past MAX_NODES. */
static node *node_get(rc *s, const char *host, size_t hlen, int port)
{
    if (hlen >= sizeof ((node *)0)->host)
        return NULL;
    uv_mutex_lock(&s->mu);
    int n = atomic_load(&s->nnodes);
    node *found = NULL;
    for (int i = 0; i < n && !found; i++)
        if (s->nodes[i]->port == port && strlen(s->nodes[i]->host) == hlen &&
            memcmp(s->nodes[i]->host, host, hlen) == 0)
            found = s->nodes[i];
    /* aligned_alloc wants a size that is a multiple of the alignment. */
    if (!found && n < MAX_NODES && (found = aligned_alloc(64, (sizeof *found + 63) / 64 * 64))) {
        memset(found, 0, sizeof *found);
        found->idx = n;
        memcpy(found->host, host, hlen);
        found->host[hlen] = '\0';
        found->port = port;
        snprintf(found->addr, sizeof found->addr, "%s:%d", found->host, port);
        uv_mutex_init(&found->mu);
        found->pid = self_pid();
        s->nodes[n] = found;
        atomic_store_explicit(&s->nnodes, n + 1, memory_order_release);
    }
    uv_mutex_unlock(&s->mu);
    return found;
}

static int node_index(rc *s, node *nd)
{
    (void)s;
    return nd->idx;
}

/* The node's circuit breaker, or NULL (none; or the core has not handed
 * the store's over yet, while create() runs). One node down must not
 * refuse the keys of the others: each node has its own
 * (dp_backend_ops.server_circuits). */
static dp_circuit *node_br(rc *s, node *n)
{
    if (atomic_load_explicit(&n->br_known, memory_order_acquire))
        return atomic_load_explicit(&n->br, memory_order_relaxed);
    dp_circuit *store = atomic_load_explicit(&s->store_br, memory_order_acquire), *c;
    if (!store || dp_circuit_server(store, n->addr, &c) != DP_OK)
        return NULL;
    atomic_store_explicit(&n->br, c, memory_order_relaxed);
    atomic_store_explicit(&n->br_known, 1, memory_order_release);
    return c;
}

/* A call on a node whose breaker refused it: reload the map at most every
 * REFUSED_RELOAD_MS (not at every refused call), so that a promoted replica
 * is found soon while a dead master costs no round trip per call. 1: go
 * ahead and reload. */
#define REFUSED_RELOAD_MS 100
static int refused_reload_due(rc *s)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    int64_t now = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    int64_t last = atomic_load_explicit(&s->refused_refresh, memory_order_relaxed);
    return now - last >= REFUSED_RELOAD_MS &&
           atomic_compare_exchange_strong(&s->refused_refresh, &last, now);
}

static node *slot_node(rc *s, int slot)
{
    unsigned i = atomic_load_explicit(&s->slots[slot], memory_order_acquire);
    return i ? s->nodes[i - 1] : NULL;
}

static void slot_set(rc *s, int slot, node *nd)
{
    int i = node_index(s, nd);
    if (i >= 0)
        atomic_store_explicit(&s->slots[slot], (uint16_t)(i + 1), memory_order_release);
}

/* "host:port" (the host may be an IPv6 address: the port is after the last
 * colon) to a node. */
static node *node_of_addr(rc *s, const char *addr, size_t len)
{
    const char *colon = NULL;
    for (size_t i = len; i > 0; i--)
        if (addr[i - 1] == ':') {
            colon = addr + i - 1;
            break;
        }
    if (!colon || colon == addr)
        return NULL;
    int port = 0;
    for (const char *q = colon + 1; q < addr + len; q++) {
        if (*q < '0' || *q > '9' || port > 65535)
            return NULL;
        port = port * 10 + (*q - '0');
    }
    if (port <= 0 || port > 65535)
        return NULL;
    return node_get(s, addr, (size_t)(colon - addr), port);
}

/* -- Connections ------------------------------------------------------------------ */

static int conn_open(rc *s, node *n, redisContext **out, dp_err *err)
{
    struct timeval ct = tv_of(s->cfg->connect_timeout);
    redisContext *c = redisConnectWithTimeout(n->host, n->port, ct);
    if (!c)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory connecting");
    if (c->err) {
        int timed_out = c->err == REDIS_ERR_IO && (errno == EINPROGRESS || errno == ETIMEDOUT ||
                                                   strstr(c->errstr, "timed out"));
        if (timed_out)
            dp_err_set(err, DP_EBACKEND, NAME ": cannot connect to node %s within "
                       "connect_timeout (%g s)", n->addr, s->cfg->connect_timeout);
        else
            dp_err_set(err, DP_EBACKEND, NAME ": cannot connect to node %s: %s", n->addr,
                       c->errstr);
        redisFree(c);
        return DP_EBACKEND;
    }
    redisSetTimeout(c, tv_of(s->cfg->socket_timeout));
    redisEnableKeepAlive(c);
    if (s->cfg->password) {
        const char *u = s->cfg->username;
        const char *argv[3] = {"AUTH", u ? u : s->cfg->password, s->cfg->password};
        redisReply *r = redisCommandArgv(c, u ? 3 : 2, argv, NULL);
        int rc = DP_OK;
        if (!r)
            rc = io_fail(s, n, c, "AUTH", err);
        else if (r->type == REDIS_REPLY_ERROR)
            /* A configuration error, not an outage. */
            rc = dp_err_set(err, DP_EINVAL, NAME ": AUTH%s%s%s refused by node %s: %s",
                            u ? " as user '" : "", u ? u : "", u ? "'" : "", n->addr, r->str);
        if (r)
            freeReplyObject(r);
        if (rc != DP_OK) {
            redisFree(c);
            return rc;
        }
    }
    *out = c;
    return DP_OK;
}

static void conn_free(conn *c)
{
    redisFree(c->c);
    free(c->w);
    free(c->r);
    free(c);
}

/* This thread's first pool slot. */
static unsigned my_slot(void)
{
    static _Atomic unsigned next;
    static _Thread_local unsigned mine;
    if (!mine)
        mine = atomic_fetch_add_explicit(&next, 1, memory_order_relaxed) % POOL_SLOTS + 1;
    return mine - 1;
}

/* A fork()ed child: drop the parent's idle connections (their sockets are
 * the parent's) once, under the node's mutex. */
static void pool_forked(node *n, pid_t pid)
{
    conn *stale = NULL;
    uv_mutex_lock(&n->mu);
    if (atomic_load(&n->pid) != pid) {
        for (int k = 0; k < POOL_SLOTS; k++) {
            conn *c = atomic_exchange(&n->slot[k].c, NULL);
            if (c) {
                c->next = stale;
                stale = c;
            }
        }
        while (n->idle) {
            conn *c = n->idle;
            n->idle = c->next;
            c->next = stale;
            stale = c;
        }
        atomic_fetch_add(&n->gen, 1);
        atomic_store(&n->pid, pid);
    }
    uv_mutex_unlock(&n->mu);
    while (stale) {
        conn *c = stale;
        stale = c->next;
        conn_free(c);
    }
}

/* An idle connection of the current generation, or NULL. */
static conn *pool_pop(node *n)
{
    unsigned gen = atomic_load_explicit(&n->gen, memory_order_acquire), first = my_slot();
    for (unsigned i = 0; i < POOL_SLOTS; i++) {
        pool_slot *ps = &n->slot[(first + i) % POOL_SLOTS];
        if (!atomic_load_explicit(&ps->c, memory_order_relaxed))
            continue;
        conn *c = atomic_exchange_explicit(&ps->c, NULL, memory_order_acquire);
        if (!c)
            continue;
        if (c->gen == gen)
            return c;
        conn_free(c); /* older than a failure on this node */
    }
    conn *got = NULL, *stale = NULL;
    uv_mutex_lock(&n->mu);
    while (n->idle && !got) {
        conn *c = n->idle;
        n->idle = c->next;
        if (c->gen == gen) {
            got = c;
        } else {
            c->next = stale;
            stale = c;
        }
    }
    uv_mutex_unlock(&n->mu);
    while (stale) {
        conn *c = stale;
        stale = c->next;
        conn_free(c);
    }
    return got;
}

static int conn_take(rc *s, node *n, conn **out, int *reused, dp_err *err)
{
    pid_t pid = self_pid();
    if (atomic_load_explicit(&n->pid, memory_order_relaxed) != pid)
        pool_forked(n, pid);
    conn *got = pool_pop(n);
    if (got) {
        *reused = 1;
        *out = got;
        return DP_OK;
    }
    *reused = 0;
    unsigned gen = atomic_load(&n->gen);
    conn *c = calloc(1, sizeof *c);
    if (!c)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    nopipe np;
    nopipe_begin(&np);
    int rc = conn_open(s, n, &c->c, err);
    nopipe_end(&np);
    if (rc != DP_OK) {
        free(c);
        return rc;
    }
    c->gen = gen;
    *out = c;
    return DP_OK;
}

/* Buffers past this are given back when the connection goes idle: one big
 * value must not pin its size in every pooled connection. */
#define BUF_KEEP (256 * 1024)

static void conn_give(node *n, conn *c, int broken)
{
    unsigned gen = atomic_load_explicit(&n->gen, memory_order_relaxed);
    if (broken) {
        /* The node's other idle connections are likely dead too. */
        atomic_compare_exchange_strong(&n->gen, &(unsigned){c->gen}, c->gen + 1);
    } else if (c->gen == gen && atomic_load_explicit(&n->pid, memory_order_relaxed) == self_pid()) {
        c->wlen = c->rpos = c->rlen = 0;
        if (c->rcap > BUF_KEEP) {
            free(c->r);
            c->r = NULL;
            c->rcap = 0;
        }
        if (c->wcap > BUF_KEEP) {
            free(c->w);
            c->w = NULL;
            c->wcap = 0;
        }
        unsigned first = my_slot();
        for (unsigned i = 0; i < POOL_SLOTS; i++) {
            conn *expect = NULL;
            if (atomic_compare_exchange_strong_explicit(&n->slot[(first + i) % POOL_SLOTS].c,
                                                        &expect, c, memory_order_release,
                                                        memory_order_relaxed))
                return;
        }
        uv_mutex_lock(&n->mu);
        c->next = n->idle;
        n->idle = c;
        uv_mutex_unlock(&n->mu);
        return;
    }
    conn_free(c);
}

/* -- RESP on the connection's own buffers ---------------------------------------- */

static int w_room(conn *c, size_t need)
{
    if (c->wcap - c->wlen >= need)
        return 0;
    size_t cap = c->wcap ? c->wcap : 4096;
    while (cap - c->wlen < need)
        cap *= 2;
    char *p = realloc(c->w, cap);
    if (!p)
        return -1;
    c->w = p;
    c->wcap = cap;
    return 0;
}

/* "<tag><n>\r\n" at p (at most 23 bytes); returns the end. */
static char *put_len(char *p, char tag, size_t n)
{
    *p = tag;
    if (n < 10) {
        p[1] = (char)('0' + n);
        p[2] = '\r', p[3] = '\n';
        return p + 4;
    }
    if (n < 100) {
        p[1] = (char)('0' + n / 10), p[2] = (char)('0' + n % 10);
        p[3] = '\r', p[4] = '\n';
        return p + 5;
    }
    char tmp[20];
    int k = 0;
    do {
        tmp[k++] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    *p++ = tag;
    while (k)
        *p++ = tmp[--k];
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

/* A command's header: "*<argc>\r\n". */
static int w_head(conn *c, size_t argc)
{
    if (w_room(c, 24))
        return -1;
    c->wlen = (size_t)(put_len(c->w + c->wlen, '*', argc) - c->w);
    return 0;
}

static int w_arg(conn *c, const char *a, size_t len)
{
    if (w_room(c, len + 26))
        return -1;
    char *p = put_len(c->w + c->wlen, '$', len);
    memcpy(p, a, len);
    p += len;
    *p++ = '\r';
    *p++ = '\n';
    c->wlen = (size_t)(p - c->w);
    return 0;
}

/* Everything written so far, in one send() when the kernel takes it. */
static int w_flush(conn *c)
{
    size_t off = 0;
    while (off < c->wlen) {
        ssize_t n = send(c->c->fd, c->w + off, c->wlen - off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            c->eno = errno;
            return -1;
        }
        off += (size_t)n;
    }
    c->wlen = 0;
    return 0;
}

/* One reply element, pointing into c->r (valid until the next r_fill). */
typedef struct resp {
    char type;          /* '$' bulk, 'N' nil, '+' status, '-' error, ':' integer, '*' array */
    const char *s;      /* '$', '+', '-': the bytes (not NUL-terminated) */
    size_t len;
    long long n;        /* ':' the integer, '*' the element count (-1: nil array) */
} resp;

static int parse_int(const char *p, const char *end, long long *out)
{
    int neg = p < end && *p == '-';
    p += neg;
    if (p == end)
        return -1;
    long long v = 0;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9' || v > (LLONG_MAX - 9) / 10)
            return -1;
        v = v * 10 + (*p - '0');
    }
    *out = neg ? -v : v;
    return 0;
}

/* Parse the element at c->r[c->rpos]: 1 parsed (and consumed), 0 not all
 * received yet, -1 not RESP. An array is only its header: its elements
 * follow as elements of their own. */
static int r_parse(conn *c, resp *out)
{
    const char *p = c->r + c->rpos, *end = c->r + c->rlen;
    if (end - p < 3)
        return 0;
    if (*p == '$' && p[1] >= '0' && p[1] <= '9') {
        /* The common reply, a value: its length read as the digits go. */
        size_t n = 0;
        const char *q = p + 1;
        while (q < end && *q >= '0' && *q <= '9' && n < ((size_t)1 << 40))
            n = n * 10 + (size_t)(*q++ - '0');
        if (end - q < 2)
            return 0;
        if (q[0] != '\r' || q[1] != '\n')
            return -1;
        q += 2;
        if ((size_t)(end - q) < n + 2)
            return 0;
        if (q[n] != '\r' || q[n + 1] != '\n')
            return -1;
        out->type = '$';
        out->s = q;
        out->len = n;
        c->rpos = (size_t)(q + n + 2 - c->r);
        return 1;
    }
    const char *nl = memchr(p + 1, '\n', (size_t)(end - p - 1));
    if (!nl)
        return 0;
    if (nl[-1] != '\r')
        return -1;
    const char *line = p + 1, *le = nl - 1;
    out->type = *p;
    switch (*p) {
    case '+':
    case '-':
        out->s = line;
        out->len = (size_t)(le - line);
        break;
    case ':':
    case '*':
        if (parse_int(line, le, &out->n))
            return -1;
        break;
    case '$': {
        long long n;
        if (parse_int(line, le, &n) || n < -1)
            return -1;
        if (n == -1) {
            out->type = 'N';
            break;
        }
        if ((size_t)(end - nl - 1) < (size_t)n + 2)
            return 0;
        out->s = nl + 1;
        out->len = (size_t)n;
        if (out->s[n] != '\r' || out->s[n + 1] != '\n')
            return -1;
        c->rpos = (size_t)(out->s + n + 2 - c->r);
        return 1;
    }
    default:
        return -1;
    }
    c->rpos = (size_t)(nl + 1 - c->r);
    return 1;
}

/* Read what has arrived (flags: MSG_DONTWAIT after poll; 0 blocks up to
 * socket_timeout, SO_RCVTIMEO). Bytes already parsed are kept when `keep`
 * (a pipeline's values are still referenced by offset). 1: read something,
 * 0: nothing yet (MSG_DONTWAIT), -1: failed (c->eno). */
static int r_fill(conn *c, int flags, int keep)
{
    if (!keep && c->rpos == c->rlen)
        c->rpos = c->rlen = 0;
    if (c->rcap - c->rlen < 4096) {
        if (!keep && c->rpos) {
            memmove(c->r, c->r + c->rpos, c->rlen - c->rpos);
            c->rlen -= c->rpos;
            c->rpos = 0;
        }
        if (c->rcap - c->rlen < 4096) {
            size_t cap = c->rcap ? c->rcap * 2 : 16384;
            char *p = realloc(c->r, cap);
            if (!p) {
                c->eno = ENOMEM;
                return -1;
            }
            c->r = p;
            c->rcap = cap;
        }
    }
    for (;;) {
        ssize_t n = recv(c->c->fd, c->r + c->rlen, c->rcap - c->rlen, flags);
        if (n > 0) {
            c->rlen += (size_t)n;
            return 1;
        }
        if (n == 0) {
            c->eno = 0;
            return -1;
        }
        if (errno == EINTR)
            continue;
        if ((errno == EAGAIN || errno == EWOULDBLOCK) && (flags & MSG_DONTWAIT))
            return 0;
        c->eno = errno;
        return -1;
    }
}

/* The server closed a connection it had kept idle (a restart, its
 * timeout): worth one retry on a fresh one. */
static int conn_closed(const conn *c)
{
    return c->eno == 0 || c->eno == ECONNRESET || c->eno == EPIPE;
}

static int conn_fail(rc *s, node *n, const conn *c, const char *op, dp_err *err)
{
    if (c->eno == EAGAIN || c->eno == EWOULDBLOCK || c->eno == ETIMEDOUT)
        return dp_err_set(err, DP_EBACKEND, NAME ": %s: no answer from node %s within "
                          "socket_timeout (%g s)", op, n->addr, s->cfg->socket_timeout);
    if (c->eno == 0)
        return dp_err_set(err, DP_EBACKEND, NAME ": %s: node %s closed the connection", op,
                          n->addr);
    if (c->eno == EPROTO)
        return dp_err_set(err, DP_EBACKEND, NAME ": %s: node %s sent what is not RESP", op,
                          n->addr);
    return dp_err_set(err, DP_EBACKEND, NAME ": %s: node %s: %s", op, n->addr,
                      strerror(c->eno));
}

/* -- The slot map ---------------------------------------------------------------- */

/* Read one CLUSTER SLOTS reply into the map. An empty host means "the node
 * you asked". */
static int load_slots(rc *s, node *asked, redisReply *r, dp_err *err)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0)
        return dp_err_set(err, DP_EBACKEND, NAME ": CLUSTER SLOTS on %s: %s", asked->addr,
                          r->type == REDIS_REPLY_ERROR ? r->str : "no slot is served");
    for (size_t i = 0; i < r->elements; i++) {
        redisReply *e = r->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
            e->element[0]->type != REDIS_REPLY_INTEGER ||
            e->element[1]->type != REDIS_REPLY_INTEGER ||
            e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2)
            continue;
        redisReply *m = e->element[2];
        if (m->element[1]->type != REDIS_REPLY_INTEGER)
            continue;
        node *nd;
        if (m->element[0]->type == REDIS_REPLY_STRING && m->element[0]->len > 0 &&
            strcmp(m->element[0]->str, "?") != 0)
            nd = node_get(s, m->element[0]->str, m->element[0]->len, (int)m->element[1]->integer);
        else
            nd = node_get(s, asked->host, strlen(asked->host), (int)m->element[1]->integer);
        if (!nd)
            continue;
        long long lo = e->element[0]->integer, hi = e->element[1]->integer;
        int idx = node_index(s, nd);
        for (long long sl = lo < 0 ? 0 : lo; sl <= hi && sl < NSLOTS; sl++)
            atomic_store_explicit(&s->slots[sl], (uint16_t)(idx + 1), memory_order_release);
        /* The replicas too, so that a failover finds them known. */
        for (size_t k = 3; k < e->elements; k++) {
            redisReply *rp = e->element[k];
            if (rp->type == REDIS_REPLY_ARRAY && rp->elements >= 2 &&
                rp->element[0]->type == REDIS_REPLY_STRING && rp->element[0]->len > 0 &&
                rp->element[1]->type == REDIS_REPLY_INTEGER)
                node_get(s, rp->element[0]->str, rp->element[0]->len,
                         (int)rp->element[1]->integer);
        }
    }
    return DP_OK;
}

static int ask_slots_io(rc *s, node *n, int *answered, dp_err *err)
{
    conn *cn;
    *answered = 0;
    int reused, rc = conn_take(s, n, &cn, &reused, err);
    if (rc != DP_OK)
        return rc;
    redisAppendCommand(cn->c, "CLUSTER SLOTS");
    redisReply *r = NULL;
    if (send_nosignal(cn->c) != REDIS_OK || redisGetReply(cn->c, (void **)&r) != REDIS_OK || !r) {
        rc = io_fail(s, n, cn->c, "CLUSTER SLOTS", err);
        conn_give(n, cn, 1);
        return rc;
    }
    *answered = 1;
    rc = load_slots(s, n, r, err);
    freeReplyObject(r);
    conn_give(n, cn, 0);
    return rc;
}

/* Through the node's breaker: a reload skips a node known dead at once
 * instead of waiting socket_timeout for it. */
static int ask_slots(rc *s, node *n, dp_err *err)
{
    dp_circuit *br = node_br(s, n);
    dp_circuit_guard g;
    int answered;
    if (!br)
        return ask_slots_io(s, n, &answered, err);
    if (dp_circuit_enter(br, &g, err) != DP_OK)
        return DP_EBACKEND;
    int rc = ask_slots_io(s, n, &answered, err);
    /* An answer that is not a map (CLUSTER SLOTS refused) is no outage. */
    dp_circuit_leave(br, &g, answered ? DP_OK : rc, err);
    return rc;
}

/* Reload the map, unless another thread did since the caller looked at
 * `seen` (its version): `prefer` (may be NULL) is asked first, then every
 * known node in turn from a rotating start. */
static int refresh(rc *s, unsigned seen, node *prefer, dp_err *err)
{
    uv_mutex_lock(&s->refresh_mu);
    int rc = DP_OK;
    if (atomic_load(&s->version) == seen) {
        dp_err e;
        snprintf(e.msg, sizeof e.msg, "no node is known");
        rc = prefer ? ask_slots(s, prefer, &e) : DP_EBACKEND;
        int n = atomic_load(&s->nnodes);
        unsigned start = atomic_fetch_add(&s->rr, 1);
        for (int i = 0; i < n && rc != DP_OK; i++) {
            node *nd = s->nodes[(start + (unsigned)i) % (unsigned)n];
            if (nd != prefer)
                rc = ask_slots(s, nd, &e);
        }
        if (rc == DP_OK)
            atomic_fetch_add(&s->version, 1);
        else
            dp_err_set(err, DP_EBACKEND, NAME ": cannot read the slot map from any of %d "
                       "node(s); the last said: %s", n, e.msg);
    }
    uv_mutex_unlock(&s->refresh_mu);
    return rc;
}

/* The node serving `slot`, reloading the map once when it is unknown. */
static node *route(rc *s, int slot, dp_err *err)
{
    node *n = slot_node(s, slot);
    if (n)
        return n;
    if (refresh(s, atomic_load(&s->version), NULL, err) != DP_OK)
        return NULL;
    n = slot_node(s, slot);
    if (!n)
        dp_err_set(err, DP_EBACKEND, NAME ": no node serves slot %d (is every slot of the "
                   "cluster assigned?)", slot);
    return n;
}

/* -- Redirections ------------------------------------------------------------------ */

enum { RD_NONE, RD_MOVED, RD_ASK, RD_RETRY };

/* What an error reply asks of the client; for MOVED and ASK, *to is the
 * node named. */
static int redirect_str(rc *s, const char *str, size_t len, int *slot, node **to)
{
    int moved = len > 6 && memcmp(str, "MOVED ", 6) == 0;
    if (moved || (len > 4 && memcmp(str, "ASK ", 4) == 0)) {
        const char *p = str + (moved ? 6 : 4), *end = str + len;
        long sl = 0;
        const char *q = p;
        while (q < end && *q >= '0' && *q <= '9' && sl < NSLOTS)
            sl = sl * 10 + (*q++ - '0');
        if (q == p || q >= end || *q != ' ' || sl >= NSLOTS)
            return RD_NONE;
        node *n = node_of_addr(s, q + 1, (size_t)(end - q - 1));
        if (!n)
            return RD_NONE;
        *slot = (int)sl;
        *to = n;
        return moved ? RD_MOVED : RD_ASK;
    }
    if ((len >= 8 && memcmp(str, "TRYAGAIN", 8) == 0) ||
        (len >= 11 && memcmp(str, "CLUSTERDOWN", 11) == 0))
        return RD_RETRY;
    return RD_NONE;
}

static int redirect_of(rc *s, const redisReply *r, int *slot, node **to)
{
    if (r->type != REDIS_REPLY_ERROR)
        return RD_NONE;
    return redirect_str(s, r->str, r->len, slot, to);
}

static void on_moved(rc *s, int slot, node *to)
{
    slot_set(s, slot, to);
    /* A reshard moves slots in runs: reload now and then rather than learn
     * them one MOVED at a time. */
    if (atomic_fetch_add(&s->moved, 1) % MOVED_RELOAD == MOVED_RELOAD - 1) {
        dp_err e;
        refresh(s, atomic_load(&s->version), to, &e);
    }
}

/* One command on node n (after ASKING when `asking`): its reply in *out.
 * Retried once on a fresh connection when a reused one was closed. */
static int node_run_io(rc *s, node *n, const char *op, int asking, int argc,
                       const char **argv, const size_t *lens, redisReply **out, dp_err *err)
{
    for (int attempt = 0;; attempt++) {
        conn *cn;
        int reused, rc = conn_take(s, n, &cn, &reused, err);
        if (rc != DP_OK)
            return rc;
        redisContext *c = cn->c;
        if (asking)
            redisAppendCommand(c, "ASKING");
        redisAppendCommandArgv(c, argc, argv, lens);
        redisReply *r = NULL;
        int ok = send_nosignal(c) == REDIS_OK;
        if (ok && asking) {
            ok = redisGetReply(c, (void **)&r) == REDIS_OK && r;
            if (r)
                freeReplyObject(r);
            r = NULL;
        }
        ok = ok && redisGetReply(c, (void **)&r) == REDIS_OK && r;
        if (ok) {
            conn_give(n, cn, 0);
            *out = r;
            return DP_OK;
        }
        int retry = reused && attempt == 0 && closed_by_peer(c);
        if (!retry)
            io_fail(s, n, c, op, err);
        conn_give(n, cn, 1);
        if (!retry)
            return DP_EBACKEND;
    }
}

/* What node_run returns when the node's breaker refused the command: a
 * failure (DP_EBACKEND to the caller) that cost no round trip. */
#define RC_REFUSED (-1)

/* node_run_io through the node's circuit breaker. */
static int node_run(rc *s, node *n, const char *op, int asking, int argc, const char **argv,
                    const size_t *lens, redisReply **out, dp_err *err)
{
    dp_circuit *br = node_br(s, n);
    dp_circuit_guard g;
    if (!br)
        return node_run_io(s, n, op, asking, argc, argv, lens, out, err);
    if (dp_circuit_enter(br, &g, err) != DP_OK)
        return RC_REFUSED;
    return dp_circuit_leave(br, &g, node_run_io(s, n, op, asking, argc, argv, lens, out, err),
                            err);
}

/* Run one command on the key's slot, following MOVED and ASK, retrying
 * TRYAGAIN and CLUSTERDOWN within socket_timeout, and finding the slot's new
 * master when its node cannot be reached. `ask` (may be NULL): start with
 * ASKING on that node. The reply in *out is never a redirection. */
static int exec_slot(rc *s, int slot, node *ask, const char *op, int argc, const char **argv,
                     const size_t *lens, redisReply **out, dp_err *err)
{
    dp_backoff bo;
    int backing = 0;
    for (int hop = 0; hop < MAX_HOPS; hop++) {
        node *n = ask ? ask : route(s, slot, err);
        if (!n)
            return DP_EBACKEND;
        unsigned seen = atomic_load(&s->version);
        redisReply *r;
        int rc = node_run(s, n, op, ask != NULL, argc, argv, lens, &r, err);
        if (rc == RC_REFUSED) {
            /* The node's breaker is open: a failover may have given the
             * slot to a replica since (checked now and then, not each call). */
            dp_err e;
            if (!ask && refused_reload_due(s) && refresh(s, seen, NULL, &e) == DP_OK &&
                slot_node(s, slot) != n)
                continue;
            return DP_EBACKEND;
        }
        if (rc == DP_EBACKEND && !ask) {
            /* Down, or failed over: if the map now names another master for
             * the slot, go there. */
            dp_err e;
            if (refresh(s, seen, NULL, &e) == DP_OK && slot_node(s, slot) != n)
                continue;
            return rc;
        }
        if (rc != DP_OK)
            return rc;
        ask = NULL;
        int sl;
        node *to;
        switch (redirect_of(s, r, &sl, &to)) {
        case RD_NONE:
            *out = r;
            return DP_OK;
        case RD_MOVED:
            on_moved(s, sl, to);
            break;
        case RD_ASK:
            ask = to;
            break;
        case RD_RETRY:
            if (!backing) {
                dp_backoff_init(&bo, s->cfg->socket_timeout, 0.05);
                backing = 1;
            }
            if (!dp_backoff_sleep(&bo)) {
                dp_err_set(err, DP_EBACKEND, NAME ": %s: node %s: %s (still after "
                           "socket_timeout, %g s)", op, n->addr, r->str, s->cfg->socket_timeout);
                freeReplyObject(r);
                return DP_EBACKEND;
            }
            if (strncmp(r->str, "CLUSTERDOWN", 11) == 0) {
                dp_err e;
                refresh(s, atomic_load(&s->version), NULL, &e);
            }
            hop--; /* bounded by the deadline instead */
            break;
        }
        freeReplyObject(r);
    }
    return dp_err_set(err, DP_EBACKEND, NAME ": %s: more than %d redirections for slot %d",
                      op, MAX_HOPS, slot);
}

/* exec_slot for a key, an error reply turned into err. */
static int exec_key(rc *s, const char *key, size_t klen, const char *op, int argc,
                    const char **argv, const size_t *lens, redisReply **out, dp_err *err)
{
    int rc = exec_slot(s, key_slot(key, klen), NULL, op, argc, argv, lens, out, err);
    if (rc == DP_OK && (*out)->type == REDIS_REPLY_ERROR) {
        dp_err_set(err, DP_EBACKEND, NAME ": %s: %s", op, (*out)->str);
        freeReplyObject(*out);
        return DP_EBACKEND;
    }
    return rc;
}

/* -- Values ------------------------------------------------------------------------ */

/* GET through exec_key: redirections, retries, failover. */
static int get_slow(rc *s, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    const char *argv[2] = {"GET", key};
    size_t lens[2] = {3, klen};
    redisReply *r;
    int st = exec_key(s, key, klen, "GET", 2, argv, lens, &r, err);
    if (st != DP_OK)
        return st;
    if (r->type == REDIS_REPLY_NIL) {
        freeReplyObject(r);
        atomic_fetch_add_explicit(&s->misses, 1, memory_order_relaxed);
        return DP_ENOTFOUND;
    }
    if (r->type != REDIS_REPLY_STRING) {
        freeReplyObject(r);
        return dp_err_set(err, DP_EBACKEND, NAME ": GET: the key holds a value of another type");
    }
    if (dp_bytes_reserve(out, r->len ? r->len : 1) != DP_OK) {
        freeReplyObject(r);
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory copying a %zu-byte value",
                          r->len);
    }
    memcpy(out->data, r->str, r->len);
    out->len = r->len;
    freeReplyObject(r);
    atomic_fetch_add_explicit(&s->hits, 1, memory_order_relaxed);
    return DP_OK;
}

static int got_value(rc *s, const char *v, size_t len, dp_bytes *out, dp_err *err)
{
    if (dp_bytes_reserve(out, len ? len : 1) != DP_OK)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory copying a %zu-byte value", len);
    memcpy(out->data, v, len);
    out->len = len;
    atomic_fetch_add_explicit(&s->hits, 1, memory_order_relaxed);
    return DP_OK;
}

/* The hit path: one GET written and read on the connection's own buffers,
 * one send() and (for a value of up to ~16 KB) one recv(), nothing
 * allocated. A redirection or an error reply is left to get_slow, which
 * knows what to do about it; a node that fails is treated as exec_slot
 * does (a fresh connection once when a reused one was closed; then the map
 * reloaded, and the slot's new master asked when there is one). */
static int rc_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    rc *s = self;
    int slot = key_slot(key, klen);
    node *n = slot_node(s, slot);
    if (!n)
        return get_slow(s, key, klen, out, err);
    unsigned seen = atomic_load_explicit(&s->version, memory_order_relaxed);
    dp_circuit *br = node_br(s, n);
    dp_circuit_guard g;
    if (br && dp_circuit_enter(br, &g, err) != DP_OK) {
        /* Refused: the node is down. Failed over since? Looked at now and
         * then (the slot's new master is then asked). */
        dp_err e;
        if (refused_reload_due(s) && refresh(s, seen, NULL, &e) == DP_OK &&
            slot_node(s, slot) != n)
            return get_slow(s, key, klen, out, err);
        return DP_EBACKEND;
    }
    for (int attempt = 0;; attempt++) {
        conn *c;
        int reused;
        if (conn_take(s, n, &c, &reused, err) != DP_OK)
            break;
        resp r;
        int got = 0, io = 0;
        if (w_head(c, 2) || w_arg(c, "GET", 3) || w_arg(c, key, klen)) {
            c->eno = ENOMEM;
            got = -1;
        } else if (w_flush(c)) {
            io = 1;
        } else {
            while ((got = r_parse(c, &r)) == 0)
                if (r_fill(c, 0, 0) < 0) {
                    io = 1;
                    break;
                }
            if (got < 0 || (got > 0 && c->rpos != c->rlen)) {
                c->eno = EPROTO; /* not RESP, or more than one reply */
                got = -1;
            }
        }
        if (got > 0) {
            int st = -1, sl;
            node *to;
            if (r.type == '$')
                st = got_value(s, r.s, r.len, out, err);
            else if (r.type == 'N')
                st = DP_ENOTFOUND;
            else if (r.type == '-' && redirect_str(s, r.s, r.len, &sl, &to) == RD_MOVED)
                on_moved(s, sl, to);
            conn_give(n, c, 0);
            if (br)
                dp_circuit_leave(br, &g, DP_OK, err);
            if (st == DP_ENOTFOUND)
                atomic_fetch_add_explicit(&s->misses, 1, memory_order_relaxed);
            return st != -1 ? st : get_slow(s, key, klen, out, err);
        }
        int retry = reused && attempt == 0 && io && c->rlen == 0 && conn_closed(c);
        if (!retry)
            conn_fail(s, n, c, "GET", err);
        conn_give(n, c, 1);
        if (!retry)
            break;
    }
    if (br)
        dp_circuit_leave(br, &g, DP_EBACKEND, err);
    /* Down, or failed over: if the map now names another master for the
     * slot, go there. */
    dp_err e;
    if (refresh(s, seen, NULL, &e) == DP_OK && slot_node(s, slot) != n)
        return get_slow(s, key, klen, out, err);
    return DP_EBACKEND;
}

static long long ttl_ms(const rc *s)
{
    return s->cfg->ttl > 0 ? (long long)ceil(s->cfg->ttl * 1000) : 0;
}

static int rc_set(void *self, const char *key, size_t klen, const char *value, size_t vlen,
                  dp_err *err)
{
    rc *s = self;
    char px[32];
    long long ms = ttl_ms(s);
    int n = snprintf(px, sizeof px, "%lld", ms);
    const char *argv[5] = {"SET", key, value, "PX", px};
    size_t lens[5] = {3, klen, vlen, 2, (size_t)n};
    redisReply *r;
    int st = exec_key(s, key, klen, "SET", ms ? 5 : 3, argv, lens, &r, err);
    if (st == DP_OK)
        freeReplyObject(r);
    return st;
}

static int rc_del(void *self, const char *key, size_t klen, dp_err *err)
{
    rc *s = self;
    const char *argv[2] = {"DEL", key};
    size_t lens[2] = {3, klen};
    redisReply *r;
    int st = exec_key(s, key, klen, "DEL", 2, argv, lens, &r, err);
    if (st == DP_OK)
        freeReplyObject(r);
    return st;
}

/* -- Multi forms: one pipeline per node, all written before any is read ------------- */

/* A key's state in a multi call. */
enum { K_PENDING, K_VALUE, K_DONE, K_FAILED };

typedef struct mkey {
    int slot;
    int next;             /* the next key of its run this round, -1 */
    unsigned char state;
    unsigned char alone;  /* sent in a command of its own from now on */
    int where;            /* K_VALUE: the group whose buffer holds it, -1: m->arena */
    size_t off, len;      /* K_VALUE: its bytes there */
    node *ask;            /* ASK named this node this round */
} mkey;

/* The keys of one slot on one node this round: one command (GET or MGET,
 * DEL; SET is always one key): a cluster refuses commands across slots. */
typedef struct run {
    int first, last, count, slot, group;
} run;

typedef struct group {
    node *n;
    conn *c;
    int reused;
    int *runs, nruns;     /* its runs, in the order written */
    int cur;              /* reading: the run whose reply is next */
    int key, elem;        /* inside an MGET reply: its key, its element */
    int in_array;
    int broken;           /* c failed: given back broken at the end of the round */
    int down, down_from;  /* the node failed; runs[down_from..] have no reply */
    dp_circuit *br;       /* the node's breaker, when this round went through it */
    dp_circuit_guard cg;
    int refused;          /* the breaker refused the node: no I/O this round */
    dp_err err;
} group;

typedef struct multi {
    rc *s;
    const char *op;       /* "GET", "SET" or "DEL" */
    size_t n;
    const char *const *keys, *const *values;
    const size_t *klens, *vlens;
    char px[32];
    size_t pxlen;
    mkey *k;
    int *todo, *hash, *grun;
    run *runs;
    size_t hsize, nask;
    dp_bytes arena;       /* values of earlier rounds (and ASKed keys) */
    size_t nfailed;
    dp_err first;         /* why the first failed key failed */
    int first_key;        /* which key that was */
    /* get_multi's */
    dp_bytes *out;
    int64_t *outlens;
    int assembled, oom;
} multi;

static void fail_key(multi *m, int i, const dp_err *why)
{
    if (m->k[i].state != K_FAILED) {
        m->k[i].state = K_FAILED;
        if (m->nfailed++ == 0) {
            m->first = *why;
            m->first_key = i;
        }
    }
}

/* The command of key i alone, for an ASK redirection. */
static int key_argv(multi *m, int i, const char **argv, size_t *lens)
{
    if (m->op[0] == 'S') {
        argv[0] = "SET", argv[1] = m->keys[i], argv[2] = m->values[i];
        argv[3] = "PX", argv[4] = m->px;
        lens[0] = 3, lens[1] = m->klens[i], lens[2] = m->vlens[i];
        lens[3] = 2, lens[4] = m->pxlen;
        return m->pxlen ? 5 : 3;
    }
    argv[0] = m->op, argv[1] = m->keys[i];
    lens[0] = 3, lens[1] = m->klens[i];
    return 2;
}

static int w_run(multi *m, conn *c, const run *ru)
{
    int i = ru->first;
    if (m->op[0] == 'S') {
        return w_head(c, m->pxlen ? 5 : 3) || w_arg(c, "SET", 3) ||
               w_arg(c, m->keys[i], m->klens[i]) || w_arg(c, m->values[i], m->vlens[i]) ||
               (m->pxlen && (w_arg(c, "PX", 2) || w_arg(c, m->px, m->pxlen)));
    }
    int mget = m->op[0] == 'G' && ru->count > 1;
    if (w_head(c, 1 + (size_t)ru->count) ||
        (mget ? w_arg(c, "MGET", 4) : w_arg(c, m->op, 3)))
        return -1;
    for (; i >= 0; i = m->k[i].next)
        if (w_arg(c, m->keys[i], m->klens[i]))
            return -1;
    return 0;
}

/* A value (or its absence) for key i. */
static void key_reply(multi *m, int gi, group *g, int i, const resp *r)
{
    mkey *k = &m->k[i];
    if (r->type == '-') {
        dp_err e;
        dp_err_set(&e, DP_EBACKEND, NAME ": %s: %.*s", m->op, (int)r->len, r->s);
        fail_key(m, i, &e);
    } else if (r->type == '$' && m->op[0] == 'G') {
        k->state = K_VALUE;
        k->where = gi;
        k->off = (size_t)(r->s - g->c->r);
        k->len = r->len;
    } else {
        k->state = K_DONE;
    }
}

/* Parse what group g has received: 1 every reply is in, 0 more to come,
 * -1 not RESP (or not the replies asked for). Redirected keys go to
 * todo[*again..]. */
static int group_parse(multi *m, int gi, group *g, size_t *again, int *retry_later)
{
    rc *s = m->s;
    while (g->cur < g->nruns) {
        run *ru = &m->runs[g->runs[g->cur]];
        resp r;
        int p = r_parse(g->c, &r);
        if (p <= 0)
            return p;
        if (g->in_array) {
            if (r.type != '$' && r.type != 'N')
                return -1;
            key_reply(m, gi, g, g->key, &r);
            g->key = m->k[g->key].next;
            if (++g->elem == ru->count) {
                g->in_array = 0;
                g->cur++;
            }
            continue;
        }
        g->cur++;
        if (r.type == '-') {
            /* For the whole run. */
            int sl;
            node *to = NULL;
            int rd = redirect_str(s, r.s, r.len, &sl, &to);
            if (rd == RD_MOVED)
                on_moved(s, sl, to);
            if (rd == RD_RETRY)
                *retry_later = 1;
            for (int i = ru->first; i >= 0; i = m->k[i].next) {
                if (rd == RD_NONE) {
                    key_reply(m, gi, g, i, &r);
                } else if (rd == RD_ASK) {
                    m->k[i].ask = to;
                    m->nask++;
                } else {
                    /* A slot half migrated answers TRYAGAIN to an MGET:
                     * alone, each key gets its own ASK. */
                    m->k[i].alone |= rd == RD_RETRY && ru->count > 1;
                    m->todo[(*again)++] = i;
                }
            }
            continue;
        }
        if (m->op[0] == 'G' && ru->count > 1) {
            if (r.type != '*' || r.n != ru->count)
                return -1;
            g->cur--;
            g->in_array = 1;
            g->elem = 0;
            g->key = ru->first;
            continue;
        }
        if (r.type == '*')
            return -1;
        for (int i = ru->first; i >= 0; i = m->k[i].next)
            key_reply(m, gi, g, i, &r);
    }
    return 1;
}

/* The keys of g's runs from `from` on: back into todo, their values
 * dropped. */
static void group_requeue(multi *m, group *g, int from, size_t *again)
{
    for (int q = from; q < g->nruns; q++)
        for (int i = m->runs[g->runs[q]].first; i >= 0; i = m->k[i].next) {
            m->k[i].state = K_PENDING;
            m->todo[(*again)++] = i;
        }
}

static void group_down(multi *m, group *g, int from)
{
    g->down = 1;
    g->down_from = from;
    if (from < g->nruns && g->c)
        for (int i = m->runs[g->runs[from]].first; i >= 0; i = m->k[i].next)
            m->k[i].state = K_PENDING; /* a half-read MGET */
}

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Read every group's replies as they arrive, until all are in or
 * socket_timeout has passed. */
static void multi_read(multi *m, group *g, int ng, struct pollfd *pf, int *pg, int round,
                       size_t *again, int *retry_later)
{
    rc *s = m->s;
    double deadline = mono_now() + s->cfg->socket_timeout;
    int np = 0;
    for (int k = 0; k < ng; k++)
        if (g[k].c && !g[k].broken) {
            pf[np].fd = g[k].c->c->fd;
            pf[np].events = POLLIN;
            pg[np++] = k;
        }
    while (np > 0) {
        double left = deadline - mono_now();
        int ready = left > 0 ? poll(pf, (nfds_t)np, (int)ceil(left * 1000)) : 0;
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready <= 0) {
            /* Silent past socket_timeout (or poll failed): those nodes are down. */
            for (int q = 0; q < np; q++) {
                group *gq = &g[pg[q]];
                gq->c->eno = ready == 0 ? ETIMEDOUT : errno;
                conn_fail(s, gq->n, gq->c, m->op, &gq->err);
                gq->broken = 1;
                group_down(m, gq, gq->cur);
            }
            return;
        }
        for (int q = 0; q < np; q++) {
            if (!pf[q].revents)
                continue;
            int gi = pg[q];
            group *gq = &g[gi];
            int st = r_fill(gq->c, MSG_DONTWAIT, 1);
            if (st > 0) {
                st = group_parse(m, gi, gq, again, retry_later);
                if (st > 0 && gq->c->rpos != gq->c->rlen)
                    st = -1; /* more than was asked for */
            }
            else if (st == 0)
                continue; /* spurious */
            else
                st = -2;
            if (st == 0)
                continue;
            if (st < 0) {
                gq->broken = 1;
                if (st == -1)
                    gq->c->eno = EPROTO;
                if (st == -2 && gq->reused && round == 0 && gq->c->rlen == 0 &&
                    conn_closed(gq->c)) {
                    group_requeue(m, gq, gq->cur, again);
                } else {
                    conn_fail(s, gq->n, gq->c, m->op, &gq->err);
                    group_down(m, gq, gq->cur);
                }
            }
            /* Done with this group: off the poll list. */
            np--;
            pf[q] = pf[np];
            pg[q] = pg[np];
            q--;
        }
    }
}

static void assemble(multi *m, group *g);

/* One round: the keys in todo[0..ntodo) to their nodes; what must go round
 * again is written back into todo, its count returned. `last`: no round
 * follows, whatever this one leaves. */
static size_t multi_round(multi *m, size_t ntodo, int round, int *retry_later)
{
    rc *s = m->s;
    size_t again = 0;
    int nnodes = 0;
    /* Route; group by node, and by slot within a node. */
    for (size_t t = 0; t < ntodo; t++) {
        dp_err e;
        int i = m->todo[t];
        if (!route(s, m->k[i].slot, &e))
            fail_key(m, i, &e);
    }
    nnodes = atomic_load(&s->nnodes); /* only added: every node routed to is among them */
    int *gmap = malloc((size_t)nnodes * sizeof *gmap);
    group *g = calloc((size_t)nnodes, sizeof *g);
    struct pollfd *pf = malloc((size_t)nnodes * sizeof *pf);
    int *pg = malloc((size_t)nnodes * sizeof *pg);
    if (!gmap || !g || !pf || !pg) {
        dp_err e;
        dp_err_set(&e, DP_ENOMEM, NAME ": out of memory");
        for (size_t t = 0; t < ntodo; t++)
            fail_key(m, m->todo[t], &e);
        free(gmap);
        free(g);
        free(pf);
        free(pg);
        return 0;
    }
    for (int k = 0; k < nnodes; k++)
        gmap[k] = -1;
    size_t hmask = m->hsize - 1;
    for (size_t h = 0; h < m->hsize; h++)
        m->hash[h] = -1;
    int nruns = 0, ng = 0, runs_alone = m->op[0] == 'S';
    for (size_t t = 0; t < ntodo; t++) {
        int i = m->todo[t];
        mkey *k = &m->k[i];
        if (k->state == K_FAILED)
            continue;
        k->next = -1;
        k->ask = NULL;
        size_t h = ((unsigned)k->slot * 40503u) & hmask;
        if (!runs_alone && !k->alone) {
            while (m->hash[h] >= 0 && m->runs[m->hash[h]].slot != k->slot)
                h = (h + 1) & hmask;
            if (m->hash[h] >= 0) {
                run *ru = &m->runs[m->hash[h]];
                m->k[ru->last].next = i;
                ru->last = i;
                ru->count++;
                continue;
            }
        }
        node *nd = slot_node(s, k->slot);
        if (!nd || nd->idx >= nnodes) {
            /* The map changed since routing (another thread reloaded it):
             * next round. */
            m->todo[again++] = i;
            continue;
        }
        if (gmap[nd->idx] < 0) {
            gmap[nd->idx] = ng;
            g[ng++].n = nd;
        }
        run *ru = &m->runs[nruns];
        *ru = (run){.first = i, .last = i, .count = 1, .slot = k->slot, .group = gmap[nd->idx]};
        if (!runs_alone && !k->alone)
            m->hash[h] = nruns;
        g[ru->group].nruns++;
        nruns++;
    }
    int pos = 0;
    for (int k = 0; k < ng; k++) {
        g[k].runs = m->grun + pos;
        pos += g[k].nruns;
        g[k].nruns = 0;
    }
    for (int r = 0; r < nruns; r++) {
        group *gk = &g[m->runs[r].group];
        gk->runs[gk->nruns++] = r;
    }
    /* Write every pipeline, then read them all: the nodes work at once. */
    unsigned seen = atomic_load(&s->version);
    for (int k = 0; k < ng; k++) {
        group *gk = &g[k];
        gk->br = node_br(s, gk->n);
        if (gk->br && dp_circuit_enter(gk->br, &gk->cg, &gk->err) != DP_OK) {
            /* Known down: its keys fail at once, the other nodes' go on. */
            gk->br = NULL;
            gk->refused = 1;
            gk->c = NULL;
            group_down(m, gk, 0);
            continue;
        }
        if (conn_take(s, gk->n, &gk->c, &gk->reused, &gk->err) != DP_OK) {
            gk->c = NULL;
            group_down(m, gk, 0);
            continue;
        }
        int bad = 0;
        for (int q = 0; q < gk->nruns && !bad; q++)
            bad = w_run(m, gk->c, &m->runs[gk->runs[q]]) != 0;
        if (bad) {
            gk->c->eno = ENOMEM;
            conn_fail(s, gk->n, gk->c, m->op, &gk->err);
            gk->broken = 1;
            group_down(m, gk, 0);
        } else if (w_flush(gk->c)) {
            gk->broken = 1;
            if (gk->reused && round == 0 && conn_closed(gk->c)) {
                group_requeue(m, gk, 0, &again);
            } else {
                conn_fail(s, gk->n, gk->c, m->op, &gk->err);
                group_down(m, gk, 0);
            }
        }
    }
    multi_read(m, g, ng, pf, pg, round, &again, retry_later);
    /* Keys that a slot being migrated sent elsewhere with ASK: one by one. */
    if (m->nask) {
        for (int r = 0; r < nruns; r++)
            for (int i = m->runs[r].first; i >= 0; i = m->k[i].next) {
                mkey *k = &m->k[i];
                if (!k->ask)
                    continue;
                const char *argv[5];
                size_t lens[5];
                int argc = key_argv(m, i, argv, lens);
                redisReply *rp;
                dp_err e;
                if (exec_slot(s, k->slot, k->ask, m->op, argc, argv, lens, &rp, &e) != DP_OK) {
                    fail_key(m, i, &e);
                    continue;
                }
                resp r = {.type = rp->type == REDIS_REPLY_ERROR ? '-' :
                          rp->type == REDIS_REPLY_STRING ? '$' : 'N', .s = rp->str,
                          .len = rp->len};
                if (r.type == '$') {
                    if (dp_bytes_reserve(&m->arena, m->arena.len + r.len + 1) != DP_OK) {
                        dp_err_set(&e, DP_ENOMEM, NAME ": out of memory");
                        fail_key(m, i, &e);
                    } else {
                        k->state = K_VALUE;
                        k->where = -1;
                        k->off = m->arena.len;
                        k->len = r.len;
                        memcpy(m->arena.data + m->arena.len, r.s, r.len);
                        m->arena.len += r.len;
                    }
                } else {
                    key_reply(m, 0, NULL, i, &r);
                }
                freeReplyObject(rp);
            }
        m->nask = 0;
    }
    int down = 0, io_down = 0;
    for (int k = 0; k < ng; k++) {
        down |= g[k].down;
        io_down |= g[k].down && !g[k].refused;
        if (g[k].br)
            dp_circuit_leave(g[k].br, &g[k].cg, g[k].down ? DP_EBACKEND : DP_OK, &g[k].err);
    }
    if (down) {
        /* A node could not be reached: failed over? Its keys go round again
         * when the map now sends them elsewhere, and fail otherwise. A node
         * whose breaker refused it is looked at now and then only. */
        dp_err e;
        int fresh = (io_down || refused_reload_due(s)) && refresh(s, seen, NULL, &e) == DP_OK;
        for (int k = 0; k < ng; k++) {
            if (!g[k].down)
                continue;
            for (int q = g[k].down_from; q < g[k].nruns; q++)
                for (int i = m->runs[g[k].runs[q]].first; i >= 0; i = m->k[i].next) {
                    if (fresh && slot_node(s, m->k[i].slot) != g[k].n && round + 1 < MAX_ROUNDS)
                        m->todo[again++] = i;
                    else
                        fail_key(m, i, &g[k].err);
                }
        }
    }
    /* The values now: into the caller's buffer when this was the last
     * round, else aside until it is. */
    if (again == 0 && m->out)
        assemble(m, g);
    else
        for (size_t i = 0; i < m->n; i++) {
            mkey *k = &m->k[i];
            if (k->state != K_VALUE || k->where < 0)
                continue;
            if (dp_bytes_reserve(&m->arena, m->arena.len + k->len + 1) != DP_OK) {
                dp_err e;
                dp_err_set(&e, DP_ENOMEM, NAME ": out of memory");
                fail_key(m, (int)i, &e);
                continue;
            }
            memcpy(m->arena.data + m->arena.len, g[k->where].c->r + k->off, k->len);
            k->off = m->arena.len;
            k->where = -1;
            m->arena.len += k->len;
        }
    for (int k = 0; k < ng; k++)
        if (g[k].c)
            conn_give(g[k].n, g[k].c, g[k].broken);
    free(gmap);
    free(g);
    free(pf);
    free(pg);
    return again;
}

/* get_multi's result: the values in key order in m->out; a key whose node
 * failed has vlens -2. */
static void assemble(multi *m, group *g)
{
    size_t total = 0;
    for (size_t i = 0; i < m->n; i++)
        if (m->k[i].state == K_VALUE)
            total += m->k[i].len;
    m->assembled = 1;
    m->out->len = 0;
    if (dp_bytes_reserve(m->out, total ? total : 1) != DP_OK) {
        m->oom = 1;
        return;
    }
    uint64_t hits = 0, misses = 0;
    for (size_t i = 0; i < m->n; i++) {
        mkey *k = &m->k[i];
        if (k->state == K_VALUE) {
            const char *src = k->where >= 0 ? g[k->where].c->r : m->arena.data;
            memcpy(m->out->data + m->out->len, src + k->off, k->len);
            m->out->len += k->len;
            m->outlens[i] = (int64_t)k->len;
            hits++;
        } else if (k->state == K_DONE) {
            m->outlens[i] = -1;
            misses++;
        } else {
            m->outlens[i] = DP_VLEN_FAILED;
        }
    }
    atomic_fetch_add_explicit(&m->s->hits, hits, memory_order_relaxed);
    atomic_fetch_add_explicit(&m->s->misses, misses, memory_order_relaxed);
}

/* Run m->op for every key; afterwards each key has a reply or is failed
 * (and get_multi's values are in m->out). */
static int multi_run(multi *m, dp_err *err)
{
    size_t n = m->n;
    size_t hsize = 16;
    while (hsize < 2 * n)
        hsize *= 2;
    m->hsize = hsize;
    /* One block for the call. */
    size_t sz = n * sizeof *m->k + n * sizeof *m->runs + (2 * n + hsize) * sizeof(int);
    char *block = malloc(sz);
    if (!block)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    m->k = (mkey *)block;
    m->runs = (run *)(m->k + n);
    m->todo = (int *)(m->runs + n);
    m->grun = m->todo + n;
    m->hash = m->grun + n;
    for (size_t i = 0; i < n; i++) {
        m->k[i] = (mkey){.slot = key_slot(m->keys[i], m->klens[i]), .next = -1};
        m->todo[i] = (int)i;
    }
    size_t ntodo = n;
    dp_backoff bo;
    int backing = 0;
    for (int round = 0; ntodo && round < MAX_ROUNDS + 64; round++) {
        int retry_later = 0;
        ntodo = multi_round(m, ntodo, round < MAX_ROUNDS ? round : MAX_ROUNDS - 1, &retry_later);
        if (ntodo && retry_later) {
            if (!backing) {
                dp_backoff_init(&bo, m->s->cfg->socket_timeout, 0.05);
                backing = 1;
            }
            if (!dp_backoff_sleep(&bo))
                break;
        } else if (round >= MAX_ROUNDS) {
            break;
        }
    }
    if (ntodo) {
        dp_err e;
        dp_err_set(&e, DP_EBACKEND, NAME ": %s: still redirected or TRYAGAIN after "
                   "socket_timeout (%g s)", m->op, m->s->cfg->socket_timeout);
        for (size_t t = 0; t < ntodo; t++)
            fail_key(m, m->todo[t], &e);
    }
    if (m->out && !m->assembled)
        assemble(m, NULL); /* every value is in the arena by now */
    return DP_OK;
}

static void multi_free(multi *m)
{
    free(m->k);
    dp_bytes_free(&m->arena);
}

/* The failure of a multi form: some keys failed (their node did), the
 * others were done: DP_EPARTIAL, the message naming the first failure's
 * node and key and how many failed. */
static int multi_failed(multi *m, dp_err *err)
{
    int i = m->first_key;
    int klen = m->klens[i] > 200 ? 200 : (int)m->klens[i];
    return dp_err_set(err, DP_EPARTIAL, "%s (%zu of %zu keys failed, the first '%.*s')",
                      m->first.msg, m->nfailed, m->n, klen, m->keys[i]);
}

/* get_multi: values in key order; a key whose node failed has vlens[i]
 * DP_VLEN_FAILED and the call returns DP_EPARTIAL with the others filled
 * in. */
static int rc_get_multi(void *self, size_t n, const char *const *keys, const size_t *klens,
                        dp_bytes *out, int64_t *vlens, dp_err *err)
{
    rc *s = self;
    out->len = 0;
    if (n == 0)
        return DP_OK;
    multi m = {.s = s, .op = "GET", .n = n, .keys = keys, .klens = klens, .out = out,
               .outlens = vlens};
    int st = multi_run(&m, err);
    if (st == DP_OK && m.oom)
        st = dp_err_set(err, DP_ENOMEM, NAME ": out of memory copying the values");
    else if (st == DP_OK && m.nfailed)
        st = multi_failed(&m, err);
    multi_free(&m);
    return st;
}

static int rc_set_multi(void *self, size_t n, const char *const *keys, const size_t *klens,
                        const char *const *values, const size_t *vlens, dp_err *err)
{
    rc *s = self;
    if (n == 0)
        return DP_OK;
    multi m = {.s = s, .op = "SET", .n = n, .keys = keys, .klens = klens, .values = values,
               .vlens = vlens};
    long long ms = ttl_ms(s);
    if (ms)
        m.pxlen = (size_t)snprintf(m.px, sizeof m.px, "%lld", ms);
    int st = multi_run(&m, err);
    if (st == DP_OK && m.nfailed)
        st = multi_failed(&m, err);
    multi_free(&m);
    return st;
}

static int rc_del_multi(void *self, size_t n, const char *const *keys, const size_t *klens,
                        dp_err *err)
{
    rc *s = self;
    if (n == 0)
        return DP_OK;
    multi m = {.s = s, .op = "DEL", .n = n, .keys = keys, .klens = klens};
    int st = multi_run(&m, err);
    if (st == DP_OK && m.nfailed)
        st = multi_failed(&m, err);
    multi_free(&m);
    return st;
}

static void rc_stats(void *self, dp_backend_stats *out)
{
    rc *s = self;
    out->hits = (double)atomic_load(&s->hits);
    out->misses = (double)atomic_load(&s->misses);
}

/* -- The distributed lock --------------------------------------------------------------- */

static char *lock_key(rc *s, const char *key, size_t klen, size_t *outlen)
{
    char *lk = malloc(s->prefix_len + klen + 1);
    if (lk) {
        memcpy(lk, s->cfg->lock_prefix, s->prefix_len);
        memcpy(lk + s->prefix_len, key, klen);
        lk[s->prefix_len + klen] = '\0';
        *outlen = s->prefix_len + klen;
    }
    return lk;
}

/* A waiter's own connection to the lock key's node, SSUBSCRIBEd to the lock
 * key's shard channel (a fresh one each wait: waits are rare, and a
 * subscribed connection must not go back to the pool). NULL when the node
 * refuses (MOVED, an ACL): the wait then polls; NULL and *failed, with err,
 * when it cannot be reached or does not answer. */
static redisContext *sub_open(rc *s, const char *lk, size_t lklen, int *failed, dp_err *err)
{
    *failed = 0;
    node *n = route(s, key_slot(lk, lklen), err);
    if (!n) {
        *failed = 1;
        return NULL;
    }
    redisContext *c = NULL;
    nopipe np;
    nopipe_begin(&np);
    int saved = errno;
    if (conn_open(s, n, &c, err) == DP_OK) {
        const char *argv[2] = {"SSUBSCRIBE", lk};
        size_t lens[2] = {10, lklen};
        redisReply *r = redisCommandArgv(c, 2, argv, lens);
        if (!r) {
            /* No answer (a stopped node): the caller's call fails now
             * rather than wait another socket_timeout on its next try. */
            io_fail(s, n, c, "SSUBSCRIBE (lock wait)", err);
            *failed = 1;
        }
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 3) {
            redisFree(c); /* MOVED (the slot left this node): poll instead */
            c = NULL;
        }
        if (r)
            freeReplyObject(r);
    } else {
        *failed = 1;
    }
    nopipe_end(&np);
    errno = saved;
    return c;
}

/* 1: something arrived (a release, or the slot moved), 0: `seconds`
 * passed, -1: the connection failed. */
static int sub_wait(redisContext *c, double seconds)
{
    void *r = NULL;
    int got = 0;
    while (redisGetReplyFromReader(c, &r) == REDIS_OK && r) {
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
        freeReplyObject(r);
        r = NULL;
    }
    return rc;
}

/* Wait one backoff step: for a message on `sub` when there is one. 0 once
 * the deadline has passed. */
static int wait_step(redisContext **sub, dp_backoff *bo)
{
    double step = dp_backoff_next(bo);
    if (step <= 0)
        return 0;
    if (*sub) {
        if (sub_wait(*sub, step) < 0) {
            redisFree(*sub);
            *sub = NULL;
        }
    } else {
        dp_clock_sleep(step);
    }
    return 1;
}

static int rc_lock(void *self, const char *key, size_t klen, double timeout, dp_err *err)
{
    rc *s = self;
    held *h = calloc(1, sizeof *h);
    size_t lklen = 0;
    char *lk = h ? lock_key(s, key, klen, &lklen) : NULL;
    if (!lk) {
        free(h);
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    }
    dp_lock_token(h->token);
    char px[32];
    int pxn = snprintf(px, sizeof px, "%lld", (long long)ceil(s->cfg->lock_timeout * 1000));
    const char *argv[6] = {"SET", lk, h->token, "NX", "PX", px};
    size_t lens[6] = {3, lklen, 32, 2, 2, (size_t)pxn};
    dp_backoff bo;
    dp_backoff_init(&bo, timeout, s->cfg->lock_sleep);
    redisContext *sub = NULL;
    int tried_sub = 0, rc;
    for (;;) {
        redisReply *r;
        rc = exec_key(s, lk, lklen, "SET NX (lock)", 6, argv, lens, &r, err);
        if (rc != DP_OK)
            break;
        int got = r->type == REDIS_REPLY_STATUS;
        freeReplyObject(r);
        if (got) {
            h->key = lk;
            h->klen = lklen;
            lk = NULL;
            uv_mutex_lock(&s->mu);
            h->next = s->held;
            s->held = h;
            h = NULL;
            uv_mutex_unlock(&s->mu);
            break;
        }
        if (timeout == 0) {
            rc = DP_EBUSY;
            break;
        }
        if (!tried_sub) {
            /* Subscribe, then try again before waiting: a release after
             * that try is never missed. */
            tried_sub = 1;
            int failed;
            if ((sub = sub_open(s, lk, lklen, &failed, err)))
                continue;
            if (failed) {
                rc = DP_EBACKEND;
                break;
            }
        }
        if (!wait_step(&sub, &bo)) {
            rc = dp_err_set(err, DP_ETIMEDOUT, NAME ": the lock was still held after %g s",
                            timeout);
            break;
        }
    }
    if (sub)
        redisFree(sub);
    free(lk);
    free(h);
    return rc;
}

/* The lock key's token (malloc'd) or NULL when free. */
static int lock_token(rc *s, const char *lk, size_t lklen, char **tok, dp_err *err)
{
    const char *argv[2] = {"GET", lk};
    size_t lens[2] = {3, lklen};
    redisReply *r;
    int st = exec_key(s, lk, lklen, "GET (lock)", 2, argv, lens, &r, err);
    if (st != DP_OK)
        return st;
    *tok = NULL;
    if (r->type == REDIS_REPLY_STRING) {
        if (!(*tok = strndup(r->str, r->len)))
            st = dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    } else if (r->type != REDIS_REPLY_NIL) {
        st = dp_err_set(err, DP_EBACKEND, NAME ": GET (lock): the lock key holds a value of "
                        "another type");
    }
    freeReplyObject(r);
    return st;
}

/* Wait, taking nothing, until the holder seen at the call releases: a
 * message on the shard channel, or a poll that finds the key gone or holding
 * another token (a holder that died lets its lock expire silently). */
static int rc_wait_unlocked(void *self, const char *key, size_t klen, double timeout,
                            dp_err *err)
{
    rc *s = self;
    size_t lklen = 0;
    char *lk = lock_key(s, key, klen, &lklen), *first = NULL, *now = NULL;
    if (!lk)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    int failed = 0;
    redisContext *sub = timeout != 0 ? sub_open(s, lk, lklen, &failed, err) : NULL;
    int st = failed ? DP_EBACKEND : lock_token(s, lk, lklen, &first, err);
    dp_backoff bo;
    dp_backoff_init(&bo, timeout, s->cfg->lock_sleep);
    while (st == DP_OK && first) {
        if (timeout == 0) {
            st = DP_EBUSY;
            break;
        }
        int had_sub = sub != NULL;
        double step = dp_backoff_next(&bo);
        if (step <= 0) {
            st = dp_err_set(err, DP_ETIMEDOUT, NAME ": the lock was still held after %g s",
                            timeout);
            break;
        }
        if (had_sub) {
            int got = sub_wait(sub, step);
            if (got > 0)
                break; /* released (or the slot moved: the reader will see) */
            if (got < 0) {
                redisFree(sub);
                sub = NULL;
            }
        } else {
            dp_clock_sleep(step);
        }
        st = lock_token(s, lk, lklen, &now, err);
        if (st == DP_OK && (!now || strcmp(now, first) != 0)) {
            free(now);
            break;
        }
        free(now);
        now = NULL;
    }
    if (sub)
        redisFree(sub);
    free(first);
    free(lk);
    return st;
}

static int rc_unlock(void *self, const char *key, size_t klen, dp_err *err)
{
    rc *s = self;
    size_t lklen = s->prefix_len + klen;
    const char *pre = s->cfg->lock_prefix;
    uv_mutex_lock(&s->mu);
    held **pp = &s->held, *h = NULL;
    for (; *pp; pp = &(*pp)->next)
        if ((*pp)->klen == lklen && memcmp((*pp)->key, pre, s->prefix_len) == 0 &&
            memcmp((*pp)->key + s->prefix_len, key, klen) == 0) {
            h = *pp;
            *pp = h->next;
            break;
        }
    uv_mutex_unlock(&s->mu);
    if (!h)
        return DP_ENOTHELD;
    const char *argv[5] = {"EVAL", UNLOCK_SCRIPT, "1", h->key, h->token};
    size_t lens[5] = {4, sizeof UNLOCK_SCRIPT - 1, 1, h->klen, 32};
    redisReply *r;
    int st = exec_key(s, h->key, h->klen, "EVAL (unlock)", 5, argv, lens, &r, err);
    if (st == DP_OK) {
        if (r->type != REDIS_REPLY_INTEGER || r->integer != 1)
            st = dp_err_set(err, DP_ENOTHELD, NAME ": the lock had expired (lock_timeout %g s) "
                            "and was no longer ours", s->cfg->lock_timeout);
        freeReplyObject(r);
    }
    free(h->key);
    free(h);
    return st;
}

/* -- Lifecycle ------------------------------------------------------------------------ */

static void rc_destroy(void *self)
{
    rc *s = self;
    int n = atomic_load(&s->nnodes);
    for (int i = 0; i < n; i++) {
        node *nd = s->nodes[i];
        for (int k = 0; k < POOL_SLOTS; k++) {
            conn *c = atomic_load(&nd->slot[k].c);
            if (c)
                conn_free(c);
        }
        while (nd->idle) {
            conn *c = nd->idle;
            nd->idle = c->next;
            conn_free(c);
        }
        uv_mutex_destroy(&nd->mu);
        free(nd);
    }
    while (s->held) {
        held *h = s->held;
        s->held = h->next;
        free(h->key);
        free(h);
    }
    uv_mutex_destroy(&s->mu);
    uv_mutex_destroy(&s->refresh_mu);
    free(s);
}

static int rc_create(void *ud, const void *settings, void **self, dp_err *err)
{
    (void)ud;
    const rc_settings *cfg = settings;
    if (!cfg->nodes)
        return dp_err_set(err, DP_EINVAL, NAME ": startup_nodes (a list of \"host:port\") or "
                          "url (\"redis+cluster://host:port,...\") is required");
    if (cfg->username && !cfg->password)
        return dp_err_set(err, DP_EINVAL, NAME ": username needs a password");
    pthread_once(&crc2_once, crc2_init);
    rc *s = calloc(1, sizeof *s);
    if (!s)
        return dp_err_set(err, DP_ENOMEM, NAME ": out of memory");
    s->cfg = cfg;
    s->prefix_len = strlen(cfg->lock_prefix);
    uv_mutex_init(&s->mu);
    uv_mutex_init(&s->refresh_mu);
    /* The startup nodes: "host:port" separated by commas (or spaces). */
    const char *p = cfg->nodes;
    int st = DP_OK;
    while (*p && st == DP_OK) {
        size_t len = strcspn(p, ", ");
        if (len) {
            if (!node_of_addr(s, p, len))
                st = dp_err_set(err, DP_EINVAL, NAME ": startup_nodes: '%.*s' is not "
                                "\"host:port\"", (int)len, p);
        }
        p += len;
        p += strspn(p, ", ");
    }
    if (st == DP_OK && atomic_load(&s->nnodes) == 0)
        st = dp_err_set(err, DP_EINVAL, NAME ": startup_nodes names no node");
    if (st == DP_OK) {
        /* The map now: a refused password is a configuration error to
         * report here; a cluster that is down is not (it may come up). */
        dp_err e;
        nopipe np;
        nopipe_begin(&np);
        int saved = errno;
        st = refresh(s, 0, NULL, &e);
        errno = saved;
        nopipe_end(&np);
        if (st != DP_OK) {
            int n = atomic_load(&s->nnodes);
            for (int i = 0; i < n && st != DP_EINVAL; i++) {
                conn *cn;
                int reused;
                if (conn_take(s, s->nodes[i], &cn, &reused, &e) == DP_OK)
                    conn_give(s->nodes[i], cn, 0);
                else if (e.code == DP_EINVAL)
                    st = dp_err_set(err, DP_EINVAL, "%s", e.msg);
            }
            if (st != DP_EINVAL)
                st = DP_OK;
        }
    }
    if (st != DP_OK) {
        rc_destroy(s);
        return st;
    }
    *self = s;
    return DP_OK;
}

/* The core's store breaker, after create() and at each open: the same one
 * for the instance's life. */
static void rc_server_circuits(void *self, dp_circuit *store)
{
    rc *s = self;
    dp_circuit *none = NULL;
    atomic_compare_exchange_strong(&s->store_br, &none, store);
}

static const dp_backend_ops rc_ops = {
    .name = NAME,
    .args = rc_args,
    .settings_size = sizeof(rc_settings),
    .create = rc_create,
    .destroy = rc_destroy,
    .get = rc_get,
    .set = rc_set,
    .del = rc_del,
    .stats = rc_stats,
    .lock = rc_lock,
    .unlock = rc_unlock,
    .wait_unlocked = rc_wait_unlocked,
    .get_multi = rc_get_multi,
    .set_multi = rc_set_multi,
    .del_multi = rc_del_multi,
    .server_circuits = rc_server_circuits,
};

/* -- Registration -------------------------------------------------------------------- */

int dp_redis_cluster_register(void);
int luaopen_dogpile_backends_redis_cluster(lua_State *L);

int dp_redis_cluster_register(void)
{
    return dp_backend_register(&rc_ops, NULL);
}

__attribute__((visibility("default"))) int luaopen_dogpile_backends_redis_cluster(lua_State *L)
{
    int rc = dp_redis_cluster_register();
    if (rc != DP_OK)
        return luaL_error(L, NAME ": cannot register the backend: %s", dp_strerror(rc));
    lua_pushstring(L, NAME);
    return 1;
}
