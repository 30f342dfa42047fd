/* codec.c -- the value codec: a Lua-independent byte format, its writer
 * (dp_buf) and its reader (dp_reader).
 *
 * Byte format, version 1. An encoding is a 2-byte header, then exactly one
 * item, then nothing:
 *
 *   header   0xC1 0x01    magic (0xC1 is never valid in UTF-8, JSON or
 *                         MessagePack, so text and other codecs' bytes are
 *                         refused at once), then the format version
 *   item     one tag byte, then the tag's payload:
 *     0x00   nil
 *     0x01   false
 *     0x02   true
 *     0x03   integer: a zigzag varint. Written for every double that is
 *            integral and in [-2^63, 2^63), except -0.0
 *     0x04   double: the 8 bytes of the IEEE 754 binary64, little-endian
 *            (every other number: fractions, -0.0, +-inf, NaN with its
 *            payload, integral values of 2^63 and beyond)
 *     0x05   string: varint byte length, then the bytes
 *     0x06   table: varint narr, varint nhash, then narr items (the values
 *            of keys 1..narr), then nhash key/value pairs as 2*nhash items
 *            alternating key, value
 *
 *   varint   unsigned LEB128: 7 bits per byte, least significant group
 *            first, high bit set on every byte but the last; at most 10
 *            bytes, value < 2^64, no overlong form (a last byte of 0 after
 *            the first byte)
 *   zigzag   n >= 0 as 2n, n < 0 as -2n - 1, so small magnitudes are short
 *
 * Readers refuse, with DP_EDECODE: a wrong magic, an unknown tag, a length
 * or count beyond the input, an overlong or oversized varint, an integer that
 * no double represents exactly (the writer never produces one), a nil or NaN
 * key, missing items and trailing bytes; DP_EDEPTH for more than
 * DP_CODEC_MAX_DEPTH nested tables; DP_EVERSION for a higher version.
 *
 * Both sides keep a small stack of the open tables (items still owed, and
 * where the keys begin) so that they know whether an item is a key and when
 * the value is complete without recursion.
 */
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dogpile.h"

#define MAGIC 0xC1

enum { TAG_NIL, TAG_FALSE, TAG_TRUE, TAG_INT, TAG_DOUBLE, TAG_STRING, TAG_TABLE };

#define VARINT_MAX 10

/* -- Numbers ------------------------------------------------------------- */

/* Whether `d` is written as an integer, and which. -0.0 and NaN are not;
 * 2^63 is the first double beyond int64. */
static int double_to_int(double d, int64_t *out)
{
    if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0))
        return 0;
    int64_t i = (int64_t)d;
    if ((double)i != d || (i == 0 && signbit(d)))
        return 0;
    *out = i;
    return 1;
}

static uint64_t zigzag(int64_t i)
{
    uint64_t u = (uint64_t)i;
    return (u << 1) ^ (0 - (u >> 63));
}

static int64_t unzigzag(uint64_t z)
{
    uint64_t u = (z >> 1) ^ (0 - (z & 1));
    int64_t i;
    memcpy(&i, &u, sizeof i);
    return i;
}

/* -- Writer -------------------------------------------------------------- */

static void *default_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    (void)ud;
    (void)osize;
    if (nsize == 0) {
        free(ptr);
        return NULL;
    }
    return realloc(ptr, nsize);
}

static int buf_fail(dp_buf *b, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->errstr, sizeof b->errstr, fmt, ap);
    va_end(ap);
    b->err = status;
    return status;
}

DP_API void dp_buf_init(dp_buf *b, dp_alloc_fn alloc, void *ud)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->alloc = alloc ? alloc : default_alloc;
    b->ud = ud;
    dp_buf_reset(b);
}

DP_API void dp_buf_reset(dp_buf *b)
{
    b->len = 0;
    b->err = DP_OK;
    b->errstr[0] = '\0';
    b->depth = 0;
    b->done = 0;
}

DP_API void dp_buf_free(dp_buf *b)
{
    if (b->data)
        b->alloc(b->ud, b->data, b->cap, 0);
    b->data = NULL;
    b->cap = 0;
    dp_buf_reset(b);
}

/* Room for `n` more bytes, growing by half again (at least 64 bytes) so that
 * a value written in small pieces costs amortised O(1) per byte. */
