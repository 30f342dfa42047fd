/* Standard SHA-1 vectors (FIPS 180 examples) and the padding boundaries. */
#include <stdlib.h>
#include <string.h>

#include "dogpile.h"
#include "tap.h"

static const char *hex_of(const void *p, size_t n)
{
    static char out[41];
    dp_sha1_hex(p, n, out);
    return out;
}

int main(void)
{
    static const struct { const char *in; const char *want; } v[] = {
        {"", "da39a3ee5e6b4b0d3255bfef95601890afd80709"},
        {"abc", "a9993e364706816aba3e25717850c26c9cd0d89d"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "84983e441c3bd26ebaae4aa1f95129e5e54670f1"},
        {"The quick brown fox jumps over the lazy dog",
         "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12"},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        CHECK(strcmp(hex_of(v[i].in, strlen(v[i].in)), v[i].want) == 0,
              "sha1(\"%.20s\")", v[i].in);

    static const struct { size_t n; const char *want; } x[] = {
        {55, "cef734ba81a024479e09eb5a75b6ddae62e6abf1"},
        {56, "901305367c259952f4e7af8323f480d59f81335b"},
        {63, "0ddc4e0cccd9a12850deb5abb0853a4425559fec"},
        {64, "bb2fa3ee7afb9f54c6dfb5d021f14b1ffe40c163"},
        {65, "78c741ddc482e4cdf8c474a0876347a0905b6233"},
        {119, "4300320394f7ee239bcdce7d3b8bcee173a0cd5c"},
        {120, "ceb2821639c4b6dcb10bce0e522ca2e608ce056d"},
    };
    char buf[128];
    memset(buf, 'x', sizeof buf);
    for (size_t i = 0; i < sizeof x / sizeof x[0]; i++)
        CHECK(strcmp(hex_of(buf, x[i].n), x[i].want) == 0, "sha1 of %zu bytes", x[i].n);

    unsigned char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (unsigned char)i;
    CHECK(strcmp(hex_of(all, 256), "4916d6bdb7f78e6803698cab32d1586ea457dfc8") == 0,
          "sha1 of every byte value");

    char *million = malloc(1000000);
    memset(million, 'a', 1000000);
    CHECK(strcmp(hex_of(million, 1000000), "34aa973cd4c4daa4f61eeb2bdbad27316534016f") == 0,
          "sha1 of a million 'a'");
    free(million);
    return tap_done();
}
