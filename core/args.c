/* args.c -- a backend's declared arguments: one reader for every backend.
 *
 * A backend describes what it accepts in a table of dp_arg_spec (the pattern
 * of nginx's ngx_command_t): kind, bounds, default, where the value goes.
 * This file reads a region's arguments into the backend's settings struct by
 * that table, writes every message in one format, and compares two settings
 * for the instance registry's mismatch error. Everything here is cold.
 */
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dogpile.h"
#include "private.h"

/* -- Fields ----------------------------------------------------------------- */

static void *field(void *settings, const dp_arg_spec *s)
{
    return (char *)settings + s->offset;
}

static const void *cfield(const void *settings, const dp_arg_spec *s)
{
    return (const char *)settings + s->offset;
}

static size_t nchoices(const dp_arg_spec *s)
{
    size_t n = 0;
    while (s->choices && s->choices[n])
        n++;
    return n;
}

/* -- Messages ----------------------------------------------------------------
 * "<backend>: <name> must be <what>, got <value>": <what> is the spec's own
 * text or one written from its kind and bounds, <value> the argument as Lua
 * would show it (strings quoted, cut at 40 bytes). */

static int append(char *out, size_t cap, size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int append(char *out, size_t cap, size_t *len, const char *fmt, ...)
{
    if (*len >= cap)
        return 0;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out + *len, cap - *len, fmt, ap);
    va_end(ap);
    if (n > 0)
        *len = *len + (size_t)n < cap ? *len + (size_t)n : cap - 1;
    return n;
}

/* A number as Lua's %.14g shows it, but exact: the shortest of %.15g..%.17g
 * that reads back the same. */
static void number_text(double v, char *out, size_t cap)
{
    if (isnan(v)) {
        snprintf(out, cap, "nan");
        return;
    }
    if (isinf(v)) {
        snprintf(out, cap, v > 0 ? "math.huge" : "-math.huge");
        return;
    }
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(out, cap, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            return;
    }
}

static void string_text(const char *s, size_t len, char *out, size_t cap)
{
    size_t n = 0, shown = len > 40 ? 40 : len;
    append(out, cap, &n, "\"");
    for (size_t i = 0; i < shown; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            append(out, cap, &n, "\\%c", c);
        else if (c < 32 || c >= 127)
            append(out, cap, &n, "\\%u", c);
        else
            append(out, cap, &n, "%c", c);
    }
    append(out, cap, &n, len > shown ? "\"..." : "\"");
}

static void arg_text(const dp_arg *a, char *out, size_t cap)
{
    char num[40];
    switch (a->type) {
    case DP_ARG_BOOLEAN:
        snprintf(out, cap, "%s", a->number != 0 ? "true" : "false");
        break;
    case DP_ARG_NUMBER:
        number_text(a->number, num, sizeof num);
        snprintf(out, cap, "%s", num);
        break;
    case DP_ARG_STRING: {
        char str[200];
        string_text(a->string ? a->string : "", a->string ? a->len : 0, str, sizeof str);
        snprintf(out, cap, "string %s", str);
        break;
    }
    default:
        snprintf(out, cap, "an argument of unknown type %d", a->type);
    }
}

