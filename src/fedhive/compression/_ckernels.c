/* Compiled kernels behind the quantizers (fedhive.compression._kernels uses them when this
 * module is built, and its numpy code otherwise).
 *
 * numpy and BLAS give the quantizers one pass per operation; these fuse the steps that
 * dominate them (the Walsh-Hadamard transform and the random sign flips of a rotation, one
 * block at a time while it sits in the L1 cache; stochastic rounding; cell search).
 *
 * fwht(x, block, scales=None): in place, each block of `block` float32 values (a power of
 *     two, at least 16) times the Walsh-Hadamard matrix over sqrt(block), and times
 *     scales[i] for block i when given.
 * flip_signs(src, words, dst): dst[i] = src[i] with its sign bit flipped where bit i of
 *     the little-endian uint64 `words` is 1 (src and dst may be the same buffer).
 * qsgd_levels(x, inv, starts, raw, top, cap, level, negative): QSGD's stochastic rounding
 *     of a chunk, the same operations as the numpy kernel (so the same levels).
 * cells(v, edges, centroids, code, chosen=None): EDEN's Lloyd-Max cells of each value.
 *
 * Built with GCC on x86-64, each loop is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the baseline, and
 * the loader picks one for the CPU it runs on (target_clones); elsewhere it is compiled
 * for the baseline only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

#if defined(__clang__)
#define P1 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14
#define P2 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13
#define P4 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11
#define P8 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7
#define SHUFFLE(v, p) __builtin_shufflevector(v, v, p)
#else
#define SHUFFLE(v, p) __builtin_shuffle(v, p)
#endif

/* Butterflies with half-sizes 1, 2, 4 and 8: within each group of 16 values, one
 * permutation and one multiply-add by a +-1 pattern per stage. */
CLONES static void fwht16(float *restrict x, size_t n) {
#if !defined(__clang__)
    const v16i P1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    const v16i P2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const v16i P4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const v16i P8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
#endif
    const v16f s1 = {1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1};
    const v16f s2 = {1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1};
    const v16f s4 = {1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1};
    const v16f s8 = {1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1};
    for (size_t g = 0; g < n; g += 16) {
        v16f v;
        memcpy(&v, x + g, sizeof v);
        v = SHUFFLE(v, P1) + v * s1;
        v = SHUFFLE(v, P2) + v * s2;
        v = SHUFFLE(v, P4) + v * s4;
        v = SHUFFLE(v, P8) + v * s8;
        memcpy(x + g, &v, sizeof v);
    }
}

/* The remaining stages (half-sizes 16 .. n/2), two at a time (radix 4), then the
 * normalization and the block's scale in the same cache-resident pass. */
CLONES static void fwht_rest(float *restrict x, size_t n, float factor) {
    size_t h = 16;
    for (; 4 * h <= n; h *= 4) {
        for (size_t i = 0; i < n; i += 4 * h) {
            float *restrict p0 = x + i, *restrict p1 = p0 + h;
            float *restrict p2 = p1 + h, *restrict p3 = p2 + h;
            for (size_t j = 0; j < h; j++) {
                float a = p0[j], b = p1[j], c = p2[j], d = p3[j];
                float s0 = a + b, d0 = a - b, s1 = c + d, d1 = c - d;
                p0[j] = s0 + s1;
                p1[j] = d0 + d1;
                p2[j] = s0 - s1;
                p3[j] = d0 - d1;
            }
        }
    }
    if (h < n) { /* one radix-2 stage left */
        for (size_t i = 0; i < n; i += 2 * h) {
            float *restrict p0 = x + i, *restrict p1 = p0 + h;
            for (size_t j = 0; j < h; j++) {
                float a = p0[j], b = p1[j];
                p0[j] = a + b;
                p1[j] = a - b;
            }
        }
    }
    for (size_t j = 0; j < n; j++) x[j] *= factor;
}

CLONES static void flip(const uint32_t *src, const uint64_t *restrict words,
                        uint32_t *dst, size_t n) {
    size_t whole = n / 64;
    for (size_t w = 0; w < whole; w++) {
        uint64_t bits = words[w];
        const uint32_t *s = src + 64 * w;
        uint32_t *d = dst + 64 * w;
        for (size_t j = 0; j < 64; j++) d[j] = s[j] ^ ((uint32_t)((bits >> j) & 1u) << 31);
    }
    for (size_t i = 64 * whole; i < n; i++)
        dst[i] = src[i] ^ ((uint32_t)((words[i / 64] >> (i % 64)) & 1u) << 31);
}

/* QSGD's stochastic rounding of one chunk: level[i] = floor(min(|x[i]| (capped at cap) *
 * inv[b] + (raw[i] + 1/2) / 2**16, top)) for the block b holding i, negative[i] = x[i] < 0;
 * the same float32 operations in the same order as the numpy kernel, so the same levels.
 * Returns the count of NaN met. */
