/* Optional compiled fast path for weft_http.h1: the common request and response head in one pass.
 *
 * Each function accepts only a strict subset of what h1.py accepts (clean CRLF heads, one Host,
 * at most one plain Content-Length, no forwarding headers of the visitor's own, no Upgrade, ...)
 * and returns None for everything else, which then takes h1.py's Python path: that path stays the
 * reference for every decision and every error message. A differential test
 * (tests/unit/test_h1_fast.py) requires both to give the same results for whatever this accepts.
 *
 *   request(head)  -> (method, target, version, host, content_length, keep_alive) | None
 *   response(head) -> (version, status, reason, framing, content_length, keep_alive) | None
 *
 * `content_length` is -1 when absent; `framing` is 0 (by Content-Length, or read to close when
 * it is absent) or 1 (chunked). Strings are decoded as h1.py does: ASCII for tokens, latin-1
 * for targets and values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static unsigned char TCHAR[256];     /* RFC 9110 5.6.2 token characters */
static unsigned char BAD_VALUE[256]; /* CTLs but HTAB (CR and LF included): never in a value */

static void init_tables(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = '0'; c <= '9'; c++) TCHAR[c] = 1;
    for (int c = 'a'; c <= 'z'; c++) TCHAR[c] = 1;
    for (int c = 'A'; c <= 'Z'; c++) TCHAR[c] = 1;
    for (const char *p = extra; *p; p++) TCHAR[(unsigned char)*p] = 1;
    for (int c = 0; c < 0x20; c++) BAD_VALUE[c] = (c != '\t');
    BAD_VALUE[0x7f] = 1;
}

static inline unsigned char lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* Whether the n bytes at p are `lit` (lowercase ASCII) in any case. */
static int name_is(const unsigned char *p, Py_ssize_t n, const char *lit)
{
    Py_ssize_t len = (Py_ssize_t)strlen(lit);
    if (n != len) return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (lower(p[i]) != (unsigned char)lit[i]) return 0;
    return 1;
}

/* Like name_is, with `_` read as `-` (h1.is_forwarding_field); `prefix`: `lit` may go on. */
static int dashed_name_is(const unsigned char *p, Py_ssize_t n, const char *lit, int prefix)
{
    Py_ssize_t len = (Py_ssize_t)strlen(lit);
    if (prefix ? n < len : n != len) return 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = p[i] == '_' ? '-' : lower(p[i]);
        if (c != (unsigned char)lit[i]) return 0;
    }
    return 1;
}

typedef struct {
    int hosts;                   /* Host fields seen */
    const unsigned char *host;   /* the last one's value, without SP/HTAB around it */
    Py_ssize_t host_len;
    int lengths;                 /* Content-Length fields seen */
    const unsigned char *length;
    Py_ssize_t length_len;
    int codings;                 /* Transfer-Encoding fields seen */
    int chunked;                 /* the only one's value is exactly "chunked" (any case) */
    int connection;              /* a Connection field is present */
    int close, keep_alive;       /* ... holding these tokens */
    int other;                   /* a field this fast path leaves to h1.py (Upgrade, forwarding) */
} fields;

/* The tokens of one Connection value: split at commas, SP/HTAB trimmed, compared in any case. */
static void connection_tokens(const unsigned char *v, Py_ssize_t n, fields *f)
{
    Py_ssize_t i = 0;
    while (i <= n) {
        Py_ssize_t j = i;
        while (j < n && v[j] != ',') j++;
        Py_ssize_t a = i, b = j;
        while (a < b && (v[a] == ' ' || v[a] == '\t')) a++;
        while (b > a && (v[b - 1] == ' ' || v[b - 1] == '\t')) b--;
        if (name_is(v + a, b - a, "close")) f->close = 1;
        else if (name_is(v + a, b - a, "keep-alive")) f->keep_alive = 1;
        i = j + 1;
    }
}

/* Scan the fields from `pos` to the end of the head: every line `token:value CRLF`, the value
 * free of CTLs but HTAB, then the blank line ending exactly at `len` (h1._CLEAN_FIELDS_RE).
 * Returns 0 when the head is not in that clean form. */