/* What an argument of spec `s` must be, written from its kind and bounds. */
static void what_text(const dp_arg_spec *s, char *out, size_t cap)
{
    size_t n = 0;
    char lo[40], hi[40];
    number_text(s->min, lo, sizeof lo);
    number_text(s->max, hi, sizeof hi);
    int above = (s->flags & DP_SPEC_ABOVE_MIN) != 0;
    if (s->what) {
        append(out, cap, &n, "%s", s->what);
        return;
    }
    switch (s->kind) {
    case DP_SPEC_INT:
        if (s->max != 0)
            append(out, cap, &n, "an integer from %s to %s", lo, hi);
        else if ((s->min == 1 && !above) || (s->min == 0 && above))
            append(out, cap, &n, "a positive integer");
        else if (s->min == 0)
            append(out, cap, &n, "a non-negative integer");
        else
            append(out, cap, &n, "an integer %s %s", above ? ">" : ">=", lo);
        break;
    case DP_SPEC_SECONDS:
        if (s->min == 0 && above)
            append(out, cap, &n, "a positive number of seconds");
        else
            append(out, cap, &n, "a number of seconds %s %s", above ? ">" : ">=", lo);
        if (s->max != 0)
            append(out, cap, &n, " and <= %s", hi);
        if (s->flags & DP_SPEC_INFINITE)
            append(out, cap, &n, " (math.huge: no limit)");
        break;
    case DP_SPEC_SIZE:
        if (s->min == 0 && above)
            append(out, cap, &n, "a positive number of bytes");
        else
            append(out, cap, &n, "a number of bytes %s %s", above ? ">" : ">=", lo);
        if (s->max != 0)
            append(out, cap, &n, " and <= %s", hi);
        append(out, cap, &n, " or a size such as \"64m\"");
        break;
    case DP_SPEC_BOOL:
        append(out, cap, &n, "a boolean");
        break;
    case DP_SPEC_STR:
    case DP_SPEC_BYTES:
        if (s->min >= 1)
            append(out, cap, &n, "a non-empty string");
        else
            append(out, cap, &n, "a string");
        if (s->max != 0)
            append(out, cap, &n, " of at most %s bytes", hi);
        break;
    case DP_SPEC_ENUM: {
        size_t k = nchoices(s);
        if (k > 2)
            append(out, cap, &n, "one of ");
        for (size_t i = 0; i < k; i++)
            append(out, cap, &n, "%s\"%s\"", i == 0 ? "" : k == 2 ? " or " : ", ",
                   s->choices[i]);
        break;
    }
    default:
        append(out, cap, &n, "valid");
    }
}

static int refuse(const char *backend, const dp_arg_spec *s, const dp_arg *a, dp_err *err)
{
    char what[200], got[240];
    what_text(s, what, sizeof what);
    arg_text(a, got, sizeof got);
    return dp_err_set(err, DP_EINVAL, "%s: %s must be %s, got %s", backend, s->name, what, got);
}

/* -- Reading one argument ---------------------------------------------------- */

static int in_bounds(const dp_arg_spec *s, double v)
{
    if (isnan(v))
        return 0;
    if ((s->flags & DP_SPEC_ABOVE_MIN) ? !(v > s->min) : !(v >= s->min))
        return 0;
    return s->max == 0 || v <= s->max;
}

