/* The change feed (dogpile_feed.h): the in-process ring and the host feed
 * (a file every process maps): order, a reader's own entries, falling
 * behind, epochs, keys too long for a slot, processes pushing to each other
 * (fork), a pusher killed at any moment, threads pushing and reading. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "dogpile.h"
#include "dogpile_feed.h"
#include "tap.h"

#define K(s) s, strlen(s)
#define BATCH 64

typedef struct reader {
    dp_feed_cursor c;
    dp_bytes keys;
    size_t lens[BATCH];
    int32_t scopes[BATCH];
    size_t n;
} reader;

static void reader_init(dp_feed *f, reader *r, uint32_t origin)
{
    memset(r, 0, sizeof *r);
    r->c.origin = origin;
    dp_feed_cursor_init(f, &r->c);
}

/* Everything pending, keys joined by ',' into out (or "RESET"). */
static void drain(dp_feed *f, reader *r, char *out, size_t cap)
{
    out[0] = 0;
    size_t used = 0;
    for (int guard = 0; guard < 10000; guard++) {
        dp_feed_read(f, &r->c, &r->keys, r->lens, r->scopes, BATCH, &r->n);
        if (r->c.reset) {
            snprintf(out, cap, "RESET");
            return;
        }
        size_t pos = 0;
        for (size_t i = 0; i < r->n; i++) {
            used += (size_t)snprintf(out + used, used < cap ? cap - used : 0, "%s%.*s",
                                     used ? "," : "", (int)r->lens[i], r->keys.data + pos);
            pos += r->lens[i];
        }
        if (!r->c.more)
            return;
    }
}

/* -- Either kind -------------------------------------------------------- */

static void basics(const char *what, dp_feed *f)
{
    reader a, b;
    char out[4096];
    uint32_t oa = dp_lock_owner_new(), ob = dp_lock_owner_new();
    reader_init(f, &a, oa);
    reader_init(f, &b, ob);
    const volatile uint32_t *stamp = dp_feed_stamp(f);
    uint32_t s0 = *stamp;
    CHECK(s0 == a.c.stamp, "%s: a new cursor holds the stamp", what);
    dp_feed_push(f, K("x"), oa, DP_FEED_PROCESS);
    dp_feed_push(f, K("y"), ob, DP_FEED_FLEET);
    dp_feed_push(f, K(""), 0, DP_FEED_HOST);
    CHECK(*stamp != s0, "%s: a push moves the stamp", what);
    drain(f, &a, out, sizeof out);
    CHECK(strcmp(out, "y,") == 0, "%s: a reader skips its own entries, keeps order (got '%s')",
          what, out);
    CHECK(a.c.stamp == *stamp, "%s: a reader that caught up holds the stamp", what);
    drain(f, &b, out, sizeof out);
    CHECK(strcmp(out, "x,") == 0 && b.scopes[0] == DP_FEED_PROCESS && b.scopes[1] == DP_FEED_HOST,
          "%s: scopes travel with the keys (got '%s')", what, out);
    drain(f, &a, out, sizeof out);
    CHECK(out[0] == 0, "%s: nothing twice", what);

    /* More than one batch. */
    for (int i = 0; i < 3 * BATCH; i++) {
        char k[16];
        snprintf(k, sizeof k, "k%d", i);
        dp_feed_push(f, K(k), ob, DP_FEED_PROCESS);
    }
    dp_feed_read(f, &a.c, &a.keys, a.lens, a.scopes, BATCH, &a.n);
    CHECK(a.n == BATCH && a.c.more == 1, "%s: a read stops at its batch and says more", what);
    drain(f, &a, out, sizeof out);
    CHECK(strncmp(out, "k64,k65,", 8) == 0 && strstr(out, "k191") != NULL,
          "%s: the next reads go on where it stopped", what);

    /* An epoch: every reader resets, at the epoch's time. */
    double before = dp_clock_now();
    dp_feed_reset(f);
    drain(f, &a, out, sizeof out);
    CHECK(strcmp(out, "RESET") == 0 && a.c.reset_at >= before - 0.001,
          "%s: a new epoch resets the readers at its time", what);
    drain(f, &a, out, sizeof out);
    CHECK(out[0] == 0, "%s: once", what);

    dp_bytes_free(&a.keys);
    dp_bytes_free(&b.keys);
}

static void falling_behind(const char *what, dp_feed *f, size_t cap)
{
    reader r;
    char out[64];
    reader_init(f, &r, dp_lock_owner_new());
    dp_clock_sleep(0.02);
    double before = dp_clock_now();
    for (size_t i = 0; i <= cap; i++)
        dp_feed_push(f, K("z"), 0, DP_FEED_PROCESS);
    drain(f, &r, out, sizeof out);
    CHECK(strcmp(out, "RESET") == 0, "%s: a reader %zu entries behind resets", what, cap + 1);
    CHECK(r.c.reset_at >= before - 0.001,
          "%s: with now as the floor for shared copies (%.3f s before)", what,
          before - r.c.reset_at);
    dp_feed_push(f, K("after"), 0, DP_FEED_PROCESS);
    drain(f, &r, out, sizeof out);
    CHECK(strcmp(out, "after") == 0, "%s: and reads on from the head", what);
    dp_bytes_free(&r.keys);
}

