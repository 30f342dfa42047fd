/* The clock: wall-clock seconds, stamps strictly increasing across threads. */
#include <math.h>
#include <time.h>
#include <uv.h>

#include "dogpile.h"
#include "tap.h"

#define PER_THREAD 200000
static int monotone_ok[2];

static void stamper(void *arg)
{
    int *ok = arg;
    double prev = dp_clock_stamp();
    *ok = 1;
    for (int i = 0; i < PER_THREAD; i++) {
        double s = dp_clock_stamp();
        if (!(s > prev))
            *ok = 0;
        prev = s;
    }
}

int main(void)
{
    double now = dp_clock_now();
    CHECK(fabs(now - (double)time(NULL)) < 2, "dp_clock_now is wall-clock epoch seconds");

    int bound_ok = 1;
    for (int i = 0; i < 2000000; i++) {
        double fine = dp_clock_now(), upper = dp_clock_upper();
        if (upper < fine)
            bound_ok = 0;
    }
    CHECK(bound_ok, "dp_clock_upper is never below dp_clock_now read just before it");
    CHECK(dp_clock_upper() - dp_clock_now() < 0.1, "dp_clock_upper is within a tick of the time");

    double a = dp_clock_stamp(), b = dp_clock_stamp();
    CHECK(b > a, "two stamps in a row differ");

    uv_thread_t t[2];
    for (int i = 0; i < 2; i++)
        uv_thread_create(&t[i], stamper, &monotone_ok[i]);
    for (int i = 0; i < 2; i++)
        uv_thread_join(&t[i]);
    CHECK(monotone_ok[0] && monotone_ok[1], "stamps strictly increase in each of 2 racing threads");

    double m0 = dp_clock_monotonic();
    dp_clock_sleep(0.02);
    double m1 = dp_clock_monotonic();
    CHECK(m1 - m0 >= 0.019, "dp_clock_sleep(0.02) sleeps at least 20 ms (slept %.4f)", m1 - m0);
    return tap_done();
}