static int reserve(dp_buf *b, size_t n)
{
    if (b->cap - b->len >= n)
        return DP_OK;
    if (n > SIZE_MAX / 2 || b->len > SIZE_MAX / 2 - n)
        return buf_fail(b, DP_ENOMEM, "out of memory: the encoding would exceed the address space");
    size_t need = b->len + n, cap = b->cap + b->cap / 2;
    if (cap < need)
        cap = need;
    if (cap < 64)
        cap = 64;
    unsigned char *p = b->alloc(b->ud, b->data, b->cap, cap);
    if (!p)
        return buf_fail(b, DP_ENOMEM, "out of memory: growing the encoding to %zu bytes", cap);
    b->data = p;
    b->cap = cap;
    return DP_OK;
}

static void put_byte(dp_buf *b, unsigned c)
{
    b->data[b->len++] = (unsigned char)c;
}

static void put_varint(dp_buf *b, uint64_t v)
{
    while (v >= 0x80) {
        put_byte(b, (unsigned)(v & 0x7f) | 0x80);
        v >>= 7;
    }
    put_byte(b, (unsigned)v);
}

/* Checks that one more item fits the value's shape, reserves `extra` bytes
 * for it beyond the tag (and the header before the first item), and counts
 * it against the open table. Nothing is written when it fails. `bad_key`
 * names what the item would be refused as a key ("nil", "NaN"), or NULL. */
static int begin_item(dp_buf *b, const char *bad_key, size_t extra)
{
    if (b->err)
        return b->err;
    if (b->done)
        return buf_fail(b, DP_EINVAL, "the value is complete: no item may follow its root");
    if (b->depth > 0) {
        uint64_t left = b->left[b->depth - 1];
        int is_key = left <= b->keyed[b->depth - 1] && left % 2 == 0;
        if (is_key && bad_key)
            return buf_fail(b, DP_EINVAL, "a table key cannot be %s (table at depth %d)",
                            bad_key, b->depth);
    }
    if (extra > SIZE_MAX - 3 || reserve(b, extra + 3) != DP_OK)
        return b->err ? b->err : buf_fail(b, DP_ENOMEM, "out of memory");
    if (b->len == 0) {
        put_byte(b, MAGIC);
        put_byte(b, DP_CODEC_VERSION);
    }
    if (b->depth > 0)
        b->left[b->depth - 1]--;
    return DP_OK;
}

/* After an item without children: close every table that got its last item. */
static int end_item(dp_buf *b)
{
    while (b->depth > 0 && b->left[b->depth - 1] == 0)
        b->depth--;
    if (b->depth == 0)
        b->done = 1;
    return DP_OK;
}

DP_API int dp_buf_put_nil(dp_buf *b)
{
    int rc = begin_item(b, "nil", 0);
    if (rc)
        return rc;
    put_byte(b, TAG_NIL);
    return end_item(b);
}

DP_API int dp_buf_put_boolean(dp_buf *b, int value)
{
    int rc = begin_item(b, NULL, 0);
    if (rc)
        return rc;
    put_byte(b, value ? TAG_TRUE : TAG_FALSE);
    return end_item(b);
}

DP_API int dp_buf_put_number(dp_buf *b, double value)
{
    int rc = begin_item(b, value != value ? "NaN" : NULL, 10);
    if (rc)
        return rc;
    int64_t i;
    if (double_to_int(value, &i)) {
        put_byte(b, TAG_INT);
        put_varint(b, zigzag(i));
    } else {
        uint64_t bits;
        memcpy(&bits, &value, sizeof bits);
        put_byte(b, TAG_DOUBLE);
        for (int k = 0; k < 8; k++)
            put_byte(b, (unsigned)(bits >> (8 * k)) & 0xff);
    }
    return end_item(b);
}

DP_API int dp_buf_put_string(dp_buf *b, const void *s, size_t len)
{
    if (b->err)
        return b->err;
    if (len > SIZE_MAX - VARINT_MAX)
        return buf_fail(b, DP_ENOMEM, "out of memory: a string of %zu bytes", len);
    int rc = begin_item(b, NULL, VARINT_MAX + len);
    if (rc)
        return rc;
    put_byte(b, TAG_STRING);
    put_varint(b, len);
    if (len)
        memcpy(b->data + b->len, s, len);
    b->len += len;
    return end_item(b);
}

DP_API int dp_buf_put_table(dp_buf *b, size_t narr, size_t nhash)
{
    if (b->err)
        return b->err;
    if (b->depth >= DP_CODEC_MAX_DEPTH && !b->done)
        return buf_fail(b, DP_EDEPTH, "tables nested deeper than %d levels",
                        DP_CODEC_MAX_DEPTH);
    if ((uint64_t)nhash > (UINT64_MAX - (uint64_t)narr) / 2)
        return buf_fail(b, DP_EINVAL, "a table of %zu + %zu items is too large", narr, nhash);
    int rc = begin_item(b, NULL, 2 * VARINT_MAX);
    if (rc)
        return rc;
    put_byte(b, TAG_TABLE);
    put_varint(b, narr);
    put_varint(b, nhash);
    uint64_t items = (uint64_t)narr + 2 * (uint64_t)nhash;
    if (items == 0)
        return end_item(b);
    b->left[b->depth] = items;
    b->keyed[b->depth] = 2 * (uint64_t)nhash;
    b->depth++;
    return DP_OK;
}

