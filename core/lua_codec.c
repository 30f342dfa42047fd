/* lua_codec.c -- the `dogpile.codec` Lua C module: Lua values to the bytes of
 * core/codec.c and back.
 *
 * It is the cold-ish path (a set into a byte-storing backend, a hit read from
 * one), so it uses the classic Lua C API. encode() raises, naming the path of
 * what it refused; decode() treats its input as untrusted and answers
 * nil, err for anything but a valid encoding.
 *
 * The encoder writes into a dp_buf kept in a userdata whose __gc frees the
 * buffer, so that a Lua error thrown in the middle (ours or an out of memory
 * from Lua) longjmps past this code without leaking it. The buffer allocates
 * through the state's own allocator (dp_alloc_fn has lua_Alloc's contract):
 * a host that limits or instruments Lua's memory sees the codec's too.
 *
 * It writes the bytes of core/codec.c itself rather than through
 * dp_buf_put_*: those check, item by item, that the items fit the shape the
 * caller declared, and want a table's counts before its items, which cost a
 * second traversal of every table. Here the shape comes from the Lua value
 * itself, so it holds by construction, and a table is traversed once: its
 * counts are written after its items, in the one byte each that almost
 * every table needs, the items moved along in the rare case that a count
 * takes more. The bytes are those dp_buf_put_* write (spec/codec_spec.lua
 * compares them).
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "dogpile.h"

#define PREFIX "dogpile.codec: "
#define BUF_MT "dogpile.codec.buf"

/* Longest part of a string key quoted in an error path. */
#define KEY_QUOTE_MAX 40

/* Preallocation hint cap: LuaJIT raises "table overflow" for larger sizes,
 * and a hint never needs to be exact. */
#define PREALLOC_MAX (1 << 24)

int luaopen_dogpile_codec(lua_State *L);

/* -- Error paths --------------------------------------------------------- */

/* How the encoder went from one open table to the next item: the value at
 * array index n, the value at the key at stack slot idx, or into that key
 * itself (a table used as a key). */
enum { SEG_INDEX, SEG_KEY, SEG_INKEY };

typedef struct seg {
    int kind;
    int idx;
    lua_Number n;
} seg;

typedef struct enc {
    lua_State *L;
    dp_buf *b;
    int depth;                                /* tables open */
    const void *open[DP_CODEC_MAX_DEPTH];     /* those tables, for cycles */
    seg path[DP_CODEC_MAX_DEPTH];             /* path[i]: the step out of open[i] */
} enc;

static int is_keyword(const char *s, size_t len)
{
    static const char *const kw[] = {
        "and", "break", "do", "else", "elseif", "end", "false", "for",
        "function", "goto", "if", "in", "local", "nil", "not", "or",
        "repeat", "return", "then", "true", "until", "while", NULL};
    for (int i = 0; kw[i]; i++)
        if (strlen(kw[i]) == len && memcmp(kw[i], s, len) == 0)
            return 1;
    return 0;
}

static int is_identifier(const char *s, size_t len)
{
    if (len == 0 || len > KEY_QUOTE_MAX)
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        int ok = c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                 (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            return 0;
    }
    return !is_keyword(s, len);
}

static void add_number(luaL_Buffer *lb, lua_Number n)
{
    char tmp[64];
    if (n == floor(n) && fabs(n) < 9223372036854775808.0)
        snprintf(tmp, sizeof tmp, "%lld", (long long)n);
    else if (isinf(n))
        snprintf(tmp, sizeof tmp, "%smath.huge", n < 0 ? "-" : "");
    else
        snprintf(tmp, sizeof tmp, "%.17g", n);
    luaL_addstring(lb, tmp);
}

/* One step of a path: .name, ["any bytes"], [12], [true], [table: 0x...],
 * or <key table: 0x...> for the inside of a table used as a key. The stack
 * slots named by the path are only read: lua_tolstring is applied to
 * strings alone, so lua_next's keys stay untouched. */
