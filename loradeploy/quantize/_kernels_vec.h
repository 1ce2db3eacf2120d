/*
 * The SIMD path of _kernels.c: the same per-sub-block arithmetic as the scalar path, written with
 * GCC/Clang generic vectors so each lane is one sub-block. Generic vector operations are plain
 * element-wise IEEE operations, so a lane computes exactly what the scalar code computes for that
 * sub-block; masks and selections replace its branches.
 *
 * A template: _kernels.c includes it once per lane count with NL (4 or 8) defined; the copy's vector
 * types and function names (name_v4, name_v8) follow from it, and NL is undefined again at the end.
 * The lane count must be the machine's native vector width (4 on SSE2/NEON, 8 under AVX2):
 * compilers lower wider generic vectors through memory, which is slower than scalar code.
 */
#define SUF_(name, n) name##_v##n
#define SUF_N(name, n) SUF_(name, n)
#define SUF(name) SUF_N(name, NL)
typedef float SUF(vf) __attribute__((vector_size(4 * NL)));
typedef int32_t SUF(vi) __attribute__((vector_size(4 * NL)));
#define VF SUF(vf)
#define VI SUF(vi)

#if NL == 4
#define BF(f) ((VF){f, f, f, f})
#define BI(k) ((VI){k, k, k, k})
#else
#define BF(f) ((VF){f, f, f, f, f, f, f, f})
#define BI(k) ((VI){k, k, k, k, k, k, k, k})
#endif
/* m is a lane mask (all ones / zero) from a vector comparison */
#define SELI(m, a, b) (((a) & (m)) | ((b) & ~(m)))
#define SELF(m, a, b) ((VF)SELI((m), (VI)(a), (VI)(b)))
#define NEAREST(v) ((((VI)((v) + BF(12582912.f))) & BI(0x007fffff)) - BI(0x00400000))
#define CLAMPI(l, lo, hi) SELI((l) > (hi), (hi), SELI((l) < (lo), (lo), (l)))
#define ABSF(v) ((VF)(((VI)(v)) & BI(0x7fffffff)))
#define TOF(l) __builtin_convertvector((l), VF)

