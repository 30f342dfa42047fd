/* lock.c -- the process-wide per-key lock registry.
 *
 * A lock exists only while it is held or waited for: acquiring creates its
 * entry, the last release or give-up removes it, so the registry holds no
 * memory for the millions of keys a cache may see. Entries live in striped
 * hash tables; each stripe has one mutex and one condition variable, and a
 * release broadcasts on its stripe. Waiters of other keys in the stripe wake
 * spuriously and go back to sleep: with 64 stripes that costs less than a
 * condition variable per entry, which would need init and destroy on every
 * acquisition.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "dogpile.h"
#include "private.h"

#define NSTRIPES 64

typedef struct entry {
    struct entry *next;
    uint64_t hash;
    uint32_t domain;
    uint32_t owner;    /* holder's tag, valid while held */
    uint32_t waiters;  /* threads blocked in dp_lock_wait or dp_lock_wait_unlocked */
    uint32_t releases; /* bumped by every release: dp_lock_wait_unlocked's generation */
    int held;
    size_t len;
    char key[];
} entry;

typedef struct stripe {
    uv_mutex_t mu;
    uv_cond_t cond;
    entry **buckets;
    size_t nbuckets; /* power of two */
    size_t count;
} stripe;

static stripe stripes[NSTRIPES];
static uv_once_t init_once = UV_ONCE_INIT;

static _Atomic uint32_t next_domain = 1;
static _Atomic uint32_t next_owner = 1;

typedef struct named_domain {
    struct named_domain *next;
    uint32_t id;
    size_t len;
    char name[];
} named_domain;

static named_domain *named_domains;
static uv_mutex_t named_mu;

static void init_registry(void)
{
    for (int i = 0; i < NSTRIPES; i++) {
        uv_mutex_init(&stripes[i].mu);
        uv_cond_init(&stripes[i].cond);
    }
    uv_mutex_init(&named_mu);
}

