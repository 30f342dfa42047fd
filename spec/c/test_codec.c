/* The value codec: exact round trips, the byte format, shape checks, hostile
 * input (every truncation, every single-byte corruption, crafted counts),
 * allocation failure at the Nth allocation (SQLite style), and the Lua
 * binding's error paths inside an embedded LuaJIT. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "dogpile.h"
#include "tap.h"

int luaopen_dogpile_codec(lua_State *L);

/* -- Values as flat item lists, in the order the format stores them ---- */

typedef struct item {
    int type;
    int boolean;
    double number;
    const char *str;
    size_t len;
    size_t narr, nhash;
} item;

#define NIL {DP_TNIL, 0, 0, NULL, 0, 0, 0}
#define BOOL(x) {DP_TBOOLEAN, (x), 0, NULL, 0, 0, 0}
#define NUM(x) {DP_TNUMBER, 0, (x), NULL, 0, 0, 0}
#define STR(s) {DP_TSTRING, 0, 0, (s), sizeof(s) - 1, 0, 0}
#define TAB(a, h) {DP_TTABLE, 0, 0, NULL, 0, (a), (h)}
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static double bits_to_double(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static uint64_t double_bits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static int put_item(dp_buf *b, const item *it)
{
    switch (it->type) {
    case DP_TNIL: return dp_buf_put_nil(b);
    case DP_TBOOLEAN: return dp_buf_put_boolean(b, it->boolean);
    case DP_TNUMBER: return dp_buf_put_number(b, it->number);
    case DP_TSTRING: return dp_buf_put_string(b, it->str, it->len);
    default: return dp_buf_put_table(b, it->narr, it->nhash);
    }
}

/* Writes the items; the first error, or dp_buf_finish()'s answer. */
static int encode(dp_buf *b, const item *its, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int rc = put_item(b, &its[i]);
        if (rc != DP_OK)
            return rc;
    }
    return dp_buf_finish(b);
}

static int same_item(const dp_item *got, const item *want)
{
    if (got->type != want->type)
        return 0;
    switch (want->type) {
    case DP_TBOOLEAN: return got->boolean == want->boolean;
    case DP_TNUMBER: return double_bits(got->number) == double_bits(want->number);
    case DP_TSTRING:
        return got->len == want->len && memcmp(got->str, want->str, want->len) == 0;
    case DP_TTABLE: return got->narr == want->narr && got->nhash == want->nhash;
    default: return 1;
    }
}

/* Reads the bytes back: 1 when they hold exactly these items, bit for bit. */
static int decodes_to(const void *data, size_t len, const item *its, size_t n)
{
    dp_reader r;
    if (dp_reader_init(&r, data, len) != DP_OK)
        return 0;
    for (size_t i = 0; i < n; i++) {
        dp_item got;
        if (dp_reader_next(&r, &got) != DP_OK || !same_item(&got, &its[i]))
            return 0;
        if ((i + 1 == n) != !!r.done)
            return 0;
    }
    return dp_reader_finish(&r) == DP_OK;
}

/* Round trip: encode, decode, compare. */
static int round_trips(const item *its, size_t n)
{
    dp_buf b;
    dp_buf_init(&b, NULL, NULL);
    int ok = encode(&b, its, n) == DP_OK && decodes_to(b.data, b.len, its, n);
    dp_buf_free(&b);
    return ok;
}

/* Reads any bytes through to the end, as a decoder would. Returns the
 * reader's status. Also checks the reader's promises (*consistent becomes 0
 * when one is broken): a string lies inside the input, no key is nil or
 * NaN, no table declares more items than the input has bytes, every error
 * has a text; and bytes it accepts hold items that the writer accepts and
 * that read back identically from the writer's encoding. */