/* make_qkx2_quants for NL sub-blocks of 32; X[i] holds value i of each */
static void SUF(qkx2)(const VF X[SL], int nmax, float rmin, float rdelta, int nstep,
                      VI L[SL], float *scale_out, float *min_out) {
    VF W[SL];
    VI La[SL];
    const VI NM = BI(nmax), ZI = BI(0);
    VF sx2 = BF(0.0f);
    for (int i = 0; i < SL; ++i) sx2 += X[i] * X[i];
    VF q = sx2 / BF(32.0f), avx;
    for (int j = 0; j < NL; ++j) avx[j] = sqrtf(q[j]);
    for (int i = 0; i < SL; ++i) W[i] = avx + ABSF(X[i]);

    VF mn = X[0], mx = X[0], sw = W[0], sx = W[0] * X[0];
    for (int i = 1; i < SL; ++i) {
        mn = SELF(X[i] < mn, X[i], mn);
        mx = SELF(X[i] > mx, X[i], mx);
        sw += W[i];
        sx += W[i] * X[i];
    }
    mn = SELF(mn > BF(0.0f), BF(0.0f), mn);
    const VF lo0 = mn;

    VF isc = BF((float)nmax) / (mx - mn);
    VF scale = BF(1.0f) / isc, best = BF(0.0f);
    for (int i = 0; i < SL; ++i) {
        const VI l = CLAMPI(NEAREST(isc * (X[i] - mn)), ZI, NM);
        L[i] = l;
        const VF diff = scale * TOF(l) + mn - X[i];
        best += W[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        const float num = rmin + rdelta * (float)is + (float)nmax;
        isc = BF(num) / (mx - mn);
        VF sl = BF(0.0f), sl2 = BF(0.0f), sxl = BF(0.0f);
        for (int i = 0; i < SL; ++i) {
            const VI l = CLAMPI(NEAREST(isc * (X[i] - mn)), ZI, NM);
            La[i] = l;
            const VF fl = TOF(l);
            sl += W[i] * fl;
            sl2 += W[i] * fl * fl;
            sxl += W[i] * fl * X[i];
        }
        const VF D = sw * sl2 - sl * sl;
        VF s = (sw * sxl - sx * sl) / D;
        VF m = (sl2 * sx - sl * sxl) / D;
        const VI pos = m > BF(0.0f);
        m = SELF(pos, BF(0.0f), m);
        s = SELF(pos, sxl / sl2, s);
        VF cur = BF(0.0f);
        for (int i = 0; i < SL; ++i) {
            const VF diff = s * TOF(La[i]) + m - X[i];
            cur += W[i] * (diff * diff);
        }
        const VI ok = (D > BF(0.0f)) & (cur < best);
        best = SELF(ok, cur, best);
        scale = SELF(ok, s, scale);
        mn = SELF(ok, m, mn);
        for (int i = 0; i < SL; ++i) L[i] = SELI(ok, La[i], L[i]);
    }
    const VI flat = mx == lo0;   /* constant sub-block: ggml returns before any search */
    for (int i = 0; i < SL; ++i) L[i] = SELI(flat, ZI, L[i]);
    for (int j = 0; j < NL; ++j) {
        scale_out[j] = flat[j] ? 0.0f : scale[j];
        min_out[j] = flat[j] ? -lo0[j] : -mn[j];
    }
}

/* Q4_K (nmax 15) and Q5_K (nmax 31): search, 6-bit scales, final levels. L[g][i][lane] is the
 * level of value i of sub-block g*NL + lane. */
static void SUF(kquant)(const float *x, int nmax, float rmin, float rdelta, int nstep,
                        uint8_t *dhead, uint8_t scales[12], VI L[NS / NL][SL]) {
    VF X[NS / NL][SL];
    float sc[NS], mi[NS];
    for (int g = 0; g < NS / NL; ++g) {
        for (int i = 0; i < SL; ++i)
            for (int j = 0; j < NL; ++j) X[g][i][j] = x[SL * (g * NL + j) + i];
        SUF(qkx2)(X[g], nmax, rmin, rdelta, nstep, L[g], sc + g * NL, mi + g * NL);
    }
    float ds[NS], dms[NS];
    k_scales(sc, mi, dhead, scales, ds, dms);
    VF d[NS / NL], dm[NS / NL];
    memcpy(d, ds, sizeof d);
    memcpy(dm, dms, sizeof dm);
    for (int g = 0; g < NS / NL; ++g) {
        const VI nz = d[g] != BF(0.0f);   /* where d is 0 ggml keeps the search's levels */
        for (int i = 0; i < SL; ++i) {
            const VI l = CLAMPI(NEAREST((X[g][i] + dm[g]) / d[g]), BI(0), BI(nmax));
            L[g][i] = SELI(nz, l, L[g][i]);
        }
    }
}

/* A super-block's levels in value order for the packers: L holds sub-blocks of len values, sub-block
 * s in lane s % NL of group s / NL, so value i of sub-block s is L[(s / NL) * len + i][s % NL]. */
static inline void SUF(levels)(const VI *L, int len, uint8_t lv[QK_K]) {
    for (int s = 0; s < QK_K / len; ++s)
        for (int i = 0; i < len; ++i) lv[len * s + i] = (uint8_t)L[(s / NL) * len + i][s % NL];
}

static inline void SUF(k_rows)(const float *x, uint8_t *y, int64_t n, const kq_t *k) {
    VI L[NS / NL][SL];
    uint8_t lv[QK_K];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += k->bytes) {
        SUF(kquant)(x, k->nmax, k->rmin, k->rdelta, k->nstep, y, y + 4, L);
        SUF(levels)(&L[0][0], SL, lv);
        k->pack(lv, y);
    }
}

static void SUF(q4_K_rows)(const float *x, uint8_t *y, int64_t n) { SUF(k_rows)(x, y, n, &KQ_Q4_K); }
static void SUF(q5_K_rows)(const float *x, uint8_t *y, int64_t n) { SUF(k_rows)(x, y, n, &KQ_Q5_K); }

/* one grid of make_qx_quants (nmax 32): levels at inverse scale isc (offset by 32), sum(w x l) and
 * sum(w l^2) with w = x^2 */