DP_API int dp_buf_finish(dp_buf *b)
{
    if (b->err)
        return b->err;
    if (b->done)
        return DP_OK;
    if (b->depth == 0)
        return buf_fail(b, DP_EINVAL, "incomplete value: nothing was put");
    return buf_fail(b, DP_EINVAL, "incomplete value: %d table(s) open, the innermost owes %" PRIu64 " item(s)",
                    b->depth, b->left[b->depth - 1]);
}

/* -- Reader -------------------------------------------------------------- */

static int rd_fail(dp_reader *r, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->errstr, sizeof r->errstr, fmt, ap);
    va_end(ap);
    r->err = status;
    return status;
}

DP_API int dp_reader_init(dp_reader *r, const void *data, size_t len)
{
    r->data = data;
    r->len = len;
    r->pos = 0;
    r->err = DP_OK;
    r->errstr[0] = '\0';
    r->depth = 0;
    r->done = 0;
    r->pending = 0;
    if (len < 2)
        return rd_fail(r, DP_EDECODE, "truncated: %zu byte(s), shorter than the 2-byte header", len);
    if (r->data[0] != MAGIC)
        return rd_fail(r, DP_EDECODE, "not a dogpile encoding: first byte 0x%02x, expected 0x%02x",
                       r->data[0], MAGIC);
    if (r->data[1] > DP_CODEC_VERSION)
        return rd_fail(r, DP_EVERSION, "format version %u is newer than this library's %d",
                       r->data[1], DP_CODEC_VERSION);
    if (r->data[1] == 0)
        return rd_fail(r, DP_EDECODE, "not a dogpile encoding: format version 0");
    r->pos = 2;
    return DP_OK;
}

/* The bytes that the current item may still use: what remains, less one
 * byte for each item the open tables still owe. */
static size_t spare(const dp_reader *r)
{
    return r->len - r->pos - (size_t)r->pending;
}

static int get_varint_long(dp_reader *r, uint64_t *out, const char *what);

/* One byte is the common case (lengths and counts below 128, small
 * integers): read inline; anything longer is get_varint_long's to check. */
static inline int get_varint(dp_reader *r, uint64_t *out, const char *what)
{
    if (r->pos < r->len && r->data[r->pos] < 0x80) {
        *out = r->data[r->pos++];
        return DP_OK;
    }
    return get_varint_long(r, out, what);
}

static int get_varint_long(dp_reader *r, uint64_t *out, const char *what)
{
    size_t at = r->pos;
    uint64_t v = 0;
    for (int k = 0; k < VARINT_MAX; k++) {
        if (r->pos >= r->len)
            return rd_fail(r, DP_EDECODE, "truncated: %s at offset %zu runs past the end", what, at);
        unsigned c = r->data[r->pos++];
        if (k == VARINT_MAX - 1 && c > 1)
            return rd_fail(r, DP_EDECODE, "corrupt: %s at offset %zu exceeds 64 bits", what, at);
        v |= (uint64_t)(c & 0x7f) << (7 * k);
        if (!(c & 0x80)) {
            if (c == 0 && k > 0)
                return rd_fail(r, DP_EDECODE, "corrupt: %s at offset %zu is overlong", what, at);
            *out = v;
            return DP_OK;
        }
    }
    return rd_fail(r, DP_EDECODE, "corrupt: %s at offset %zu is longer than %d bytes",
                   what, at, VARINT_MAX);
}

/* Whether the rest of the input can still hold the items owed. */
static int check_owed(dp_reader *r, size_t at)
{
    if (r->pending > r->len - r->pos)
        return rd_fail(r, DP_EDECODE,
                       "truncated: %" PRIu64 " item(s) still owed after offset %zu, %zu byte(s) left",
                       r->pending, at, r->len - r->pos);
    return DP_OK;
}