static int walk(const unsigned char *data, size_t len, int *consistent)
{
    dp_reader r;
    item *its = malloc((len + 1) * sizeof *its);
    size_t n = 0;
    int rc = dp_reader_init(&r, data, len);
    while (rc == DP_OK && !r.done) {
        dp_item it;
        rc = dp_reader_next(&r, &it);
        if (rc != DP_OK)
            break;
        if (n >= len) {
            *consistent = 0;
            break;
        }
        if (it.type == DP_TSTRING &&
            (it.str < (const char *)data || it.len > len ||
             it.str + it.len > (const char *)data + len))
            *consistent = 0;
        if (it.key && (it.type == DP_TNIL || (it.type == DP_TNUMBER && it.number != it.number)))
            *consistent = 0;
        if (it.type == DP_TTABLE && (it.narr > len || it.nhash > len))
            *consistent = 0;
        its[n++] = (item){it.type, it.boolean, it.number, it.str, it.len, it.narr, it.nhash};
    }
    if (rc == DP_OK)
        rc = dp_reader_finish(&r);
    if (rc == DP_OK && !round_trips(its, n))
        *consistent = 0;
    if (rc != DP_OK && r.errstr[0] == '\0')
        *consistent = 0;
    free(its);
    return rc;
}

/* -- A counting allocator that fails the Nth allocation ----------------- */

typedef struct ctl {
    long calls;    /* allocations and resizes so far */
    long fail_at;  /* 0: never fail */
    long blocks;   /* live blocks */
    long bytes;    /* live bytes */
} ctl;

static void *ctl_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    ctl *c = ud;
    if (nsize == 0) {
        if (ptr) {
            c->blocks--;
            c->bytes -= (long)osize;
        }
        free(ptr);
        return NULL;
    }
    if (++c->calls == c->fail_at)
        return NULL;
    void *p = realloc(ptr, nsize);
    if (!p)
        return NULL;
    if (!ptr)
        c->blocks++;
    c->bytes += (long)nsize - (long)(ptr ? osize : 0);
    return p;
}

/* -- Bytes helpers ------------------------------------------------------ */

typedef struct bytes {
    unsigned char d[4096];
    size_t n;
} bytes;

static void b_add(bytes *b, const char *s, size_t n)
{
    memcpy(b->d + b->n, s, n);
    b->n += n;
}

static void b_varint(bytes *b, uint64_t v)
{
    while (v >= 0x80) {
        b->d[b->n++] = (unsigned char)(v & 0x7f) | 0x80;
        v >>= 7;
    }
    b->d[b->n++] = (unsigned char)v;
}

#define HDR "\xC1\x01"

static int decode_status(const void *data, size_t len, char *errstr)
{
    dp_reader r;
    int rc = dp_reader_init(&r, data, len);
    while (rc == DP_OK && !r.done) {
        dp_item it;
        rc = dp_reader_next(&r, &it);
    }
    if (rc == DP_OK)
        rc = dp_reader_finish(&r);
    if (errstr)
        strcpy(errstr, r.errstr);
    return rc;
}

/* -- Samples ------------------------------------------------------------ */

/* {1, "two", {x = 1, [true] = false},
 *  [2.5] = "a", [{"k"}] = {nested = {}}, name = "players\0x"} */
static const item nested[] = {
    TAB(3, 3), NUM(1), STR("two"), TAB(0, 2), STR("x"), NUM(1), BOOL(1), BOOL(0),
    NUM(2.5), STR("a"), TAB(1, 0), STR("k"), TAB(0, 1), STR("nested"), TAB(0, 0),
    STR("name"), STR("players\0x"),
};

/* A sparse array {[1] = "a", [3] = "c"} with a nil value in the array part
 * (the Lua encoder never writes one, but the format allows it). */
static const item sparse[] = {
    TAB(2, 1), STR("a"), NIL, NUM(3), STR("c"),
};

static item numbers[] = {
    TAB(0, 0), NUM(0), NUM(-0.0), NUM(1), NUM(-1), NUM(63), NUM(-64), NUM(64),
    NUM(300), NUM(0.1), NUM(-2.5), NUM(9007199254740992.0) /* 2^53 */,
    NUM(9007199254740993.0 * 2) /* 2^54 + 2 */, NUM(9223372036854775808.0) /* 2^63 */,
    NUM(-9223372036854775808.0) /* -2^63 */, NUM(9223372036854774784.0) /* 2^63 - 1024 */,
    NUM(1e308), NUM(5e-324), NUM(HUGE_VAL), NUM(-HUGE_VAL), NUM(NAN),
    NUM(1e300 * 1e10), NUM(-1e-310), NUM(2.2250738585072014e-308),
};

