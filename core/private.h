/* private.h -- what the core's files share with each other and nobody else
 * (after hiredis's async_private.h): one declaration of each, no prototype
 * written twice by hand. Not installed. */
#ifndef DP_PRIVATE_H
#define DP_PRIVATE_H

#include "dogpile.h"

/* lock.c: free the lock tables and named domains (dp_shutdown). */
void dp__lock_shutdown(void);

/* args.c: the default identity of an instance (each DP_SPEC_KEY value,
 * length-prefixed) into `id` (emptied first). DP_OK or DP_ENOMEM. */
int dp__args_identity(const dp_arg_spec *spec, const void *settings, dp_bytes *id);

/* args.c: the DP_SPEC_KEY values as text for a message, in `cap` bytes. */
void dp__args_key_text(const dp_arg_spec *spec, const void *settings, char *out, size_t cap);

/* args.c: the DP_SPEC_LOCK_TIMEOUT field of `settings`, -1 when unbounded
 * or when the table has none. */
double dp__args_lock_timeout(const dp_arg_spec *spec, const void *settings);

/* registry.c: the shared instances of declared backends (ops->create). */
typedef struct dp__instance dp__instance;

/* Fill the settings from `args`, then find the instance of that identity or
 * create it. DP_OK with *out (one reference), *self, *domain and
 * *lock_timeout set; or an error in err. */
int dp__instance_open(const dp_backend_ops *ops, void *ud, const dp_arg *args, size_t nargs,
                      dp__instance **out, void **self, uint32_t *domain, double *lock_timeout,
                      dp_err *err);

/* Drop one reference; the last one destroys the instance. */
void dp__instance_close(dp__instance *inst);

/* backend.c: the registered name of the handle's backend. */
const char *dp__backend_name(dp_backend *b);

#endif