/* -- Threads ------------------------------------------------------------- */

#define NPUSH 4
#define PUSHES 3000

static dp_feed *tf;
static _Atomic int pushers_done;

static void pusher(void *arg)
{
    int id = (int)(intptr_t)arg;
    for (int i = 0; i < PUSHES; i++) {
        char k[32];
        snprintf(k, sizeof k, "t%d-%d", id, i);
        dp_feed_push(tf, K(k), 0, DP_FEED_PROCESS);
    }
    pushers_done++;
}

/* Reads until the pushers are done: each pusher's keys arrive in its order,
 * or a reset says some were missed. */
static int reader_ok;
static reader tr; /* placed before the pushers start */
static void reader_thread(void *arg)
{
    (void)arg;
    reader r = tr;
    int next[NPUSH] = {0};
    int ok = 1, resets = 0;
    for (int round = 0; round < 1000000; round++) {
        int done = pushers_done == NPUSH;
        dp_feed_read(tf, &r.c, &r.keys, r.lens, r.scopes, BATCH, &r.n);
        if (r.c.reset) {
            resets++;
            memset(next, 0, sizeof next);
            for (int i = 0; i < NPUSH; i++)
                next[i] = -1; /* any position is fine after a reset */
            continue;
        }
        size_t pos = 0;
        for (size_t i = 0; i < r.n; i++) {
            int id, seq;
            char k[40];
            snprintf(k, sizeof k, "%.*s", (int)r.lens[i], r.keys.data + pos);
            pos += r.lens[i];
            if (sscanf(k, "t%d-%d", &id, &seq) != 2 || id < 0 || id >= NPUSH) {
                ok = 0;
                continue;
            }
            if (next[id] >= 0 && seq != next[id]) {
                if (ok)
                    printf("# pusher %d: %d after %d (%d resets)\n", id, seq, next[id] - 1, resets);
                ok = 0;
            }
            next[id] = seq + 1;
        }
        if (done && !r.c.more && r.n == 0)
            break;
    }
    reader_ok = ok;
    (void)resets;
    dp_bytes_free(&r.keys);
}

static void threads(const char *what, dp_feed *f)
{
    tf = f;
    pushers_done = 0;
    uv_thread_t t[NPUSH + 1];
    reader_init(f, &tr, dp_lock_owner_new());
    uv_thread_create(&t[NPUSH], reader_thread, NULL);
    for (int i = 0; i < NPUSH; i++)
        uv_thread_create(&t[i], pusher, (void *)(intptr_t)i);
    for (int i = 0; i <= NPUSH; i++)
        uv_thread_join(&t[i]);
    CHECK(reader_ok, "%s: %d threads pushing, one reading: every pusher's keys in its order",
          what, NPUSH);
}

/* -- The host feed ---------------------------------------------------------- */

static char dir[] = "/tmp/dogpile-feed-XXXXXX";