static int check_bytes(const item *its, size_t n, const char *want, size_t wlen)
{
    dp_buf b;
    dp_buf_init(&b, NULL, NULL);
    int ok = encode(&b, its, n) == DP_OK && b.len == wlen && memcmp(b.data, want, wlen) == 0;
    if (!ok) {
        printf("#   got:");
        for (size_t i = 0; i < b.len && i < 40; i++)
            printf(" %02x", b.data[i]);
        printf("\n");
    }
    dp_buf_free(&b);
    return ok;
}

#define BYTES(s) s, sizeof(s) - 1

static void test_format(void)
{
    CHECK(check_bytes((item[]){NIL}, 1, BYTES(HDR "\x00")), "nil is header + 00");
    CHECK(check_bytes((item[]){BOOL(0)}, 1, BYTES(HDR "\x01")), "false is 01");
    CHECK(check_bytes((item[]){BOOL(1)}, 1, BYTES(HDR "\x02")), "true is 02");
    CHECK(check_bytes((item[]){NUM(1)}, 1, BYTES(HDR "\x03\x02")), "1 is a zigzag varint 03 02");
    CHECK(check_bytes((item[]){NUM(-1)}, 1, BYTES(HDR "\x03\x01")), "-1 is 03 01");
    CHECK(check_bytes((item[]){NUM(300)}, 1, BYTES(HDR "\x03\xd8\x04")), "300 is 03 d8 04");
    CHECK(check_bytes((item[]){NUM(-0.0)}, 1, BYTES(HDR "\x04\0\0\0\0\0\0\0\x80")),
          "-0.0 stays a double, little-endian");
    CHECK(check_bytes((item[]){NUM(0.5)}, 1, BYTES(HDR "\x04\0\0\0\0\0\0\xe0\x3f")), "0.5 is a double");
    CHECK(check_bytes((item[]){NUM(9223372036854775808.0)}, 1,
                      BYTES(HDR "\x04\0\0\0\0\0\0\xe0\x43")), "2^63 is a double (beyond int64)");
    CHECK(check_bytes((item[]){NUM(-9223372036854775808.0)}, 1,
                      BYTES(HDR "\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")),
          "-2^63 is a 10-byte varint");
    CHECK(check_bytes((item[]){STR("a\0b")}, 1, BYTES(HDR "\x05\x03" "a\0b")), "a string is 05 len bytes");
    CHECK(check_bytes((item[]){TAB(0, 0)}, 1, BYTES(HDR "\x06\x00\x00")), "{} is 06 00 00");
    CHECK(check_bytes((item[]){TAB(1, 1), NUM(1), STR("x"), NUM(2)}, 4,
                      BYTES(HDR "\x06\x01\x01\x03\x02\x05\x01x\x03\x04")),
          "{1, x = 2}: counts, array items, then key/value pairs");
}