static void add_step(lua_State *L, luaL_Buffer *lb, const seg *s)
{
    char tmp[64];
    if (s->kind == SEG_INDEX) {
        luaL_addchar(lb, '[');
        add_number(lb, s->n);
        luaL_addchar(lb, ']');
        return;
    }
    if (s->kind == SEG_INKEY) {
        snprintf(tmp, sizeof tmp, "<key table: %p>", lua_topointer(L, s->idx));
        luaL_addstring(lb, tmp);
        return;
    }
    switch (lua_type(L, s->idx)) {
    case LUA_TSTRING: {
        size_t len;
        const char *k = lua_tolstring(L, s->idx, &len);
        if (is_identifier(k, len)) {
            luaL_addchar(lb, '.');
            luaL_addlstring(lb, k, len);
            return;
        }
        luaL_addstring(lb, "[\"");
        for (size_t i = 0; i < len && i < KEY_QUOTE_MAX; i++) {
            unsigned char c = (unsigned char)k[i];
            if (c == '"' || c == '\\') {
                luaL_addchar(lb, '\\');
                luaL_addchar(lb, (char)c);
            } else if (c < 0x20 || c >= 0x7f) {
                snprintf(tmp, sizeof tmp, "\\%u", c);
                luaL_addstring(lb, tmp);
            } else {
                luaL_addchar(lb, (char)c);
            }
        }
        luaL_addstring(lb, len > KEY_QUOTE_MAX ? "\"...]" : "\"]");
        return;
    }
    case LUA_TNUMBER:
        luaL_addchar(lb, '[');
        add_number(lb, lua_tonumber(L, s->idx));
        luaL_addchar(lb, ']');
        return;
    case LUA_TBOOLEAN:
        luaL_addstring(lb, lua_toboolean(L, s->idx) ? "[true]" : "[false]");
        return;
    default:
        snprintf(tmp, sizeof tmp, "[%s: %p]", luaL_typename(L, s->idx),
                 lua_topointer(L, s->idx));
        luaL_addstring(lb, tmp);
        return;
    }
}

/* Raise "dogpile.codec: value<first nsteps steps>: what". */
static int raise_at(enc *e, int nsteps, const char *what)
{
    lua_State *L = e->L;
    luaL_Buffer lb;
    /* luaL_Buffer pushes a few slots; without them the error itself would
     * overflow the stack. */
    if (!lua_checkstack(L, LUA_MINSTACK))
        return luaL_error(L, PREFIX "%s (path too deep to show)", what);
    luaL_buffinit(L, &lb);
    luaL_addstring(&lb, PREFIX "value");
    for (int i = 0; i < nsteps; i++)
        add_step(L, &lb, &e->path[i]);
    luaL_addstring(&lb, ": ");
    luaL_addstring(&lb, what);
    luaL_pushresult(&lb);
    return lua_error(L);
}

/* -- Encoding ------------------------------------------------------------ */

static void encode_value(enc *e, int idx);

/* -- Writing the bytes ---------------------------------------------------- */

/* Room for `n` more bytes: as dp_buf grows (by half again, at least 64). */
static unsigned char *room(enc *e, size_t n)
{
    dp_buf *b = e->b;
    if (b->cap - b->len >= n)
        return b->data + b->len;
    if (n > SIZE_MAX / 2 || b->len > SIZE_MAX / 2 - n)
        raise_at(e, e->depth, "out of memory: the encoding would exceed the address space");
    size_t need = b->len + n, cap = b->cap + b->cap / 2;
    if (cap < need)
        cap = need;
    if (cap < 64)
        cap = 64;
    unsigned char *p = b->alloc(b->ud, b->data, b->cap, cap);
    if (!p) {
        char what[96];
        snprintf(what, sizeof what, "out of memory: growing the encoding to %zu bytes", cap);
        raise_at(e, e->depth, what);
    }
    b->data = p;
    b->cap = cap;
    return p + b->len;
}

#define VARINT_MAX 10
enum { TAG_NIL, TAG_FALSE, TAG_TRUE, TAG_INT, TAG_DOUBLE, TAG_STRING, TAG_TABLE };

static size_t put_varint(unsigned char *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (unsigned char)((v & 0x7f) | 0x80);
        v >>= 7;
    }
    p[n++] = (unsigned char)v;
    return n;
}