static int read_one(const char *backend, const dp_arg_spec *s, const dp_arg *a, void *settings,
                    dp_err *err)
{
    void *f = field(settings, s);
    double v;
    switch (s->kind) {
    case DP_SPEC_INT:
        if (a->type != DP_ARG_NUMBER || !isfinite(a->number) || a->number != floor(a->number) ||
            !in_bounds(s, a->number) || fabs(a->number) > 9.007199254740992e15)
            return refuse(backend, s, a, err);
        *(int64_t *)f = (int64_t)a->number;
        return DP_OK;
    case DP_SPEC_SECONDS:
        if (a->type != DP_ARG_NUMBER || isnan(a->number) ||
            (isinf(a->number) && !(a->number > 0 && (s->flags & DP_SPEC_INFINITE))) ||
            (!isinf(a->number) && !in_bounds(s, a->number)))
            return refuse(backend, s, a, err);
        *(double *)f = a->number;
        return DP_OK;
    case DP_SPEC_SIZE:
        if (!dp_arg_size(a, &v) || !isfinite(v) || !in_bounds(s, v) || v > 9.2e18)
            return refuse(backend, s, a, err);
        v = floor(v);
        if (!in_bounds(s, v))
            return refuse(backend, s, a, err);
        *(int64_t *)f = (int64_t)v;
        return DP_OK;
    case DP_SPEC_BOOL:
        if (a->type != DP_ARG_BOOLEAN)
            return refuse(backend, s, a, err);
        *(int *)f = a->number != 0;
        return DP_OK;
    case DP_SPEC_STR: {
        if (a->type != DP_ARG_STRING || (a->len && !a->string) ||
            !in_bounds(s, (double)a->len) || (a->len && memchr(a->string, 0, a->len)))
            return refuse(backend, s, a, err);
        char *copy = malloc(a->len + 1);
        if (!copy)
            return dp_err_set(err, DP_ENOMEM, "%s: out of memory reading %s", backend, s->name);
        if (a->len)
            memcpy(copy, a->string, a->len);
        copy[a->len] = '\0';
        char **slot = f;
        free(*slot);
        *slot = copy;
        return DP_OK;
    }
    case DP_SPEC_BYTES: {
        if (a->type != DP_ARG_STRING || (a->len && !a->string) || !in_bounds(s, (double)a->len))
            return refuse(backend, s, a, err);
        char *copy = malloc(a->len + 1);
        if (!copy)
            return dp_err_set(err, DP_ENOMEM, "%s: out of memory reading %s", backend, s->name);
        if (a->len)
            memcpy(copy, a->string, a->len);
        copy[a->len] = '\0';
        dp_str *str = f;
        free(str->data);
        str->data = copy;
        str->len = a->len;
        return DP_OK;
    }
    case DP_SPEC_ENUM:
        if (a->type == DP_ARG_STRING)
            for (size_t i = 0; s->choices && s->choices[i]; i++)
                if (strlen(s->choices[i]) == a->len && memcmp(s->choices[i], a->string, a->len) == 0) {
                    *(int *)f = (int)i;
                    return DP_OK;
                }
        return refuse(backend, s, a, err);
    case DP_SPEC_CUSTOM: {
        int rc = s->parse(settings, a, err);
        if (rc != DP_OK && err && err->code == DP_OK)
            dp_err_set(err, rc, "%s: %s: %s", backend, s->name, dp_strerror(rc));
        return rc;
    }
    }
    return dp_err_set(err, DP_EINVAL, "%s: %s has an unknown kind %d in the backend's table",
                      backend, s->name, s->kind);
}

static int set_default(const char *backend, const dp_arg_spec *s, void *settings, dp_err *err)
{
    void *f = field(settings, s);
    switch (s->kind) {
    case DP_SPEC_INT:
    case DP_SPEC_SIZE:
        *(int64_t *)f = (int64_t)s->def;
        break;
    case DP_SPEC_SECONDS:
        *(double *)f = s->def;
        break;
    case DP_SPEC_BOOL:
    case DP_SPEC_ENUM:
        *(int *)f = (int)s->def;
        break;
    case DP_SPEC_STR:
        *(char **)f = NULL;
        if (s->def_str && !(*(char **)f = strdup(s->def_str)))
            return dp_err_set(err, DP_ENOMEM, "%s: out of memory reading %s", backend, s->name);
        break;
    case DP_SPEC_BYTES: {
        dp_str *str = f;
        str->data = NULL;
        str->len = 0;
        if (s->def_str) {
            if (!(str->data = strdup(s->def_str)))
                return dp_err_set(err, DP_ENOMEM, "%s: out of memory reading %s", backend,
                                  s->name);
            str->len = strlen(s->def_str);
        }
        break;
    }
    case DP_SPEC_CUSTOM:
        if (!s->parse)
            return dp_err_set(err, DP_EINVAL, "%s: %s is DP_SPEC_CUSTOM without parse()",
                              backend, s->name);
        break; /* the backend zeroed or set its fields itself */
    default:
        return dp_err_set(err, DP_EINVAL, "%s: %s has an unknown kind %d in the backend's table",
                          backend, s->name, s->kind);
    }
    return DP_OK;
}

/* -- The table -------------------------------------------------------------- */

static void known_names(const dp_arg_spec *spec, char *out, size_t cap)
{
    size_t n = 0;
    out[0] = '\0';
    for (const dp_arg_spec *s = spec; s->name; s++)
        append(out, cap, &n, "%s%s", s == spec ? "" : ", ", s->name);
}