#define QSGD_LOOP(LEVEL_T)                                                                  \
    for (size_t b = 0; b < nblocks; b++) {                                                  \
        size_t lo = (size_t)starts[b], hi = b + 1 < nblocks ? (size_t)starts[b + 1] : n;    \
        float k = inv[b];                                                                   \
        for (size_t i = lo; i < hi; i++) {                                                  \
            float v = x[i], a = fabsf(v);                                                   \
            nan += a != a;                                                                  \
            a = a < cap ? a : cap;                                                          \
            float t = a * k;                                                                \
            float u = ((float)raw[i] + 0.5f) * (1.0f / 65536.0f);                           \
            t = t + u;                                                                      \
            t = t < top ? t : top;                                                          \
            ((LEVEL_T *)level)[i] = (LEVEL_T)t;                                             \
            negative[i] = v < 0.0f;                                                         \
        }                                                                                   \
    }

CLONES static size_t qsgd(const float *restrict x, size_t n, const float *restrict inv,
                          const int64_t *restrict starts, size_t nblocks,
                          const uint16_t *restrict raw, float top, float cap,
                          void *restrict level, int wide, uint8_t *restrict negative) {
    size_t nan = 0;
    if (wide) {
        QSGD_LOOP(uint16_t)
    } else {
        QSGD_LOOP(uint8_t)
    }
    return nan;
}

/* EDEN's cells for boundaries symmetric about 0 (edges: the positive half, increasing):
 * code[i] = half + m or half - 1 - m, m the count of edges below |v[i]|, half =
 * len(edges) + 1; chosen[i] = centroids[code[i]] when chosen is given. */
CLONES static void cells(const float *restrict v, size_t n, const float *restrict edges,
                         size_t nedges, const float *restrict centroids, uint8_t *restrict code,
                         float *restrict chosen) {
    uint8_t half = (uint8_t)(nedges + 1);
    memset(code, 0, n);
    for (size_t e = 0; e < nedges; e++) { /* edge by edge: each pass is a vector loop */
        float edge = edges[e];
        for (size_t i = 0; i < n; i++) code[i] += fabsf(v[i]) > edge;
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t positive = v[i] > 0.0f;
        code[i] = (uint8_t)(half + (code[i] ^ (uint8_t)(positive - 1u)));
    }
    if (chosen)
        for (size_t i = 0; i < n; i++) chosen[i] = centroids[code[i]];
}