static int scan_fields(const unsigned char *s, Py_ssize_t pos, Py_ssize_t len, int request,
                       fields *f)
{
    memset(f, 0, sizeof(*f));
    for (;;) {
        if (pos + 2 > len) return 0;
        if (s[pos] == '\r') return s[pos + 1] == '\n' && pos + 2 == len;
        Py_ssize_t name = pos;
        while (pos < len && TCHAR[s[pos]]) pos++;
        if (pos == name || pos >= len || s[pos] != ':') return 0;
        Py_ssize_t name_len = pos - name;
        Py_ssize_t value = ++pos;
        while (pos < len && !BAD_VALUE[s[pos]]) pos++;
        if (pos + 1 >= len || s[pos] != '\r' || s[pos + 1] != '\n') return 0;
        Py_ssize_t a = value, b = pos;
        while (a < b && (s[a] == ' ' || s[a] == '\t')) a++;
        while (b > a && (s[b - 1] == ' ' || s[b - 1] == '\t')) b--;
        pos += 2;
        const unsigned char *n = s + name;
        switch (lower(n[0])) {
        case 'h':
            if (name_is(n, name_len, "host")) {
                f->hosts++;
                f->host = s + a;
                f->host_len = b - a;
            }
            break;
        case 'c':
            if (name_is(n, name_len, "content-length")) {
                f->lengths++;
                f->length = s + a;
                f->length_len = b - a;
            } else if (name_is(n, name_len, "connection")) {
                f->connection = 1;
                connection_tokens(s + a, b - a, f);
            }
            break;
        case 't':
            if (name_is(n, name_len, "transfer-encoding")) {
                f->codings++;
                f->chunked = name_is(s + a, b - a, "chunked");
            }
            break;
        case 'u':
            if (request && name_is(n, name_len, "upgrade")) f->other = 1;
            break;
        case 'f':
            if (request && name_is(n, name_len, "forwarded")) f->other = 1;
            break;
        case 'x':  /* any spelling with `_` for `-`, which CGI/WSGI servers read alike */
            if (request && (dashed_name_is(n, name_len, "x-forwarded-", 1) ||
                            dashed_name_is(n, name_len, "x-real-ip", 0)))
                f->other = 1;
            break;
        }
    }
}

/* A Content-Length value of 1-18 ASCII digits as a number, else -2 (left to h1.py). */
static long long plain_length(const unsigned char *v, Py_ssize_t n)
{
    if (n < 1 || n > 18) return -2;
    long long x = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9') return -2;
        x = x * 10 + (v[i] - '0');
    }
    return x;
}

static int keep_alive(const fields *f, int http10)
{
    if (!f->connection) return !http10;
    return http10 ? f->keep_alive : !f->close;
}

/* Where the first line ends (its CRLF), or 0 when it does not or is empty. */
static Py_ssize_t first_line(const unsigned char *s, Py_ssize_t len)
{
    Py_ssize_t first = 0;
    while (first + 1 < len && !(s[first] == '\r' && s[first + 1] == '\n')) first++;
    return first + 1 < len ? first : 0;
}

/* Both readers return a new tuple, Py_None (not taken; a borrowed reference), or NULL with an
 * exception set; `with_buffer` holds the caller's buffer around them. */
typedef PyObject *(*reader)(const unsigned char *s, Py_ssize_t len);

static PyObject *with_buffer(PyObject *arg, reader read)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = read(view.buf, view.len);
    PyBuffer_Release(&view);
    if (result == Py_None) Py_INCREF(result);
    return result;
}

