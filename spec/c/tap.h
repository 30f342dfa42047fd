/* tap.h -- the C tests' TAP output: one "ok N - name" or "not ok N - name"
 * line per check, so the test command counts C checks and busted cases alike. */
#ifndef DP_TAP_H
#define DP_TAP_H
#include <stdio.h>

static int tap_n, tap_failed;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        int ok_ = !!(cond);                                                  \
        printf("%s %d - ", ok_ ? "ok" : "not ok", ++tap_n);                  \
        printf(__VA_ARGS__);                                                 \
        printf("\n");                                                        \
        if (!ok_) {                                                          \
            tap_failed++;                                                    \
            printf("#   failed at %s:%d: %s\n", __FILE__, __LINE__, #cond);  \
        }                                                                    \
        fflush(stdout);                                                      \
    } while (0)

static int tap_done(void)
{
    printf("1..%d\n", tap_n);
    return tap_failed ? 1 : 0;
}
#endif
