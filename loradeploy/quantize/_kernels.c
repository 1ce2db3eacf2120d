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

/* ------------------------------------------------- Q4_K / Q5_K: 8 sub-blocks of 32 side by side */

#define NS 8    /* sub-blocks per super-block */
#define SL 32   /* values per sub-block */

/* One super-block's scale/min search (ggml's make_qkx2_quants with av_x + |x| weights), all eight
 * sub-blocks at once. X[i][j] is value i of sub-block j. Outputs L[i][j], scale[j], min[j] (>= 0). */
static void qkx2_8(const float X[SL][NS], int nmax, float rmin, float rdelta, int nstep,
                   uint8_t L[SL][NS], float scale_out[NS], float min_out[NS]) {
    float W[SL][NS];
    float sx2[NS], avx[NS], mn[NS], mx[NS], sw[NS], sx[NS];
    float scale[NS], best[NS], lo0[NS];
    uint8_t La[SL][NS];

    for (int j = 0; j < NS; ++j) sx2[j] = 0.0f;
    for (int i = 0; i < SL; ++i)
        for (int j = 0; j < NS; ++j) sx2[j] += X[i][j] * X[i][j];
    for (int j = 0; j < NS; ++j) avx[j] = sqrtf(sx2[j] / 32.0f);
    for (int i = 0; i < SL; ++i)
        for (int j = 0; j < NS; ++j) W[i][j] = avx[j] + fabsf(X[i][j]);

    for (int j = 0; j < NS; ++j) {
        mn[j] = X[0][j]; mx[j] = X[0][j]; sw[j] = W[0][j]; sx[j] = sw[j] * X[0][j];
    }
    for (int i = 1; i < SL; ++i)
        for (int j = 0; j < NS; ++j) {
            const float v = X[i][j], w = W[i][j];
            mn[j] = v < mn[j] ? v : mn[j];
            mx[j] = v > mx[j] ? v : mx[j];
            sw[j] += w;
            sx[j] += w * v;
        }
    for (int j = 0; j < NS; ++j) { mn[j] = mn[j] > 0.0f ? 0.0f : mn[j]; lo0[j] = mn[j]; }

    /* first guess: the plain min/max grid */
    float isc[NS];
    for (int j = 0; j < NS; ++j) { isc[j] = (float)nmax / (mx[j] - mn[j]); scale[j] = 1.0f / isc[j]; best[j] = 0.0f; }
    for (int i = 0; i < SL; ++i)
        for (int j = 0; j < NS; ++j) {
            int l = nearest(isc[j] * (X[i][j] - mn[j]));
            l = l < 0 ? 0 : (l > nmax ? nmax : l);
            L[i][j] = (uint8_t)l;
            float diff = scale[j] * (float)l + mn[j] - X[i][j];
            best[j] += W[i][j] * (diff * diff);
        }

    for (int is = 0; is <= nstep; ++is) {
        const float num = rmin + rdelta * (float)is + (float)nmax;
        float sl[NS], sl2[NS], sxl[NS], tsc[NS], tmn[NS], cur[NS];
        int ok[NS];
        for (int j = 0; j < NS; ++j) { isc[j] = num / (mx[j] - mn[j]); sl[j] = sl2[j] = sxl[j] = 0.0f; }
        for (int i = 0; i < SL; ++i)
            for (int j = 0; j < NS; ++j) {
                int l = nearest(isc[j] * (X[i][j] - mn[j]));
                l = l < 0 ? 0 : (l > nmax ? nmax : l);
                La[i][j] = (uint8_t)l;
                const float w = W[i][j], fl = (float)l;
                sl[j] += w * fl;
                sl2[j] += w * fl * fl;
                sxl[j] += w * fl * X[i][j];
            }
        for (int j = 0; j < NS; ++j) {
            const float D = sw[j] * sl2[j] - sl[j] * sl[j];
            ok[j] = D > 0.0f;
            float s = (sw[j] * sxl[j] - sx[j] * sl[j]) / D;
            float m = (sl2[j] * sx[j] - sl[j] * sxl[j]) / D;
            if (m > 0.0f) { m = 0.0f; s = sxl[j] / sl2[j]; }
            tsc[j] = s; tmn[j] = m; cur[j] = 0.0f;
        }
        for (int i = 0; i < SL; ++i)
            for (int j = 0; j < NS; ++j) {
                float diff = tsc[j] * (float)La[i][j] + tmn[j] - X[i][j];
                cur[j] += W[i][j] * (diff * diff);
            }
        int any = 0;
        for (int j = 0; j < NS; ++j) {
            ok[j] = ok[j] && cur[j] < best[j];
            if (ok[j]) { best[j] = cur[j]; scale[j] = tsc[j]; mn[j] = tmn[j]; any = 1; }
        }
        if (any)
            for (int i = 0; i < SL; ++i)
                for (int j = 0; j < NS; ++j)
                    if (ok[j]) L[i][j] = La[i][j];
    }
    for (int j = 0; j < NS; ++j) {
        if (mx[j] == lo0[j]) {          /* constant sub-block: ggml returns before any search */
            for (int i = 0; i < SL; ++i) L[i][j] = 0;
            scale_out[j] = 0.0f;
            min_out[j] = -lo0[j];
        } else {
            scale_out[j] = scale[j];
            min_out[j] = -mn[j];
        }
    }
}

