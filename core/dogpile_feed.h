/*
 * dogpile_feed.h -- the change feed: which keys of a shared store changed,
 * for the copies kept above it (a tiered region's upper tiers).
 *
 * A feed is a process-wide object named by its store (say, the Redis server
 * and channel a tiered region sits on). Producers push the keys they changed:
 * a writer in this process, directly; a listener thread, the keys another
 * process announced (a Redis PUBLISH). Each reader (one per Lua state and
 * tiered region) keeps a cursor and drains what was pushed since its last
 * read, dropping those keys from its copies.
 *
 * The reader's hit path looks at one word: dp_feed_stamp() points at a
 * counter bumped by every push and every reset, so "nothing changed since I
 * last drained" is one load and one compare. Only when it moved does the
 * reader call dp_feed_read().
 *
 * Entries live in a ring of fixed capacity. A reader whose cursor fell off
 * it (it was idle while more than `capacity` keys changed), or that sees a
 * new epoch (the producer lost its notification channel and came back, so
 * changes may have gone unannounced), is told to reset: to drop every copy
 * it keeps, since it cannot know which are stale.
 *
 * Host feeds. A name that starts with '/' is the path of a file that every
 * process of the host maps: the ring, the stamp and the epoch live in it, so
 * a push in one process reaches the readers of every process (a tiered
 * region over lmdb). The stamp pointer then points into the mapping: the hit
 * path is the same one load. Pushes and reads take a robust process-shared
 * mutex in the file (held for a copy of one key; a holder that dies leaves
 * it consistent again and starts a new epoch). The file must exist (its
 * owner makes it, with the mode its users need: backends/lmdb.c next to each
 * environment); dp_feed_open allocates its blocks with posix_fallocate before
 * mapping it, so that no write through the mapping can fault on a full disk
 * (ENOSPC is an error at open instead). Keys longer than DP_FEED_FILE_KEY
 * bytes are not stored: such a push starts a new epoch (every reader drops
 * its copies), which is never wrong.
 *
 * @note Memory ownership. dp_feed_open() returns a handle owned by the caller
 * until dp_feed_close(); the feed itself lives while any handle is open. Keys
 * are copied on push. dp_feed_read() writes keys into a caller-owned
 * dp_bytes (grown with realloc(); free with dp_bytes_free()). The stamp
 * pointer stays valid until the handle is closed. Every function is safe to
 * call from any thread.
 */
#ifndef DOGPILE_FEED_H
#define DOGPILE_FEED_H

#include "dogpile.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dp_feed dp_feed;

/** A reader's position in a feed. Initialise it with dp_feed_cursor_init(). */
typedef struct dp_feed_cursor {
    uint64_t seq;      /* private: the next entry to read */
    uint64_t epoch;    /* private: the epoch this cursor has seen */
    uint32_t stamp;    /* out: the feed's stamp when this cursor caught up */
    uint32_t origin;   /* in: entries pushed with this origin are skipped (0: none) */
    int reset;         /* out: 1 when entries were missed: drop every copy */
    int more;          /* out: 1 when entries remain after this read */
    double reset_at;   /* out: wall-clock time of the latest reset of the feed */
} dp_feed_cursor;

/** Scopes, for producers and readers that share this meaning (the tiered
 * backend and the redis listener): how widely shared the store is where a
 * change was seen. A change at scope S makes copies in tiers of scope <= S
 * suspect. */
#define DP_FEED_STATE   1 /* one Lua state */
#define DP_FEED_PROCESS 2 /* every Lua state of one process */
#define DP_FEED_HOST    3 /* every process of one host */
#define DP_FEED_FLEET   4 /* every host */

/** Default number of entries in a feed's ring. */
#define DP_FEED_CAPACITY 4096

/** Entries of a host feed's ring, and the longest key one stores. */
#define DP_FEED_FILE_SLOTS 4096
#define DP_FEED_FILE_KEY 512
/** The size of a host feed's file: a 4 KiB header page, then the ring. */
#define DP_FEED_FILE_BYTES (4096 + (size_t)DP_FEED_FILE_SLOTS * (16 + DP_FEED_FILE_KEY))

/** Find or make the feed named `name` (len bytes). `capacity`: ring entries
 * for a new feed (0: DP_FEED_CAPACITY); an existing feed keeps its own. A
 * name starting with '/' opens the host feed in that file (see "Host
 * feeds"; `capacity` is ignored). DP_OK with *out, DP_ENOMEM, DP_EINVAL (no
 * name, or a path longer than PATH_MAX), DP_EBACKEND (the file could not be
 * opened, allocated or mapped, or holds something else: errno says why,
 * EPROTO for a foreign file). */
DP_API int dp_feed_open(const char *name, size_t len, size_t capacity, dp_feed **out);

/** Release a handle (NULL is fine). The last one frees the feed. */
DP_API void dp_feed_close(dp_feed *f);

/** The feed's stamp: changes whenever an entry is pushed or the feed is
 * reset. A reader compares it with cursor.stamp. */
DP_API const volatile uint32_t *dp_feed_stamp(dp_feed *f);

/** Record that `key` changed. `origin`: the producer's tag (readers skip
 * their own); `scope`: a number the producer and the readers agree on
 * (tiered: how far the change travelled). DP_OK or DP_ENOMEM (then the
 * feed is reset instead, so no reader misses the change). A host feed resets
 * too, returning DP_OK, for a key longer than DP_FEED_FILE_KEY. Origins are
 * per process (dp_lock_owner_new): a host feed tells them apart by pid. */
DP_API int dp_feed_push(dp_feed *f, const char *key, size_t klen, uint32_t origin,
                        int scope);

/** Start a new epoch: every reader resets at its next read. For a producer
 * that lost its channel (or gained it for the first time): changes made
 * meanwhile were not announced. */
DP_API void dp_feed_reset(dp_feed *f);

/** Place `c` (out; its origin field is kept) at the feed's head: it will
 * read what is pushed from now on. */
DP_API void dp_feed_cursor_init(dp_feed *f, dp_feed_cursor *c);

/** Read at most `max` entries after `c` (in/out) that are not the reader's
 * own: their keys, one after another, into `keys` (emptied first), their
 * lengths into lens[0..*n-1] and their scopes into scopes[0..*n-1].
 * c->reset: the reader missed entries (fell off the ring, or a new epoch):
 * nothing is returned, the cursor is now at the head, and every copy must
 * be dropped; c->reset_at is then the new epoch's time, or now for a cursor
 * that fell behind (shared copies taken before it may be stale). c->more:
 * call again. DP_OK or DP_ENOMEM (keys could not grow;
 * then c->reset is set, which is always safe). */
DP_API int dp_feed_read(dp_feed *f, dp_feed_cursor *c, dp_bytes *keys, size_t *lens,
                        int32_t *scopes, size_t max, size_t *n);

#ifdef __cplusplus
}
#endif
#endif /* DOGPILE_FEED_H */
