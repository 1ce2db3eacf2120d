/*
 * Bit-exact quantizers for Q4_K, Q5_K, Q6_K and Q8_0 (no importance matrix).
 *
 * The bytes must equal ggml's reference routines (ggml-quants.c of the pinned llama.cpp), so every
 * lane below performs the same IEEE single-precision operations, in the same order, as ggml does
 * for one sub-block. What is different is only the layout: the sub-blocks of a super-block are
 * processed side by side (element index outer, sub-block index inner), which lets the compiler
 * vectorise across independent sub-blocks without reordering any one sub-block's arithmetic.
 *
 * Build with -ffp-contract=off and never with -ffast-math: a fused multiply-add, a reassociated sum
 * or a reciprocal approximation changes rounding and therefore the bytes. Plain C only, so it builds
 * on x86-64 and arm64 alike; the Python side checks it against ggml before trusting it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#define QK_K 256
#define EPS_GROUP 1e-15f   /* ggml's GROUP_MAX_EPS */

/* ggml type ids (ggml.h), the only ones this module produces */
enum { T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Round to nearest via the 1.5*2^23 bias: the same trick ggml uses, so ties and the behaviour near
 * the limits are identical. Valid for |v| < 2^22, which every caller guarantees. */
static inline int nearest(float v) {
    return (int)(f2u(v + 12582912.f) & 0x007fffff) - 0x00400000;
}

/* IEEE binary16 from binary32, round to nearest even (finite inputs; overflow gives infinity). */
static uint16_t to_half(float f) {
    uint32_t x = f2u(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00u;               /* NaN: quiet, like ggml */
    if (x >= 0x477ff000u) return sign | 0x7c00u;              /* >= 65520 rounds to infinity */
    if (x < 0x38800000u) {                                    /* below 2^-14: subnormal half */
        /* scale so one half-ulp is 1.0, then let a float add round to an integer (even ties) */
        float t = u2f(x) * 16777216.0f + 8388608.0f;
        return sign | (uint16_t)(f2u(t) - 0x4b000000u);
    }
    /* rebias the exponent and round the 13 dropped mantissa bits to even; a carry moves the exponent */
    x = x - (112u << 23) + 0x0fffu + ((x >> 13) & 1u);
    return sign | (uint16_t)(x >> 13);
}

static float from_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return u2f(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        /* m * 2^-24 is exact in binary32 */
        float v = (float)m * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

/* C's roundf (half away from zero) for |v| < 2^23, written so it inlines and vectorises: the
 * fraction v - trunc(v) is exact in that range. */
static inline int round_away(float v) {
    const int i = (int)v;
    if (!(fabsf(v) < 8388608.f)) return i;   /* already integral (or out of range, as in ggml) */
    const float fr = v - (float)i;
    return i + (fr >= 0.5f) - (fr <= -0.5f);
}

static inline void put_half(uint8_t *p, uint16_t h) { p[0] = (uint8_t)(h & 0xff); p[1] = (uint8_t)(h >> 8); }
static inline uint16_t get_half(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* ---------------------------------------------------------------- Q8_0: blocks of 32 */

static void q8_0_rows(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; ++b, x += 32, y += 34) {
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) {
            float a = fabsf(x[j]);
            amax = amax > a ? amax : a;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        put_half(y, to_half(d));
        for (int j = 0; j < 32; ++j) y[2 + j] = (uint8_t)(int8_t)round_away(x[j] * id);
    }
}

/* ------------------------------------------------- K-quant scales and layouts, shared by both paths */

#define NS 8    /* Q4_K / Q5_K sub-blocks per super-block */
#define SL 32   /* values per sub-block */

/* The packers take a super-block's final levels in value order (lv[k] is the level of value k:
 * sub-block k / 32 for Q4_K and Q5_K, k / 16 for Q6_K) and write the block's level bytes. */
typedef void (*pack_fn)(const uint8_t lv[QK_K], uint8_t *y);

static void pack_q4_K(const uint8_t lv[QK_K], uint8_t *y) {
    uint8_t *q = y + 16;
    for (int p = 0; p < 4; ++p, q += 32)     /* sub-blocks 2p and 2p+1 share 32 bytes */
        for (int i = 0; i < 32; ++i) q[i] = (uint8_t)(lv[64 * p + i] | (lv[64 * p + 32 + i] << 4));
}

static void pack_q5_K(const uint8_t lv[QK_K], uint8_t *y) {
    uint8_t *qh = y + 16, *ql = y + 48;
    memset(qh, 0, 32);
    for (int p = 0; p < 4; ++p, ql += 32) {
        const uint8_t m1 = (uint8_t)(1u << (2 * p)), m2 = (uint8_t)(2u << (2 * p));
        for (int i = 0; i < 32; ++i) {
            int l1 = lv[64 * p + i], l2 = lv[64 * p + 32 + i];
            if (l1 > 15) { l1 -= 16; qh[i] |= m1; }
            if (l2 > 15) { l2 -= 16; qh[i] |= m2; }
            ql[i] = (uint8_t)(l1 | (l2 << 4));
        }
    }
}

/* two 128-value halves, each four 32-value quarters: low nibbles in ql, high bits in qh */
static void pack_q6_K(const uint8_t lv[QK_K], uint8_t *y) {
    uint8_t *ql = y, *qh = y + 128;
    for (const uint8_t *v = lv; v < lv + QK_K; v += 128, ql += 64, qh += 32)
        for (int l = 0; l < 32; ++l) {
            const uint8_t a = v[l], b = v[l + 32], c = v[l + 64], e = v[l + 96];
            ql[l] = (uint8_t)((a & 0xF) | ((c & 0xF) << 4));
            ql[l + 32] = (uint8_t)((b & 0xF) | ((e & 0xF) << 4));
            qh[l] = (uint8_t)((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6));
        }
}

/* Q4_K and Q5_K super-block scales, as ggml: the eight sub-block scales and mins (>= 0) quantized to
 * 6 bits against the largest of each and packed into scales[12], the two fp16 super-scales at dhead.
 * Gives each sub-block's final step d[j] and offset dm[j], which its levels are then fitted to. */
static void k_scales(const float sc[NS], const float mi[NS], uint8_t *dhead, uint8_t scales[12],
                     float d[NS], float dm[NS]) {
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < NS; ++j) {
        if (sc[j] > max_scale) max_scale = sc[j];
        if (mi[j] > max_min) max_min = mi[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[NS], lm[NS];
    memset(scales, 0, 12);
    for (int j = 0; j < NS; ++j) {
        uint8_t a = (uint8_t)nearest(inv_scale * sc[j]);   /* the uint8 wrap is ggml's too */
        uint8_t b = (uint8_t)nearest(inv_min * mi[j]);
        ls[j] = a < 63 ? a : 63;
        lm[j] = b < 63 ? b : 63;
        if (j < 4) {
            scales[j] = ls[j];
            scales[j + 4] = lm[j];
        } else {
            scales[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            scales[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            scales[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
    const uint16_t hd = to_half(max_scale / 63.f), hm = to_half(max_min / 63.f);
    put_half(dhead, hd);
    put_half(dhead + 2, hm);
    const float fd = from_half(hd), fm = from_half(hm);
    for (int j = 0; j < NS; ++j) { d[j] = fd * (float)ls[j]; dm[j] = fm * (float)lm[j]; }
}

/* Q4_K and Q5_K: ggml's make_qkx2_quants search parameters, the block size, the level layout */
typedef struct { int nmax; float rmin, rdelta; int nstep; int bytes; pack_fn pack; } kq_t;
static const kq_t KQ_Q4_K = {15, -1.f, 0.1f, 20, 144, pack_q4_K};
static const kq_t KQ_Q5_K = {31, -0.5f, 0.1f, 15, 176, pack_q5_K};

#include "_kernels_scalar.h"

/* ---------------------------------------------------------------- Python binding */

#if defined(__GNUC__) || defined(__clang__)
#define HAVE_VEC 1
#define NL 4
#include "_kernels_vec.h"
#else
#define HAVE_VEC 0
#define q4_K_rows_v4 q4_K_rows
#define q5_K_rows_v4 q5_K_rows
#define q6_K_rows_v4 q6_K_rows
#endif

/* On x86-64 with GCC, an 8-lane copy compiled for AVX2 (no FMA: -ffp-contract=off keeps every
 * multiply and add separate), chosen at run time when the CPU has it. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define NL 8
#include "_kernels_vec.h"
#pragma GCC pop_options
#else
#define HAVE_AVX2_COPY 0
#endif

typedef void (*rows_fn)(const float *, uint8_t *, int64_t);
typedef struct { int type; int blck; int bytes; rows_fn scalar, vec, wide; } kind_t;
#if HAVE_AVX2_COPY
#define WIDE(f) f##_v8
#else
#define WIDE(f) f##_v4
#endif
static const kind_t KINDS[] = {
    {T_Q8_0, 32, 34, q8_0_rows, q8_0_rows, q8_0_rows},
    {T_Q4_K, QK_K, 144, q4_K_rows, q4_K_rows_v4, WIDE(q4_K_rows)},
    {T_Q5_K, QK_K, 176, q5_K_rows, q5_K_rows_v4, WIDE(q5_K_rows)},
    {T_Q6_K, QK_K, 210, q6_K_rows, q6_K_rows_v4, WIDE(q6_K_rows)},
};

/* which copy runs: 0 scalar, 1 native 4-lane vectors, 2 the AVX2 copy (when the CPU has AVX2) */
static int best_path(void) {
#if HAVE_AVX2_COPY
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) return 2;
#endif
    return HAVE_VEC ? 1 : 0;
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    (void)self;
    int type, path = -1;
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "iy*w*|i", &type, &src, &dst, &path)) return NULL;
    if (path < 0 || path > best_path()) path = best_path();
    const kind_t *k = NULL;
    for (size_t i = 0; i < sizeof KINDS / sizeof KINDS[0]; ++i)
        if (KINDS[i].type == type) k = &KINDS[i];
    PyObject *res = NULL;
    const Py_ssize_t n = src.len / (Py_ssize_t)sizeof(float);
    if (k == NULL) {
        PyErr_Format(PyExc_ValueError, "no kernel for ggml type %d", type);
    } else if (src.len % (Py_ssize_t)sizeof(float) || n % k->blck) {
        PyErr_SetString(PyExc_ValueError, "source is not a whole number of blocks of float32");
    } else if (dst.len < (n / k->blck) * k->bytes) {
        PyErr_SetString(PyExc_ValueError, "destination too small");
    } else {
        Py_BEGIN_ALLOW_THREADS   /* rows are split across Python threads */
        (path == 0 ? k->scalar : path == 1 ? k->vec : k->wide)((const float *)src.buf, (uint8_t *)dst.buf, (int64_t)n);
        Py_END_ALLOW_THREADS
        res = PyLong_FromSsize_t((n / k->blck) * k->bytes);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return res;
}

static PyObject *py_f16_to_f32(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &dst)) return NULL;
    PyObject *res = NULL;
    const Py_ssize_t n = src.len / 2;
    if (dst.len < n * 4) {
        PyErr_SetString(PyExc_ValueError, "destination too small");
    } else {
        Py_BEGIN_ALLOW_THREADS
        const uint8_t *s = (const uint8_t *)src.buf;
        float *d = (float *)dst.buf;
        for (Py_ssize_t i = 0; i < n; ++i) d[i] = from_half(get_half(s + 2 * i));
        Py_END_ALLOW_THREADS
        res = PyLong_FromSsize_t(n);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return res;
}

static PyObject *py_to_half(PyObject *self, PyObject *args) {
    (void)self;
    float f;
    if (!PyArg_ParseTuple(args, "f", &f)) return NULL;
    return PyLong_FromLong(to_half(f));
}

static PyMethodDef METHODS[] = {
    {"quantize", py_quantize, METH_VARARGS, "quantize(ggml_type, float32 buffer, out buffer, path=best) -> bytes written; path 0 scalar, 1 vector, 2 AVX2"},
    {"f16_to_f32", py_f16_to_f32, METH_VARARGS, "f16_to_f32(f16 buffer, float32 out buffer) -> values"},
    {"to_half", py_to_half, METH_VARARGS, "to_half(float) -> binary16 bits (for tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&MODULE);
    if (m == NULL) return NULL;
    PyModule_AddIntConstant(m, "VERSION", 1);
    PyModule_AddIntConstant(m, "BEST_PATH", best_path());
    return m;
}