static int float_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    if (view->itemsize != 4 || view->format == NULL || strcmp(view->format, "f") != 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous float32 buffer", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_fwht(PyObject *self, PyObject *args) {
    PyObject *xo, *so = Py_None;
    Py_ssize_t block;
    if (!PyArg_ParseTuple(args, "On|O", &xo, &block, &so)) return NULL;
    if (block < 16 || (block & (block - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "block must be a power of two, at least 16");
        return NULL;
    }
    Py_buffer x, s;
    if (float_buffer(xo, &x, 1, "x") < 0) return NULL;
    size_t n = (size_t)(x.len / 4), count = n / (size_t)block;
    if (n % (size_t)block != 0) {
        PyBuffer_Release(&x);
        PyErr_SetString(PyExc_ValueError, "x must hold a whole number of blocks");
        return NULL;
    }
    const float *scales = NULL;
    int has_scales = so != Py_None;
    if (has_scales) {
        if (float_buffer(so, &s, 0, "scales") < 0) {
            PyBuffer_Release(&x);
            return NULL;
        }
        if ((size_t)(s.len / 4) != count) {
            PyBuffer_Release(&s);
            PyBuffer_Release(&x);
            PyErr_SetString(PyExc_ValueError, "scales must hold one value per block");
            return NULL;
        }
        scales = (const float *)s.buf;
    }
    float *data = (float *)x.buf;
    float norm = (float)(1.0 / sqrt((double)block));
    Py_BEGIN_ALLOW_THREADS
    for (size_t b = 0; b < count; b++) {
        float *blk = data + b * (size_t)block;
        fwht16(blk, (size_t)block);
        fwht_rest(blk, (size_t)block, scales ? norm * scales[b] : norm);
    }
    Py_END_ALLOW_THREADS
    if (has_scales) PyBuffer_Release(&s);
    PyBuffer_Release(&x);
    Py_RETURN_NONE;
}

static PyObject *py_flip_signs(PyObject *self, PyObject *args) {
    PyObject *so, *wo, *dobj;
    if (!PyArg_ParseTuple(args, "OOO", &so, &wo, &dobj)) return NULL;
    Py_buffer src, words, dst;
    if (float_buffer(so, &src, 0, "src") < 0) return NULL;
    if (PyObject_GetBuffer(wo, &words, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (float_buffer(dobj, &dst, 1, "dst") < 0) {
        PyBuffer_Release(&words);
        PyBuffer_Release(&src);
        return NULL;
    }
    size_t n = (size_t)(src.len / 4);
    PyObject *result = Py_None;
    if ((size_t)(dst.len / 4) != n || (size_t)words.len < 8 * ((n + 63) / 64)) {
        PyErr_SetString(PyExc_ValueError, "dst must match src, and words hold a bit each");
        result = NULL;
    } else {
        Py_BEGIN_ALLOW_THREADS
        flip((const uint32_t *)src.buf, (const uint64_t *)words.buf, (uint32_t *)dst.buf, n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&words);
    PyBuffer_Release(&src);
    if (result == NULL) return NULL;
    Py_RETURN_NONE;
}

static int int_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize,
                      Py_ssize_t count, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    if (view->len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s must hold %zd bytes", what, itemsize * count);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_qsgd_levels(PyObject *self, PyObject *args) {
    PyObject *xo, *io, *so, *ro, *lo, *no;
    float top, cap;
    if (!PyArg_ParseTuple(args, "OOOOffOO", &xo, &io, &so, &ro, &top, &cap, &lo, &no))
        return NULL;
    Py_buffer x, inv, starts, raw, level, negative;
    Py_buffer *held[6];
    int count = 0;
    PyObject *result = NULL;
    if (float_buffer(xo, &x, 0, "x") < 0) goto done;
    held[count++] = &x;
    Py_ssize_t n = x.len / 4;
    if (float_buffer(io, &inv, 0, "inv") < 0) goto done;
    held[count++] = &inv;
    Py_ssize_t nblocks = inv.len / 4;
    if (nblocks < 1) {
        PyErr_SetString(PyExc_ValueError, "inv must hold a value per block");
        goto done;
    }
    if (int_buffer(so, &starts, 0, 8, nblocks, "starts") < 0) goto done;
    held[count++] = &starts;
    if (int_buffer(ro, &raw, 0, 2, n, "raw") < 0) goto done;
    held[count++] = &raw;
    if (PyObject_GetBuffer(lo, &level, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    held[count++] = &level;
    int wide = level.len == 2 * n;
    if (!wide && level.len != n) {
        PyErr_SetString(PyExc_ValueError, "level must hold a uint8 or uint16 per element");
        goto done;
    }
    if (int_buffer(no, &negative, 1, 1, n, "negative") < 0) goto done;
    held[count++] = &negative;
    const int64_t *st = (const int64_t *)starts.buf;
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        if (st[b] < 0 || st[b] > n || (b == 0 ? st[b] != 0 : st[b] < st[b - 1])) {
            PyErr_SetString(PyExc_ValueError, "starts must rise from 0 within x");
            goto done;
        }
    }
    size_t nan;
    Py_BEGIN_ALLOW_THREADS
    nan = qsgd((const float *)x.buf, (size_t)n, (const float *)inv.buf, st, (size_t)nblocks,
               (const uint16_t *)raw.buf, top, cap, level.buf, wide, (uint8_t *)negative.buf);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSize_t(nan);
done:
    while (count > 0) PyBuffer_Release(held[--count]);
    return result;
}

static PyObject *py_cells(PyObject *self, PyObject *args) {
    PyObject *vo, *eo, *co, *codeo, *cho = Py_None;
    if (!PyArg_ParseTuple(args, "OOOO|O", &vo, &eo, &co, &codeo, &cho)) return NULL;
    Py_buffer v, edges, centroids, code, chosen;
    Py_buffer *held[5];
    int count = 0;
    PyObject *result = NULL;
    if (float_buffer(vo, &v, 0, "v") < 0) goto done;
    held[count++] = &v;
    Py_ssize_t n = v.len / 4;
    if (float_buffer(eo, &edges, 0, "edges") < 0) goto done;
    held[count++] = &edges;
    if (float_buffer(co, &centroids, 0, "centroids") < 0) goto done;
    held[count++] = &centroids;
    Py_ssize_t nedges = edges.len / 4;
    if (nedges > 127 || centroids.len / 4 != 2 * nedges + 2) {
        PyErr_SetString(PyExc_ValueError, "edges: at most 127, and 2 * edges + 2 centroids");
        goto done;
    }
    if (int_buffer(codeo, &code, 1, 1, n, "code") < 0) goto done;
    held[count++] = &code;
    float *ch = NULL;
    if (cho != Py_None) {
        if (float_buffer(cho, &chosen, 1, "chosen") < 0) goto done;
        held[count++] = &chosen;
        if (chosen.len != v.len) {
            PyErr_SetString(PyExc_ValueError, "chosen must match v");
            goto done;
        }
        ch = (float *)chosen.buf;
    }
    Py_BEGIN_ALLOW_THREADS
    cells((const float *)v.buf, (size_t)n, (const float *)edges.buf, (size_t)nedges,
          (const float *)centroids.buf, (uint8_t *)code.buf, ch);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    while (count > 0) PyBuffer_Release(held[--count]);
    return result;
}

static PyMethodDef methods[] = {
    {"qsgd_levels", py_qsgd_levels, METH_VARARGS,
     "qsgd_levels(x, inv, starts, raw, top, cap, level, negative) -> NaN count"},
    {"cells", py_cells, METH_VARARGS, "cells(v, edges, centroids, code, chosen=None)"},
    {"fwht", py_fwht, METH_VARARGS, "fwht(x, block, scales=None): in place, per block"},
    {"flip_signs", py_flip_signs, METH_VARARGS, "flip_signs(src, words, dst)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ckernels", "Compiled kernels behind the quantizers.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ckernels(void) { return PyModule_Create(&module); }