static void test_round_trips(void)
{
    size_t nn = COUNT(numbers) - 1;
    numbers[0].narr = nn;
    CHECK(round_trips(numbers, COUNT(numbers)), "%zu numbers round-trip bit for bit", nn);
    int each = 1;
    for (size_t i = 1; i < COUNT(numbers); i++)
        each &= round_trips(&numbers[i], 1);
    CHECK(each, "each number alone round-trips bit for bit (-0.0, NaN, +-inf, 2^63, -2^63, 5e-324)");

    static const uint64_t nans[] = {0x7ff8000000000000ULL, 0x7ff8000000000001ULL,
                                    0xfff8000000000000ULL, 0x7ff0000000000001ULL,
                                    0x7fffffffffffffffULL, 0xfff00000deadbeefULL};
    int nan_ok = 1;
    for (size_t i = 0; i < COUNT(nans); i++) {
        item it = NUM(bits_to_double(nans[i]));
        nan_ok &= round_trips(&it, 1);
    }
    CHECK(nan_ok, "NaN payloads and signs are preserved (%zu NaNs)", COUNT(nans));

    int ints = 1;
    for (int e = 0; e < 63; e++) {
        double p = ldexp(1, e);
        item its[] = {TAB(4, 0), NUM(p), NUM(-p), NUM(p - 1), NUM(-p + 1)};
        ints &= round_trips(its, COUNT(its));
    }
    CHECK(ints, "+-2^e and +-(2^e - 1) round-trip for e = 0..62");

    CHECK(round_trips((item[]){NIL}, 1) && round_trips((item[]){BOOL(1)}, 1) &&
              round_trips((item[]){BOOL(0)}, 1),
          "nil, true and false round-trip");
    CHECK(round_trips((item[]){STR("")}, 1), "the empty string round-trips");

    char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (char)i;
    item s256 = {DP_TSTRING, 0, 0, all, 256, 0, 0};
    CHECK(round_trips(&s256, 1), "a string of all 256 byte values round-trips");

    size_t big = 4 << 20;
    char *mb = malloc(big);
    for (size_t i = 0; i < big; i++)
        mb[i] = (char)(i * 131 + (i >> 13));
    item sbig[] = {TAB(2, 0), {DP_TSTRING, 0, 0, mb, big, 0, 0}, STR("after")};
    CHECK(round_trips(sbig, COUNT(sbig)), "a 4 MB string round-trips");
    free(mb);

    CHECK(round_trips(nested, COUNT(nested)),
          "nested tables with array and hash parts, boolean, number and table keys");
    CHECK(round_trips(sparse, COUNT(sparse)), "a sparse array (nil in the array part) round-trips");

    item deep[DP_CODEC_MAX_DEPTH + 1];
    /* {[{[{...}] = 0}] = 0}: 200 tables, each one the key of the next */
    item keydeep[3 * DP_CODEC_MAX_DEPTH];
    size_t k = 0;
    for (int i = 0; i < DP_CODEC_MAX_DEPTH - 1; i++)
        keydeep[k++] = (item)TAB(0, 1);
    keydeep[k++] = (item)TAB(0, 0);
    for (int i = 0; i < DP_CODEC_MAX_DEPTH - 1; i++)
        keydeep[k++] = (item)BOOL(1);
    CHECK(round_trips(keydeep, k), "200 tables nested through their keys round-trip");
    size_t d = 0;
    for (int i = 0; i < DP_CODEC_MAX_DEPTH; i++)
        deep[d++] = (item)TAB(1, 0);
    deep[d++] = (item)STR("bottom");
    CHECK(round_trips(deep, d), "%d nested tables (the limit) round-trip", DP_CODEC_MAX_DEPTH);
}

static void test_writer_shape(void)
{
    dp_buf b;
    dp_buf_init(&b, NULL, NULL);

    CHECK(dp_buf_finish(&b) == DP_EINVAL, "finish with nothing put: DP_EINVAL (%s)", b.errstr);
    dp_buf_reset(&b);
    CHECK(b.err == DP_OK && b.errstr[0] == '\0', "reset clears the error");

    CHECK(dp_buf_put_number(&b, 1) == DP_OK && b.done, "a scalar root completes the value");
    CHECK(dp_buf_put_number(&b, 2) == DP_EINVAL, "nothing may follow the root: DP_EINVAL (%s)", b.errstr);
    CHECK(dp_buf_put_nil(&b) == DP_EINVAL, "the error is sticky");

    dp_buf_reset(&b);
    CHECK(dp_buf_put_table(&b, 1, 2) == DP_OK && dp_buf_put_nil(&b) == DP_OK,
          "nil in the array part is allowed");
    CHECK(dp_buf_put_nil(&b) == DP_EINVAL, "a nil key is refused: DP_EINVAL (%s)", b.errstr);

    dp_buf_reset(&b);
    dp_buf_put_table(&b, 0, 1);
    CHECK(dp_buf_put_number(&b, NAN) == DP_EINVAL, "a NaN key is refused (%s)", b.errstr);

    dp_buf_reset(&b);
    dp_buf_put_table(&b, 1, 1);
    CHECK(dp_buf_put_number(&b, NAN) == DP_OK && dp_buf_put_string(&b, "k", 1) == DP_OK &&
              dp_buf_put_nil(&b) == DP_OK && dp_buf_finish(&b) == DP_OK,
          "NaN and nil as values are allowed");

    dp_buf_reset(&b);
    dp_buf_put_table(&b, 2, 0);
    dp_buf_put_boolean(&b, 1);
    CHECK(dp_buf_finish(&b) == DP_EINVAL && strstr(b.errstr, "owes 1"),
          "finish on an incomplete table names what is missing (%s)", b.errstr);

    dp_buf_reset(&b);
    int rc = DP_OK;
    for (int i = 0; i < DP_CODEC_MAX_DEPTH && rc == DP_OK; i++)
        rc = dp_buf_put_table(&b, 1, 0);
    CHECK(rc == DP_OK, "%d nested tables are accepted", DP_CODEC_MAX_DEPTH);
    CHECK(dp_buf_put_table(&b, 0, 0) == DP_EDEPTH, "one more (even empty) is DP_EDEPTH (%s)", b.errstr);

    dp_buf_reset(&b);
    CHECK(dp_buf_put_table(&b, SIZE_MAX, SIZE_MAX) == DP_EINVAL,
          "counts that overflow are refused (%s)", b.errstr);

    dp_buf_free(&b);
    dp_buf_free(&b);
    dp_buf fresh;
    dp_buf_init(&fresh, NULL, NULL);
    dp_buf_free(&fresh);
    CHECK(b.data == NULL && b.len == 0, "dp_buf_free may be called again, and on an unused buffer");
}

