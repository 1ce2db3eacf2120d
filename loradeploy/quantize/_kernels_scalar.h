/*
 * The scalar path of _kernels.c: ggml's reference quantizers for Q4_K, Q5_K and Q6_K restated one
 * sub-block at a time, with the same float operations in the same order. It is what runs where the
 * compiler has no generic vectors, and the yardstick the vector path is tested against.
 * Included only by _kernels.c, after its helpers.
 */
/* ------------------------------------------------- Q4_K / Q5_K: 8 sub-blocks of 32 side by side */

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

/* Q4_K and Q5_K final levels: each value fitted to its sub-block's final step d and offset dm */
static void k_levels(const float X[SL][NS], const float d[NS], const float dm[NS], int nmax, uint8_t L[SL][NS]) {
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

/* Q4_K and Q5_K rows: per super-block the search, the 6-bit scales, then the type's level layout */
static inline void k_rows(const float *x, uint8_t *y, int64_t n, const kq_t *k) {
    float X[SL][NS], sc[NS], mi[NS], d[NS], dm[NS];
    uint8_t L[SL][NS], lv[QK_K];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += k->bytes) {
        load8(x, X);
        qkx2_8(X, k->nmax, k->rmin, k->rdelta, k->nstep, L, sc, mi);
        k_scales(sc, mi, y, y + 4, d, dm);
        k_levels(X, d, dm, k->nmax, L);
        for (int j = 0; j < NS; ++j)
            for (int i = 0; i < SL; ++i) lv[SL * j + i] = L[i][j];
        k->pack(lv, y);
    }
}

static void q4_K_rows(const float *x, uint8_t *y, int64_t n) { k_rows(x, y, n, &KQ_Q4_K); }
static void q5_K_rows(const float *x, uint8_t *y, int64_t n) { k_rows(x, y, n, &KQ_Q5_K); }

/* ------------------------------------------------- Q6_K: 16 sub-blocks of 16 side by side */

#define N6 16

/* One grid of make_qx_quants (nmax 32) for all sixteen sub-blocks: the levels at inverse scale isc[j]
 * (offset by 32) and the sums sum(w x l), sum(w l^2) with w = x^2 that the scale is fitted from. */
static inline void qx_grid_16(const float X[N6][N6], const float isc[N6], int8_t L[N6][N6],
                              float slx[N6], float sl2[N6]) {
    for (int j = 0; j < N6; ++j) slx[j] = sl2[j] = 0.0f;
    for (int i = 0; i < N6; ++i)
        for (int j = 0; j < N6; ++j) {
            int l = nearest(isc[j] * X[i][j]);
            l = l < -32 ? -32 : (l > 31 ? 31 : l);
            L[i][j] = (int8_t)(l + 32);
            const float v = X[i][j], w = v * v, fl = (float)l;
            slx[j] += w * v * fl;
            sl2[j] += w * fl * fl;
        }
}

/* ggml's make_qx_quants(16, 32, x, L, rmse_type = 1, no weights) for all sixteen sub-blocks. */
static void qx_16(const float X[N6][N6], int8_t L[N6][N6], float out[N6]) {
    const int nmax = 32;
    float amax[N6], mx[N6], isc[N6], slx[N6], sl2[N6], scale[N6], best[N6];
    int8_t La[N6][N6];
    for (int j = 0; j < N6; ++j) { amax[j] = 0.0f; mx[j] = 0.0f; }
    for (int i = 0; i < N6; ++i)
        for (int j = 0; j < N6; ++j) {
            const float a = fabsf(X[i][j]);
            if (a > amax[j]) { amax[j] = a; mx[j] = X[i][j]; }
        }
    for (int j = 0; j < N6; ++j) isc[j] = (float)(-nmax) / mx[j];
    qx_grid_16(X, isc, L, slx, sl2);
    for (int j = 0; j < N6; ++j) {
        scale[j] = sl2[j] != 0.0f ? slx[j] / sl2[j] : 0.0f;
        best[j] = scale[j] * slx[j];
    }
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        int ok[N6], any = 0;
        for (int j = 0; j < N6; ++j) isc[j] = -((float)nmax + 0.1f * (float)is) / mx[j];
        qx_grid_16(X, isc, La, slx, sl2);
        for (int j = 0; j < N6; ++j) {
            ok[j] = sl2[j] > 0.0f && slx[j] * slx[j] > best[j] * sl2[j];
            if (ok[j]) { scale[j] = slx[j] / sl2[j]; best[j] = scale[j] * slx[j]; any = 1; }
        }
        if (any)
            for (int i = 0; i < N6; ++i)
                for (int j = 0; j < N6; ++j)
                    if (ok[j]) L[i][j] = La[i][j];
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
        uint8_t lv[QK_K];   /* value k of the block is L[k % 16][k / 16] */
        for (int j = 0; j < N6; ++j)
            for (int i = 0; i < N6; ++i) lv[N6 * j + i] = (uint8_t)L[i][j];
        pack_q6_K(lv, y);
    }
}