/* Shared tail of Q4_K and Q5_K: 6-bit scales and mins, the two super-block halves, final levels. */
static void k_scales(const float X[SL][NS], const float sc[NS], const float mi[NS], int nmax,
                     uint8_t *dhead, uint8_t scales[12], uint8_t L[SL][NS]) {
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
    float d[NS], dm[NS];
    for (int j = 0; j < NS; ++j) { d[j] = fd * (float)ls[j]; dm[j] = fm * (float)lm[j]; }
    for (int i = 0; i < SL; ++i)
        for (int j = 0; j < NS; ++j) {
            if (d[j] == 0.0f) continue;    /* ggml keeps the search's levels there */
            int l = nearest((X[i][j] + dm[j]) / d[j]);
            L[i][j] = (uint8_t)(l < 0 ? 0 : (l > nmax ? nmax : l));
        }
}

static void load8(const float *x, float X[SL][NS]) {
    for (int j = 0; j < NS; ++j)
        for (int i = 0; i < SL; ++i) X[i][j] = x[SL * j + i];
}

static void q4_K_rows(const float *x, uint8_t *y, int64_t n) {
    float X[SL][NS], sc[NS], mi[NS];
    uint8_t L[SL][NS];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 144) {
        load8(x, X);
        qkx2_8(X, 15, -1.f, 0.1f, 20, L, sc, mi);
        k_scales(X, sc, mi, 15, y, y + 4, L);
        uint8_t *q = y + 16;
        for (int p = 0; p < 4; ++p, q += 32)     /* sub-blocks 2p and 2p+1 share 32 bytes */
            for (int i = 0; i < SL; ++i) q[i] = (uint8_t)(L[i][2 * p] | (L[i][2 * p + 1] << 4));
    }
}

static void q5_K_rows(const float *x, uint8_t *y, int64_t n) {
    float X[SL][NS], sc[NS], mi[NS];
    uint8_t L[SL][NS];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 176) {
        load8(x, X);
        qkx2_8(X, 31, -0.5f, 0.1f, 15, L, sc, mi);
        k_scales(X, sc, mi, 31, y, y + 4, L);
        uint8_t *qh = y + 16, *ql = y + 48;
        memset(qh, 0, 32);
        for (int p = 0; p < 4; ++p, ql += 32) {
            const uint8_t m1 = (uint8_t)(1u << (2 * p)), m2 = (uint8_t)(2u << (2 * p));
            for (int i = 0; i < SL; ++i) {
                int l1 = L[i][2 * p], l2 = L[i][2 * p + 1];
                if (l1 > 15) { l1 -= 16; qh[i] |= m1; }
                if (l2 > 15) { l2 -= 16; qh[i] |= m2; }
                ql[i] = (uint8_t)(l1 | (l2 << 4));
            }
        }
    }
}

/* ------------------------------------------------- Q6_K: 16 sub-blocks of 16 side by side */

#define N6 16