static void refuse(bytes *in, int want, const char *in_err, const char *what)
{
    char err[128];
    int rc = decode_status(in->d, in->n, err);
    CHECK(rc == want && strstr(err, in_err), "%s: %s (%s)", what, dp_strerror(want), err);
}

static void test_reader_refusals(void)
{
    bytes in;
#define IN(s) (in.n = 0, b_add(&in, s, sizeof(s) - 1), &in)
    refuse(IN(""), DP_EDECODE, "header", "empty input");
    refuse(IN("\xC1"), DP_EDECODE, "header", "half a header");
    refuse(IN("{\"a\":1}"), DP_EDECODE, "not a dogpile encoding", "JSON");
    refuse(IN("\x93\x01\x02\x03"), DP_EDECODE, "not a dogpile encoding", "MessagePack");
    refuse(IN("\x1bLJ\x02"), DP_EDECODE, "not a dogpile encoding", "LuaJIT bytecode");
    refuse(IN("\xC1\x02\x00"), DP_EVERSION, "version 2", "a newer format version");
    refuse(IN("\xC1\x00\x00"), DP_EDECODE, "version 0", "format version 0");
    refuse(IN(HDR), DP_EDECODE, "truncated", "a header and no item");
    refuse(IN(HDR "\x07"), DP_EDECODE, "unknown tag 0x07", "an unknown tag");
    refuse(IN(HDR "\xff"), DP_EDECODE, "unknown tag 0xff", "tag 0xff");
    refuse(IN(HDR "\x00\x00"), DP_EDECODE, "trailing", "a trailing byte");
    refuse(IN(HDR "\x05\x05" "a"), DP_EDECODE, "string of 5 bytes", "a string longer than the input");
    refuse(IN(HDR "\x05\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"), DP_EDECODE, "string of",
           "a string of 2^64 - 1 bytes");
    refuse(IN(HDR "\x05\xff\xff"), DP_EDECODE, "runs past the end", "a truncated varint");
    refuse(IN(HDR "\x03\x80\x80\x80\x80\x80\x80\x80\x80\x80\x02"), DP_EDECODE, "exceeds 64 bits",
           "a varint beyond 64 bits");
    refuse(IN(HDR "\x03\x80\x00"), DP_EDECODE, "overlong", "an overlong varint");
    refuse(IN(HDR "\x04\0\0\0"), DP_EDECODE, "needs 8 bytes", "a truncated double");
    in.n = 0;
    b_add(&in, HDR "\x03", 3);
    b_varint(&in, (1ULL << 54) + 2); /* zigzag of 2^53 + 1 */
    refuse(&in, DP_EDECODE, "not exactly a double", "an integer no double holds (2^53 + 1)");
    in.n = 0;
    b_add(&in, HDR "\x06", 3);
    b_varint(&in, 1ULL << 40);
    b_varint(&in, 0);
    refuse(&in, DP_EDECODE, "declares 1099511627776", "a table declaring 2^40 items in a few bytes");
    in.n = 0;
    b_add(&in, HDR "\x06\x00", 4);
    b_varint(&in, UINT64_MAX / 2);
    refuse(&in, DP_EDECODE, "declares", "a table declaring 2^63 pairs (2 * nhash overflows)");
    /* The outer table owes one more item after the inner one, so the inner
     * table's two items plus that one need 3 bytes; only 2 remain. */
    refuse(IN(HDR "\x06\x02\x00" "\x06\x02\x00" "\x00\x00"), DP_EDECODE, "room for 1",
           "an inner table's count counts the items its parents still owe");
    refuse(IN(HDR "\x06\x00\x01\x00\x00"), DP_EDECODE, "nil table key", "a nil key");
    refuse(IN(HDR "\x06\x00\x01\x04\0\0\0\0\0\0\xf8\x7f\x00"), DP_EDECODE, "NaN table key", "a NaN key");
    refuse(IN(HDR "\x06\x01\x00"), DP_EDECODE, "truncated", "a table missing its items");

    in.n = 0;
    b_add(&in, HDR, 2);
    for (int i = 0; i < DP_CODEC_MAX_DEPTH; i++)
        b_add(&in, "\x06\x01\x00", 3);
    b_add(&in, "\x00", 1);
    CHECK(decode_status(in.d, in.n, NULL) == DP_OK, "%d nested tables decode", DP_CODEC_MAX_DEPTH);
    in.n = 0;
    b_add(&in, HDR, 2);
    for (int i = 0; i <= DP_CODEC_MAX_DEPTH; i++)
        b_add(&in, "\x06\x01\x00", 3);
    b_add(&in, "\x00", 1);
    refuse(&in, DP_EDEPTH, "deeper than 200", "201 nested tables");

    dp_reader r;
    dp_item it;
    dp_reader_init(&r, HDR "\x00", 3);
    dp_reader_next(&r, &it);
    CHECK(r.done && dp_reader_next(&r, &it) == DP_EINVAL, "next after the whole value: DP_EINVAL (%s)",
          r.errstr);
    dp_reader_init(&r, "xx", 2);
    CHECK(dp_reader_next(&r, &it) == DP_EDECODE, "next after a failed init returns the init error");
#undef IN
}

