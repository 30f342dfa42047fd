/* The core's backend facility, from a C host: declared arguments, the
 * registry of shared instances, the two-level lock, the backoff, and the
 * template backend (docs/template/template.c) through all of them. */
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "dogpile.h"
#include "tap.h"

#define K(s) s, strlen(s)
#define TPL "dogpile.cache.template"

int dp_template_register(void);

static dp_arg num(const char *name, double v)
{
    dp_arg a = {name, DP_ARG_NUMBER, v, NULL, 0};
    return a;
}

static dp_arg str(const char *name, const char *s)
{
    dp_arg a = {name, DP_ARG_STRING, 0, s, strlen(s)};
    return a;
}

static dp_arg boolean(const char *name, int v)
{
    dp_arg a = {name, DP_ARG_BOOLEAN, v, NULL, 0};
    return a;
}

/* -- Declared arguments --------------------------------------------------- */

typedef struct cfg {
    int64_t count, bytes;
    double secs, wait;
    int flag, mode;
    char *host;
    dp_str raw;
    char *url_host; /* set by the custom url parser */
    int64_t port;
} cfg;

static const char *const modes[] = {"full", "meta", "none", NULL};

static int parse_url(void *settings, const dp_arg *a, dp_err *err)
{
    cfg *c = settings;
    if (a->type != DP_ARG_STRING)
        return dp_err_set(err, DP_EINVAL, "t: url must be a string");
    const char *colon = memchr(a->string, ':', a->len);
    size_t hl = colon ? (size_t)(colon - a->string) : a->len;
    free(c->host);
    c->host = malloc(hl + 1);
    if (!c->host)
        return DP_ENOMEM;
    memcpy(c->host, a->string, hl);
    c->host[hl] = '\0';
    if (colon)
        c->port = atoi(colon + 1);
    return DP_OK;
}

static const dp_arg_spec spec[] = {
    /* url first: host and port listed after it override its parts */
    {.name = "url", .kind = DP_SPEC_CUSTOM, .parse = parse_url},
    {.name = "host", .kind = DP_SPEC_STR, .def_str = "127.0.0.1", .offset = offsetof(cfg, host)},
    {.name = "port", .kind = DP_SPEC_INT, .min = 1, .max = 65535, .def = 6379,
     .offset = offsetof(cfg, port)},
    {.name = "count", .kind = DP_SPEC_INT, .min = 1, .def = 7, .offset = offsetof(cfg, count)},
    {.name = "bytes", .kind = DP_SPEC_SIZE, .min = 1024, .def = 4096, .offset = offsetof(cfg, bytes)},
    {.name = "secs", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_ABOVE_MIN, .def = 1.5,
     .offset = offsetof(cfg, secs)},
    {.name = "wait", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_INFINITE | DP_SPEC_HANDLE |
     DP_SPEC_LOCK_TIMEOUT, .def = 30, .offset = offsetof(cfg, wait)},
    {.name = "flag", .kind = DP_SPEC_BOOL, .def = 1, .offset = offsetof(cfg, flag)},
    {.name = "mode", .kind = DP_SPEC_ENUM, .choices = modes, .def = 1, .offset = offsetof(cfg, mode)},
    {.name = "raw", .kind = DP_SPEC_BYTES, .offset = offsetof(cfg, raw)},
    {0},
};

static const dp_arg_spec required[] = {
    {.name = "path", .kind = DP_SPEC_STR, .flags = DP_SPEC_REQUIRED, .min = 1, .offset = 0},
    {0},
};

/* Fill with one argument; the message (or "" on success) in msg. */
static int fill1(dp_arg a, cfg *c, char *msg)
{
    dp_err err;
    memset(c, 0xAB, sizeof *c); /* the core must not read what it did not write */
    int rc = dp_args_fill("t", spec, &a, 1, c, &err);
    strcpy(msg, err.msg);
    if (rc == DP_OK)
        dp_args_free(spec, c);
    return rc;
}