DP_API int dp_reader_next(dp_reader *r, dp_item *it)
{
    if (r->err)
        return r->err;
    if (r->done)
        return rd_fail(r, DP_EINVAL, "the value was read completely already");
    if (r->pos < 2)
        return rd_fail(r, DP_EINVAL, "the reader was not initialised");
    size_t at = r->pos;
    memset(it, 0, sizeof *it);
    if (r->depth > 0) {
        uint64_t left = r->left[r->depth - 1];
        it->key = left <= r->keyed[r->depth - 1] && left % 2 == 0;
        r->left[r->depth - 1]--;
        r->pending--;
    }
    if (at >= r->len)
        return rd_fail(r, DP_EDECODE, "truncated: an item expected at offset %zu", at);
    unsigned tag = r->data[r->pos++];
    uint64_t v;
    switch (tag) {
    case TAG_NIL:
        if (it->key)
            return rd_fail(r, DP_EDECODE, "corrupt: a nil table key at offset %zu", at);
        it->type = DP_TNIL;
        break;
    case TAG_FALSE:
    case TAG_TRUE:
        it->type = DP_TBOOLEAN;
        it->boolean = tag == TAG_TRUE;
        break;
    case TAG_INT: {
        if (get_varint(r, &v, "an integer") != DP_OK)
            return r->err;
        int64_t i = unzigzag(v);
        double d = (double)i;
        /* Beyond 2^53 the writer only writes integers that a double holds
         * exactly; anything else was not written by it. */
        if (d >= 9223372036854775808.0 || (int64_t)d != i)
            return rd_fail(r, DP_EDECODE, "corrupt: integer %" PRId64 " at offset %zu is not exactly a double",
                           i, at);
        it->type = DP_TNUMBER;
        it->number = d;
        break;
    }
    case TAG_DOUBLE: {
        if (r->len - r->pos < 8)
            return rd_fail(r, DP_EDECODE, "truncated: a double at offset %zu needs 8 bytes, %zu left",
                           at, r->len - r->pos);
        uint64_t bits = 0;
        for (int k = 0; k < 8; k++)
            bits |= (uint64_t)r->data[r->pos + k] << (8 * k);
        r->pos += 8;
        it->type = DP_TNUMBER;
        memcpy(&it->number, &bits, sizeof bits);
        if (it->key && it->number != it->number)
            return rd_fail(r, DP_EDECODE, "corrupt: a NaN table key at offset %zu", at);
        break;
    }
    case TAG_STRING:
        if (get_varint(r, &v, "a string length") != DP_OK)
            return r->err;
        if (v > r->len - r->pos)
            return rd_fail(r, DP_EDECODE, "truncated: a string of %" PRIu64 " bytes at offset %zu, %zu byte(s) left",
                           v, at, r->len - r->pos);
        it->type = DP_TSTRING;
        it->str = (const char *)r->data + r->pos;
        it->len = (size_t)v;
        r->pos += (size_t)v;
        break;
    case TAG_TABLE: {
        if (r->depth >= DP_CODEC_MAX_DEPTH)
            return rd_fail(r, DP_EDEPTH, "tables nested deeper than %d levels at offset %zu",
                           DP_CODEC_MAX_DEPTH, at);
        uint64_t narr, nhash;
        if (get_varint(r, &narr, "a table's array count") != DP_OK ||
            get_varint(r, &nhash, "a table's hash count") != DP_OK)
            return r->err;
        if (r->pending > r->len - r->pos)
            return check_owed(r, at);
        /* Each item takes at least one byte: a count that the rest of the
         * input cannot hold is refused before anyone allocates for it. */
        uint64_t room = spare(r);
        if (narr > room || nhash > (room - narr) / 2)
            return rd_fail(r, DP_EDECODE,
                           "truncated or corrupt: a table at offset %zu declares %" PRIu64 " + %" PRIu64 " items, room for %" PRIu64,
                           at, narr, nhash, room);
        it->type = DP_TTABLE;
        it->narr = (size_t)narr;
        it->nhash = (size_t)nhash;
        uint64_t items = narr + 2 * nhash;
        if (items > 0) {
            r->left[r->depth] = items;
            r->keyed[r->depth] = 2 * nhash;
            r->depth++;
            r->pending += items;
            return DP_OK;
        }
        break;
    }
    default:
        return rd_fail(r, DP_EDECODE, "corrupt: unknown tag 0x%02x at offset %zu", tag, at);
    }
    if (check_owed(r, at) != DP_OK)
        return r->err;
    while (r->depth > 0 && r->left[r->depth - 1] == 0)
        r->depth--;
    if (r->depth == 0)
        r->done = 1;
    return DP_OK;
}

DP_API int dp_reader_finish(dp_reader *r)
{
    if (r->err)
        return r->err;
    if (!r->done)
        return rd_fail(r, DP_EDECODE, "truncated: the value is incomplete at offset %zu", r->pos);
    if (r->pos != r->len)
        return rd_fail(r, DP_EDECODE, "corrupt: %zu trailing byte(s) after the value at offset %zu",
                       r->len - r->pos, r->pos);
    return DP_OK;
}