/* Every prefix of an encoding is refused; every single-byte change is either
 * refused or a valid value (checked by walk()), never a crash. */
static void test_hostile(const char *name, const item *its, size_t n)
{
    dp_buf b;
    dp_buf_init(&b, NULL, NULL);
    encode(&b, its, n);
    size_t len = b.len;
    unsigned char *copy = malloc(len);

    int consistent = 1, refused = 1;
    for (size_t cut = 0; cut < len; cut++) {
        /* a fresh allocation of exactly `cut` bytes, so that ASan sees any
         * read past the end */
        unsigned char *p = malloc(cut ? cut : 1);
        memcpy(p, b.data, cut);
        refused &= walk(p, cut, &consistent) != DP_OK;
        free(p);
    }
    CHECK(refused && consistent, "%s: each of the %zu truncations is refused", name, len);

    consistent = 1;
    long accepted = 0, rejected = 0;
    for (size_t pos = 0; pos < len; pos++) {
        for (int v = 0; v < 256; v++) {
            if (v == b.data[pos])
                continue;
            memcpy(copy, b.data, len);
            copy[pos] = (unsigned char)v;
            if (walk(copy, len, &consistent) == DP_OK)
                accepted++;
            else
                rejected++;
        }
    }
    CHECK(consistent, "%s: %zu x 255 single-byte corruptions: %ld refused, %ld valid values",
          name, len, rejected, accepted);

    consistent = 1;
    unsigned char *longer = malloc(len + 1);
    memcpy(longer, b.data, len);
    longer[len] = 0;
    CHECK(walk(longer, len + 1, &consistent) == DP_EDECODE && consistent,
          "%s: a trailing byte is refused", name);
    free(longer);
    free(copy);
    dp_buf_free(&b);
}