static void test_args(void)
{
    cfg c;
    dp_err err;
    char msg[256];
    memset(&c, 0xAB, sizeof c);
    CHECK(dp_args_fill("t", spec, NULL, 0, &c, &err) == DP_OK, "args: no arguments: defaults");
    CHECK(c.count == 7 && c.bytes == 4096 && c.secs == 1.5 && c.wait == 30 && c.flag == 1 &&
          c.mode == 1 && c.host && strcmp(c.host, "127.0.0.1") == 0 && c.raw.data == NULL &&
          c.port == 6379, "args: every default in its field");
    dp_args_free(spec, &c);
    CHECK(c.host == NULL, "args: dp_args_free frees the strings and clears the fields");

    dp_arg all[] = {num("count", 3), str("bytes", "64k"), num("secs", 0.25),
                    num("wait", INFINITY), boolean("flag", 0), str("mode", "none"),
                    {"raw", DP_ARG_STRING, 0, "a\0b", 3}, num("port", 80),
                    str("url", "example.org:1234")};
    CHECK(dp_args_fill("t", spec, all, sizeof all / sizeof all[0], &c, &err) == DP_OK,
          "args: one of each kind accepted");
    CHECK(c.count == 3 && c.bytes == 65536 && c.secs == 0.25 && isinf(c.wait) && c.flag == 0 &&
          c.mode == 2 && c.raw.len == 3 && memcmp(c.raw.data, "a\0b", 4) == 0,
          "args: each kind converted (size \"64k\" = 65536, bytes with a NUL kept)");
    CHECK(strcmp(c.host, "example.org") == 0 && c.port == 80,
          "args: applied in table order: url first, then port overrides its part");
    cfg d;
    dp_arg other[] = {num("count", 4), str("bytes", "64k")};
    CHECK(dp_args_fill("t", spec, other, 2, &d, &err) == DP_OK, "args: a second settings");
    char diff[200];
    const dp_arg_spec *s = dp_args_diff(spec, &c, &d, diff, sizeof diff);
    CHECK(s && strcmp(s->name, "host") == 0 &&
          strcmp(diff, "host \"example.org\", not \"127.0.0.1\"") == 0,
          "args: dp_args_diff names the first difference in table order: %s", diff);
    free(d.host);
    d.host = strdup("example.org");
    d.port = 80;
    s = dp_args_diff(spec, &c, &d, diff, sizeof diff);
    CHECK(s && strcmp(diff, "count 3, not 4") == 0, "args: then the next: %s", diff);
    dp_args_free(spec, &d);
    dp_args_free(spec, &c);

    struct { dp_arg a; const char *msg; } bad[] = {
        {str("count", "10"), "t: count must be a positive integer, got string \"10\""},
        {num("count", 1.5), "t: count must be a positive integer, got 1.5"},
        {num("count", 0), "t: count must be a positive integer, got 0"},
        {num("count", NAN), "t: count must be a positive integer, got nan"},
        {num("port", 70000), "t: port must be an integer from 1 to 65535, got 70000"},
        {boolean("count", 1), "t: count must be a positive integer, got true"},
        {num("bytes", 10), "t: bytes must be a number of bytes >= 1024 or a size such as "
                           "\"64m\", got 10"},
        {str("bytes", "12x"), "t: bytes must be a number of bytes >= 1024 or a size such as "
                              "\"64m\", got string \"12x\""},
        {num("secs", 0), "t: secs must be a positive number of seconds, got 0"},
        {num("secs", INFINITY), "t: secs must be a positive number of seconds, got math.huge"},
        {num("wait", -1), "t: wait must be a number of seconds >= 0 (math.huge: no limit), "
                          "got -1"},
        {num("flag", 1), "t: flag must be a boolean, got 1"},
        {str("mode", "fast"), "t: mode must be one of \"full\", \"meta\", \"none\", got string "
                              "\"fast\""},
        {{"host", DP_ARG_STRING, 0, "a\0b", 3}, "t: host must be a string, got string "
                                                "\"a\\0b\""},
        {num("bogus", 1), "t: unknown argument 'bogus' (known: url, host, port, count, bytes, "
                          "secs, wait, flag, mode, raw)"},
        {num("url", 1), "t: url must be a string"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = fill1(bad[i].a, &c, msg);
        CHECK(rc == DP_EINVAL && strcmp(msg, bad[i].msg) == 0, "args: refused: %s", msg);
    }
    dp_arg twice[] = {num("count", 1), num("count", 2)};
    CHECK(dp_args_fill("t", spec, twice, 2, &c, &err) == DP_EINVAL &&
          strcmp(err.msg, "t: argument 'count' given twice") == 0, "args: %s", err.msg);
    /* A failure after a string was copied frees it (valgrind and ASan check). */
    dp_arg late[] = {str("host", "h"), str("mode", "x")};
    CHECK(dp_args_fill("t", spec, late, 2, &c, &err) == DP_EINVAL && c.host == NULL,
          "args: a failure frees what was filled");
    char *path = (char *)1;
    CHECK(dp_args_fill("t", required, NULL, 0, &path, &err) == DP_EINVAL &&
          strcmp(err.msg, "t: the argument 'path' is required") == 0 && path == NULL,
          "args: %s", err.msg);
}

/* -- A declared backend that counts its instances -------------------------- */

typedef struct cnt_settings {
    dp_str name;
    int64_t size;
    double lock_timeout;
} cnt_settings;

static const dp_arg_spec cnt_args[] = {
    {.name = "name", .kind = DP_SPEC_BYTES, .flags = DP_SPEC_KEY, .def_str = "n",
     .offset = offsetof(cnt_settings, name)},
    {.name = "size", .kind = DP_SPEC_INT, .min = 1, .def = 1, .offset = offsetof(cnt_settings, size)},
    {.name = "lock_timeout", .kind = DP_SPEC_SECONDS, .flags = DP_SPEC_HANDLE |
     DP_SPEC_LOCK_TIMEOUT | DP_SPEC_ABOVE_MIN, .def = 5, .offset = offsetof(cnt_settings, lock_timeout)},
    {0},
};

static _Atomic int creates, destroys, live;
static double create_delay;

static int cnt_create(void *ud, const void *settings, void **self, dp_err *err)
{
    (void)ud;
    const cnt_settings *s = settings;
    if (strcmp(s->name.data, "fail") == 0)
        return dp_err_set(err, DP_EBACKEND, "cnt: cannot create '%s'", s->name.data);
    atomic_fetch_add(&creates, 1);
    if (atomic_fetch_add(&live, 1) != 0)
        atomic_store(&live, 100); /* two at once: the registry broke its promise */
    dp_clock_sleep(create_delay);
    *self = (void *)settings;
    return DP_OK;
}

static void cnt_destroy(void *self)
{
    (void)self;
    dp_clock_sleep(create_delay);
    atomic_fetch_sub(&live, 1);
    atomic_fetch_add(&destroys, 1);
}

static int cnt_get(void *self, const char *key, size_t klen, dp_bytes *out, dp_err *err)
{
    (void)key; (void)klen; (void)out; (void)err; (void)self;
    return DP_ENOTFOUND;
}

static int cnt_set(void *self, const char *key, size_t klen, const char *v, size_t vlen,
                   dp_err *err)
{
    (void)self; (void)key; (void)klen; (void)v; (void)vlen; (void)err;
    return DP_OK;
}

static int cnt_del(void *self, const char *key, size_t klen, dp_err *err)
{
    (void)self; (void)key; (void)klen; (void)err;
    return DP_OK;
}

static int cnt_open(void *ud, const dp_arg *args, size_t nargs, void **self, dp_err *err)
{
    (void)ud; (void)args; (void)nargs; (void)self;
    return dp_err_set(err, DP_EINVAL, "never called");
}

static const dp_backend_ops cnt_ops = {
    .name = "test.counted",
    .args = cnt_args,
    .settings_size = sizeof(cnt_settings),
    .create = cnt_create,
    .destroy = cnt_destroy,
    .get = cnt_get,
    .set = cnt_set,
    .del = cnt_del,
};

#define NOPENERS 8
static dp_backend *opened[NOPENERS];
static int open_rc[NOPENERS];

static void opener(void *arg)
{
    long i = (long)arg;
    dp_arg a = str("name", "race");
    open_rc[i] = dp_backend_open("test.counted", &a, 1, &opened[i], NULL);
}

static void test_registry(void)
{
    dp_err err;
    dp_backend_ops both = cnt_ops;
    both.open = cnt_open;
    CHECK(dp_backend_register(&both, NULL) == DP_EINVAL, "register: open and create refused");
    dp_backend_ops half = cnt_ops;
    half.destroy = NULL;
    CHECK(dp_backend_register(&half, NULL) == DP_EINVAL, "register: create without destroy refused");
    CHECK(dp_backend_register(&cnt_ops, NULL) == DP_OK, "register: a declared backend");
    CHECK(dp_backend_register(&cnt_ops, NULL) == DP_OK, "register: the same table again");

    dp_backend *a, *b, *c;
    dp_arg a1[] = {str("name", "x"), num("size", 3), num("lock_timeout", 2)};
    dp_arg a2[] = {str("name", "x"), num("size", 3), num("lock_timeout", 0.5)};
    dp_arg a3[] = {str("name", "x"), num("size", 5)};
    CHECK(dp_backend_open("test.counted", a1, 3, &a, &err) == DP_OK, "registry: first open");
    CHECK(dp_backend_open("test.counted", a2, 3, &b, &err) == DP_OK,
          "registry: the same identity joins, whatever its per-handle lock_timeout");
    CHECK(creates == 1, "registry: one instance for the two handles (%d)", creates);
    CHECK(dp_backend_lock_timeout(a) == 2 && dp_backend_lock_timeout(b) == 0.5,
          "registry: each handle keeps its own lock_timeout");
    CHECK(dp_backend_lock_domain(a) != 0 && dp_backend_lock_domain(a) == dp_backend_lock_domain(b),
          "registry: one lock domain per instance");
    CHECK(dp_backend_lock_domain(a) == dp_lock_domain(K("test.counted:x")),
          "registry: the domain is named '<backend>:<name>', so a C host can name it");
    CHECK(dp_backend_open("test.counted", a3, 2, &c, &err) == DP_EMISMATCH &&
          strcmp(err.msg, "test.counted: \"x\" is already open with size 3, not 5; every "
                 "region sharing it must agree") == 0, "registry: %s", err.msg);
    dp_arg f = str("name", "fail");
    CHECK(dp_backend_open("test.counted", &f, 1, &c, &err) == DP_EBACKEND &&
          strcmp(err.msg, "cnt: cannot create 'fail'") == 0, "registry: a create failure: %s",
          err.msg);
    dp_backend_close(a);
    CHECK(destroys == 0, "registry: not destroyed while a handle is left");
    dp_backend_close(b);
    CHECK(destroys == 1, "registry: the last close destroys");
    CHECK(dp_backend_open("test.counted", a3, 2, &c, &err) == DP_OK && creates == 2,
          "registry: once closed, the identity opens again with other settings");
    dp_backend_close(c);

    /* Opens racing on one identity, with a slow create and destroy: one
     * instance, and never two alive at once. */
    creates = destroys = 0;
    create_delay = 0.02;
    for (int round = 0; round < 3; round++) {
        uv_thread_t t[NOPENERS];
        for (long i = 0; i < NOPENERS; i++)
            uv_thread_create(&t[i], opener, (void *)i);
        for (int i = 0; i < NOPENERS; i++)
            uv_thread_join(&t[i]);
        int ok = 1;
        for (int i = 0; i < NOPENERS; i++)
            ok &= open_rc[i] == DP_OK && dp_backend_lock_domain(opened[i]) ==
                                         dp_backend_lock_domain(opened[0]);
        CHECK(ok && creates == round + 1, "registry: %d racing opens share one instance "
              "(round %d, %d creates)", NOPENERS, round, creates);
        for (int i = 0; i < NOPENERS; i++)
            dp_backend_close(opened[i]);
    }
    CHECK(destroys == 3 && live == 0, "registry: every instance destroyed once, never two alive "
          "(%d, %d)", destroys, live);
    create_delay = 0;
}

/* -- A lock domain named by some arguments (DP_SPEC_DOMAIN) ----------------- */

static const dp_arg_spec dom_args[] = {
    {.name = "name", .kind = DP_SPEC_BYTES, .flags = DP_SPEC_KEY | DP_SPEC_DOMAIN,
     .def_str = "n", .offset = offsetof(cnt_settings, name)},
    {.name = "size", .kind = DP_SPEC_INT, .flags = DP_SPEC_KEY, .min = 1, .def = 1,
     .offset = offsetof(cnt_settings, size)},
    {0},
};

static _Atomic int dom_creates;

static int dom_create(void *ud, const void *settings, void **self, dp_err *err)
{
    (void)ud; (void)err;
    atomic_fetch_add(&dom_creates, 1);
    *self = (void *)settings;
    return DP_OK;
}

static void dom_destroy(void *self)
{
    (void)self;
}

static void test_domain(void)
{
    dp_err err;
    dp_backend_ops ops = cnt_ops, bad = cnt_ops;
    ops.name = "test.domained";
    ops.args = dom_args;
    ops.create = dom_create;
    ops.destroy = dom_destroy;
    static dp_arg_spec unkeyed[3];
    memcpy(unkeyed, dom_args, sizeof unkeyed);
    unkeyed[0].flags = DP_SPEC_DOMAIN;
    bad.args = unkeyed;
    CHECK(dp_backend_register(&bad, NULL) == DP_EINVAL, "domain: refused without DP_SPEC_KEY");
    static dp_backend_ops keep;
    keep = ops;
    CHECK(dp_backend_register(&keep, NULL) == DP_OK, "domain: registers");
    dp_backend *a, *b, *c;
    dp_arg a1[] = {str("name", "x"), num("size", 1)};
    dp_arg a2[] = {str("name", "x"), num("size", 2)};
    dp_arg a3[] = {str("name", "y"), num("size", 1)};
    CHECK(dp_backend_open("test.domained", a1, 2, &a, &err) == DP_OK &&
          dp_backend_open("test.domained", a2, 2, &b, &err) == DP_OK &&
          dp_backend_open("test.domained", a3, 2, &c, &err) == DP_OK && dom_creates == 3,
          "domain: other KEY values make other instances (%d)", dom_creates);
    CHECK(dp_backend_lock_domain(a) == dp_backend_lock_domain(b) &&
          dp_backend_lock_domain(a) == dp_lock_domain(K("test.domained:x")),
          "domain: named '<backend>:' and the DOMAIN values alone, shared by both");
    CHECK(dp_backend_lock_domain(c) != dp_backend_lock_domain(a),
          "domain: another DOMAIN value is another domain");
    uint32_t me = dp_lock_owner_new(), other = dp_lock_owner_new();
    dp_backend_hold h = {0}, h2 = {0};
    CHECK(dp_backend_acquire(a, K("k"), me, 0, &h, &err) == DP_OK &&
          dp_backend_acquire(b, K("k"), other, 0, &h2, &err) == DP_EBUSY &&
          dp_backend_acquire(c, K("k"), other, 0, &h2, &err) == DP_OK,
          "domain: the core's lock orders the instances of one domain");
    dp_backend_release(a, K("k"), &h, &err);
    dp_backend_release(c, K("k"), &h2, &err);
    dp_backend_close(a);
    dp_backend_close(b);
    dp_backend_close(c);
}

/* -- The two-level lock through the template ------------------------------- */

#define NLOCKERS 6
#define LOCK_ROUNDS 200

static dp_backend *shared;
static int inside, max_inside, proc_free_inside, lock_errors;
static long counter;
static uv_mutex_t stat_mu;

static void locker(void *arg)
{
    (void)arg;
    uint32_t owner = dp_lock_owner_new();
    dp_err err;
    for (int i = 0; i < LOCK_ROUNDS; i++) {
        dp_backend_hold h = {0};
        if (dp_backend_acquire(shared, K("hot"), owner, -1, &h, &err) != DP_OK || !h.core ||
            !h.proc) {
            lock_errors++;
            return;
        }
        uv_mutex_lock(&stat_mu);
        if (++inside > max_inside)
            max_inside = inside;
        uv_mutex_unlock(&stat_mu);
        /* Another "process" asking the backend's lock alone is refused. */
        if (dp_backend_lock(shared, K("hot"), 0, &err) != DP_EBUSY)
            proc_free_inside++;
        counter++;
        uv_mutex_lock(&stat_mu);
        inside--;
        uv_mutex_unlock(&stat_mu);
        if (dp_backend_release(shared, K("hot"), &h, &err) != DP_OK || h.core || h.proc)
            lock_errors++;
    }
}

static _Atomic int waiters_ok;
static double woke_at[4];

static void released_waiter(void *arg)
{
    long i = (long)arg;
    if (dp_backend_wait_released(shared, K("w"), dp_lock_owner_new(), 5, NULL) == DP_OK)
        atomic_fetch_add(&waiters_ok, 1);
    woke_at[i] = dp_clock_monotonic();
}

static void test_two_level(void)
{
    dp_err err;
    CHECK(dp_template_register() == DP_OK, "template: registers");
    dp_arg args[] = {str("name", "two-level"), num("lock_timeout", 2)};
    CHECK(dp_backend_open(TPL, args, 2, &shared, &err) == DP_OK, "template: opens");
    uv_mutex_init(&stat_mu);

    uv_thread_t t[NLOCKERS];
    for (int i = 0; i < NLOCKERS; i++)
        uv_thread_create(&t[i], locker, NULL);
    for (int i = 0; i < NLOCKERS; i++)
        uv_thread_join(&t[i]);
    CHECK(lock_errors == 0 && counter == NLOCKERS * LOCK_ROUNDS && max_inside == 1,
          "two-level: %d threads x %d rounds, one inside at a time (max %d, errors %d)",
          NLOCKERS, LOCK_ROUNDS, max_inside, lock_errors);
    CHECK(proc_free_inside == 0, "two-level: the backend's lock is held while inside");
    CHECK(dp_lock_count() == 0, "two-level: nothing left in the core's registry");

    uint32_t me = dp_lock_owner_new(), other = dp_lock_owner_new();
    dp_backend_hold h = {0}, h2 = {0};
    CHECK(dp_backend_acquire(shared, K("k"), me, 0, &h, &err) == DP_OK && h.core && h.proc,
          "two-level: try once takes both levels");
    CHECK(dp_backend_acquire(shared, K("k"), other, 0, &h2, &err) == DP_EBUSY && !h2.core &&
          !h2.proc, "two-level: a second try is busy and holds nothing");
    CHECK(dp_backend_acquire(shared, K("k"), me, 1, &h2, &err) == DP_EDEADLK && !h2.core,
          "two-level: a blocking wait under the holder's owner is refused: %s", err.msg);
    CHECK(dp_backend_acquire(shared, K("k"), me, 0, &h, &err) == DP_EINVAL,
          "two-level: a hold that holds is refused");
    CHECK(dp_backend_release(shared, K("k"), &h, &err) == DP_OK && !h.overrun,
          "two-level: release");
    CHECK(dp_backend_release(shared, K("k"), &h, &err) == DP_ENOTHELD,
          "two-level: a second release: %s", err.msg);

    /* A stuck holder in another process: the wait ends at the timeout with
     * the core level held (the caller may go ahead), and release frees it. */
    CHECK(dp_backend_lock(shared, K("stuck"), 0, &err) == DP_OK, "two-level: another process "
          "takes the backend's lock alone");
    double t0 = dp_clock_monotonic();
    int rc = dp_backend_acquire(shared, K("stuck"), me, 0.1, &h, &err);
    double took = dp_clock_monotonic() - t0;
    CHECK(rc == DP_ETIMEDOUT && h.core && !h.proc && took >= 0.09 && took < 1,
          "two-level: the wait ends after its timeout (%.3f s) holding the core level: %s",
          took, err.msg);
    CHECK(dp_lock_held(dp_backend_lock_domain(shared), K("stuck"), NULL) == 1,
          "two-level: so this process's other threads still queue behind it");
    CHECK(dp_backend_release(shared, K("stuck"), &h, &err) == DP_OK && !h.core &&
          dp_lock_count() == 0, "two-level: release after a timeout frees the core level");
    CHECK(dp_backend_wait_released(shared, K("stuck"), me, 0, &err) == DP_EBUSY,
          "two-level: wait_released, check once: busy while another process holds");
    CHECK(dp_backend_wait_released(shared, K("stuck"), me, 0.05, &err) == DP_ETIMEDOUT,
          "two-level: wait_released times out: %s", err.msg);
    dp_backend_unlock(shared, K("stuck"), &err);

    /* Waiters wait for the release, taking nothing, and wake together. */
    CHECK(dp_backend_acquire(shared, K("w"), me, 0, &h, &err) == DP_OK, "two-level: holder");
    uv_thread_t w[4];
    for (long i = 0; i < 4; i++)
        uv_thread_create(&w[i], released_waiter, (void *)i);
    dp_clock_sleep(0.1);
    CHECK(waiters_ok == 0, "two-level: waiters wait while the lock is held");
    double released = dp_clock_monotonic();
    dp_backend_release(shared, K("w"), &h, &err);
    for (int i = 0; i < 4; i++)
        uv_thread_join(&w[i]);
    double latest = 0;
    for (int i = 0; i < 4; i++)
        latest = woke_at[i] - released > latest ? woke_at[i] - released : latest;
    CHECK(waiters_ok == 4 && latest < 0.5, "two-level: all 4 waiters saw the release "
          "(latest %.3f s after it)", latest);
    CHECK(dp_lock_count() == 0 && dp_backend_wait_released(shared, K("w"), me, 0, &err) == DP_OK,
          "two-level: nothing held afterwards");

    /* Held past lock_timeout: release says so (the caller logs it). */
    dp_backend *quick;
    dp_arg qa[] = {str("name", "two-level"), num("lock_timeout", 0.02)};
    CHECK(dp_backend_open(TPL, qa, 2, &quick, &err) == DP_OK &&
          dp_backend_lock_timeout(quick) == 0.02, "two-level: a handle with its own lock_timeout");
    CHECK(dp_backend_acquire(quick, K("o"), me, 0, &h, &err) == DP_OK, "two-level: taken");
    dp_clock_sleep(0.05);
    CHECK(dp_backend_release(quick, K("o"), &h, &err) == DP_OK && h.overrun == 1,
          "two-level: held past lock_timeout: overrun reported, not an error");
    dp_backend_close(quick);

    /* Lost before lock_timeout (expired, taken over): the backend's
     * DP_ENOTHELD is overrun 2, not an error. */
    CHECK(dp_backend_acquire(shared, K("lost"), me, 0, &h, &err) == DP_OK &&
          dp_backend_unlock(shared, K("lost"), &err) == DP_OK, "two-level: the backend's level "
          "goes away under the holder");
    CHECK(dp_backend_release(shared, K("lost"), &h, &err) == DP_OK && h.overrun == 2 &&
          err.code == DP_OK && !h.core && dp_lock_count() == 0,
          "two-level: lost early: overrun 2, the core level released");

    /* The template as a store: shared by name, refusing big values. */
    dp_backend *again;
    dp_arg ga[] = {str("name", "two-level"), num("max_value_bytes", 4)};
    CHECK(dp_backend_open(TPL, ga, 2, &again, &err) == DP_EMISMATCH, "template: %s", err.msg);
    CHECK(dp_backend_open(TPL, args, 1, &again, &err) == DP_OK, "template: joins by name");
    dp_bytes out = {0};
    CHECK(dp_backend_set(shared, K("v"), "abc", 3, &err) == DP_OK &&
          dp_backend_get(again, K("v"), &out, &err) == DP_OK && out.len == 3 &&
          memcmp(out.data, "abc", 3) == 0, "template: a value set through one handle is read "
          "through the other");
    CHECK(dp_backend_delete(again, K("v"), &err) == DP_OK &&
          dp_backend_get(shared, K("v"), &out, &err) == DP_ENOTFOUND, "template: deleted");
    dp_backend_close(again);
    dp_backend *small;
    dp_arg sa[] = {str("name", "small"), str("max_value_bytes", "1k")};
    char big[2000] = {0};
    CHECK(dp_backend_open(TPL, sa, 2, &small, &err) == DP_OK &&
          dp_backend_set(small, K("big"), big, sizeof big, &err) == DP_ETOOBIG,
          "template: a value over max_value_bytes: %s", err.msg);
    dp_backend_close(small);
    dp_bytes_free(&out);
    dp_backend_close(shared);
    uv_mutex_destroy(&stat_mu);
}

/* A declared backend without a lock of its own gets the core's level alone. */
static void test_core_level_only(void)
{
    dp_err err;
    dp_backend *b;
    dp_arg a = str("name", "solo");
    CHECK(dp_backend_open("test.counted", &a, 1, &b, &err) == DP_OK, "core level: open");
    uint32_t me = dp_lock_owner_new(), other = dp_lock_owner_new();
    dp_backend_hold h = {0}, h2 = {0};
    CHECK(dp_backend_acquire(b, K("k"), me, 0, &h, &err) == DP_OK && h.core && !h.proc,
          "core level: taken, no backend level");
    CHECK(dp_backend_acquire(b, K("k"), other, 0.05, &h2, &err) == DP_ETIMEDOUT && !h2.core,
          "core level: a bounded wait times out: %s", err.msg);
    CHECK(dp_backend_can_wait_released(b) &&
          dp_backend_wait_released(b, K("k"), other, 0, &err) == DP_EBUSY,
          "core level: wait_released sees it held");
    CHECK(dp_backend_release(b, K("k"), &h, &err) == DP_OK, "core level: released");
    CHECK(dp_backend_wait_released(b, K("k"), other, 1, &err) == DP_OK, "core level: free");
    dp_backend_close(b);
}

/* -- Backoff ----------------------------------------------------------------- */

static void test_backoff(void)
{
    dp_backoff bo;
    dp_backoff_init(&bo, -1, 0);
    double s1 = dp_backoff_next(&bo), s2 = dp_backoff_next(&bo);
    int grows = s1 == DP_BACKOFF_FIRST && fabs(s2 - s1 * DP_BACKOFF_GROWTH) < 1e-12;
    double last = 0;
    for (int i = 0; i < 100; i++)
        last = dp_backoff_next(&bo);
    CHECK(grows && last == DP_BACKOFF_MAX, "backoff: 1 ms, a quarter longer each step, up to "
          "the ceiling (%g, %g ... %g)", s1, s2, last);
    dp_backoff_init(&bo, -1, 0.005);
    for (int i = 0; i < 100; i++)
        last = dp_backoff_next(&bo);
    CHECK(last == 0.005, "backoff: a ceiling of the caller's");
    dp_backoff_init(&bo, 0.03, 0);
    double t0 = dp_clock_monotonic();
    int sleeps = 0;
    while (dp_backoff_sleep(&bo) && sleeps < 1000)
        sleeps++;
    double took = dp_clock_monotonic() - t0;
    CHECK(took >= 0.03 && took < 0.2 && sleeps > 3, "backoff: sleeps until the deadline, never "
          "far past it (%.3f s, %d sleeps)", took, sleeps);
    CHECK(dp_backoff_next(&bo) == 0, "backoff: 0 once the deadline passed");
}

int main(void)
{
    test_args();
    test_registry();
    test_domain();
    test_two_level();
    test_core_level_only();
    test_backoff();
    dp_shutdown();
    return tap_done();
}