static size_t varint_len(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* As codec.c: an integral double in [-2^63, 2^63), but -0.0, is written as a
 * zigzag varint; every other number as its 8 bytes, little-endian. */
static void put_number(enc *e, double d)
{
    unsigned char *p = room(e, 1 + VARINT_MAX);
    if (d >= -9223372036854775808.0 && d < 9223372036854775808.0) {
        int64_t i = (int64_t)d;
        if ((double)i == d && !(i == 0 && signbit(d))) {
            uint64_t u = (uint64_t)i;
            p[0] = TAG_INT;
            e->b->len += 1 + put_varint(p + 1, (u << 1) ^ (0 - (u >> 63)));
            return;
        }
    }
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    p[0] = TAG_DOUBLE;
    for (int k = 0; k < 8; k++)
        p[1 + k] = (unsigned char)(bits >> (8 * k));
    e->b->len += 9;
}

static void put_string(enc *e, const char *s, size_t len)
{
    if (len > SIZE_MAX - 1 - VARINT_MAX)
        raise_at(e, e->depth, "out of memory: a string too large to encode");
    unsigned char *p = room(e, 1 + VARINT_MAX + len);
    p[0] = TAG_STRING;
    size_t n = 1 + put_varint(p + 1, len);
    if (len)
        memcpy(p + n, s, len);
    e->b->len += n + len;
}

/* -- Encoding ------------------------------------------------------------ */

static int is_array_key(lua_State *L, int idx, size_t narr)
{
    if (lua_type(L, idx) != LUA_TNUMBER)
        return 0;
    lua_Number k = lua_tonumber(L, idx);
    return k >= 1 && k <= (lua_Number)narr && k == floor(k);
}

/* A table: its array part is 1..n up to the first nil, everything else goes
 * in the hash part, so sparse arrays round-trip exactly. One traversal: the
 * counts are written after the items (see the top of this file). */
static void encode_table(enc *e, int t)
{
    lua_State *L = e->L;
    const void *p = lua_topointer(L, t);
    for (int i = 0; i < e->depth; i++)
        if (e->open[i] == p)
            raise_at(e, e->depth, "cannot serialize a cycle (this table contains itself)");
    if (e->depth >= DP_CODEC_MAX_DEPTH) {
        char what[64];
        snprintf(what, sizeof what, "tables nested deeper than %d levels", DP_CODEC_MAX_DEPTH);
        raise_at(e, e->depth, what);
    }
    if (!lua_checkstack(L, 8))
        raise_at(e, e->depth, "Lua stack exhausted");

    /* The tag, and a byte for each count: the common case. */
    dp_buf *b = e->b;
    unsigned char *h = room(e, 3);
    h[0] = TAG_TABLE;
    size_t counts = b->len + 1;
    b->len += 3;

    e->open[e->depth] = p;
    seg *step = &e->path[e->depth];
    e->depth++;

    size_t narr = 0;
    for (;;) {
        if (narr >= INT_MAX)
            break;
        lua_rawgeti(L, t, (int)narr + 1);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            break;
        }
        narr++;
        step->kind = SEG_INDEX;
        step->n = (lua_Number)narr;
        encode_value(e, lua_gettop(L));
        lua_pop(L, 1);
    }
    size_t nhash = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        int k = lua_gettop(L) - 1, v = k + 1;
        if (is_array_key(L, k, narr)) {
            lua_pop(L, 1);
            continue;
        }
        nhash++;
        /* While the key itself is written, the path names it: a table key
         * as <key table: 0x...>, a plain key as the step it leads to. */
        step->idx = k;
        switch (lua_type(L, k)) {
        case LUA_TBOOLEAN:
        case LUA_TNUMBER:
        case LUA_TSTRING:
            step->kind = SEG_KEY;
            break;
        case LUA_TTABLE:
            step->kind = SEG_INKEY;
            break;
        default: {
            char what[96];
            snprintf(what, sizeof what, "cannot serialize a %s (used as a key)",
                     luaL_typename(L, k));
            raise_at(e, e->depth - 1, what);
        }
        }
        encode_value(e, k);
        step->kind = SEG_KEY;
        encode_value(e, v);
        lua_pop(L, 1);
    }
    e->depth--;

    /* The counts, in the two bytes kept for them, or with the items moved
     * along to make room. */
    size_t need = varint_len(narr) + varint_len(nhash);
    if (need > 2) {
        room(e, need - 2);
        memmove(b->data + counts + need, b->data + counts + 2, b->len - counts - 2);
        b->len += need - 2;
    }
    size_t n = put_varint(b->data + counts, narr);
    put_varint(b->data + counts + n, nhash);
}

static void encode_value(enc *e, int idx)
{
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        *room(e, 1) = TAG_NIL;
        e->b->len++;
        return;
    case LUA_TBOOLEAN:
        *room(e, 1) = lua_toboolean(L, idx) ? TAG_TRUE : TAG_FALSE;
        e->b->len++;
        return;
    case LUA_TNUMBER:
        put_number(e, lua_tonumber(L, idx));
        return;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        put_string(e, s, len);
        return;
    }
    case LUA_TTABLE:
        encode_table(e, idx);
        return;
    default: {
        /* function, userdata (full or light), thread, and LuaJIT's cdata */
        char what[64];
        snprintf(what, sizeof what, "cannot serialize a %s", luaL_typename(L, idx));
        raise_at(e, e->depth, what);
    }
    }
}

static int buf_gc(lua_State *L)
{
    dp_buf_free(lua_touserdata(L, 1));
    return 0;
}

/* Above this, the state's buffer is given back after an encode rather than
 * kept for the next one. */
#define BUF_KEEP_MAX (64 * 1024)

/*** codec.encode(value) -> string. Raises "dogpile.codec: <path>: ..." for a
 * value that cannot be serialized, the path starting at `value`.
 * The buffer is the module's, one per Lua state (upvalue 1), reset on each
 * call: a fresh one was a 4 KiB userdata with a finalizer per encode. Encode
 * never calls back into Lua (raw traversal, no metamethods), so it cannot be
 * reentered; an error leaves the buffer to the next call's reset. */
