/* What the two Redis backends (redis.c, redis_cluster.c) share of their I/O
 * on hiredis connections: a private header, included by both and installed
 * nowhere. Everything is static: each backend module keeps its own copy. */
#ifndef DP_REDIS_IO_H
#define DP_REDIS_IO_H

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <hiredis/sds.h>

static struct timeval tv_of(double s)
{
    struct timeval tv;
    tv.tv_sec = (time_t)s;
    tv.tv_usec = (suseconds_t)((s - (double)tv.tv_sec) * 1e6);
    return tv;
}

/* -- SIGPIPE ------------------------------------------------------------------ */

/* hiredis writes with write(): a server that closed the connection would
 * raise SIGPIPE and kill the host. A library must not install handlers, so
 * the signal is blocked in this thread around the I/O, and one it raised is
 * consumed before the mask is restored (one already pending is left alone). */
typedef struct nopipe {
    sigset_t old;
    int pending;
} nopipe;

static void nopipe_begin(nopipe *np)
{
    sigset_t set, pend;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    sigpending(&pend);
    np->pending = sigismember(&pend, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &set, &np->old);
}

static void nopipe_end(nopipe *np)
{
    if (!np->pending) {
        sigset_t set, pend;
        sigemptyset(&set);
        sigaddset(&set, SIGPIPE);
        struct timespec zero = {0, 0};
        sigpending(&pend);
        if (sigismember(&pend, SIGPIPE) == 1)
            while (sigtimedwait(&set, NULL, &zero) == -1 && errno == EINTR)
                ;
    }
    pthread_sigmask(SIG_SETMASK, &np->old, NULL);
}

/* What the commands appended, sent with MSG_NOSIGNAL: a closed connection
 * gives EPIPE instead of a SIGPIPE. hiredis then finds its buffer empty and
 * only reads (a read cannot raise SIGPIPE), so the hot path needs no signal
 * mask: blocking and consuming SIGPIPE (nopipe_*) cost four system calls a
 * command. */
static int send_nosignal(redisContext *c)
{
    size_t len = sdslen(c->obuf), off = 0;
    while (off < len) {
        ssize_t n = send(c->fd, c->obuf + off, len - off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            c->err = REDIS_ERR_IO;
            snprintf(c->errstr, sizeof c->errstr, "%s", strerror(e));
            errno = e; /* closed_by_peer() reads it */
            return REDIS_ERR;
        }
        off += (size_t)n;
    }
    sdsclear(c->obuf);
    return REDIS_OK;
}

/* The process id, without a system call per command (glibc no longer caches
 * getpid): read once, and again in a fork()ed child. */
static pid_t cur_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void pid_after_fork(void)
{
    cur_pid = getpid();
}

static void pid_init(void)
{
    cur_pid = getpid();
    pthread_atfork(NULL, NULL, pid_after_fork);
}

static pid_t self_pid(void)
{
    pthread_once(&pid_once, pid_init);
    return cur_pid;
}

static int closed_by_peer(redisContext *c)
{
    return c->err == REDIS_ERR_EOF ||
           (c->err == REDIS_ERR_IO && (errno == ECONNRESET || errno == EPIPE));
}

#endif /* DP_REDIS_IO_H */