DP_API int dp_args_fill(const char *backend, const dp_arg_spec *spec, const dp_arg *args,
                        size_t nargs, void *settings, dp_err *err)
{
    if (err) {
        err->code = DP_OK;
        err->msg[0] = '\0';
    }
    /* Strings start out NULL, so that a failure part-way frees only what
     * this call allocated. */
    for (const dp_arg_spec *s = spec; s->name; s++) {
        if (s->kind == DP_SPEC_STR)
            *(char **)field(settings, s) = NULL;
        else if (s->kind == DP_SPEC_BYTES)
            ((dp_str *)field(settings, s))->data = NULL;
    }
    int rc = DP_OK;
    for (const dp_arg_spec *s = spec; s->name && rc == DP_OK; s++)
        rc = set_default(backend, s, settings, err);
    /* Every argument must be known, and given once. */
    for (size_t i = 0; i < nargs && rc == DP_OK; i++) {
        const dp_arg_spec *s;
        for (s = spec; s->name; s++)
            if (args[i].name && strcmp(s->name, args[i].name) == 0)
                break;
        if (!s->name) {
            char known[600];
            known_names(spec, known, sizeof known);
            rc = dp_err_set(err, DP_EINVAL, "%s: unknown argument '%s' (known: %s)", backend,
                            args[i].name ? args[i].name : "(null)", known);
        }
        for (size_t j = 0; j < i && rc == DP_OK; j++)
            if (strcmp(args[j].name, args[i].name) == 0)
                rc = dp_err_set(err, DP_EINVAL, "%s: argument '%s' given twice", backend,
                                args[i].name);
    }
    /* In table order: a url listed first is overridden by host listed later. */
    for (const dp_arg_spec *s = spec; s->name && rc == DP_OK; s++) {
        const dp_arg *a = NULL;
        for (size_t i = 0; i < nargs; i++)
            if (strcmp(args[i].name, s->name) == 0)
                a = &args[i];
        if (a)
            rc = read_one(backend, s, a, settings, err);
        else if (s->flags & DP_SPEC_REQUIRED)
            rc = dp_err_set(err, DP_EINVAL, "%s: the argument '%s' is required", backend,
                            s->name);
    }
    if (rc != DP_OK)
        dp_args_free(spec, settings);
    return rc;
}

DP_API void dp_args_free(const dp_arg_spec *spec, void *settings)
{
    for (const dp_arg_spec *s = spec; s->name; s++) {
        if (s->kind == DP_SPEC_STR) {
            char **slot = field(settings, s);
            free(*slot);
            *slot = NULL;
        } else if (s->kind == DP_SPEC_BYTES) {
            dp_str *str = field(settings, s);
            free(str->data);
            str->data = NULL;
            str->len = 0;
        } else if (s->kind == DP_SPEC_CUSTOM && s->clear) {
            s->clear(settings);
        }
    }
}

/* A field's value as the user wrote it (strings and choices quoted). */
static void value_text(const dp_arg_spec *s, const void *settings, char *out, size_t cap)
{
    const void *f = cfield(settings, s);
    switch (s->kind) {
    case DP_SPEC_INT:
    case DP_SPEC_SIZE:
        snprintf(out, cap, "%" PRId64, *(const int64_t *)f);
        break;
    case DP_SPEC_SECONDS:
        number_text(*(const double *)f, out, cap);
        break;
    case DP_SPEC_BOOL:
        snprintf(out, cap, "%s", *(const int *)f ? "true" : "false");
        break;
    case DP_SPEC_ENUM: {
        int i = *(const int *)f;
        snprintf(out, cap, "\"%s\"", i >= 0 && (size_t)i < nchoices(s) ? s->choices[i] : "?");
        break;
    }
    case DP_SPEC_STR: {
        const char *str = *(char *const *)f;
        if (str)
            string_text(str, strlen(str), out, cap);
        else
            snprintf(out, cap, "nil");
        break;
    }
    case DP_SPEC_BYTES: {
        const dp_str *str = f;
        if (str->data)
            string_text(str->data, str->len, out, cap);
        else
            snprintf(out, cap, "nil");
        break;
    }
    default:
        snprintf(out, cap, "?");
    }
}