/* SQLite style: fail the Nth allocation for N = 1, 2, ... until a run needs
 * no more; each run must end in success or a clean DP_ENOMEM, leaking
 * nothing. */
static void test_alloc_failures(void)
{
    enum { NSTR = 400 };
    static item its[2 + NSTR + 2];
    static char filler[NSTR][100];
    size_t n = 0;
    its[n++] = (item)TAB(NSTR + 1, 1);
    for (int i = 0; i < NSTR; i++) {
        memset(filler[i], 'a' + i % 26, sizeof filler[i]);
        its[n++] = (item){DP_TSTRING, 0, 0, filler[i], sizeof filler[i], 0, 0};
    }
    static char big[1 << 20];
    its[n++] = (item){DP_TSTRING, 0, 0, big, sizeof big, 0, 0};
    its[n++] = (item)STR("key");
    its[n++] = (item)NUM(0.25);

    long runs = 0, failures = 0;
    int clean = 1, ok_at_end = 0;
    for (long nth = 1; nth < 10000; nth++) {
        ctl c = {0, nth, 0, 0};
        dp_buf b;
        dp_buf_init(&b, ctl_alloc, &c);
        int rc = encode(&b, its, n);
        runs++;
        if (rc == DP_OK) {
            clean &= decodes_to(b.data, b.len, its, n);
        } else {
            failures++;
            clean &= rc == DP_ENOMEM && b.err == DP_ENOMEM && b.errstr[0] != '\0' &&
                     dp_buf_put_nil(&b) == DP_ENOMEM;
        }
        dp_buf_free(&b);
        clean &= c.blocks == 0 && c.bytes == 0;
        if (c.calls < nth) {
            ok_at_end = rc == DP_OK;
            break;
        }
    }
    CHECK(clean && ok_at_end && failures == runs - 1,
          "allocation failure at N = 1..%ld: %ld clean DP_ENOMEM, then success, no leak",
          runs, failures);

    ctl c = {0, 2, 0, 0};
    dp_buf b;
    dp_buf_init(&b, ctl_alloc, &c);
    int first = encode(&b, its, n);
    dp_buf_reset(&b);
    int second = encode(&b, its, n);
    int ok = first == DP_ENOMEM && second == DP_OK && decodes_to(b.data, b.len, its, n);
    dp_buf_free(&b);
    CHECK(ok && c.blocks == 0, "after DP_ENOMEM, reset lets the same buffer encode again");
}

/* -- The Lua binding inside an embedded LuaJIT --------------------------- */

static lua_State *new_state(lua_Alloc f, void *ud)
{
    lua_State *L = f ? lua_newstate(f, ud) : luaL_newstate();
    if (!L)
        return NULL;
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_dogpile_codec);
    lua_setfield(L, -2, "dogpile.codec");
    lua_pop(L, 2);
    return L;
}

static int run(lua_State *L, const char *code, char *out, size_t outlen)
{
    int rc = luaL_dostring(L, code);
    const char *s = lua_tostring(L, -1);
    snprintf(out, outlen, "%s", s ? s : "(no message)");
    lua_settop(L, 0);
    return rc;
}

static const char *lua_checks =
    "local codec = require 'dogpile.codec'\n"
    "local v = {1, 2.5, 'x\\0y', {a = true}, [true] = -0.0, [{1}] = 'k', n = 0/0}\n"
    "local w = assert(codec.decode(codec.encode(v)))\n"
    "assert(w[1] == 1 and w[2] == 2.5 and w[3] == 'x\\0y' and w[4].a == true)\n"
    "assert(1 / w[true] == -math.huge and w.n ~= w.n)\n"
    "for k, x in pairs(w) do if type(k) == 'table' then assert(k[1] == 1 and x == 'k') end end\n"
    "local ok, err\n"
    "for i = 1, 2000 do\n"
    "  ok, err = pcall(codec.encode, {players = {nil, nil, {socket = io.stdout}}, big = string.rep('x', 1e5)})\n"
    "end\n"
    "assert(not ok and err == 'dogpile.codec: value.players[3].socket: cannot serialize a userdata', err)\n"
    "local t = {a = {}}; t.a.b = t\n"
    "for i = 1, 200 do ok, err = pcall(codec.encode, t) end\n"
    "assert(err == 'dogpile.codec: value.a.b: cannot serialize a cycle (this table contains itself)', err)\n"
    "for i = 1, 200 do assert(codec.decode('\\193\\1\\5\\200\\1') == nil) end\n"
    "return 'ok'\n";