/* ggml's make_qx_quants(16, 32, x, L, rmse_type = 1, no weights) for all sixteen sub-blocks. */
static void qx_16(const float X[N6][N6], int8_t L[N6][N6], float out[N6]) {
    const int nmax = 32;
    float amax[N6], mx[N6], isc[N6], slx[N6], sl2[N6], scale[N6], best[N6];
    for (int j = 0; j < N6; ++j) { amax[j] = 0.0f; mx[j] = 0.0f; }
    for (int i = 0; i < N6; ++i)
        for (int j = 0; j < N6; ++j) {
            const float a = fabsf(X[i][j]);
            if (a > amax[j]) { amax[j] = a; mx[j] = X[i][j]; }
        }
    for (int j = 0; j < N6; ++j) { isc[j] = (float)(-nmax) / mx[j]; slx[j] = sl2[j] = 0.0f; }
    for (int i = 0; i < N6; ++i)
        for (int j = 0; j < N6; ++j) {
            int l = nearest(isc[j] * X[i][j]);
            l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
            L[i][j] = (int8_t)(l + nmax);
            const float v = X[i][j], w = v * v, fl = (float)l;
            slx[j] += w * v * fl;
            sl2[j] += w * fl * fl;
        }
    for (int j = 0; j < N6; ++j) {
        scale[j] = sl2[j] != 0.0f ? slx[j] / sl2[j] : 0.0f;
        best[j] = scale[j] * slx[j];
    }
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        int ok[N6], any = 0;
        for (int j = 0; j < N6; ++j) { isc[j] = -((float)nmax + 0.1f * (float)is) / mx[j]; slx[j] = sl2[j] = 0.0f; }
        for (int i = 0; i < N6; ++i)
            for (int j = 0; j < N6; ++j) {
                int l = nearest(isc[j] * X[i][j]);
                l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
                const float v = X[i][j], w = v * v, fl = (float)l;
                slx[j] += w * v * fl;
                sl2[j] += w * fl * fl;
            }
        for (int j = 0; j < N6; ++j) {
            ok[j] = sl2[j] > 0.0f && slx[j] * slx[j] > best[j] * sl2[j];
            if (ok[j]) { scale[j] = slx[j] / sl2[j]; best[j] = scale[j] * slx[j]; any = 1; }
        }
        if (any)
            for (int i = 0; i < N6; ++i)
                for (int j = 0; j < N6; ++j)
                    if (ok[j]) {
                        int l = nearest(isc[j] * X[i][j]);
                        l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
                        L[i][j] = (int8_t)(l + nmax);
                    }
    }
    for (int j = 0; j < N6; ++j) {
        if (amax[j] < EPS_GROUP) {      /* all (near) zero: ggml returns early with zero levels */
            for (int i = 0; i < N6; ++i) L[i][j] = 0;
            out[j] = 0.0f;
        } else {
            out[j] = scale[j];
        }
    }
}

static void q6_K_rows(const float *x, uint8_t *y, int64_t n) {
    float X[N6][N6], sc[N6];
    int8_t L[N6][N6];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 210) {
        for (int j = 0; j < N6; ++j)
            for (int i = 0; i < N6; ++i) X[i][j] = x[N6 * j + i];
        qx_16(X, L, sc);
        float max_scale = 0.0f, max_abs = 0.0f;
        for (int j = 0; j < N6; ++j) {
            const float a = fabsf(sc[j]);
            if (a > max_abs) { max_abs = a; max_scale = sc[j]; }
        }
        uint8_t *ql = y, *qh = y + 128;
        int8_t *scales = (int8_t *)(y + 192);
        if (max_abs < EPS_GROUP) {
            memset(y, 0, 210);
            continue;
        }
        const float iscale = -128.f / max_scale;
        const uint16_t hd = to_half(1.0f / iscale);
        put_half(y + 208, hd);
        const float fd = from_half(hd);
        float d[N6];
        for (int j = 0; j < N6; ++j) {
            const int s = nearest(iscale * sc[j]);
            scales[j] = (int8_t)(s < 127 ? s : 127);
            d[j] = fd * (float)scales[j];
        }
        for (int i = 0; i < N6; ++i)
            for (int j = 0; j < N6; ++j) {
                if (d[j] == 0.0f) continue;
                int l = nearest(X[i][j] / d[j]);
                l = l < -32 ? -32 : (l > 31 ? 31 : l);
                L[i][j] = (int8_t)(l + 32);
            }
        /* value k of the block is L[k % 16][k / 16]; two 128-value halves, four 32-value quarters */
#define LV(k) ((uint8_t)L[(k) % N6][(k) / N6])
        for (int h = 0; h < 2; ++h, ql += 64, qh += 32) {
            const int base = 128 * h;
            for (int l = 0; l < 32; ++l) {
                const uint8_t a = LV(base + l), b = LV(base + l + 32), c = LV(base + l + 64), e = LV(base + l + 96);
                ql[l] = (uint8_t)((a & 0xF) | ((c & 0xF) << 4));
                ql[l + 32] = (uint8_t)((b & 0xF) | ((e & 0xF) << 4));
                qh[l] = (uint8_t)((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6));
            }
        }
#undef LV
    }
}

/* ---------------------------------------------------------------- Python binding */

#if defined(__GNUC__) || defined(__clang__)
#define HAVE_VEC 1
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
#define NL 4
#define VF v4f
#define VI v4i
#define SUF(name) name##_v4
#include "_kernels_vec.h"
#undef NL
#undef VF
#undef VI
#undef SUF
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
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#define NL 8
#define VF v8f
#define VI v8i
#define SUF(name) name##_v8
#include "_kernels_vec.h"
#undef NL
#undef VF
#undef VI
#undef SUF
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