static int same(const dp_arg_spec *s, const void *a, const void *b)
{
    const void *fa = cfield(a, s), *fb = cfield(b, s);
    switch (s->kind) {
    case DP_SPEC_INT:
    case DP_SPEC_SIZE:
        return *(const int64_t *)fa == *(const int64_t *)fb;
    case DP_SPEC_SECONDS:
        return *(const double *)fa == *(const double *)fb;
    case DP_SPEC_BOOL:
    case DP_SPEC_ENUM:
        return *(const int *)fa == *(const int *)fb;
    case DP_SPEC_STR: {
        const char *x = *(char *const *)fa, *y = *(char *const *)fb;
        return x == y || (x && y && strcmp(x, y) == 0);
    }
    case DP_SPEC_BYTES: {
        const dp_str *x = fa, *y = fb;
        return x->len == y->len && (x->len == 0 || memcmp(x->data, y->data, x->len) == 0) &&
               !x->data == !y->data;
    }
    }
    return 1;
}

DP_API const dp_arg_spec *dp_args_diff(const dp_arg_spec *spec, const void *a, const void *b,
                                       char *out, size_t cap)
{
    for (const dp_arg_spec *s = spec; s->name; s++) {
        if ((s->flags & (DP_SPEC_KEY | DP_SPEC_HANDLE)) || s->kind == DP_SPEC_CUSTOM ||
            same(s, a, b))
            continue;
        if (out && cap) {
            char va[240], vb[240];
            value_text(s, a, va, sizeof va);
            value_text(s, b, vb, sizeof vb);
            snprintf(out, cap, "%s %s, not %s", s->name, va, vb);
        }
        return s;
    }
    return NULL;
}

/* The default identity: the one DP_SPEC_KEY value's bytes as they are (so
 * that a C host can name the lock domain, "<backend>:<name>"); with several,
 * each length-prefixed, so that no two tuples of values give the same bytes
 * ("a\nb", "c" and "a", "b\nc"). */
int dp__args_identity(const dp_arg_spec *spec, const void *settings, dp_bytes *id)
{
    id->len = 0;
    int nkeys = 0;
    for (const dp_arg_spec *s = spec; s->name; s++)
        nkeys += (s->flags & DP_SPEC_KEY) != 0;
    for (const dp_arg_spec *s = spec; s->name; s++) {
        if (!(s->flags & DP_SPEC_KEY))
            continue;
        char buf[64];
        const char *text = buf;
        size_t len;
        if (s->kind == DP_SPEC_STR) {
            text = *(char *const *)cfield(settings, s);
            len = text ? strlen(text) : 0;
        } else if (s->kind == DP_SPEC_BYTES) {
            text = ((const dp_str *)cfield(settings, s))->data;
            len = ((const dp_str *)cfield(settings, s))->len;
        } else {
            value_text(s, settings, buf, sizeof buf);
            len = strlen(buf);
        }
        char head[24];
        int hl = nkeys == 1 ? 0 : snprintf(head, sizeof head, "%zu:", len);
        if (dp_bytes_reserve(id, id->len + (size_t)hl + len) != DP_OK)
            return DP_ENOMEM;
        memcpy(id->data + id->len, head, (size_t)hl);
        if (len)
            memcpy(id->data + id->len + hl, text, len);
        id->len += (size_t)hl + len;
    }
    return DP_OK;
}

/* The DP_SPEC_KEY values as a user reads them: "\"name\"" or "\"h\", 6379". */
void dp__args_key_text(const dp_arg_spec *spec, const void *settings, char *out, size_t cap)
{
    size_t n = 0;
    out[0] = '\0';
    for (const dp_arg_spec *s = spec; s->name; s++) {
        if (!(s->flags & DP_SPEC_KEY))
            continue;
        char v[240];
        value_text(s, settings, v, sizeof v);
        append(out, cap, &n, "%s%s", n ? ", " : "", v);
    }
}

/* The handle's lock_timeout from its settings: -1 when unbounded or none. */
double dp__args_lock_timeout(const dp_arg_spec *spec, const void *settings)
{
    for (const dp_arg_spec *s = spec; s->name; s++)
        if ((s->flags & DP_SPEC_LOCK_TIMEOUT) && s->kind == DP_SPEC_SECONDS) {
            double t = *(const double *)cfield(settings, s);
            return isinf(t) || t < 0 ? -1 : t;
        }
    return -1;
}