static int l_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    dp_buf *b = lua_touserdata(L, lua_upvalueindex(1));
    dp_buf_reset(b);

    enc e;
    e.L = L;
    e.b = b;
    e.depth = 0;
    unsigned char *h = room(&e, 2);
    h[0] = 0xC1; /* codec.c's magic */
    h[1] = DP_CODEC_VERSION;
    b->len = 2;
    encode_value(&e, 1);
    lua_pushlstring(L, (const char *)b->data, b->len);
    if (b->cap > BUF_KEEP_MAX) {
        dp_alloc_fn alloc = b->alloc;
        void *ud = b->ud;
        dp_buf_free(b);
        dp_buf_init(b, alloc, ud);
    }
    return 1;
}

/* -- Decoding ------------------------------------------------------------ */

typedef struct dec {
    lua_State *L;
    dp_reader r;
    const char *err; /* a failure of ours, not of the reader */
} dec;

/* Pushes one item (a whole table with its contents). DP_OK or a status,
 * with the reason in d->r.errstr or d->err. */
static int decode_value(dec *d)
{
    lua_State *L = d->L;
    dp_item it;
    int rc = dp_reader_next(&d->r, &it);
    if (rc != DP_OK)
        return rc;
    switch (it.type) {
    case DP_TNIL:
        lua_pushnil(L);
        return DP_OK;
    case DP_TBOOLEAN:
        lua_pushboolean(L, it.boolean);
        return DP_OK;
    case DP_TNUMBER:
        lua_pushnumber(L, it.number);
        return DP_OK;
    case DP_TSTRING:
        lua_pushlstring(L, it.str, it.len);
        return DP_OK;
    default:
        break;
    }
    /* A table: the reader has checked that its counts fit in the input. */
    if (!lua_checkstack(L, 4)) {
        d->err = "Lua stack exhausted by nested tables";
        return DP_EDEPTH;
    }
    if (it.narr > INT_MAX) {
        d->err = "an array part larger than Lua allows";
        return DP_EDECODE;
    }
    lua_createtable(L, it.narr > PREALLOC_MAX ? PREALLOC_MAX : (int)it.narr,
                    it.nhash > PREALLOC_MAX ? PREALLOC_MAX : (int)it.nhash);
    for (size_t i = 1; i <= it.narr; i++) {
        if ((rc = decode_value(d)) != DP_OK)
            return rc;
        lua_rawseti(L, -2, (int)i);
    }
    for (size_t i = 0; i < it.nhash; i++) {
        /* The reader refuses nil and NaN keys, so rawset cannot raise. */
        if ((rc = decode_value(d)) != DP_OK || (rc = decode_value(d)) != DP_OK)
            return rc;
        lua_rawset(L, -3);
    }
    return DP_OK;
}

/*** codec.decode(bytes) -> value, or nil, err when the bytes are not a valid
 * encoding (truncated, corrupted, foreign, nested too deeply, or from a newer
 * format version). Raises only when `bytes` is not a string. */
static int l_decode(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_settop(L, 1);
    dec d;
    d.L = L;
    d.err = NULL;
    int rc = dp_reader_init(&d.r, s, len);
    if (rc == DP_OK)
        rc = decode_value(&d);
    if (rc == DP_OK)
        rc = dp_reader_finish(&d.r);
    if (rc == DP_OK)
        return 1;
    lua_settop(L, 1);
    lua_pushnil(L);
    lua_pushfstring(L, PREFIX "%s", d.err ? d.err : d.r.errstr);
    return 2;
}

/* -- Module -------------------------------------------------------------- */

__attribute__((visibility("default"))) int luaopen_dogpile_codec(lua_State *L)
{
    luaL_newmetatable(L, BUF_MT);
    lua_pushcfunction(L, buf_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    lua_createtable(L, 0, 5);
    void *ud;
    lua_Alloc alloc = lua_getallocf(L, &ud);
    dp_buf *b = lua_newuserdata(L, sizeof *b);
    dp_buf_init(b, alloc, ud);
    luaL_getmetatable(L, BUF_MT);
    lua_setmetatable(L, -2);
    lua_pushcclosure(L, l_encode, 1);
    lua_setfield(L, -2, "encode");
    lua_pushcfunction(L, l_decode);
    lua_setfield(L, -2, "decode");
    lua_pushinteger(L, DP_CODEC_MAX_DEPTH);
    lua_setfield(L, -2, "MAX_DEPTH");
    lua_pushinteger(L, DP_CODEC_VERSION);
    lua_setfield(L, -2, "FORMAT_VERSION");
    lua_pushstring(L, dp_version());
    lua_setfield(L, -2, "_VERSION");
    return 1;
}