/* Fail the Nth allocation of a Lua state while the binding encodes and
 * decodes: each call must end in a result or a Lua error, the state must
 * stay usable, and closing it must free every byte (the codec's buffer is
 * allocated through the state's allocator, so it is counted too). */
static void test_lua_oom(void)
{
    ctl c = {0, 0, 0, 0};
    lua_State *L = new_state((lua_Alloc)ctl_alloc, &c);
    if (!L) {
        CHECK(0, "lua_newstate with a custom allocator (needs a GC64 LuaJIT)");
        return;
    }
    char msg[256];
    int setup = run(L,
        "codec = require 'dogpile.codec'\n"
        "local t = {}\n"
        "for i = 1, 50 do t[i] = {i, tostring(i), {x = i / 3}} end\n"
        "t.big = string.rep('y', 100000)\n"
        "value = t\n"
        "bytes = codec.encode(t)\n"
        "function step()\n"
        "  local s = codec.encode(value)\n"
        "  local w = codec.decode(bytes)\n"
        "  local ok = pcall(codec.encode, {f = print})\n"
        "  return #s == #bytes and w and w[50][3].x == 50 / 3 and not ok\n"
        "end\n", msg, sizeof msg);
    CHECK(setup == 0, "Lua OOM test setup (%s)", setup ? msg : "ok");

    long runs = 0, errors = 0;
    int sane = 1, done = 0;
    for (long nth = 1; nth < 100000 && !done; nth++) {
        lua_getglobal(L, "step");
        c.calls = 0;
        c.fail_at = nth;
        int rc = lua_pcall(L, 0, 1, 0);
        long calls = c.calls;
        c.fail_at = 0;
        runs++;
        if (rc == 0) {
            if (calls < nth) {
                sane &= lua_toboolean(L, -1);
                done = 1;
            }
        } else {
            errors++;
            sane &= rc == LUA_ERRMEM || rc == LUA_ERRRUN;
        }
        lua_settop(L, 0);
        lua_gc(L, LUA_GCCOLLECT, 0);
    }
    lua_getglobal(L, "step");
    int after = lua_pcall(L, 0, 1, 0) == 0 && lua_toboolean(L, -1);
    lua_close(L);
    CHECK(sane && done && after,
          "Lua allocation failure at N = 1..%ld: %ld clean Lua errors, then success", runs, errors);
    CHECK(c.blocks == 0 && c.bytes == 0, "closing the state frees every block (%ld left, %ld bytes)",
          c.blocks, c.bytes);
}

static void test_lua(void)
{
    lua_State *L = new_state(NULL, NULL);
    char msg[512];
    int rc = run(L, lua_checks, msg, sizeof msg);
    CHECK(rc == 0, "the binding round-trips and refuses with paths, repeatedly (%s)", msg);
    lua_close(L);
    test_lua_oom();
}

int main(void)
{
    test_format();
    test_round_trips();
    test_writer_shape();
    test_reader_refusals();

    numbers[0].narr = COUNT(numbers) - 1;
    test_hostile("nested tables", nested, COUNT(nested));
    test_hostile("numbers", numbers, COUNT(numbers));
    test_hostile("sparse array", sparse, COUNT(sparse));
    item str[] = {STR("players\0\xff\x01 and more")};
    test_hostile("string", str, COUNT(str));
    /* 40 levels, alternately {child} and {[child] = false} */
    item deep[61];
    for (int i = 0; i < 40; i++)
        deep[i] = (item)TAB(1 - i % 2, i % 2);
    deep[40] = (item)BOOL(1);
    for (int i = 41; i < 61; i++)
        deep[i] = (item)BOOL(0);
    test_hostile("deep", deep, COUNT(deep));

    test_alloc_failures();
    test_lua();
    return tap_done();
}