static void host_feed(void)
{
    char path[300];
    snprintf(path, sizeof path, "%s/feed", dir);
    dp_feed *f = NULL;
    errno = 0;
    CHECK(dp_feed_open(K(path), 0, &f) == DP_EBACKEND && errno == ENOENT && f == NULL,
          "host: a missing file is an error (ENOENT), never made here");
    int fd = open(path, O_RDWR | O_CREAT, 0600);
    close(fd);
    CHECK(dp_feed_open(K(path), 0, &f) == DP_OK, "host: an empty file is allocated and set up");
    struct stat st;
    CHECK(stat(path, &st) == 0 && (size_t)st.st_size == DP_FEED_FILE_BYTES &&
              (size_t)st.st_blocks * 512 >= DP_FEED_FILE_BYTES,
          "host: the file holds DP_FEED_FILE_BYTES, allocated (%lld bytes, %lld blocks)",
          (long long)st.st_size, (long long)st.st_blocks);
    dp_feed *g = NULL;
    dp_feed_open(K(path), 0, &g);
    CHECK(g == f && dp_feed_stamp(g) == dp_feed_stamp(f),
          "host: a second open in the process shares the mapping");
    dp_feed_close(g);

    basics("host", f);
    falling_behind("host", f, DP_FEED_FILE_SLOTS);

    /* A key longer than a slot: everyone resets. */
    reader r;
    char out[4096];
    reader_init(f, &r, dp_lock_owner_new());
    char longkey[DP_FEED_FILE_KEY + 2];
    memset(longkey, 'L', sizeof longkey);
    CHECK(dp_feed_push(f, longkey, DP_FEED_FILE_KEY, 0, 1) == DP_OK,
          "host: a key of DP_FEED_FILE_KEY bytes is stored");
    drain(f, &r, out, sizeof out);
    CHECK(strlen(out) == DP_FEED_FILE_KEY, "host: and read whole (%zu bytes)", strlen(out));
    CHECK(dp_feed_push(f, longkey, sizeof longkey, 0, 1) == DP_OK,
          "host: a longer key is not stored");
    drain(f, &r, out, sizeof out);
    CHECK(strcmp(out, "RESET") == 0, "host: instead, every reader resets");

    /* Another process: its pushes reach us, ours reach it; origins are per
     * process, so the child's cursor with our origin number still sees ours. */
    uint32_t origin = r.c.origin;
    int to_child[2], to_parent[2];
    if (pipe(to_child) != 0 || pipe(to_parent) != 0)
        abort();
    pid_t pid = fork();
    if (pid == 0) {
        dp_feed *cf = NULL;
        char b;
        int ok = dp_feed_open(K(path), 0, &cf) == DP_OK;
        reader cr;
        reader_init(cf, &cr, origin);
        ok = ok && write(to_parent[1], "r", 1) == 1;      /* cursor placed */
        ok = ok && read(to_child[0], &b, 1) == 1;          /* parent pushed */
        char got[256];
        drain(cf, &cr, got, sizeof got);
        ok = ok && strcmp(got, "from-parent") == 0;
        dp_feed_push(cf, K("from-child"), origin, DP_FEED_PROCESS);
        _exit(ok ? 0 : 1);
    }
    char b;
    CHECK(read(to_parent[0], &b, 1) == 1, "host: a child process opened the feed");
    dp_feed_push(f, K("from-parent"), origin, DP_FEED_PROCESS);
    CHECK(write(to_child[1], "p", 1) == 1, "host: told the child");
    int status = -1;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "host: the child read our key, though its origin number is ours (status %d)", status);
    drain(f, &r, out, sizeof out);
    CHECK(strcmp(out, "from-child") == 0,
          "host: we read the child's key, pushed with our origin number (got '%s')", out);
    close(to_child[0]), close(to_child[1]), close(to_parent[0]), close(to_parent[1]);

    /* Pushers SIGKILLed at any moment, often inside the mutex: the others
     * go on (the robust mutex passes on; a new epoch covers a lost push). */
    int killed = 0;
    dp_feed_cursor_init(f, &r.c);
    uint64_t epoch0 = r.c.epoch; /* only a dead holder moves it in this loop */
    for (int round = 0; round < 20; round++) {
        pid_t p = fork();
        if (p == 0) {
            dp_feed *cf = NULL;
            if (dp_feed_open(K(path), 0, &cf) != DP_OK)
                _exit(1);
            for (;;)
                dp_feed_push(cf, K("spin"), 0, DP_FEED_PROCESS);
        }
        dp_clock_sleep(0.002 + 0.001 * (round % 5));
        kill(p, SIGKILL);
        waitpid(p, &status, 0);
        killed += WIFSIGNALED(status);
    }
    alarm(20); /* a mutex left held would hang here: fail instead */
    dp_bytes_free(&r.keys);
    reader_init(f, &r, r.c.origin);
    dp_feed_push(f, K("alive"), 0, DP_FEED_PROCESS);
    drain(f, &r, out, sizeof out);
    alarm(0);
    CHECK(killed == 20 && strcmp(out, "alive") == 0,
          "host: after 20 pushers killed mid-push, pushes and reads go on (got '%s')", out);
    CHECK(r.c.epoch > epoch0, "host: a pusher killed holding the mutex started a new epoch "
          "(%llu of 20 did)", (unsigned long long)(r.c.epoch - epoch0));

    threads("host", f);
    dp_bytes_free(&r.keys);
    dp_feed_close(f);

    /* A full disk: the blocks cannot be allocated, the open fails cleanly. */
    char small[256];
    snprintf(small, sizeof small, "%s/small", dir);
    mkdir(small, 0700);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "mount -t tmpfs -o size=1m tmpfs '%s' 2>/dev/null", small);
    if (geteuid() == 0 && system(cmd) == 0) {
        snprintf(path, sizeof path, "%s/feed", small);
        fd = open(path, O_RDWR | O_CREAT, 0600);
        close(fd);
        errno = 0;
        int rc = dp_feed_open(K(path), 0, &f);
        CHECK(rc == DP_EBACKEND && errno == ENOSPC,
              "host: on a full file system the open fails with ENOSPC (no SIGBUS later)");
        snprintf(cmd, sizeof cmd, "umount '%s'", small);
        if (system(cmd) != 0)
            CHECK(0, "host: umount %s", small);
    } else {
        CHECK(0, "host: the full-disk case needs root to mount a tmpfs (CI runs as root)");
    }
}

int main(void)
{
    if (!mkdtemp(dir))
        return 2;
    dp_feed *f = NULL;
    CHECK(dp_feed_open(K("test:in-process"), 256, &f) == DP_OK, "process: open");
    basics("process", f);
    falling_behind("process", f, 256);
    threads("process", f);
    dp_feed_close(f);

    host_feed();

    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        return 2;
    return tap_done();
}