static PyObject *read_request(const unsigned char *s, Py_ssize_t len)
{
    Py_ssize_t first = first_line(s, len);
    if (first == 0) return Py_None;
    /* METHOD SP TARGET SP VERSION: exactly two spaces */
    Py_ssize_t sp1 = 0;
    while (sp1 < first && s[sp1] != ' ') sp1++;
    Py_ssize_t sp2 = sp1 + 1;
    while (sp2 < first && s[sp2] != ' ') sp2++;
    if (sp2 >= first || memchr(s + sp2 + 1, ' ', first - sp2 - 1) != NULL) return Py_None;
    if (sp1 == 0) return Py_None;
    for (Py_ssize_t i = 0; i < sp1; i++)
        if (!TCHAR[s[i]]) return Py_None;
    if (sp1 == 7 && memcmp(s, "CONNECT", 7) == 0) return Py_None;
    if (sp2 - sp1 < 2 || s[sp1 + 1] != '/') return Py_None;
    for (Py_ssize_t i = sp1 + 1; i < sp2; i++)
        if (s[i] <= 0x20 || s[i] == 0x7f) return Py_None;
    Py_ssize_t vlen = first - sp2 - 1;
    const unsigned char *version = s + sp2 + 1;
    if (vlen != 8 || (memcmp(version, "HTTP/1.1", 8) != 0 && memcmp(version, "HTTP/1.0", 8) != 0))
        return Py_None;
    fields f;
    if (!scan_fields(s, first + 2, len, 1, &f)) return Py_None;
    if (f.other || f.codings || f.hosts != 1 || f.lengths > 1) return Py_None;
    long long length = -1;
    if (f.lengths) {
        length = plain_length(f.length, f.length_len);
        if (length < 0) return Py_None;
    }
    return Py_BuildValue(
        "(s#N s# N L N)",
        (const char *)s, sp1,
        PyUnicode_DecodeLatin1((const char *)s + sp1 + 1, sp2 - sp1 - 1, NULL),
        (const char *)version, vlen,
        PyUnicode_DecodeLatin1((const char *)f.host, f.host_len, NULL),
        length,
        PyBool_FromLong(keep_alive(&f, version[7] == '0')));
}

static PyObject *read_response(const unsigned char *s, Py_ssize_t len)
{
    Py_ssize_t first = first_line(s, len);
    if (first == 0) return Py_None;
    /* VERSION SP STATUS [SP REASON] (split at the first two spaces only) */
    Py_ssize_t sp1 = 0;
    while (sp1 < first && s[sp1] != ' ') sp1++;
    if (sp1 >= first || sp1 < 7 || memcmp(s, "HTTP/1.", 7) != 0) return Py_None;
    Py_ssize_t sp2 = sp1 + 1;
    while (sp2 < first && s[sp2] != ' ') sp2++;
    Py_ssize_t digits = sp2 - sp1 - 1;
    if (digits != 3) return Py_None;  /* h1.py also takes 0200 and the like: left to it */
    int status = 0;
    for (Py_ssize_t i = sp1 + 1; i < sp2; i++) {
        if (s[i] < '0' || s[i] > '9') return Py_None;
        status = status * 10 + (s[i] - '0');
    }
    if (status < 200) return Py_None;  /* interim answers and 101 are rare: h1.py's */
    fields f;
    if (!scan_fields(s, first + 2, len, 0, &f)) return Py_None;
    int chunked = 0;
    if (f.codings) {
        if (f.codings != 1 || !f.chunked) return Py_None;
        chunked = 1;
    }
    long long length = -1;
    if (f.lengths > 1) return Py_None;
    if (f.lengths) {
        length = plain_length(f.length, f.length_len);
        if (length < 0) return Py_None;
    }
    int http10 = (sp1 == 8 && memcmp(s, "HTTP/1.0", 8) == 0);
    PyObject *reason = sp2 < first
        ? PyUnicode_DecodeLatin1((const char *)s + sp2 + 1, first - sp2 - 1, NULL)
        : PyUnicode_FromStringAndSize("", 0);
    return Py_BuildValue(
        "(N i N i L N)",
        PyUnicode_DecodeLatin1((const char *)s, sp1, NULL),
        status, reason, chunked, length, PyBool_FromLong(keep_alive(&f, http10)));
}

static PyObject *request(PyObject *self, PyObject *arg) { return with_buffer(arg, read_request); }
static PyObject *response(PyObject *self, PyObject *arg) { return with_buffer(arg, read_response); }

static PyMethodDef methods[] = {
    {"request", request, METH_O, "The common request head in one pass, or None (see h1.py)."},
    {"response", response, METH_O, "The common response head in one pass, or None (see h1.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_h1c", "Compiled fast path for weft_http.h1.", -1, methods,
};

PyMODINIT_FUNC PyInit__h1c(void)
{
    init_tables();
    return PyModule_Create(&module);
}