static inline void SUF(qx_grid)(const VF X[N6], VF isc, VI L[N6], VF *slx_out, VF *sl2_out) {
    VF slx = BF(0.0f), sl2 = BF(0.0f);
    for (int i = 0; i < N6; ++i) {
        const VI l = CLAMPI(NEAREST(isc * X[i]), BI(-32), BI(31));
        L[i] = l + BI(32);
        const VF w = X[i] * X[i], fl = TOF(l);
        slx += w * X[i] * fl;
        sl2 += w * fl * fl;
    }
    *slx_out = slx;
    *sl2_out = sl2;
}

/* make_qx_quants(16, 32, rmse_type 1) for NL of the 16 sub-blocks of a Q6_K super-block */
static void SUF(qx)(const VF X[N6], VI L[N6], float *out) {
    const float nmax = 32.0f;
    VI La[N6];
    VF amax = BF(0.0f), mx = BF(0.0f), slx, sl2;
    for (int i = 0; i < N6; ++i) {
        const VF a = ABSF(X[i]);
        const VI g = a > amax;
        amax = SELF(g, a, amax);
        mx = SELF(g, X[i], mx);
    }
    SUF(qx_grid)(X, BF(-32.0f) / mx, L, &slx, &sl2);
    VF scale = SELF(sl2 != BF(0.0f), slx / sl2, BF(0.0f));
    VF best = scale * slx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        SUF(qx_grid)(X, BF(-(nmax + 0.1f * (float)is)) / mx, La, &slx, &sl2);
        const VI ok = (sl2 > BF(0.0f)) & (slx * slx > best * sl2);
        const VF ns = slx / sl2;
        scale = SELF(ok, ns, scale);
        best = SELF(ok, ns * slx, best);
        for (int i = 0; i < N6; ++i) L[i] = SELI(ok, La[i], L[i]);
    }
    const VI zero = amax < BF(EPS_GROUP);   /* ggml returns early with zero levels */
    for (int i = 0; i < N6; ++i) L[i] = SELI(zero, BI(0), L[i]);
    for (int j = 0; j < NL; ++j) out[j] = zero[j] ? 0.0f : scale[j];
}

static void SUF(q6_K_rows)(const float *x, uint8_t *y, int64_t n) {
    VF X[N6 / NL][N6];
    VI L[N6 / NL][N6];
    float sc[N6];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 210) {
        for (int g = 0; g < N6 / NL; ++g) {
            for (int i = 0; i < N6; ++i)
                for (int j = 0; j < NL; ++j) X[g][i][j] = x[N6 * (g * NL + j) + i];
            SUF(qx)(X[g], L[g], sc + g * NL);
        }
        float max_scale = 0.0f, max_abs = 0.0f;
        for (int j = 0; j < N6; ++j) {
            const float a = fabsf(sc[j]);
            if (a > max_abs) { max_abs = a; max_scale = sc[j]; }
        }
        if (max_abs < EPS_GROUP) {
            memset(y, 0, 210);
            continue;
        }
        int8_t *scales = (int8_t *)(y + 192);
        const float iscale = -128.f / max_scale;
        const uint16_t hd = to_half(1.0f / iscale);
        put_half(y + 208, hd);
        const float fd = from_half(hd);
        VF d[N6 / NL];
        for (int j = 0; j < N6; ++j) {
            const int s = nearest(iscale * sc[j]);
            scales[j] = (int8_t)(s < 127 ? s : 127);
            d[j / NL][j % NL] = fd * (float)scales[j];
        }
        for (int g = 0; g < N6 / NL; ++g) {
            const VI nz = d[g] != BF(0.0f);
            for (int i = 0; i < N6; ++i) {
                const VI l = CLAMPI(NEAREST(X[g][i] / d[g]), BI(-32), BI(31));
                L[g][i] = SELI(nz, l + BI(32), L[g][i]);
            }
        }
        uint8_t lv[QK_K];
        SUF(levels)(&L[0][0], N6, lv);
        pack_q6_K(lv, y);
    }
}

#undef BF
#undef BI
#undef SELI
#undef SELF
#undef NEAREST
#undef CLAMPI
#undef ABSF
#undef TOF
#undef VF
#undef VI
#undef SUF
#undef SUF_N
#undef SUF_
#undef NL