static uint64_t hash_key(uint32_t domain, const char *key, size_t len)
{
    uint64_t h = 14695981039346656037ULL ^ domain;
    h *= 1099511628211ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

static stripe *stripe_for(uint64_t h)
{
    uv_once(&init_once, init_registry);
    return &stripes[h & (NSTRIPES - 1)];
}

static entry **slot_for(stripe *s, uint64_t h, uint32_t domain,
                        const char *key, size_t len)
{
    if (s->nbuckets == 0)
        return NULL;
    entry **pp = &s->buckets[(h >> 6) & (s->nbuckets - 1)];
    for (; *pp; pp = &(*pp)->next) {
        entry *e = *pp;
        if (e->hash == h && e->domain == domain && e->len == len &&
            memcmp(e->key, key, len) == 0)
            return pp;
    }
    return pp;
}

static int grow(stripe *s)
{
    size_t n = s->nbuckets ? s->nbuckets * 2 : 16;
    entry **b = calloc(n, sizeof *b);
    if (!b)
        return -1;
    for (size_t i = 0; i < s->nbuckets; i++) {
        entry *e = s->buckets[i];
        while (e) {
            entry *next = e->next;
            size_t j = (e->hash >> 6) & (n - 1);
            e->next = b[j];
            b[j] = e;
            e = next;
        }
    }
    free(s->buckets);
    s->buckets = b;
    s->nbuckets = n;
    return 0;
}

/* Finds the entry, creating it (not held, no waiters) when absent. */
static entry *find_or_add(stripe *s, uint64_t h, uint32_t domain,
                          const char *key, size_t len)
{
    if (s->count >= s->nbuckets * 2 && grow(s) != 0 && s->nbuckets == 0)
        return NULL;
    entry **pp = slot_for(s, h, domain, key, len);
    if (*pp)
        return *pp;
    entry *e = malloc(sizeof *e + len);
    if (!e)
        return NULL;
    e->next = NULL;
    e->hash = h;
    e->domain = domain;
    e->owner = 0;
    e->waiters = 0;
    e->releases = 0;
    e->held = 0;
    e->len = len;
    memcpy(e->key, key, len);
    *pp = e;
    s->count++;
    return e;
}

/* One wait on the stripe's condition variable (its mutex held): without a
 * limit when timeout < 0, else until `deadline` (uv_hrtime). 1 when the
 * deadline has passed; the caller decides whether that is a timeout. */
static int cond_wait(stripe *s, double timeout, uint64_t deadline)
{
    if (timeout < 0) {
        uv_cond_wait(&s->cond, &s->mu);
        return 0;
    }
    uint64_t now = uv_hrtime();
    return now >= deadline ||
           uv_cond_timedwait(&s->cond, &s->mu, deadline - now) == UV_ETIMEDOUT;
}

static void drop_if_idle(stripe *s, entry *e)
{
    if (e->held || e->waiters)
        return;
    entry **pp = slot_for(s, e->hash, e->domain, e->key, e->len);
    *pp = e->next;
    s->count--;
    free(e);
}

DP_API uint32_t dp_lock_domain_new(void)
{
    return atomic_fetch_add(&next_domain, 1);
}

DP_API uint32_t dp_lock_owner_new(void)
{
    return atomic_fetch_add(&next_owner, 1);
}

DP_API uint32_t dp_lock_domain(const char *name, size_t len)
{
    uv_once(&init_once, init_registry);
    uv_mutex_lock(&named_mu);
    uint32_t id = 0;
    for (named_domain *d = named_domains; d; d = d->next)
        if (d->len == len && memcmp(d->name, name, len) == 0) {
            id = d->id;
            break;
        }
    if (!id) {
        named_domain *d = malloc(sizeof *d + len);
        if (d) {
            d->id = id = dp_lock_domain_new();
            d->len = len;
            memcpy(d->name, name, len);
            d->next = named_domains;
            named_domains = d;
        }
    }
    uv_mutex_unlock(&named_mu);
    return id;
}

DP_API int dp_lock_try(uint32_t domain, const char *key, size_t len,
                       uint32_t owner)
{
    uint64_t h = hash_key(domain, key, len);
    stripe *s = stripe_for(h);
    int rc;
    uv_mutex_lock(&s->mu);
    entry *e = find_or_add(s, h, domain, key, len);
    if (!e) {
        rc = DP_ENOMEM;
    } else if (e->held) {
        rc = DP_EBUSY;
    } else {
        e->held = 1;
        e->owner = owner;
        rc = DP_OK;
    }
    uv_mutex_unlock(&s->mu);
    return rc;
}

DP_API int dp_lock_wait(uint32_t domain, const char *key, size_t len,
                        uint32_t owner, double timeout)
{
    uint64_t h = hash_key(domain, key, len);
    stripe *s = stripe_for(h);
    uint64_t deadline = 0;
    if (timeout >= 0)
        deadline = uv_hrtime() + (uint64_t)(timeout * 1e9);
    int rc = DP_OK;
    uv_mutex_lock(&s->mu);
    entry *e = find_or_add(s, h, domain, key, len);
    if (!e) {
        uv_mutex_unlock(&s->mu);
        return DP_ENOMEM;
    }
    e->waiters++;
    while (e->held) {
        if (owner && e->owner == owner) {
            rc = DP_EDEADLK;
            break;
        }
        if (cond_wait(s, timeout, deadline) && e->held) {
            rc = DP_ETIMEDOUT;
            break;
        }
    }
    e->waiters--;
    if (rc == DP_OK) {
        e->held = 1;
        e->owner = owner;
    } else {
        drop_if_idle(s, e);
    }
    uv_mutex_unlock(&s->mu);
    return rc;
}

/* Waits for the holder seen at the call to let go: not "until not held",
 * since another waiter may take the lock again before this one wakes up; the
 * release counter says a release happened meanwhile. */
DP_API int dp_lock_wait_unlocked(uint32_t domain, const char *key, size_t len,
                                 uint32_t owner, double timeout)
{
    uint64_t h = hash_key(domain, key, len);
    stripe *s = stripe_for(h);
    int rc = DP_OK;
    uv_mutex_lock(&s->mu);
    entry **pp = slot_for(s, h, domain, key, len);
    entry *e = pp ? *pp : NULL;
    if (!e || !e->held) {
        uv_mutex_unlock(&s->mu);
        return DP_OK;
    }
    if (owner && e->owner == owner) {
        uv_mutex_unlock(&s->mu);
        return DP_EDEADLK;
    }
    if (timeout == 0) {
        uv_mutex_unlock(&s->mu);
        return DP_ETIMEDOUT;
    }
    uint64_t deadline = 0;
    if (timeout > 0)
        deadline = uv_hrtime() + (uint64_t)(timeout * 1e9);
    uint32_t seen = e->releases;
    e->waiters++; /* keeps the entry (and its counter) alive meanwhile */
    while (e->held && e->releases == seen) {
        if (cond_wait(s, timeout, deadline) && e->held && e->releases == seen) {
            rc = DP_ETIMEDOUT;
            break;
        }
    }
    e->waiters--;
    drop_if_idle(s, e);
    uv_mutex_unlock(&s->mu);
    return rc;
}

DP_API int dp_lock_release(uint32_t domain, const char *key, size_t len)
{
    uint64_t h = hash_key(domain, key, len);
    stripe *s = stripe_for(h);
    int rc = DP_ENOTHELD;
    uv_mutex_lock(&s->mu);
    entry **pp = slot_for(s, h, domain, key, len);
    entry *e = pp ? *pp : NULL;
    if (e && e->held) {
        e->held = 0;
        e->owner = 0;
        e->releases++;
        if (e->waiters)
            uv_cond_broadcast(&s->cond);
        else
            drop_if_idle(s, e);
        rc = DP_OK;
    }
    uv_mutex_unlock(&s->mu);
    return rc;
}

DP_API int dp_lock_held(uint32_t domain, const char *key, size_t len,
                        uint32_t *owner)
{
    uint64_t h = hash_key(domain, key, len);
    stripe *s = stripe_for(h);
    int held = 0;
    uv_mutex_lock(&s->mu);
    entry **pp = slot_for(s, h, domain, key, len);
    if (pp && *pp && (*pp)->held) {
        held = 1;
        if (owner)
            *owner = (*pp)->owner;
    }
    uv_mutex_unlock(&s->mu);
    return held;
}

DP_API size_t dp_lock_release_owner(uint32_t owner)
{
    size_t released = 0;
    uv_once(&init_once, init_registry);
    for (int i = 0; i < NSTRIPES; i++) {
        stripe *s = &stripes[i];
        uv_mutex_lock(&s->mu);
        int wake = 0;
        for (size_t b = 0; b < s->nbuckets; b++) {
            entry *e = s->buckets[b];
            while (e) {
                entry *next = e->next;
                if (e->held && e->owner == owner) {
                    e->held = 0;
                    e->owner = 0;
                    e->releases++;
                    released++;
                    if (e->waiters)
                        wake = 1;
                    else
                        drop_if_idle(s, e);
                }
                e = next;
            }
        }
        if (wake)
            uv_cond_broadcast(&s->cond);
        uv_mutex_unlock(&s->mu);
    }
    return released;
}

DP_API size_t dp_lock_count(void)
{
    size_t n = 0;
    uv_once(&init_once, init_registry);
    for (int i = 0; i < NSTRIPES; i++) {
        uv_mutex_lock(&stripes[i].mu);
        n += stripes[i].count;
        uv_mutex_unlock(&stripes[i].mu);
    }
    return n;
}

/* Called by dp_shutdown() (backend.c): no lock may be held or waited for. */
void dp__lock_shutdown(void)
{
    uv_once(&init_once, init_registry);
    for (int i = 0; i < NSTRIPES; i++) {
        uv_mutex_lock(&stripes[i].mu);
        if (stripes[i].count == 0) {
            free(stripes[i].buckets);
            stripes[i].buckets = NULL;
            stripes[i].nbuckets = 0;
        }
        uv_mutex_unlock(&stripes[i].mu);
    }
    uv_mutex_lock(&named_mu);
    while (named_domains) {
        named_domain *d = named_domains;
        named_domains = d->next;
        free(d);
    }
    uv_mutex_unlock(&named_mu);
}
